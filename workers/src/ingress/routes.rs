//! Route handlers. Each validates before any SQL: queue names are checked against the
//! registry (so nothing hostile reaches a table name), args against the kind's type.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::auth::Token;
use super::{ApiError, CallerSlot, Ingress, Peer, auth, clamp_wait, waiters};
use crate::clean;
use crate::enqueue::{EnqueueError, EnqueueOptions, Enqueued, queue_sql};
use crate::queue_name::QueueName;
use crate::store;

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// A queue from the path: a valid name of a registered kind, else 404 before any SQL.
pub(super) fn known_queue(st: &Ingress, raw: &str) -> ApiResult<QueueName> {
    let q = QueueName::parse(raw).map_err(|_| no_such_queue())?;
    if !st.registry.contains(q.as_str()) {
        return Err(no_such_queue());
    }
    Ok(q)
}

fn no_such_queue() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_queue", "no such queue")
}

/// A queue callers may enqueue to: a registered *public* kind. An internal kind answers
/// the same 404 as one that does not exist, so callers cannot tell them apart.
fn public_queue(st: &Ingress, raw: &str) -> ApiResult<QueueName> {
    let q = known_queue(st, raw)?;
    if !st.registry.is_public(q.as_str()) {
        return Err(no_such_queue());
    }
    Ok(q)
}

/// Authenticates the request (before anything about the route is revealed) and records
/// the caller's name for the request's log line. A failed attempt counts against the
/// client address's unauthenticated budget (429 past it, so guessing is slow).
pub(super) fn caller<'a>(
    st: &'a Ingress,
    headers: &HeaderMap,
    slot: &CallerSlot,
    peer: Option<Extension<Peer>>,
) -> ApiResult<&'a Token> {
    match st.tokens.authenticate(headers) {
        Ok(t) => {
            slot.set(&t.name);
            Ok(t)
        }
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            st.anonymous.check(st.client(peer, headers))?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Reads the body within the size limit and the read timeout.
pub(super) async fn read_body(st: &Ingress, headers: &HeaderMap, body: Body) -> ApiResult<Bytes> {
    let limit = st.cfg.ingress.body_limit_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        st.cfg.ingress.read_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the body did not arrive in time",
        )),
        Ok(Err(e)) if e.to_string().contains("length limit") => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body could not be read",
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

fn parse_json(bytes: &[u8]) -> ApiResult<Value> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    // Valid JSON, but PostgreSQL's jsonb cannot store it: say so instead of a 500.
    if clean::json_has_nul(&v) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_args",
            "the body holds a NUL character (\\u0000), which job args cannot carry",
        ));
    }
    Ok(v)
}

/// A query string that does not fit the route's parameters: 422, like a bad value.
fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_options",
        e.body_text(),
    )
}

fn validate(st: &Ingress, queue: &QueueName, args: &Value) -> ApiResult<()> {
    st.registry
        .validate(queue.as_str(), args)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_args", e))
}

#[derive(Deserialize)]
pub(super) struct EnqueueQuery {
    /// "10s", "5m" or plain seconds.
    delay: Option<String>,
    /// RFC 3339.
    run_at: Option<String>,
}

impl EnqueueQuery {
    fn options(&self) -> ApiResult<EnqueueOptions> {
        let bad = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_options", m);
        let mut o = EnqueueOptions::default();
        let max = clean::MAX_DELAY;
        let too_far = |what: &str| {
            bad(format!(
                "{what} is more than {} days ahead",
                max.as_secs() / 86_400
            ))
        };
        if let Some(d) = &self.delay {
            let d = d
                .parse::<u64>()
                .map(Duration::from_secs)
                .or_else(|_| humantime::parse_duration(d))
                .map_err(|e| bad(format!("delay {d:?}: {e}")))?;
            if d > max {
                return Err(too_far("delay"));
            }
            o.delay = Some(d);
        }
        if let Some(t) = &self.run_at {
            let t =
                DateTime::parse_from_rfc3339(t).map_err(|e| bad(format!("run_at {t:?}: {e}")))?;
            let t = t.with_timezone(&Utc);
            let limit = chrono::Duration::from_std(max).expect("fits");
            if t.signed_duration_since(Utc::now()) > limit {
                return Err(too_far("run_at"));
            }
            o.run_at = Some(t);
        }
        Ok(o)
    }
}

/// Bounds a database operation by `ingress.db_timeout` on the client side: a paused
/// or unreachable server must give 503, never a hung request (the server-side
/// statement_timeout cannot fire on a server that is not running). A 503 after a
/// timeout is ambiguous about an enqueue; clients retry with an Idempotency-Key.
pub(super) async fn bounded<T>(
    st: &Ingress,
    fut: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let limit = st.cfg.ingress.db_timeout;
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            format!(
                "the database did not answer within {}s; try again",
                limit.as_secs_f64()
            ),
        )
        .retry_after(1)),
    }
}

fn enqueue_error(e: EnqueueError) -> ApiError {
    match e {
        EnqueueError::UnknownQueue(q) => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_queue",
            format!("queue {q:?} is not migrated yet"),
        ),
        EnqueueError::BadKey => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_idempotency_key",
            e.to_string(),
        ),
        EnqueueError::Database(d) => ApiError::database(&d),
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_args",
            other.to_string(),
        ),
    }
}

/// One job, within the database deadline.
async fn enqueue_single(
    st: &Ingress,
    queue: &QueueName,
    args: Value,
    opts: EnqueueOptions,
) -> ApiResult<Enqueued> {
    let mut out = bounded(st, async {
        // In a session: through a pooler, a transaction begun where a timeout cannot
        // cut the BEGIN short (`db::begin`); straight to the server, a connection.
        crate::db::run(&st.pool, crate::db::Deadline::Statement, async |c| {
            crate::enqueue::enqueue_conn(c, queue, vec![(args, opts)]).await
        })
        .await
        .map_err(enqueue_error)
    })
    .await?;
    Ok(out.remove(0))
}

/// 202 with the job's id.
fn accepted(queue: &QueueName, e: Enqueued) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({"id": e.id, "queue": queue.as_str(), "duplicate": e.duplicate})),
    )
        .into_response()
}

pub(super) async fn enqueue_one(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    Path(queue): Path<String>,
    q: Result<Query<EnqueueQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let token = caller(&st, &headers, &slot, peer)?;
    let queue = public_queue(&st, &queue)?;
    token.permit(queue.as_str())?;
    let Query(q) = q.map_err(bad_query)?;
    let mut opts = q.options()?;
    opts.principal = Some(token.principal.clone());
    let bytes = read_body(&st, &headers, body).await?;
    let args = parse_json(&bytes)?;
    validate(&st, &queue, &args)?;
    idempotency_key(&st, &headers, token, &mut opts)?;
    let e = enqueue_single(&st, &queue, args, opts).await?;
    if e.duplicate && !e.same_body {
        return Err(key_conflict(&format!("job {}", e.id)));
    }
    Ok(accepted(&queue, e))
}

/// The `Idempotency-Key` header into `opts`, in the token's own namespace (one
/// tenant's key can neither find nor squat another's, nor a webhook's), with the
/// configured TTL.
fn idempotency_key(
    st: &Ingress,
    headers: &HeaderMap,
    token: &Token,
    opts: &mut EnqueueOptions,
) -> ApiResult<()> {
    if let Some(k) = headers.get("idempotency-key") {
        let bad = |m: &str| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_idempotency_key",
                m.to_string(),
            )
        };
        let k = k.to_str().map_err(|_| bad("not printable ASCII"))?;
        if k.is_empty() || k.len() > 200 {
            return Err(bad("must be 1 to 200 characters"));
        }
        opts.idempotency_key = Some(namespaced(&token.principal, k));
        opts.idempotency_ttl = Some(st.cfg.enqueue.idempotency_ttl);
    }
    Ok(())
}

/// A key in a principal's namespace. The separator is a control character, which no
/// key a caller sends can contain (keys are refused with one).
fn namespaced(principal: &str, key: &str) -> String {
    format!("{principal}\u{1f}{key}")
}

fn key_conflict(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        format!("this Idempotency-Key was used for {what} with a different body"),
    )
}

/// A pipeline's text route (see [`super::TextRoute`]): the body as text (bytes that are
/// not UTF-8, and NUL, which cannot be stored, become U+FFFD, so nothing is dropped)
/// into the route's args, then one job, as any enqueue.
pub(super) async fn text(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
    route: usize,
) -> ApiResult<Response> {
    let r = st.registry.text_routes()[route].clone();
    let token = caller(&st, &headers, &slot, peer)?;
    token.require(r.scope)?;
    let queue = known_queue(&st, r.queue)?;
    let bytes = read_body(&st, &headers, body).await?;
    let text = String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}");
    let caller = super::Caller {
        customers: token.customers.as_deref(),
    };
    let args = (r.to_args)(&text, caller).map_err(|refusal| match refusal {
        super::Refusal::Empty(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "empty_batch", m)
        }
        super::Refusal::Invalid(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_args", m)
        }
    })?;
    validate(&st, &queue, &args)?;
    let opts = EnqueueOptions {
        principal: Some(token.principal.clone()),
        ..Default::default()
    };
    let e = enqueue_single(&st, &queue, args, opts).await?;
    Ok(accepted(&queue, e))
}

pub(super) async fn enqueue_batch(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    Path(queue): Path<String>,
    q: Result<Query<EnqueueQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let token = caller(&st, &headers, &slot, peer)?;
    let queue = public_queue(&st, &queue)?;
    token.permit(queue.as_str())?;
    let Query(q) = q.map_err(bad_query)?;
    let mut opts = q.options()?;
    opts.principal = Some(token.principal.clone());
    // A key covers the whole batch: a retried batch enqueues once.
    idempotency_key(&st, &headers, token, &mut opts)?;
    let bytes = read_body(&st, &headers, body).await?;
    let Value::Array(items) = parse_json(&bytes)? else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "a batch is a JSON array of job args",
        ));
    };
    let max = st.cfg.ingress.batch_max;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_batch",
            format!("a batch holds 1 to {max} jobs, not {}", items.len()),
        ));
    }
    for (i, a) in items.iter().enumerate() {
        st.registry.validate(queue.as_str(), a).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_args",
                format!("job {i}: {e}"),
            )
        })?;
    }
    let b = bounded(&st, async {
        crate::db::run(&st.pool, crate::db::Deadline::Statement, async |c| {
            crate::enqueue::enqueue_batch(c, &queue, items, opts).await
        })
        .await
        .map_err(enqueue_error)
    })
    .await?;
    if b.duplicate && !b.same_body {
        return Err(key_conflict("another batch"));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"ids": b.ids, "queue": queue.as_str(), "duplicate": b.duplicate})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct StatusQuery {
    /// Seconds to wait for the job to finish (done or dead), up to `ingress.max_wait`.
    wait: Option<f64>,
}

pub(super) async fn job_status(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<StatusQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let token = caller(&st, &headers, &slot, peer)?;
    let Ok(Path((queue, id))) = path else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        ));
    };
    let queue = known_queue(&st, &queue)?;
    let Ok(id) = id.parse::<i64>() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_job",
            format!("no job {id:?} in queue {queue}: job ids are integers"),
        ));
    };
    let Query(q) = q.map_err(bad_query)?;
    let sql = queue_sql(&queue);
    let mut wait = clamp_wait(q.wait.unwrap_or(0.0), st.cfg.ingress.max_wait);
    // Long polls hold a connection and poll the database: past the cap a status is
    // answered at once (the client polls again).
    let _waiting = if wait.is_zero() {
        None
    } else {
        let permit = st.waiting.clone().try_acquire_owned().ok();
        if permit.is_none() {
            wait = Duration::ZERO;
        }
        permit
    };
    let deadline = Instant::now() + wait;
    // A waiter registers for its job's wake-up and makes sure the queue's completions
    // notify (the watch) before each read while it does not hold; see `waiters`. A watch
    // that cannot be written is no reason to fail the request: the waiter polls.
    let waiting = (!wait.is_zero()).then(|| st.waiters.register(queue.as_str(), id));
    let watch = || async {
        let limit = st.cfg.ingress.db_timeout;
        match tokio::time::timeout(limit, st.waiters.watch(&st.pool, queue.as_str())).await {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(e)) => {
                warn!(queue = %queue, error = %e, "could not watch the queue's completions; polling");
                false
            }
            Err(_) => {
                warn!(queue = %queue, "the completion watch was not written in time; polling");
                false
            }
        }
    };
    let mut recheck_soon = false;
    let notify = waiting
        .as_ref()
        .map(|w| w.notify.clone())
        .unwrap_or_default();
    loop {
        // Register for the wake-up before reading, so a completion between the read and
        // the wait is not missed.
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if waiting.is_some() && !st.waiters.trusted(queue.as_str()) {
            recheck_soon |= watch().await;
        }
        st.status_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = bounded(&st, async {
            crate::db::run(&st.pool, crate::db::Deadline::Statement, async |c| {
                sql.status(c, id).await
            })
            .await
            .map_err(|e| ApiError::database(&e))
        })
        .await?;
        // A job is answered to the principal that enqueued it, or to a token that may
        // read every job of a public queue it may use. To anyone else it does not exist.
        let readable = |s: &store::JobStatus| {
            s.principal.as_deref() == Some(token.principal.as_str())
                || (token.has("read_all")
                    && st.registry.is_public(queue.as_str())
                    && token.may_use(queue.as_str()))
        };
        let Some(status) = status.filter(readable) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_job",
                format!(
                    "no job {id} in queue {queue} for this token (done jobs are kept for the archive retention)"
                ),
            ));
        };
        if status.state.is_final() || Instant::now() >= deadline {
            let mut body = serde_json::to_value(&status).expect("serialisable");
            body["queue"] = json!(queue.as_str());
            return Ok(Json(body).into_response());
        }
        // Woken by this job's completion (or a reconnected listener); re-checked soon
        // while its notification may not come, else as a safety net only.
        let step = if !st.waiters.trusted(queue.as_str()) || std::mem::take(&mut recheck_soon) {
            waiters::POLL_RECHECK
        } else {
            waiters::SAFETY_RECHECK
        };
        let next = deadline.min(Instant::now() + step);
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

pub(super) async fn hook(
    State(st): State<Arc<Ingress>>,
    peer: Option<Extension<Peer>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // No token vouches for a webhook until its signature is checked: a request that
    // fails (an unknown source, a bad signature) counts against the client's
    // unauthenticated budget; a good delivery never does, so others' failures cannot
    // throttle a genuine sender.
    let client = st.client(peer, &headers);
    let Some(hook) = st.cfg.hooks.get(&source) else {
        // Answered as a signature that does not verify, not a 404: the route does not
        // tell which source names exist (their keys are the secret; the names need
        // not be handed out either).
        st.anonymous.check(client)?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "the signature does not match the body",
        ));
    };
    let queue = known_queue(&st, &hook.queue)?;
    let bytes = read_body(&st, &headers, body).await?;
    let delivery = hook.delivery_header.as_ref().and_then(|h| {
        headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 150)
    });
    // The signature first (401), then what a signed delivery still lacks (400).
    let signed = match auth::verify_hook(hook, &headers, delivery, &bytes) {
        Ok(s) => s,
        Err(e) => {
            st.anonymous.check(client)?;
            return Err(e);
        }
    };
    if let (Some(h), None) = (&hook.delivery_header, delivery) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_delivery_id",
            format!("header {h} is required"),
        ));
    }
    let args = parse_json(&bytes)?;
    validate(&st, &queue, &args)?;
    // Duplicates are what is signed (the delivery id if signed, else timestamp and
    // body): a replay carries the same, whatever unsigned id it claims. In the hook's
    // own namespace, which no token's Idempotency-Key can reach.
    let principal = format!("hook:{source}");
    let opts = EnqueueOptions {
        idempotency_key: Some(namespaced(
            &principal,
            &hex::encode(Sha256::digest(&signed)),
        )),
        idempotency_ttl: Some(st.cfg.enqueue.idempotency_ttl),
        principal: Some(principal),
        ..Default::default()
    };
    let e = enqueue_single(&st, &queue, args, opts).await?;
    Ok(accepted(&queue, e))
}

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(
    State(st): State<Arc<Ingress>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    // It touches the database: an unauthenticated caller gets its budget, no more.
    st.anonymous.check(st.client(peer, &headers))?;
    bounded(&st, async {
        crate::db::run(&st.pool, crate::db::Deadline::Statement, async |c| {
            store::ping(c).await
        })
        .await
        .map_err(|e| ApiError::database(&e))
    })
    .await?;
    Ok(Json(json!({"status": "ready"})))
}

/// `/metrics` on the public port: 404 when metrics have a listener of their own.
pub(super) async fn public_metrics(st: State<Arc<Ingress>>) -> Response {
    if st.cfg.ingress.metrics_listen.is_some() {
        return not_found().await.into_response();
    }
    metrics(st).await
}

pub(super) async fn metrics(State(st): State<Arc<Ingress>>) -> Response {
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are not enabled",
        )
        .into_response(),
    }
}

pub(super) async fn openapi(State(st): State<Arc<Ingress>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.clone(),
    )
        .into_response()
}

/// The fallback's answer, for a path that matched a route's pattern but not its types.
pub(super) fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}
