//! LISTEN/NOTIFY with reconnection. Workers listen on [`ENQUEUE`] (a statement-level
//! trigger on every queue table notifies with the queue name, debounced per queue);
//! the ingress listens on [`DONE`] (triggers on archives, completion records and dead
//! letters notify `"queue id,id,..."` while an ingress watches the queue) to answer
//! `?wait=`.
//!
//! The callback hears [`Event::Lost`] when the connection drops (notifications may be
//! missed from here on) and [`Event::Connected`] once a new connection has delivered a
//! notification, its own ping at least (anything sent before was missed: re-check
//! everything). The listener reconnects with
//! backoff; it never relies on the driver's silent reconnect, which gives no moment
//! from which notifications are heard again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Notified with the queue name when jobs are enqueued.
pub const ENQUEUE: &str = "longshore_enqueue";
/// Notified with `"queue id,id,..."` when jobs are archived (done), recorded done or
/// dead-lettered, while some ingress watches the queue (`longshore.done_watch`).
pub const DONE: &str = "longshore_done";

/// With nothing heard this long, the listener checks that its connection still delivers.
const QUIET_FOR: Duration = Duration::from_secs(30);
/// How long its own ping may take to come back.
const PING_WAIT: Duration = Duration::from_secs(10);

/// What the listener hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// The connection delivers (first connect or reconnect): what was sent before is
    /// missed.
    Connected,
    /// The connection dropped: notifications are missed until [`Event::Connected`].
    Lost,
    /// A notification's payload.
    Notified(&'a str),
}

/// What [`run`] calls on every [`Event`].
pub type OnEvent = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// LISTENs on `channel` until `stop`, reconnecting with backoff, and reports each event to `on_event`.
pub async fn run(pool: PgPool, channel: &'static str, on_event: OnEvent, stop: CancellationToken) {
    // A pool of its own (the LISTEN connection and its pings): handlers holding every
    // connection of the main pool must not make it look deaf, and a connection it drops
    // must not park one of theirs.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(PING_WAIT)
        .connect_lazy_with((*pool.connect_options()).clone());
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
        debug!(channel, "listening; waiting for its own ping");
        // The receiving loop runs in a task of its own, never cancelled mid-message; this
        // one watches that the connection still delivers (a half-open TCP connection
        // through a load balancer or NAT never reports its loss): after QUIET_FOR with
        // nothing heard it sends an empty notification of its own on the channel, and a
        // connection that does not deliver it within PING_WAIT is dropped.
        // Trusted (`Connected`) only once something was heard on it: a LISTEN that
        // succeeds on a connection that never delivers (a pooler in transaction mode)
        // must not make consumers sleep long.
        let heard = Arc::new(std::sync::Mutex::new(Instant::now()));
        let mut recv = {
            let (heard, on_event) = (heard.clone(), on_event.clone());
            tokio::spawn(async move {
                let mut proven = false;
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            *heard.lock().expect("not poisoned") = Instant::now();
                            if !proven {
                                proven = true;
                                on_event(Event::Connected);
                            }
                            if !n.payload().is_empty() {
                                on_event(Event::Notified(n.payload()));
                            }
                        }
                        Ok(None) => return "connection lost".to_string(),
                        Err(e) => return e.to_string(),
                    }
                }
            })
        };
        let mut pinged = Some(Instant::now());
        ping(&pool, channel);
        let mut tick = tokio::time::interval(PING_WAIT / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    recv.abort();
                    return;
                }
                r = &mut recv => {
                    let why = r.unwrap_or_else(|e| e.to_string());
                    warn!(channel, error = %why, "listener connection lost; reconnecting");
                    on_event(Event::Lost);
                    break;
                }
                _ = tick.tick() => {
                    let last = *heard.lock().expect("not poisoned");
                    match pinged {
                        Some(at) if last >= at => pinged = None,
                        Some(at) if at.elapsed() >= PING_WAIT => {
                            recv.abort();
                            warn!(channel, "the listener heard nothing, not even its own ping; reconnecting");
                            on_event(Event::Lost);
                            break;
                        }
                        Some(_) => {}
                        None if last.elapsed() >= QUIET_FOR => {
                            pinged = Some(Instant::now());
                            ping(&pool, channel);
                        }
                        None => {}
                    }
                }
            }
        }
        // A connection that drops as soon as it is made must not become a busy loop.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// An empty notification on `channel` (every listener of it ignores the payload).
fn ping(pool: &PgPool, channel: &'static str) {
    let pool = pool.clone();
    tokio::spawn(async move {
        let ping = sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(&pool);
        let _ = tokio::time::timeout(PING_WAIT, ping).await;
    });
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    // A lost connection is reported at once (and this module reconnects), not after
    // the driver's own reconnect attempt.
    l.eager_reconnect(false);
    l.listen(channel).await?;
    Ok(l)
}
