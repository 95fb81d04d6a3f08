//! The store's one completion write path: every outcome of a claimed message (done,
//! retried, snoozed, released, dead-lettered) is a [`Completion`] applied by
//! [`QueueSql::complete`], fenced on `(msg_id, read_ct)`, whether the worker's batched
//! completer writes it or a handler's own transaction (`ctx.tx()`) carries it.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::{Fence, QueueSql, split};
use crate::clean;
use crate::config::OnDone;
use crate::outcome::Action;

/// Put a claimed message back: visible again after `delay`.
#[derive(Debug, Clone)]
pub struct Reschedule {
    /// The claim it settles.
    pub fence: Fence,
    /// From now until the message is visible again.
    pub delay: Duration,
    /// Recorded as `last_error` (retries).
    pub error: Option<String>,
    /// True when this read should not count as an attempt (snooze, release).
    pub free: bool,
}

/// Move a claimed message to the dead letters.
#[derive(Debug, Clone)]
pub struct Bury {
    /// The claim it settles.
    pub fence: Fence,
    /// Attempts spent, as the dead letter records them.
    pub attempts: i32,
    /// Why it died (the last attempt's error, or the reason it was discarded).
    pub error: String,
}

/// One outcome to write for one claimed message.
#[derive(Debug, Clone)]
pub enum Completion {
    /// Done, archived with its result (`on_done = "archive"`).
    Archive(Fence, Option<Value>),
    /// Done and deleted; a completion record stays (`on_done = "delete"`).
    Delete(Fence),
    /// Retried, snoozed or released: visible again later.
    Reschedule(Reschedule),
    /// Moved to the dead letters.
    Bury(Bury),
    /// Cancelled by an operator: moved to `longshore.cancelled_jobs`.
    Cancel(Fence),
}

/// The statement that writes a [`Completion`]: a batch runs one per kind present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Statement {
    /// Writes [`Completion::Archive`]s.
    Archive,
    /// Writes [`Completion::Delete`]s.
    Delete,
    /// Writes [`Completion::Reschedule`]s.
    Reschedule,
    /// Writes [`Completion::Bury`]s.
    Bury,
    /// Writes [`Completion::Cancel`]s.
    Cancel,
}

impl Completion {
    /// What a run's `action` writes under `fence`: the one place where a queue's
    /// `on_done` turns "done" into an archive row or a deletion.
    pub(crate) fn of(fence: Fence, action: Action, on_done: OnDone) -> Completion {
        match action {
            Action::Done(result) => match on_done {
                OnDone::Archive => Completion::Archive(fence, result),
                OnDone::Delete => Completion::Delete(fence),
            },
            Action::Reschedule { delay, error, free } => Completion::Reschedule(Reschedule {
                fence,
                delay,
                error,
                free,
            }),
            Action::Bury { attempts, error } => Completion::Bury(Bury {
                fence,
                attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
                error,
            }),
            Action::Cancel => Completion::Cancel(fence),
        }
    }

    /// A release: visible now, the read not counted as an attempt (shutdown, or a run
    /// that never started).
    pub fn release(fence: Fence) -> Completion {
        // `on_done` only matters for a done action; never the one that deletes.
        Completion::of(fence, Action::RELEASE, OnDone::Archive)
    }

    /// The claim this completion settles.
    pub fn fence(&self) -> Fence {
        match self {
            Completion::Archive(f, _) | Completion::Delete(f) | Completion::Cancel(f) => *f,
            Completion::Reschedule(r) => r.fence,
            Completion::Bury(b) => b.fence,
        }
    }

    /// Which of the batch's statements writes it.
    pub fn statement(&self) -> Statement {
        match self {
            Completion::Archive(..) => Statement::Archive,
            Completion::Delete(_) => Statement::Delete,
            Completion::Reschedule(_) => Statement::Reschedule,
            Completion::Bury(_) => Statement::Bury,
            Completion::Cancel(_) => Statement::Cancel,
        }
    }

    /// True for a job that completed (archived or deleted).
    pub fn is_done(&self) -> bool {
        matches!(self, Completion::Archive(..) | Completion::Delete(_))
    }

    /// The outcome's name in logs.
    pub fn label(&self) -> &'static str {
        match self {
            Completion::Archive(..) | Completion::Delete(_) => "done",
            Completion::Reschedule(r) if r.free => "snooze or release",
            Completion::Reschedule(_) => "retry",
            Completion::Bury(_) => "dead letter",
            Completion::Cancel(_) => "cancelled",
        }
    }
}

/// The rows of a settling statement that are still held with the given fences,
/// locked in `msg_id` order. `$1` ids, `$2` read_cts; `{extra}` more columns of `f`.
pub(super) const HELD_LOCKED: &str = r#"
    SELECT m.msg_id {extra}
      FROM {q} m JOIN f ON m.msg_id = f.id AND m.read_ct = f.ct
     WHERE m.last_read_at IS NOT NULL AND m.msg_id = ANY ($1::bigint[])
     ORDER BY m.msg_id
       FOR UPDATE OF m
"#;

pub(super) const ACK_ARCHIVE: &str = r#"
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
pub(super) const ACK_DELETE: &str = r#"
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
/// second time, so a release can never count two free reads. A message with a cancel
/// request is due at once, whatever its delay: the next claim records it cancelled.
pub(super) const RESCHEDULE: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::float8[], $4::text[], $5::bool[])
                   AS f(id, ct, delay, err, free)),
held AS ({held})
UPDATE {q} m
   SET vt           = CASE WHEN longshore.headers(m.headers) ? 'cancel_requested' THEN clock_timestamp()
                           ELSE clock_timestamp() + make_interval(secs => held.delay) END,
       last_read_at = NULL,
       headers      = (longshore.headers(m.headers) - 'deaths')
                      || CASE WHEN held.err IS NULL THEN '{}'::jsonb
                              ELSE jsonb_build_object('last_error', held.err,
                                     'errors', longshore.error_history(m.headers,
                                                 longshore.attempts(m.read_ct, m.headers), held.err))
                              END
                      || CASE WHEN held.free
                              THEN jsonb_build_object('free_reads', longshore.header_int(m.headers, 'free_reads') + 1)
                              ELSE '{}'::jsonb END
  FROM held
 WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
RETURNING m.msg_id
"#;

pub(super) const BURY: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[], $3::int4[], $4::text[]) AS f(id, ct, attempts, err)),
held AS ({held}),
gone AS (
    DELETE FROM {q} m USING held
     WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id, m.message, m.headers, m.enqueued_at, held.attempts, held.err
)
INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at)
SELECT '{name}', msg_id, message,
       longshore.headers(headers) || jsonb_build_object('last_error', err,
                                       'errors', longshore.error_history(headers, attempts, err)),
       attempts, err, enqueued_at
  FROM gone
ON CONFLICT (queue, msg_id) DO UPDATE
   SET message = excluded.message, headers = excluded.headers, attempts = excluded.attempts,
       last_error = excluded.last_error, failed_at = now()
RETURNING msg_id
"#;

/// A held message an operator cancelled, to `longshore.cancelled_jobs` (who asked is
/// in its `cancel_requested` header).
pub(super) const CANCEL: &str = r#"
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::int4[]) AS f(id, ct)),
held AS ({held}),
gone AS (
    DELETE FROM {q} m USING held
     WHERE m.msg_id = held.msg_id AND m.msg_id = ANY ($1::bigint[])
    RETURNING m.msg_id, m.read_ct, m.message, m.headers, m.enqueued_at
)
INSERT INTO longshore.cancelled_jobs (queue, msg_id, message, headers, attempts, enqueued_at, cancelled_by)
SELECT '{name}', msg_id, message, headers, longshore.attempts(read_ct, headers), enqueued_at,
       coalesce(longshore.headers(headers) -> 'cancel_requested' ->> 'by', 'unknown')
  FROM gone
ON CONFLICT (queue, msg_id) DO UPDATE
   SET message = excluded.message, headers = excluded.headers, attempts = excluded.attempts,
       enqueued_at = excluded.enqueued_at, cancelled_by = excluded.cancelled_by, cancelled_at = now()
RETURNING msg_id
"#;

impl QueueSql {
    /// Writes completions, fenced: one statement per [`Statement`] present, in that
    /// order, on `c` (a handler's completion transaction, or a connection of the
    /// completer's). Returns the ids written; a fence that no longer holds (the lease
    /// was lost, or the write already happened) writes nothing and is not returned.
    /// Callers that retry on a transient error pass one kind at a time, so a statement
    /// that succeeded is never repeated.
    pub async fn complete(
        &self,
        c: &mut PgConnection,
        writes: &[Completion],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut ids = Vec::with_capacity(writes.len());
        let of = |k: Statement| writes.iter().filter(move |w| w.statement() == k);
        let archive: Vec<(Fence, Option<Value>)> = of(Statement::Archive)
            .filter_map(|w| match w {
                Completion::Archive(f, r) => Some((*f, r.clone())),
                _ => None,
            })
            .collect();
        if !archive.is_empty() {
            ids.extend(self.ack_archive(&mut *c, &archive).await?);
        }
        let delete: Vec<Fence> = of(Statement::Delete).map(Completion::fence).collect();
        if !delete.is_empty() {
            ids.extend(self.ack_delete(&mut *c, &delete).await?);
        }
        let resched: Vec<Reschedule> = of(Statement::Reschedule)
            .filter_map(|w| match w {
                Completion::Reschedule(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        if !resched.is_empty() {
            ids.extend(self.reschedule(&mut *c, &resched).await?);
        }
        let bury: Vec<Bury> = of(Statement::Bury)
            .filter_map(|w| match w {
                Completion::Bury(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        if !bury.is_empty() {
            ids.extend(self.bury(&mut *c, &bury).await?);
        }
        let cancel: Vec<Fence> = of(Statement::Cancel).map(Completion::fence).collect();
        if !cancel.is_empty() {
            let (fids, cts) = split(&cancel);
            let done: Vec<i64> = sqlx::query_scalar(&self.cancel)
                .bind(fids)
                .bind(cts)
                .fetch_all(&mut *c)
                .await?;
            ids.extend(done);
        }
        Ok(ids)
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
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const F: Fence = Fence {
        msg_id: 7,
        read_ct: 2,
    };

    #[test]
    fn done_is_archived_or_deleted_by_the_queue_alone() {
        let done = || Action::Done(Some(json!({"n": 1})));
        assert!(matches!(
            Completion::of(F, done(), OnDone::Archive),
            Completion::Archive(F, Some(r)) if r == json!({"n": 1})
        ));
        let deleted = Completion::of(F, done(), OnDone::Delete);
        assert!(matches!(deleted, Completion::Delete(F)));
        assert!(deleted.is_done());
        assert_eq!(deleted.statement(), Statement::Delete);
    }

    #[test]
    fn retries_releases_and_dead_letters_keep_their_fence() {
        let retry = Action::Reschedule {
            delay: Duration::from_secs(3),
            error: Some("boom".into()),
            free: false,
        };
        let c = Completion::of(F, retry, OnDone::Delete);
        assert_eq!((c.fence(), c.label(), c.is_done()), (F, "retry", false));
        let Completion::Reschedule(r) = Completion::release(F) else {
            panic!("a release reschedules")
        };
        assert_eq!((r.delay, r.free, r.error), (Duration::ZERO, true, None));
        let bury = Action::Bury {
            attempts: u32::MAX,
            error: "gave up".into(),
        };
        let Completion::Bury(b) = Completion::of(F, bury, OnDone::Archive) else {
            panic!("a bury buries")
        };
        assert_eq!(b.attempts, i32::MAX, "clamped, not wrapped negative");
    }
}
