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
//!
//! Busy connections (a body sent a byte at a time, a long poll) cannot be evicted, so
//! one address (an IPv6 /64 counts as one) may hold at most
//! `ingress.max_connections_per_address` of them, and long polls are capped by
//! `ingress.max_waiters`: a few hosts cannot fill the table with busy connections.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
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
    /// 0: no per-address cap.
    pub per_address: usize,
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
    from: Option<IpAddr>,
}

/// Open connections: whether each has a request in progress, and since when not, and
/// how many each client address holds.
#[derive(Default)]
struct Conns {
    next: Mutex<u64>,
    live: Mutex<BTreeMap<u64, Conn>>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Conns {
    /// Makes room for a new connection from `from`: under the cap, or by evicting the
    /// oldest idle. `None` when every open connection is busy, or `from` holds its
    /// share already (the new one is closed).
    fn admit(
        &self,
        max: usize,
        per_address: usize,
        from: Option<IpAddr>,
    ) -> Option<(u64, CancellationToken)> {
        let mut live = self.live.lock().expect("not poisoned");
        let from = from.map(super::auth::client_key);
        if let Some(ip) = from
            && per_address > 0
        {
            let full = self
                .per_address
                .lock()
                .expect("not poisoned")
                .get(&ip)
                .is_some_and(|n| *n >= per_address);
            if full {
                // Its own oldest idle connection makes room; if all of its are busy,
                // the new one is closed.
                let oldest = live
                    .iter()
                    .filter(|(_, c)| !c.busy && c.from == Some(ip))
                    .min_by_key(|(_, c)| c.since)
                    .map(|(id, _)| *id)?;
                if let Some(c) = live.remove(&oldest) {
                    c.evict.cancel();
                    self.release(c.from, per_address);
                    metrics::counter!(t::HTTP_EVICTED).increment(1);
                }
            }
            *self
                .per_address
                .lock()
                .expect("not poisoned")
                .entry(ip)
                .or_default() += 1;
        }
        if live.len() >= max {
            let oldest = live
                .iter()
                .filter(|(_, c)| !c.busy)
                .min_by_key(|(_, c)| c.since)
                .map(|(id, _)| *id);
            let Some(oldest) = oldest else {
                self.release(from, per_address);
                return None;
            };
            if let Some(c) = live.remove(&oldest) {
                c.evict.cancel();
                self.release(c.from, per_address);
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
                from,
            },
        );
        Some((id, evict))
    }

    fn release(&self, from: Option<IpAddr>, per_address: usize) {
        if let Some(ip) = from
            && per_address > 0
        {
            let mut held = self.per_address.lock().expect("not poisoned");
            if let Some(n) = held.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&ip);
                }
            }
        }
    }

    fn busy(&self, id: u64, busy: bool) {
        if let Some(c) = self.live.lock().expect("not poisoned").get_mut(&id) {
            c.busy = busy;
            c.since = Instant::now();
        }
    }

    fn leave(&self, id: u64, per_address: usize) {
        let gone = self.live.lock().expect("not poisoned").remove(&id);
        if let Some(c) = gone {
            self.release(c.from, per_address);
        }
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
                Ok((stream, addr)) => {
                    accept_errors = 0;
                    let Some((id, evict)) = conns.admit(limits.max_connections, limits.per_address, Some(addr.ip())) else {
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
    // Leaves the table however this task ends (a panic included), so a slot is
    // never leaked.
    struct Leave(Arc<Conns>, u64, usize);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.leave(self.1, self.2);
        }
    }
    let _leave = Leave(conns.clone(), id, limits.per_address);
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
        // Headers are small: 16 KiB of buffer and 64 headers per connection bound
        // what unauthenticated clients can make us hold (hyper's default is ~400 KB).
        .max_buf_size(16 * 1024)
        .max_headers(64)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let c = Conns::default();
        let (a, ea) = c.admit(2, 0, None).unwrap();
        let (b, eb) = c.admit(2, 0, None).unwrap();
        c.busy(a, true);
        let (_, _) = c
            .admit(2, 0, None)
            .expect("room made by evicting the idle one");
        assert!(eb.is_cancelled(), "b was idle: evicted");
        assert!(!ea.is_cancelled(), "a is busy: kept");
        c.leave(b, 0);
        // Everything busy: no room.
        let live: Vec<u64> = c.live.lock().unwrap().keys().copied().collect();
        for id in live {
            c.busy(id, true);
        }
        assert!(c.admit(2, 0, None).is_none());
    }

    #[test]
    fn one_address_holds_its_share_and_no_more() {
        let c = Conns::default();
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let one = v6("2001:db8::1");
        let a = c.admit(100, 2, one).unwrap().0;
        let b = c
            .admit(100, 2, v6("2001:db8::ffff"))
            .expect("same /64, second slot")
            .0;
        c.busy(a, true);
        c.busy(b, true);
        assert!(
            c.admit(100, 2, v6("2001:db8::2")).is_none(),
            "a third from the same /64 while both are busy"
        );
        assert!(
            c.admit(100, 2, v6("2001:db8:0:1::1")).is_some(),
            "another /64"
        );
        c.leave(a, 2);
        let (_, idle) = c.admit(100, 2, one).expect("a slot freed on leaving");
        let (_, _) = c
            .admit(100, 2, one)
            .expect("its own idle connection makes room");
        assert!(idle.is_cancelled());
        // Evicted connections give their address's slot back.
        let c = Conns::default();
        let four = v6("192.0.2.7");
        c.admit(1, 1, four).unwrap();
        c.admit(1, 1, v6("192.0.2.8")).expect("evicts the idle one");
        assert!(c.admit(1, 1, four).is_some(), "its slot came back");
    }
}
