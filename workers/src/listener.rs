//! LISTEN/NOTIFY with reconnection. Workers listen on [`ENQUEUE`] (a statement-level
//! trigger on every queue table notifies with the queue name); the ingress listens on
//! [`DONE`] (triggers on archives and dead letters) to answer `?wait=`.
//!
//! When the connection drops, the callback gets `None` ("you may have missed
//! something: re-check everything") and the listener reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Notified with the queue name when jobs are enqueued.
pub const ENQUEUE: &str = "longshore_enqueue";
/// Notified with the queue name when jobs are archived (done) or dead-lettered.
pub const DONE: &str = "longshore_done";

/// `Some(payload)` for a notification, `None` after a (re)connect.
pub type OnEvent = Arc<dyn Fn(Option<&str>) + Send + Sync>;

pub async fn run(pool: PgPool, channel: &'static str, on_event: OnEvent, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        // Raced with `stop`: a server that does not answer must not hold up a shutdown.
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect(&pool, channel) => r,
        };
        let mut listener = match connected {
            Ok(l) => {
                failures = 0;
                l
            }
            Err(e) => {
                failures += 1;
                let wait = crate::backoff::delay(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(5),
                );
                warn!(channel, error = %e, retry_in = ?wait, "listener could not connect; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        debug!(channel, "listening");
        on_event(None);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => on_event(Some(n.payload())),
                    Ok(None) => {
                        warn!(channel, "listener connection lost; reconnecting");
                        on_event(None);
                    }
                    Err(e) => {
                        warn!(channel, error = %e, "listener failed; reconnecting");
                        on_event(None);
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(channel).await?;
    Ok(l)
}
