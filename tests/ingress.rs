//! The HTTP ingress, black-box: the real binary over real HTTP against a real
//! PostgreSQL. Rows refer to ../shared/RELIABILITY.md.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Proc, config, config_dir, count, db, eventually, sha};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const HOOK_SECRET: &str = "canary-hmac-secret-0123456789";

fn test_config() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"
body_limit_bytes = 4096
read_timeout = "1s"
max_wait = "10s"
batch_max = 5
db_timeout = "1s"

[[ingress.tokens]]
name = "all"
sha256 = "{all}"
queues = ["*"]
scopes = ["logs", "read_all"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "probe-only"
sha256 = "{probe}"
queues = ["probe"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "slow"
sha256 = "{slow}"
queues = ["*"]
rate_per_second = 1
burst = 3

[[ingress.tokens]]
name = "old"
sha256 = "{revoked}"
queues = ["*"]
rate_per_second = 10
burst = 10
revoked = true

[[ingress.tokens]]
name = "ops-read"
sha256 = "{admin_read}"
queues = []
scopes = ["admin:read"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "ops"
sha256 = "{admin_write}"
queues = []
scopes = ["admin:write"]
rate_per_second = 1000
burst = 1000

[hooks.watch]
secret = "{HOOK_SECRET}"
queue = "probe"
signature_header = "x-hmac-sha256"
timestamp_header = "x-timestamp"
delivery_header = "x-delivery-id"

[hooks.plain]
secret = "{HOOK_SECRET}"
queue = "probe"
signature_header = "x-hmac-sha256"
allow_replay = true
"#,
        all = sha("tok-all-canary"),
        probe = sha("tok-probe"),
        slow = sha("tok-slow"),
        revoked = sha("tok-revoked"),
        admin_read = sha("tok-admin-read"),
        admin_write = sha("tok-admin-write"),
    )
}

struct Env {
    t: longshore_workers::testing::TestDb,
    ingress: Proc,
    base: String,
    http: reqwest::Client,
}

async fn start() -> Env {
    let t = db().await;
    let dir = config_dir(&test_config());
    let ingress = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["ingress"],
        &[("LONGSHORE_ENV", "test")],
    );
    let base = format!("http://{}", ingress.ingress_addr().await);
    Env {
        t,
        ingress,
        base,
        http: reqwest::Client::new(),
    }
}

impl Env {
    fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}{path}", self.base)).body(body);
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
    fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
    }
}

/// Asserts the error envelope and returns its code.
async fn error_code(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status, "status");
    let rid = r
        .headers()
        .get("x-request-id")
        .expect("x-request-id header")
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.expect("JSON error body");
    let e = &v["error"];
    assert_eq!(e["request_id"], rid, "request id in body and header: {v}");
    assert!(!e["message"].as_str().unwrap().is_empty(), "{v}");
    e["code"].as_str().expect("code").to_string()
}

#[tokio::test]
async fn enqueue_then_wait_for_done_with_the_result() {
    let env = start().await;
    let r = env
        .post(
            "/v1/queues/probe/jobs",
            Some("tok-all-canary"),
            r#"{"id":1,"effect":true}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let s: Value = env
        .get(&format!("/v1/jobs/probe/{id}"), "tok-all-canary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["state"], "queued");
    let _w = Proc::spawn(
        &env.t.url,
        &["worker"],
        &[("LONGSHORE__QUEUES__PROBE__MAX_ATTEMPTS", "1")],
    );
    let started = std::time::Instant::now();
    let s: Value = env
        .get(&format!("/v1/jobs/probe/{id}?wait=8"), "tok-all-canary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["result"]["id"], 1);
    assert_eq!(s["attempts"], 1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "woken by the completion, not the deadline"
    );
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM probe_effects").await,
        1
    );

    // A dead job reports its reason; an unknown id is 404.
    let r = env
        .post(
            "/v1/queues/probe/jobs",
            Some("tok-all-canary"),
            r#"{"id":2,"panic":true}"#,
        )
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let s: Value = env
        .get(&format!("/v1/jobs/probe/{id}?wait=8"), "tok-all-canary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["state"], "dead", "{s}");
    assert!(
        s["last_error"].as_str().unwrap().contains("panicked"),
        "{s}"
    );
    let r = env
        .get("/v1/jobs/probe/999999", "tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_job");
}

#[tokio::test]
async fn row33_tokens_missing_wrong_revoked_and_scoped() {
    let env = start().await;
    let body = r#"{"id":1}"#;
    let r = env
        .post("/v1/queues/probe/jobs", None, body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "missing_token");
    let r = env
        .post("/v1/queues/probe/jobs", Some("wrong"), body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "invalid_token");
    let r = env
        .http
        .post(format!("{}/v1/queues/probe/jobs", env.base))
        .header("authorization", "Basic abc")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "invalid_token");
    let r = env
        .post("/v1/queues/probe/jobs", Some("tok-revoked"), body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "token_revoked");
    // A public queue the token may not use is 403; an internal one does not exist.
    let r = env
        .post(
            "/v1/queues/llm_call/jobs",
            Some("tok-probe"),
            r#"{"request_id":"7d8f4e2a-1111-4c3b-9a57-0f7c1d2e3f40","user_id":"0b7e0a52-2222-4c3b-9a57-0f7c1d2e3f40","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 403).await, "queue_forbidden");
    let r = env
        .post(
            "/v1/queues/maintenance/jobs",
            Some("tok-probe"),
            r#"{"task":"expire_idempotency_keys"}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_queue");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        0,
        "nothing enqueued"
    );
}

#[tokio::test]
async fn row32_hostile_queue_names_are_404_before_any_sql() {
    let env = start().await;
    let tables = "SELECT count(*) FROM pg_class";
    let before = count(&env.t.pool, tables).await;
    for q in [
        "x%3B%20drop%20table%20probe_effects",
        "pro'be",
        "%22probe%22",
        &"a".repeat(64),
        "%C3%A9t%C3%A9",
        "PROBE",
        "nosuch",
    ] {
        let r = env
            .post(
                &format!("/v1/queues/{q}/jobs"),
                Some("tok-all-canary"),
                r#"{"id":1}"#,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 404).await, "unknown_queue", "{q}");
    }
    assert_eq!(count(&env.t.pool, tables).await, before);
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM probe_effects").await,
        0
    );
}

#[tokio::test]
async fn bad_bodies_and_options() {
    let env = start().await;
    let tok = Some("tok-all-canary");
    let r = env
        .post("/v1/queues/probe/jobs", tok, "{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    let r = env
        .post("/v1/queues/probe/jobs", tok, r#"{"id":"one"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_args");
    let r = env
        .post("/v1/queues/probe/jobs", tok, "[1,2]")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_args");
    let r = env
        .post("/v1/queues/probe/jobs?delay=soon", tok, r#"{"id":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_options");
    let r = env
        .post("/v1/queues/probe/jobs?delay=1h", tok, r#"{"id":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = env
        .post(
            "/v1/queues/probe/jobs?run_at=2030-01-01T00:00:00Z",
            tok,
            r#"{"id":2}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        count(
            &env.t.pool,
            "SELECT count(*) FROM pgmq.q_probe WHERE vt > now() + interval '50 minutes'"
        )
        .await,
        2
    );
    // Unknown route and wrong method get the same envelope.
    let r = env
        .get("/v1/nothing", "tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "not_found");
    let r = env
        .get("/v1/queues/probe/jobs", "tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 405).await, "method_not_allowed");
}

#[tokio::test]
async fn row30_oversized_and_slow_bodies() {
    let env = start().await;
    let big = format!(r#"{{"id":1,"pad":"{}"}}"#, "x".repeat(5000));
    let r = env
        .post("/v1/queues/probe/jobs", Some("tok-all-canary"), big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 413).await, "body_too_large");
    // Chunked, without a Content-Length: still cut at the limit.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let r = env
        .post(
            "/v1/queues/probe/jobs",
            Some("tok-all-canary"),
            reqwest::Body::wrap_stream(stream),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 413).await, "body_too_large");

    // 1 byte per second: dropped after the 1 s read timeout with 408.
    let addr = env.base.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /v1/queues/probe/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-all-canary\r\ncontent-length: 100\r\n\r\n{{"
        )
        .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            std::thread::sleep(Duration::from_millis(400));
            let _ = s.write_all(b" ");
            s.set_nonblocking(true).unwrap();
            let n = s.read(&mut buf).unwrap_or(0);
            s.set_nonblocking(false).unwrap();
            if n > 0 || started.elapsed() > Duration::from_secs(8) {
                return (String::from_utf8_lossy(&buf[..n]).to_string(), started.elapsed());
            }
        }
    })
    .await
    .unwrap();
    assert!(answer.0.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.0.contains("request_timeout"), "{answer:?}");
    assert!(answer.1 < Duration::from_secs(4), "{answer:?}");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        0
    );
}

#[tokio::test]
async fn idempotency_keys_over_http() {
    let env = start().await;
    let send = |body: &'static str| {
        env.post("/v1/queues/probe/jobs", Some("tok-all-canary"), body)
            .header("idempotency-key", "order-1")
            .send()
    };
    let a: Value = send(r#"{"id":1}"#).await.unwrap().json().await.unwrap();
    let b: Value = send(r#"{ "id": 1 }"#).await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(
        (a["duplicate"].as_bool(), b["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    let r = send(r#"{"id":2}"#).await.unwrap();
    assert_eq!(error_code(r, 409).await, "idempotency_conflict");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        1
    );
}

#[tokio::test]
async fn batches_are_all_or_nothing() {
    let env = start().await;
    let tok = Some("tok-all-canary");
    let r = env
        .post(
            "/v1/queues/probe/jobs:batch",
            tok,
            r#"[{"id":1},{"id":2},{"id":3}]"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 3);
    let r = env
        .post(
            "/v1/queues/probe/jobs:batch",
            tok,
            r#"[{"id":4},{"id":"five"}]"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_args");
    let six = serde_json::to_string(&(0..6).map(|i| json!({"id": i})).collect::<Vec<_>>()).unwrap();
    let r = env
        .post("/v1/queues/probe/jobs:batch", tok, six)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_batch");
    let r = env
        .post("/v1/queues/probe/jobs:batch", tok, r#"{"id":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        3,
        "only the good batch"
    );
}

#[tokio::test]
async fn row31_a_burst_over_one_tokens_limit_leaves_others_alone() {
    let env = start().await;
    let mut codes = Vec::new();
    for i in 0..5 {
        let r = env
            .post(
                "/v1/queues/probe/jobs",
                Some("tok-slow"),
                format!(r#"{{"id":{i}}}"#),
            )
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            let ra: u64 = r
                .headers()
                .get("retry-after")
                .expect("Retry-After")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(ra >= 1);
            assert_eq!(error_code(r, 429).await, "rate_limited");
            codes.push(429);
        } else {
            codes.push(r.status().as_u16());
        }
    }
    assert_eq!(&codes[..3], &[202, 202, 202], "the burst of 3 passes");
    assert!(codes[3..].contains(&429), "{codes:?}");
    let r = env
        .post(
            "/v1/queues/probe/jobs",
            Some("tok-all-canary"),
            r#"{"id":9}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "another token is unaffected");
}

fn sign(msg: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    m.update(msg);
    hex::encode(m.finalize().into_bytes())
}

#[tokio::test]
async fn row28_and_29_signed_webhooks() {
    let env = start().await;
    let body = r#"{"id": 7}"#;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hook = |sig: String, ts: u64, delivery: &str, body: &'static str| {
        env.http
            .post(format!("{}/v1/hooks/watch", env.base))
            .header("x-hmac-sha256", sig)
            .header("x-timestamp", ts.to_string())
            .header("x-delivery-id", delivery)
            .body(body)
    };
    let good = sign(format!("{now}.{body}").as_bytes());
    let a: Value = hook(good.clone(), now, "d1", body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(a["queue"], "probe");
    // The same delivery again: one job.
    let b: Value = hook(good.clone(), now, "d1", body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (a["id"].clone(), b["duplicate"].as_bool()),
        (b["id"].clone(), Some(true))
    );
    // Wrong, missing, malformed signature; re-serialised body; stale timestamp.
    let r = hook("00".repeat(32), now, "d2", body).send().await.unwrap();
    assert_eq!(error_code(r, 401).await, "invalid_signature");
    let r = hook("zz".into(), now, "d2", body).send().await.unwrap();
    assert_eq!(error_code(r, 401).await, "invalid_signature");
    let r = hook(good.clone(), now, "d2", r#"{"id":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "invalid_signature");
    let old = now - 301;
    let r = hook(sign(format!("{old}.{body}").as_bytes()), old, "d3", body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "stale_timestamp");
    let r = env
        .http
        .post(format!("{}/v1/hooks/watch", env.base))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "missing_signature");
    let r = env
        .http
        .post(format!("{}/v1/hooks/nosuch", env.base))
        .body(body)
        .send()
        .await
        .unwrap();
    // An unknown source is not told apart from a bad signature.
    assert_eq!(error_code(r, 401).await, "invalid_signature");
    // A source without timestamps signs the raw body only.
    let r = env
        .http
        .post(format!("{}/v1/hooks/plain", env.base))
        .header("x-hmac-sha256", sign(br#"{"id": 8}"#))
        .body(r#"{"id": 8}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        2
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let env = start().await;
    assert_eq!(
        env.http
            .get(format!("{}/healthz", env.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        env.http
            .get(format!("{}/readyz", env.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    env.post(
        "/v1/queues/probe/jobs",
        Some("tok-all-canary"),
        r#"{"id":1}"#,
    )
    .send()
    .await
    .unwrap();
    let base = env.base.clone();
    let http = env.http.clone();
    let text = eventually(Duration::from_secs(10), "queue depth sampled", || {
        let (base, http) = (base.clone(), http.clone());
        async move {
            let t = http
                .get(format!("{base}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            t.contains("longshore_queue_depth{queue=\"probe\"} 1")
                .then_some(t)
        }
    })
    .await;
    for series in [
        "longshore_queue_inflight{queue=\"probe\"}",
        "longshore_queue_delayed{queue=\"probe\"}",
        "longshore_queue_oldest_age_seconds{queue=\"probe\"}",
        "longshore_dead_letters{queue=\"probe\"}",
        "longshore_http_requests_total{route=\"/v1/queues/{queue}/jobs\",method=\"POST\",status=\"202\"} 1",
        "longshore_http_request_duration_seconds_bucket{route=\"/v1/queues/{queue}/jobs\"",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    // Every line parses as the Prometheus text format: comments or `name{labels} value`.
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = l.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
            "bad sample: {l}"
        );
    }
    let served: Value = env
        .http
        .get(format!("{}/openapi.json", env.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Exactly the routes served, each by the methods it documents: every route is
    // documented (the runtime's paths are the list its router is built from, plus the
    // pipelines' text routes), and every documented operation reaches a handler (not
    // the fallback, not 405).
    let documented: std::collections::BTreeSet<&str> = served["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    let registry = longshore_jobs::door_registry(&config(&[])).unwrap();
    let mut routed: std::collections::BTreeSet<&str> =
        longshore_workers::ingress::Ingress::runtime_paths()
            .into_iter()
            .collect();
    routed.extend(registry.text_routes().iter().map(|r| r.path));
    assert!(routed.contains("/v1/logs") && routed.contains("/v1/hooks/{source}"));
    assert_eq!(documented, routed);
    for (path, item) in served["paths"].as_object().unwrap() {
        let url = path
            .replace("{queue}", "probe")
            .replace("{id}", "1")
            .replace("{source}", "nosuchhook");
        let operations: Vec<&String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ["get", "put", "post", "delete", "patch"].contains(&k.as_str()))
            .collect();
        assert!(!operations.is_empty(), "{path} documents no operation");
        for method in operations {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let r = env
                .http
                .request(method.clone(), format!("{}{url}", env.base))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            // The fallback's own answer (the served document quotes its message too).
            let fallback = serde_json::from_str::<Value>(&body).is_ok_and(|b| {
                b["error"]["code"] == "not_found" && b["error"]["message"] == "no such route"
            });
            assert!(
                status != 405 && !fallback,
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
    // Every reference inside the document resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r);
                }
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&served, &mut found);
    assert!(!found.is_empty(), "the document uses references");
    for r in found {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(served.pointer(pointer).is_some(), "{r} does not resolve");
    }
}

#[tokio::test]
async fn row12_database_down_is_503_with_retry_after_never_a_hang() {
    let dir = config_dir(&test_config());
    let ingress = Proc::spawn_in(
        Some(&dir),
        "postgres://postgres@127.0.0.1:1/none",
        &["ingress"],
        &[("LONGSHORE_ENV", "test")],
    );
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok-all-canary")
        .body(r#"{"id":1}"#)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r, 503).await, "database_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the db timeout"
    );
    let r = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(error_code(r, 503).await, "database_unavailable");
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn row34_canary_secrets_never_reach_logs_or_bodies() {
    let env = start().await;
    let mut bodies = String::new();
    for (path, tok, body) in [
        (
            "/v1/queues/probe/jobs",
            Some("tok-all-canary"),
            r#"{"id":"x"}"#,
        ),
        (
            "/v1/queues/probe/jobs",
            Some("tok-all-canary-wrong"),
            r#"{"id":1}"#,
        ),
        ("/v1/hooks/watch", None, r#"{"id":1}"#),
    ] {
        bodies.push_str(
            &env.post(path, tok, body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    // The request id of an error is in the header, the body and the request's log line.
    let r = env
        .post("/v1/queues/probe/jobs", None, "{}")
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(r.text().await.unwrap().contains(&rid));
    let line = eventually(Duration::from_secs(5), "the request's log line", || async {
        env.ingress
            .logs()
            .lines()
            .find(|l| l.contains(&rid))
            .map(str::to_string)
    })
    .await;
    assert!(
        line.contains("401") && line.contains("/v1/queues/{queue}/jobs"),
        "{line}"
    );
    let logs = env.ingress.logs();
    for canary in ["tok-all-canary", HOOK_SECRET, "canary-hmac"] {
        assert!(
            !bodies.contains(canary),
            "{canary} in a response body: {bodies}"
        );
        assert!(!logs.contains(canary), "{canary} in the logs: {logs}");
    }
}

/// Row 12: the pool is exhausted (every connection stuck behind a lock): new requests
/// get 503 + Retry-After within the acquire timeout; no 202 for anything uncommitted.
#[tokio::test]
async fn row12_pool_exhaustion_is_503_and_nothing_acknowledged_uncommitted() {
    let t = db().await;
    let dir = config_dir(&test_config());
    let ingress = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["ingress"],
        &[
            ("LONGSHORE_ENV", "test"),
            ("LONGSHORE__DATABASE__MAX_CONNECTIONS", "2"),
        ],
    );
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    // Hold the queue table so enqueues block while holding their connections.
    let mut locker = t.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE pgmq.q_probe IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..6 {
        let (http, base) = (http.clone(), base.clone());
        calls.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = http
                .post(format!("{base}/v1/queues/probe/jobs"))
                .bearer_auth("tok-all-canary")
                .body(format!(r#"{{"id":{i}}}"#))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().contains_key("retry-after"),
                r.text().await.unwrap(),
                started.elapsed(),
            )
        }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    locker.rollback().await.unwrap();
    for (status, retry_after, body, took) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(*retry_after, "{body}");
        assert!(body.contains("database_unavailable"), "{body}");
        assert!(
            *took < Duration::from_secs(4),
            "answered within the timeout: {took:?}"
        );
    }
    // The pool heals: the next request is accepted, and its job is there.
    let r = env_post(&http, &base, r#"{"id":100}"#).await;
    assert_eq!(r.0, 202, "{}", r.1);
    let id = serde_json::from_str::<Value>(&r.1).unwrap()["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        count(
            &t.pool,
            &format!("SELECT count(*) FROM pgmq.q_probe WHERE msg_id = {id}")
        )
        .await,
        1
    );
}

async fn env_post(http: &reqwest::Client, base: &str, body: &'static str) -> (u16, String) {
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok-all-canary")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Issue 13, item 7: inputs that used to panic or 500 are 422s in the envelope: a delay
/// that overflows the clock, a NUL in the args, a query value of the wrong type.
#[tokio::test]
async fn hostile_options_and_nul_bodies_are_422_not_panics() {
    let env = start().await;
    let tok = Some("tok-all-canary");
    for q in [
        "?delay=18446744073709551615",
        "?delay=99999999999999999999",
        "?delay=20000d",
        "?run_at=9999-12-31T23:59:59Z",
    ] {
        let r = env
            .post(&format!("/v1/queues/probe/jobs{q}"), tok, r#"{"id":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 422).await, "invalid_options", "{q}");
    }
    for body in [r#"{"id":1,"x":"a\u0000b"}"#, r#"{"id":1,"k\u0000":1}"#] {
        let r = env
            .post("/v1/queues/probe/jobs", tok, body)
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 422).await, "invalid_args", "{body}");
    }
    let r = env
        .post(
            "/v1/queues/probe/jobs:batch",
            tok,
            r#"[{"id":1},{"id":2,"s":"\u0000"}]"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_args");
    // Raw log lines with a NUL byte: stored with U+FFFD, like bytes that are not UTF-8.
    let r = env
        .post("/v1/logs", tok, b"line one\0 with a NUL\n".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    for q in ["?wait=null", "?wait=soon"] {
        let r = env
            .get(&format!("/v1/jobs/probe/1{q}"), "tok-all-canary")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 422).await, "invalid_options", "{q}");
    }
    let r = env
        .get("/v1/jobs/probe/not-a-number", "tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_job");
    // A timestamp that would overflow the freshness check is stale, not a panic.
    let body = br#"{"id":1}"#;
    let r = env
        .http
        .post(format!("{}/v1/hooks/watch", env.base))
        .header("x-timestamp", i64::MIN.to_string())
        .header("x-delivery-id", "d-min")
        .header(
            "x-hmac-sha256",
            sign(&[i64::MIN.to_string().as_bytes(), b".", body].concat()),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "stale_timestamp");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        0,
        "nothing enqueued"
    );
    assert!(
        !env.ingress.logs().contains("panicked"),
        "{}",
        env.ingress.logs()
    );
}

/// Issue 13: `POST …/jobs:batch` takes an `Idempotency-Key`: a retried batch enqueues
/// once and answers the same ids; the key with another batch is a 409.
#[tokio::test]
async fn a_retried_batch_with_an_idempotency_key_enqueues_once() {
    let env = start().await;
    let tok = Some("tok-all-canary");
    let send = |body: &'static str| {
        env.post("/v1/queues/probe/jobs:batch", tok, body)
            .header("idempotency-key", "batch-7")
            .send()
    };
    let r = send(r#"[{"id":1},{"id":2},{"id":3}]"#).await.unwrap();
    assert_eq!(r.status(), 202);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    let r = send(r#"[{"id":1},  {"id":2}, {"id":3}]"#).await.unwrap();
    assert_eq!(r.status(), 202);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["ids"], first["ids"]);
    assert_eq!(again["duplicate"], true);
    let r = send(r#"[{"id":1},{"id":2}]"#).await.unwrap();
    assert_eq!(error_code(r, 409).await, "idempotency_conflict");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        3
    );
}

/// Issue 13: on a queue whose done jobs are deleted, a job's status is still `done`
/// (a small completion record stays for the archive retention), not 404.
#[tokio::test]
async fn a_done_job_on_a_delete_queue_answers_done() {
    let t = db().await;
    let dir = config_dir(&test_config());
    let env_vars = [
        ("LONGSHORE_ENV", "test"),
        ("LONGSHORE__QUEUES__PROBE__ON_DONE", "delete"),
    ];
    let ingress = Proc::spawn_in(Some(&dir), &t.url, &["ingress"], &env_vars);
    let _worker = Proc::spawn_in(Some(&dir), &t.url, &["worker"], &env_vars);
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok-all-canary")
        .body(r#"{"id":5,"effect":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let r = http
        .get(format!("{base}/v1/jobs/probe/{id}?wait=10"))
        .bearer_auth("tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.a_probe").await,
        0,
        "deleted, not archived"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects").await,
        1
    );
}

/// Issue 13, item 7: every status and code the ingress can answer is in the OpenAPI
/// document and docs/ingress.md, and the source uses no code missing from the list.
#[test]
fn every_error_code_is_documented() {
    let errors = longshore_workers::ingress::ERRORS;
    // The document as served: the runtime's and the pipelines' text routes (`/v1/logs`).
    let registry = longshore_jobs::door_registry(&config(&[])).unwrap();
    let openapi = longshore_workers::ingress::openapi_document(registry.text_routes());
    let readme = std::fs::read_to_string("docs/ingress.md").unwrap();
    let listed: Vec<&str> = openapi["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .expect("Error.code is an enum")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let mut described = String::new();
    for ops in openapi["paths"].as_object().unwrap().values() {
        for op in ops.as_object().unwrap().values() {
            for (status, r) in op["responses"].as_object().unwrap() {
                described.push_str(&format!(
                    "{status}: {}\n",
                    r["description"].as_str().unwrap_or("")
                ));
            }
        }
    }
    for (status, code) in errors {
        assert!(
            listed.contains(code),
            "{code} not in the OpenAPI Error.code enum"
        );
        assert!(
            described
                .lines()
                .any(|l| l.starts_with(&status.to_string()) && l.contains(&format!("`{code}`"))),
            "no OpenAPI response {status} names `{code}`"
        );
        assert!(
            readme.lines().any(
                |l| l.starts_with(&format!("| {status} |")) && l.contains(&format!("`{code}`"))
            ),
            "docs/ingress.md's table does not list {status} `{code}`"
        );
    }
    for c in &listed {
        assert!(
            errors.iter().any(|(_, e)| e == c),
            "{c} is in the OpenAPI enum but never answered"
        );
    }
    // The source: every (status, code) given to ApiError::new, and the 401 helper's.
    // Every source file of the ingress (the admin API and the console too).
    let mut files: Vec<String> = std::fs::read_dir("workers/src/ingress")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".rs"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let src = std::fs::read_to_string(format!("workers/src/ingress/{f}")).unwrap();
        let pairs = error_pairs(&src, "ApiError::new(").into_iter().chain(
            error_pairs(&src, "unauthorized(")
                .into_iter()
                .map(|(_, c)| (401, c)),
        );
        for (status, code) in pairs {
            assert!(
                errors.iter().any(|(s, c)| *s == status && *c == code),
                "{f} answers {status} `{code}`, which ERRORS does not list"
            );
        }
    }
}

/// The `(status, code)` pairs of the calls to `call` in `src`: `ApiError::new(
/// StatusCode::X, "code", …)`, or `unauthorized("code", …)` (status 0: the caller's).
fn error_pairs(src: &str, call: &str) -> Vec<(u16, String)> {
    let status_of = |name: &str| -> u16 {
        match name {
            "BAD_REQUEST" => 400,
            "UNAUTHORIZED" => 401,
            "FORBIDDEN" => 403,
            "NOT_FOUND" => 404,
            "METHOD_NOT_ALLOWED" => 405,
            "REQUEST_TIMEOUT" => 408,
            "CONFLICT" => 409,
            "PAYLOAD_TOO_LARGE" => 413,
            "UNPROCESSABLE_ENTITY" => 422,
            "TOO_MANY_REQUESTS" => 429,
            "INTERNAL_SERVER_ERROR" => 500,
            "SERVICE_UNAVAILABLE" => 503,
            other => panic!("add StatusCode::{other} to this table"),
        }
    };
    let mut out = Vec::new();
    for (i, _) in src.match_indices(call) {
        let mut rest = &src[i + call.len()..];
        let mut status = 0;
        if call.starts_with("ApiError") {
            let Some(comma) = rest.find(',') else {
                continue;
            };
            let Some(name) = rest[..comma].trim().strip_prefix("StatusCode::") else {
                continue;
            };
            status = status_of(name);
            rest = &rest[comma + 1..];
        }
        if let Some(r) = rest.trim_start().strip_prefix('"')
            && let Some(end) = r.find('"')
        {
            out.push((status, r[..end].to_string()));
        }
    }
    out
}

/// A pipeline's route cannot claim the runtime's `read_all` as its scope (every token
/// that may read would then post to it), nor a scope no token could be given.
#[test]
fn a_route_whose_scope_is_read_all_or_malformed_is_refused_at_start() {
    let cfg = config(&[]);
    for scope in ["read_all", "", "Logs"] {
        let registry = common::registry().text_route(longshore_workers::ingress::TextRoute {
            path: "/v1/other_logs",
            scope,
            queue: "ingest_logs",
            to_args: |_, _| Ok(json!({})),
            openapi: "{}",
        });
        let e = longshore_workers::ingress::check_config(&cfg, &registry).unwrap_err();
        assert!(
            e.contains("/v1/other_logs") && e.contains("scope"),
            "{scope:?}: {e}"
        );
    }
}

/// A text route may not take a path the router would give to the runtime, or the
/// runtime's route would give to it: not only an equal path but one that matches the
/// same requests (`/v1/queues/logs/jobs` would take every enqueue to `logs`), nor a
/// catch-all, nor a path another text route already matches. Each is refused at start,
/// naming the path (axum itself would panic for some and silently shadow the others).
#[test]
fn a_route_whose_path_overlaps_another_is_refused_at_start() {
    let cfg = config(&[]);
    let route = |path: &'static str| longshore_workers::ingress::TextRoute {
        path,
        scope: "other",
        queue: "ingest_logs",
        to_args: |_, _| Ok(json!({})),
        openapi: "{}",
    };
    let runtime = "matches requests of the runtime's";
    for (path, why) in [
        ("/v1/queues/{queue}/jobs", runtime),
        ("/v1/queues/logs/jobs", runtime),
        ("/v1/queues/{q}/jobs:batch", runtime),
        ("/v1/jobs/{a}/{b}", runtime),
        ("/v1/hooks/mine", runtime),
        ("/v1/{anything}", "match the same requests"),
        ("/v1/files/{*rest}", "no catch-all"),
        ("/v1/files/*rest", "no catch-all"),
        ("/v1/x/:id", "no catch-all"),
        ("/v1/x/{a}.json", "not a route pattern"),
        ("/v1/x/a}", "not a route pattern"),
        ("/healthz", "under /v1/"),
        ("/v2/logs", "under /v1/"),
    ] {
        let registry = common::registry().text_route(route(path));
        let e = longshore_workers::ingress::check_config(&cfg, &registry)
            .expect_err(&format!("{path} is refused"));
        assert!(e.contains(path) && e.contains(why), "{path}: {e}");
    }
    // Two text routes that match the same requests.
    let registry = longshore_jobs::door_registry(&cfg)
        .unwrap()
        .text_route(route("/v1/{kind}"));
    let e = longshore_workers::ingress::check_config(&cfg, &registry).unwrap_err();
    assert!(e.contains("/v1/{kind}") && e.contains("/v1/logs"), "{e}");
    // A path beside them is fine.
    let registry = common::registry().text_route(route("/v1/queues/{queue}/stats"));
    longshore_workers::ingress::check_config(&cfg, &registry).expect("no overlap");
}

/// The scopes a token may hold are the runtime's (`read_all`) and those of the text
/// routes the pipelines mount (`logs` for `/v1/logs`); any other is refused at start,
/// naming the key and the known scopes.
#[test]
fn a_scope_that_no_route_offers_is_refused_at_start() {
    let registry = longshore_jobs::door_registry(&config(&[])).unwrap();
    let with_scopes = |scopes: &str| {
        let dir = config_dir(&format!(
            r#"
[[ingress.tokens]]
name = "t"
sha256 = "{}"
queues = ["*"]
scopes = {scopes}
rate_per_second = 10
burst = 10
"#,
            hex::encode(Sha256::digest(b"tok"))
        ));
        let vars = common::test_env();
        let c =
            longshore_workers::Config::load_runtime_from(&dir.join("config"), Some("test"), vars)
                .expect("loads");
        std::fs::remove_dir_all(&dir).unwrap();
        c
    };
    longshore_workers::ingress::check_config(&with_scopes(r#"["logs", "read_all"]"#), &registry)
        .expect("both scopes exist");
    let e = longshore_workers::ingress::check_config(&with_scopes(r#"["log"]"#), &registry)
        .unwrap_err();
    assert!(
        e.contains("ingress.tokens[0].scopes")
            && e.contains(r#"known scopes are "admin:read", "admin:write", "logs", "read_all""#),
        "{e}"
    );
    // Without the pipelines' routes, `logs` is not a scope at all.
    let bare = longshore_workers::Registry::new();
    let e =
        longshore_workers::ingress::check_config(&with_scopes(r#"["logs"]"#), &bare).unwrap_err();
    assert!(
        e.contains(r#"known scopes are "admin:read", "admin:write", "read_all""#),
        "{e}"
    );
}

/// Issue 19: the operator controls over HTTP. `admin:read` sees the queues (with the
/// pause) and may not act (403 `scope_forbidden`); `admin:write` pauses and resumes a
/// queue and cancels and retries jobs, each recorded under `token:<name>`; an enqueue
/// token reaches nothing under /v1/admin/; unknown queues and jobs are 404.
#[tokio::test]
async fn admin_routes_read_and_act_by_scope() {
    let env = start().await;
    let get = |path: &str, tok: &str| {
        env.http
            .get(format!("{}{path}", env.base))
            .bearer_auth(tok)
            .send()
    };
    // The ingress samples the queue gauges; wait for probe's row.
    let base = env.base.clone();
    let http = env.http.clone();
    eventually(Duration::from_secs(10), "queue figures", || {
        let (base, http) = (base.clone(), http.clone());
        async move {
            let v: Value = http
                .get(format!("{base}/v1/admin/queues"))
                .bearer_auth("tok-admin-read")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["queues"]
                .as_array()?
                .iter()
                .any(|q| q["queue"] == "probe" && q["paused"] == false)
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        error_code(
            get("/v1/admin/queues", "tok-all-canary").await.unwrap(),
            403
        )
        .await,
        "scope_forbidden"
    );
    let r = env
        .post("/v1/admin/queues/probe/pause", Some("tok-admin-read"), "")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 403).await, "scope_forbidden");

    // Pause with a reason; the read token sees it.
    let r = env
        .post(
            "/v1/admin/queues/probe/pause",
            Some("tok-admin-write"),
            r#"{"reason":"deploy"}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["paused"].as_bool(),
            v["changed"].as_bool(),
            v["by"].as_str()
        ),
        (Some(true), Some(true), Some("token:ops"))
    );
    let v: Value = get("/v1/admin/queues", "tok-admin-read")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let probe = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "probe")
        .unwrap();
    assert_eq!(probe["paused"], true, "{v}");
    let r = env
        .post(
            "/v1/admin/queues/probe/pause",
            Some("tok-admin-write"),
            "[1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    let r = env
        .post("/v1/admin/queues/nosuch/pause", Some("tok-admin-write"), "")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_queue");

    // A delayed job: retry makes it visible; cancel takes it out.
    let r = env
        .post(
            "/v1/queues/probe/jobs?delay=3600",
            Some("tok-all-canary"),
            r#"{"id":1}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let act = |what: &str| {
        env.post(
            &format!("/v1/admin/jobs/probe/{id}/{what}"),
            Some("tok-admin-write"),
            "",
        )
        .send()
    };
    let v: Value = act("retry").await.unwrap().json().await.unwrap();
    assert_eq!(v["outcome"], "visible", "{v}");
    let v: Value = act("cancel").await.unwrap().json().await.unwrap();
    assert_eq!(v["outcome"], "cancelled", "{v}");
    let v: Value = act("cancel").await.unwrap().json().await.unwrap();
    assert_eq!(v["outcome"], "final", "{v}");
    let status: Value = env
        .http
        .get(format!("{}/v1/jobs/probe/{id}", env.base))
        .bearer_auth("tok-all-canary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "cancelled", "{status}");
    let r = env
        .post(
            "/v1/admin/jobs/probe/999999/cancel",
            Some("tok-admin-write"),
            "",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_job");
    let r = env
        .post("/v1/admin/jobs/probe/x/retry", Some("tok-admin-write"), "")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_job");
    let r = env
        .post(
            "/v1/admin/jobs/probe/999999/retry",
            Some("tok-admin-write"),
            "",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "unknown_job");
    let r = env
        .post(
            "/v1/admin/queues/probe/pause",
            Some("tok-admin-write"),
            "[1]",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "bad_request");

    let r = env
        .post("/v1/admin/queues/probe/resume", Some("tok-admin-write"), "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, action FROM longshore.operator_actions ORDER BY id")
            .fetch_all(&env.t.pool)
            .await
            .unwrap();
    assert_eq!(
        actions
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect::<Vec<_>>(),
        [
            ("token:ops", "pause"),
            ("token:ops", "retry_now"),
            ("token:ops", "cancel"),
            ("token:ops", "cancel"),
            ("token:ops", "cancel"),
            ("token:ops", "resume"),
        ]
    );
}

/// An admin token reaches every queue and customer, so one that also names queues or
/// customers (and would look limited) is refused at start; a retry of an unknown job is
/// 404 like a cancel.
#[test]
fn an_admin_token_that_names_queues_or_customers_is_refused_at_start() {
    let registry = longshore_jobs::door_registry(&config(&[])).unwrap();
    let load = |extra: &str| {
        let dir = config_dir(&format!(
            r#"
[[ingress.tokens]]
name = "ops"
sha256 = "{}"
scopes = ["admin:write"]
rate_per_second = 10
burst = 10
{extra}
"#,
            hex::encode(Sha256::digest(b"tok"))
        ));
        let c = longshore_workers::Config::load_runtime_from(
            &dir.join("config"),
            Some("test"),
            common::test_env(),
        )
        .expect("loads");
        std::fs::remove_dir_all(&dir).unwrap();
        c
    };
    longshore_workers::ingress::check_config(&load(""), &registry).expect("no queues: fine");
    for extra in [r#"queues = ["probe"]"#, "customers = [1001]"] {
        let e = longshore_workers::ingress::check_config(&load(extra), &registry).unwrap_err();
        assert!(
            e.contains("ingress.tokens[0]") && e.contains("admin"),
            "{extra}: {e}"
        );
    }
}

/// Issue 19: the admin API's reads. Jobs of a queue by state, newest first, with keyset
/// pages that neither skip nor repeat; search by id and by JSON containment (bounded
/// windows that say where to go on); one job with its secrets redacted and its operator
/// actions; dead letters filtered by error and acted on by id; a bulk action over HTTP
/// in bounded shares that says where to go on; schedules, errors and the pipelines'
/// views; bad parameters are 400 with a code.
#[tokio::test]
async fn admin_reads_page_search_redact_and_bulk() {
    let env = start().await;
    let pool = env.t.pool.clone();
    sqlx::query(
        "SELECT pgmq.send('probe', jsonb_build_object('id', i, 'user', i % 3, 'api_key', 'sk-canary-' || i), 3600) FROM generate_series(1, 130) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let get = |path: String| {
        let r = env.get(&path, "tok-admin-read");
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // Keyset pages of 50: 130 delayed jobs, each exactly once, newest first.
    let mut seen = Vec::new();
    let mut before = String::new();
    loop {
        let (s, v) = get(format!(
            "/v1/admin/queues/probe/jobs?state=delayed&limit=50{before}"
        ))
        .await;
        assert_eq!(s, 200, "{v}");
        for j in v["jobs"].as_array().unwrap() {
            assert_eq!(j["args"]["api_key"], "[redacted]", "{j}");
            seen.push(j["id"].as_i64().unwrap());
        }
        match v["next_before"].as_i64() {
            Some(b) => before = format!("&before={b}"),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, no repeats");
    assert_eq!(seen.len(), 130);
    let (_, v) = get("/v1/admin/queues/probe/jobs?state=visible".into()).await;
    assert_eq!(v["jobs"].as_array().unwrap().len(), 0, "none is due: {v}");
    // By containment and by id.
    let (_, v) = get(format!(
        "/v1/admin/queues/probe/jobs?state=delayed&limit=500&contains={}",
        urlencode(r#"{"user": 1}"#)
    ))
    .await;
    let users: Vec<i64> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["args"]["user"].as_i64().unwrap())
        .collect();
    assert_eq!(users.len(), 44, "{v}");
    assert!(users.iter().all(|u| *u == 1));
    let one = seen[7];
    let (_, v) = get(format!(
        "/v1/admin/queues/probe/jobs?state=delayed&id={one}"
    ))
    .await;
    assert_eq!(v["jobs"][0]["id"], one);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);

    // One job: redacted, with what operators did.
    let r = env
        .post(
            &format!("/v1/admin/jobs/probe/{one}/retry"),
            Some("tok-admin-write"),
            "",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = get(format!("/v1/admin/jobs/probe/{one}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "visible", "{v}");
    assert_eq!(v["args"]["api_key"], "[redacted]");
    assert!(!v.to_string().contains("sk-canary"), "{v}");
    assert_eq!(v["actions"][0]["action"], "retry_now", "{v}");
    assert_eq!(v["actions"][0]["actor"], "token:ops");
    let (s, v) = get("/v1/admin/jobs/probe/999999999".into()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("unknown_job")));

    // Dead letters: filtered, then retried by id.
    sqlx::query(
        r#"INSERT INTO longshore.dead_letters (queue, msg_id, message, attempts, last_error, enqueued_at)
           SELECT 'probe', 5000 + i, jsonb_build_object('id', 5000 + i), 3,
                  CASE WHEN i % 2 = 0 THEN 'Provider TIMEOUT' ELSE 'bad input' END, now()
             FROM generate_series(1, 10) i"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let (_, v) = get("/v1/admin/dead_letters?queue=probe&error=timeout".into()).await;
    let dls = v["dead_letters"].as_array().unwrap();
    assert_eq!(dls.len(), 5, "{v}");
    let ids: Vec<i64> = dls.iter().map(|d| d["id"].as_i64().unwrap()).collect();
    let r = env
        .post(
            "/v1/admin/dead_letters/probe/retry",
            Some("tok-admin-read"),
            json!({ "ids": ids }).to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 403).await, "scope_forbidden");
    let r = env
        .post(
            "/v1/admin/dead_letters/probe/retry",
            Some("tok-admin-write"),
            json!({ "ids": ids }).to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["affected"], 5, "{v}");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM longshore.dead_letters").await,
        5
    );
    // The error filter matches the text as shown: a guess at a redacted key finds
    // nothing, the words around it do.
    sqlx::query(
        "INSERT INTO longshore.dead_letters (queue, msg_id, message, attempts, last_error, enqueued_at) VALUES ('probe', 7777, '{}', 1, 'rpc call failed: https://rpc/?api-key=Zq9SECRETkey', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (needle, found) in [("SECRET", 0), ("api-key=Zq9", 0), ("RPC CALL failed", 1)] {
        let (_, v) = get(format!(
            "/v1/admin/dead_letters?queue=probe&error={}",
            urlencode(needle)
        ))
        .await;
        let list = v["dead_letters"].as_array().unwrap();
        assert_eq!(list.len(), found, "{needle}: {v}");
        assert!(!v.to_string().contains("Zq9SECRET"), "{v}");
    }
    sqlx::query("DELETE FROM longshore.dead_letters WHERE msg_id = 7777")
        .execute(&pool)
        .await
        .unwrap();
    // A dead job's page: each failed attempt's error, credentials in them redacted.
    sqlx::query(
        r#"UPDATE longshore.dead_letters SET headers = '{"errors": [{"attempt": 1, "error": "POST /v1?api-key=k1 → 503", "at": "t1"}, {"attempt": 2, "error": "Bearer eyJhbGciOiJIUz refused", "at": "t2"}]}'
            WHERE msg_id = 5001"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let (s, v) = get("/v1/admin/jobs/probe/5001".into()).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("dead")), "{v}");
    assert_eq!(
        v["errors"][0]["error"], "POST /v1?api-key=[redacted] → 503",
        "{v}"
    );
    assert_eq!(v["errors"][1]["error"], "Bearer [redacted] refused", "{v}");
    assert!(v["headers"].get("errors").is_none(), "{v}");
    let r = env
        .post(
            "/v1/admin/dead_letters/probe/purge",
            Some("tok-admin-write"),
            r#"{"ids": []}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "bad_request");

    // Bulk over HTTP: 6,000 delayed jobs retried now in two shares.
    sqlx::query("SELECT pgmq.send('probe', jsonb_build_object('id', i), 7200) FROM generate_series(1, 6000) i")
        .execute(&pool)
        .await
        .unwrap();
    let bulk = |body: Value| {
        env.post(
            "/v1/admin/queues/probe/bulk",
            Some("tok-admin-write"),
            body.to_string(),
        )
        .send()
    };
    let v: Value = bulk(json!({"action": "retry", "state": "delayed", "older_than": "0s"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["affected"].as_u64(), v["done"].as_bool()),
        (Some(5000), Some(false)),
        "{v}"
    );
    let v: Value = bulk(
        json!({"action": "retry", "state": "delayed", "after": v["after"], "up_to": v["up_to"]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    // 6,000 + the 129 delayed from before (one was made visible above).
    assert_eq!(
        (v["affected"].as_u64(), v["done"].as_bool()),
        (Some(1129), Some(true)),
        "{v}"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM pgmq.q_probe WHERE vt > now()").await,
        0
    );
    let r = bulk(json!({"action": "purge", "state": "visible"}))
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "bulk_not_applicable");
    let r = bulk(json!({"action": "explode", "state": "visible"}))
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "bad_request");

    // Schedules, errors, views; bad parameters.
    let (s, v) = get("/v1/admin/schedules".into()).await;
    assert_eq!(s, 200);
    assert!(
        v["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"].is_string() && x["next_fire"].is_string()),
        "{v}"
    );
    let (_, v) = get("/v1/admin/errors".into()).await;
    assert!(
        v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state"] == "dead" && e["error"] == "bad input"),
        "{v}"
    );
    let (_, v) = get("/v1/admin/views".into()).await;
    let names: Vec<&str> = v["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["credits", "billing", "llm_errors"]);
    for (n, tables) in [("credits", 2), ("billing", 3), ("llm_errors", 1)] {
        let (s, v) = get(format!("/v1/admin/views/{n}?window=7d")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["sections"].as_array().unwrap().len(), tables, "{v}");
    }
    // A failed LLM attempt is among the recent errors.
    sqlx::query(
        "INSERT INTO llm_attempts (request_id, job_id, provider, model, status, http_status, latency_ms, error) VALUES (gen_random_uuid(), 1, 'grok', 'g-1', 'server_error', 503, 12, 'upstream 503')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (_, v) = get("/v1/admin/errors".into()).await;
    assert_eq!(v["pipelines"][0]["name"], "llm_errors", "{v}");
    assert_eq!(
        v["pipelines"][0]["sections"][0]["rows"][0][5], "upstream 503",
        "{v}"
    );
    for (path, status, code) in [
        ("/v1/admin/views/nosuch", 404, "unknown_view"),
        ("/v1/admin/views/credits?window=forever", 400, "bad_request"),
        ("/v1/admin/views/credits?window=400d", 400, "bad_request"),
        (
            "/v1/admin/queues/probe/jobs?contains=%7B%22api_key%22%3A%22sk-canary-1%22%7D",
            400,
            "bad_request",
        ),
        (
            "/v1/admin/queues/probe/jobs?state=asleep",
            400,
            "bad_request",
        ),
        ("/v1/admin/queues/probe/jobs?stat=done", 400, "bad_request"),
        (
            "/v1/admin/queues/probe/jobs?contains=%7Bx",
            400,
            "invalid_json",
        ),
        ("/v1/admin/queues/nosuch/jobs", 404, "unknown_queue"),
        ("/v1/admin/queues/probe/jobs?before=0", 400, "bad_request"),
        (
            "/v1/admin/queues/probe/jobs?before=-9223372036854775808",
            400,
            "bad_request",
        ),
    ] {
        let (s, v) = get(path.into()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
    }
    let r = env
        .get("/v1/admin/errors", "tok-all-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 403).await, "scope_forbidden");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
