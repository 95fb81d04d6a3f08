//! `[database]`: the pool, the control pool, timeouts and the pooler, with their
//! checks.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[database]`: where the fleet's PostgreSQL is and how it is used.
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Empty: `DATABASE_URL`, else the embedded default (`dev` only). May hold a
    /// password, so it is a secret and never printed.
    #[serde(serialize_with = "ser_secret")]
    pub url: SecretString,
    /// Size of each process's main pool, at least 2: in a worker, the handlers' pool
    /// (jobs' queries and completion transactions); in the ingress, each of its two
    /// pools; the scheduler's and the CLI's.
    pub max_connections: u32,
    /// Longest wait for a pooled connection before the caller gets an error.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every pooled connection; 0 disables it.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Connections of a worker's control pool (claims, heartbeats, batched outcome
    /// writes), apart from the handlers' `max_connections`.
    pub control_connections: u32,
    /// Client-side deadline of every control statement (and of a handler's completion
    /// commit), and the server-side `statement_timeout` of control connections: a
    /// paused or unreachable server gives an error in this long, never a hang.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// Server-side `lock_timeout` of control connections.
    #[serde(with = "humantime_serde")]
    pub control_lock_timeout: Duration,
    /// What sits between the fleet and PostgreSQL; see [`Pooler`].
    #[serde(default)]
    pub pooler: Pooler,
}

/// What sits between the fleet and PostgreSQL (`database.pooler`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// The server itself, or a pooler in session mode: sessions are the fleet's own
    /// (startup options, prepared statements, LISTEN).
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer's `pool_mode = transaction`, as most
    /// managed PostgreSQL offer): a session lasts one transaction. The fleet then sends
    /// no startup options, sets its timeouts at the start of each transaction, runs
    /// every statement inside one, keeps no statement cache and does not LISTEN
    /// (it polls). `docs/poolers.md` has the pooler's side.
    Transaction,
}

/// A secret serializes as `"[redacted]"` (or `""` when unset): a serialized
/// configuration is for showing, never for carrying secrets.
pub(super) fn ser_secret<S: serde::Serializer>(
    s: &SecretString,
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.serialize_str(if s.expose_secret().is_empty() {
        ""
    } else {
        "[redacted]"
    })
}

impl DatabaseConfig {
    /// Checks what types alone cannot.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        if d.max_connections < 2 {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be at least 2",
            ));
        }
        if d.acquire_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "database.acquire_timeout",
                "must be positive",
            ));
        }
        if d.control_connections == 0 {
            return Err(ConfigError::invalid(
                "database.control_connections",
                "must be at least 1",
            ));
        }
        if d.control_timeout < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "database.control_timeout",
                "must be at least 100ms",
            ));
        }
        if d.control_lock_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "database.control_lock_timeout",
                "must be positive",
            ));
        }
        // PostgreSQL takes these in whole milliseconds up to i32::MAX (about 24.8 days):
        // past that a direct connection is refused at start, and a `SET LOCAL` through
        // a pooler would fail inside every transaction.
        let max_ms = Duration::from_millis(i32::MAX as u64);
        for (key, v) in [
            ("database.statement_timeout", d.statement_timeout),
            ("database.control_timeout", d.control_timeout),
            ("database.control_lock_timeout", d.control_lock_timeout),
        ] {
            if v > max_ms {
                return Err(ConfigError::invalid(key, "must be at most 24 days"));
            }
            if !v.is_zero() && v < Duration::from_millis(1) {
                return Err(ConfigError::invalid(
                    key,
                    "must be 0 or at least 1ms (PostgreSQL counts whole milliseconds)",
                ));
            }
        }
        Ok(())
    }
}
