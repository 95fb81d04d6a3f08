//! LISTEN/NOTIFY wake-ups. Every queue table has a statement-level trigger that
//! notifies `longshore_enqueue` with the queue name; the listener wakes that queue's
//! consumer. When the listening connection drops, every consumer is woken (a
//! notification may have been missed) and the listener reconnects; the consumers' poll
//! interval covers the gap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub const CHANNEL: &str = "longshore_enqueue";

pub(crate) async fn run(
    pool: PgPool,
    wakers: Arc<HashMap<String, Arc<Notify>>>,
    stop: CancellationToken,
) {
    let wake_all = || wakers.values().for_each(|w| w.notify_one());
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let mut listener = match connect(&pool).await {
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
                warn!(error = %e, retry_in = ?wait, "listener could not connect; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        debug!("listening for enqueues");
        wake_all();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        if let Some(w) = wakers.get(n.payload()) {
                            w.notify_one();
                        }
                    }
                    Ok(None) => {
                        warn!("listener connection lost; reconnecting");
                        wake_all();
                    }
                    Err(e) => {
                        warn!(error = %e, "listener failed; reconnecting");
                        wake_all();
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}
