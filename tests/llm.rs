//! The `llm_call` job against a real PostgreSQL and a local fake OpenAI-compatible
//! server (`POST /{provider}/v1/chat/completions`, real chat-completions JSON and SSE
//! with usage), scripted per provider: success, 429, 500, a timeout after accepting, a
//! stalled stream, malformed JSON, a 400 that is the request's fault. Rows 21–22 of
//! RELIABILITY.md; a kill -9 between the answer and the charge; the ingress's `?wait=`.

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{Proc, config, config_dir, count, db, eventually};
use futures::StreamExt;
use longshore_jobs::chat::config::{Chat, Hint};
use longshore_jobs::chat::llm_call::{LlmCall, Messages};
use longshore_jobs::clients::llm::{ChatRequest, Failure, Message, Role};
use longshore_workers::testing::TestDb;
use longshore_workers::testing::{ever_enqueued, job_result};
use longshore_workers::{EnqueueOptions, Worker, enqueue, enqueue_many};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The key every fake provider expects; it must never appear in a log or an error.
const KEY: &str = "sk-canary-llm-5e1f9a";

#[derive(Clone)]
enum Reply {
    /// An answer: JSON, or SSE when the request streams. `None` usage: none reported.
    Answer(&'static str, Option<(u32, u32)>),
    /// An error status with OpenAI's error body.
    Error(u16, &'static str),
    /// An error status with a plain-text body (a proxy's 502 page).
    Text(u16, &'static str),
    /// Accepts the request and never answers.
    Hang,
    /// Streams this many content chunks, then nothing more (the connection stays open).
    Stall(usize),
    /// 200 with a body that is not JSON (or, streaming, an event that is not JSON).
    Malformed,
    /// Waits for the notification, then answers.
    Gated(Arc<Notify>, &'static str, (u32, u32)),
}

#[derive(Default)]
struct FakeState {
    script: HashMap<String, VecDeque<Reply>>,
    /// (provider, request body, authorization header)
    seen: Vec<(String, Value, String)>,
}

struct FakeLlm {
    addr: SocketAddr,
    st: Arc<Mutex<FakeState>>,
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_763_800_000,
           "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn sse(events: Vec<Value>, done: bool) -> Vec<Result<Bytes, Infallible>> {
    let mut out: Vec<Result<Bytes, Infallible>> = events
        .into_iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    if done {
        out.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    out
}

fn event_stream(parts: Vec<Result<Bytes, Infallible>>, then_hang: bool) -> Response {
    let s = futures::stream::iter(parts);
    let body = if then_hang {
        Body::from_stream(s.chain(futures::stream::pending()))
    } else {
        Body::from_stream(s)
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

fn answer(model: &str, content: &str, usage: Option<(u32, u32)>, stream: bool) -> Response {
    let usage_json = usage
        .map(|(i, o)| json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": u64::from(i) + u64::from(o)}));
    if !stream {
        let mut v = json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1_763_800_000,
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"}]});
        if let Some(u) = usage_json {
            v["usage"] = u;
        }
        return axum::Json(v).into_response();
    }
    let mut events = vec![chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    for w in content.split_inclusive(' ') {
        events.push(chunk(model, json!({"content": w}), None));
    }
    events.push(chunk(model, json!({}), Some("stop")));
    if let Some(u) = usage_json {
        events.push(
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
            "created": 1_763_800_000, "model": model, "choices": [], "usage": u}),
        );
    }
    event_stream(sse(events, true), false)
}

async fn fake_handler(
    State(st): State<Arc<Mutex<FakeState>>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let reply = {
        let mut s = st.lock().unwrap();
        s.seen.push((provider.clone(), body.clone(), auth.clone()));
        s.script.get_mut(&provider).and_then(VecDeque::pop_front)
    };
    if auth != format!("Bearer {KEY}") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or("?").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    match reply.unwrap_or(Reply::Answer("the fake's answer", Some((20, 5)))) {
        Reply::Answer(c, u) => answer(&model, c, u, stream),
        Reply::Error(status, message) => (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(json!({"error": {"message": message, "type": "error", "param": null, "code": null}})),
        )
            .into_response(),
        Reply::Text(status, text) => (StatusCode::from_u16(status).unwrap(), text).into_response(),
        Reply::Hang => {
            futures::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Stall(n) => {
            let mut events = vec![chunk(&model, json!({"role": "assistant", "content": ""}), None)];
            events.extend((0..n).map(|i| chunk(&model, json!({"content": format!("w{i} ")}), None)));
            event_stream(sse(events, false), true)
        }
        Reply::Malformed if stream => event_stream(
            vec![Ok(Bytes::from_static(b"data: {\"id\": \"x\", \"choices\": [tru\n\n"))],
            false,
        ),
        Reply::Malformed => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from("{\"id\": \"chatcmpl-fake\", \"choices\": [{\"index\": 0, \"mess"))
            .unwrap(),
        Reply::Gated(n, c, u) => {
            n.notified().await;
            answer(&model, c, Some(u), stream)
        }
    }
}

impl FakeLlm {
    async fn start() -> FakeLlm {
        let st = Arc::new(Mutex::new(FakeState::default()));
        let app = axum::Router::new()
            .route(
                "/{provider}/v1/chat/completions",
                axum::routing::post(fake_handler),
            )
            .with_state(st.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        FakeLlm { addr, st }
    }
    fn script(&self, provider: &str, replies: &[Reply]) {
        self.st
            .lock()
            .unwrap()
            .script
            .entry(provider.into())
            .or_default()
            .extend(replies.iter().cloned());
    }
    /// The requests one provider received.
    fn seen(&self, provider: &str) -> Vec<Value> {
        let s = self.st.lock().unwrap();
        s.seen
            .iter()
            .filter(|(p, _, _)| p == provider)
            .map(|(_, b, _)| b.clone())
            .collect()
    }
    fn calls(&self) -> usize {
        self.st.lock().unwrap().seen.len()
    }
    /// `LONGSHORE__CHAT__…` settings pointing all three providers here, with short
    /// clocks; `stream = false` for `json_providers`.
    fn env(&self, json_providers: &[&str]) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for p in ["grok", "gpt", "claude"] {
            let k = |s: &str| format!("LONGSHORE__CHAT__PROVIDERS__{}__{s}", p.to_uppercase());
            env.push((k("BASE_URL"), format!("http://{}/{p}/v1", self.addr)));
            env.push((k("API_KEY"), KEY.into()));
            env.push((k("MODEL"), format!("{p}-test-model")));
            env.push((k("STREAM"), (!json_providers.contains(&p)).to_string()));
            env.push((k("FIRST_TOKEN_TIMEOUT"), "700ms".into()));
            env.push((k("TOKEN_TIMEOUT"), "400ms".into()));
            env.push((k("TIMEOUT"), "10s".into()));
        }
        env
    }
}

fn vars(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn chat(env: &[(String, String)]) -> Chat {
    Chat::from_config(&config(&vars(env))).unwrap()
}

fn msgs(text: &str) -> Vec<Message> {
    vec![
        Message {
            role: Role::System,
            content: "You are terse.".into(),
        },
        Message {
            role: Role::User,
            content: text.into(),
        },
    ]
}

fn call(user: Uuid, text: &str, hint: Option<Hint>) -> LlmCall {
    LlmCall {
        request_id: Uuid::new_v4(),
        user_id: user,
        messages: Messages::try_from(msgs(text)).unwrap(),
        hint,
        max_tokens: None,
    }
}

/// A worker in this process with the fake as every provider.
struct Fleet {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), longshore_workers::WorkerError>>,
}

impl Fleet {
    fn start(pool: &PgPool, env: &[(String, String)]) -> Fleet {
        let cfg = config(&vars(env));
        let registry = longshore_jobs::registry(&cfg).unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(Worker::new(pool.clone(), registry, cfg).run(stop.clone()));
        Fleet { stop, handle }
    }
    async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// A database, the fake, a worker pointed at it (`json_providers` without streaming) and
/// a new user.
async fn setup(json_providers: &[&str]) -> (TestDb, FakeLlm, Fleet, Uuid) {
    let t = db().await;
    let fake = FakeLlm::start().await;
    let fleet = Fleet::start(&t.pool, &fake.env(json_providers));
    (t, fake, fleet, Uuid::new_v4())
}

/// Scripts grok to hold its answer until the returned gate is notified, and enqueues a
/// call for `user`: (gate, call, job id).
async fn enqueue_gated(
    pool: &PgPool,
    fake: &FakeLlm,
    user: Uuid,
    answer: &'static str,
    usage: (u32, u32),
) -> (Arc<Notify>, LlmCall, i64) {
    let gate = Arc::new(Notify::new());
    fake.script("grok", &[Reply::Gated(gate.clone(), answer, usage)]);
    let c = call(user, answer, None);
    let id = enqueue(pool, &c, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    (gate, c, id)
}

/// Enqueues `a` and waits for its result.
async fn run(pool: &PgPool, a: &LlmCall) -> Value {
    let id = enqueue(pool, a, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    result(pool, id).await
}

async fn result(pool: &PgPool, id: i64) -> Value {
    eventually(Duration::from_secs(30), "the llm_call result", || async {
        job_result(pool, "llm_call", id).await
    })
    .await
}

/// (provider, status, http_status) of a request's attempts, in order.
async fn attempts(pool: &PgPool, request: Uuid) -> Vec<(String, String, Option<i32>)> {
    sqlx::query_as(
        "SELECT provider, status, http_status FROM llm_attempts WHERE request_id = $1 ORDER BY id",
    )
    .bind(request)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn balance(pool: &PgPool, user: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(delta), 0)::bigint FROM credits_ledger WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// An account of `tier` holding exactly `credits` (no signup bonus).
async fn fund(pool: &PgPool, user: Uuid, tier: &str, credits: i32) {
    sqlx::query("INSERT INTO credit_accounts (user_id, tier) VALUES ($1, $2)")
        .bind(user)
        .bind(tier)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO credits_ledger (user_id, delta, reason) VALUES ($1, $2, 'grant')")
        .bind(user)
        .bind(credits)
        .execute(pool)
        .await
        .unwrap();
}

async fn charges(pool: &PgPool, request: Uuid) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT -delta FROM credits_ledger WHERE request_id = $1 AND reason = 'charge'",
    )
    .bind(request)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn a(outcome: (&str, &str, Option<i32>)) -> (String, String, Option<i32>) {
    (outcome.0.into(), outcome.1.into(), outcome.2)
}

// ---- The provider client alone -------------------------------------------------------

#[tokio::test]
async fn the_client_speaks_json_and_sse_and_reports_usage() {
    let fake = FakeLlm::start().await;
    let c = chat(&fake.env(&["gpt"]));
    let m = msgs("What is a pgmq archive?");
    let req = ChatRequest {
        messages: &m,
        max_tokens: 321,
    };
    // Streaming (grok), with usage in the last chunk.
    fake.script(
        "grok",
        &[Reply::Answer("It keeps done messages.", Some((31, 6)))],
    );
    let r = c.providers["grok"].complete(&req).await.unwrap();
    assert_eq!(r.content, "It keeps done messages.");
    assert_eq!((r.input_tokens, r.output_tokens), (31, 6));
    assert!(!r.usage_estimated);
    assert_eq!(
        (r.model.as_str(), r.finish_reason.as_deref()),
        ("grok-test-model", Some("stop"))
    );
    let sent = &fake.seen("grok")[0];
    assert_eq!(sent["model"], "grok-test-model");
    assert_eq!(sent["max_completion_tokens"], 321);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "What is a pgmq archive?"}])
    );
    // Plain JSON (gpt is configured without streaming).
    fake.script("gpt", &[Reply::Answer("Plain answer.", Some((40, 3)))]);
    let r = c.providers["gpt"].complete(&req).await.unwrap();
    assert_eq!(
        (r.content.as_str(), r.input_tokens, r.output_tokens),
        ("Plain answer.", 40, 3)
    );
    assert!(fake.seen("gpt")[0].get("stream").is_none_or(|s| s == false));
    // No usage reported: estimated from the text, and marked so.
    fake.script("grok", &[Reply::Answer("twelve chars", None)]);
    let r = c.providers["grok"].complete(&req).await.unwrap();
    assert!(r.usage_estimated);
    assert_eq!(r.output_tokens, 3);
    assert_eq!(r.input_tokens, req.estimated_input_tokens());
    // A usage no answer can have (it would not fit the ledger, and stored it looped
    // the job on a constraint error): a malformed answer, so the next provider runs.
    for p in ["grok", "gpt"] {
        fake.script(p, &[Reply::Answer("huge", Some((3_000_000_000, 5)))]);
        let e = c.providers[p].complete(&req).await.unwrap_err();
        assert!(e.to_string().contains("3000000000 input"), "{p}: {e}");
        assert_eq!(e.failure.as_str(), "malformed", "{p}");
    }
}

#[tokio::test]
async fn the_client_classifies_every_failure_and_never_shows_the_key() {
    let fake = FakeLlm::start().await;
    let c = chat(&fake.env(&["gpt"]));
    let m = msgs("hi");
    let req = ChatRequest {
        messages: &m,
        max_tokens: 50,
    };
    let cases: Vec<(&str, Reply, Failure, Option<u16>)> = vec![
        (
            "grok",
            Reply::Error(429, "Rate limit reached"),
            Failure::RateLimited,
            Some(429),
        ),
        (
            "grok",
            Reply::Text(500, "<html>oops</html>"),
            Failure::ServerError,
            Some(500),
        ),
        ("grok", Reply::Hang, Failure::Timeout, None),
        ("grok", Reply::Stall(2), Failure::Stalled, None),
        ("grok", Reply::Malformed, Failure::Malformed, None),
        ("gpt", Reply::Malformed, Failure::Malformed, None),
        ("gpt", Reply::Hang, Failure::Timeout, None),
        (
            "grok",
            Reply::Error(400, "context_length_exceeded"),
            Failure::Rejected,
            Some(400),
        ),
        (
            "gpt",
            Reply::Error(404, "The model does not exist"),
            Failure::Refused,
            Some(404),
        ),
    ];
    let per_provider = |p: &str| cases.iter().filter(|c| c.0 == p).count();
    let (n_grok, n_gpt) = (per_provider("grok"), per_provider("gpt"));
    for (p, reply, want, status) in cases {
        fake.script(p, &[reply]);
        let e = c.providers[p].complete(&req).await.unwrap_err();
        assert_eq!((e.failure, e.http_status), (want, status), "{p}: {e}");
        assert!(!e.to_string().contains(KEY) && !format!("{e:?}").contains(KEY));
    }
    // One request per call: the client itself never retries (429 and 5xx included);
    // moving on is the router's job.
    assert_eq!(
        (fake.seen("grok").len(), fake.seen("gpt").len()),
        (n_grok, n_gpt)
    );
    // grok with one setting changed, failing.
    let grok_with = |key: &str, value: &str| {
        let mut env = fake.env(&[]);
        env.retain(|(k, _)| !k.ends_with(&format!("GROK__{key}")));
        env.push((
            format!("LONGSHORE__CHAT__PROVIDERS__GROK__{key}"),
            value.into(),
        ));
        let provider = chat(&env).providers["grok"].clone();
        async move { provider.complete(&req).await.unwrap_err() }
    };
    // A wrong key is the provider's setup (401), not the request: it falls back.
    let e = grok_with("API_KEY", "sk-wrong").await;
    assert_eq!((e.failure, e.http_status), (Failure::Refused, Some(401)));
    assert!(e.failure.falls_back());
    // Nothing listening: unavailable.
    let e = grok_with("BASE_URL", "http://127.0.0.1:9/v1").await;
    assert_eq!(e.failure, Failure::Unavailable, "{e}");
}

// ---- The job --------------------------------------------------------------------------

#[tokio::test]
async fn an_answer_is_charged_once_at_the_providers_price_with_its_attempt() {
    let (t, fake, fleet, user) = setup(&[]).await;
    // grok: 500 in / 1000 out → ceil(0.5 + 4 + 1) = 6 (the spec's example).
    fake.script("grok", &[Reply::Answer("Six credits.", Some((500, 1000)))]);
    let c = call(user, "price me", None);
    let r = run(&t.pool, &c).await;
    assert_eq!(r["provider"], "grok");
    assert_eq!(r["model"], "grok-test-model");
    assert_eq!(r["content"], "Six credits.");
    assert_eq!(
        (r["input_tokens"].as_i64(), r["output_tokens"].as_i64()),
        (Some(500), Some(1000))
    );
    assert_eq!(r["credits_charged"], 6);
    assert_eq!(r["balance"], 94, "the signup bonus of 100, less 6");
    assert_eq!(balance(&t.pool, user).await, 94);
    assert_eq!(charges(&t.pool, c.request_id).await, [6]);
    assert_eq!(
        attempts(&t.pool, c.request_id).await,
        [a(("grok", "ok", None))]
    );
    // The tier's limit went to the provider (free: 1024).
    assert_eq!(fake.seen("grok")[0]["max_completion_tokens"], 1024);
    // The same request again (the chat API retried): the same answer, no call, no charge.
    let calls = fake.calls();
    let again = run(&t.pool, &c).await;
    assert_eq!(again["content"], "Six credits.");
    assert_eq!(again["credits_charged"], 6);
    assert_eq!(again["balance"], 94, "the balance now, charged once");
    assert_eq!(fake.calls(), calls, "no second provider call");
    assert_eq!(charges(&t.pool, c.request_id).await, [6]);
    // A hint picks gpt first: 1500 / 2000 → 27.
    fake.script("gpt", &[Reply::Answer("Deep.", Some((1500, 2000)))]);
    let d = LlmCall {
        max_tokens: std::num::NonZeroU32::new(100),
        ..call(user, "think", Some(Hint::Deep))
    };
    let r = run(&t.pool, &d).await;
    assert_eq!(
        (r["provider"].as_str(), r["credits_charged"].as_i64()),
        (Some("gpt"), Some(27))
    );
    assert_eq!(fake.seen("gpt")[0]["max_completion_tokens"], 100);
    assert_eq!(balance(&t.pool, user).await, 94 - 27);
    fleet.stop().await;
}

/// Row 22: provider A times out after accepting the request, B answers → one charge,
/// both attempts recorded.
#[tokio::test]
async fn row22_a_timeout_after_accepting_falls_back_and_charges_once() {
    let (t, fake, fleet, user) = setup(&[]).await;
    fake.script("grok", &[Reply::Hang]);
    fake.script("gpt", &[Reply::Answer("From B.", Some((100, 50)))]);
    let c = call(user, "hello", None);
    let r = run(&t.pool, &c).await;
    assert_eq!(
        (r["provider"].as_str(), r["content"].as_str()),
        (Some("gpt"), Some("From B."))
    );
    // gpt: ceil(0.3 + 0.5 + 2) = 3.
    assert_eq!(r["credits_charged"], 3);
    assert_eq!(charges(&t.pool, c.request_id).await, [3]);
    assert_eq!(
        attempts(&t.pool, c.request_id).await,
        [a(("grok", "timeout", None)), a(("gpt", "ok", None))]
    );
    let (err, latency): (Option<String>, i32) = sqlx::query_as(
        "SELECT error, latency_ms FROM llm_attempts WHERE request_id = $1 AND provider = 'grok'",
    )
    .bind(c.request_id)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert!(err.unwrap().contains("no first token"));
    assert!(
        latency >= 700,
        "the first-token clock ran out: {latency} ms"
    );
    assert_eq!(
        fake.seen("claude").len(),
        0,
        "the chain stopped at the answer"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn every_transient_failure_falls_back_and_all_failing_is_reported_without_a_charge() {
    let (t, fake, fleet, user) = setup(&["claude"]).await;
    // 429 → 500 → answer; a stalled stream → malformed JSON → answer (tools: gpt first).
    fake.script("grok", &[Reply::Error(429, "Rate limit reached")]);
    fake.script("gpt", &[Reply::Text(503, "upstream unavailable")]);
    fake.script("claude", &[Reply::Answer("Third time.", Some((10, 10)))]);
    let c1 = call(user, "one", None);
    let r = run(&t.pool, &c1).await;
    assert_eq!(r["provider"], "claude");
    assert_eq!(
        attempts(&t.pool, c1.request_id).await,
        [
            a(("grok", "rate_limited", Some(429))),
            a(("gpt", "server_error", Some(503))),
            a(("claude", "ok", None))
        ]
    );
    fake.script("gpt", &[Reply::Stall(3)]);
    fake.script("claude", &[Reply::Malformed]);
    fake.script("grok", &[Reply::Answer("Grok last.", Some((10, 10)))]);
    let c2 = call(user, "two", Some(Hint::Tools));
    let r = run(&t.pool, &c2).await;
    assert_eq!(r["provider"], "grok");
    assert_eq!(
        attempts(&t.pool, c2.request_id).await,
        [
            a(("gpt", "stalled", None)),
            a(("claude", "malformed", None)),
            a(("grok", "ok", None))
        ]
    );
    // Everyone fails: all_providers_failed with each reason; nothing charged.
    let before = balance(&t.pool, user).await;
    fake.script("grok", &[Reply::Error(429, "Rate limit reached")]);
    fake.script("gpt", &[Reply::Hang]);
    fake.script("claude", &[Reply::Text(500, "boom")]);
    let c3 = call(user, "three", None);
    let r = run(&t.pool, &c3).await;
    let e = &r["error"];
    assert_eq!(
        (e["code"].as_str(), e["status"].as_i64()),
        (Some("all_providers_failed"), Some(502))
    );
    let reasons: Vec<(&str, &str)> = e["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["provider"].as_str().unwrap(),
                x["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("grok", "rate_limited"),
            ("gpt", "timeout"),
            ("claude", "server_error")
        ]
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("grok: rate_limited")
    );
    assert_eq!(attempts(&t.pool, c3.request_id).await.len(), 3);
    assert!(charges(&t.pool, c3.request_id).await.is_empty());
    assert_eq!(balance(&t.pool, user).await, before);
    fleet.stop().await;
}

#[tokio::test]
async fn a_request_fault_does_not_fall_back_and_refusals_call_nobody() {
    let (t, fake, fleet, user) = setup(&[]).await;
    fake.script(
        "grok",
        &[Reply::Error(
            400,
            "This model's maximum context length is 8192 tokens",
        )],
    );
    let c = call(user, "too long", None);
    let r = run(&t.pool, &c).await;
    let e = &r["error"];
    assert_eq!(
        (e["code"].as_str(), e["status"].as_i64()),
        (Some("provider_rejected_request"), Some(400))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );
    assert_eq!(
        attempts(&t.pool, c.request_id).await,
        [a(("grok", "rejected", Some(400)))]
    );
    assert_eq!(
        fake.seen("gpt").len() + fake.seen("claude").len(),
        0,
        "no fallback"
    );
    assert_eq!(balance(&t.pool, user).await, 100, "nothing charged");

    // insufficient_credits: below the minimum balance, no provider is called.
    let poor = Uuid::new_v4();
    fund(&t.pool, poor, "free", 4).await;
    let calls = fake.calls();
    let r = run(&t.pool, &call(poor, "hi", None)).await;
    let e = &r["error"];
    assert_eq!(
        (e["code"].as_str(), e["status"].as_i64()),
        (Some("insufficient_credits"), Some(402))
    );
    // grok at the free tier's 1024 output tokens: ceil(0.012 + 4.096 + 1) = 6.
    assert_eq!(
        (e["balance"].as_i64(), e["required"].as_i64()),
        (Some(4), Some(6))
    );
    // request_too_expensive: enterprise on gpt, 8192 output tokens and a long prompt.
    let rich = Uuid::new_v4();
    fund(&t.pool, rich, "enterprise", 10000).await;
    let r = run(&t.pool, &call(rich, &"x".repeat(24_000), Some(Hint::Deep))).await;
    assert_eq!(r["error"]["code"], "request_too_expensive");
    assert_eq!(r["error"]["status"], 413);
    assert_eq!(fake.calls(), calls, "refused before calling anyone");
    fleet.stop().await;
}

/// A fallback provider is tried only if the balance covers its own worst case.
#[tokio::test]
async fn a_fallback_the_balance_cannot_cover_is_skipped_with_its_reason() {
    let (t, fake, fleet, user) = setup(&[]).await;
    // 8 credits: grok's worst case (free tier) is 6; gpt's and claude's are 13.
    fund(&t.pool, user, "free", 8).await;
    fake.script("grok", &[Reply::Text(502, "bad gateway")]);
    let c = call(user, "hi", None);
    let r = run(&t.pool, &c).await;
    let e = &r["error"];
    assert_eq!(e["code"], "all_providers_failed");
    let statuses: Vec<&str> = e["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["server_error", "skipped", "skipped"]);
    assert!(
        e["attempts"][1]["error"]
            .as_str()
            .unwrap()
            .contains("worst case of 13 credits")
    );
    assert_eq!(fake.seen("gpt").len() + fake.seen("claude").len(), 0);
    assert_eq!(
        attempts(&t.pool, c.request_id).await.len(),
        1,
        "skips are not attempts"
    );
    fleet.stop().await;
}

/// An answer stored by an earlier run (which died before its charge committed) is
/// charged and returned without calling any provider.
#[tokio::test]
async fn a_retry_with_a_stored_answer_does_not_call_again_and_charges_once() {
    let (t, fake, fleet, user) = setup(&[]).await;
    let c = call(user, "stored", None);
    sqlx::query(
        r#"INSERT INTO llm_answers (request_id, user_id, provider, model, content, input_tokens, output_tokens)
         VALUES ($1, $2, 'claude', 'claude-test-model', 'From the first run.', 2000, 3000)"#,
    )
    .bind(c.request_id)
    .bind(user)
    .execute(&t.pool)
    .await
    .unwrap();
    let r = run(&t.pool, &c).await;
    assert_eq!(
        (r["content"].as_str(), r["provider"].as_str()),
        (Some("From the first run."), Some("claude"))
    );
    // claude: 2000 / 3000 → 38 (the spec's example).
    assert_eq!(r["credits_charged"], 38);
    let r2 = run(&t.pool, &c).await;
    assert_eq!(r2["credits_charged"], 38);
    assert_eq!(charges(&t.pool, c.request_id).await, [38]);
    assert_eq!(fake.calls(), 0);
    // The same request_id for another user is refused, not served.
    let other = LlmCall {
        user_id: Uuid::new_v4(),
        ..c.clone()
    };
    let r3 = run(&t.pool, &other).await;
    assert_eq!(r3["error"]["code"], "request_id_conflict");
    assert_eq!(charges(&t.pool, c.request_id).await, [38]);
    fleet.stop().await;
}

/// Issue 15 item 11: a request answered, charged and then pruned (past the answers'
/// retention) is not answered again for free: its user gets `request_expired`,
/// another user `request_id_conflict`, and no provider is called.
#[tokio::test]
async fn a_replay_after_the_answer_was_pruned_calls_no_provider() {
    let (t, fake, fleet, user) = setup(&[]).await;
    let c = call(user, "answered long ago", None);
    fake.script("grok", &[Reply::Answer("the answer", Some((100, 10)))]);
    let r = run(&t.pool, &c).await;
    assert_eq!(r["content"], "the answer");
    let charged = charges(&t.pool, c.request_id).await;
    assert_eq!(charged.len(), 1);
    assert_eq!(fake.calls(), 1);
    // prune_llm past the retention (the rows it deletes).
    sqlx::query("DELETE FROM llm_answers")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM llm_attempts")
        .execute(&t.pool)
        .await
        .unwrap();
    let before = balance(&t.pool, user).await;
    let r = run(&t.pool, &c).await;
    assert_eq!(r["error"]["code"], "request_expired", "{r}");
    let other = LlmCall {
        user_id: Uuid::new_v4(),
        ..c.clone()
    };
    let r = run(&t.pool, &other).await;
    assert_eq!(r["error"]["code"], "request_id_conflict", "{r}");
    assert_eq!(fake.calls(), 1, "no provider called for a pruned request");
    assert_eq!(charges(&t.pool, c.request_id).await, charged);
    assert_eq!(balance(&t.pool, user).await, before);
    fleet.stop().await;
}

/// Issue 14 review: a user is its first ingress caller's. Another token's llm_call for
/// that user_id (a new request, or a replay of one answered) is refused: it neither
/// spends the user's credits, nor reads the answer or the balance, nor calls anyone.
#[tokio::test]
async fn one_caller_cannot_spend_or_read_another_callers_user() {
    let (t, fake, fleet, user) = setup(&[]).await;
    let as_caller = |who: &str| EnqueueOptions {
        principal: Some(format!("token:{who}")),
        ..Default::default()
    };
    let c = call(user, "alice's question", None);
    fake.script("grok", &[Reply::Answer("alice's answer", Some((100, 10)))]);
    let id = enqueue(&t.pool, &c, as_caller("alice")).await.unwrap().id;
    assert_eq!(result(&t.pool, id).await["content"], "alice's answer");
    let before = balance(&t.pool, user).await;
    // Bob: a new request for alice's user, and a replay of hers.
    for a in [call(user, "bob spends", None), c.clone()] {
        let id = enqueue(&t.pool, &a, as_caller("bob")).await.unwrap().id;
        let r = result(&t.pool, id).await;
        assert_eq!(r["error"]["code"], "user_forbidden", "{r}");
        assert!(
            r.get("content").is_none() && r.get("balance").is_none(),
            "{r}"
        );
    }
    assert_eq!(fake.calls(), 1, "nobody called for bob");
    assert_eq!(balance(&t.pool, user).await, before);
    // Alice still can.
    fake.script("grok", &[Reply::Answer("again", Some((100, 10)))]);
    let id = enqueue(&t.pool, &call(user, "more", None), as_caller("alice"))
        .await
        .unwrap()
        .id;
    assert_eq!(result(&t.pool, id).await["content"], "again");
    fleet.stop().await;
}

/// Row 21 through llm_call itself (issue 15 item 12): 1,000 calls in parallel from a
/// user whose balance covers 100 worst cases, every provider answering with the worst
/// case. The pre-check holds the worst case under the account's lock, so at most 100
/// calls reach a provider, each is charged once, and the balance never goes below zero.
#[tokio::test]
async fn row21_a_thousand_parallel_calls_against_credits_for_a_hundred() {
    let t = db().await;
    let fake = FakeLlm::start().await;
    let env = fake.env(&[]);
    let chat = chat(&env);
    let user = Uuid::new_v4();
    let text = "the same question";
    let m = msgs(text);
    let req = ChatRequest {
        messages: &m,
        max_tokens: chat.cfg.credits.max_output_tokens.free,
    };
    let (input, output) = (req.estimated_input_tokens(), req.max_tokens);
    let worst = chat.cfg.credits.prices["grok"].credits(input, output);
    fund(&t.pool, user, "free", (100 * worst) as i32).await;
    let reply = Reply::Answer("worst case", Some((input, output)));
    for p in ["grok", "gpt", "claude"] {
        fake.script(p, &vec![reply.clone(); 1000]);
    }
    let calls: Vec<LlmCall> = (0..1000).map(|_| call(user, text, None)).collect();
    let ids = enqueue_many(&t.pool, &calls, EnqueueOptions::default())
        .await
        .unwrap();
    let fleet = Fleet::start(&t.pool, &env);
    let mut answered = 0;
    for id in &ids {
        let r = result(&t.pool, *id).await;
        match r["error"]["code"].as_str() {
            None => answered += 1,
            Some(code) => assert_eq!(code, "insufficient_credits", "{r}"),
        }
    }
    fleet.stop().await;
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM credits_ledger WHERE user_id = $1 AND reason = 'charge'",
    )
    .bind(user)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert!(fake.calls() <= 100, "{} provider calls", fake.calls());
    assert_eq!(answered, 100, "every call the credits cover is answered");
    assert_eq!(
        fake.calls(),
        answered,
        "every provider call answered and charged"
    );
    assert_eq!(charged as usize, answered);
    assert!(balance(&t.pool, user).await >= 0);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM credit_holds").await,
        0,
        "every hold released or charged"
    );
    println!("{answered} calls answered of 1000");
}

/// A call whose real input outgrew its estimate costs more than it held; its charge
/// may not take what another call in flight holds: the answer is withheld (kept for
/// a top-up) and the other call's credits stay there for it.
#[tokio::test]
async fn a_charge_over_its_hold_does_not_take_another_calls_hold() {
    let (t, fake, fleet, user) = setup(&[]).await;
    fund(&t.pool, user, "free", 30).await;
    sqlx::query("INSERT INTO credit_holds (request_id, user_id, credits) VALUES ($1, $2, 15)")
        .bind(Uuid::new_v4())
        .bind(user)
        .execute(&t.pool)
        .await
        .unwrap();
    // grok: 19,000 input tokens → 1 + 19 = 20 credits, more than the 15 not held.
    fake.script("grok", &[Reply::Answer("long input", Some((19_000, 0)))]);
    let r = run(&t.pool, &call(user, "short text, long tokens", None)).await;
    assert_eq!(r["error"]["code"], "insufficient_credits", "{r}");
    assert_eq!(
        balance(&t.pool, user).await,
        30,
        "nothing taken from the other hold"
    );
    fleet.stop().await;
}

/// When the balance no longer covers the answer (spent meanwhile), the answer is
/// withheld and kept: after a top-up the same request gets it without a second call.
#[tokio::test]
async fn an_answer_the_balance_no_longer_covers_is_withheld_until_a_top_up() {
    let (t, fake, fleet, user) = setup(&[]).await;
    let (gate, c, id) = enqueue_gated(&t.pool, &fake, user, "Costly.", (1000, 20_000)).await;
    eventually(Duration::from_secs(15), "the provider call", || async {
        (fake.calls() == 1).then_some(())
    })
    .await;
    // Meanwhile the user spends 90 of the 100 credits elsewhere.
    sqlx::query("INSERT INTO credits_ledger (user_id, delta, reason, request_id) VALUES ($1, -90, 'charge', $2)")
        .bind(user)
        .bind(Uuid::new_v4())
        .execute(&t.pool)
        .await
        .unwrap();
    gate.notify_one();
    let r = result(&t.pool, id).await;
    // grok 1000 in / 20000 out → 1 + 80 + 1 = 82 > 10.
    assert_eq!(r["error"]["code"], "insufficient_credits");
    assert_eq!(
        (
            r["error"]["balance"].as_i64(),
            r["error"]["required"].as_i64()
        ),
        (Some(10), Some(82))
    );
    assert_eq!(balance(&t.pool, user).await, 10, "never below zero");
    sqlx::query("INSERT INTO credits_ledger (user_id, delta, reason) VALUES ($1, 100, 'grant')")
        .bind(user)
        .execute(&t.pool)
        .await
        .unwrap();
    let r = run(&t.pool, &c).await;
    assert_eq!(
        (r["content"].as_str(), r["credits_charged"].as_i64()),
        (Some("Costly."), Some(82))
    );
    assert_eq!(fake.calls(), 1, "the stored answer was served");
    assert_eq!(balance(&t.pool, user).await, 28);
    fleet.stop().await;
}

// ---- Through the binaries --------------------------------------------------------------

fn ingress_toml() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"

[[ingress.tokens]]
name = "chat-api"
sha256 = "{}"
queues = ["llm_call"]
rate_per_second = 100
burst = 100
"#,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"chat-token"))
    )
}

/// A kill -9 of the worker between the provider's answer and the charge: the retry
/// makes no second provider call and charges once.
#[tokio::test]
async fn kill9_between_the_answer_and_the_charge_neither_calls_again_nor_charges_twice() {
    let t = db().await;
    let fake = FakeLlm::start().await;
    let mut env = fake.env(&[]);
    env.push(("LONGSHORE__QUEUES__LLM_CALL__LEASE".into(), "2s".into()));
    env.push((
        "LONGSHORE__QUEUES__LLM_CALL__BACKOFF_BASE".into(),
        "10ms".into(),
    ));
    let user = Uuid::new_v4();
    let (gate, c, id) = enqueue_gated(&t.pool, &fake, user, "Answered once.", (500, 1000)).await;
    let mut worker = Proc::spawn(&t.url, &["worker"], &vars(&env));
    eventually(Duration::from_secs(30), "the provider call", || async {
        (fake.calls() == 1).then_some(())
    })
    .await;
    // The pre-call checks are done (the account exists). Hold the account row so the
    // charge cannot commit, then let the provider answer.
    let mut blocker = t.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *blocker)
        .await
        .unwrap();
    gate.notify_one();
    eventually(Duration::from_secs(15), "the stored answer", || async {
        (count(
            &t.pool,
            &format!(
                "SELECT count(*) FROM llm_answers WHERE request_id = '{}'",
                c.request_id
            ),
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    // The worker is now waiting on the account row, inside its charge.
    eventually(
        Duration::from_secs(15),
        "the charge waiting on the lock",
        || async {
            let sql = r#"SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'"#;
            (count(&t.pool, sql).await > 0).then_some(())
        },
    )
    .await;
    worker.kill9();
    blocker.rollback().await.unwrap();
    assert!(
        charges(&t.pool, c.request_id).await.is_empty(),
        "the charge died with the worker"
    );
    let worker = Proc::spawn(&t.url, &["worker"], &vars(&env));
    let r = result(&t.pool, id).await;
    assert_eq!(
        (r["content"].as_str(), r["credits_charged"].as_i64()),
        (Some("Answered once."), Some(6))
    );
    assert_eq!(fake.calls(), 1, "no second provider call");
    assert_eq!(charges(&t.pool, c.request_id).await, [6]);
    assert_eq!(
        attempts(&t.pool, c.request_id).await,
        [a(("grok", "ok", None))]
    );
    assert!(!worker.logs().contains(KEY));
}

/// The chat API's path: POST the job, GET it with ?wait=, through the real ingress and
/// worker; bad args are refused at the door.
#[tokio::test]
async fn end_to_end_through_the_ingress_with_wait() {
    let t = db().await;
    let fake = FakeLlm::start().await;
    let dir = config_dir(&ingress_toml());
    let mut env = fake.env(&[]);
    env.push(("LONGSHORE_ENV".into(), "test".into()));
    let ingress = Proc::spawn_in(Some(&dir), &t.url, &["ingress"], &vars(&env));
    let worker = Proc::spawn_in(Some(&dir), &t.url, &["worker"], &vars(&env));
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    fake.script("grok", &[Reply::Error(500, "overloaded")]);
    fake.script("gpt", &[Reply::Answer("Hello from gpt.", Some((12, 4)))]);
    let request_id = Uuid::new_v4();
    let body = json!({"request_id": request_id, "user_id": Uuid::new_v4(),
                      "messages": [{"role": "user", "content": "Hello?"}]});
    let post = |body: Value| {
        http.post(format!("{base}/v1/queues/llm_call/jobs"))
            .bearer_auth("chat-token")
            .header(
                "idempotency-key",
                body["request_id"].as_str().unwrap_or("x").to_string(),
            )
            .json(&body)
            .send()
    };
    let r = post(body.clone()).await.unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let got: Value = http
        .get(format!("{base}/v1/jobs/llm_call/{id}?wait=30"))
        .bearer_auth("chat-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["state"], "done", "{got}");
    let res = &got["result"];
    assert_eq!(
        (res["provider"].as_str(), res["content"].as_str()),
        (Some("gpt"), Some("Hello from gpt."))
    );
    // gpt: ceil(0.036 + 0.04 + 2) = 3.
    assert_eq!(res["credits_charged"], 3);
    // The chat API posting the same request again gets the same job.
    let r = post(body).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id);
    // Bad args: refused with a reason, nothing enqueued.
    for (bad, why) in [
        (
            json!({"request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(), "messages": []}),
            "at least one message",
        ),
        (
            json!({"request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(), "messages": [{"role": "user", "content": "x"}], "hint": "fast"}),
            "unknown variant",
        ),
        (
            json!({"request_id": "not-a-uuid", "user_id": Uuid::new_v4(), "messages": [{"role": "user", "content": "x"}]}),
            "UUID",
        ),
    ] {
        let r = post(bad).await.unwrap();
        assert_eq!(r.status(), 422);
        let text = r.text().await.unwrap();
        assert!(
            text.contains("invalid_args") && text.contains(why),
            "{text}"
        );
    }
    assert_eq!(ever_enqueued(&t.pool, "llm_call").await.len(), 1);
    for p in [&ingress, &worker] {
        assert!(!p.logs().contains(KEY), "the provider key is in a log");
    }
    assert!(
        worker.logs().contains("chat provider"),
        "the providers are described at first use"
    );
}

#[tokio::test]
async fn prune_llm_drops_attempts_and_answers_past_the_retention() {
    let t = db().await;
    let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
    for (req, age) in [(old, "100 days"), (new, "1 day")] {
        let attempt: i64 = sqlx::query_scalar(
            r#"INSERT INTO llm_attempts (request_id, job_id, provider, model, status, latency_ms, created_at)
             VALUES ($1, 1, 'grok', 'm', 'ok', 5, now() - $2::interval) RETURNING id"#,
        )
        .bind(req)
        .bind(age)
        .fetch_one(&t.pool)
        .await
        .unwrap();
        sqlx::query(
            r#"INSERT INTO llm_answers (request_id, user_id, provider, model, content, input_tokens, output_tokens, attempt_id, created_at)
             VALUES ($1, $2, 'grok', 'm', 'c', 1, 1, $3, now() - $4::interval)"#,
        )
        .bind(req)
        .bind(Uuid::new_v4())
        .bind(attempt)
        .bind(age)
        .execute(&t.pool)
        .await
        .unwrap();
    }
    let fleet = Fleet::start(&t.pool, &[]);
    let tiny = enqueue(
        &t.pool,
        &longshore_jobs::chat::prune_llm::PruneLlm {
            older_than: Duration::from_secs(90),
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap()
    .id;
    let id = enqueue(
        &t.pool,
        &longshore_jobs::chat::prune_llm::PruneLlm {
            older_than: Duration::from_secs(90 * 86_400),
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap()
    .id;
    let r: Value = eventually(Duration::from_secs(30), "the prune", || async {
        job_result(&t.pool, "prune_llm", id).await
    })
    .await;
    assert_eq!(r["deleted"], json!({"llm_answers": 1, "llm_attempts": 1}));
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT request_id FROM llm_answers")
        .fetch_all(&t.pool)
        .await
        .unwrap();
    assert_eq!(left, [new]);
    // Under a day is refused as a typo: dead-lettered with the reason.
    let err: String = eventually(Duration::from_secs(30), "the refusal", || async {
        sqlx::query_scalar("SELECT last_error FROM longshore.dead_letters WHERE queue = 'prune_llm' AND msg_id = $1")
            .bind(tiny)
            .fetch_optional(&t.pool)
            .await
            .unwrap()
    })
    .await;
    assert!(err.contains("at least 1d"), "{err}");
    fleet.stop().await;
}
