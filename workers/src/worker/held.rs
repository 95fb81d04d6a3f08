//! What this process holds: one entry per claimed message, keyed by `msg_id` and
//! owned by the fence `(msg_id, read_ct)` it was claimed with.
//!
//! ```text
//!   claim ──► Waiting ──► Running ──► Settling ──► gone
//!              │  (an earlier run of the same message in this process
//!              │   has not stopped yet: start only once it has)
//!              └── cancelled (shutdown, lease lapsed, lease lost) ──► settled as such
//! ```
//!
//! Every change is made by fence: a run that ends after its message was claimed again
//! (at a higher `read_ct`) can neither settle nor remove the newer entry. This process
//! never claims back a message it still holds (the claim excludes these ids), so
//! `Waiting` is a defence: if it ever happens, the older run is cancelled and the newer
//! waits for it to stop. The heartbeat extends every entry not cancelled, `Settling`
//! ones too (an outcome waiting behind a slow flush must keep its lease), but an entry
//! found gone while `Settling` is taken as acknowledged, never as a lost lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::store::{Beat, Fence};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Waiting,
    Running,
    Settling,
}

/// Why a run was cancelled; decides how it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The shutdown grace period ended: released (visible now, attempt not spent).
    Shutdown,
    /// The lease could not be extended in time: cancelled before anyone else can claim
    /// it, then retried (fenced, so it is a no-op if someone already has).
    LeaseLapsed,
    /// The message is no longer ours (claimed again, here or elsewhere): nothing to write.
    LeaseLost,
    /// An operator cancelled it: its effects roll back and it is recorded as cancelled.
    Cancelled,
}

struct Entry {
    read_ct: i32,
    phase: Phase,
    cancel: CancellationToken,
    why: Option<Stop>,
    /// Local deadline of the lease: when the statement that last set it was sent, plus
    /// the lease. Earlier than the database's own `vt`, never later.
    lease_until: Instant,
    /// Heartbeats stop here (claim + the queue's timeout): a handler stuck in
    /// synchronous code must not hold its job forever.
    extend_until: Instant,
    /// Cancelled once the handler future has stopped (returned, panicked or dropped).
    stopped: CancellationToken,
    /// The process's suspect slot, for a suspect; freed with the entry.
    _suspect: Option<OwnedSemaphorePermit>,
}

/// A new claim's handles.
pub(super) struct Claim {
    pub cancel: CancellationToken,
    pub stopped: CancellationToken,
    /// The stop signal of an earlier run of the same message still executing here.
    pub wait_for: Option<CancellationToken>,
}

/// What the heartbeat found lost.
pub(super) struct Lost {
    pub fence: Fence,
}

#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<i64, Entry>>);

impl Held {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.0.lock().expect("not poisoned")
    }

    /// Records a claim. If this process still holds an older read of the same message
    /// (its lease ran out during a database pause and the claim took it back), that run
    /// is cancelled as lost and the new one must wait until it has stopped.
    pub fn claim(
        &self,
        fence: Fence,
        lease_until: Instant,
        extend_until: Instant,
        suspect: Option<OwnedSemaphorePermit>,
    ) -> Claim {
        let cancel = CancellationToken::new();
        let stopped = CancellationToken::new();
        let mut map = self.map();
        let wait_for = map.get_mut(&fence.msg_id).and_then(|old| {
            if old.phase == Phase::Settling {
                return None;
            }
            old.why = Some(Stop::LeaseLost);
            old.cancel.cancel();
            Some(old.stopped.clone())
        });
        map.insert(
            fence.msg_id,
            Entry {
                read_ct: fence.read_ct,
                phase: if wait_for.is_some() {
                    Phase::Waiting
                } else {
                    Phase::Running
                },
                cancel: cancel.clone(),
                why: None,
                lease_until,
                extend_until,
                stopped: stopped.clone(),
                _suspect: suspect,
            },
        );
        Claim {
            cancel,
            stopped,
            wait_for,
        }
    }

    fn with<R>(&self, fence: Fence, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.map()
            .get_mut(&fence.msg_id)
            .filter(|e| e.read_ct == fence.read_ct)
            .map(f)
    }

    /// Waiting → Running. False if the entry is gone or was cancelled meanwhile.
    pub fn start(&self, fence: Fence) -> bool {
        self.with(fence, |e| {
            e.phase = Phase::Running;
            e.why.is_none()
        })
        .unwrap_or(false)
    }

    /// Why the run of `fence` was cancelled (`None`: it was not, or it is no longer ours,
    /// which reads as lost).
    pub fn why(&self, fence: Fence) -> Option<Stop> {
        self.with(fence, |e| e.why).unwrap_or(Some(Stop::LeaseLost))
    }

    /// Running → Settling: its outcome is about to be written. False if the message is
    /// no longer ours (the write would be fenced out anyway).
    pub fn settling(&self, fence: Fence) -> bool {
        self.with(fence, |e| {
            e.phase = Phase::Settling;
        })
        .is_some()
    }

    /// The run of `fence` is over: forget it (unless a newer read replaced it).
    pub fn finish(&self, fence: Fence) {
        let mut map = self.map();
        if map
            .get(&fence.msg_id)
            .is_some_and(|e| e.read_ct == fence.read_ct)
        {
            map.remove(&fence.msg_id);
        }
    }

    /// The ids this process holds, whatever their phase: a claim must not take them.
    pub fn ids(&self) -> Vec<i64> {
        self.map().keys().copied().collect()
    }

    /// Fences whose leases the heartbeat should extend now: all not cancelled, up to
    /// their `extend_until` (a settling one: as long as its write is pending).
    pub fn to_extend(&self, now: Instant) -> Vec<Fence> {
        let mut v: Vec<Fence> = self
            .map()
            .iter()
            .filter(|(_, e)| {
                e.why.is_none() && (e.phase == Phase::Settling || now < e.extend_until)
            })
            .map(|(id, e)| Fence {
                msg_id: *id,
                read_ct: e.read_ct,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Applies a heartbeat sent at `sent`: extended leases run to `sent + lease`; a
    /// message that is gone while its run is still going is lost, and its run cancelled.
    pub fn beaten(&self, sent: Instant, lease: Duration, beats: &[(Fence, Beat)]) -> Vec<Lost> {
        let mut lost = Vec::new();
        let mut map = self.map();
        for (fence, beat) in beats {
            let Some(e) = map
                .get_mut(&fence.msg_id)
                .filter(|e| e.read_ct == fence.read_ct)
            else {
                continue;
            };
            match beat {
                Beat::Extended => e.lease_until = e.lease_until.max(sent + lease),
                Beat::Busy => {}
                Beat::Cancelled { extended } => {
                    if *extended {
                        e.lease_until = e.lease_until.max(sent + lease);
                    }
                    if e.phase != Phase::Settling && e.why.is_none() {
                        e.why = Some(Stop::Cancelled);
                        e.cancel.cancel();
                    }
                }
                Beat::Gone => {
                    if e.phase != Phase::Settling && e.why.is_none() {
                        e.why = Some(Stop::LeaseLost);
                        e.cancel.cancel();
                        lost.push(Lost { fence: *fence });
                    }
                }
            }
        }
        lost
    }

    /// Cancels the runs whose lease would end within `margin`: they stop before anyone
    /// else can claim their message. Returns their fences.
    pub fn lapse(&self, now: Instant, margin: Duration) -> Vec<Fence> {
        let mut out = Vec::new();
        for (id, e) in self.map().iter_mut() {
            if e.phase != Phase::Settling && e.why.is_none() && e.lease_until <= now + margin {
                e.why = Some(Stop::LeaseLapsed);
                e.cancel.cancel();
                out.push(Fence {
                    msg_id: *id,
                    read_ct: e.read_ct,
                });
            }
        }
        out
    }

    /// When the next run would lapse (its lease end minus `margin`).
    pub fn next_lapse(&self, margin: Duration) -> Option<Instant> {
        self.map()
            .values()
            .filter(|e| e.phase != Phase::Settling && e.why.is_none())
            .map(|e| e.lease_until.checked_sub(margin).unwrap_or(e.lease_until))
            .min()
    }

    /// Shutdown: cancels every run still going.
    pub fn cancel_all(&self) {
        for e in self.map().values_mut() {
            if e.phase != Phase::Settling && e.why.is_none() {
                e.why = Some(Stop::Shutdown);
                e.cancel.cancel();
            }
        }
    }

    /// Shutdown, last: every fence still held whose run has stopped (aborted before it
    /// settled). A run still executing (stuck in synchronous code, deaf to abort) is not
    /// released: releasing it would let another worker start it beside this one; its
    /// lease lapses after the process exits.
    pub fn drain(&self) -> Vec<Fence> {
        let mut v: Vec<Fence> = self
            .map()
            .drain()
            .filter(|(_, e)| e.why != Some(Stop::LeaseLost))
            .filter(|(_, e)| e.stopped.is_cancelled() || e.phase == Phase::Settling)
            .map(|(id, e)| Fence {
                msg_id: id,
                read_ct: e.read_ct,
            })
            .collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(msg_id: i64, read_ct: i32) -> Fence {
        Fence { msg_id, read_ct }
    }

    fn claim(h: &Held, fence: Fence) -> Claim {
        let now = Instant::now();
        h.claim(
            fence,
            now + Duration::from_secs(30),
            now + Duration::from_secs(300),
            None,
        )
    }

    #[test]
    fn a_reclaim_cancels_the_older_run_and_waits_for_it() {
        let h = Held::default();
        let old = claim(&h, f(7, 1));
        assert!(old.wait_for.is_none());
        let new = claim(&h, f(7, 2));
        assert!(old.cancel.is_cancelled(), "the older run is cancelled");
        assert_eq!(h.why(f(7, 1)), Some(Stop::LeaseLost));
        let wait = new.wait_for.expect("the new run waits");
        assert!(!wait.is_cancelled());
        old.stopped.cancel();
        assert!(wait.is_cancelled());
        // The old run ending touches nothing of the new one.
        assert!(!h.settling(f(7, 1)));
        h.finish(f(7, 1));
        assert_eq!(h.len(), 1);
        assert!(h.start(f(7, 2)));
        assert_eq!(h.to_extend(Instant::now()), vec![f(7, 2)]);
    }

    #[test]
    fn a_settling_run_keeps_its_lease_but_is_never_counted_lost() {
        let h = Held::default();
        claim(&h, f(1, 1));
        claim(&h, f(2, 1));
        assert!(h.settling(f(1, 1)));
        assert_eq!(h.to_extend(Instant::now()), vec![f(1, 1), f(2, 1)]);
        // Even past its timeout: its outcome is waiting to be written.
        assert_eq!(
            h.to_extend(Instant::now() + Duration::from_secs(3600)),
            vec![f(1, 1)]
        );
        let mut ids = h.ids();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        let lost = h.beaten(
            Instant::now(),
            Duration::from_secs(30),
            &[(f(1, 1), Beat::Gone), (f(2, 1), Beat::Gone)],
        );
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].fence, f(2, 1));
    }

    #[test]
    fn leases_lapse_before_they_end_and_past_the_timeout_are_not_extended() {
        let h = Held::default();
        let now = Instant::now();
        let c = h.claim(
            f(1, 1),
            now + Duration::from_secs(10),
            now + Duration::from_secs(5),
            None,
        );
        assert_eq!(h.to_extend(now), vec![f(1, 1)]);
        assert!(h.to_extend(now + Duration::from_secs(6)).is_empty());
        assert!(h.lapse(now, Duration::from_secs(2)).is_empty());
        assert_eq!(
            h.lapse(now + Duration::from_secs(8), Duration::from_secs(2)),
            vec![f(1, 1)]
        );
        assert!(c.cancel.is_cancelled());
        assert_eq!(h.why(f(1, 1)), Some(Stop::LeaseLapsed));
        // An extension moves the deadline.
        let h = Held::default();
        h.claim(
            f(2, 1),
            now + Duration::from_secs(10),
            now + Duration::from_secs(60),
            None,
        );
        h.beaten(
            now + Duration::from_secs(5),
            Duration::from_secs(10),
            &[(f(2, 1), Beat::Extended)],
        );
        assert!(
            h.lapse(now + Duration::from_secs(12), Duration::from_secs(2))
                .is_empty()
        );
    }

    /// A cancel request found by a heartbeat stops the run once, with its reason, and
    /// still extends the lease when the heartbeat did (the run must settle under it).
    #[test]
    fn a_cancel_request_stops_the_run_and_keeps_the_lease() {
        let h = Held::default();
        let now = Instant::now();
        let c = h.claim(
            f(3, 1),
            now + Duration::from_secs(10),
            now + Duration::from_secs(60),
            None,
        );
        h.beaten(
            now + Duration::from_secs(5),
            Duration::from_secs(10),
            &[(f(3, 1), Beat::Cancelled { extended: true })],
        );
        assert!(c.cancel.is_cancelled());
        assert_eq!(h.why(f(3, 1)), Some(Stop::Cancelled));
        assert!(
            h.lapse(now + Duration::from_secs(12), Duration::from_secs(2))
                .is_empty(),
            "already stopping: not lapsed, and its lease was extended"
        );
        // A second request (the next heartbeat) changes nothing.
        h.beaten(
            now + Duration::from_secs(6),
            Duration::from_secs(10),
            &[(f(3, 1), Beat::Cancelled { extended: false })],
        );
        assert_eq!(h.why(f(3, 1)), Some(Stop::Cancelled));
    }
}
