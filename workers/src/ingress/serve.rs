//! The ingress's own accept loop: HTTP/1.1 with a header-read deadline (which also
//! ends idle keep-alive connections) and a connection cap that an idle attacker cannot
//! use to lock others out.
//!
//! Unauthenticated clients can open sockets and say nothing (slowloris), or open many
//! and hold them. So: a connection that has not sent a complete request head within
//! `ingress.header_timeout` is closed; at most `ingress.max_connections` are open (and
//! never more than the process's descriptor limit minus a reserve for the database and
//! files); and when the cap is reached, a new connection evicts the oldest *idle* one
//! (no request in progress) instead of being refused, so a health check or a real
//! client always gets in, sends its request and is served. A connection with a request
//! in progress is never evicted; its body is bounded by `ingress.read_timeout`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{info, warn};

use crate::telemetry as t;

/// Descriptors kept free for everything else the process opens (database connections,
/// files, the LISTEN connection).
const FD_RESERVE: usize = 64;

#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Limits {
    /// `max_connections`, lowered to fit under the descriptor limit.
    pub fn effective(self) -> Limits {
        let mut l = self;
        if let Some(nofile) = descriptor_limit() {
            let fit = nofile.saturating_sub(FD_RESERVE).max(8);
            if fit < l.max_connections {
                info!(
                    configured = l.max_connections,
                    descriptors = nofile,
                    using = fit,
                    "ingress.max_connections lowered to fit the descriptor limit"
                );
                l.max_connections = fit;
            }
        }
        l
    }
}

fn descriptor_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as usize)
}

struct Conn {
    busy: bool,
    since: Instant,
    evict: CancellationToken,
}

/// Open connections: whether each has a request in progress, and since when not.
#[derive(Default)]
struct Conns {
    next: Mutex<u64>,
    live: Mutex<BTreeMap<u64, Conn>>,
}

impl Conns {
    /// Makes room for a new connection: under the cap, or by evicting the oldest idle.
    /// `None` when every open connection is busy (the new one is closed).
    fn admit(&self, max: usize) -> Option<(u64, CancellationToken)> {
        let mut live = self.live.lock().expect("not poisoned");
        if live.len() >= max {
            let oldest = live
                .iter()
                .filter(|(_, c)| !c.busy)
                .min_by_key(|(_, c)| c.since)
                .map(|(id, _)| *id)?;
            if let Some(c) = live.remove(&oldest) {
                c.evict.cancel();
                metrics::counter!(t::HTTP_EVICTED).increment(1);
            }
        }
        let id = {
            let mut n = self.next.lock().expect("not poisoned");
            *n += 1;
            *n
        };
        let evict = CancellationToken::new();
        live.insert(
            id,
            Conn {
                busy: false,
                since: Instant::now(),
                evict: evict.clone(),
            },
        );
        Some((id, evict))
    }

    fn busy(&self, id: u64, busy: bool) {
        if let Some(c) = self.live.lock().expect("not poisoned").get_mut(&id) {
            c.busy = busy;
            c.since = Instant::now();
        }
    }

    fn leave(&self, id: u64) {
        self.live.lock().expect("not poisoned").remove(&id);
    }
}

/// Serves `app` on `listener` until `stop`; in-flight requests then get up to 10 s.
pub(super) async fn run(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let limits = limits.effective();
    let conns = Arc::new(Conns::default());
    let mut tasks = JoinSet::new();
    let mut accept_errors = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_errors = 0;
                    let Some((id, evict)) = conns.admit(limits.max_connections) else {
                        metrics::counter!(t::HTTP_REFUSED).increment(1);
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(serve_one(stream, app.clone(), conns.clone(), id, evict, limits, stop.clone()));
                }
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: back off a moment; the
                    // header deadline frees descriptors held by silent sockets.
                    accept_errors += 1;
                    if accept_errors == 1 || accept_errors.is_power_of_two() {
                        warn!(error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    Ok(())
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    app: Router,
    conns: Arc<Conns>,
    id: u64,
    evict: CancellationToken,
    limits: Limits,
    stop: CancellationToken,
) {
    let c = conns.clone();
    let peer = stream.peer_addr().ok().map(|a| super::Peer(a.ip()));
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let (app, c) = (app.clone(), c.clone());
        if let Some(p) = peer {
            req.extensions_mut().insert(p);
        }
        c.busy(id, true);
        async move {
            let r = app.oneshot(req.map(axum::body::Body::new)).await;
            c.busy(id, false);
            r
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = evict.cancelled() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.as_mut()).await;
        }
    }
    conns.leave(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let c = Conns::default();
        let (a, ea) = c.admit(2).unwrap();
        let (b, eb) = c.admit(2).unwrap();
        c.busy(a, true);
        let (_, _) = c.admit(2).expect("room made by evicting the idle one");
        assert!(eb.is_cancelled(), "b was idle: evicted");
        assert!(!ea.is_cancelled(), "a is busy: kept");
        c.leave(b);
        // Everything busy: no room.
        let live: Vec<u64> = c.live.lock().unwrap().keys().copied().collect();
        for id in live {
            c.busy(id, true);
        }
        assert!(c.admit(2).is_none());
    }
}
