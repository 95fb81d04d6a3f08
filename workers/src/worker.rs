//! The worker: one consumer per queue, each claiming batches up to its free slots,
//! running handlers concurrently, heartbeating their leases and acknowledging in
//! batches.
//!
//! ```text
//!  NOTIFY / poll ──► consumer ──claim(free slots)──► JoinSet of jobs ──► acker ──► store
//!                        ▲                               │  (per-job tx: fenced ack
//!                        └──────── slot freed ◄──────────┘   + effects, one commit)
//!                    heartbeat: extends every held lease each lease/3 (fenced)
//! ```
//!
//! Shutdown: the token stops claiming; in-flight jobs get `shutdown_grace`; the rest
//! are cancelled, aborted and released (visible now, attempt not spent).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, OnDone, QueueSettings};
use crate::enqueue::queue_sql;
use crate::job::{JobContext, Outcome};
use crate::listener;
use crate::outcome::{Action, decide};
use crate::queue_name::QueueName;
use crate::registry::{ErasedHandler, Registry};
use crate::store::{Bury, Claimed, Fence, QueueSql, Reschedule};
use crate::telemetry as t;

/// Hooks for benchmarks and tests to watch the runtime without scraping logs.
pub trait Observer: Send + Sync + 'static {
    /// A handler is about to start.
    fn job_started(&self, _queue: &str, _job_id: i64, _attempt: u32) {}
    /// Acknowledgements that reached the database: `done` done, `stale` fenced out.
    fn acked(&self, _queue: &str, _done: usize, _stale: usize) {}
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
    registry: Registry,
    config: Arc<Config>,
    queues: Vec<&'static str>,
    observer: Option<Arc<dyn Observer>>,
}

impl Worker {
    /// A worker for every registered queue.
    pub fn new(pool: PgPool, registry: Registry, config: Arc<Config>) -> Self {
        let queues = registry.kinds().collect();
        Worker {
            pool,
            registry,
            config,
            queues,
            observer: None,
        }
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
        let pool_size = self.pool.options().get_max_connections() as usize;
        for &q in &self.queues {
            let c = self.config.queue(q).concurrency;
            if c > pool_size {
                warn!(
                    queue = q,
                    concurrency = c,
                    pool_size,
                    "concurrency exceeds database.max_connections: handlers that write through ctx.tx() will wait for connections"
                );
            }
        }
        let mut wakers = HashMap::new();
        let mut consumers = JoinSet::new();
        for &name in &self.queues {
            let (kind, handler) = self.registry.get(name).expect("checked in only()");
            let wake = Arc::new(Notify::new());
            wakers.insert(kind.to_string(), wake.clone());
            let qn = QueueName::parse(kind).expect("registry validates kinds");
            let c = Consumer {
                queue: kind,
                sql: queue_sql(&qn),
                settings: self.config.queue(kind),
                handler,
                pool: self.pool.clone(),
                held: Default::default(),
                wake,
                poll_interval: self.config.worker.poll_interval,
                grace: self.config.worker.shutdown_grace,
                ack_batch: self.config.worker.ack_batch,
                ack_flush: self.config.worker.ack_flush,
                observer: self.observer.clone(),
            };
            consumers.spawn(Arc::new(c).run(shutdown.clone()));
        }
        let stop_listener = CancellationToken::new();
        let wakers: HashMap<String, Arc<Notify>> = wakers;
        let on_event: listener::OnEvent = Arc::new(move |queue: Option<&str>| match queue {
            Some(q) => {
                if let Some(w) = wakers.get(q) {
                    w.notify_one();
                }
            }
            None => wakers.values().for_each(|w| w.notify_one()),
        });
        let lst = tokio::spawn(listener::run(
            self.pool.clone(),
            listener::ENQUEUE,
            on_event,
            stop_listener.clone(),
        ));
        info!(queues = ?self.queues, "worker started");
        while let Some(r) = consumers.join_next().await {
            if let Err(e) = r {
                error!(error = %e, "a queue consumer ended abnormally");
            }
        }
        stop_listener.cancel();
        let _ = lst.await;
        info!("worker stopped");
        Ok(())
    }
}

/// What a flush achieved: acks that landed (`done` counts the Done ones) and acks the
/// fence refused (`stale`). Acks given up on after a database outage are neither.
#[derive(Default)]
struct Outcomes {
    done: usize,
    stale: usize,
}

impl Outcomes {
    fn add(&mut self, sent: usize, changed: Option<usize>, is_done: bool) {
        if let Some(n) = changed {
            self.stale += sent - n;
            if is_done {
                self.done += n;
            }
        }
    }
}

/// A message this process holds: its fencing token and the token that stops its handler.
struct Held {
    read_ct: i32,
    cancel: CancellationToken,
}

type HeldMap = Arc<Mutex<HashMap<i64, Held>>>;

struct Ack {
    fence: Fence,
    action: Action,
}

struct Consumer {
    queue: &'static str,
    sql: Arc<QueueSql>,
    settings: QueueSettings,
    handler: Arc<dyn ErasedHandler>,
    pool: PgPool,
    held: HeldMap,
    wake: Arc<Notify>,
    poll_interval: Duration,
    grace: Duration,
    ack_batch: usize,
    ack_flush: Duration,
    observer: Option<Arc<dyn Observer>>,
}

impl Consumer {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
        let acker = tokio::spawn(self.clone().ack_loop(ack_rx));
        let stop_hb = CancellationToken::new();
        let hb = tokio::spawn(self.clone().heartbeat_loop(stop_hb.clone()));

        let conc = self.settings.concurrency;
        let min_batch = (conc / 8).max(1);
        let mut jobs = JoinSet::new();
        let mut idle = false;
        let mut db_errors = 0u32;
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            while jobs.try_join_next().is_some() {}
            if shutdown.is_cancelled() {
                break;
            }
            let free = conc - jobs.len();
            if !idle && free > 0 && (free >= min_batch || jobs.is_empty()) {
                match self.sql.claim(&self.pool, free, self.settings.lease).await {
                    Ok(batch) => {
                        db_errors = 0;
                        idle = batch.len() < free;
                        for msg in batch {
                            self.start(&mut jobs, msg, &ack_tx);
                        }
                        continue;
                    }
                    Err(e) => {
                        db_errors += 1;
                        let wait = crate::backoff::delay(
                            db_errors,
                            Duration::from_millis(100),
                            Duration::from_secs(5),
                        );
                        warn!(queue = self.queue, error = %e, retry_in = ?wait, "claim failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                _ = self.wake.notified() => idle = false,
                _ = poll.tick() => idle = false,
            }
        }

        // Drain: in-flight jobs get the grace period, then are cancelled and aborted.
        let in_flight = jobs.len();
        if in_flight > 0 {
            info!(queue = self.queue, in_flight, grace = ?self.grace, "draining");
        }
        let drained = tokio::time::timeout(self.grace, async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            for h in self.held.lock().expect("not poisoned").values() {
                h.cancel.cancel();
            }
            // A moment for handlers that watch their token to roll back cleanly.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
            jobs.abort_all();
            while jobs.join_next().await.is_some() {}
        }
        drop(ack_tx);
        let _ = acker.await;
        stop_hb.cancel();
        let _ = hb.await;
        // What is still held was aborted: release it (visible now, attempt not spent).
        let rest: Vec<Reschedule> = self
            .held
            .lock()
            .expect("not poisoned")
            .drain()
            .map(|(msg_id, h)| Reschedule {
                fence: Fence {
                    msg_id,
                    read_ct: h.read_ct,
                },
                delay: Duration::ZERO,
                error: None,
                free: true,
            })
            .collect();
        if !rest.is_empty() {
            match self.sql.reschedule(&self.pool, &rest).await {
                Ok(ids) => info!(
                    queue = self.queue,
                    released = ids.len(),
                    "released unfinished jobs"
                ),
                Err(e) => warn!(queue = self.queue, error = %e, count = rest.len(),
                    "could not release unfinished jobs; their leases will expire"),
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        jobs: &mut JoinSet<()>,
        msg: Claimed,
        acks: &mpsc::UnboundedSender<Ack>,
    ) {
        let cancel = CancellationToken::new();
        self.held.lock().expect("not poisoned").insert(
            msg.msg_id,
            Held {
                read_ct: msg.read_ct,
                cancel: cancel.clone(),
            },
        );
        let attempt = msg.attempt();
        if attempt == 1 {
            let wait = (chrono::Utc::now() - msg.due_at())
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(t::JOB_WAIT, "queue" => self.queue).record(wait.as_secs_f64());
        }
        if let Some(o) = &self.observer {
            o.job_started(self.queue, msg.msg_id, attempt);
        }
        let span = info_span!("job", queue = self.queue, id = msg.msg_id, attempt);
        jobs.spawn(
            self.clone()
                .execute(msg, attempt, cancel, acks.clone())
                .instrument(span),
        );
    }

    async fn execute(
        self: Arc<Self>,
        msg: Claimed,
        attempt: u32,
        cancel: CancellationToken,
        acks: mpsc::UnboundedSender<Ack>,
    ) {
        let fence = Fence {
            msg_id: msg.msg_id,
            read_ct: msg.read_ct,
        };
        let mut ctx = JobContext::new(
            msg.msg_id,
            self.queue,
            attempt,
            self.settings.max_attempts,
            msg.enqueued_at,
            cancel.clone(),
            self.pool.clone(),
        );
        let started = Instant::now();
        let timeout = self.settings.timeout;
        let outcome = {
            let run = AssertUnwindSafe(self.handler.call(msg.message, &mut ctx)).catch_unwind();
            tokio::select! {
                r = tokio::time::timeout(timeout, run) => match r {
                    Ok(Ok(o)) => Some(o),
                    Ok(Err(panic)) => Some(Outcome::Retry(format!("handler panicked: {}", panic_message(&panic)))),
                    Err(_) => Some(Outcome::Retry(format!("timed out after {}", humanize(timeout)))),
                },
                _ = cancel.cancelled() => None,
            }
        };
        let elapsed = started.elapsed();
        metrics::histogram!(t::JOB_DURATION, "queue" => self.queue).record(elapsed.as_secs_f64());
        let tx = ctx.take_tx();
        let Some(outcome) = outcome else {
            // Lease lost or shutdown: whatever the handler wrote rolls back; no ack.
            if let Some(tx) = tx {
                let _ = tx.rollback().await;
            }
            metrics::counter!(t::JOBS_TOTAL, "queue" => self.queue, "outcome" => "cancelled")
                .increment(1);
            warn!("job cancelled (lease lost or shutdown); its effects were rolled back");
            return;
        };
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
            (Action::Done(result), Some(mut tx)) => {
                // Transactional completion: the handler's writes and the fenced ack
                // commit together, or neither does.
                let acked = match self.settings.on_done {
                    OnDone::Archive => self.sql.ack_archive(&mut *tx, &[(fence, result)]).await,
                    OnDone::Delete => self.sql.ack_delete(&mut *tx, &[fence]).await,
                };
                let committed = match acked {
                    Ok(ids) if ids.len() == 1 => tx.commit().await.map(|_| true),
                    Ok(_) => {
                        let _ = tx.rollback().await;
                        metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(1);
                        warn!("lease was lost before completion; effects rolled back");
                        Ok(false)
                    }
                    Err(e) => Err(e),
                };
                self.held
                    .lock()
                    .expect("not poisoned")
                    .remove(&fence.msg_id);
                match committed {
                    Ok(done) => {
                        if let Some(o) = &self.observer {
                            o.acked(self.queue, usize::from(done), usize::from(!done));
                        }
                    }
                    Err(e) => {
                        // Unknown whether the commit landed; a fenced retry is harmless
                        // either way (0 rows if it did).
                        warn!(error = %e, "completion transaction failed; retrying the job");
                        let _ = acks.send(Ack {
                            fence,
                            action: decide(
                                &Outcome::Retry(format!("completion failed: {e}")),
                                attempt,
                                &self.settings,
                                rand::random(),
                            ),
                        });
                    }
                }
            }
            (action, tx) => {
                if let Some(tx) = tx {
                    let _ = tx.rollback().await;
                }
                let _ = acks.send(Ack { fence, action });
            }
        }
    }

    /// Writes acknowledgements in batches: up to `ack_batch`, or `ack_flush` after the
    /// first one arrived.
    async fn ack_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Ack>) {
        let mut buf: Vec<Ack> = Vec::with_capacity(self.ack_batch);
        while let Some(first) = rx.recv().await {
            buf.push(first);
            let deadline = tokio::time::Instant::now() + self.ack_flush;
            while buf.len() < self.ack_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(a)) => buf.push(a),
                    Ok(None) | Err(_) => break,
                }
            }
            self.flush(&mut buf).await;
        }
    }

    async fn flush(&self, buf: &mut Vec<Ack>) {
        let mut done_archive = Vec::new();
        let mut done_delete = Vec::new();
        let mut resched = Vec::new();
        let mut bury = Vec::new();
        let fences: Vec<Fence> = buf.iter().map(|a| a.fence).collect();
        for a in buf.drain(..) {
            match a.action {
                Action::Done(r) => match self.settings.on_done {
                    OnDone::Archive => done_archive.push((a.fence, r)),
                    OnDone::Delete => done_delete.push(a.fence),
                },
                Action::Reschedule { delay, error, free } => resched.push(Reschedule {
                    fence: a.fence,
                    delay,
                    error,
                    free,
                }),
                Action::Bury { attempts, error } => bury.push(Bury {
                    fence: a.fence,
                    attempts: attempts as i32,
                    error,
                }),
            }
        }
        // Each statement is retried on its own until it succeeds, so one that already
        // succeeded is never repeated (a repeat would match 0 rows and look stale).
        let give_up_at = Instant::now() + self.settings.lease;
        let mut done = Outcomes::default();
        if !done_archive.is_empty() {
            let r = self
                .retry_ack(give_up_at, || {
                    self.sql.ack_archive(&self.pool, &done_archive)
                })
                .await;
            done.add(done_archive.len(), r, true);
        }
        if !done_delete.is_empty() {
            let r = self
                .retry_ack(give_up_at, || self.sql.ack_delete(&self.pool, &done_delete))
                .await;
            done.add(done_delete.len(), r, true);
        }
        if !resched.is_empty() {
            let r = self
                .retry_ack(give_up_at, || self.sql.reschedule(&self.pool, &resched))
                .await;
            done.add(resched.len(), r, false);
        }
        if !bury.is_empty() {
            let r = self
                .retry_ack(give_up_at, || self.sql.bury(&self.pool, &bury))
                .await;
            done.add(bury.len(), r, false);
        }
        if done.stale > 0 {
            metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(done.stale as u64);
            warn!(
                queue = self.queue,
                stale = done.stale,
                "acknowledgements fenced out (leases lost)"
            );
        }
        {
            let mut held = self.held.lock().expect("not poisoned");
            for f in &fences {
                if held.get(&f.msg_id).is_some_and(|h| h.read_ct == f.read_ct) {
                    held.remove(&f.msg_id);
                }
            }
        }
        if let Some(o) = &self.observer {
            o.acked(self.queue, done.done, done.stale);
        }
    }

    /// Runs one fenced statement until it succeeds or `give_up_at` passes (the lease is
    /// over by then: the jobs will run again, so giving up loses nothing). Returns the
    /// ids it changed, or `None` if it gave up.
    async fn retry_ack<'a, F, Fut>(&self, give_up_at: Instant, mut stmt: F) -> Option<usize>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<i64>, sqlx::Error>> + 'a,
    {
        let mut tries = 0u32;
        loop {
            match stmt().await {
                Ok(ids) => return Some(ids.len()),
                Err(e) if Instant::now() < give_up_at => {
                    tries += 1;
                    let wait = crate::backoff::delay(
                        tries,
                        Duration::from_millis(50),
                        Duration::from_secs(2),
                    );
                    warn!(queue = self.queue, error = %e, retry_in = ?wait, "ack failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    error!(queue = self.queue, error = %e,
                        "could not acknowledge within the lease; these jobs will run again");
                    return None;
                }
            }
        }
    }

    /// Extends the lease of every held message each `lease / 3`; a message no longer
    /// held (someone else claimed it after our lease expired) has its handler cancelled.
    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        let every = self.settings.lease / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let held: Vec<Fence> = self
                .held
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|(id, h)| Fence {
                    msg_id: *id,
                    read_ct: h.read_ct,
                })
                .collect();
            if held.is_empty() {
                continue;
            }
            match self
                .sql
                .heartbeat(&self.pool, &held, self.settings.lease)
                .await
            {
                Ok(kept) => {
                    if kept.len() == held.len() {
                        continue;
                    }
                    let kept: std::collections::HashSet<i64> = kept.into_iter().collect();
                    let mut map = self.held.lock().expect("not poisoned");
                    for f in held.iter().filter(|f| !kept.contains(&f.msg_id)) {
                        if map.get(&f.msg_id).is_some_and(|h| h.read_ct == f.read_ct) {
                            let h = map.remove(&f.msg_id).expect("present");
                            h.cancel.cancel();
                            metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(1);
                            warn!(
                                queue = self.queue,
                                id = f.msg_id,
                                "lease lost; cancelling the handler"
                            );
                        }
                    }
                }
                Err(e) => warn!(queue = self.queue, error = %e, "heartbeat failed"),
            }
        }
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

fn humanize(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
