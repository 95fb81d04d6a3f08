//! One queue's consumer: the claim loop. It claims batches up to its free slots (and
//! the process's free handler slots), hands each claimed message to [`super::execute`],
//! sleeps when the queue is idle until a notification, its poll or the next due
//! message, and at shutdown drains, then releases what it still holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::completer::{Completer, Settle, StopBy};
use super::held::Held;
use super::{Observer, SHUTDOWN_SLACK};
use crate::config::QueueSettings;
use crate::db::{self, Deadline};
use crate::listener;
use crate::outcome::Action;
use crate::registry::ErasedHandler;
use crate::store::{ClaimRequest, Claimed, Completion, Fence, QueueSql};
use crate::telemetry as t;

/// Enqueue notifications are debounced per queue (one per millisecond, see the
/// notify_budget migration): a consumer woken by one claims again this long after it,
/// for the jobs whose enqueue ran just after the one that notified and did not notify
/// itself; and until `poll_interval` after the wake it does not sleep longer than the
/// short poll (their commits may wait for a WAL flush, or a transaction).
const FOLLOW_UP: Duration = Duration::from_millis(5);

/// One permit off `slots` (the last one takes the whole).
fn take_one(
    slots: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots {
        Some(s) if s.num_permits() > 1 => s.split(1),
        _ => slots.take(),
    }
}

/// An idle consumer's longest sleep: `idle_poll_max` spread per queue (80–100%), so the
/// queues of a process started together do not all look again in the same moment;
/// never below `poll_interval`. `None` when `idle_poll_max` is not above
/// `poll_interval`: then an idle consumer simply polls.
pub(super) fn idle_cap(
    queue: &str,
    idle_poll_max: Duration,
    poll_interval: Duration,
) -> Option<Duration> {
    use std::hash::{Hash, Hasher};
    if idle_poll_max <= poll_interval {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    queue.hash(&mut h);
    let spread = 0.8 + 0.2 * (h.finish() % 1000) as f64 / 1000.0;
    Some(idle_poll_max.mul_f64(spread).max(poll_interval))
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(crate) struct Consumer {
    pub(super) queue: &'static str,
    pub(super) sql: Arc<QueueSql>,
    pub(super) settings: QueueSettings,
    pub(super) handler: Arc<dyn ErasedHandler>,
    pub(super) pool: PgPool,
    pub(super) control: PgPool,
    pub(super) control_timeout: Duration,
    pub(super) held: Arc<Held>,
    pub(super) completer: Arc<Completer>,
    /// The completer's deadline, set at shutdown.
    pub(super) stop_by: Arc<StopBy>,
    /// When the shutdown signal came.
    pub(super) signalled: Arc<StopBy>,
    pub(super) suspects: Arc<Semaphore>,
    /// `worker.max_handlers`: one permit per running handler, all queues together.
    pub(super) handler_slots: Arc<Semaphore>,
    pub(super) max_handlers: usize,
    pub(super) listening: Arc<std::sync::atomic::AtomicBool>,
    pub(super) ack_batch: usize,
    pub(super) wake: Arc<Notify>,
    pub(super) poll_interval: Duration,
    /// See [`idle_cap`].
    pub(super) idle_cap: Option<Duration>,
    pub(super) grace: Duration,
    pub(super) observer: Option<Arc<dyn Observer>>,
}

impl Consumer {
    pub(super) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (settle_tx, settle_rx) = mpsc::unbounded_channel::<Settle>();
        let close = CancellationToken::new();
        let completer = tokio::spawn(self.completer.clone().run(settle_rx, close.clone()));

        let conc = self.settings.concurrency;
        let min_batch = (conc / 8).max(1);
        let mut jobs = JoinSet::new();
        let mut idle = false;
        // A claim again shortly after a notification's: see [`FOLLOW_UP`].
        let mut follow_up: Option<tokio::time::Instant> = None;
        let mut db_errors = 0u32;
        // When an idle consumer looks again without a notification.
        let mut next_poll = tokio::time::Instant::now() + self.poll_interval;
        // A process-wide handler slot this consumer waited for (all were taken).
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut starved;
        // When a notification last woke this consumer: within `poll_interval` of it, an
        // idle sleep is the short poll (a debounced enqueue may still be committing).
        let mut woken_at: Option<Instant> = None;
        // The last idle look found a message due and not claimed (see `idle_until`).
        let mut overdue = false;
        let mut released_at_signal = false;

        loop {
            while jobs.try_join_next().is_some() {}
            if shutdown.is_cancelled() {
                break;
            }
            // Outcomes waiting to be written hold their messages too: past one batch of
            // them (a slow flush), they hold the claims back.
            let settling = self.held.len().saturating_sub(jobs.len());
            let local_free =
                conc.saturating_sub(jobs.len() + settling.saturating_sub(self.ack_batch));
            let want = !idle && local_free > 0 && (local_free >= min_batch || jobs.is_empty());
            let mut free = 0;
            // Within the process-wide cap: take the slots before claiming, so two
            // consumers never claim the same last slot. Unused ones go back right after
            // the claim. (The process's one suspect may run beside the cap: at most one
            // handler over it.)
            let mut slots = reserved.take();
            if want {
                let have = slots.as_ref().map_or(0, |p| p.num_permits());
                let more = local_free
                    .saturating_sub(have)
                    .min(self.handler_slots.available_permits());
                if more > 0
                    && let Ok(p) = self
                        .handler_slots
                        .clone()
                        .try_acquire_many_owned(more as u32)
                {
                    match &mut slots {
                        Some(s) => s.merge(p),
                        None => slots = Some(p),
                    }
                }
                free = local_free.min(slots.as_ref().map_or(0, |p| p.num_permits()));
            }
            // Room in this queue, none in the process: wait for a handler slot.
            starved = want && free == 0;
            if want && free > 0 {
                let permit = self.suspects.clone().try_acquire_owned().ok();
                let req = ClaimRequest {
                    limit: free,
                    lease: self.settings.lease,
                    suspects: usize::from(permit.is_some()),
                    max_attempts: self.settings.max_attempts,
                };
                let sent = Instant::now();
                let held = self.held.ids();
                let claim = tokio::time::timeout(
                    self.control_timeout,
                    db::run(&self.control, Deadline::Control, async |c| {
                        self.sql.claim_batch(c, &req, &held).await
                    }),
                );
                tokio::pin!(claim);
                // A claim in flight when the signal comes may still be granted: wait for
                // it (within the grace period) and release what it got, rather than drop
                // it and leave its messages leased to nobody until their lease ends.
                let claimed = tokio::select! {
                    r = &mut claim => r,
                    _ = shutdown.cancelled() => {
                        match tokio::time::timeout_at(self.grace_deadline().into(), &mut claim).await {
                            Ok(r) => r,
                            Err(_) => break,
                        }
                    }
                };
                match claimed {
                    Ok(Ok(batch)) => {
                        db_errors = 0;
                        idle = batch.claimed.len() + batch.buried.len() + batch.undecodable.len()
                            < free;
                        if !batch.claimed.is_empty() {
                            // Work found: a message due and unclaimed next is not stuck.
                            overdue = false;
                        }

                        tracing::debug!(queue = self.queue, free, claimed = batch.claimed.len(),
                            running = jobs.len(), settling, took = ?sent.elapsed(), "claim");
                        for b in &batch.buried {
                            metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => "exhausted").increment(1);
                            warn!(queue = self.queue, id = b.msg_id, attempts = b.attempts, reason = %b.reason,
                                "attempts spent with no outcome; dead-lettered at claim");
                        }
                        for u in batch.undecodable {
                            metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => "fail").increment(1);
                            warn!(queue = self.queue, id = u.fence.msg_id, error = %u.error,
                                "a message that cannot be decoded; dead-lettered");
                            let _ = settle_tx.send(Settle {
                                fence: u.fence,
                                action: Action::Bury {
                                    attempts: u.fence.read_ct as u32,
                                    error: format!("the message cannot be decoded: {}", u.error),
                                },
                            });
                        }
                        if shutdown.is_cancelled() {
                            // Granted as the signal came: released, attempt not spent.
                            released_at_signal = !batch.claimed.is_empty();
                            for msg in batch.claimed {
                                let _ = settle_tx.send(Settle {
                                    fence: Fence {
                                        msg_id: msg.msg_id,
                                        read_ct: msg.read_ct,
                                    },
                                    action: Action::RELEASE,
                                });
                            }
                            break;
                        }
                        let mut permit = permit;
                        let mut slots = slots;
                        for msg in batch.claimed {
                            // Cancelled by an operator while a worker held it, which then
                            // put it back (a retry, a release) before it saw the request:
                            // it does not run again.
                            if msg.headers.get("cancel_requested").is_some() {
                                metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => "cancelled").increment(1);
                                info!(
                                    queue = self.queue,
                                    id = msg.msg_id,
                                    "cancelled by an operator; not run"
                                );
                                let _ = settle_tx.send(Settle {
                                    fence: Fence {
                                        msg_id: msg.msg_id,
                                        read_ct: msg.read_ct,
                                    },
                                    action: Action::Cancel,
                                });
                                continue;
                            }
                            let suspect = if msg.suspect { permit.take() } else { None };
                            let slot = take_one(&mut slots);
                            self.start(&mut jobs, msg, sent, suspect, slot, &settle_tx);
                        }
                        // Slots the claim did not use go back before anything else waits.
                        drop(slots);
                        if idle {
                            let recent = woken_at.is_some_and(|w| {
                                w.elapsed() < self.poll_interval + Duration::from_millis(100)
                            });
                            next_poll = self.idle_until(recent, &mut overdue).await;
                        }
                        continue;
                    }
                    Ok(Err(e)) => self.claim_failed(&e.to_string(), &mut db_errors),
                    Err(_) => self.claim_failed("no answer in time", &mut db_errors),
                }
                // Not held through the backoff: other queues may use them.
                drop(slots);
                let wait = crate::backoff::delay(
                    db_errors,
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                _ = self.wake.notified() => {
                    idle = false;
                    woken_at = Some(Instant::now());
                    follow_up = Some(tokio::time::Instant::now() + FOLLOW_UP);
                }
                _ = sleep_until_some(follow_up), if follow_up.is_some() => {
                    idle = false;
                    follow_up = None;
                }
                // As many as a batch, so a consumer at the cap does not claim one row
                // per completion.
                p = self.handler_slots.clone().acquire_many_owned(
                    min_batch.min(local_free).min(self.max_handlers).max(1) as u32
                ), if starved => {
                    reserved = p.ok();
                }
                _ = tokio::time::sleep_until(next_poll), if idle => idle = false,
                _ = tokio::time::sleep(self.poll_interval), if !idle => {}
            }
        }
        self.signalled.set(Instant::now());
        self.shut_down(jobs, settle_tx, completer, close, released_at_signal)
            .await;
    }

    /// When an idle consumer looks again: at its queue's next due message (a delayed
    /// job, a retry, a lease that ends), at most `idle_poll_max` away, while the listener
    /// holds; every `poll_interval` when it does not or the answer is not known.
    async fn idle_until(&self, notified: bool, overdue: &mut bool) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let poll = now + self.poll_interval;
        let Some(cap) = self.idle_cap else {
            return poll;
        };
        if notified || !self.listening.load(std::sync::atomic::Ordering::Relaxed) {
            return poll;
        }
        let due = tokio::time::timeout(
            self.control_timeout,
            db::run(&self.control, Deadline::Control, async |c| {
                self.sql.next_due(c).await
            }),
        );
        match due.await {
            Ok(Ok(None)) => {
                *overdue = false;
                now + cap
            }
            Ok(Ok(Some(secs))) if secs > 0.0 => {
                *overdue = false;
                now + Duration::from_secs_f64(secs.min(cap.as_secs_f64()))
                    .max(Duration::from_millis(10))
            }
            // Due already: it became due while this claim ran (jobs due a few ms apart),
            // so look again at once; if that finds it due and unclaimed too (a suspect
            // waiting for its turn, rows another claim has locked), the ordinary poll.
            Ok(Ok(Some(_))) => {
                let again = std::mem::replace(overdue, true);
                if again {
                    poll
                } else {
                    now + Duration::from_millis(10)
                }
            }
            _ => poll,
        }
    }

    fn claim_failed(&self, e: &str, db_errors: &mut u32) {
        *db_errors += 1;
        warn!(queue = self.queue, error = %e, "claim failed");
    }

    /// When the grace period ends: the signal's time plus `shutdown_grace`.
    fn grace_deadline(&self) -> Instant {
        self.signalled.get().unwrap_or_else(Instant::now) + self.grace
    }

    /// Drain: in-flight jobs get the grace period, then are cancelled (and released);
    /// what is still held after that is released in one statement. Every wait is
    /// bounded: the grace period counts from the signal, and everything after it fits in
    /// [`SHUTDOWN_SLACK`] (the completer gets all of it but the last second, which is
    /// the final release's).
    async fn shut_down(
        &self,
        mut jobs: JoinSet<()>,
        settle_tx: mpsc::UnboundedSender<Settle>,
        completer: tokio::task::JoinHandle<()>,
        close: CancellationToken,
        released_at_signal: bool,
    ) {
        let grace_end = self.grace_deadline();
        let stop_by = grace_end + SHUTDOWN_SLACK;
        let last_second = stop_by - Duration::from_secs(1);
        self.stop_by.set(last_second);
        let in_flight = jobs.len();
        if in_flight > 0 {
            info!(queue = self.queue, in_flight, grace = ?self.grace, "draining");
        }
        let drained = tokio::time::timeout_at(grace_end.into(), async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.held.cancel_all();
            // A moment for the cancelled runs to roll back and hand in their release.
            let moment = (Instant::now() + Duration::from_millis(1500)).min(last_second);
            let _ = tokio::time::timeout_at(moment.into(), async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
            jobs.abort_all();
            // A task stuck in synchronous code cannot be aborted; it is not waited for.
            let _ = tokio::time::timeout_at(last_second.into(), async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
            jobs.detach_all();
        }
        drop(settle_tx);
        // Every run that could settle has; a detached one may still hold a sender.
        close.cancel();
        if tokio::time::timeout_at(last_second.into(), completer)
            .await
            .is_err()
        {
            warn!(
                queue = self.queue,
                "outcomes still unwritten at the shutdown deadline; those jobs run again after their lease"
            );
        }
        // What is still held was aborted before it settled: release it.
        let rest: Vec<Completion> = self
            .held
            .drain()
            .into_iter()
            .map(Completion::release)
            .collect();
        if rest.is_empty() {
            if in_flight > 0 || released_at_signal {
                self.tell_the_fleet(stop_by).await;
            }
            return;
        }
        // A short floor: reaching here late (a consumer queued behind a blocked thread)
        // must not mean no attempt at all.
        let left = stop_by
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(250));
        let release = db::run(&self.control, Deadline::Control, async |c| {
            self.sql.complete(c, &rest).await
        });
        match tokio::time::timeout(left, release).await {
            Ok(Ok(ids)) => info!(
                queue = self.queue,
                released = ids.len(),
                "released unfinished jobs"
            ),
            Ok(Err(e)) => warn!(queue = self.queue, error = %e, count = rest.len(),
                "could not release unfinished jobs; their leases will expire"),
            Err(_) => warn!(
                queue = self.queue,
                count = rest.len(),
                "the database did not answer; unfinished jobs come back after their lease"
            ),
        }
        self.tell_the_fleet(stop_by).await;
    }

    /// Released jobs are visible now, but a release is an update, which no trigger
    /// notifies: tell the other processes' consumers, which may be sleeping until their
    /// next due message (`worker.idle_poll_max`). Best effort, within the deadline.
    async fn tell_the_fleet(&self, stop_by: Instant) {
        let left = stop_by
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let notify = db::run(&self.control, Deadline::Control, async |c| {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(listener::ENQUEUE)
                .bind(self.queue)
                .execute(c)
                .await
        });
        let _ = tokio::time::timeout(left, notify).await;
    }

    fn start(
        self: &Arc<Self>,
        jobs: &mut JoinSet<()>,
        msg: Claimed,
        sent: Instant,
        suspect: Option<tokio::sync::OwnedSemaphorePermit>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        settle: &mpsc::UnboundedSender<Settle>,
    ) {
        let fence = Fence {
            msg_id: msg.msg_id,
            read_ct: msg.read_ct,
        };
        let is_suspect = suspect.is_some();
        let claim = self.held.claim(
            fence,
            sent + self.settings.lease,
            sent + self.settings.timeout,
            suspect,
        );
        let attempt = msg.attempt();
        if attempt == 1 {
            let wait = (chrono::Utc::now() - msg.due_at())
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(t::JOB_WAIT, "queue" => self.queue).record(wait.as_secs_f64());
        }
        if is_suspect {
            warn!(
                queue = self.queue,
                id = msg.msg_id,
                attempt,
                deaths = msg.deaths(),
                "running a suspect (one at a time per process): its last runs ended with no outcome (the worker died or lost its lease)"
            );
        }
        let span = info_span!("job", queue = self.queue, id = msg.msg_id, attempt);
        let run = self.clone().execute(msg, claim, settle.clone());
        jobs.spawn(
            async move {
                // The process-wide handler slot is held while the handler runs.
                let _slot = slot;
                run.await
            }
            .instrument(span),
        );
    }
}
