//! Schedule fires: one row per `(schedule, fire_at)`, written with its enqueue.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

use super::{NewMessage, QueueSql};

/// Records a scheduled fire and enqueues its job in one transaction. Returns the job id,
/// or `None` when another scheduler already fired this `(schedule, fire_at)`.
pub async fn fire_schedule(
    tx: &mut sqlx::PgConnection,
    queue: &QueueSql,
    schedule: &str,
    fire_at: DateTime<Utc>,
    args: &Value,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))")
        .bind(schedule)
        .bind(crate::locks::SCHEDULE_FIRE_SEED)
        .execute(&mut *tx)
        .await?;
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM longshore.schedule_fires WHERE schedule = $1 AND fire_at = $2)",
    )
    .bind(schedule)
    .bind(fire_at)
    .fetch_one(&mut *tx)
    .await?;
    if taken {
        return Ok(None);
    }
    let headers = serde_json::json!({"schedule": schedule, "fire_at": fire_at.to_rfc3339()});
    let id = queue
        .insert(
            &mut *tx,
            &[NewMessage {
                body: args.clone(),
                headers,
                visible_at: None,
            }],
        )
        .await?[0];
    sqlx::query(
        "INSERT INTO longshore.schedule_fires (schedule, fire_at, msg_id) VALUES ($1, $2, $3)",
    )
    .bind(schedule)
    .bind(fire_at)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    Ok(Some(id))
}

/// The latest recorded fire of a schedule.
pub async fn last_fire(
    ex: impl PgExecutor<'_>,
    schedule: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(fire_at) FROM longshore.schedule_fires WHERE schedule = $1")
        .bind(schedule)
        .fetch_one(ex)
        .await
}
