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
            r#"DELETE FROM pgmq.a_{name} WHERE msg_id = ANY (ARRAY(
               SELECT msg_id FROM pgmq.a_{name} WHERE archived_at < $1
                ORDER BY archived_at LIMIT $2 FOR UPDATE SKIP LOCKED))
               AND archived_at < $1"#
        ));
    }
    // By row address: a completion's key is (queue, msg_id), and a completion refreshed
    // meanwhile (its done_at moved) is kept.
    statements.push(
        r#"DELETE FROM longshore.completions WHERE ctid = ANY (ARRAY(
           SELECT ctid FROM longshore.completions WHERE done_at < $1
            ORDER BY done_at LIMIT $2 FOR UPDATE SKIP LOCKED))
           AND done_at < $1"#
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
    // Cancelled jobs are kept as long: one statement, both tables.
    Ok(sqlx::query_scalar::<_, i64>(
        r#"WITH d AS (DELETE FROM longshore.dead_letters
                      WHERE failed_at < now() - make_interval(secs => $1) RETURNING 1),
                c AS (DELETE FROM longshore.cancelled_jobs
                      WHERE cancelled_at < now() - make_interval(secs => $1) RETURNING 1)
           SELECT (SELECT count(*) FROM d) + (SELECT count(*) FROM c)"#,
    )
    .bind(older_than.as_secs_f64())
    .fetch_one(ex)
    .await? as u64)
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

/// Longest a `VACUUM` of one table may run (on a direct connection; through a pooler
/// the pooler's own query timeout applies): a table bloated enough to need this
/// fallback takes longer than the 30 s statement timeout, and a cancelled vacuum keeps
/// none of its work.
pub const VACUUM_BUDGET: Duration = Duration::from_secs(600);

/// What [`vacuum_queues`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Vacuumed {
    /// Tables vacuumed (`q_…` queue tables, `a_…` archives), most dead tuples first.
    pub vacuumed: Vec<String>,
    /// Tables whose vacuum failed, with the error (the others were still tried).
    pub failed: Vec<(String, String)>,
}

/// Vacuums (and analyses) the pgmq tables carrying at least `min_dead` dead tuples,
/// the most bloated first: queue tables, and archives (whose pruned rows are dead
/// tuples too, and whose space only a vacuum lets inserts reuse).
///
/// Every claim, heartbeat and acknowledgement leaves a dead tuple in its queue table
/// (none is a HOT update: `vt` is indexed), thousands a second on a busy queue.
/// Autovacuum reclaims them where it runs (queue tables get per-table settings, see
/// `create_queue`); on a server where it is off, or falls behind, this scheduled task
/// does. With autovacuum on and keeping up, it mostly finds nothing to do.
///
/// `SKIP_LOCKED`: a table another vacuum holds (autovacuum, or this task's previous run)
/// is skipped rather than waited for, so no handler connection queues behind it and no
/// autovacuum is cancelled for it. One failing table (a timeout, a queue dropped
/// meanwhile) does not stop the others. Runs on a connection of its own, closed after
/// (its session carries [`VACUUM_BUDGET`]); each `VACUUM` is a simple query (it cannot
/// run inside a transaction, and a simple query has no separate bind for a pooler to
/// misroute).
pub async fn vacuum_queues(pool: &sqlx::PgPool, min_dead: i64) -> Result<Vacuumed, sqlx::Error> {
    let bloated: Vec<(String, i64)> = db::run(pool, Deadline::Statement, async |c| {
        sqlx::query_as(
            r#"SELECT relname::text, n_dead_tup FROM pg_stat_user_tables
              WHERE schemaname = 'pgmq'
                AND (starts_with(relname, 'q_') OR starts_with(relname, 'a_'))
                AND n_dead_tup >= $1
              ORDER BY n_dead_tup DESC"#,
        )
        .bind(min_dead)
        .fetch_all(c)
        .await
    })
    .await?;
    let mut out = Vacuumed::default();
    if bloated.is_empty() {
        return Ok(out);
    }
    let mut conn = pool.acquire().await?;
    // Never back to the pool: its session's timeout is not the pool's.
    conn.close_on_drop();
    if !db::pooled() {
        simple(
            &mut conn,
            format!("SET statement_timeout = {}", VACUUM_BUDGET.as_millis()),
        )
        .await?;
    }
    for (table, _) in bloated {
        // Only tables of validated queue names, named from the parsed name.
        let Some(name) = table
            .strip_prefix("q_")
            .or_else(|| table.strip_prefix("a_"))
            .and_then(|q| QueueName::parse(q).ok())
        else {
            continue;
        };
        let kind = &table[..2];
        let r = simple(
            &mut conn,
            format!("VACUUM (ANALYZE, SKIP_LOCKED) pgmq.{kind}{name}"),
        )
        .await;
        match r {
            Ok(_) => out.vacuumed.push(table),
            Err(e) => {
                tracing::warn!(table, error = %e, "vacuum failed; the other tables are still vacuumed");
                out.failed.push((table, e.to_string()));
            }
        }
    }
    Ok(out)
}

/// One simple query on a connection. Boxed and non-generic over the executor, which
/// keeps handler futures `Send` (the generic form trips the compiler's higher-ranked
/// lifetime check, as `enqueue_on` notes).
fn simple(
    conn: &mut sqlx::PgConnection,
    sql: String,
) -> futures::future::BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        // A `&str` carries no arguments: sqlx sends it as a simple query.
        sqlx::Executor::execute(conn, sql.as_str()).await?;
        Ok(())
    })
}
