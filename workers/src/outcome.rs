//! From a handler's outcome to what the store must do, given the attempt and the
//! queue's settings. Pure, so the mapping is tested without a database.

use std::time::Duration;

use serde_json::Value;

use crate::backoff;
use crate::config::QueueSettings;
use crate::job::Outcome;

/// What the store does with a claimed message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Done(Option<Value>),
    Reschedule {
        delay: Duration,
        error: Option<String>,
        /// The read does not spend an attempt.
        free: bool,
    },
    Bury {
        attempts: u32,
        error: String,
    },
    /// An operator cancelled it: out of the queue, recorded as cancelled.
    Cancel,
}

impl Action {
    /// A release: visible again now, the read not counted as an attempt (a shutdown,
    /// or a run that never started).
    pub(crate) const RELEASE: Action = Action::Reschedule {
        delay: Duration::ZERO,
        error: None,
        free: true,
    };

    /// The `outcome` label of `longshore_jobs_total`.
    pub(crate) fn label(&self, from: &Outcome) -> &'static str {
        match (self, from) {
            (Action::Done(_), _) => "done",
            (Action::Reschedule { free: true, .. }, _) => "snooze",
            (Action::Reschedule { .. }, _) => "retry",
            (Action::Bury { .. }, Outcome::Fail(_)) => "fail",
            (Action::Bury { .. }, _) => "exhausted",
            (Action::Cancel, _) => "cancelled",
        }
    }
}

/// Maps an outcome to an action. `draw` is the uniform random number for the jitter.
pub(crate) fn decide(outcome: &Outcome, attempt: u32, q: &QueueSettings, draw: f64) -> Action {
    match outcome {
        Outcome::Done(r) => Action::Done(r.clone()),
        Outcome::Snooze(d) => Action::Reschedule {
            delay: *d,
            error: None,
            free: true,
        },
        Outcome::Fail(e) => Action::Bury {
            attempts: attempt,
            error: e.clone(),
        },
        Outcome::Retry(e) if attempt >= q.max_attempts => Action::Bury {
            attempts: attempt,
            error: format!("{e} (gave up after {attempt} attempts)"),
        },
        Outcome::Retry(e) => Action::Reschedule {
            delay: backoff::full_jitter(attempt, q.backoff_base, q.backoff_cap, draw),
            error: Some(e.clone()),
            free: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnDone;

    fn q(max_attempts: u32) -> QueueSettings {
        QueueSettings {
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            max_attempts,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(100),
            on_done: OnDone::Archive,
            concurrency: 4,
        }
    }

    #[test]
    fn done_keeps_result() {
        let r = Some(serde_json::json!({"ok": 1}));
        let a = decide(&Outcome::Done(r.clone()), 1, &q(3), 0.5);
        assert_eq!(a, Action::Done(r));
        assert_eq!(a.label(&Outcome::Done(None)), "done");
    }

    #[test]
    fn retry_backs_off_until_max_then_buries() {
        let o = Outcome::Retry("boom".into());
        let a = decide(&o, 2, &q(3), 1.0);
        assert_eq!(
            a,
            Action::Reschedule {
                delay: Duration::from_secs(4),
                error: Some("boom".into()),
                free: false
            }
        );
        assert_eq!(a.label(&o), "retry");
        let a = decide(&o, 3, &q(3), 1.0);
        match &a {
            Action::Bury { attempts, error } => {
                assert_eq!(*attempts, 3);
                assert!(error.starts_with("boom"), "{error}");
            }
            other => panic!("expected bury, got {other:?}"),
        }
        assert_eq!(a.label(&o), "exhausted");
    }

    #[test]
    fn snooze_is_free_and_exact() {
        let o = Outcome::Snooze(Duration::from_millis(1500));
        let a = decide(&o, 7, &q(3), 0.9);
        assert_eq!(
            a,
            Action::Reschedule {
                delay: Duration::from_millis(1500),
                error: None,
                free: true
            }
        );
        assert_eq!(a.label(&o), "snooze");
    }

    #[test]
    fn fail_buries_at_once() {
        let o = Outcome::Fail("bad args".into());
        assert_eq!(
            decide(&o, 1, &q(10), 0.1),
            Action::Bury {
                attempts: 1,
                error: "bad args".into()
            }
        );
        assert_eq!(decide(&o, 1, &q(10), 0.1).label(&o), "fail");
        assert_eq!(o.label(), "fail", "one spelling in logs and metrics");
    }
}
