//! Operator controls: pausing and resuming queues, and the record of what operators did
//! (`longshore.operator_actions`, one row per action with who did it).
//!
//! A pause is read by the claim statement itself (see [`super::claim`]), so it holds
//! fleet-wide from each consumer's next claim, with nothing cached to go stale. A
//! resume notifies the queue's consumers as an enqueue does, so they claim at once.

use sqlx::PgConnection;

use crate::listener;
use crate::queue_name::QueueName;

/// A queue's pause, as the fleet reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueControl {
    /// The queue.
    pub queue: String,
    /// No worker claims from it (enqueues are still taken).
    pub paused: bool,
    /// Why, as the operator said.
    pub reason: Option<String>,
    /// Who paused or resumed it last.
    pub changed_by: String,
}

/// Pauses (`paused`) or resumes `queue` in the caller's transaction, recording `actor`
/// and the action; true when this changed its state (a second pause is recorded too,
/// and changes nothing). The resume's notification is sent when the transaction
/// commits.
pub async fn set_paused(
    tx: &mut PgConnection,
    queue: &QueueName,
    paused: bool,
    actor: &str,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let changed: bool = sqlx::query_scalar(
        r#"
WITH prev AS (
    SELECT paused FROM longshore.queue_controls WHERE queue = $1 FOR UPDATE
),
up AS (
    INSERT INTO longshore.queue_controls AS c (queue, paused, reason, changed_by)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (queue) DO UPDATE
       SET paused = excluded.paused, reason = excluded.reason,
           changed_by = excluded.changed_by, changed_at = now()
    RETURNING c.paused
)
SELECT coalesce((SELECT paused FROM prev), false) <> (SELECT paused FROM up)
"#,
    )
    .bind(queue.as_str())
    .bind(paused)
    .bind(reason)
    .bind(actor)
    .fetch_one(&mut *tx)
    .await?;
    if !paused {
        wake(tx, queue).await?;
    }
    let action = if paused { "pause" } else { "resume" };
    let detail = serde_json::json!({"reason": reason, "changed": changed});
    record(tx, actor, action, queue, detail).await?;
    Ok(changed)
}

/// Every queue with a control row, paused or not, by name.
pub async fn queue_controls(ex: &mut PgConnection) -> Result<Vec<QueueControl>, sqlx::Error> {
    let rows: Vec<(String, bool, Option<String>, String)> = sqlx::query_as(
        "SELECT queue, paused, reason, changed_by FROM longshore.queue_controls ORDER BY queue",
    )
    .fetch_all(ex)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(queue, paused, reason, changed_by)| QueueControl {
            queue,
            paused,
            reason,
            changed_by,
        })
        .collect())
}

/// What [`cancel_job`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cancel {
    /// It was waiting (visible, delayed or in backoff): it is out of the queue and
    /// recorded as cancelled; it never runs.
    Cancelled,
    /// A worker holds it (running): the request is in its `cancel_requested` header. The worker
    /// sees it at its next heartbeat (every third of the lease) and cancels the run: its
    /// `ctx.tx()` rolls back and it is recorded as cancelled. Should the run end first,
    /// a done outcome stands (the job is done), and any other puts the job back, where
    /// the next claim records it cancelled without running it.
    Requested,
    /// It had already ended: done, dead or cancelled.
    Final,
    /// No such job (never enqueued, or pruned).
    Unknown,
}

/// Cancels job `msg_id` of `sql`'s queue, recording `actor`; in the caller's
/// transaction. A waiting job is cancelled at once; a held one is asked to stop
/// ([`Cancel::Requested`]). Each write re-checks its row under its lock, so a claim or
/// a settle racing with it is seen: the job is then tried the other way (a few times).
pub async fn cancel_job(
    tx: &mut PgConnection,
    sql: &super::QueueSql,
    msg_id: i64,
    actor: &str,
) -> Result<Cancel, sqlx::Error> {
    let q = &sql.name;
    let mut outcome = Cancel::Unknown;
    for _ in 0..3 {
        outcome = cancel_once(tx, sql, msg_id, actor).await?;
        // Queued again between the two writes (a release, a retry): try again.
        if outcome != Cancel::Unknown || sql.status(&mut *tx, msg_id).await?.is_none() {
            break;
        }
    }
    record(
        tx,
        actor,
        "cancel",
        q,
        serde_json::json!({"id": msg_id, "outcome": outcome}),
    )
    .await?;
    Ok(outcome)
}

/// One try of [`cancel_job`]: `Unknown` also when the job is waiting again.
async fn cancel_once(
    tx: &mut PgConnection,
    sql: &super::QueueSql,
    msg_id: i64,
    actor: &str,
) -> Result<Cancel, sqlx::Error> {
    let q = &sql.name;
    // Not held: never claimed, or back in the queue (a retry, a release: their
    // `last_read_at` is cleared), or a lease that ran out with no outcome.
    let cancelled: Option<i64> = sqlx::query_scalar(&super::render(
        r#"
WITH gone AS (
    DELETE FROM {q}
     WHERE msg_id = $1 AND (last_read_at IS NULL OR vt <= clock_timestamp())
    RETURNING msg_id, read_ct, message, headers, enqueued_at
)
INSERT INTO longshore.cancelled_jobs (queue, msg_id, message, headers, attempts, enqueued_at, cancelled_by)
SELECT '{name}', msg_id, message, headers, longshore.attempts(read_ct, headers),
       enqueued_at, $2
  FROM gone
RETURNING msg_id
"#,
        q,
    ))
    .bind(msg_id)
    .bind(actor)
    .fetch_optional(&mut *tx)
    .await?;
    if cancelled.is_some() {
        return Ok(Cancel::Cancelled);
    }
    // Held now: ask its worker to stop.
    let requested: Option<i64> = sqlx::query_scalar(&super::render(
        r#"
UPDATE {q}
   SET headers = longshore.headers(headers)
                 || jsonb_build_object('cancel_requested', jsonb_build_object('by', $2::text, 'at', now()))
 WHERE msg_id = $1 AND last_read_at IS NOT NULL AND vt > clock_timestamp()
RETURNING msg_id
"#,
        q,
    ))
    .bind(msg_id)
    .bind(actor)
    .fetch_optional(&mut *tx)
    .await?;
    if requested.is_some() {
        return Ok(Cancel::Requested);
    }
    Ok(match sql.status(&mut *tx, msg_id).await? {
        Some(s) if s.state.is_final() => Cancel::Final,
        // None, or waiting again: the caller decides.
        _ => Cancel::Unknown,
    })
}

/// What [`retry_now`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryNow {
    /// It was delayed or waiting in backoff: it is visible now.
    Visible,
    /// It was visible already, held by a worker, or not in the queue (ended or unknown).
    Unchanged,
}

/// Makes job `msg_id` visible now if it waits for later (a delayed job, a retry in
/// backoff) and no worker holds it; notifies the queue's workers. In the caller's
/// transaction.
pub async fn retry_now(
    tx: &mut PgConnection,
    sql: &super::QueueSql,
    msg_id: i64,
    actor: &str,
) -> Result<RetryNow, sqlx::Error> {
    let q = &sql.name;
    let n = sqlx::query(&super::render(
        "UPDATE {q} SET vt = clock_timestamp() WHERE msg_id = $1 AND last_read_at IS NULL AND vt > clock_timestamp()",
        q,
    ))
    .bind(msg_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let outcome = if n == 1 {
        wake(tx, q).await?;
        RetryNow::Visible
    } else {
        RetryNow::Unchanged
    };
    record(
        tx,
        actor,
        "retry_now",
        q,
        serde_json::json!({"id": msg_id, "outcome": outcome}),
    )
    .await?;
    Ok(outcome)
}

/// Wakes the queue's idle workers as an enqueue does (sent when the transaction commits).
pub(super) async fn wake(tx: &mut PgConnection, queue: &QueueName) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(listener::ENQUEUE)
        .bind(queue.as_str())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// One row of `longshore.operator_actions`, and the same in the log.
pub(super) async fn record(
    tx: &mut PgConnection,
    actor: &str,
    action: &str,
    queue: &QueueName,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    tracing::info!(actor, action, queue = queue.as_str(), %detail, "operator action");
    sqlx::query(
        "INSERT INTO longshore.operator_actions (actor, action, queue, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(queue.as_str())
    .bind(detail)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
