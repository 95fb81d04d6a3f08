//! Retention: what the maintenance jobs delete.

use std::time::Duration;

use sqlx::PgExecutor;

use super::existing_queues;
use crate::db::{self, Deadline};
use crate::queue_name::QueueName;

/// Rows one retention statement deletes at most: each is its own short transaction, so
/// no statement nears the statement timeout however large the backlog, and a failure
/// keeps what earlier batches did.
pub const PRUNE_BATCH: i64 = 5_000;

/// Deletes archived messages older than `older_than` from every queue, and the
/// completion records of `delete` queues of the same age, in committed batches of at most
/// `batch` rows (each statement its own transaction on `pool`), oldest first, until none
/// is left. The cut-off is read once, so the pass ends even while jobs keep completing.
///
/// Before, one transaction deleted every queue's whole backlog: once that took longer
/// than the statement timeout it rolled back every time, and the backlog only grew.
/// Deleting old rows is idempotent, so a pass cut short by a crash is simply run again.
pub async fn prune_archives(
    pool: &sqlx::PgPool,
    older_than: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let (cutoff, queues) = db::run(pool, Deadline::Statement, async |c| {
        let cutoff: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
                .bind(older_than.as_secs_f64())
                .fetch_one(&mut *c)
                .await?;
        Ok::<_, sqlx::Error>((cutoff, existing_queues(c).await?))
    })
    .await?;
    let mut statements = Vec::new();
    for q in queues {
        let Ok(name) = QueueName::parse(&q) else {
            continue;
        };
        // The ids first (pgmq indexes archived_at), then deleted by primary key: an
        // `IN (subquery)` was planned as a hash join over the whole archive. The age is
        // checked again on the row deleted, and rows another pass holds are skipped.
        statements.push(format!(
            "DELETE FROM pgmq.a_{name} WHERE msg_id = ANY (ARRAY( \
               SELECT msg_id FROM pgmq.a_{name} WHERE archived_at < $1 \
                ORDER BY archived_at LIMIT $2 FOR UPDATE SKIP LOCKED)) \
               AND archived_at < $1"
        ));
    }
    // By row address: a completion's key is (queue, msg_id), and a completion refreshed
    // meanwhile (its done_at moved) is kept.
    statements.push(
        "DELETE FROM longshore.completions WHERE ctid = ANY (ARRAY( \
           SELECT ctid FROM longshore.completions WHERE done_at < $1 \
            ORDER BY done_at LIMIT $2 FOR UPDATE SKIP LOCKED)) \
           AND done_at < $1"
            .to_string(),
    );
    let mut n = 0;
    for sql in &statements {
        // Until a batch finds nothing: a short batch may only mean another pass holds
        // the rest.
        loop {
            let deleted = db::run(pool, Deadline::Statement, async |c| {
                sqlx::query(sql)
                    .bind(cutoff)
                    .bind(batch.max(1))
                    .execute(c)
                    .await
            })
            .await?
            .rows_affected();
            n += deleted;
            if deleted == 0 {
                break;
            }
        }
    }
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

/// Vacuums (and analyses) the queue tables carrying at least `min_dead` dead tuples,
/// the most bloated first; returns the tables vacuumed.
///
/// Every claim, heartbeat and acknowledgement leaves a dead tuple in its queue table
/// (none is a HOT update: `vt` is indexed), thousands a second on a busy queue.
/// Autovacuum reclaims them where it runs (queue tables get aggressive per-table
/// settings, see `create_queue`); on a server where it is off, or falls behind, this
/// scheduled task does. Where autovacuum keeps up it finds nothing to do: one read of
/// the statistics view.
///
/// Each `VACUUM` is its own statement, sent as a simple query: it cannot run inside a
/// transaction, and a simple query has no separate bind for a pooler to misroute.
pub async fn vacuum_queues(pool: &sqlx::PgPool, min_dead: i64) -> Result<Vec<String>, sqlx::Error> {
    let bloated: Vec<String> = db::run(pool, Deadline::Statement, async |c| {
        sqlx::query_scalar(
            "SELECT relname::text FROM pg_stat_user_tables \
              WHERE schemaname = 'pgmq' AND relname LIKE 'q\\_%' AND n_dead_tup >= $1 \
              ORDER BY n_dead_tup DESC",
        )
        .bind(min_dead)
        .fetch_all(c)
        .await
    })
    .await?;
    let mut done = Vec::with_capacity(bloated.len());
    for table in bloated {
        // Only names pgmq made (validated queue names after `q_`), quoted anyway.
        let Some(q) = table.strip_prefix("q_") else {
            continue;
        };
        if QueueName::parse(q).is_err() {
            continue;
        }
        sqlx::raw_sql(&format!("VACUUM (ANALYZE) pgmq.\"{table}\""))
            .execute(pool)
            .await?;
        done.push(q.to_string());
    }
    Ok(done)
}
