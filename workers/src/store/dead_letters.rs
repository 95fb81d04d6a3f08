//! Dead letters: listed, re-sent and purged by operators (`longshore dlq`).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

use super::{NewMessage, QueueSql};
use crate::queue_name::QueueName;

/// A dead letter as listed by operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The dead letter's own id (what `dlq retry` and `dlq purge` take).
    pub id: i64,
    /// The queue the job died in.
    pub queue: String,
    /// The job's id while it was queued.
    pub msg_id: i64,
    /// The job's args as enqueued (`null` if they could not be kept).
    pub message: Value,
    /// Its headers at death.
    pub headers: Value,
    /// Attempts it spent.
    pub attempts: i32,
    /// Why it died.
    pub last_error: String,
    /// When it was first enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

/// The dead letters of `queue` with the given `ids` (all when empty), oldest first, at
/// most `limit`.
pub async fn dead_letters(
    ex: impl PgExecutor<'_>,
    queue: &QueueName,
    ids: &[i64],
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        r#"
SELECT id, queue, msg_id, coalesce(message, 'null'::jsonb), coalesce(headers, '{}'::jsonb),
       attempts, last_error, enqueued_at, failed_at
  FROM longshore.dead_letters
 WHERE queue = $1 AND (cardinality($2::bigint[]) = 0 OR id = ANY($2))
 ORDER BY id
 LIMIT $3
"#,
    )
    .bind(queue.as_str())
    .bind(ids)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DeadLetter {
                id: r.try_get(0)?,
                queue: r.try_get(1)?,
                msg_id: r.try_get(2)?,
                message: r.try_get(3)?,
                headers: r.try_get(4)?,
                attempts: r.try_get(5)?,
                last_error: r.try_get(6)?,
                enqueued_at: r.try_get(7)?,
                failed_at: r.try_get(8)?,
            })
        })
        .collect()
}

/// Which dead letters to re-send.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// These dead-letter ids.
    Ids(&'a [i64]),
    /// The oldest `limit` of the queue's dead letters with an id up to `up_to` (taken
    /// when the operator asked, so jobs that die again meanwhile are not re-sent in the
    /// same run).
    Oldest {
        /// The newest dead-letter id to consider.
        up_to: i64,
        /// Most to re-send.
        limit: i64,
    },
}

/// Re-sends dead letters to their queue as fresh jobs (attempts start over), removes
/// them from the dead letters and moves their idempotency keys to the new jobs (so a
/// repeated enqueue with the key finds the job that is running now, not the dead one),
/// all in the caller's transaction. Returns (dead letter id, new msg id).
pub async fn retry_dead_letters(
    tx: &mut sqlx::PgConnection,
    queue: &QueueSql,
    which: Selection<'_>,
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let (ids, up_to, limit): (&[i64], i64, i64) = match which {
        Selection::Ids(ids) => (ids, i64::MAX, i64::MAX),
        Selection::Oldest { up_to, limit } => (&[], up_to, limit),
    };
    let rows = sqlx::query(
        r#"
DELETE FROM longshore.dead_letters d
 WHERE d.id IN (SELECT id FROM longshore.dead_letters
                 WHERE queue = $1
                   AND (cardinality($2::bigint[]) = 0 OR id = ANY($2))
                   AND id <= $3
                 ORDER BY id
                 LIMIT $4
                   FOR UPDATE SKIP LOCKED)
RETURNING d.id, d.msg_id, coalesce(d.message, 'null'::jsonb),
          nullif(longshore.headers(d.headers) - 'last_error' - 'errors' - 'free_reads' - 'run_at' - 'deaths'
                 - 'cancel_requested',
                 '{}'::jsonb)
"#,
    )
    .bind(queue.name.as_str())
    .bind(ids)
    .bind(up_to)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut dl_ids = Vec::with_capacity(rows.len());
    let mut old_ids = Vec::with_capacity(rows.len());
    let mut msgs = Vec::with_capacity(rows.len());
    for r in rows {
        dl_ids.push(r.try_get::<i64, _>(0)?);
        old_ids.push(r.try_get::<i64, _>(1)?);
        msgs.push(NewMessage {
            body: r.try_get(2)?,
            headers: r.try_get::<Option<Value>, _>(3)?.unwrap_or(Value::Null),
            visible_at: None,
        });
    }
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let new_ids = queue.insert(&mut *tx, &msgs).await?;
    sqlx::query(
        r#"
WITH moved AS (SELECT * FROM unnest($2::bigint[], $3::bigint[]) AS n(old, new))
UPDATE longshore.idempotency_keys k
   SET msg_id  = coalesce((SELECT new FROM moved WHERE old = k.msg_id), k.msg_id),
       msg_ids = CASE WHEN k.msg_ids IS NULL THEN NULL ELSE
                   (SELECT array_agg(coalesce(moved.new, u.id) ORDER BY u.ord)
                      FROM unnest(k.msg_ids) WITH ORDINALITY AS u(id, ord)
                      LEFT JOIN moved ON moved.old = u.id) END
 WHERE k.queue = $1
   AND (k.msg_id = ANY($2) OR (k.msg_ids IS NOT NULL AND k.msg_ids && $2))
"#,
    )
    .bind(queue.name.as_str())
    .bind(&old_ids)
    .bind(&new_ids)
    .execute(&mut *tx)
    .await?;
    Ok(dl_ids.into_iter().zip(new_ids).collect())
}

/// Deletes the dead letters of `queue` with the given `ids` (all when empty); returns
/// how many went.
pub async fn purge_dead_letters(
    ex: impl PgExecutor<'_>,
    queue: &QueueName,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM longshore.dead_letters WHERE queue = $1 AND (cardinality($2::bigint[]) = 0 OR id = ANY($2))",
    )
    .bind(queue.as_str())
    .bind(ids)
    .execute(ex)
    .await?;
    Ok(r.rows_affected())
}

/// An operator's retry (re-send) or purge of the dead letters `ids` of `sql`'s queue,
/// recorded under `actor`, in the caller's transaction. Returns what it did:
/// `{"action", "affected", "resent": [[dead letter id, new job id], …]}`.
pub async fn dead_letter_action(
    tx: &mut sqlx::PgConnection,
    sql: &QueueSql,
    ids: &[i64],
    retry: bool,
    actor: &str,
) -> Result<Value, sqlx::Error> {
    // An empty selection is nothing (the functions below read it as "all").
    if ids.is_empty() {
        return Ok(
            serde_json::json!({"queue": sql.name.as_str(), "affected": 0, "resent": [], "by": actor}),
        );
    }
    let (action, affected, resent) = if retry {
        let moved = retry_dead_letters(&mut *tx, sql, Selection::Ids(ids)).await?;
        ("dlq_retry", moved.len() as u64, moved)
    } else {
        let n = purge_dead_letters(&mut *tx, &sql.name, ids).await?;
        ("dlq_purge", n, Vec::new())
    };
    let detail = serde_json::json!({"ids": ids, "affected": affected, "resent": resent});
    super::controls::record(tx, actor, action, &sql.name, detail.clone()).await?;
    Ok(
        serde_json::json!({"queue": sql.name.as_str(), "action": action, "affected": affected, "resent": resent, "by": actor}),
    )
}
