//! The queue store: every statement the runtime runs against pgmq tables lives here
//! (this module and its siblings: [`mod@dead_letters`], [`idempotency`], [`schedule`],
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
//! Header keys the runtime owns: `last_error`, `free_reads`, `deaths` (runs in a row
//! that ended with no outcome: the worker died or lost its lease), `result` (in the
//! archive), `idempotency_key`, `run_at`. They are read with `longshore.header_int`, so
//! no value a producer writes there can fail a statement.

pub mod dead_letters;
pub mod idempotency;
pub mod retention;
pub mod schedule;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

pub use self::dead_letters::{
    DeadLetter, Selection, dead_letters, newest_dead_letter, purge_dead_letters, retry_dead_letters,
};
pub use self::idempotency::{KeyEntry, idempotency_lookup, idempotency_record};
pub use self::retention::{
    PRUNE_BATCH, VACUUM_BUDGET, Vacuumed, expire_idempotency_keys, prune_archives,
    prune_dead_letters, prune_schedule_fires, vacuum_queues,
};
pub use self::schedule::{fire_schedule, last_fire};
use crate::clean;
use crate::queue_name::QueueName;

/// Bumped whenever the per-queue objects [`create_queue`] makes change, so test
/// templates built by an older runtime are not reused.
pub const QUEUE_OBJECTS_VERSION: u32 = 6;

/// A message as claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub msg_id: i64,
    /// The fencing token: every later write about this message must present it.
    pub read_ct: i32,
    pub enqueued_at: DateTime<Utc>,
    pub message: Value,
    pub headers: Value,
    /// Its previous run ended with no outcome (the worker died or lost its lease).
    pub orphan: bool,
    /// Its last two or more runs ended with no outcome: it may be what kills its
    /// workers, so a process runs at most one suspect at a time.
    pub suspect: bool,
}

impl Claimed {
    /// Attempt number: reads minus the reads that did not spend an attempt (the same
    /// rule as `longshore.attempts` in SQL).
    pub fn attempt(&self) -> u32 {
        let free = header_int(&self.headers, "free_reads");
        let earlier_reads = i64::from(self.read_ct - 1).max(0);
        (i64::from(self.read_ct) - free.min(earlier_reads)).max(1) as u32
    }

    /// Runs in a row, including the one before this claim, that ended with no outcome.
    pub fn deaths(&self) -> u32 {
        header_int(&self.headers, "deaths") as u32
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

/// An integer header as `longshore.header_int` reads it: 0 unless a number in range.
fn header_int(h: &Value, key: &str) -> i64 {
    h.get(key)
        .and_then(Value::as_f64)
        .filter(|n| (0.0..=f64::from(i32::MAX)).contains(n))
        .map(|n| n.floor() as i64)
        .unwrap_or(0)
}

/// What a claim asks for.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    /// Most messages to claim (the consumer's free slots).
    pub limit: usize,
    pub lease: Duration,
    /// Most suspects to claim (0 or 1: the process's suspect slot is free).
    pub suspects: usize,
    /// A message whose attempt would exceed this is dead-lettered instead of claimed.
    pub max_attempts: u32,
}

/// A message claimed whose body or headers this process cannot decode (valid jsonb
/// that serde_json refuses, e.g. a number beyond f64): it is dead-lettered by the
/// caller, alone, instead of failing the whole claim after it committed.
#[derive(Debug, Clone)]
pub struct Undecodable {
    pub fence: Fence,
    pub error: String,
}

/// A message dead-lettered by the claim itself: its attempts were spent although no
/// run returned an outcome to bury it (a crash loop).
#[derive(Debug, Clone)]
pub struct BuriedAtClaim {
    pub msg_id: i64,
    pub attempts: i32,
    pub reason: String,
}

/// What a claim got.
#[derive(Debug, Clone, Default)]
pub struct ClaimResult {
    pub claimed: Vec<Claimed>,
    pub buried: Vec<BuriedAtClaim>,
    pub undecodable: Vec<Undecodable>,
}

/// The fencing pair of a claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// What a heartbeat found for one held message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The lease was extended.
    Extended,
    /// Still ours, but its row was locked (an acknowledgement committing): not
    /// extended this time, not lost.
    Busy,
    /// No longer ours: acknowledged, or claimed by someone else after the lease ran out.
    Gone,
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
    /// Who enqueued it (the `principal` header); not part of the answer.
    #[serde(skip)]
    pub principal: Option<String>,
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

/// Claims up to $1 visible messages with a lease of $2 seconds, and up to $3 suspects,
/// none of the ids in $5 (what this process still holds: it never takes back a message
/// whose earlier run it has not finished settling); a message whose attempt would exceed
/// $4 is dead-lettered instead (it was claimed before and never returned an outcome: a
/// crash loop). An orphan (its previous run ended with no outcome) has its `deaths`
/// counted; an orphan that had died before is a suspect and comes only from the second
/// branch.
///
/// Visible messages are taken in the order they became visible (`vt`; ties, such as a
/// batch enqueued with one `run_at`, in the index's order, which is about insertion
/// order), walking pgmq's `vt` index from its oldest entry: the scan stops at the first
/// row not yet due, so jobs scheduled for later or retries in backoff cost a claim
/// nothing. Not `ORDER BY vt, msg_id`: no index has both, so a claim would sort every
/// row of a tie (200,000 jobs with one `run_at`: 170–380 ms per claim). Enqueues never
/// store a `vt` in the past (see `INSERT`), so no producer can order its jobs ahead of
/// those already waiting.
/// `vt <= clock_timestamp()` could not use that index (a volatile function is no index
/// bound): ordered by `msg_id`, a claim walked the primary key through every invisible
/// row with a lower id, 36 ms behind 200,000 delayed jobs against 0.25 ms now. The
/// clock read as an uncorrelated subquery is evaluated once, before the scan, and bounds it.
///
/// Each write that joins a CTE back to the queue table also names the ids as an array
/// (`m.msg_id = ANY (...)`), so even a generic plan reaches the table through the
/// primary key for those ids only (without it, one merge-joined 16 claimed rows against
/// a walk of the whole key: 55 ms at 300,000 rows). Connections still plan every
/// statement for its parameters (`force_custom_plan`, see `db.rs`): a generic plan made
/// while a queue was empty seq-scans it once it is full, arrays or not (194 ms per
/// claim, found in review). Planning this statement costs about 1.5 ms, running it
/// 0.3 ms; that is what is left of the idle fleet's latency (docs/scale.md).
const CLAIM: &str = r#"
WITH normal AS (
    SELECT msg_id, read_ct, headers, last_read_at FROM {q}
     WHERE vt <= (SELECT clock_timestamp())
       AND (last_read_at IS NULL OR longshore.header_int(headers, 'deaths') = 0)
       AND msg_id <> ALL ($5::bigint[])
     ORDER BY vt
     LIMIT $1
       FOR UPDATE SKIP LOCKED
),
suspect AS (
    SELECT msg_id, read_ct, headers, last_read_at FROM {q}
     WHERE last_read_at IS NOT NULL
       AND vt <= clock_timestamp()
       AND longshore.header_int(headers, 'deaths') > 0
       AND msg_id <> ALL ($5::bigint[])
     ORDER BY msg_id
     LIMIT $3
       FOR UPDATE SKIP LOCKED
),
candidates AS (SELECT * FROM normal UNION ALL SELECT * FROM suspect),
-- Computed from the locked rows (a locking SELECT returns their newest version).
c AS (
    SELECT msg_id,
           last_read_at IS NOT NULL                                   AS orphan,
           longshore.attempts(read_ct + 1, headers)                   AS attempt,
           longshore.header_int(headers, 'deaths')
             + (last_read_at IS NOT NULL)::int                        AS deaths,
           headers ->> 'last_error'                                   AS last_error
      FROM candidates
),
buried AS (
    DELETE FROM {q} m USING c
     WHERE m.msg_id = c.msg_id AND c.attempt > $4
       AND m.msg_id = ANY (ARRAY(SELECT msg_id FROM c WHERE attempt > $4))
    RETURNING m.msg_id, m.message, m.headers, m.enqueued_at, c.attempt, c.deaths, c.orphan,
              CASE WHEN c.orphan
                   THEN format('the worker died or lost its lease running this job %s time(s) in a row; gave up after %s attempts',
                               c.deaths, c.attempt - 1)
                   ELSE format('gave up after %s attempts (max_attempts is %s)', c.attempt - 1, $4)
              END || coalesce(' (last error: ' || left(c.last_error, 2000) || ')', '') AS reason
),
dead AS (
    INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at)
    SELECT '{name}', msg_id, message,
           longshore.headers(headers) || jsonb_build_object('last_error', reason),
           attempt - 1, reason, enqueued_at
      FROM buried
    ON CONFLICT (queue, msg_id) DO UPDATE
       SET message = excluded.message, headers = excluded.headers, attempts = excluded.attempts,
           last_error = excluded.last_error, failed_at = now()
),
claimed AS (
    UPDATE {q} m
       SET last_read_at = clock_timestamp(),
           vt           = clock_timestamp() + make_interval(secs => $2),
           read_ct      = m.read_ct + 1,
           headers      = CASE WHEN c.orphan
                               THEN longshore.headers(m.headers) || jsonb_build_object('deaths', c.deaths)
                               -- A `deaths` no run of ours wrote (a producer's): dropped.
                               WHEN longshore.headers(m.headers) ? 'deaths'
                               THEN longshore.headers(m.headers) - 'deaths'
                               ELSE m.headers END
      FROM c
     WHERE m.msg_id = c.msg_id AND c.attempt <= $4
       AND m.msg_id = ANY (ARRAY(SELECT msg_id FROM c WHERE attempt <= $4))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message, m.headers, c.orphan, c.deaths
)
SELECT msg_id, read_ct, enqueued_at, message, headers, orphan, deaths, NULL::text AS reason
  FROM claimed
UNION ALL
SELECT msg_id, attempt - 1, enqueued_at, NULL, NULL, orphan, deaths, reason
  FROM buried
"#;

/// The rows of a settling statement that are still held with the given fences,
/// locked in `msg_id` order. `$1` ids, `$2` read_cts; `{extra}` more columns of `f`.
const HELD_LOCKED: &str = r#"
    SELECT m.msg_id {extra}
      FROM {q} m JOIN f ON m.msg_id = f.id AND m.read_ct = f.ct
     WHERE m.last_read_at IS NOT NULL AND m.msg_id = ANY ($1::bigint[])
     ORDER BY m.msg_id
       FOR UPDATE OF m
"#;

const ACK_ARCHIVE: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::jsonb[]) AS f(id, ct, res)),
held AS ({held}),
done AS (
    DELETE FROM {q} m USING held
     WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id, m.vt, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.headers, held.res
)
INSERT INTO {a} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message,
       CASE WHEN res IS NULL THEN headers
            ELSE longshore.headers(headers) || jsonb_build_object('result', res) END
  FROM done
RETURNING msg_id
"#;

/// Deletes done messages and keeps a small completion record for `GET /v1/jobs`.
const ACK_DELETE: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[]) AS f(id, ct)),
held AS ({held}),
done AS (
    DELETE FROM {q} m USING held
     WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id, longshore.attempts(m.read_ct, m.headers) AS attempts,
              longshore.headers(m.headers) ->> 'principal' AS principal
)
INSERT INTO longshore.completions (queue, msg_id, attempts, principal)
SELECT '{name}', msg_id, attempts, principal FROM done
ON CONFLICT (queue, msg_id) DO UPDATE
   SET attempts = excluded.attempts, done_at = now(), principal = excluded.principal
RETURNING msg_id
"#;

/// Retry, snooze, release. Fenced on `last_read_at IS NOT NULL` as well, which this
/// statement clears: applied twice (a retry after a lost answer), it changes nothing the
/// second time, so a release can never count two free reads.
const RESCHEDULE: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::float8[], $4::text[], $5::bool[])
                   AS f(id, ct, delay, err, free)),
held AS ({held})
UPDATE {q} m
   SET vt           = clock_timestamp() + make_interval(secs => held.delay),
       last_read_at = NULL,
       headers      = (longshore.headers(m.headers) - 'deaths')
                      || CASE WHEN held.err IS NULL THEN '{}'::jsonb
                              ELSE jsonb_build_object('last_error', held.err) END
                      || CASE WHEN held.free
                              THEN jsonb_build_object('free_reads', longshore.header_int(m.headers, 'free_reads') + 1)
                              ELSE '{}'::jsonb END
  FROM held
 WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
RETURNING m.msg_id
"#;

const BURY: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::int4[], $4::text[]) AS f(id, ct, attempts, err)),
held AS ({held}),
gone AS (
    DELETE FROM {q} m USING held
     WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id, m.message, m.headers, m.enqueued_at, held.attempts, held.err
)
INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at)
SELECT '{name}', msg_id, message, longshore.headers(headers) || jsonb_build_object('last_error', err),
       attempts, err, enqueued_at
  FROM gone
ON CONFLICT (queue, msg_id) DO UPDATE
   SET message = excluded.message, headers = excluded.headers, attempts = excluded.attempts,
       last_error = excluded.last_error, failed_at = now()
RETURNING msg_id
"#;

/// Extends the leases of held messages without waiting for any lock, and says of each
/// fence whether it was extended, is still held (its row locked, e.g. by an ack that is
/// committing) or is gone. `held` reads the statement's snapshot, from before the update.
const HEARTBEAT: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[]) AS f(id, ct)),
mine AS (
    SELECT m.msg_id
      FROM {q} m JOIN f ON m.msg_id = f.id AND m.read_ct = f.ct
     WHERE m.last_read_at IS NOT NULL AND m.msg_id = ANY ($1::bigint[])
     ORDER BY m.msg_id
       FOR UPDATE OF m SKIP LOCKED
),
extended AS (
    UPDATE {q} m SET vt = clock_timestamp() + make_interval(secs => $3)
      FROM mine WHERE m.msg_id = mine.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id
)
SELECT f.id,
       EXISTS (SELECT 1 FROM extended e WHERE e.msg_id = f.id) AS extended,
       EXISTS (SELECT 1 FROM {q} m
                WHERE m.msg_id = f.id AND m.read_ct = f.ct AND m.last_read_at IS NOT NULL) AS held
  FROM f
"#;

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
       (SELECT count(*) FROM {a})                                         AS archived
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
LIMIT 1
"#;

/// How long until the earliest message of the queue is due (negative: one is due now),
/// NULL for an empty queue: the first row of the vt index. Leased messages count (their
/// lease ends), so do messages this process holds.
const NEXT_DUE: &str = "SELECT extract(epoch FROM vt - clock_timestamp())::float8 \
                        FROM {q} ORDER BY vt LIMIT 1";

impl QueueSql {
    pub fn new(name: QueueName) -> Self {
        let held = |extra: &str| HELD_LOCKED.replace("{extra}", extra);
        let with_held = |t: &str, extra: &str| render(&t.replace("{held}", &held(extra)), &name);
        QueueSql {
            claim: render(CLAIM, &name),
            ack_archive: with_held(ACK_ARCHIVE, ", f.res"),
            ack_delete: with_held(ACK_DELETE, ""),
            reschedule: with_held(RESCHEDULE, ", f.delay, f.err, f.free"),
            bury: with_held(BURY, ", f.attempts, f.err"),
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

    /// Claims up to `limit` visible messages with a lease of `lease`, no suspects and
    /// no attempt limit (tests and benchmarks; the worker uses [`QueueSql::claim_batch`]).
    pub async fn claim(
        &self,
        ex: impl PgExecutor<'_>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, sqlx::Error> {
        let req = ClaimRequest {
            limit,
            lease,
            suspects: 0,
            max_attempts: i32::MAX as u32,
        };
        Ok(self.claim_batch(ex, &req, &[]).await?.claimed)
    }

    /// Claims a batch, none of `held` (ids this process still holds); see
    /// [`ClaimRequest`]. Claimed messages come in the order they became visible.
    pub async fn claim_batch(
        &self,
        ex: impl PgExecutor<'_>,
        req: &ClaimRequest,
        held: &[i64],
    ) -> Result<ClaimResult, sqlx::Error> {
        let max_attempts = i32::try_from(req.max_attempts).unwrap_or(i32::MAX);
        let rows = sqlx::query(&self.claim)
            .bind(req.limit as i64)
            .bind(req.lease.as_secs_f64())
            .bind(req.suspects as i64)
            .bind(max_attempts)
            .bind(held)
            .fetch_all(ex)
            .await?;
        let mut out = ClaimResult::default();
        for r in rows {
            let msg_id: i64 = r.try_get(0)?;
            let read_ct: i32 = r.try_get(1)?;
            if let Some(reason) = r.try_get::<Option<String>, _>(7)? {
                out.buried.push(BuriedAtClaim {
                    msg_id,
                    attempts: read_ct,
                    reason,
                });
                continue;
            }
            // Decoded row by row: the claim has been made (committed, or about to be in
            // its session's transaction through a pooler), so one row that cannot be
            // decoded must not lose the others.
            let decoded = (|| {
                Ok::<_, sqlx::Error>((
                    r.try_get::<Option<Value>, _>(3)?.unwrap_or(Value::Null),
                    r.try_get::<Option<Value>, _>(4)?.unwrap_or(Value::Null),
                ))
            })();
            let (message, headers) = match decoded {
                Ok(v) => v,
                Err(e) => {
                    out.undecodable.push(Undecodable {
                        fence: Fence { msg_id, read_ct },
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let orphan: bool = r.try_get(5)?;
            let deaths: i32 = r.try_get(6)?;
            out.claimed.push(Claimed {
                msg_id,
                read_ct,
                enqueued_at: r.try_get(2)?,
                message,
                headers,
                orphan,
                suspect: orphan && deaths >= 2,
            });
        }
        // SKIP LOCKED + UPDATE ... FROM does not promise order; hand out oldest first.
        out.claimed.sort_unstable_by_key(|c| c.msg_id);
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
        let res: Vec<Option<Value>> = done
            .iter()
            .map(|(_, r)| r.clone().map(clean::json))
            .collect();
        sqlx::query_scalar(&self.ack_archive)
            .bind(ids)
            .bind(cts)
            .bind(res)
            .fetch_all(ex)
            .await
    }

    /// Acknowledges done messages by deleting them (a completion record stays).
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
        let delays: Vec<f64> = items
            .iter()
            .map(|r| clean::delay(r.delay).as_secs_f64())
            .collect();
        let errs: Vec<Option<String>> = items
            .iter()
            .map(|r| r.error.as_deref().map(clean::error_text))
            .collect();
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
        let errs: Vec<String> = items.iter().map(|b| clean::error_text(&b.error)).collect();
        sqlx::query_scalar(&self.bury)
            .bind(ids)
            .bind(cts)
            .bind(attempts)
            .bind(errs)
            .fetch_all(ex)
            .await
    }

    /// Extends the leases of held messages, never waiting for a row lock. Returns what
    /// became of each fence, in input order.
    pub async fn heartbeat(
        &self,
        ex: impl PgExecutor<'_>,
        held: &[Fence],
        lease: Duration,
    ) -> Result<Vec<(Fence, Beat)>, sqlx::Error> {
        let (ids, cts) = split(held);
        let rows = sqlx::query(&self.heartbeat)
            .bind(ids)
            .bind(cts)
            .bind(lease.as_secs_f64())
            .fetch_all(ex)
            .await?;
        let mut by_id = std::collections::HashMap::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0)?;
            let beat = match (r.try_get::<bool, _>(1)?, r.try_get::<bool, _>(2)?) {
                (true, _) => Beat::Extended,
                (false, true) => Beat::Busy,
                (false, false) => Beat::Gone,
            };
            by_id.insert(id, beat);
        }
        Ok(held
            .iter()
            .map(|f| (*f, by_id.get(&f.msg_id).copied().unwrap_or(Beat::Gone)))
            .collect())
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
        "CREATE OR REPLACE TRIGGER longshore_notify AFTER INSERT ON {q} \
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_enqueue()",
        "CREATE OR REPLACE TRIGGER longshore_done_notify AFTER INSERT ON {a} \
         REFERENCING NEW TABLE AS new_rows \
         FOR EACH STATEMENT EXECUTE FUNCTION longshore.notify_archived()",
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
        "SELECT coalesce(bool_or(o LIKE 'autovacuum\\_%'), false) \
           FROM pg_class c LEFT JOIN LATERAL unnest(c.reloptions) o ON true \
          WHERE c.oid = $1::regclass",
    )
    .bind(format!("pgmq.q_{name}"))
    .fetch_one(&mut *ex)
    .await?;
    if !tuned {
        let ddl = "ALTER TABLE {q} SET (autovacuum_vacuum_scale_factor = 0.02, \
                     autovacuum_vacuum_threshold = 1000, \
                     autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000)";
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
