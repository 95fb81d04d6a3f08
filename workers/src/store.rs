//! The queue store: every statement the runtime runs against pgmq tables lives here.
//!
//! pgmq keeps each queue in `pgmq.q_<name>` and its archive in `pgmq.a_<name>`. We
//! keep pgmq's table layout and its functions (so `select pgmq.send(...)` works for any
//! producer), but the hot path uses prepared batch statements on the same tables
//! instead of pgmq's PL/pgSQL functions: one round trip claims a batch, one
//! acknowledges a batch, and every write about a claimed message is **fenced** on
//! `(msg_id, read_ct)`. `read_ct` only ever grows (a snooze or release does not lower
//! it; the attempts they did not spend are counted in the `free_reads` header), so a
//! worker holding an old `read_ct` can never touch a message someone else claimed
//! since. Measured against `pgmq.read` + `pgmq.archive`: see `longshore bench` in
//! README.
//!
//! Header keys the runtime owns: `last_error`, `free_reads`, `result` (in the archive),
//! `idempotency_key`, `run_at`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

use crate::queue_name::QueueName;

/// A message as claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub msg_id: i64,
    /// The fencing token: every later write about this message must present it.
    pub read_ct: i32,
    pub enqueued_at: DateTime<Utc>,
    pub message: Value,
    pub headers: Value,
}

impl Claimed {
    /// Attempt number: reads minus the reads that did not spend an attempt.
    pub fn attempt(&self) -> u32 {
        let free = self
            .headers
            .get("free_reads")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        (i64::from(self.read_ct) - free).max(1) as u32
    }

    /// When the job was due: its `run_at` for a delayed job, else when it was enqueued.
    pub fn due_at(&self) -> DateTime<Utc> {
        self.headers
            .get("run_at")
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or(self.enqueued_at)
    }
}

/// The fencing pair of a claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub msg_id: i64,
    pub read_ct: i32,
}

/// Put a claimed message back: visible again after `delay`.
#[derive(Debug, Clone)]
pub struct Reschedule {
    pub fence: Fence,
    pub delay: Duration,
    /// Recorded as `last_error` (retries).
    pub error: Option<String>,
    /// True when this read should not count as an attempt (snooze, release).
    pub free: bool,
}

/// Move a claimed message to the dead letters.
#[derive(Debug, Clone)]
pub struct Bury {
    pub fence: Fence,
    pub attempts: i32,
    pub error: String,
}

/// A message to insert.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub body: Value,
    pub headers: Value,
    /// None = visible now.
    pub visible_at: Option<DateTime<Utc>>,
}

/// Where a job stands, as the ingress reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Dead,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Dead)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobStatus {
    pub id: i64,
    pub state: JobState,
    /// Attempts spent so far (snoozes and releases not counted).
    pub attempts: i32,
    pub last_error: Option<String>,
    pub result: Option<Value>,
}

/// Counts for one queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub queue: String,
    /// Visible now: waiting to be claimed.
    pub visible: i64,
    /// Claimed, lease running.
    pub in_flight: i64,
    /// Not yet due: delayed at enqueue, retry backoff, snoozed.
    pub delayed: i64,
    /// Age of the oldest visible message, seconds (0 when none).
    pub oldest_age_seconds: f64,
    pub dead_letters: i64,
    pub archived: i64,
}

/// The prepared SQL of one queue. Table names are interpolated from a validated
/// [`QueueName`], so the strings are built once and sqlx caches the prepared
/// statements per connection.
#[derive(Debug, Clone)]
pub struct QueueSql {
    pub name: QueueName,
    claim: String,
    ack_archive: String,
    ack_delete: String,
    reschedule: String,
    bury: String,
    heartbeat: String,
    insert: String,
    stats: String,
    status: String,
}

impl QueueSql {
    pub fn new(name: QueueName) -> Self {
        let q = format!("pgmq.q_{name}");
        let a = format!("pgmq.a_{name}");
        QueueSql {
            claim: format!(
                "WITH c AS (SELECT msg_id FROM {q} WHERE vt <= clock_timestamp() \
                   ORDER BY msg_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE {q} m SET last_read_at = clock_timestamp(), \
                   vt = clock_timestamp() + make_interval(secs => $2), read_ct = m.read_ct + 1 \
                 FROM c WHERE m.msg_id = c.msg_id \
                 RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers"
            ),
            ack_archive: format!(
                "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::jsonb[]) AS f(id, ct, res)), \
                 d AS (DELETE FROM {q} q USING f WHERE q.msg_id = f.id AND q.read_ct = f.ct \
                       RETURNING q.msg_id, q.vt, q.read_ct, q.enqueued_at, q.last_read_at, q.message, q.headers, f.res) \
                 INSERT INTO {a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers) \
                 SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, \
                   CASE WHEN res IS NULL THEN headers \
                        ELSE longshore.headers(headers) || jsonb_build_object('result', res) END \
                 FROM d RETURNING msg_id"
            ),
            ack_delete: format!(
                "DELETE FROM {q} q USING unnest($1::bigint[], $2::int4[]) AS f(id, ct) \
                 WHERE q.msg_id = f.id AND q.read_ct = f.ct RETURNING q.msg_id"
            ),
            reschedule: format!(
                "UPDATE {q} q SET vt = clock_timestamp() + make_interval(secs => f.delay), \
                   last_read_at = NULL, \
                   headers = longshore.headers(q.headers) \
                     || CASE WHEN f.err IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('last_error', f.err) END \
                     || CASE WHEN f.free THEN jsonb_build_object('free_reads', \
                          coalesce((q.headers->>'free_reads')::int, 0) + 1) ELSE '{{}}'::jsonb END \
                 FROM unnest($1::bigint[], $2::int4[], $3::float8[], $4::text[], $5::bool[]) AS f(id, ct, delay, err, free) \
                 WHERE q.msg_id = f.id AND q.read_ct = f.ct RETURNING q.msg_id"
            ),
            bury: format!(
                "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::int4[], $4::text[]) AS f(id, ct, attempts, err)), \
                 d AS (DELETE FROM {q} q USING f WHERE q.msg_id = f.id AND q.read_ct = f.ct \
                       RETURNING q.msg_id, q.message, q.headers, q.enqueued_at, f.attempts, f.err) \
                 INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at) \
                 SELECT '{name}', msg_id, message, longshore.headers(headers) || jsonb_build_object('last_error', err), \
                   attempts, err, enqueued_at FROM d \
                 ON CONFLICT (queue, msg_id) DO UPDATE SET message = excluded.message, headers = excluded.headers, \
                   attempts = excluded.attempts, last_error = excluded.last_error, failed_at = now() \
                 RETURNING msg_id"
            ),
            heartbeat: format!(
                "UPDATE {q} q SET vt = clock_timestamp() + make_interval(secs => $3) \
                 FROM unnest($1::bigint[], $2::int4[]) AS f(id, ct) \
                 WHERE q.msg_id = f.id AND q.read_ct = f.ct AND q.last_read_at IS NOT NULL \
                 RETURNING q.msg_id"
            ),
            insert: format!(
                "INSERT INTO {q} (vt, message, headers) \
                 SELECT coalesce(f.vt, clock_timestamp()), f.msg, f.hdr \
                 FROM unnest($1::jsonb[], $2::jsonb[], $3::timestamptz[]) WITH ORDINALITY AS f(msg, hdr, vt, ord) \
                 ORDER BY f.ord RETURNING msg_id"
            ),
            stats: format!(
                "SELECT count(*) FILTER (WHERE vt <= now()) AS visible, \
                   count(*) FILTER (WHERE vt > now() AND last_read_at IS NOT NULL) AS in_flight, \
                   count(*) FILTER (WHERE vt > now() AND last_read_at IS NULL) AS delayed, \
                   coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE vt <= now())), 0)::float8 AS oldest, \
                   (SELECT count(*) FROM longshore.dead_letters WHERE queue = '{name}') AS dead, \
                   (SELECT count(*) FROM {a}) AS archived \
                 FROM {q}"
            ),
            status: format!(
                "SELECT 'queued' AS src, read_ct - coalesce((headers->>'free_reads')::int, 0), \
                   (last_read_at IS NOT NULL AND vt > now()), headers, headers->>'last_error' \
                   FROM {q} WHERE msg_id = $1 \
                 UNION ALL SELECT 'done', read_ct - coalesce((headers->>'free_reads')::int, 0), false, headers, \
                   headers->>'last_error' FROM {a} WHERE msg_id = $1 \
                 UNION ALL SELECT 'dead', attempts, false, headers, last_error \
                   FROM longshore.dead_letters WHERE queue = '{name}' AND msg_id = $1 \
                 LIMIT 1"
            ),
            name,
        }
    }

    /// Where a job is: queued (or running), done (archived, with its result) or dead.
    /// `None` when unknown (never enqueued, or done on a `delete` queue, or pruned).
    pub async fn status(
        &self,
        ex: impl PgExecutor<'_>,
        msg_id: i64,
    ) -> Result<Option<JobStatus>, sqlx::Error> {
        let Some(r) = sqlx::query(&self.status)
            .bind(msg_id)
            .fetch_optional(ex)
            .await?
        else {
            return Ok(None);
        };
        let src: String = r.try_get(0)?;
        let running: bool = r.try_get(2)?;
        let headers: Option<Value> = r.try_get(3)?;
        let state = match (src.as_str(), running) {
            ("queued", true) => JobState::Running,
            ("queued", false) => JobState::Queued,
            ("done", _) => JobState::Done,
            _ => JobState::Dead,
        };
        Ok(Some(JobStatus {
            id: msg_id,
            state,
            attempts: r.try_get::<i32, _>(1)?.max(0),
            last_error: r.try_get(4)?,
            result: headers.and_then(|h| h.get("result").cloned()),
        }))
    }

    /// Claims up to `limit` visible messages with a lease of `lease`.
    pub async fn claim(
        &self,
        ex: impl PgExecutor<'_>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, sqlx::Error> {
        let rows = sqlx::query(&self.claim)
            .bind(limit as i64)
            .bind(lease.as_secs_f64())
            .fetch_all(ex)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Claimed {
                msg_id: r.try_get(0)?,
                read_ct: r.try_get(1)?,
                enqueued_at: r.try_get(2)?,
                message: r.try_get::<Option<Value>, _>(3)?.unwrap_or(Value::Null),
                headers: r.try_get::<Option<Value>, _>(4)?.unwrap_or(Value::Null),
            });
        }
        // SKIP LOCKED + UPDATE ... FROM does not promise order; hand out oldest first.
        out.sort_unstable_by_key(|c| c.msg_id);
        Ok(out)
    }

    /// Acknowledges done messages (archive, keeping each result). Returns the ids that
    /// were still held; the others had lost their lease.
    pub async fn ack_archive(
        &self,
        ex: impl PgExecutor<'_>,
        done: &[(Fence, Option<Value>)],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let ids: Vec<i64> = done.iter().map(|(f, _)| f.msg_id).collect();
        let cts: Vec<i32> = done.iter().map(|(f, _)| f.read_ct).collect();
        let res: Vec<Option<Value>> = done.iter().map(|(_, r)| r.clone()).collect();
        sqlx::query_scalar(&self.ack_archive)
            .bind(ids)
            .bind(cts)
            .bind(res)
            .fetch_all(ex)
            .await
    }

    /// Acknowledges done messages by deleting them.
    pub async fn ack_delete(
        &self,
        ex: impl PgExecutor<'_>,
        done: &[Fence],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let (ids, cts) = split(done);
        sqlx::query_scalar(&self.ack_delete)
            .bind(ids)
            .bind(cts)
            .fetch_all(ex)
            .await
    }

    /// Makes claimed messages visible again later (retry, snooze, release).
    pub async fn reschedule(
        &self,
        ex: impl PgExecutor<'_>,
        items: &[Reschedule],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let ids: Vec<i64> = items.iter().map(|r| r.fence.msg_id).collect();
        let cts: Vec<i32> = items.iter().map(|r| r.fence.read_ct).collect();
        let delays: Vec<f64> = items.iter().map(|r| r.delay.as_secs_f64()).collect();
        let errs: Vec<Option<String>> = items.iter().map(|r| r.error.clone()).collect();
        let free: Vec<bool> = items.iter().map(|r| r.free).collect();
        sqlx::query_scalar(&self.reschedule)
            .bind(ids)
            .bind(cts)
            .bind(delays)
            .bind(errs)
            .bind(free)
            .fetch_all(ex)
            .await
    }

    /// Moves claimed messages to the dead letters with their last error.
    pub async fn bury(
        &self,
        ex: impl PgExecutor<'_>,
        items: &[Bury],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let ids: Vec<i64> = items.iter().map(|b| b.fence.msg_id).collect();
        let cts: Vec<i32> = items.iter().map(|b| b.fence.read_ct).collect();
        let attempts: Vec<i32> = items.iter().map(|b| b.attempts).collect();
        let errs: Vec<String> = items.iter().map(|b| b.error.clone()).collect();
        sqlx::query_scalar(&self.bury)
            .bind(ids)
            .bind(cts)
            .bind(attempts)
            .bind(errs)
            .fetch_all(ex)
            .await
    }

    /// Extends the leases of messages still held. Returns the ids still held.
    pub async fn heartbeat(
        &self,
        ex: impl PgExecutor<'_>,
        held: &[Fence],
        lease: Duration,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let (ids, cts) = split(held);
        sqlx::query_scalar(&self.heartbeat)
            .bind(ids)
            .bind(cts)
            .bind(lease.as_secs_f64())
            .fetch_all(ex)
            .await
    }

    /// Inserts messages; returns their ids in input order.
    pub async fn insert(
        &self,
        ex: impl PgExecutor<'_>,
        msgs: &[NewMessage],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let bodies: Vec<&Value> = msgs.iter().map(|m| &m.body).collect();
        let headers: Vec<Option<&Value>> = msgs
            .iter()
            .map(|m| Some(&m.headers).filter(|h| !h.is_null()))
            .collect();
        let vts: Vec<Option<DateTime<Utc>>> = msgs.iter().map(|m| m.visible_at).collect();
        sqlx::query_scalar(&self.insert)
            .bind(bodies)
            .bind(headers)
            .bind(vts)
            .fetch_all(ex)
            .await
    }

    pub async fn stats(&self, ex: impl PgExecutor<'_>) -> Result<QueueStats, sqlx::Error> {
        let r = sqlx::query(&self.stats).fetch_one(ex).await?;
        Ok(QueueStats {
            queue: self.name.to_string(),
            visible: r.try_get(0)?,
            in_flight: r.try_get(1)?,
            delayed: r.try_get(2)?,
            oldest_age_seconds: r.try_get(3)?,
            dead_letters: r.try_get(4)?,
            archived: r.try_get(5)?,
        })
    }
}

fn split(f: &[Fence]) -> (Vec<i64>, Vec<i32>) {
    f.iter().map(|f| (f.msg_id, f.read_ct)).unzip()
}

/// Queues that exist in the database (pgmq's catalogue).
pub async fn existing_queues(ex: impl PgExecutor<'_>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT queue_name::text FROM pgmq.meta ORDER BY queue_name")
        .fetch_all(ex)
        .await
}

/// Creates a pgmq queue (idempotent) and its statement-level NOTIFY trigger.
pub async fn create_queue(
    ex: &mut sqlx::PgConnection,
    name: &QueueName,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pgmq.create($1)")
        .bind(name.as_str())
        .execute(&mut *ex)
        .await?;
    sqlx::query(&format!(
        "CREATE OR REPLACE TRIGGER longshore_notify AFTER INSERT ON pgmq.q_{name} \
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_enqueue()"
    ))
    .execute(&mut *ex)
    .await?;
    sqlx::query(&format!(
        "CREATE OR REPLACE TRIGGER longshore_done_notify AFTER INSERT ON pgmq.a_{name} \
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_archived()"
    ))
    .execute(&mut *ex)
    .await?;
    Ok(())
}

/// A dead letter as listed by operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub queue: String,
    pub msg_id: i64,
    pub message: Value,
    pub headers: Value,
    pub attempts: i32,
    pub last_error: String,
    pub enqueued_at: DateTime<Utc>,
    pub failed_at: DateTime<Utc>,
}

pub async fn dead_letters(
    ex: impl PgExecutor<'_>,
    queue: &QueueName,
    ids: &[i64],
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, queue, msg_id, coalesce(message, 'null'::jsonb), coalesce(headers, '{}'::jsonb), \
           attempts, last_error, enqueued_at, failed_at \
         FROM longshore.dead_letters WHERE queue = $1 AND (cardinality($2::bigint[]) = 0 OR id = ANY($2)) \
         ORDER BY id LIMIT $3",
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

/// Re-sends dead letters to their queue as fresh jobs (attempts start over) and removes
/// them from the dead letters, in one transaction. Returns (dead letter id, new msg id).
pub async fn retry_dead_letters(
    tx: &mut sqlx::PgConnection,
    queue: &QueueSql,
    ids: &[i64],
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let rows = sqlx::query(
        "DELETE FROM longshore.dead_letters WHERE queue = $1 AND (cardinality($2::bigint[]) = 0 OR id = ANY($2)) \
         RETURNING id, coalesce(message, 'null'::jsonb), \
           nullif(longshore.headers(headers) - 'last_error' - 'free_reads' - 'run_at', '{}'::jsonb)",
    )
    .bind(queue.name.as_str())
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut dl_ids = Vec::with_capacity(rows.len());
    let mut msgs = Vec::with_capacity(rows.len());
    for r in rows {
        dl_ids.push(r.try_get::<i64, _>(0)?);
        msgs.push(NewMessage {
            body: r.try_get(1)?,
            headers: r.try_get::<Option<Value>, _>(2)?.unwrap_or(Value::Null),
            visible_at: None,
        });
    }
    let new_ids = queue.insert(&mut *tx, &msgs).await?;
    Ok(dl_ids.into_iter().zip(new_ids).collect())
}

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

/// SQL for the hash of a job body: jsonb's text form is canonical (keys sorted,
/// whitespace normalised), so equal JSON hashes equal whatever its formatting.
const BODY_HASH: &str = "encode(sha256(convert_to($3::jsonb::text, 'UTF8')), 'hex')";

/// Idempotency: locks the key for the rest of the transaction and returns the live
/// entry, if any: (msg_id, whether its body equals `body`).
pub async fn idempotency_lookup(
    tx: &mut sqlx::PgConnection,
    queue: &QueueName,
    key: &str,
    body: &Value,
) -> Result<Option<(i64, bool)>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(1) || $2, 7254))")
        .bind(queue.as_str())
        .bind(key)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(&format!(
        "SELECT msg_id, body_hash IS NOT DISTINCT FROM {BODY_HASH} FROM longshore.idempotency_keys \
         WHERE queue = $1 AND key = $2 AND expires_at > now()"
    ))
    .bind(queue.as_str())
    .bind(key)
    .bind(body)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Records a key for a job just inserted in the same transaction.
pub async fn idempotency_record(
    tx: &mut sqlx::PgConnection,
    queue: &QueueName,
    key: &str,
    body: &Value,
    msg_id: i64,
    ttl: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO longshore.idempotency_keys (queue, key, msg_id, body_hash, expires_at) \
         VALUES ($1, $2, $4, {BODY_HASH}, now() + make_interval(secs => $5)) \
         ON CONFLICT (queue, key) DO UPDATE SET msg_id = excluded.msg_id, body_hash = excluded.body_hash, \
           created_at = now(), expires_at = excluded.expires_at"
    ))
    .bind(queue.as_str())
    .bind(key)
    .bind(body)
    .bind(msg_id)
    .bind(ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records a scheduled fire and enqueues its job in one transaction. Returns the job id,
/// or `None` when another scheduler already fired this `(schedule, fire_at)`.
pub async fn fire_schedule(
    tx: &mut sqlx::PgConnection,
    queue: &QueueSql,
    schedule: &str,
    fire_at: DateTime<Utc>,
    args: &Value,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7254003))")
        .bind(schedule)
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

/// Maintenance: deletes archived messages older than `older_than` from every queue.
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
    Ok(n)
}

/// Maintenance: deletes dead letters older than `older_than`.
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

/// Maintenance: deletes expired idempotency keys.
pub async fn expire_idempotency_keys(ex: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM longshore.idempotency_keys WHERE expires_at <= now()")
            .execute(ex)
            .await?
            .rows_affected(),
    )
}

/// Maintenance: deletes fire rows older than `older_than`, keeping each schedule's
/// latest (the scheduler reads it to find missed fires).
pub async fn prune_schedule_fires(
    ex: impl PgExecutor<'_>,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM longshore.schedule_fires f WHERE fire_at < now() - make_interval(secs => $1) \
         AND fire_at < (SELECT max(fire_at) FROM longshore.schedule_fires l WHERE l.schedule = f.schedule)",
    )
    .bind(older_than.as_secs_f64())
    .execute(ex)
    .await?
    .rows_affected())
}

/// `SELECT 1` for readiness.
pub async fn ping(ex: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(ex).await.map(|_| ())
}
