//! `/v1/admin/`: the operator controls over HTTP, for tokens with the `admin:read`
//! scope (what is there) or `admin:write` (the actions; it reads too). The same store
//! functions as the CLI's `longshore queue` and `longshore job`; every action is
//! recorded in `longshore.operator_actions` under `token:<name>`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::auth::Token;
use super::routes::{ApiResult, bounded, caller, known_queue};
use super::{ApiError, CallerSlot, Ingress, Peer};
use crate::db::{self, Deadline};
use crate::queue_name::QueueName;
use crate::store::{self, Cancel};

/// Reads everything under `/v1/admin/`.
pub const READ: &str = "admin:read";
/// Acts: pause, resume, cancel, retry (and reads).
pub const WRITE: &str = "admin:write";

fn reader(t: &Token) -> ApiResult<()> {
    if t.has(WRITE) {
        return Ok(());
    }
    t.require(READ)
}

fn unknown_job(queue: &QueueName, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_job",
        format!("no job {id:?} in queue {queue}"),
    )
}

/// `GET /v1/admin/queues`: every queue's figures as the gauges have them (sampled once
/// per `metrics.sample_interval` for the fleet, so this costs a small read however big
/// the queues are), with the pause read live.
pub(super) async fn queues(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let rows = bounded(&st, async {
        db::run(&st.pool, Deadline::Statement, async |c| {
            crate::telemetry::read_samples(c).await
        })
        .await
        .map_err(|e| ApiError::database(&e))
    })
    .await?;
    let queues: Vec<Value> = rows
        .into_iter()
        .map(|(s, age)| {
            json!({
                "queue": s.queue, "visible": s.visible, "in_flight": s.in_flight,
                "delayed": s.delayed, "oldest_age_seconds": s.oldest_age_seconds,
                "dead_letters": s.dead_letters, "paused": s.paused, "sample_age_seconds": age,
            })
        })
        .collect();
    Ok(Json(json!({ "queues": queues })))
}

/// `POST /v1/admin/queues/{queue}/pause` (an optional `{"reason": "…"}` body) and
/// `…/resume`.
pub(super) async fn pause(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    set_paused(st, slot, peer, path, headers, body, true).await
}

/// See [`pause`].
pub(super) async fn resume(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    set_paused(st, slot, peer, path, headers, body, false).await
}

async fn set_paused(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    paused: bool,
) -> ApiResult<Json<Value>> {
    let token = caller(&st, &headers, &slot, peer)?;
    token.require(WRITE)?;
    let Ok(Path(raw)) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let bytes = super::routes::read_body(&st, &headers, body).await?;
    let reason: Option<String> = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not JSON: {e}"),
            )
        })?;
        if !v.is_object() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is a JSON object, {\"reason\": \"…\"}, or empty",
            ));
        }
        match v.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(crate::clean::error_text(s)),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "reason must be a string",
                ));
            }
        }
    };
    let actor = token.principal.clone();
    let changed = bounded(&st, async {
        let mut tx = db::begin(&st.pool, Deadline::Statement)
            .await
            .map_err(|e| ApiError::database(&e))?;
        let changed = store::set_paused(&mut tx, &queue, paused, &actor, reason.as_deref())
            .await
            .map_err(|e| ApiError::database(&e))?;
        tx.commit().await.map_err(|e| ApiError::database(&e))?;
        Ok(changed)
    })
    .await?;
    Ok(Json(
        json!({"queue": queue.as_str(), "paused": paused, "changed": changed, "by": actor}),
    ))
}

/// `POST /v1/admin/jobs/{queue}/{id}/cancel`: a waiting job is cancelled at once, a
/// running one at its worker's next heartbeat (`outcome`: cancelled, requested, or
/// final when it had ended).
pub(super) async fn cancel(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    job_action(st, slot, peer, path, headers, true).await
}

/// `POST /v1/admin/jobs/{queue}/{id}/retry`: a delayed job, or one in backoff, is
/// visible now (`outcome`: visible, or unchanged).
pub(super) async fn retry(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    job_action(st, slot, peer, path, headers, false).await
}

async fn job_action(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    cancel: bool,
) -> ApiResult<Json<Value>> {
    let token = caller(&st, &headers, &slot, peer)?;
    token.require(WRITE)?;
    let Ok(Path((raw, id))) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let Ok(msg_id) = id.parse::<i64>() else {
        return Err(unknown_job(&queue, &id));
    };
    let sql = crate::enqueue::queue_sql(&queue);
    let actor = token.principal.clone();
    let outcome = bounded(&st, async {
        let mut tx = db::begin(&st.pool, Deadline::Statement)
            .await
            .map_err(|e| ApiError::database(&e))?;
        // An unknown job is recorded too (committed), then answered 404.
        let outcome = if cancel {
            match store::cancel_job(&mut tx, &sql, msg_id, &actor).await {
                Ok(Cancel::Unknown) => None,
                Ok(c) => Some(serde_json::to_value(c).expect("an enum")),
                Err(e) => return Err(ApiError::database(&e)),
            }
        } else {
            if sql
                .status(&mut *tx, msg_id)
                .await
                .map_err(|e| ApiError::database(&e))?
                .is_none()
            {
                return Err(unknown_job(&queue, &id));
            }
            let r = store::retry_now(&mut tx, &sql, msg_id, &actor)
                .await
                .map_err(|e| ApiError::database(&e))?;
            Some(serde_json::to_value(r).expect("an enum"))
        };
        tx.commit().await.map_err(|e| ApiError::database(&e))?;
        outcome.ok_or_else(|| unknown_job(&queue, &id))
    })
    .await?;
    Ok(Json(
        json!({"queue": queue.as_str(), "id": msg_id, "outcome": outcome, "by": actor}),
    ))
}
