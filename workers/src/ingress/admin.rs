//! `/v1/admin/`: the operator controls over HTTP, for tokens with the `admin:read`
//! scope (what is there) or `admin:write` (the actions; it reads too). The same store
//! functions as the CLI's `longshore queue` and `longshore job`; every action is
//! recorded in `longshore.operator_actions` under `token:<name>`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::auth::Token;
use super::routes::{ApiResult, bounded, caller, known_queue};
use super::{ApiError, CallerSlot, Ingress, Peer};
use crate::db::{self, Deadline};
use crate::queue_name::QueueName;
use crate::registry::{AdminView, ViewParams, ViewSection};
use crate::store::browse::{self, JobQuery, ListState};
use crate::store::{self, BulkAction, BulkFilter, BulkState, Cancel};

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

/// Runs statements on a pooled session within the ingress's database deadline.
pub(crate) async fn read_db<T>(
    st: &Ingress,
    f: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
) -> ApiResult<T> {
    bounded(st, async {
        db::run(&st.pool, Deadline::Statement, f)
            .await
            .map_err(|e| ApiError::database(&e))
    })
    .await
}

/// Runs `f` in a transaction within the ingress's database deadline; commits if it
/// succeeds.
pub(crate) async fn write_db<T>(
    st: &Ingress,
    f: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
) -> ApiResult<T> {
    bounded(st, async {
        let mut tx = db::begin(&st.pool, Deadline::Statement)
            .await
            .map_err(|e| ApiError::database(&e))?;
        let out = f(&mut tx).await.map_err(|e| ApiError::database(&e))?;
        tx.commit().await.map_err(|e| ApiError::database(&e))?;
        Ok(out)
    })
    .await
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg)
}

/// The query string as a map; anything but the `known` keys is refused (a misspelt
/// filter must not silently list everything).
fn params(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    known: &[&str],
) -> ApiResult<HashMap<String, String>> {
    let Ok(Query(m)) = q else {
        return Err(bad_request("the query string is not valid"));
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad_request(format!(
            "unknown query parameter {k:?}; known: {}",
            known.join(", ")
        )));
    }
    Ok(m)
}

fn int_param(m: &HashMap<String, String>, key: &str) -> ApiResult<Option<i64>> {
    m.get(key)
        .filter(|v| !v.is_empty())
        .map(|v| match v.parse::<i64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad_request(format!("{key} must be a positive integer"))),
        })
        .transpose()
}

/// What `GET /v1/admin/queues/{queue}/jobs` takes.
pub(crate) struct ListArgs {
    pub query: JobQuery,
}

pub(crate) fn list_args(m: &HashMap<String, String>) -> ApiResult<ListArgs> {
    let state = match m.get("state").map(String::as_str) {
        None | Some("") => ListState::Visible,
        Some(s) => ListState::parse(s).ok_or_else(|| {
            bad_request(format!(
                "state {s:?}: one of {}",
                ListState::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?,
    };
    let contains = match m.get("contains").filter(|v| !v.trim().is_empty()) {
        None => None,
        Some(raw) => {
            let v: Value = serde_json::from_str(raw).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("contains is not JSON: {e}"),
                )
            })?;
            if browse::searches_secret(&v) {
                return Err(bad_request(
                    "contains may not name a redacted field (it would test guesses at its value)",
                ));
            }
            Some(v)
        }
    };
    Ok(ListArgs {
        query: JobQuery {
            state,
            before: int_param(m, "before")?,
            limit: int_param(m, "limit")?.unwrap_or(50),
            id: int_param(m, "id")?,
            contains,
        },
    })
}

/// `GET /v1/admin/queues/{queue}/jobs?state=&before=&limit=&id=&contains=`: a page of
/// the queue's jobs in a state, newest first (see [`store::browse::list_jobs`]).
pub(super) async fn jobs(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let Ok(Path(raw)) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let m = params(q, &["state", "before", "limit", "id", "contains"])?;
    let args = list_args(&m)?;
    let sql = crate::enqueue::queue_sql(&queue);
    let page = read_db(&st, async |c| browse::list_jobs(c, &sql, &args.query).await).await?;
    Ok(Json(serde_json::to_value(page).expect("serializable")))
}

/// `GET /v1/admin/jobs/{queue}/{id}`: one job wherever it is, args and headers
/// redacted, with what operators did to it.
pub(super) async fn job(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let Ok(Path((raw, id))) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let Ok(msg_id) = id.parse::<i64>() else {
        return Err(unknown_job(&queue, &id));
    };
    let sql = crate::enqueue::queue_sql(&queue);
    match read_db(&st, async |c| browse::job_detail(c, &sql, msg_id).await).await? {
        Some(d) => Ok(Json(serde_json::to_value(d).expect("serializable"))),
        None => Err(unknown_job(&queue, &id)),
    }
}

/// `GET /v1/admin/dead_letters?queue=&error=&before=&limit=`: dead letters newest
/// first, of one queue or all.
pub(super) async fn dead_letters(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let m = params(q, &["queue", "error", "before", "limit"])?;
    let queue = match m.get("queue").filter(|v| !v.is_empty()) {
        Some(raw) => Some(known_queue(&st, raw)?),
        None => None,
    };
    let error = m.get("error").filter(|v| !v.is_empty()).cloned();
    let before = int_param(&m, "before")?;
    let limit = int_param(&m, "limit")?.unwrap_or(50);
    let page = read_db(&st, async |c| {
        browse::dead_letter_page(
            c,
            queue.as_ref().map(QueueName::as_str),
            error.as_deref(),
            before,
            limit,
        )
        .await
    })
    .await?;
    Ok(Json(serde_json::to_value(page).expect("serializable")))
}

/// `POST /v1/admin/dead_letters/{queue}/retry` with `{"ids": [dead-letter ids]}`.
pub(super) async fn dlq_retry(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    dead_letters_action(st, slot, peer, path, headers, body, true).await
}

/// `POST /v1/admin/dead_letters/{queue}/purge` with `{"ids": [dead-letter ids]}`.
pub(super) async fn dlq_purge(
    st: State<Arc<Ingress>>,
    slot: Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    dead_letters_action(st, slot, peer, path, headers, body, false).await
}

async fn dead_letters_action(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    retry: bool,
) -> ApiResult<Json<Value>> {
    let token = caller(&st, &headers, &slot, peer)?;
    token.require(WRITE)?;
    let Ok(Path(raw)) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let v = json_body(&st, &headers, body).await?;
    let ids: Vec<i64> = match v.get("ids").map(|i| serde_json::from_value(i.clone())) {
        Some(Ok(ids)) => ids,
        _ => return Err(bad_request("the body is {\"ids\": [dead-letter ids]}")),
    };
    if ids.is_empty() || ids.len() > 1000 {
        return Err(bad_request("ids: 1 to 1000 dead-letter ids"));
    }
    let out = act_on_dead_letters(&st, &queue, &ids, retry, &token.principal).await?;
    Ok(Json(out))
}

/// Retries (re-sends) or purges the given dead letters of `queue`, recorded under
/// `actor`; the console shares it.
pub(crate) async fn act_on_dead_letters(
    st: &Ingress,
    queue: &QueueName,
    ids: &[i64],
    retry: bool,
    actor: &str,
) -> ApiResult<Value> {
    let sql = crate::enqueue::queue_sql(queue);
    write_db(st, async |tx| {
        store::dead_letter_action(tx, &sql, ids, retry, actor).await
    })
    .await
}

async fn json_body(st: &Ingress, headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    let bytes = super::routes::read_body(st, headers, body).await?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(bad_request("the body is a JSON object"));
    }
    Ok(v)
}

/// Most jobs one bulk request acts on; the answer says where to go on.
pub(crate) const BULK_PER_REQUEST: i64 = 5_000;

/// One request's share of a bulk action: batches of 1,000 up to [`BULK_PER_REQUEST`].
pub(crate) async fn bulk_step(
    st: &Ingress,
    queue: &QueueName,
    filter: &BulkFilter,
    action: BulkAction,
    after: i64,
    up_to: Option<i64>,
    actor: &str,
) -> ApiResult<Value> {
    filter
        .check(action)
        .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bulk_not_applicable", m))?;
    let sql = crate::enqueue::queue_sql(queue);
    // Never past the newest id there is (a client's up_to cannot reach jobs that
    // arrive while the action goes on).
    let bound = read_db(st, async |c| store::bulk_bound(c, &sql, filter.state).await).await?;
    let up_to = up_to.map_or(bound, |u| u.min(bound));
    // Each batch within the database deadline on its own: a slow batch answers 503,
    // and the batches before it stand (committed, recorded; they match no more).
    let (mut after, mut affected, mut done) = (after, 0_u64, false);
    while (affected as i64) < BULK_PER_REQUEST {
        let b = write_db(st, async |tx| {
            store::bulk_batch(tx, &sql, filter, action, after, up_to, 1000, actor).await
        })
        .await?;
        affected += b.affected;
        match b.next_after {
            Some(n) => after = n,
            None => {
                done = true;
                break;
            }
        }
    }
    // Rows a worker held at the instant a batch passed were skipped: say how many still
    // match (counted up to 10,000), so the operator can run it again.
    // Best effort: a count that does not answer in time is left out, never a 503 after
    // the work is done.
    let remaining = if done {
        read_db(st, async |c| {
            store::bulk_count(c, &sql, filter, up_to, 10_000).await
        })
        .await
        .ok()
    } else {
        None
    };
    Ok(json!({
        "queue": queue.as_str(), "action": action, "filter": filter, "affected": affected,
        "done": done, "after": after, "up_to": up_to, "still_matching": remaining, "by": actor,
    }))
}

/// `POST /v1/admin/queues/{queue}/bulk` with `{"action": "retry"|"purge"|"cancel",
/// "state": "dead"|"visible"|"delayed"|"retrying", "error"?, "older_than"? ("2h"),
/// "after"?, "up_to"?}`: acts on up to 5,000 matching jobs per request in batches of
/// 1,000; while `done` is false, send the same body with the answer's `after` and
/// `up_to` to go on.
pub(super) async fn bulk(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let token = caller(&st, &headers, &slot, peer)?;
    token.require(WRITE)?;
    let Ok(Path(raw)) = path else {
        return Err(super::routes::no_route());
    };
    let queue = known_queue(&st, &raw)?;
    let v = json_body(&st, &headers, body).await?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let action = match s("action") {
        Some("retry") => BulkAction::Retry,
        Some("purge") => BulkAction::Purge,
        Some("cancel") => BulkAction::Cancel,
        _ => return Err(bad_request("action: one of retry, purge, cancel")),
    };
    let Some(state) = s("state").and_then(BulkState::parse) else {
        return Err(bad_request(
            "state: one of dead, visible, delayed, retrying",
        ));
    };
    let older_than = match s("older_than") {
        None => None,
        Some(d) => Some(
            humantime::parse_duration(d)
                .map_err(|e| bad_request(format!("older_than {d:?}: {e}")))?,
        ),
    };
    let int = |k: &str| match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| bad_request(format!("{k} must be an integer"))),
    };
    let filter = BulkFilter {
        state,
        error: s("error").map(crate::clean::error_text),
        older_than,
    };
    let out = bulk_step(
        &st,
        &queue,
        &filter,
        action,
        int("after")?.unwrap_or(0),
        int("up_to")?,
        &token.principal,
    )
    .await?;
    Ok(Json(out))
}

/// The configured schedules with their next fire and last fires.
pub(crate) async fn schedules_value(st: &Ingress) -> ApiResult<Value> {
    let now = chrono::Utc::now();
    let mut list = Vec::new();
    for c in &st.cfg.schedules {
        let Ok(s) = crate::scheduler::Schedule::compile(c, &st.registry) else {
            continue;
        };
        let sql = crate::enqueue::queue_sql(s.queue());
        let fires = read_db(st, async |conn| {
            browse::last_fires(conn, &sql, &s.name, 5).await
        })
        .await?;
        list.push(json!({
            "name": s.name, "queue": s.queue().as_str(), "cron": s.describe(),
            "next_fire": s.next_after(now), "last_fires": fires,
        }));
    }
    Ok(json!({ "schedules": list }))
}

/// `GET /v1/admin/schedules`: every schedule, its next fire and its last five fires
/// with their job's state.
pub(super) async fn schedules(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    Ok(Json(schedules_value(&st).await?))
}

/// The registered queues whose tables exist (a kind added to the build before
/// `longshore migrate` ran must not fail the pages that read every queue).
pub(crate) async fn migrated_queues(st: &Ingress) -> ApiResult<Vec<QueueName>> {
    let have: Vec<String> = read_db(st, async |c| {
        sqlx::query_scalar("SELECT queue_name::text FROM pgmq.meta")
            .fetch_all(c)
            .await
    })
    .await?;
    Ok(st
        .registry
        .kinds()
        .filter(|k| have.iter().any(|h| h == k))
        .filter_map(|k| QueueName::parse(k).ok())
        .collect())
}

/// Recent errors: dead letters and retrying jobs of every queue.
pub(crate) async fn errors_value(st: &Ingress, limit: i64) -> ApiResult<Value> {
    let queues: Vec<_> = migrated_queues(st)
        .await?
        .iter()
        .map(crate::enqueue::queue_sql)
        .collect();
    let errs = read_db(st, async |c| browse::recent_errors(c, &queues, limit).await).await?;
    // The pipelines' failures (failed LLM attempts), over the last day.
    let mut pipelines = Vec::new();
    for v in st.registry.admin_views().iter().filter(|v| v.errors) {
        let (v, sections) = view_value(st, v.name, None).await?;
        pipelines.push(json!({"name": v.name, "title": v.title, "sections": sections}));
    }
    Ok(json!({ "errors": errs, "pipelines": pipelines }))
}

/// `GET /v1/admin/errors?limit=`: the newest dead letters of every queue, the jobs
/// retrying after an error, and the pipelines' own failures of the last day (failed
/// LLM attempts) as tables.
pub(super) async fn errors(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let m = params(q, &["limit"])?;
    let limit = int_param(&m, "limit")?.unwrap_or(50);
    Ok(Json(errors_value(&st, limit).await?))
}

/// `GET /v1/admin/views`: the pipelines' pages (name, title).
pub(super) async fn views(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let list: Vec<Value> = st
        .registry
        .admin_views()
        .iter()
        .map(|v| json!({"name": v.name, "title": v.title, "errors": v.errors}))
        .collect();
    Ok(Json(json!({ "views": list })))
}

/// The longest `?window=` of a view.
const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(31 * 86_400);

/// Reads a pipeline's view over `window`.
pub(crate) async fn view_value(
    st: &Ingress,
    name: &str,
    window: Option<&str>,
) -> ApiResult<(AdminView, Vec<ViewSection>)> {
    let Some(view) = st
        .registry
        .admin_views()
        .iter()
        .find(|v| v.name == name)
        .copied()
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_view",
            format!("no admin view {name:?}"),
        ));
    };
    let window = match window.filter(|w| !w.is_empty()) {
        None => std::time::Duration::from_secs(86_400),
        Some(w) => {
            humantime::parse_duration(w).map_err(|e| bad_request(format!("window {w:?}: {e}")))?
        }
    };
    // The views read windows over indexes; a window of years would read the ledgers.
    if window > MAX_WINDOW {
        return Err(bad_request("window: at most 31d"));
    }
    let mut sections = read_db(st, async |c| (view.read)(c, ViewParams { window }).await).await?;
    // A pipeline's tables are shown redacted too (an error text with a key in it).
    for sec in &mut sections {
        for row in &mut sec.rows {
            for cell in row.iter_mut() {
                *cell = browse::redact(cell);
            }
        }
    }
    Ok((view, sections))
}

/// `GET /v1/admin/views/{name}?window=24h`: a pipeline's tables (chat credits,
/// billing).
pub(super) async fn view(
    State(st): State<Arc<Ingress>>,
    Extension(slot): Extension<CallerSlot>,
    peer: Option<Extension<Peer>>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    reader(caller(&st, &headers, &slot, peer)?)?;
    let Ok(Path(name)) = path else {
        return Err(super::routes::no_route());
    };
    let m = params(q, &["window"])?;
    let (v, sections) = view_value(&st, &name, m.get("window").map(String::as_str)).await?;
    Ok(Json(
        json!({"name": v.name, "title": v.title, "sections": sections}),
    ))
}
