//! `?wait=` long polls: waiters by job, woken by the completion notifications that name
//! their job, and the watch that makes a queue's completions notify at all.
//!
//! A completion notifies only while some ingress watches its queue (a row in
//! `longshore.done_watch`, see the notify_budget migration): notifying costs every
//! completing commit a cluster-wide lock, so a queue nobody waits on must not pay it.
//! A waiter makes sure the watch holds before its first status read; the ingress renews
//! the watch of every queue with waiters every [`RENEW_EVERY`], and a watch lapses
//! [`WATCH_FOR`] after its last renewal.
//!
//! What wakes a waiter: a notification naming its job; the listener connecting again
//! (what was sent while it was down is missed); a re-check after [`POLL_RECHECK`] while
//! notifications cannot be trusted (the listener is down, the watch could not be
//! written, or it was written just now: a completion whose trigger ran before the watch
//! was visible did not notify), else after [`SAFETY_RECHECK`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::warn;

use crate::listener::Event;

/// How long a watch holds after it is written.
pub(super) const WATCH_FOR: Duration = Duration::from_secs(60);
/// How often the ingress renews the watch of the queues with waiters.
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(15);
/// A waiter that finds its queue's watch holding for less than this writes it first.
const RENEW_BELOW: Duration = Duration::from_secs(30);
/// The re-check of a waiter whose notification can be trusted: a safety net only.
pub(super) const SAFETY_RECHECK: Duration = Duration::from_secs(10);
/// The re-check of a waiter whose notification may not come.
pub(super) const POLL_RECHECK: Duration = Duration::from_secs(1);

const UPSERT: &str = "INSERT INTO longshore.done_watch (queue, until)
    SELECT q, now() + make_interval(secs => $2) FROM unnest($1::text[]) q
    ON CONFLICT (queue) DO UPDATE SET until = greatest(done_watch.until, excluded.until)";

#[derive(Clone, Default)]
pub(super) struct Waiters(Arc<Inner>);

#[derive(Default)]
struct Inner {
    queues: Mutex<HashMap<String, QueueWaiters>>,
    /// The completion listener holds `LISTEN`.
    listening: AtomicBool,
}

#[derive(Default)]
struct QueueWaiters {
    /// Per job: its waiters' wake-up and how many wait on it.
    jobs: HashMap<i64, (Arc<Notify>, usize)>,
    waiters: usize,
    /// Until when this process's last write of the watch holds, by its own clock (an
    /// underestimate: taken before the statement was sent).
    watched_until: Option<Instant>,
    /// One waiter writes the watch at a time; the others wait for it.
    writing: Arc<tokio::sync::Mutex<()>>,
}

/// One waiter on one job; unregisters when dropped.
pub(super) struct Waiting {
    waiters: Waiters,
    queue: String,
    id: i64,
    pub(super) notify: Arc<Notify>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut m = self.waiters.0.queues.lock().expect("not poisoned");
        if let Some(q) = m.get_mut(&self.queue) {
            q.waiters = q.waiters.saturating_sub(1);
            if let Some(j) = q.jobs.get_mut(&self.id) {
                j.1 = j.1.saturating_sub(1);
                if j.1 == 0 {
                    q.jobs.remove(&self.id);
                }
            }
        }
    }
}

impl Waiters {
    pub(super) fn register(&self, queue: &str, id: i64) -> Waiting {
        let mut m = self.0.queues.lock().expect("not poisoned");
        let q = m.entry(queue.to_string()).or_default();
        q.waiters += 1;
        let j = q.jobs.entry(id).or_insert_with(|| (Arc::default(), 0));
        j.1 += 1;
        Waiting {
            waiters: self.clone(),
            queue: queue.to_string(),
            id,
            notify: j.0.clone(),
        }
    }

    pub(super) fn listening(&self) -> bool {
        self.0.listening.load(Ordering::Relaxed)
    }

    /// What the completion listener heard.
    pub(super) fn on_event(&self, e: Event<'_>) {
        match e {
            Event::Notified(payload) => self.wake(payload),
            Event::Connected | Event::Lost => {
                self.0
                    .listening
                    .store(e == Event::Connected, Ordering::Relaxed);
                let mut m = self.0.queues.lock().expect("not poisoned");
                for q in m.values_mut() {
                    // The watch rows are unlogged: a server that restarted (and dropped
                    // this connection) lost them. Written again by the next waiter.
                    q.watched_until = None;
                    q.jobs.values().for_each(|(n, _)| n.notify_waiters());
                }
            }
        }
    }

    /// `"queue id,id,..."` wakes those jobs' waiters; a bare `"queue"` (an older
    /// runtime's trigger) wakes every waiter of the queue.
    fn wake(&self, payload: &str) {
        let (queue, ids) = payload.split_once(' ').unwrap_or((payload, ""));
        let m = self.0.queues.lock().expect("not poisoned");
        let Some(q) = m.get(queue) else { return };
        if ids.is_empty() {
            q.jobs.values().for_each(|(n, _)| n.notify_waiters());
            return;
        }
        for id in ids.split(',') {
            if let Some((n, _)) = id.parse::<i64>().ok().and_then(|id| q.jobs.get(&id)) {
                n.notify_waiters();
            }
        }
    }

    /// Makes sure completions on `queue` notify before the caller reads a status:
    /// `true` if the watch did not hold when the caller came (a completion decided just
    /// before it became visible did not notify: re-check soon), `false` if it did.
    pub(super) async fn watch(&self, pool: &PgPool, queue: &str) -> Result<bool, sqlx::Error> {
        if crate::db::pooled() {
            // No LISTEN through a transaction-mode pooler: nobody would hear the
            // notifications a watch turns on. Waiters re-check every second.
            return Ok(false);
        }
        let came = Instant::now();
        let (writing, until) = {
            let mut m = self.0.queues.lock().expect("not poisoned");
            let q = m.entry(queue.to_string()).or_default();
            (q.writing.clone(), q.watched_until)
        };
        let fresh = until.is_none_or(|u| u <= came);
        if until.is_some_and(|u| u > came + RENEW_BELOW) {
            return Ok(false);
        }
        let _one = writing.lock().await;
        let now = self.watched_until(queue);
        if now.is_some_and(|u| u > Instant::now() + RENEW_BELOW) {
            // Another waiter wrote it while this one waited.
            return Ok(fresh);
        }
        self.write(pool, &[queue.to_string()]).await?;
        Ok(fresh)
    }

    /// A waiter on `queue` can count on its notification: the listener holds and the
    /// watch this process wrote still holds.
    pub(super) fn trusted(&self, queue: &str) -> bool {
        self.listening()
            && self
                .watched_until(queue)
                .is_some_and(|u| u > Instant::now())
    }

    fn watched_until(&self, queue: &str) -> Option<Instant> {
        let m = self.0.queues.lock().expect("not poisoned");
        m.get(queue).and_then(|q| q.watched_until)
    }

    async fn write(&self, pool: &PgPool, queues: &[String]) -> Result<(), sqlx::Error> {
        if crate::db::pooled() {
            return Ok(());
        }
        let sent = Instant::now();
        sqlx::query(UPSERT)
            .bind(queues)
            .bind(WATCH_FOR.as_secs_f64())
            .execute(pool)
            .await?;
        let mut m = self.0.queues.lock().expect("not poisoned");
        for name in queues {
            let q = m.entry(name.clone()).or_default();
            q.watched_until = Some(sent + WATCH_FOR);
        }
        Ok(())
    }

    /// Renews the watch of every queue with waiters (run every [`RENEW_EVERY`]).
    pub(super) async fn renew(&self, pool: &PgPool) {
        let queues: Vec<String> = {
            let m = self.0.queues.lock().expect("not poisoned");
            m.iter()
                .filter(|(_, q)| q.waiters > 0)
                .map(|(n, _)| n.clone())
                .collect()
        };
        if queues.is_empty() {
            return;
        }
        if let Err(e) = self.write(pool, &queues).await {
            warn!(error = %e, queues = queues.len(), "could not renew the completion watch; waiters poll meanwhile");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use tokio::sync::futures::Notified;

    use super::*;

    fn ready(f: Pin<&mut Notified<'_>>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[tokio::test]
    async fn a_notification_wakes_only_the_jobs_it_names() {
        let w = Waiters::default();
        let a = w.register("llm_call", 7);
        let b = w.register("llm_call", 8);
        let other = w.register("probe", 7);
        let (na, nb, no) = (
            a.notify.notified(),
            b.notify.notified(),
            other.notify.notified(),
        );
        tokio::pin!(na, nb, no);
        na.as_mut().enable();
        nb.as_mut().enable();
        no.as_mut().enable();
        w.on_event(Event::Notified("llm_call 5,7,x"));
        assert!(ready(na.as_mut()));
        assert!(!ready(nb.as_mut()));
        assert!(!ready(no.as_mut()));
        // An older trigger's bare queue name wakes every waiter of that queue.
        w.on_event(Event::Notified("llm_call"));
        assert!(ready(nb.as_mut()));
        assert!(!ready(no.as_mut()));
        // A reconnect wakes everyone, and says whether notifications can be trusted.
        assert!(!w.listening());
        w.on_event(Event::Connected);
        assert!(w.listening());
        assert!(ready(no.as_mut()));
        w.on_event(Event::Lost);
        assert!(!w.listening());
    }

    #[test]
    fn waiters_unregister_when_dropped() {
        let w = Waiters::default();
        let a = w.register("q", 1);
        let b = w.register("q", 1);
        drop(a);
        assert_eq!(w.0.queues.lock().unwrap()["q"].jobs[&1].1, 1);
        drop(b);
        let m = w.0.queues.lock().unwrap();
        assert!(m["q"].jobs.is_empty());
        assert_eq!(m["q"].waiters, 0);
    }
}
