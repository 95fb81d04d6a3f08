//! Where outcomes are written, through the store's one completion path
//! ([`QueueSql::complete`]): batched for the acker (`Done` without a transaction,
//! retries, snoozes, releases, dead letters), or inside a handler's completion
//! transaction for `Done` after `ctx.tx()`. (The consumer's last release at shutdown
//! goes through the same function.)
//!
//! A batched statement is retried while its error is transient (connection lost, pool
//! exhausted, deadlock, lock timeout, our own deadline) until a lease (or three statement
//! deadlines) has passed or the shutdown deadline comes: by then the jobs' leases have
//! lapsed unless the heartbeat still reaches the database, so giving up loses nothing.
//! Any other error is about the data of some row: the batch is then settled row by row,
//! so one bad job cannot take the others of its flush down with it, and a row that
//! still fails alone is written the next best way: a `Done` stays done (its result
//! replaced by the error, or a completion record instead of the archive row), anything
//! else is dead-lettered with the database's reason.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::Observer;
use super::held::Held;
use crate::config::OnDone;
use crate::outcome::Action;
use crate::store::{Bury, Completion, Fence, QueueSql, Statement};
use crate::telemetry as t;

/// An outcome to write.
pub(super) struct Settle {
    pub fence: Fence,
    pub action: Action,
}

/// When the process must be done writing (set once, at shutdown).
#[derive(Default)]
pub(super) struct StopBy(OnceLock<Instant>);

impl StopBy {
    pub fn set(&self, at: Instant) {
        let _ = self.0.set(at);
    }
    pub fn get(&self) -> Option<Instant> {
        self.0.get().copied()
    }
    /// `at`, or earlier if the shutdown deadline comes first.
    pub fn cap(&self, at: Instant) -> Instant {
        self.get().map_or(at, |s| s.min(at))
    }
}

/// A statement's failure: transient (worth retrying as is) or about the data.
enum Failure {
    Transient(String),
    Data(String),
}

/// Errors that say nothing about the rows: the connection, the pool, the server's
/// state, lock waits. Everything else (a data exception, a constraint, a trigger's
/// `RAISE`) is about some row.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|p| c.starts_with(p))
                || c == "55P03"
        }),
        _ => false,
    }
}

pub(super) struct Completer {
    pub queue: &'static str,
    pub sql: Arc<QueueSql>,
    pub control: PgPool,
    pub on_done: OnDone,
    pub lease: Duration,
    pub statement_timeout: Duration,
    pub batch: usize,
    pub flush_after: Duration,
    pub held: Arc<Held>,
    pub stop_by: Arc<StopBy>,
    pub observer: Option<Arc<dyn Observer>>,
    /// The consumer's wake-up: a rescheduled job may be due before the time an idle
    /// consumer sleeps until.
    pub wake: Arc<tokio::sync::Notify>,
}

impl Completer {
    /// Writes outcomes in batches: up to `batch`, or `flush_after` after the first one
    /// arrived. Ends when every sender is gone, or when `close` is cancelled (shutdown: a
    /// task stuck in synchronous code may still hold a sender), after writing what has
    /// arrived.
    pub async fn run(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Settle>,
        close: tokio_util::sync::CancellationToken,
    ) {
        let mut buf: Vec<Settle> = Vec::with_capacity(self.batch);
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
                _ = close.cancelled() => {
                    rx.close();
                    while let Ok(s) = rx.try_recv() {
                        buf.push(s);
                        if buf.len() == self.batch {
                            self.flush(std::mem::take(&mut buf)).await;
                        }
                    }
                    if !buf.is_empty() {
                        self.flush(std::mem::take(&mut buf)).await;
                    }
                    return;
                }
            };
            buf.push(first);
            let deadline = tokio::time::Instant::now() + self.flush_after;
            while buf.len() < self.batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => buf.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            self.flush(std::mem::take(&mut buf)).await;
        }
    }

    async fn flush(&self, batch: Vec<Settle>) {
        // Give up when the database has not answered for a while: a lease, or three
        // statement deadlines if that is longer (a flush has up to three statements).
        // Waiting longer than the lease is safe: settling jobs keep being heartbeated,
        // and if their leases lapsed meanwhile the write is fenced out.
        let horizon = self.lease.max(self.statement_timeout * 3);
        let give_up_at = self.stop_by.cap(Instant::now() + horizon);
        let fences: Vec<Fence> = batch.iter().map(|s| s.fence).collect();
        let mut groups: std::collections::BTreeMap<Statement, Vec<Completion>> = Default::default();
        for s in batch {
            let c = Completion::of(s.fence, s.action, self.on_done);
            groups.entry(c.statement()).or_default().push(c);
        }
        let (mut done, mut stale) = (0usize, 0usize);
        // Each statement is retried on its own, so one that already succeeded is never
        // repeated (a repeat would match 0 rows and look stale).
        for items in groups.values_mut() {
            items.sort_unstable_by_key(Completion::fence);
            if let Some(changed) = self.settle_group(items, give_up_at).await {
                stale += items.len() - changed;
                if items[0].is_done() {
                    done += changed;
                }
            }
        }
        if stale > 0 {
            metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(stale as u64);
            warn!(
                queue = self.queue,
                stale, "acknowledgements fenced out (leases lost)"
            );
        }
        for f in &fences {
            self.held.finish(*f);
        }
        if let Some(o) = &self.observer {
            o.acked(self.queue, done, stale);
        }
    }

    /// Writes one group; on a data error, row by row. Returns how many rows changed, or
    /// `None` if it gave up (the database was unreachable until `give_up_at`).
    async fn settle_group(&self, items: &[Completion], give_up_at: Instant) -> Option<usize> {
        match self.retry_transient(items, give_up_at).await {
            Ok(ids) => return Some(ids.len()),
            Err(Failure::Transient(e)) => {
                error!(queue = self.queue, error = %e, count = items.len(),
                    "could not write outcomes before the lease ended; these jobs will run again");
                return None;
            }
            Err(Failure::Data(e)) if items.len() == 1 => {
                return self.bury_unwritable(&items[0], &e, give_up_at).await;
            }
            Err(Failure::Data(e)) => warn!(queue = self.queue, error = %e, count = items.len(),
                "a batched write failed on its data; writing its rows one by one"),
        }
        let mut changed = 0;
        for item in items {
            match self
                .retry_transient(std::slice::from_ref(item), give_up_at)
                .await
            {
                Ok(ids) => changed += ids.len(),
                Err(Failure::Transient(_)) => {}
                Err(Failure::Data(e)) => {
                    changed += self
                        .bury_unwritable(item, &e, give_up_at)
                        .await
                        .unwrap_or(0);
                }
            }
        }
        Some(changed)
    }

    /// A row whose outcome cannot be written as it is: written the next best way, so it
    /// neither loops nor vanishes. A `Done` stays done (its result replaced by the error,
    /// else a completion record without the archive row): dead-lettering a job that
    /// completed would invite an operator to run it twice. Anything else is
    /// dead-lettered with the database's reason.
    async fn bury_unwritable(
        &self,
        item: &Completion,
        e: &str,
        give_up_at: Instant,
    ) -> Option<usize> {
        let fence = item.fence();
        error!(queue = self.queue, id = fence.msg_id, error = %e, outcome = item.label(),
            "an outcome could not be written as it is; writing it the next best way");
        let bury = |error: String| {
            Completion::Bury(Bury {
                fence,
                attempts: fence.read_ct,
                error,
            })
        };
        let alternatives: Vec<Completion> = match item {
            Completion::Archive(_, Some(_)) => vec![
                Completion::Archive(
                    fence,
                    Some(
                        serde_json::json!({"longshore_error": format!("the result could not be stored: {e}")}),
                    ),
                ),
                Completion::Delete(fence),
                bury(format!(
                    "the job completed, but its completion could not be recorded ({e}); retry it only if it is safe to run twice"
                )),
            ],
            Completion::Archive(_, None) => vec![
                Completion::Delete(fence),
                bury(format!(
                    "the job completed, but its completion could not be recorded ({e}); retry it only if it is safe to run twice"
                )),
            ],
            Completion::Delete(_) => vec![bury(format!(
                "the job completed, but its completion could not be recorded ({e}); retry it only if it is safe to run twice"
            ))],
            Completion::Reschedule(_) | Completion::Bury(_) | Completion::Cancel(_) => {
                vec![bury(format!(
                    "the runtime could not record this job's outcome ({}): {e}",
                    item.label()
                ))]
            }
        };
        for alt in alternatives {
            match self
                .retry_transient(std::slice::from_ref(&alt), give_up_at)
                .await
            {
                Ok(ids) => return Some(ids.len()),
                Err(Failure::Transient(_)) => return None,
                Err(Failure::Data(next)) => {
                    warn!(queue = self.queue, id = fence.msg_id, error = %next, "that failed too")
                }
            }
        }
        None
    }

    /// Runs one statement until it succeeds, fails on its data, or `give_up_at` passes.
    async fn retry_transient(
        &self,
        items: &[Completion],
        give_up_at: Instant,
    ) -> Result<Vec<i64>, Failure> {
        let mut tries = 0u32;
        loop {
            // A shutdown that began meanwhile brings the deadline forward.
            let give_up_at = self.stop_by.cap(give_up_at);
            let left = give_up_at.saturating_duration_since(Instant::now());
            let limit = self
                .statement_timeout
                .min(left)
                .max(Duration::from_millis(50));
            let e = match tokio::time::timeout(limit, self.statement(items)).await {
                Ok(Ok(ids)) => return Ok(ids),
                Ok(Err(e)) if !is_transient(&e) => return Err(Failure::Data(e.to_string())),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {limit:?}"),
            };
            tries += 1;
            let wait =
                crate::backoff::delay(tries, Duration::from_millis(50), Duration::from_secs(2));
            if Instant::now() + wait >= give_up_at {
                return Err(Failure::Transient(e));
            }
            warn!(queue = self.queue, error = %e, retry_in = ?wait, "writing outcomes failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn statement(&self, items: &[Completion]) -> Result<Vec<i64>, sqlx::Error> {
        let r = crate::db::run(&self.control, crate::db::Deadline::Control, async |c| {
            self.sql.complete(c, items).await
        })
        .await;
        if matches!(items[0], Completion::Reschedule(_)) {
            self.wake.notify_one();
        }
        r
    }

    /// Transactional completion: the handler's writes and the fenced acknowledgement
    /// commit together, or neither does. `Ok(true)`: done; `Ok(false)`: the lease was
    /// lost and everything rolled back; `Err`: unknown whether the commit landed (a
    /// fenced retry is harmless either way: 0 rows if it did).
    pub async fn commit_done(
        &self,
        mut tx: Transaction<'static, Postgres>,
        fence: Fence,
        result: Option<Value>,
    ) -> Result<bool, String> {
        let work = async {
            let done = Completion::of(fence, Action::Done(result), self.on_done);
            let acked = self.sql.complete(&mut tx, &[done]).await?;
            if acked.len() == 1 {
                tx.commit().await?;
                Ok::<bool, sqlx::Error>(true)
            } else {
                tx.rollback().await?;
                Ok(false)
            }
        };
        // Bounded, but generously: the commit carries the handler's effects (maybe a
        // large COPY), and while it is pending its message's row stays locked, so nobody
        // else can claim it. A commit that takes longer than a lease is a dead
        // connection; the job then retries (fenced: a no-op if the commit did land).
        let limit = self.lease.max(self.statement_timeout);
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(done)) => {
                if !done {
                    metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(1);
                    warn!("lease was lost before completion; effects rolled back");
                }
                if let Some(o) = &self.observer {
                    o.acked(self.queue, usize::from(done), usize::from(!done));
                }
                Ok(done)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the completion transaction got no answer within {limit:?}"
            )),
        }
    }
}
