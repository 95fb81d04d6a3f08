//! Retention: what the maintenance jobs delete.

use std::time::Duration;

use sqlx::PgExecutor;

use super::existing_queues;
use crate::queue_name::QueueName;

/// Deletes archived messages older than `older_than` from every queue, and the
/// completion records of `delete` queues of the same age.
pub async fn prune_archives(
    ex: &mut sqlx::PgConnection,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let mut n = 0;
    for q in existing_queues(&mut *ex).await? {
        let Ok(name) = QueueName::parse(&q) else {
            continue;
        };
        n += sqlx::query(&format!(
            "DELETE FROM pgmq.a_{name} WHERE archived_at < now() - make_interval(secs => $1)"
        ))
        .bind(older_than.as_secs_f64())
        .execute(&mut *ex)
        .await?
        .rows_affected();
    }
    n += sqlx::query(
        "DELETE FROM longshore.completions WHERE done_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.as_secs_f64())
    .execute(&mut *ex)
    .await?
    .rows_affected();
    Ok(n)
}

/// Deletes dead letters older than `older_than`.
pub async fn prune_dead_letters(
    ex: impl PgExecutor<'_>,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM longshore.dead_letters WHERE failed_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.as_secs_f64())
    .execute(ex)
    .await?
    .rows_affected())
}

/// Deletes expired idempotency keys.
pub async fn expire_idempotency_keys(ex: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM longshore.idempotency_keys WHERE expires_at <= now()")
            .execute(ex)
            .await?
            .rows_affected(),
    )
}

/// Deletes fire rows older than `older_than`, keeping each schedule's latest (the
/// scheduler reads it to find missed fires).
pub async fn prune_schedule_fires(
    ex: impl PgExecutor<'_>,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        r#"
DELETE FROM longshore.schedule_fires f
 WHERE fire_at < now() - make_interval(secs => $1)
   AND fire_at < (SELECT max(fire_at) FROM longshore.schedule_fires l WHERE l.schedule = f.schedule)
"#,
    )
    .bind(older_than.as_secs_f64())
    .execute(ex)
    .await?
    .rows_affected())
}
