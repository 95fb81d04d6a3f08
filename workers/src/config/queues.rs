//! `[worker]`, `[queues.*]` and `[enqueue]`: how a worker claims and runs, each
//! queue's settings (the `default` table overlaid by the queue's own) and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[worker]`: how a worker process claims, runs and acknowledges.
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Handlers running at once, per queue.
    pub concurrency: usize,
    /// How often an idle consumer looks for work without a NOTIFY (delayed jobs,
    /// expired leases, a lost listener).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// While the listener holds, an idle consumer sleeps until its queue's earliest
    /// message is due (a delayed job, a retry, a lease that ends), woken earlier by a
    /// notification, but never longer than this. What can make a message due without a
    /// notification is another process's retry (that process claims it itself) or a
    /// manual `UPDATE`: found within this long. Below `poll_interval` it is
    /// `poll_interval`.
    #[serde(with = "humantime_serde")]
    pub idle_poll_max: Duration,
    /// Handlers running at once in one process, all queues together (each queue also
    /// has its `concurrency`).
    pub max_handlers: usize,
    /// After SIGTERM: how long in-flight jobs may run before they are released.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Acknowledgements are written in batches of up to this many...
    pub ack_batch: usize,
    /// ...or after this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub ack_flush: Duration,
    /// Port for `/metrics` of a worker process; 0 = do not serve.
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
/// One `[queues.NAME]` table (or `[queues.default]`): every field is optional in a
/// queue's table, and an unset one is `default`'s. `default` must set `lease`,
/// `timeout`, `max_attempts`, `backoff_base` and `backoff_cap`; `on_done` falls back to
/// `archive`; `concurrency` is only a queue's own (else `worker.concurrency`), and
/// refused in `default`. See [`QueueSettings`] for what each means.
#[serde(deny_unknown_fields)]
pub struct QueueOverrides {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    /// [`QueueSettings::lease`].
    pub lease: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    /// [`QueueSettings::timeout`].
    pub timeout: Option<Duration>,
    /// [`QueueSettings::max_attempts`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    /// [`QueueSettings::backoff_base`].
    pub backoff_base: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    /// [`QueueSettings::backoff_cap`].
    pub backoff_cap: Option<Duration>,
    /// [`QueueSettings::on_done`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_done: Option<OnDone>,
    /// [`QueueSettings::concurrency`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// What happens to a message whose job is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDone {
    /// Moved to the queue's archive table (kept for the archive retention).
    Archive,
    /// Deleted.
    Delete,
}

/// The settings of one queue after the `default` table and its own are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Visibility timeout of a claim; extended by heartbeats while the handler runs.
    pub lease: Duration,
    /// A run longer than this is cut off and retried.
    pub timeout: Duration,
    /// Attempts at most, the first included. Snoozes and releases spend none; a run
    /// that crashed or lost its lease spends one. A retry asked for on the last attempt
    /// dead-letters the job (a `fail` does on any attempt).
    pub max_attempts: u32,
    /// Retry delay before jitter: attempt `n` waits up to
    /// `min(backoff_cap, backoff_base * 2^(n-1))`, drawn uniformly (full jitter).
    pub backoff_base: Duration,
    /// The ceiling of a retry delay.
    pub backoff_cap: Duration,
    /// What becomes of a done job's message.
    pub on_done: OnDone,
    /// Handlers of this queue running at once in one process.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[enqueue]`: settings of the enqueues this configuration makes: the ingress's, the
/// CLI's and webhooks' (an in-process enqueue passes its own options).
#[serde(deny_unknown_fields)]
pub struct EnqueueConfig {
    /// How long an idempotency key holds.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
}

impl WorkerConfig {
    /// Checks what types alone cannot.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let w = self;
        if w.concurrency == 0 || w.concurrency > 10_000 {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "must be 1..=10000",
            ));
        }
        if w.poll_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "worker.poll_interval",
                "must be at least 10ms",
            ));
        }
        if w.max_handlers == 0 || w.max_handlers > 100_000 {
            return Err(ConfigError::invalid(
                "worker.max_handlers",
                "must be 1..=100000",
            ));
        }
        if w.ack_batch == 0 {
            return Err(ConfigError::invalid(
                "worker.ack_batch",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The merged settings of a queue (`default` overlaid by the queue's own table).
    pub fn queue(&self, name: &str) -> QueueSettings {
        self.queue_settings_checked(name)
            .expect("validated at load: every queue table merges")
    }

    pub(super) fn queue_settings_checked(&self, name: &str) -> Result<QueueSettings, ConfigError> {
        let base = self.queues.get("default").cloned().unwrap_or_default();
        let own = self.queues.get(name).cloned().unwrap_or_default();
        let key = |f: &str| format!("queues.{name}.{f}");
        let missing = |f: &str| ConfigError::invalid(format!("queues.default.{f}"), "is required");
        let s = QueueSettings {
            lease: own.lease.or(base.lease).ok_or_else(|| missing("lease"))?,
            timeout: own
                .timeout
                .or(base.timeout)
                .ok_or_else(|| missing("timeout"))?,
            max_attempts: own
                .max_attempts
                .or(base.max_attempts)
                .ok_or_else(|| missing("max_attempts"))?,
            backoff_base: own
                .backoff_base
                .or(base.backoff_base)
                .ok_or_else(|| missing("backoff_base"))?,
            backoff_cap: own
                .backoff_cap
                .or(base.backoff_cap)
                .ok_or_else(|| missing("backoff_cap"))?,
            on_done: own.on_done.or(base.on_done).unwrap_or(OnDone::Archive),
            concurrency: own.concurrency.unwrap_or(self.worker.concurrency),
        };
        if s.lease < Duration::from_secs(1) {
            return Err(ConfigError::invalid(key("lease"), "must be at least 1s"));
        }
        if s.timeout.is_zero() {
            return Err(ConfigError::invalid(key("timeout"), "must be positive"));
        }
        if s.max_attempts == 0 {
            return Err(ConfigError::invalid(
                key("max_attempts"),
                "must be at least 1",
            ));
        }
        if s.backoff_cap < s.backoff_base {
            return Err(ConfigError::invalid(
                key("backoff_cap"),
                "must be >= backoff_base",
            ));
        }
        if s.concurrency == 0 {
            return Err(ConfigError::invalid(
                key("concurrency"),
                "must be at least 1",
            ));
        }
        Ok(s)
    }
}
