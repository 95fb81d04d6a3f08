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
//! Files by role: `consumer` (the claim loop), `held` (what this process holds, keyed
//! by fence), `execute` (one run), `completer` (every outcome write), `heartbeat` (leases). Claims and
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
mod consumer;
mod execute;
mod heartbeat;
mod held;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::completer::{Completer, StopBy};
use self::consumer::{Consumer, idle_cap};
use self::heartbeat::{Heartbeat, Keeper};
use self::held::Held;
use crate::config::Config;
use crate::db::{self, Deadline};
use crate::enqueue::queue_sql;
use crate::listener;
use crate::queue_name::QueueName;
use crate::registry::Registry;

/// After the grace period, how long a shutting-down worker may still spend writing
/// what it can (releases, outcomes) before it exits regardless.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(3);

/// Hooks for benchmarks and tests to watch the runtime without scraping logs.
pub trait Observer: Send + Sync + 'static {
    /// A handler is about to start.
    fn job_started(&self, _queue: &str, _job_id: i64, _attempt: u32) {}
    /// Acknowledgements that reached the database: `done` done, `stale` fenced out.
    fn acked(&self, _queue: &str, _done: usize, _stale: usize) {}
    /// The heartbeat found a running job's message no longer held (a real lost lease).
    fn lease_lost(&self, _queue: &str, _job_id: i64) {}
}

/// Why a worker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no handler is registered for queue {0:?} (known: {1})")]
    /// A queue was asked for that no handler serves (the queue, and the known ones).
    UnknownQueue(String, String),
    #[error("no queues to work")]
    /// The worker was given no queue to work.
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

    /// Watches the runtime from inside (benchmarks, tests).
    pub fn observer(mut self, o: Arc<dyn Observer>) -> Self {
        self.observer = Some(o);
        self
    }

    /// The queues this worker consumes.
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
                    r#"SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),
                            current_setting('plan_cache_mode')"#,
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
