//! One run of one claimed message: wait for an earlier run of it to stop (if this
//! process re-claimed its own message), run the handler under its timeout and
//! cancellation, then hand the outcome to the completer: the one settle path.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Consumer;
use super::completer::Settle;
use super::held::{Claim, Stop};
use crate::job::{JobContext, Outcome};
use crate::outcome::{Action, decide};
use crate::store::{Claimed, Fence};
use crate::telemetry as t;

/// Cancels `stopped` when dropped: the handler future is gone, however it ended.
struct StoppedGuard(CancellationToken);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Consumer {
    pub(super) async fn execute(
        self: Arc<Self>,
        msg: Claimed,
        claim: Claim,
        settle: mpsc::UnboundedSender<Settle>,
    ) {
        let fence = Fence {
            msg_id: msg.msg_id,
            read_ct: msg.read_ct,
        };
        let stopped = StoppedGuard(claim.stopped.clone());
        if let Some(prev) = claim.wait_for {
            warn!(
                "this process still runs an earlier read of this message (its lease ran out); waiting for it to stop"
            );
            tokio::select! {
                _ = prev.cancelled() => {}
                _ = claim.cancel.cancelled() => {}
            }
            if !self.held.start(fence) {
                drop(stopped);
                return self
                    .settle_cancelled(fence, msg.attempt(), false, None, &settle)
                    .await;
            }
        }
        let attempt = msg.attempt();
        if let Some(o) = &self.observer {
            o.job_started(self.queue, msg.msg_id, attempt);
        }
        let mut ctx = JobContext::new(
            msg.msg_id,
            self.queue,
            attempt,
            self.settings.max_attempts,
            msg.enqueued_at,
            claim.cancel.clone(),
            self.pool.clone(),
        );
        ctx.principal = msg
            .headers
            .get("principal")
            .and_then(|p| p.as_str())
            .map(str::to_string);
        ctx.fire_at = msg
            .headers
            .get("fire_at")
            .and_then(|p| p.as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let started = Instant::now();
        let timeout = self.settings.timeout;
        let outcome = {
            let run = AssertUnwindSafe(self.handler.call(msg.message, &mut ctx)).catch_unwind();
            tokio::select! {
                r = tokio::time::timeout(timeout, run) => match r {
                    Ok(Ok(o)) => Some(o),
                    Ok(Err(panic)) => Some(Outcome::Retry(format!("handler panicked: {}", panic_message(&panic)))),
                    Err(_) => Some(Outcome::Retry(format!("timed out after {:.3}s", timeout.as_secs_f64()))),
                },
                _ = claim.cancel.cancelled() => None,
            }
        };
        // The handler future is dropped here: a run waiting for this one may start.
        drop(stopped);
        let elapsed = started.elapsed();
        metrics::histogram!(t::JOB_DURATION, "queue" => self.queue).record(elapsed.as_secs_f64());
        let tx = ctx.take_tx();
        // A run the runtime stopped whose handler saw the token and answered it
        // (`select!` above takes the answer or the token at random when both are
        // ready) settles as the stop says where the answer is only a reaction to it: a
        // retry at a shutdown is released (no attempt spent on it), and anything but
        // done at an operator's cancel is cancelled. A done, a snooze (its own delay)
        // or a fail at a shutdown, and every answer under a lapsed or lost lease, stand
        // (fenced as ever).
        let overridden = |o: &Outcome| match self.held.why(fence) {
            Some(Stop::Cancelled) => !matches!(o, Outcome::Done(_)),
            Some(Stop::Shutdown) => matches!(o, Outcome::Retry(_)),
            _ => false,
        };
        let outcome = outcome.filter(|o| !overridden(o));
        let Some(outcome) = outcome else {
            return self
                .settle_cancelled(fence, attempt, true, tx, &settle)
                .await;
        };
        if !self.held.settling(fence) {
            // Claimed again meanwhile (here or elsewhere): the write would be fenced out.
            rollback(tx).await;
            metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => "lost")
                .increment(1);
            warn!(
                "the lease was lost while the handler ran; its outcome is dropped and its effects rolled back"
            );
            self.held.finish(fence);
            return;
        }
        let action = decide(&outcome, attempt, &self.settings, rand::random());
        let label = action.label(&outcome);
        match (&outcome, &action) {
            (_, Action::Done(_)) => debug!(took = ?elapsed, "done"),
            (Outcome::Fail(e), _) => warn!(error = %e, "failed; dead-lettered"),
            (Outcome::Retry(e), Action::Bury { .. }) => {
                warn!(error = %e, "attempts exhausted; dead-lettered")
            }
            (Outcome::Retry(e), _) => info!(error = %e, "will retry"),
            _ => debug!(outcome = label, "rescheduled"),
        }
        metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => label).increment(1);
        match (action, tx) {
            (Action::Done(result), Some(tx)) => {
                match self.completer.commit_done(tx, fence, result).await {
                    Ok(_) => self.held.finish(fence),
                    Err(e) => {
                        warn!(error = %e, "completion transaction failed; retrying the job");
                        let action = decide(
                            &Outcome::Retry(format!("completion failed: {e}")),
                            attempt,
                            &self.settings,
                            rand::random(),
                        );
                        let _ = settle.send(Settle { fence, action });
                    }
                }
            }
            (action, tx) => {
                rollback(tx).await;
                let _ = settle.send(Settle { fence, action });
            }
        }
    }

    /// A cancelled run (before or while its handler ran): its effects roll back, and
    /// its message is released, retried or left alone, by why it was cancelled. A run
    /// that never started (`started` false) is only ever released: it spent nothing.
    async fn settle_cancelled(
        &self,
        fence: Fence,
        attempt: u32,
        started: bool,
        tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
        settle: &mpsc::UnboundedSender<Settle>,
    ) {
        rollback(tx).await;
        let why = self.held.why(fence);
        let outcome = match why {
            Some(Stop::LeaseLost) | None => "lost",
            Some(Stop::Shutdown) => "released",
            Some(Stop::LeaseLapsed) => "lapsed",
            Some(Stop::Cancelled) => "cancelled",
        };
        metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => outcome).increment(1);
        let action = match why {
            Some(Stop::LeaseLost) | None => {
                warn!("job cancelled: its lease was lost; its effects were rolled back");
                self.held.finish(fence);
                return;
            }
            Some(Stop::Cancelled) => {
                info!("job cancelled by an operator; its effects were rolled back");
                Action::Cancel
            }
            Some(Stop::Shutdown | Stop::LeaseLapsed) if !started => {
                info!("job cancelled before it started; released (its attempt is not spent)");
                Action::RELEASE
            }
            Some(Stop::Shutdown) => {
                info!("job cancelled by shutdown; released (its attempt is not spent)");
                Action::RELEASE
            }
            Some(Stop::LeaseLapsed) => {
                let lease = self.settings.lease;
                warn!(
                    "job cancelled: its lease could not be extended; its effects were rolled back"
                );
                decide(
                    &Outcome::Retry(format!(
                        "cancelled: the lease ({:.0}s) could not be extended in time (database unreachable or too slow)",
                        lease.as_secs_f64()
                    )),
                    attempt,
                    &self.settings,
                    rand::random(),
                )
            }
        };
        if self.held.settling(fence) {
            let _ = settle.send(Settle { fence, action });
        }
    }
}

/// Rolls a handler's transaction back, without waiting long for a database that does not
/// answer (dropping it rolls back too, when its connection is next used or closed).
async fn rollback(tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>) {
    if let Some(tx) = tx {
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.rollback()).await;
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
