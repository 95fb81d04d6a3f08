//! `[ingress]` and `[hooks.*]`: the HTTP ingress's listener, limits, tokens and
//! signed webhook sources, with their checks.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::database::ser_secret;
use super::{Config, ConfigError};
use crate::queue_name::QueueName;

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[ingress]`: the HTTP ingress's listener, limits and bearer tokens.
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Address the HTTP ingress listens on.
    pub listen: String,
    /// Largest request body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// A request body must arrive within this long (slow clients are dropped).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// A connection must send a complete request head within this long, also between
    /// keep-alive requests; silent sockets are closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Open connections at most (lowered to fit the descriptor limit); at the cap a new
    /// connection evicts the oldest idle one.
    pub max_connections: usize,
    /// Open connections at most from one client address (an IPv6 /64 counts as one),
    /// so a few hosts holding busy connections (slow bodies, long polls) cannot take
    /// every slot. 0: no per-address cap (behind a proxy that pools connections).
    #[serde(default = "default_per_address")]
    pub max_connections_per_address: usize,
    /// `?wait=` long polls in progress at most; past it a status is answered at once.
    #[serde(default = "default_max_waiters")]
    pub max_waiters: usize,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client:
    /// the unauthenticated budget is then kept per forwarded client, not per proxy.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on this address too, and `/metrics`
    /// only there (404 on the public port). Unset: all on `listen`.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Longest `?wait=` on a job status.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most jobs in one `jobs:batch` request.
    pub batch_max: usize,
    /// Longest wait for a database connection before answering 503.
    #[serde(with = "humantime_serde")]
    pub db_timeout: Duration,
    /// Requests per second (and burst) per client address that no token vouches for:
    /// failed authentications, webhooks, `/readyz`. Past it: 429.
    pub anonymous_rate_per_second: u32,
    /// Bucket size of that unauthenticated budget.
    pub anonymous_burst: u32,
    /// Bearer tokens, stored as SHA-256 hashes.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// One `[[ingress.tokens]]` entry: a bearer token's hash, rights and rate.
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (logs and metrics name this, never the token).
    pub name: String,
    /// Hex SHA-256 of the token: `printf %s "$TOKEN" | sha256sum`.
    pub sha256: String,
    /// Public queues it may enqueue to; `"*"` for every public kind. Internal kinds
    /// (maintenance, files, pipeline steps) cannot be named: they are never enqueued
    /// over HTTP. Empty (or unset) for an `admin:*` token.
    #[serde(default)]
    pub queues: Vec<String>,
    /// Extra rights: `read_all` (GET any job of its queues, not only the ones it
    /// enqueued), or the scope of a route a pipeline mounts (the billing pipeline's
    /// `logs`: POST /v1/logs).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The tenants (customer ids) this token may act for, handed to a pipeline's route
    /// ([`crate::ingress::Caller`]), which decides what that means (the log route
    /// refuses lines of any other customer). Unset: any.
    #[serde(default)]
    pub customers: Option<Vec<i64>>,
    /// Sustained requests per second (token bucket refill).
    pub rate_per_second: u32,
    /// Bucket size: requests allowed in a burst.
    pub burst: u32,
    /// A revoked token is refused with 401 `token_revoked`.
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// One `[hooks.NAME]` table: a signed webhook source, served at `POST /v1/hooks/NAME`.
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// HMAC-SHA256 key. A secret: never logged.
    #[serde(serialize_with = "ser_secret")]
    pub secret: SecretString,
    /// The queue a verified delivery is enqueued to; the body must fit its kind.
    pub queue: String,
    /// Header carrying the hex HMAC (an optional `sha256=` prefix is accepted).
    pub signature_header: String,
    /// This header must carry a Unix timestamp within `tolerance`, and the signed
    /// message is `"{timestamp}.{raw body}"`, so a replay cannot refresh it. Required
    /// unless `allow_replay`.
    #[serde(default)]
    pub timestamp_header: Option<String>,
    /// For a sender that cannot sign a timestamp: accept deliveries without one. A
    /// captured delivery can then be replayed; identical signed bodies within
    /// `enqueue.idempotency_ttl` still enqueue one job.
    #[serde(default)]
    pub allow_replay: bool,
    /// If set: this header must be present. Unless `sign_delivery_id`, duplicates are
    /// found by what is signed (timestamp and body), which a replay with a fresh
    /// delivery id cannot change.
    #[serde(default)]
    pub delivery_header: Option<String>,
    /// The sender signs the delivery id too (`"{id}.{timestamp}.{body}"`, as Standard
    /// Webhooks and Svix do): duplicates are then found by the delivery id, so a
    /// sender's retry with a fresh timestamp enqueues nothing new. Needs
    /// `delivery_header`.
    #[serde(default)]
    pub sign_delivery_id: bool,
    /// How far a delivery's timestamp may be from now (either way) and still verify.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub tolerance: Duration,
}

fn default_per_address() -> usize {
    64
}

fn default_max_waiters() -> usize {
    256
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

impl Config {
    pub(super) fn validate_ingress(&self) -> Result<(), ConfigError> {
        let i = &self.ingress;
        i.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| ConfigError::invalid("ingress.listen", e.to_string()))?;
        if i.body_limit_bytes < 1024 {
            return Err(ConfigError::invalid(
                "ingress.body_limit_bytes",
                "must be at least 1024",
            ));
        }
        if i.batch_max == 0 {
            return Err(ConfigError::invalid(
                "ingress.batch_max",
                "must be at least 1",
            ));
        }
        if i.anonymous_rate_per_second == 0 || i.anonymous_burst == 0 {
            return Err(ConfigError::invalid(
                "ingress.anonymous_rate_per_second",
                "rate and burst must be positive",
            ));
        }
        if i.header_timeout.is_zero() || i.max_connections == 0 {
            return Err(ConfigError::invalid(
                "ingress.header_timeout",
                "header_timeout and max_connections must be positive",
            ));
        }
        if i.max_waiters == 0 {
            return Err(ConfigError::invalid(
                "ingress.max_waiters",
                "must be at least 1",
            ));
        }
        for p in &i.trusted_proxies {
            if p.parse::<ipnet::IpNet>().is_err() && p.parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::invalid(
                    "ingress.trusted_proxies",
                    format!("{p:?} is not an address or a CIDR range"),
                ));
            }
        }
        if let Some(m) = &i.metrics_listen {
            m.parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::invalid("ingress.metrics_listen", e.to_string()))?;
        }
        if i.read_timeout.is_zero() || i.db_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "ingress.read_timeout",
                "timeouts must be positive",
            ));
        }
        let mut hashes = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for (n, t) in i.tokens.iter().enumerate() {
            let key = |f: &str| format!("ingress.tokens[{n}].{f}");
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    key("sha256"),
                    "must be 64 hex digits (sha256sum of the token)",
                ));
            }
            // Overlays append tokens: a second entry for the same token (say one
            // revoking it, one not) must not silently win.
            if !hashes.insert(t.sha256.to_ascii_lowercase()) {
                return Err(ConfigError::invalid(
                    key("sha256"),
                    "the same token is configured twice (overlays append tokens; revoke it in one place)",
                ));
            }
            if t.name.is_empty()
                || t.name.len() > 64
                || !t.name.bytes().all(|b| b.is_ascii_graphic())
                || !names.insert(t.name.as_str())
            {
                return Err(ConfigError::invalid(
                    key("name"),
                    "must be 1 to 64 visible ASCII characters and unique",
                ));
            }
            // Which scopes exist is the ingress's to say (`read_all`, `admin:read`,
            // `admin:write`, and the scopes of the pipelines' text routes, which have no
            // colon): `ingress::check_config`.
            for s in &t.scopes {
                if s.is_empty()
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b':')
                {
                    return Err(ConfigError::invalid(
                        key("scopes"),
                        format!("{s:?}: a scope is lowercase letters, underscores and colons"),
                    ));
                }
            }
            if t.rate_per_second == 0 || t.burst == 0 {
                return Err(ConfigError::invalid(
                    key("rate_per_second"),
                    "rate and burst must be positive",
                ));
            }
            for q in &t.queues {
                if q != "*" {
                    QueueName::parse(q)
                        .map_err(|e| ConfigError::invalid(key("queues"), format!("{q:?}: {e}")))?;
                }
            }
        }
        for (name, h) in &self.hooks {
            let key = |f: &str| format!("hooks.{name}.{f}");
            QueueName::parse(name)
                .map_err(|e| ConfigError::invalid(format!("hooks.{name}"), e.to_string()))?;
            QueueName::parse(&h.queue)
                .map_err(|e| ConfigError::invalid(key("queue"), e.to_string()))?;
            if h.secret.expose_secret().len() < 16 {
                return Err(ConfigError::invalid(
                    key("secret"),
                    "must be at least 16 characters",
                ));
            }
            if h.signature_header.is_empty() {
                return Err(ConfigError::invalid(key("signature_header"), "is required"));
            }
            if h.timestamp_header.is_none() && !h.allow_replay {
                return Err(ConfigError::invalid(
                    key("timestamp_header"),
                    "is required, so a captured delivery cannot be replayed (set allow_replay = true for a sender that cannot sign a timestamp)",
                ));
            }
        }
        Ok(())
    }
}
