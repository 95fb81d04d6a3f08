//! Typed, layered configuration.
//!
//! Layers, later wins: the embedded `config/default.toml` (compiled into the binary so
//! it runs from any directory) → `config/default.toml` on disk, if present →
//! `config/{LONGSHORE_ENV}.toml` → `LONGSHORE__SECTION__KEY` environment variables →
//! `DATABASE_URL`. Every value is checked at start; an error names the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::queue_name::QueueName;

/// The defaults every build carries; `config/default.toml` in the repository.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");
/// The `dev` overlay, also compiled in so `longshore dev` works from any directory.
pub const EMBEDDED_DEV: &str = include_str!("../../config/dev.toml");

/// A parse error without the lines of the file it quotes (TOML's errors show the
/// offending line, which may hold a secret): "at line N, column M" and the reason
/// stay.
fn without_source_lines(msg: &str) -> String {
    msg.lines()
        .filter(|l| {
            let t = l.trim_start();
            let quoted = t.starts_with('|')
                || t.split_once('|').is_some_and(|(n, _)| {
                    !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())
                });
            !quoted && !t.is_empty()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        let key = key.into();
        // A type error echoes the value (`invalid type: integer `12345`, expected a
        // string`); for a secret's key that would print the secret.
        let message = if is_secret_key(&key) {
            "has the wrong type or format (its value is not shown: it is a secret)".to_string()
        } else {
            without_value(&message.into())
        };
        ConfigError::Invalid { key, message }
    }
}

/// A serde type or value error with the offending value left out: at a key that is not
/// itself a secret the value may still hold one (a provider's table written as a
/// string of its key, `providers.gpt = "sk-…"`; a secret pasted into a duration). What
/// kind of value it was, and what was expected, stay. Both spellings: figment's
/// (`invalid type: found string "…"`, `invalid value string "…"`, ``unknown variant:
/// found `…` ``) and serde_json's (`invalid type: string "…"`, ``unknown variant `…` ``).
fn without_value(message: &str) -> String {
    let Some(at) = message.find(", expected") else {
        return message.to_string();
    };
    let (head, tail) = message.split_at(at);
    for prefix in ["invalid type", "invalid value"] {
        if let Some(rest) = head.strip_prefix(prefix) {
            let rest = rest.trim_start_matches(':').trim_start();
            let rest = rest.strip_prefix("found ").unwrap_or(rest);
            let kind = rest.split(['"', '`', ' ']).next().unwrap_or("").trim();
            return format!("{prefix}: {kind}{tail}");
        }
    }
    if head.starts_with("unknown variant") {
        return format!("unknown variant{tail}");
    }
    message.to_string()
}

/// Keys whose values are secrets: never echoed in an error.
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    last == "url"
        || last == "rpc_url"
        || last.contains("secret")
        || last.contains("password")
        || last.contains("api_key")
        || last.ends_with("_key")
        || last.contains("keypair")
        || last.contains("token")
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Keys<'a>(&'a serde_json::Value);
        impl std::fmt::Debug for Keys<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.0.as_object() {
                    Some(o) => f.debug_set().entries(o.keys()).finish(),
                    None => f.write_str("{}"),
                }
            }
        }
        f.debug_struct("Config")
            .field("database", &self.database)
            .field("worker", &self.worker)
            .field("queues", &self.queues)
            .field("enqueue", &self.enqueue)
            .field("log", &self.log)
            .field("dev", &self.dev)
            .field("ingress", &self.ingress)
            .field("hooks", &self.hooks)
            .field("scheduler", &self.scheduler)
            .field("schedules", &self.schedules)
            .field("metrics", &self.metrics)
            .field("billing", &Keys(&self.billing))
            .field("market", &Keys(&self.market))
            .field("chat", &Keys(&self.chat))
            .field("probe", &Keys(&self.probe))
            .finish()
    }
}

/// `Debug` shows the pipeline sections (`billing`, `market`, `chat`, `probe`, raw JSON
/// typed later by the jobs crate) by their keys only: they hold secrets (the vault key,
/// provider API keys, the RPC URL, keypairs) that are not `secrecy` types until typed.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    /// Per-queue settings; `default` applies to every queue, a named table overrides it.
    pub queues: BTreeMap<String, QueueOverrides>,
    pub enqueue: EnqueueConfig,
    pub log: LogConfig,
    pub dev: DevConfig,
    pub ingress: IngressConfig,
    /// Signed webhook sources, by name (`POST /v1/hooks/{name}`).
    #[serde(default)]
    pub hooks: BTreeMap<String, HookConfig>,
    pub scheduler: SchedulerConfig,
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    pub metrics: MetricsConfig,
    /// Settings of the usage-billing job kinds; typed and checked by the jobs crate
    /// ([`Config::section`]), which names any bad key.
    #[serde(default)]
    pub billing: serde_json::Value,
    /// Settings of the market pipeline (`[market]`), typed by the jobs crate.
    #[serde(default)]
    pub market: serde_json::Value,
    /// Settings of the chat pipeline (`[chat]`), typed by the jobs crate.
    #[serde(default)]
    pub chat: serde_json::Value,
    /// Settings of the `probe` job kind (`[probe]`, tests), typed by the jobs crate.
    #[serde(default)]
    pub probe: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub anonymous_burst: u32,
    /// Bearer tokens, stored as SHA-256 hashes.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (logs and metrics name this, never the token).
    pub name: String,
    /// Hex SHA-256 of the token: `printf %s "$TOKEN" | sha256sum`.
    pub sha256: String,
    /// Public queues it may enqueue to; `"*"` for every public kind. Internal kinds
    /// (maintenance, files, pipeline steps) cannot be named: they are never enqueued
    /// over HTTP.
    pub queues: Vec<String>,
    /// Extra rights: `logs` (POST /v1/logs, the log shipper's), `read_all` (GET any job
    /// of its queues, not only the ones it enqueued).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// With `logs`: the customers whose log lines it may post; lines of any other
    /// customer are refused (counted as malformed with the reason). Unset: any.
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Port for `/metrics` of a scheduler process; 0 = do not serve.
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// Cron with seconds: `sec min hour day-of-month month day-of-week [year]`.
    pub cron: String,
    pub queue: String,
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// IANA time zone the cron is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    /// After downtime: `skip` missed fires, or enqueue the `latest` one.
    #[serde(default)]
    pub missed: Missed,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}
fn utc() -> String {
    "UTC".into()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    #[default]
    Skip,
    Latest,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// How often queue gauges (depth, in flight, …) are sampled from the database.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Empty: `DATABASE_URL`, else the embedded default (`dev` only). May hold a
    /// password, so it is a secret and never printed.
    #[serde(serialize_with = "ser_secret")]
    pub url: SecretString,
    pub max_connections: u32,
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

fn ser_secret<S: serde::Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[serde(deny_unknown_fields)]
pub struct QueueOverrides {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub lease: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_base: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_cap: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_done: Option<OnDone>,
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
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub on_done: OnDone,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueConfig {
    /// How long an idempotency key holds.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    /// Where `longshore dev` keeps its private PostgreSQL cluster.
    pub data_dir: String,
    /// The dev traffic simulator writes HAProxy log files here (the dev schedules scan
    /// it); "" turns the simulator off.
    #[serde(default)]
    pub spool_dir: String,
    /// Lines per file, one file per `traffic_interval`.
    #[serde(default)]
    pub traffic_lines: usize,
    #[serde(default = "default_traffic_interval", with = "humantime_serde")]
    pub traffic_interval: Duration,
}

fn default_traffic_interval() -> Duration {
    Duration::from_secs(5)
}

impl Config {
    /// Loads the layers from the current directory and the process environment.
    pub fn load() -> Result<Config, ConfigError> {
        let env_name = std::env::var("LONGSHORE_ENV").ok();
        Self::load_from(Path::new("config"), env_name.as_deref(), std::env::vars())
    }

    /// Like [`Config::load`], with `default_env` when `LONGSHORE_ENV` is unset
    /// (`longshore dev` defaults to `dev`).
    pub fn load_with_default_env(default_env: &str) -> Result<Config, ConfigError> {
        let env_name = std::env::var("LONGSHORE_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| default_env.to_string());
        Self::load_from(Path::new("config"), Some(&env_name), std::env::vars())
    }

    /// Loads with an explicit config directory, environment name and variables (tests).
    pub fn load_from(
        dir: &Path,
        env_name: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::new().merge(Toml::string(EMBEDDED_DEFAULT));
        let on_disk = dir.join("default.toml");
        if on_disk.exists() {
            fig = fig.merge(Toml::file(on_disk));
        }
        if let Some(name) = env_name.filter(|n| !n.is_empty()) {
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::invalid(
                    "LONGSHORE_ENV",
                    "must be a plain name",
                ));
            }
            let file = dir.join(format!("{name}.toml"));
            // admerge: arrays (tokens, schedules) are appended to the defaults'.
            if file.exists() {
                fig = fig.admerge(Toml::file(file));
            } else if name == "dev" {
                fig = fig.admerge(Toml::string(EMBEDDED_DEV));
            } else {
                return Err(ConfigError::invalid(
                    "LONGSHORE_ENV",
                    format!("no file {}", file.display()),
                ));
            }
        }
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        // Env::prefixed reads the real environment; feed our own iterator instead so
        // tests can pass variables without touching the process environment.
        let mut env_layer = Figment::new();
        for (k, v) in &vars {
            if let Some(rest) = k.strip_prefix("LONGSHORE__") {
                let key = rest.to_ascii_lowercase().replace("__", ".");
                let value: figment::value::Value = v.parse().expect("figment parses any string");
                env_layer = env_layer.merge(Serialized::default(&key, value));
            }
        }
        fig = fig.merge(env_layer);
        if let Some((_, url)) = vars.iter().find(|(k, _)| k == "DATABASE_URL")
            && !url.is_empty()
        {
            fig = fig.merge(Serialized::default("database.url", url));
        }
        let cfg: Config = fig.extract().map_err(|e| {
            let key = e.path.join(".");
            let msg = without_source_lines(&e.kind.to_string());
            if key.is_empty() {
                ConfigError::Load(without_value(&msg))
            } else {
                ConfigError::invalid(key, msg)
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Types a pipeline's section (`billing`, …): an unknown or ill-typed key is an
    /// error that names it (`billing.charge_threshold_usd: …`).
    pub fn section<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        value: &serde_json::Value,
    ) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                name.to_string()
            } else {
                format!("{name}.{path}")
            };
            // `invalid` hides the message for secret keys.
            ConfigError::invalid(key, e.into_inner().to_string())
        })
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.database;
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
        let w = &self.worker;
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
        if self.enqueue.idempotency_ttl.is_zero() {
            return Err(ConfigError::invalid(
                "enqueue.idempotency_ttl",
                "must be positive",
            ));
        }
        self.validate_ingress()?;
        self.validate_schedules()?;
        if self.metrics.sample_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "metrics.sample_interval",
                "must be at least 100ms",
            ));
        }
        if !self.queues.contains_key("default") {
            return Err(ConfigError::invalid("queues.default", "is required"));
        }
        for name in self.queues.keys() {
            if name != "default" {
                QueueName::parse(name)
                    .map_err(|e| ConfigError::invalid(format!("queues.{name}"), e.to_string()))?;
            }
            // Each table must merge into complete, sane settings.
            self.queue_settings_checked(name)?;
        }
        Ok(())
    }

    fn validate_ingress(&self) -> Result<(), ConfigError> {
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
            for s in &t.scopes {
                if s != "logs" && s != "read_all" {
                    return Err(ConfigError::invalid(
                        key("scopes"),
                        format!("{s:?}: known scopes are \"logs\" and \"read_all\""),
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

    fn validate_schedules(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (n, s) in self.schedules.iter().enumerate() {
            let key = |f: &str| format!("schedules[{n}].{f}");
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{:?} is empty or not unique", s.name),
                ));
            }
            s.cron
                .parse::<cron::Schedule>()
                .map_err(|e| ConfigError::invalid(key("cron"), format!("{:?}: {e}", s.cron)))?;
            s.timezone
                .parse::<chrono_tz::Tz>()
                .map_err(|e| ConfigError::invalid(key("timezone"), e.to_string()))?;
            QueueName::parse(&s.queue)
                .map_err(|e| ConfigError::invalid(key("queue"), e.to_string()))?;
            if !s.args.is_object() {
                return Err(ConfigError::invalid(
                    key("args"),
                    "must be a table (JSON object)",
                ));
            }
        }
        Ok(())
    }

    /// The merged settings of a queue (`default` overlaid by the queue's own table).
    pub fn queue(&self, name: &str) -> QueueSettings {
        self.queue_settings_checked(name)
            .expect("validated at load: every queue table merges")
    }

    fn queue_settings_checked(&self, name: &str) -> Result<QueueSettings, ConfigError> {
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

    /// The database URL, if one is configured.
    pub fn database_url(&self) -> Option<&str> {
        let u = self.database.url.expose_secret();
        (!u.is_empty()).then_some(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(Path::new("/nonexistent"), None, vars)
    }

    #[test]
    fn a_malformed_file_is_reported_without_its_lines() {
        let dir = std::env::temp_dir().join(format!("ls-cfg-echo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("test.toml"),
            "[hooks.x]\nsecret = \"CANARY-SECRET-41\n",
        )
        .unwrap();
        let e = Config::load_from(&dir, Some("test"), std::iter::empty())
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!e.contains("CANARY-SECRET-41"), "the line was echoed: {e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn embedded_default_loads_and_validates() {
        let c = load(&[]).unwrap();
        assert!(c.database_url().is_none());
        let q = c.queue("anything");
        assert_eq!(q.on_done, OnDone::Archive);
        assert!(q.max_attempts >= 1);
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = load(&[
            ("LONGSHORE__WORKER__CONCURRENCY", "7"),
            ("LONGSHORE__QUEUES__PROBE__MAX_ATTEMPTS", "3"),
            ("DATABASE_URL", "postgres://u:p@h/db"),
        ])
        .unwrap();
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.queue("probe").max_attempts, 3);
        assert_eq!(c.queue("probe").concurrency, 7);
        assert_eq!(c.database_url(), Some("postgres://u:p@h/db"));
    }

    #[test]
    fn bad_value_names_its_key() {
        let e = load(&[("LONGSHORE__WORKER__CONCURRENCY", "lots")]).unwrap_err();
        assert!(e.to_string().contains("worker.concurrency"), "{e}");
        let e = load(&[("LONGSHORE__WORKER__CONCURRENCY", "0")]).unwrap_err();
        assert!(e.to_string().contains("worker.concurrency"), "{e}");
        let e = load(&[("LONGSHORE__QUEUES__PROBE__LEASE", "10ms")]).unwrap_err();
        assert!(e.to_string().contains("queues.probe.lease"), "{e}");
        let e = load(&[("LONGSHORE__WORKER__POLL_INTERVAL", "soon")]).unwrap_err();
        assert!(e.to_string().contains("worker.poll_interval"), "{e}");
    }

    #[test]
    fn bad_queue_name_in_config_is_rejected() {
        let e = load(&[("LONGSHORE__QUEUES__BAD-NAME__MAX_ATTEMPTS", "3")]).unwrap_err();
        assert!(e.to_string().contains("queues.bad-name"), "{e}");
    }

    /// Canaries in every section that holds a secret: none reaches `Debug`, and a
    /// secret of the wrong type is not echoed by the error that refuses it.
    #[test]
    fn no_secret_of_any_section_reaches_debug_or_an_error() {
        let canaries = [
            ("DATABASE_URL", "postgres://u:canary-db-pw@h/db"),
            ("LONGSHORE__HOOKS__W__SECRET", "canary-hook-secret-0123"),
            ("LONGSHORE__HOOKS__W__QUEUE", "probe"),
            ("LONGSHORE__HOOKS__W__SIGNATURE_HEADER", "x-s"),
            ("LONGSHORE__HOOKS__W__ALLOW_REPLAY", "true"),
            ("LONGSHORE__BILLING__VAULT_KEY", "canary-vault-key"),
            (
                "LONGSHORE__BILLING__CHAIN__RPC_URL",
                "https://rpc.example/canary-rpc-key",
            ),
            (
                "LONGSHORE__BILLING__CHAIN__DELEGATE_KEYPAIR",
                "canary-keypair",
            ),
            (
                "LONGSHORE__MARKET__CRYPTOMETER__API_KEY",
                "canary-cryptometer",
            ),
            ("LONGSHORE__CHAT__PROVIDERS__GPT__API_KEY", "canary-openai"),
            ("LONGSHORE__PROBE__TRACE_DIR", "/tmp/canary-probe"),
        ];
        let c = load(&canaries).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("canary"), "a secret in Debug: {dbg}");
        assert!(dbg.contains("vault_key"), "keys are listed: {dbg}");
        let e = load(&[
            ("LONGSHORE__HOOKS__W__SECRET", "918273645"),
            ("LONGSHORE__HOOKS__W__QUEUE", "probe"),
            ("LONGSHORE__HOOKS__W__SIGNATURE_HEADER", "x-s"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("hooks.w.secret"), "{e}");
        assert!(!e.contains("918273645"), "{e}");
        // A secret one level down: the key named is not a secret's, its value is.
        let e = load(&[("LONGSHORE__HOOKS__W", "canary-nested-secret")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hooks.w") && e.contains("string, expected"),
            "{e}"
        );
        assert!(!e.contains("canary"), "{e}");
        // In a duration (figment's "invalid value" has no colon) and in an enum.
        for (k, v) in [
            (
                "LONGSHORE__ENQUEUE__IDEMPOTENCY_TTL",
                "canary-in-a-duration",
            ),
            ("LONGSHORE__LOG__FORMAT", "canary-in-an-enum"),
        ] {
            let e = load(&[(k, v)]).unwrap_err().to_string();
            assert!(!e.contains("canary"), "{e}");
            assert!(e.contains("expected"), "what was expected stays: {e}");
        }
        let c = load(&[("LONGSHORE__BILLING__VAULT_KEY", "918273645")]).unwrap();
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct B {
            vault_key: String,
        }
        let billing = serde_json::json!({"vault_key": c.billing["vault_key"].clone()});
        let e = c.section::<B>("billing", &billing).unwrap_err().to_string();
        assert!(
            e.contains("billing.vault_key") && !e.contains("918273645"),
            "{e}"
        );
    }

    #[test]
    fn database_url_never_in_debug() {
        let c = load(&[("DATABASE_URL", "postgres://u:hunter2canary@h/db")]).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2canary"), "{dbg}");
    }
}
