//! Keeps the leases of a process's jobs, and stops the jobs whose lease it cannot keep
//! before anyone else may take them.
//!
//! The lease keeper runs on **a thread of its own** with its own small runtime and
//! connections, so neither handlers stuck in synchronous code nor CPU-bound handlers
//! occupying every worker thread can starve it. Per queue, every `lease / 3` it extends
//! every held lease in one statement, which never waits for a row lock (`SKIP LOCKED`)
//! and is bounded on the client side, so neither a paused server nor a slow commit can
//! hold it. A lease is known to run until the moment its last successful extension was
//! *sent* plus the lease (the database's `vt` is later, never earlier); a run whose lease
//! would end within `lease / 4` is cancelled then, on its own timer, even while a
//! heartbeat statement is still waiting for an answer, so it has stopped before its
//! message becomes visible to other workers. A message found gone while its run goes on
//! (claimed elsewhere after a stall of this process) has its run cancelled too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::Observer;
use super::held::Held;
use crate::config::DatabaseConfig;
use crate::store::{Beat, Fence, QueueSql};
use crate::telemetry as t;

/// The leases of one queue.
pub(super) struct Heartbeat {
    pub queue: &'static str,
    pub sql: Arc<QueueSql>,
    pub lease: Duration,
    pub statement_timeout: Duration,
    pub held: Arc<Held>,
    pub observer: Option<Arc<dyn Observer>>,
}

/// How long before its lease ends a run that could not be extended is cancelled.
pub(super) fn margin(lease: Duration) -> Duration {
    lease / 4
}

/// The lease keeper thread: every queue's [`Heartbeat`] until `stop`.
pub(super) struct Keeper {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Keeper {
    /// Starts the thread; its connections go to the database `opts` names.
    pub fn start(opts: PgConnectOptions, db: &DatabaseConfig, beats: Vec<Heartbeat>) -> Keeper {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let db = db.clone();
        let thread = std::thread::Builder::new()
            .name("longshore-leases".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // Without it no lease is extended: every run lapses and is
                        // retried; loud, but nothing is lost or run twice at once.
                        error!(error = %e, "cannot start the lease keeper's runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    let pool = crate::db::lease_pool(opts, &db);
                    let mut tasks = tokio::task::JoinSet::new();
                    for b in beats {
                        tasks.spawn(b.run(pool.clone(), s.clone()));
                    }
                    while tasks.join_next().await.is_some() {}
                });
            })
            .expect("spawn the lease keeper thread");
        Keeper {
            thread: Some(thread),
            stop,
        }
    }

    /// Stops the keeper and waits for its thread (bounded: its statements are raced
    /// with the stop). Dropping it stops it too, without waiting.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || t.join()),
            )
            .await;
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Beats = Pin<Box<dyn Future<Output = (Instant, Result<Vec<(Fence, Beat)>, String>)> + Send>>;

impl Heartbeat {
    async fn run(self, pool: PgPool, stop: CancellationToken) {
        let every = self.lease / 3;
        let margin = margin(self.lease);
        // A statement may take at most this long: a lease gets at least two tries.
        let limit = self.statement_timeout.min(self.lease / 4);
        let mut next_beat = Instant::now() + every;
        let mut failures = 0u32;
        let mut in_flight: Option<Beats> = None;
        loop {
            // While a statement is out, only the lapse timer may wake the loop (waking for
            // a beat that cannot start yet would spin).
            let beat_at = if in_flight.is_some() {
                Instant::now() + every
            } else {
                next_beat
            };
            let wake = self
                .held
                .next_lapse(margin)
                .map_or(beat_at, |l| l.min(beat_at));
            tokio::select! {
                _ = stop.cancelled() => return,
                (sent, r) = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    match r {
                        Ok(beats) => {
                            failures = 0;
                            self.record(sent, &beats);
                            next_beat = Instant::now() + every;
                        }
                        Err(e) => {
                            failures += 1;
                            warn!(queue = self.queue, error = %e, "heartbeat failed");
                            // The lease is running out: try again soon.
                            next_beat = Instant::now()
                                + (every / 4).max(Duration::from_millis(100)) * failures.min(4);
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if in_flight.is_none() && now >= next_beat {
                let fences = self.held.to_extend(now);
                if fences.is_empty() {
                    next_beat = now + every;
                } else {
                    let (sql, pool, lease) = (self.sql.clone(), pool.clone(), self.lease);
                    in_flight = Some(Box::pin(async move {
                        let sent = Instant::now();
                        let beat = crate::db::run(&pool, crate::db::Deadline::Control, async |c| {
                            sql.heartbeat(c, &fences, lease).await
                        });
                        let r = match tokio::time::timeout(limit, beat).await {
                            Ok(Ok(b)) => Ok(b),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {limit:?}")),
                        };
                        (sent, r)
                    }));
                }
            }
            for f in self.held.lapse(Instant::now(), margin) {
                metrics::counter!(t::LEASES_LAPSED, "queue" => self.queue).increment(1);
                warn!(
                    queue = self.queue,
                    id = f.msg_id,
                    "the lease could not be extended in time; cancelling the handler before another worker may take the job"
                );
            }
        }
    }

    fn record(&self, sent: Instant, beats: &[(Fence, Beat)]) {
        for lost in self.held.beaten(sent, self.lease, beats) {
            metrics::counter!(t::STALE_ACKS, "queue" => self.queue).increment(1);
            warn!(
                queue = self.queue,
                id = lost.fence.msg_id,
                "lease lost; cancelling the handler"
            );
            if let Some(o) = &self.observer {
                o.lease_lost(self.queue, lost.fence.msg_id);
            }
        }
    }
}
