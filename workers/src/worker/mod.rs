//! The worker: one consumer per queue, each claiming batches up to its free slots,
//! running handlers concurrently, heartbeating their leases and writing outcomes in
//! batches.
//!
//! ```text
//!  NOTIFY / poll ──► consumer ──claim(free slots)──► execute (one task per run)
//!                        ▲                               │ outcome
//!                        │                               ▼
//!                        └──── slot freed ◄──── completer (batched, or in the
//!                                                handler's ctx.tx(): one commit)
//!   lease keeper (its own thread): extends every held lease each lease/3 and
//!   cancels a run whose lease it could not keep, before it can lapse
//! ```
//!
//! Files by role: `held` (what this process holds, keyed by fence), `execute`
//! (one run), `completer` (every outcome write), `heartbeat` (leases). Claims and
//! batched writes use a small **control pool** of their own, heartbeats two connections
//! on the lease keeper's thread, so handlers that hold connections (`ctx.tx()`) or
//! threads (synchronous or CPU-bound code) can never starve them.
//!
//! Shutdown: the token stops claiming; in-flight jobs get `shutdown_grace`; the rest
//! are cancelled and released (visible now, attempt not spent). Every database wait
//! after the signal is bounded: the process exits within the grace period plus
//! [`SHUTDOWN_SLACK`] even when the database does not answer (what it could not
//! release comes back after its lease).

mod completer;
mod execute;
mod heartbeat;
mod held;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use self::completer::{Completer, Settle, StopBy};
use self::heartbeat::{Heartbeat, Keeper};
use self::held::Held;
use crate::config::{Config, QueueSettings};
use crate::db::{self, Deadline};
use crate::enqueue::queue_sql;
use crate::listener;
use crate::outcome::Action;
use crate::queue_name::QueueName;
use crate::registry::{ErasedHandler, Registry};
use crate::store::{ClaimRequest, Claimed, Completion, Fence, QueueSql};
use crate::telemetry as t;

/// After the grace period, how long a shutting-down worker may still spend writing
/// what it can (releases, outcomes) before it exits regardless.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(3);

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
fn idle_cap(queue: &str, idle_poll_max: Duration, poll_interval: Duration) -> Option<Duration> {
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

/// Hooks for benchmarks and tests to watch the runtime without scraping logs.
pub trait Observer: Send + Sync + 'static {
    /// A handler is about to start.
    fn job_started(&self, _queue: &str, _job_id: i64, _attempt: u32) {}
    /// Acknowledgements that reached the database: `done` done, `stale` fenced out.
    fn acked(&self, _queue: &str, _done: usize, _stale: usize) {}
    /// The heartbeat found a running job's message no longer held (a real lost lease).
    fn lease_lost(&self, _queue: &str, _job_id: i64) {}
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no handler is registered for queue {0:?} (known: {1})")]
    UnknownQueue(String, String),
    #[error("no queues to work")]
    NoQueues,
}

/// A configured worker; [`Worker::run`] works until the shutdown token is cancelled.
pub struct Worker {
    pool: PgPool,
    control: Option<PgPool>,
    registry: Registry,
    config: Arc<Config>,
    queues: Vec<&'static str>,
    observer: Option<Arc<dyn Observer>>,
}

impl Worker {
    /// A worker for every registered queue. `pool` serves the handlers (`ctx.tx()`,
    /// `ctx.pool()`); claims, heartbeats and batched writes get a control pool to the
    /// same database (`database.control_connections`) unless [`Worker::control_pool`]
    /// gives one.
    pub fn new(pool: PgPool, registry: Registry, config: Arc<Config>) -> Self {
        let queues = registry.kinds().collect();
        Worker {
            pool,
            control: None,
            registry,
            config,
            queues,
            observer: None,
        }
    }

    /// Uses this pool for claims, heartbeats and batched writes.
    pub fn control_pool(mut self, control: PgPool) -> Self {
        self.control = Some(control);
        self
    }

    /// Restricts the worker to some queues.
    pub fn only(mut self, names: &[String]) -> Result<Self, WorkerError> {
        let known = self.registry.kinds().collect::<Vec<_>>().join(", ");
        let mut qs = Vec::new();
        for n in names {
            match self.registry.get(n) {
                Some((k, _)) => qs.push(k),
                None => return Err(WorkerError::UnknownQueue(n.clone(), known)),
            }
        }
        if qs.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        self.queues = qs;
        Ok(self)
    }

    pub fn observer(mut self, o: Arc<dyn Observer>) -> Self {
        self.observer = Some(o);
        self
    }

    pub fn queue_names(&self) -> &[&'static str] {
        &self.queues
    }

    /// Works until `shutdown` is cancelled, then drains and releases. Errors from the
    /// database never end it: it logs, backs off and reconnects.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if self.queues.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        let db = &self.config.database;
        let control = self
            .control
            .clone()
            .unwrap_or_else(|| crate::db::control_pool(&self.pool, db));
        let handlers: usize = self
            .queues
            .iter()
            .map(|q| self.config.queue(q).concurrency)
            .sum();
        let pool_size = self.pool.options().get_max_connections() as usize;
        info!(
            queues = self.queues.len(),
            handlers = handlers.min(self.config.worker.max_handlers),
            handler_connections = pool_size,
            control_connections = control.options().get_max_connections(),
            lease_connections = 2,
            listen_connections = u8::from(!db::pooled()),
            "connection budget: handlers share the handler pool (ctx.tx() waits for a connection when all are busy); claims and acknowledgements use the control pool, heartbeats the lease keeper's two; one more for LISTEN unless through a pooler"
        );
        if db::pooled() {
            let unsafe_kinds: Vec<&str> = self
                .queues
                .iter()
                .copied()
                .filter(|q| !self.registry.pooler_safe(q))
                .collect();
            if !unsafe_kinds.is_empty() {
                warn!(
                    queues = %short_list(&unsafe_kinds),
                    "through a transaction-mode pooler: these kinds' handlers are not known to run every statement in a transaction and may fail with `prepared statement … does not exist`; serve them from workers with a direct connection (--queues, docs/poolers.md)"
                );
            }
            // Through a pooler the timeouts ride on each transaction: show what a control
            // transaction really runs with (a pooler that dropped the SET LOCALs would
            // leave the server's defaults).
            let got = db::run(&control, Deadline::Control, async |c| {
                sqlx::query_as::<_, (String, String, String)>(
                    "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), \
                            current_setting('plan_cache_mode')",
                )
                .fetch_one(c)
                .await
            });
            match tokio::time::timeout(self.config.database.control_timeout, got).await {
                Ok(Ok((st, lt, plans))) => info!(
                    statement_timeout = %st,
                    lock_timeout = %lt,
                    plan_cache_mode = %plans,
                    "through a transaction-mode pooler: control transactions run with"
                ),
                Ok(Err(e)) => {
                    warn!(error = %e, "through a transaction-mode pooler: cannot read a control transaction's settings")
                }
                Err(_) => warn!(
                    "through a transaction-mode pooler: no answer reading a control transaction's settings"
                ),
            }
        }
        let over: Vec<&str> = self
            .queues
            .iter()
            .copied()
            .filter(|q| self.config.queue(q).concurrency > pool_size)
            .collect();
        if !over.is_empty() {
            warn!(
                queues = %short_list(&over),
                pool_size,
                "these queues run more handlers than database.max_connections: handlers that write through ctx.tx() will wait for connections, and fail after database.acquire_timeout"
            );
        }
        // Every claim, heartbeat and acknowledgement leaves a dead tuple in a queue table
        // (none is a HOT update: `vt` is indexed); without autovacuum they are never
        // reclaimed (the soak scenario: 718k dead tuples in three minutes at 2,000/s).
        {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let show = db::run(&pool, Deadline::Statement, async |c| {
                    sqlx::query_scalar::<_, String>("SHOW autovacuum")
                        .fetch_one(c)
                        .await
                });
                if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(5), show).await
                    && v != "on"
                {
                    warn!(autovacuum = %v, "autovacuum is off on this server: queue tables bloat with every job; the vacuum_queues schedule (default: every minute) vacuums them past 10,000 dead tuples (docs/scale.md)");
                }
            });
        }
        // When the shutdown signal came: every deadline after it counts from here.
        let signalled = Arc::new(StopBy::default());
        {
            let (s, sig) = (shutdown.clone(), signalled.clone());
            tokio::spawn(async move {
                s.cancelled().await;
                sig.set(Instant::now());
            });
        }
        // One suspect (a job whose last runs all ended with no outcome) runs at a time
        // in this process, whatever its queue: if it is what kills its workers, it can
        // only take itself and the jobs beside it down, never another suspect.
        let suspects = Arc::new(Semaphore::new(1));
        // Handlers running at once in this process, whatever their queue.
        let handler_slots = Arc::new(Semaphore::new(self.config.worker.max_handlers));
        // The enqueue listener holds LISTEN: notifications can be trusted, so an idle
        // consumer may sleep until its next message is due.
        let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut wakers = HashMap::new();
        let mut consumers = JoinSet::new();
        let mut beats = Vec::new();
        for &name in &self.queues {
            let (kind, handler) = self.registry.get(name).expect("checked in only()");
            let wake = Arc::new(Notify::new());
            wakers.insert(kind.to_string(), wake.clone());
            let qn = QueueName::parse(kind).expect("registry validates kinds");
            let sql = queue_sql(&qn);
            let settings = self.config.queue(kind);
            let held = Arc::new(Held::default());
            let stop_by = Arc::new(StopBy::default());
            let w = &self.config.worker;
            let completer = Arc::new(Completer {
                queue: kind,
                sql: sql.clone(),
                control: control.clone(),
                on_done: settings.on_done,
                lease: settings.lease,
                statement_timeout: db.control_timeout,
                batch: w.ack_batch,
                flush_after: w.ack_flush,
                held: held.clone(),
                stop_by: stop_by.clone(),
                observer: self.observer.clone(),
                wake: wake.clone(),
            });
            beats.push(Heartbeat {
                queue: kind,
                sql: sql.clone(),
                lease: settings.lease,
                statement_timeout: db.control_timeout,
                held: held.clone(),
                observer: self.observer.clone(),
            });
            let c = Consumer {
                queue: kind,
                sql,
                settings,
                handler,
                pool: self.pool.clone(),
                control: control.clone(),
                control_timeout: db.control_timeout,
                held,
                completer,
                stop_by,
                signalled: signalled.clone(),
                suspects: suspects.clone(),
                handler_slots: handler_slots.clone(),
                max_handlers: self.config.worker.max_handlers,
                listening: listening.clone(),
                ack_batch: w.ack_batch,
                wake,
                poll_interval: w.poll_interval,
                idle_cap: idle_cap(kind, w.idle_poll_max, w.poll_interval),
                grace: w.shutdown_grace,
                observer: self.observer.clone(),
            };
            consumers.spawn(Arc::new(c).run(shutdown.clone()));
        }
        let keeper = Keeper::start((*self.pool.connect_options()).clone(), db, beats);
        let stop_listener = CancellationToken::new();
        let wakers: HashMap<String, Arc<Notify>> = wakers;
        let on_event: listener::OnEvent = Arc::new(move |e: listener::Event<'_>| match e {
            listener::Event::Notified(q) => {
                if let Some(w) = wakers.get(q) {
                    w.notify_one();
                }
            }
            listener::Event::Connected | listener::Event::Lost => {
                listening.store(
                    e == listener::Event::Connected,
                    std::sync::atomic::Ordering::Relaxed,
                );
                wakers.values().for_each(|w| w.notify_one())
            }
        });
        // A transaction-mode pooler cannot hold a LISTEN (the session ends with each
        // transaction): without one, consumers poll every `worker.poll_interval`.
        let lst = if db::pooled() {
            info!(
                poll_interval = ?self.config.worker.poll_interval,
                "through a transaction-mode pooler (database.pooler): no LISTEN, consumers poll"
            );
            None
        } else {
            Some(tokio::spawn(listener::run(
                self.pool.clone(),
                listener::ENQUEUE,
                on_event,
                stop_listener.clone(),
            )))
        };
        info!(queues = %short_list(&self.queues), "worker started");
        while let Some(r) = consumers.join_next().await {
            if let Err(e) = r {
                error!(error = %e, "a queue consumer ended abnormally");
            }
        }
        keeper.stop().await;
        stop_listener.cancel();
        if let Some(l) = lst {
            let _ = l.await;
        }
        info!("worker stopped");
        Ok(())
    }
}

/// Up to ten names, then how many more: a worker may serve hundreds of queues.
fn short_list(names: &[&str]) -> String {
    let mut s = names
        .iter()
        .take(10)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        s.push_str(&format!(" and {} more", names.len() - 10));
    }
    s
}

pub(crate) struct Consumer {
    queue: &'static str,
    sql: Arc<QueueSql>,
    settings: QueueSettings,
    handler: Arc<dyn ErasedHandler>,
    pool: PgPool,
    control: PgPool,
    control_timeout: Duration,
    held: Arc<Held>,
    completer: Arc<Completer>,
    /// The completer's deadline, set at shutdown.
    stop_by: Arc<StopBy>,
    /// When the shutdown signal came.
    signalled: Arc<StopBy>,
    suspects: Arc<Semaphore>,
    /// `worker.max_handlers`: one permit per running handler, all queues together.
    handler_slots: Arc<Semaphore>,
    max_handlers: usize,
    listening: Arc<std::sync::atomic::AtomicBool>,
    ack_batch: usize,
    wake: Arc<Notify>,
    poll_interval: Duration,
    /// See [`idle_cap`].
    idle_cap: Option<Duration>,
    grace: Duration,
    observer: Option<Arc<dyn Observer>>,
}

impl Consumer {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
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
                                    action: Action::Reschedule {
                                        delay: Duration::ZERO,
                                        error: None,
                                        free: true,
                                    },
                                });
                            }
                            break;
                        }
                        let mut permit = permit;
                        let mut slots = slots;
                        for msg in batch.claimed {
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
