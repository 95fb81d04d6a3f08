//! The ingress as an attacker sees it (issue 14): a valid low-privilege token, or none,
//! against the real binary. Internal kinds are not reachable over HTTP, paths stay in
//! their directories, fault knobs are off, tenants cannot read each other's jobs or
//! squat each other's keys, webhooks cannot be replayed, only the log shipper posts
//! usage, and nothing an attacker sends grows the metrics or forges a log line.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Proc, config_dir, count, db, eventually, sha};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const SECRET: &str = "hook-secret-for-security-tests";

fn sign(msg: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(msg);
    hex::encode(m.finalize().into_bytes())
}

/// Tokens: `alice` and `bob` on every public kind, `reader` with `read_all`, `shipper`
/// for logs of customer 1001 only; a signed source with timestamps.
fn config() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"

[[ingress.tokens]]
name = "alice"
sha256 = "{alice}"
queues = ["*"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "bob"
sha256 = "{bob}"
queues = ["*"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "reader"
sha256 = "{reader}"
queues = ["probe"]
scopes = ["read_all"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "shipper"
sha256 = "{shipper}"
queues = []
scopes = ["logs"]
customers = [1001]
rate_per_second = 1000
burst = 1000

[hooks.signed]
secret = "{SECRET}"
queue = "probe"
signature_header = "x-signature"
timestamp_header = "x-timestamp"
delivery_header = "x-delivery-id"
"#,
        alice = sha("tok-alice"),
        bob = sha("tok-bob"),
        reader = sha("tok-reader"),
        shipper = sha("tok-shipper"),
    )
}

struct Env {
    t: longshore_workers::testing::TestDb,
    ingress: Proc,
    base: String,
    http: reqwest::Client,
    _dir: std::path::PathBuf,
}

async fn start(extra_env: &[(&str, &str)]) -> Env {
    let t = db().await;
    let dir = config_dir(&config());
    let mut env = vec![("LONGSHORE_ENV", "test")];
    env.extend_from_slice(extra_env);
    let ingress = Proc::spawn_in(Some(&dir), &t.url, &["ingress"], &env);
    let base = format!("http://{}", ingress.ingress_addr().await);
    Env {
        t,
        ingress,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Env {
    async fn post(&self, path: &str, token: &str, body: &str) -> (u16, Value) {
        self.post_with(path, token, body, None).await
    }

    async fn post_with(
        &self,
        path: &str,
        token: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .body(body.to_string());
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// High 1: internal kinds (maintenance, the file-touching kinds, pipeline steps) are
/// not reachable over HTTP, even with `"*"`: the same 404 as a queue that does not
/// exist, and nothing enqueued. Before, `regenerate_vault {path}` overwrote a file of
/// the caller's choosing and `maintenance` wiped every result.
#[tokio::test]
async fn internal_kinds_are_not_reachable_over_http() {
    let env = start(&[]).await;
    let victim = std::env::temp_dir().join(format!("ls-victim-{}", std::process::id()));
    std::fs::write(&victim, "precious").unwrap();
    let attempts = [
        (
            "regenerate_vault",
            json!({"path": victim.display().to_string()}),
        ),
        ("ingest_logs", json!({"path": "/etc/passwd"})),
        ("scan_log_spool", json!({"dir": "/root"})),
        (
            "maintenance",
            json!({"task": "prune_archives", "older_than": "1s"}),
        ),
        (
            "compute_signals",
            json!({"symbol": "BTC/USDT", "timeframe": "1h", "at": "2026-01-01T00:00:00Z"}),
        ),
    ];
    for (kind, args) in &attempts {
        let (st, v) = env
            .post(
                &format!("/v1/queues/{kind}/jobs"),
                "tok-alice",
                &args.to_string(),
            )
            .await;
        assert_eq!((st, code(&v)), (404, "unknown_queue"), "{kind}: {v}");
        let (st, v) = env
            .post(
                &format!("/v1/queues/{kind}/jobs:batch"),
                "tok-alice",
                &format!("[{args}]"),
            )
            .await;
        assert_eq!((st, code(&v)), (404, "unknown_queue"), "{kind} batch: {v}");
    }
    // The same answer as a queue that does not exist, so internal ones cannot be told.
    let (st, v) = env.post("/v1/queues/nosuch/jobs", "tok-alice", "{}").await;
    assert_eq!((st, code(&v)), (404, "unknown_queue"));
    let (st, _) = env.get("/v1/jobs/maintenance/1", "tok-alice").await;
    assert_eq!(st, 404);
    for (kind, _) in &attempts {
        let table = format!("SELECT count(*) FROM pgmq.q_{kind}");
        assert_eq!(
            count(&env.t.pool, Box::leak(table.into_boxed_str())).await,
            0,
            "{kind}"
        );
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    std::fs::remove_file(&victim).unwrap();
    // Public kinds still work.
    let (st, _) = env
        .post("/v1/queues/probe/jobs", "tok-alice", r#"{"id": 1}"#)
        .await;
    assert_eq!(st, 202);
}

/// High 1: a token that names an internal kind, or a hook that names no kind, is a
/// configuration error at start (exit 2, naming the key), not a silent grant.
#[tokio::test]
async fn configuration_naming_internal_kinds_is_refused_at_start() {
    let t = db().await;
    for (toml, want) in [
        (
            format!(
                "[[ingress.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nqueues = [\"maintenance\"]\nrate_per_second = 1\nburst = 1\n",
                sha("x")
            ),
            "ingress.tokens[0].queues: \"maintenance\" is an internal kind",
        ),
        (
            format!(
                "[hooks.h]\nsecret = \"{SECRET}\"\nqueue = \"nosuch_kind\"\nsignature_header = \"x-s\"\ntimestamp_header = \"x-t\"\n"
            ),
            "hooks.h.queue: no job kind \"nosuch_kind\"",
        ),
        (
            format!(
                "[hooks.h]\nsecret = \"{SECRET}\"\nqueue = \"probe\"\nsignature_header = \"x-s\"\n"
            ),
            "hooks.h.timestamp_header",
        ),
        (
            format!(
                "[[ingress.tokens]]\nname = \"a\"\nsha256 = \"{h}\"\nqueues = [\"probe\"]\nrate_per_second = 1\nburst = 1\n\n[[ingress.tokens]]\nname = \"b\"\nsha256 = \"{h}\"\nqueues = [\"probe\"]\nrate_per_second = 1\nburst = 1\nrevoked = true\n",
                h = sha("same")
            ),
            "the same token is configured twice",
        ),
    ] {
        let dir = config_dir(&format!("[ingress]\nlisten = \"127.0.0.1:0\"\n{toml}"));
        let mut p = Proc::spawn_in(
            Some(&dir),
            &t.url,
            &["ingress"],
            &[("LONGSHORE_ENV", "test")],
        );
        let code = p.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, Some(2), "{}", p.logs());
        assert!(p.logs().contains(want), "want {want:?}\n{}", p.logs());
    }
}

/// High 1: a path argument is confined to its kind's roots wherever the job came from:
/// plain SQL bypasses the ingress, not the worker's check. A symlink inside the root
/// that points out is refused too, and the log jobs cannot reach the vault's directory
/// (nor the vault job a log's): each kind has its own list.
#[tokio::test]
async fn paths_are_confined_to_the_configured_directories() {
    let t = db().await;
    let base = std::env::temp_dir().join(format!("ls-roots-it-{}", std::process::id()));
    let root = base.join("allowed");
    let logs = base.join("logs");
    let outside = base.join("outside");
    for d in [&root, &logs, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("target.csv"), "precious").unwrap();
    std::fs::write(root.join("ma_vault.csv"), "the vault").unwrap();
    std::fs::write(logs.join("today.log"), "a log").unwrap();
    let link = root.join("vault.csv");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(outside.join("target.csv"), &link).unwrap();
    for path in [
        outside.join("target.csv").display().to_string(),
        link.display().to_string(),
        format!("{}/../outside/target.csv", root.display()),
        logs.join("today.log").display().to_string(),
    ] {
        sqlx::query("SELECT pgmq.send('regenerate_vault', jsonb_build_object('path', $1::text))")
            .bind(&path)
            .execute(&t.pool)
            .await
            .unwrap();
    }
    // The log jobs, pointed at the vault's directory: read it, move it.
    sqlx::query("SELECT pgmq.send('ingest_logs', jsonb_build_object('path', $1::text))")
        .bind(root.join("ma_vault.csv").display().to_string())
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pgmq.send('scan_log_spool', jsonb_build_object('dir', $1::text, 'done_dir', $2::text))",
    )
    .bind(logs.display().to_string())
    .bind(root.display().to_string())
    .execute(&t.pool)
    .await
    .unwrap();
    let vault_roots = format!("[{:?}]", root.display().to_string());
    let log_roots = format!("[{:?}]", logs.display().to_string());
    let _w = Proc::spawn(
        &t.url,
        &[
            "worker",
            "--queues",
            "regenerate_vault,ingest_logs,scan_log_spool",
        ],
        &[
            ("LONGSHORE__BILLING__VAULT_ROOTS", vault_roots.as_str()),
            ("LONGSHORE__BILLING__LOG_ROOTS", log_roots.as_str()),
            (
                "LONGSHORE__BILLING__VAULT_KEY",
                "ZGV2LW9ubHktdmF1bHQta2V5LW5vdC1hLXNlY3JldCE=",
            ),
        ],
    );
    let pool = t.pool.clone();
    let errors: Vec<(String, String)> = eventually(Duration::from_secs(20), "six refusals", || {
        let pool = pool.clone();
        async move {
            let e: Vec<(String, String)> = sqlx::query_as(
                "SELECT queue, last_error FROM longshore.dead_letters ORDER BY queue, msg_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            (e.len() == 6).then_some(e)
        }
    })
    .await;
    let of = |q: &str| -> Vec<&str> {
        errors
            .iter()
            .filter(|(queue, _)| queue == q)
            .map(|(_, e)| e.as_str())
            .collect()
    };
    let (vault, ingest, scan) = (
        of("regenerate_vault"),
        of("ingest_logs"),
        of("scan_log_spool"),
    );
    assert!(
        vault[0].contains("outside billing.vault_roots"),
        "{}",
        vault[0]
    );
    assert!(
        vault[1].contains("outside billing.vault_roots"),
        "symlink out: {}",
        vault[1]
    );
    assert!(vault[2].contains("`..`"), "{}", vault[2]);
    assert!(
        vault[3].contains("outside billing.vault_roots"),
        "a log's dir: {}",
        vault[3]
    );
    assert!(
        ingest[0].contains("outside billing.log_roots"),
        "the vault read: {}",
        ingest[0]
    );
    assert!(
        scan[0].contains("outside billing.log_roots"),
        "the vault's dir as done_dir: {}",
        scan[0]
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("target.csv")).unwrap(),
        "precious"
    );
    assert_eq!(
        std::fs::read_to_string(logs.join("today.log")).unwrap(),
        "a log"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("ma_vault.csv")).unwrap(),
        "the vault"
    );
    // And the CLI's door says so at once.
    let (code, _, err) = common::run_cli(
        &t.url,
        &[
            "enqueue",
            "regenerate_vault",
            &json!({"path": "/etc/haproxy/x.csv"}).to_string(),
        ],
        &[("LONGSHORE__BILLING__VAULT_ROOTS", vault_roots.as_str())],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("outside billing.vault_roots"), "{err}");
    // The old single list is refused with the way forward, not silently ignored.
    let (code, _, err) = common::run_cli(
        &t.url,
        &["enqueue", "probe", r#"{"id":1}"#],
        &[("LONGSHORE__BILLING__FILE_ROOTS", vault_roots.as_str())],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("billing.log_roots") && err.contains("billing.vault_roots"),
        "{err}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// High 2: the probe's fault knobs are off unless a test or dev setting turns them on:
/// refused at the door (422) and dead-lettered at once if sent by SQL, so an
/// operator's probe can neither hold transactions open nor kill a worker.
#[tokio::test]
async fn probe_fault_knobs_are_off_by_default() {
    // The binary's own default, not an explicit "false".
    let off = [("LONGSHORE__PROBE__FAULT_KNOBS", common::UNSET)];
    let env = start(&off).await;
    for body in [
        r#"{"id": 1, "hold_ms": 600000, "effect": true}"#,
        r#"{"id": 2, "panic": true}"#,
        r#"{"id": 3, "abort": true}"#,
        r#"{"id": 4, "sleep_ms": 600000}"#,
    ] {
        let (st, v) = env.post("/v1/queues/probe/jobs", "tok-alice", body).await;
        assert_eq!((st, code(&v)), (422, "invalid_args"), "{body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("fault knob"),
            "{v}"
        );
    }
    let (st, _) = env
        .post(
            "/v1/queues/probe/jobs",
            "tok-alice",
            r#"{"id": 5, "sleep_ms": 10}"#,
        )
        .await;
    assert_eq!(st, 202, "a short sleep is fine");
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 6, \"abort\": true}')")
        .execute(&env.t.pool)
        .await
        .unwrap();
    let mut w = Proc::spawn(&env.t.url, &["worker", "--queues", "probe"], &off);
    let pool = env.t.pool.clone();
    let err: String = eventually(Duration::from_secs(20), "the abort refused", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar(
                "SELECT last_error FROM longshore.dead_letters WHERE message->>'id' = '6'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    assert!(err.contains("fault knob"), "{err}");
    assert!(w.child.try_wait().unwrap().is_none(), "the worker is alive");
}

/// Medium 5 and 6: a job is answered to the token that enqueued it (or one with
/// `read_all`), and idempotency keys are per token: bob can neither read alice's job
/// nor find it (or squat it) with her key.
#[tokio::test]
async fn tenants_cannot_read_each_others_jobs_or_share_keys() {
    let env = start(&[]).await;
    let (st, a) = env
        .post_with(
            "/v1/queues/probe/jobs",
            "tok-alice",
            r#"{"id": 1}"#,
            Some("order-1"),
        )
        .await;
    assert_eq!(st, 202);
    let id = a["id"].as_i64().unwrap();
    let (st, v) = env.get(&format!("/v1/jobs/probe/{id}"), "tok-alice").await;
    assert_eq!((st, v["state"].as_str()), (200, Some("queued")));
    let (st, v) = env.get(&format!("/v1/jobs/probe/{id}"), "tok-bob").await;
    assert_eq!(
        (st, code(&v)),
        (404, "unknown_job"),
        "bob reads alice's job: {v}"
    );
    let (st, _) = env.get(&format!("/v1/jobs/probe/{id}"), "tok-reader").await;
    assert_eq!(st, 200, "read_all reads it");
    // Bob's `order-1` is his own key: a new job, not alice's id, not a 409.
    let (st, b) = env
        .post_with(
            "/v1/queues/probe/jobs",
            "tok-bob",
            r#"{"id": 99}"#,
            Some("order-1"),
        )
        .await;
    assert_eq!((st, b["duplicate"].as_bool()), (202, Some(false)), "{b}");
    assert_ne!(b["id"], a["id"]);
    // Alice's repeat is a repeat.
    let (_, again) = env
        .post_with(
            "/v1/queues/probe/jobs",
            "tok-alice",
            r#"{"id": 1}"#,
            Some("order-1"),
        )
        .await;
    assert_eq!(
        (again["id"].clone(), again["duplicate"].as_bool()),
        (a["id"].clone(), Some(true))
    );
    // A client key shaped like the webhook's dedupe cannot swallow a signed delivery.
    let body = r#"{"id": 7}"#;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = format!("{ts}.{body}");
    let digest = hex::encode(Sha256::digest(signed.as_bytes()));
    // (The namespace separator itself, U+001F, cannot be sent: no header carries it.)
    let (st, _) = env
        .post_with(
            "/v1/queues/probe/jobs",
            "tok-bob",
            body,
            Some(&format!("hook:signed:{digest}")),
        )
        .await;
    assert_eq!(st, 202);
    let r = env
        .http
        .post(format!("{}/v1/hooks/signed", env.base))
        .header("x-signature", sign(signed.as_bytes()))
        .header("x-timestamp", ts.to_string())
        .header("x-delivery-id", "d-1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["duplicate"], false,
        "the genuine delivery is not swallowed: {v}"
    );
    // A completion record left at alice's id by an earlier life of the queue (dropped
    // and made again, ids from 1) belongs to bob: when alice's job completes, the
    // record is hers, not still his.
    sqlx::query(
        "INSERT INTO longshore.completions (queue, msg_id, attempts, principal) VALUES ('probe', $1, 1, 'token:bob')",
    )
    .bind(id)
    .execute(&env.t.pool)
    .await
    .unwrap();
    let _w = Proc::spawn(
        &env.t.url,
        &["worker", "--queues", "probe"],
        &[("LONGSHORE__QUEUES__PROBE__ON_DONE", "delete")],
    );
    let (st, v) = env
        .get(&format!("/v1/jobs/probe/{id}?wait=20"), "tok-alice")
        .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("done")), "{v}");
    let (st, _) = env.get(&format!("/v1/jobs/probe/{id}"), "tok-bob").await;
    assert_eq!(st, 404, "bob reads alice's completed job");
}

/// Medium 7: a captured signed delivery replayed with a fresh delivery id is the same
/// delivery: one job.
#[tokio::test]
async fn a_replayed_webhook_with_a_fresh_delivery_id_is_one_job() {
    let env = start(&[]).await;
    let body = r#"{"id": 7}"#;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = sign(format!("{ts}.{body}").as_bytes());
    let mut ids = Vec::new();
    for delivery in ["d-1", "d-2-forged", "d-3-forged"] {
        let r = env
            .http
            .post(format!("{}/v1/hooks/signed", env.base))
            .header("x-signature", &sig)
            .header("x-timestamp", ts.to_string())
            .header("x-delivery-id", delivery)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        ids.push(r.json::<Value>().await.unwrap()["id"].clone());
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(
        count(&env.t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        1
    );
}

/// Medium 8: only the log shipper's token (scope `logs`) posts usage, and only for its
/// customers: a `"*"` token is refused, lines of another customer are not billed.
#[tokio::test]
async fn only_the_log_shipper_posts_usage_and_only_for_its_customers() {
    let env = start(&[]).await;
    let line = |cust: i32| {
        format!(
            "Jan 27 21:52:00 lb1 haproxy[3098]: 10.0.0.7:61818 [27/Jan/2026:21:52:00.000] \
             fe_api~ be_seal/s1 0/0/1/1/2 200 517 - - ---- 1/1/0/0/0 0/0 {{{cust}|seal}} {{}} \"POST /v1/seal HTTP/1.1\""
        )
    };
    let lines = format!("{}\n{}\n", line(1001), line(1002));
    let (st, v) = env.post("/v1/logs", "tok-alice", &lines).await;
    assert_eq!((st, code(&v)), (403, "scope_forbidden"), "{v}");
    let (st, v) = env.post("/v1/logs", "tok-shipper", &lines).await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_i64().unwrap();
    let _w = Proc::spawn(&env.t.url, &["worker", "--queues", "ingest_logs"], &[]);
    let (st, s) = eventually(Duration::from_secs(20), "the ingest", || async {
        let (st, s) = env
            .get(&format!("/v1/jobs/ingest_logs/{id}?wait=5"), "tok-shipper")
            .await;
        (s["state"] == "done").then_some((st, s))
    })
    .await;
    assert_eq!(st, 200);
    let r = &s["result"];
    assert_eq!(
        (r["inserted"].as_u64(), r["malformed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert!(
        r["errors"]
            .to_string()
            .contains("customer 1002 is not one this log source may report"),
        "{s}"
    );
    assert_eq!(
        count(
            &env.t.pool,
            "SELECT count(*) FROM haproxy_logs WHERE customer_id = 1002"
        )
        .await,
        0
    );
}

/// High 4 and Low: made-up methods do not mint metric series or log fields; the
/// request log line names the caller; an unknown queue is 401 before auth says more.
#[tokio::test]
async fn metrics_labels_stay_closed_and_requests_are_attributed() {
    let env = start(&[]).await;
    for i in 0..3 {
        let m =
            reqwest::Method::from_bytes(format!("X{}{i}", "Y".repeat(2000)).as_bytes()).unwrap();
        let _ = env
            .http
            .request(m, format!("{}/v1/queues/probe/jobs", env.base))
            .send()
            .await
            .unwrap();
    }
    let metrics = env
        .http
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("YYYY"), "a made-up method became a label");
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    assert!(!env.ingress.logs().contains("YYYYYYYY"), "nor a log field");
    // No token: 401 whatever the queue, so queue names cannot be probed.
    for q in ["probe", "maintenance", "nosuch"] {
        let r = env
            .http
            .post(format!("{}/v1/queues/{q}/jobs", env.base))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{q}");
    }
    let (st, _) = env
        .post("/v1/queues/probe/jobs", "tok-bob", r#"{"id": 1}"#)
        .await;
    assert_eq!(st, 202);
    let logs = eventually(Duration::from_secs(5), "the request line", || async {
        let l = env.ingress.logs();
        l.lines().any(|l| l.contains("caller=bob")).then_some(l)
    })
    .await;
    assert!(
        !logs.contains("tok-bob"),
        "the token itself is never logged"
    );
}

/// Medium 9: newlines and escape bytes that reach log lines through error messages are
/// escaped, so a job's args cannot forge a log line.
#[tokio::test]
async fn log_lines_cannot_be_forged_through_job_args() {
    let t = db().await;
    let forged = "2026-01-01T00:00:00.000000Z  INFO longshore: FORGED payout approved";
    let dir = std::env::temp_dir().join(format!("nope\n{forged}\n\u{1b}[2J"));
    sqlx::query("SELECT pgmq.send('scan_log_spool', jsonb_build_object('dir', $1::text))")
        .bind(dir.display().to_string())
        .execute(&t.pool)
        .await
        .unwrap();
    let w = Proc::spawn(&t.url, &["worker", "--queues", "scan_log_spool"], &[]);
    eventually(
        Duration::from_secs(20),
        "the bad job dead-lettered",
        || async {
            (count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await == 1).then_some(())
        },
    )
    .await;
    let logs = eventually(Duration::from_secs(5), "its log line", || async {
        let l = w.logs();
        l.contains("FORGED").then_some(l)
    })
    .await;
    for l in logs.lines() {
        assert!(
            !l.starts_with("2026-01-01T00:00:00"),
            "a forged line: {l:?}"
        );
        assert!(
            !l.contains('\u{1b}'),
            "an escape byte reached the log: {l:?}"
        );
    }
}

/// High 3: slowloris and descriptor exhaustion, unauthenticated. With a limit of 256
/// descriptors, 300 sockets that say nothing do not lock out `/healthz`, `/readyz` or
/// an enqueue (the oldest idle ones are evicted to make room), and a silent socket is
/// closed after the header deadline. Before, silent sockets stayed open past 50 s and
/// 300 of them locked every route out.
#[tokio::test]
async fn idle_sockets_cannot_lock_the_ingress_out() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let t = db().await;
    let dir = config_dir(&format!(
        "{}\n",
        config().replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nheader_timeout = \"2s\""
        )
    ));
    let log = std::env::temp_dir().join(format!("ls-slowloris-{}.log", std::process::id()));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec {} ingress",
            env!("CARGO_BIN_EXE_longshore")
        ))
        .current_dir(&dir)
        .env("DATABASE_URL", &t.url)
        .env("LONGSHORE_ENV", "test")
        .env_remove("RUST_LOG")
        .envs(common::test_env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = eventually(Duration::from_secs(15), "listening", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.split("listening on http://")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
    })
    .await;
    // One silent socket: closed by the server after the header deadline.
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(usize::MAX);
    assert_eq!(n, 0, "closed (EOF), not timed out on our side");
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "closed after {:?}",
        t0.elapsed()
    );
    // 300 silent sockets, more than the descriptors the process has.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() >= 250, "opened {}", idle.len());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let base = format!("http://{addr}");
    still_serves(&http, &base, "tok-alice").await;
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!logs.contains("panicked"), "{logs}");
}

/// The health checks answer 200 and `token` can enqueue (each within the client's
/// timeout): the ingress is not locked out.
async fn still_serves(http: &reqwest::Client, base: &str, token: &str) {
    for path in ["/healthz", "/readyz"] {
        let r = http.get(format!("{base}{path}")).send().await;
        assert_eq!(
            r.map(|r| r.status().as_u16()).ok(),
            Some(200),
            "{path} answered"
        );
    }
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth(token)
        .body(r#"{"id": 1}"#)
        .send()
        .await;
    assert_eq!(
        r.map(|r| r.status().as_u16()).ok(),
        Some(202),
        "enqueue answered"
    );
}

/// Low: requests no token vouches for (failed authentications, webhooks, /readyz) have
/// a per-address budget; past it 429, while a valid token is unaffected.
#[tokio::test]
async fn unauthenticated_floods_get_429_and_valid_tokens_still_work() {
    let env = start(&[]).await;
    let mut codes = Vec::new();
    for i in 0..80 {
        let (st, _) = env
            .post(
                "/v1/queues/probe/jobs",
                &format!("guess-{i}"),
                r#"{"id": 1}"#,
            )
            .await;
        codes.push(st);
    }
    assert!(codes.contains(&401), "{codes:?}");
    assert!(codes.contains(&429), "guessing is rate-limited: {codes:?}");
    let mut ready = Vec::new();
    for _ in 0..80 {
        let r = env
            .http
            .get(format!("{}/readyz", env.base))
            .send()
            .await
            .unwrap();
        ready.push(r.status().as_u16());
    }
    assert!(ready.contains(&429), "{ready:?}");
    let (st, _) = env
        .post("/v1/queues/probe/jobs", "tok-alice", r#"{"id": 2}"#)
        .await;
    assert_eq!(st, 202, "a valid token is not in the anonymous budget");
}

/// Review of High 3: busy connections cannot be evicted, so one host with a valid
/// token holding long polls and bodies sent a byte at a time could take every slot.
/// One address holds at most its share (64) and long polls are capped
/// (`max_waiters`): the health checks and a fresh enqueue from elsewhere still answer.
#[tokio::test]
async fn busy_connections_from_one_host_cannot_lock_the_ingress_out() {
    use tokio::io::AsyncWriteExt;
    let t = db().await;
    let dir = config_dir(&config().replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nmax_connections = 150\nmax_waiters = 16\nread_timeout = \"30s\"",
    ));
    let ingress = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["ingress"],
        &[("LONGSHORE_ENV", "test")],
    );
    let addr: std::net::SocketAddr = ingress.ingress_addr().await.parse().unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs?delay=3600"))
        .bearer_auth("tok-alice")
        .body(r#"{"id": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].clone();
    // From 127.0.0.2: 100 long polls and 100 bodies that never finish.
    let mut held = Vec::new();
    for i in 0..200 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let Ok(mut s) = sock.connect(addr).await else {
            continue;
        };
        let req = if i % 2 == 0 {
            format!(
                "GET /v1/jobs/probe/{id}?wait=30 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n\r\n"
            )
        } else {
            "POST /v1/queues/probe/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\nContent-Length: 100\r\n\r\n{".to_string()
        };
        let _ = s.write_all(req.as_bytes()).await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serves(&http, &base, "tok-bob").await;
    drop(held);
}

/// Review of the least-privilege item: the ingress checks and enqueues but never runs
/// a handler, so it starts without the secrets only workers use (a market source's
/// API key, the chain's RPC URL and delegate keypair); a worker given the same
/// settings refuses to start, naming the key.
#[tokio::test]
async fn the_ingress_needs_none_of_the_workers_secrets() {
    let t = db().await;
    let dir = config_dir(&config());
    let env = [
        ("LONGSHORE_ENV", "test"),
        ("LONGSHORE__MARKET__SOURCE", "cryptometer"),
        ("LONGSHORE__BILLING__CHAIN__BACKEND", "rpc"),
    ];
    let ingress = Proc::spawn_in(Some(&dir), &t.url, &["ingress"], &env);
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok-alice")
        .body(r#"{"id": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The worker, with the same pipeline settings (and the repository's config).
    let (code, _, err) = common::run_cli(&t.url, &["worker"], &env[1..]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("market.cryptometer") || err.contains("billing.chain"),
        "{err}"
    );
}
