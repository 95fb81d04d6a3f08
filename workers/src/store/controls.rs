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
),
act AS (
    INSERT INTO longshore.operator_actions (actor, action, queue, detail)
    VALUES ($4, CASE WHEN $2 THEN 'pause' ELSE 'resume' END, $1,
            jsonb_build_object('reason', $3::text,
                               'was_paused', coalesce((SELECT paused FROM prev), false)))
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
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(listener::ENQUEUE)
            .bind(queue.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tracing::info!(
        queue = queue.as_str(),
        actor,
        paused,
        changed,
        reason,
        "queue control"
    );
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
