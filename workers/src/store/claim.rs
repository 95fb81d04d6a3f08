//! Leases: claiming a batch (the hot path's one round trip) and extending what is
//! held. Fenced writes of outcomes are in [`super::complete`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

use super::{Fence, QueueSql, split};

/// A message as claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job's id.
    pub msg_id: i64,
    /// The fencing token: every later write about this message must present it.
    pub read_ct: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// The job's args.
    pub message: Value,
    /// Its pgmq headers.
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
    /// How long the claim holds before the message is visible again, unless a
    /// heartbeat extends it.
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
    /// The claim to bury.
    pub fence: Fence,
    /// What the decoder said.
    pub error: String,
}

/// A message dead-lettered by the claim itself: its attempts were spent although no
/// run returned an outcome to bury it (a crash loop).
#[derive(Debug, Clone)]
pub struct BuriedAtClaim {
    /// The job's id.
    pub msg_id: i64,
    /// Attempts it spent.
    pub attempts: i32,
    /// The error its dead letter records.
    pub reason: String,
}

/// What a claim got.
#[derive(Debug, Clone, Default)]
pub struct ClaimResult {
    /// Messages now leased to the caller, to run.
    pub claimed: Vec<Claimed>,
    /// Messages the claim dead-lettered instead (attempts spent in a crash loop).
    pub buried: Vec<BuriedAtClaim>,
    /// Messages leased to the caller that it must dead-letter (cannot be decoded).
    pub undecodable: Vec<Undecodable>,
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
    /// Still ours (`extended` or not, as for [`Beat::Extended`] and [`Beat::Busy`]),
    /// and an operator asked to cancel it: its run is to stop.
    Cancelled {
        /// The lease was extended too.
        extended: bool,
    },
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
///
/// A paused queue (`longshore.queue_controls`) gives nothing: the pause is an
/// uncorrelated subquery, evaluated once per claim (a one-time filter in the plan, one
/// primary-key probe), so every consumer sees a pause at its next claim.
pub(super) const CLAIM: &str = r#"
WITH normal AS (
    SELECT msg_id, read_ct, headers, last_read_at FROM {q}
     WHERE vt <= (SELECT clock_timestamp())
       AND NOT EXISTS (SELECT 1 FROM longshore.queue_controls WHERE queue = '{name}' AND paused)
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
       AND NOT EXISTS (SELECT 1 FROM longshore.queue_controls WHERE queue = '{name}' AND paused)
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
           longshore.headers(headers) || jsonb_build_object('last_error', reason,
                                             'errors', longshore.error_history(headers, attempt - 1, reason)),
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

/// Extends the leases of held messages without waiting for any lock, and says of each
/// fence whether it was extended, is still held (its row locked, e.g. by an ack that is
/// committing) or is gone, and whether an operator asked to cancel it (one lookup of the
/// row for both). `held` reads the statement's snapshot, from before the update.
pub(super) const HEARTBEAT: &str = r#"
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
       m.msg_id IS NOT NULL AS held,
       coalesce(longshore.headers(m.headers) ? 'cancel_requested', false) AS cancel
  FROM f
  LEFT JOIN {q} m ON m.msg_id = f.id AND m.read_ct = f.ct AND m.last_read_at IS NOT NULL
                 AND m.msg_id = ANY ($1::bigint[])
"#;

impl QueueSql {
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
            let (extended, held, cancel): (bool, bool, bool) =
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let beat = match (extended, held, cancel) {
                (extended, true, true) => Beat::Cancelled { extended },
                (true, _, _) => Beat::Extended,
                (false, true, _) => Beat::Busy,
                (false, false, _) => Beat::Gone,
            };
            by_id.insert(id, beat);
        }
        Ok(held
            .iter()
            .map(|f| (*f, by_id.get(&f.msg_id).copied().unwrap_or(Beat::Gone)))
            .collect())
    }
}
