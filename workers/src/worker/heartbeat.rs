//! Keeps the leases of a consumer's running jobs, and stops the jobs whose lease it
//! cannot keep before anyone else may take them.
//!
//! Every `lease / 3` it extends every `Waiting` or `Running` lease in one statement on
//! the control pool, which never waits for a row lock (`SKIP LOCKED`) and is bounded on
//! the client side, so neither a paused server nor a slow commit can hold it. A lease is
//! known to run until the moment its last successful extension was *sent* plus the lease
//! (the database's `vt` is later, never earlier); a run whose lease would end within
//! `lease / 4` is cancelled then, so it has stopped before its message becomes visible
//! to other workers. A message found gone while its run goes on (claimed elsewhere
//! after a stall of this process) has its run cancelled too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Observer;
use super::held::Held;
use crate::store::QueueSql;
use crate::telemetry as t;

pub(super) struct Heartbeat {
    pub queue: &'static str,
    pub sql: Arc<QueueSql>,
    pub control: PgPool,
    pub lease: Duration,
    pub statement_timeout: Duration,
    pub held: Arc<Held>,
    pub observer: Option<Arc<dyn Observer>>,
}

impl Heartbeat {
    /// How long before its lease ends a run that could not be extended is cancelled.
    pub fn margin(lease: Duration) -> Duration {
        lease / 4
    }

    pub async fn run(self, stop: CancellationToken) {
        let every = self.lease / 3;
        let margin = Self::margin(self.lease);
        // A statement may take at most this long: a lease gets at least two tries.
        let limit = self.statement_timeout.min(self.lease / 4);
        let mut next_beat = Instant::now() + every;
        let mut failures = 0u32;
        loop {
            let wake = self
                .held
                .next_lapse(margin)
                .map_or(next_beat, |l| l.min(next_beat));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            if now >= next_beat {
                let fences = self.held.to_extend(now);
                let mut ok = true;
                if !fences.is_empty() {
                    let sent = Instant::now();
                    let r = tokio::time::timeout(
                        limit,
                        self.sql.heartbeat(&self.control, &fences, self.lease),
                    )
                    .await;
                    match r {
                        Ok(Ok(beats)) => {
                            failures = 0;
                            for lost in self.held.beaten(sent, self.lease, &beats) {
                                metrics::counter!(t::STALE_ACKS, "queue" => self.queue)
                                    .increment(1);
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
                        Ok(Err(e)) => {
                            ok = false;
                            failures += 1;
                            warn!(queue = self.queue, error = %e, held = fences.len(), "heartbeat failed");
                        }
                        Err(_) => {
                            ok = false;
                            failures += 1;
                            warn!(
                                queue = self.queue,
                                held = fences.len(),
                                "heartbeat got no answer within {limit:?}"
                            );
                        }
                    }
                }
                // After a failure, try again soon: the lease is running out.
                next_beat = Instant::now()
                    + if ok {
                        every
                    } else {
                        (every / 4).max(Duration::from_millis(100)) * failures.min(4)
                    };
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
}
