//! The queue store: every statement the runtime runs against pgmq tables lives here
//! (this module and its siblings: [`browse`], [`mod@bulk`], [`claim`], [`complete`], [`mod@dead_letters`], [`idempotency`], [`schedule`],
//! [`retention`]).
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
//! docs/benchmarks.md.
//!
//! Statements that settle several messages lock their rows in `msg_id` order first, so
//! two of them (an ack and a reschedule of overlapping stale fences, say) can never
//! deadlock; the heartbeat never waits for a lock at all (`SKIP LOCKED`).
//!
//! Header keys the runtime owns: `last_error`, `errors` (each failed attempt's error, the
//! last 10: `[{"attempt", "error", "at"}]`), `free_reads`, `deaths` (runs in a row
//! that ended with no outcome: the worker died or lost its lease), `result` (in the
//! archive), `idempotency_key`, `run_at`, `cancel_requested` (an operator's cancel of a
//! held job: `{"by", "at"}`). They are read with `longshore.header_int`, so
//! no value a producer writes there can fail a statement.

pub mod browse;
pub mod bulk;
pub mod claim;
pub mod complete;
pub mod controls;
pub mod dead_letters;
pub mod idempotency;
pub mod retention;
pub mod schedule;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

pub use self::bulk::{
    BulkAction, BulkBatch, BulkFilter, BulkState, bulk, bulk_batch, bulk_bound, bulk_count,
};
pub use self::claim::{Beat, BuriedAtClaim, ClaimRequest, ClaimResult, Claimed, Undecodable};
use self::claim::{CLAIM, HEARTBEAT};
use self::complete::{ACK_ARCHIVE, ACK_DELETE, BURY, CANCEL, HELD_LOCKED, RESCHEDULE};
pub use self::complete::{Bury, Completion, Reschedule, Statement};
pub use self::controls::{
    Cancel, QueueControl, RetryNow, cancel_job, queue_controls, retry_now, set_paused,
};
pub use self::dead_letters::{
    DeadLetter, Selection, dead_letter_action, dead_letters, purge_dead_letters, retry_dead_letters,
};
pub use self::idempotency::{KeyEntry, idempotency_lookup, idempotency_record};
pub use self::retention::{
    PRUNE_BATCH, VACUUM_BUDGET, Vacuumed, expire_idempotency_keys, prune_archives,
    prune_dead_letters, prune_schedule_fires, vacuum_queues,
};
pub use self::schedule::{fire_schedule, last_fire};
use crate::queue_name::QueueName;

/// Bumped whenever the per-queue objects [`create_queue`] makes change, so test
/// templates built by an older runtime are not reused.
pub const QUEUE_OBJECTS_VERSION: u32 = 6;

/// The fencing pair of a claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fence {
    /// The message (the job's id).
    pub msg_id: i64,
    /// pgmq's read count at the claim: the claim's generation.
    pub read_ct: i32,
}

/// A message to insert.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The job's args.
    pub body: Value,
    /// pgmq headers (a JSON object: `principal`, `idempotency_key`, `run_at`, …).
    pub headers: Value,
    /// None = visible now.
    pub visible_at: Option<DateTime<Utc>>,
}

/// Where a job stands, as the ingress reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting: visible, delayed, or in retry backoff.
    Queued,
    /// Claimed and its lease running.
    Running,
    /// Finished with a done outcome (archived, or deleted with a completion record).
    Done,
    /// Dead-lettered: failed its last attempt, discarded, or undecodable.
    Dead,
    /// Cancelled by an operator before it ran (again).
    Cancelled,
}

impl JobState {
    /// Done or dead: the state cannot change any more (short of a dead-letter retry,
    /// which enqueues a new job).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Dead | JobState::Cancelled)
    }
}

/// One job's status, as `GET /v1/jobs/{queue}/{id}` answers it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobStatus {
    /// The job's id (its pgmq `msg_id`).
    pub id: i64,
    /// Where it stands.
    pub state: JobState,
    /// Attempts spent so far (snoozes and releases not counted).
    pub attempts: i32,
    /// The error of its latest failed attempt, if any.
    pub last_error: Option<String>,
    /// What a done handler returned with `Outcome::done_with` (archived jobs only).
    pub result: Option<Value>,
    /// Who enqueued it (the `principal` header); not part of the answer.
    #[serde(skip)]
    pub principal: Option<String>,
}

/// Counts for one queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// The queue's name.
    pub queue: String,
    /// Visible now: waiting to be claimed.
    pub visible: i64,
    /// Claimed, lease running.
    pub in_flight: i64,
    /// Not yet due: delayed at enqueue, retry backoff, snoozed.
    pub delayed: i64,
    /// Age of the oldest visible message, seconds (0 when none).
    pub oldest_age_seconds: f64,
    /// Dead letters of this queue.
    pub dead_letters: i64,
    /// Done messages in its archive (left 0 by the gauges' sampler).
    pub archived: i64,
    /// Paused by an operator: no worker claims from it.
    pub paused: bool,
}

/// The prepared SQL of one queue. Table names are interpolated from a validated
/// [`QueueName`], so the strings are built once and sqlx caches the prepared
/// statements per connection.
#[derive(Debug, Clone)]
pub struct QueueSql {
    /// The queue these statements are for.
    pub name: QueueName,
    claim: String,
    ack_archive: String,
    ack_delete: String,
    reschedule: String,
    bury: String,
    cancel: String,
    heartbeat: String,
    insert: String,
    stats: String,
    gauges: String,
    status: String,
    next_due: String,
}

/// `{q}`, `{a}` and `{name}` in `template` replaced by the queue's table names and name.
fn render(template: &str, name: &QueueName) -> String {
    template
        .replace("{q}", &format!("pgmq.q_{name}"))
        .replace("{a}", &format!("pgmq.a_{name}"))
        .replace("{name}", name.as_str())
}

/// A `run_at` in the past is visible now, not earlier: claims take jobs by `vt`, and a
/// past `vt` would put the job ahead of every job already waiting.
const INSERT: &str = r#"
INSERT INTO {q} (vt, message, headers)
SELECT greatest(coalesce(f.vt, clock_timestamp()), clock_timestamp()), f.msg, f.hdr
  FROM unnest($1::jsonb[], $2::jsonb[], $3::timestamptz[]) WITH ORDINALITY AS f(msg, hdr, vt, ord)
 ORDER BY f.ord
RETURNING msg_id
"#;

const STATS: &str = r#"
SELECT count(*) FILTER (WHERE vt <= now())                              AS visible,
       count(*) FILTER (WHERE vt > now() AND last_read_at IS NOT NULL)  AS in_flight,
       count(*) FILTER (WHERE vt > now() AND last_read_at IS NULL)      AS delayed,
       coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE vt <= now())), 0)::float8 AS oldest,
       (SELECT count(*) FROM longshore.dead_letters WHERE queue = '{name}') AS dead,
       (SELECT count(*) FROM {a})                                         AS archived,
       EXISTS (SELECT 1 FROM longshore.queue_controls WHERE queue = '{name}' AND paused) AS paused
  FROM {q}
"#;

/// The archive count of [`STATS`]: left out of the gauges' copy, whose cost must not
/// depend on the archive's size.
const ARCHIVE_COUNT: &str = "(SELECT count(*) FROM {a})";

const STATUS: &str = r#"
SELECT 'queued' AS src, longshore.attempts(read_ct, headers),
       (last_read_at IS NOT NULL AND vt > now()), headers, headers ->> 'last_error',
       longshore.headers(headers) ->> 'principal'
  FROM {q} WHERE msg_id = $1
UNION ALL
SELECT 'done', longshore.attempts(read_ct, headers), false, headers, headers ->> 'last_error',
       longshore.headers(headers) ->> 'principal'
  FROM {a} WHERE msg_id = $1
UNION ALL
SELECT 'done', attempts, false, NULL, NULL, principal
  FROM longshore.completions WHERE queue = '{name}' AND msg_id = $1
UNION ALL
SELECT 'dead', attempts, false, headers, last_error, longshore.headers(headers) ->> 'principal'
  FROM longshore.dead_letters WHERE queue = '{name}' AND msg_id = $1
UNION ALL
SELECT 'cancelled', attempts, false, NULL, NULL, longshore.headers(headers) ->> 'principal'
  FROM longshore.cancelled_jobs WHERE queue = '{name}' AND msg_id = $1
LIMIT 1
"#;

/// How long until the earliest message of the queue is due (negative: one is due now),
/// NULL for an empty queue: the first row of the vt index. Leased messages count (their
/// lease ends), so do messages this process holds. NULL for a paused queue too: nothing
/// in it is due to this consumer until a resume, which notifies.
const NEXT_DUE: &str = r#"SELECT extract(epoch FROM vt - clock_timestamp())::float8
                        FROM {q}
                       WHERE NOT EXISTS (SELECT 1 FROM longshore.queue_controls
                                          WHERE queue = '{name}' AND paused)
                       ORDER BY vt LIMIT 1"#;

impl QueueSql {
    /// Renders every statement for `name`.
    pub fn new(name: QueueName) -> Self {
        let held = |extra: &str| HELD_LOCKED.replace("{extra}", extra);
        let with_held = |t: &str, extra: &str| render(&t.replace("{held}", &held(extra)), &name);
        QueueSql {
            claim: render(CLAIM, &name),
            ack_archive: with_held(ACK_ARCHIVE, ", f.res"),
            ack_delete: with_held(ACK_DELETE, ""),
            reschedule: with_held(RESCHEDULE, ", f.delay, f.err, f.free"),
            bury: with_held(BURY, ", f.attempts, f.err"),
            cancel: with_held(CANCEL, ""),
            heartbeat: render(HEARTBEAT, &name),
            insert: render(INSERT, &name),
            stats: render(STATS, &name),
            gauges: render(&STATS.replacen(ARCHIVE_COUNT, "0::bigint", 1), &name),
            status: render(STATUS, &name),
            next_due: render(NEXT_DUE, &name),
            name,
        }
    }

    /// How long until the queue's earliest message is due; `None` when it is empty
    /// (what an idle consumer sleeps for, woken earlier by a notification).
    pub async fn next_due(&self, ex: impl PgExecutor<'_>) -> Result<Option<f64>, sqlx::Error> {
        sqlx::query_scalar(&self.next_due).fetch_optional(ex).await
    }

    /// Where a job is: queued (or running), done (archived with its result, or recorded
    /// as completed on a `delete` queue) or dead. `None` when unknown (never enqueued,
    /// or pruned).
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
            ("cancelled", _) => JobState::Cancelled,
            _ => JobState::Dead,
        };
        Ok(Some(JobStatus {
            id: msg_id,
            state,
            attempts: r.try_get::<i32, _>(1)?.max(0),
            last_error: r.try_get(4)?,
            result: headers.and_then(|h| h.get("result").cloned()),
            principal: r.try_get(5)?,
        }))
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

    /// Counts, the archive included (`longshore queues`).
    pub async fn stats(&self, ex: impl PgExecutor<'_>) -> Result<QueueStats, sqlx::Error> {
        self.counts(&self.stats, ex).await
    }

    /// Counts for the gauges: the archive is not counted (`archived` is 0).
    pub async fn gauges(&self, ex: impl PgExecutor<'_>) -> Result<QueueStats, sqlx::Error> {
        self.counts(&self.gauges, ex).await
    }

    async fn counts(&self, sql: &str, ex: impl PgExecutor<'_>) -> Result<QueueStats, sqlx::Error> {
        let r = sqlx::query(sql).fetch_one(ex).await?;
        Ok(QueueStats {
            queue: self.name.to_string(),
            visible: r.try_get(0)?,
            in_flight: r.try_get(1)?,
            delayed: r.try_get(2)?,
            oldest_age_seconds: r.try_get(3)?,
            dead_letters: r.try_get(4)?,
            archived: r.try_get(5)?,
            paused: r.try_get(6)?,
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

/// Creates a pgmq queue (idempotent), its statement-level NOTIFY triggers (with the
/// enqueue notification's debounce sequence) and the
/// partial index the suspect claim walks (messages read and not settled: in flight or
/// orphaned, a few per worker slot however long the queue).
pub async fn create_queue(
    ex: &mut sqlx::PgConnection,
    name: &QueueName,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pgmq.create($1)")
        .bind(name.as_str())
        .execute(&mut *ex)
        .await?;
    for ddl in [
        r#"CREATE OR REPLACE TRIGGER longshore_notify AFTER INSERT ON {q}
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_enqueue()"#,
        r#"CREATE OR REPLACE TRIGGER longshore_done_notify AFTER INSERT ON {a}
         REFERENCING NEW TABLE AS new_rows
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_archived()"#,
        // The enqueue notification's debounce clock (see the notify_budget migration).
        "CREATE UNLOGGED SEQUENCE IF NOT EXISTS longshore.enq_{name}",
        "CREATE INDEX IF NOT EXISTS q_{name}_read_idx ON {q} (msg_id) WHERE last_read_at IS NOT NULL",
    ] {
        sqlx::query(&render(ddl, name)).execute(&mut *ex).await?;
    }
    // A queue table makes dead tuples by the thousand a second (no update of it is
    // HOT) while it holds few live rows: vacuum it after 1,000 dead tuples plus 2% of
    // its rows, not the default 20% of a table that is mostly dead, and keep its
    // statistics as fresh, since claims are planned for the table as it is now. Set
    // once, when the table has no autovacuum settings yet: an operator's own tuning
    // stays, and a migrate takes no lock for it.
    let tuned: bool = sqlx::query_scalar(
        r#"SELECT coalesce(bool_or(o LIKE 'autovacuum\_%'), false)
           FROM pg_class c LEFT JOIN LATERAL unnest(c.reloptions) o ON true
          WHERE c.oid = $1::regclass"#,
    )
    .bind(format!("pgmq.q_{name}"))
    .fetch_one(&mut *ex)
    .await?;
    if !tuned {
        let ddl = r#"ALTER TABLE {q} SET (autovacuum_vacuum_scale_factor = 0.02,
                     autovacuum_vacuum_threshold = 1000,
                     autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000)"#;
        sqlx::query(&render(ddl, name)).execute(&mut *ex).await?;
    }
    Ok(())
}

/// `SELECT 1` for readiness.
pub async fn ping(ex: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(ex).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claimed(read_ct: i32, headers: Value) -> Claimed {
        Claimed {
            msg_id: 1,
            read_ct,
            enqueued_at: Utc::now(),
            message: Value::Null,
            headers,
            orphan: false,
            suspect: false,
        }
    }

    #[test]
    fn the_gauges_never_count_the_archive() {
        let sql = QueueSql::new(QueueName::parse("probe").unwrap());
        assert!(sql.stats.contains("FROM pgmq.a_probe"), "{}", sql.stats);
        assert!(!sql.gauges.contains("pgmq.a_probe"), "{}", sql.gauges);
        assert!(sql.gauges.contains("0::bigint"));
    }

    #[test]
    fn attempts_ignore_malformed_or_impossible_free_reads() {
        assert_eq!(claimed(3, json!({"free_reads": 1})).attempt(), 2);
        assert_eq!(claimed(3, json!({"free_reads": "x"})).attempt(), 3);
        assert_eq!(claimed(3, json!({"free_reads": -4})).attempt(), 3);
        assert_eq!(claimed(3, json!({"free_reads": 1e30})).attempt(), 3);
        // More free reads than earlier reads: a producer's invention, capped.
        assert_eq!(claimed(1, json!({"free_reads": 50})).attempt(), 1);
        assert_eq!(claimed(2, json!(["not", "an", "object"])).attempt(), 2);
    }
}
