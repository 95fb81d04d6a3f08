//! Idempotency keys: a second enqueue with the same `(queue, key)` within its TTL gets
//! the first job's id (or a batch's ids) and enqueues nothing.

use std::time::Duration;

use serde_json::Value;
use sqlx::Row;

use crate::queue_name::QueueName;

/// SQL for the hash of a job body: jsonb's text form is canonical (keys sorted,
/// whitespace normalised), so equal JSON hashes equal whatever its formatting.
const BODY_HASH: &str = "encode(sha256(convert_to($3::jsonb::text, 'UTF8')), 'hex')";

/// A live key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The job it made (the first, for a batch).
    pub msg_id: i64,
    /// Whether the body it was recorded with equals the one looked up with.
    pub same_body: bool,
    /// Every id, for a key recorded for a batch.
    pub msg_ids: Option<Vec<i64>>,
}

/// Locks the key for the rest of the transaction and returns the live entry, if any.
/// For a batch, `body` is the whole array of args. With `free_when_dead`, a key whose
/// job is in the dead letters is not live (the caller's record then replaces it).
pub async fn idempotency_lookup(
    tx: &mut sqlx::PgConnection,
    queue: &QueueName,
    key: &str,
    body: &Value,
    free_when_dead: bool,
) -> Result<Option<KeyEntry>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(1) || $2, $3))")
        .bind(queue.as_str())
        .bind(key)
        .bind(crate::locks::IDEMPOTENCY_SEED)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(&format!(
        r#"SELECT msg_id, body_hash IS NOT DISTINCT FROM {BODY_HASH}, msg_ids
           FROM longshore.idempotency_keys
          WHERE queue = $1 AND key = $2 AND expires_at > now()
            AND NOT ($4 AND EXISTS (SELECT 1 FROM longshore.dead_letters d
                                     WHERE d.queue = $1 AND d.msg_id = idempotency_keys.msg_id))"#
    ))
    .bind(queue.as_str())
    .bind(key)
    .bind(body)
    .bind(free_when_dead)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|r| {
        Ok(KeyEntry {
            msg_id: r.try_get(0)?,
            same_body: r.try_get(1)?,
            msg_ids: r.try_get(2)?,
        })
    })
    .transpose()
}

/// Records a key for jobs just inserted in the same transaction: one job (`msg_ids`
/// None) or a batch (`msg_ids` every id in order, `body` the array of args).
pub async fn idempotency_record(
    tx: &mut sqlx::PgConnection,
    queue: &QueueName,
    key: &str,
    body: &Value,
    msg_id: i64,
    msg_ids: Option<&[i64]>,
    ttl: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        r#"INSERT INTO longshore.idempotency_keys (queue, key, msg_id, body_hash, expires_at, msg_ids)
         VALUES ($1, $2, $4, {BODY_HASH}, now() + make_interval(secs => $5), $6)
         ON CONFLICT (queue, key) DO UPDATE SET msg_id = excluded.msg_id, body_hash = excluded.body_hash,
           created_at = now(), expires_at = excluded.expires_at, msg_ids = excluded.msg_ids"#
    ))
    .bind(queue.as_str())
    .bind(key)
    .bind(body)
    .bind(msg_id)
    .bind(ttl.as_secs_f64())
    .bind(msg_ids)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
