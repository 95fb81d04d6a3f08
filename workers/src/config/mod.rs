//! Typed, layered configuration.
//!
//! Layers, later wins: the embedded defaults ([`RUNTIME_DEFAULTS`], this crate's
//! `defaults.toml`, then each pipeline's the binary adds, see [`Layers`]; compiled in so
//! the binary runs from any directory) → `config/default.toml` on disk, if present →
//! `config/{LONGSHORE_ENV}.toml` → `LONGSHORE__SECTION__KEY` environment variables →
//! `DATABASE_URL`. Every value is checked at start; an error names the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

mod database;
mod ingress;
mod queues;
mod scheduler;

pub use self::database::{DatabaseConfig, Pooler};
pub use self::ingress::{HookConfig, IngressConfig, TokenConfig};
pub use self::queues::{EnqueueConfig, OnDone, QueueOverrides, QueueSettings, WorkerConfig};
pub use self::scheduler::{Missed, ScheduleConfig, SchedulerConfig};
use crate::queue_name::QueueName;

/// The runtime's defaults (`workers/defaults.toml`): its own tables and the
/// maintenance schedules. Pipelines' sections are not here; a binary adds their
/// defaults as further [`Layers::defaults`].
pub const RUNTIME_DEFAULTS: &str = include_str!("../../defaults.toml");

/// The embedded layers a binary loads under the files and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Layers<'a> {
    /// TOML texts, in order: [`RUNTIME_DEFAULTS`] first, then each pipeline's. A later
    /// one overrides keys and appends to arrays (its schedules join the runtime's).
    pub defaults: &'a [&'a str],
    /// The `dev` environment when `config/dev.toml` is not on disk (so `longshore dev`
    /// works from any directory); `None`: `LONGSHORE_ENV=dev` needs the file.
    pub dev: Option<&'a str>,
    /// The pipelines' top-level tables: loading refuses any other table that is not
    /// the runtime's (a misspelt `[biling]`, `LONGSHORE__WORKR__…`), naming the known
    /// ones. `None`: every other table is kept for whoever reads it.
    pub sections: Option<&'a [&'a str]>,
}

impl Layers<'static> {
    /// The runtime's defaults alone.
    pub const RUNTIME: Layers<'static> = Layers {
        defaults: &[RUNTIME_DEFAULTS],
        dev: None,
        sections: None,
    };
}

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

/// Why a configuration did not load. Neither variant is meant to hold a secret's value:
/// values are left out of type errors, and a secret's key never shows its value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed, or a value could not be typed.
    #[error("configuration: {0}")]
    Load(String),
    /// A value was read but is not allowed.
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// The dotted key (`queues.llm_call.lease`, `schedules[2].cron`).
        key: String,
        /// What is wrong with it; for a secret's key, never the value.
        message: String,
    },
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
            .field(
                "sections",
                &self
                    .sections
                    .iter()
                    .map(|(k, v)| (k, Keys(v)))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

/// The whole configuration of a Longshore process, layered (see [`Layers`]) and
/// checked at load.
///
/// `Debug` shows the pipeline sections (`billing`, `market`, `chat`, `probe`, raw JSON
/// typed later by the jobs crate) by their keys only: they hold secrets (the vault key,
/// provider API keys, the RPC URL, keypairs) that are not `secrecy` types until typed.
#[derive(Clone, Deserialize, Serialize)]
// Not `deny_unknown_fields`: unknown top-level tables are the pipelines' sections,
// read below and checked by `check_sections`.
pub struct Config {
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// Per-queue settings; `default` applies to every queue, a named table overrides it.
    pub queues: BTreeMap<String, QueueOverrides>,
    /// `[enqueue]`.
    pub enqueue: EnqueueConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[dev]`.
    pub dev: DevConfig,
    /// `[ingress]`.
    pub ingress: IngressConfig,
    /// Signed webhook sources, by name (`POST /v1/hooks/{name}`).
    #[serde(default)]
    pub hooks: BTreeMap<String, HookConfig>,
    /// `[scheduler]`.
    pub scheduler: SchedulerConfig,
    /// `[[schedules]]`: the runtime's maintenance schedules and the pipelines' own.
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// Every other top-level table: a pipeline's own section (`[billing]`, `[market]`,
    /// `[chat]`, …), kept as JSON for its owner to type ([`Config::section`]). The
    /// runtime knows none of them by name; a table that no owner claims is an error
    /// ([`Config::check_sections`]), so a misspelt one is not silently ignored.
    #[serde(skip)]
    pub sections: BTreeMap<String, serde_json::Value>,
}

/// The top-level tables the runtime itself reads (the fields of [`Config`]); every
/// other one is a pipeline's section.
pub const RUNTIME_TABLES: &[&str] = &[
    "database",
    "worker",
    "queues",
    "enqueue",
    "log",
    "dev",
    "ingress",
    "hooks",
    "scheduler",
    "schedules",
    "metrics",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[metrics]`: what the processes export.
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// How often queue gauges (depth, in flight, …) are sampled from the database.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[log]`: how processes log.
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Human-readable lines or one JSON object per line.
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
/// The shape of a log line.
pub enum LogFormat {
    /// tracing's human-readable format.
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[dev]`: `longshore dev` only.
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    /// Where `longshore dev` keeps its private PostgreSQL cluster.
    pub data_dir: String,
}

impl Config {
    /// Loads `layers`, then the files under `config/` of the current directory and the
    /// process environment.
    pub fn load(layers: &Layers<'_>) -> Result<Config, ConfigError> {
        let env_name = std::env::var("LONGSHORE_ENV").ok();
        Self::load_layers(
            layers,
            Path::new("config"),
            env_name.as_deref(),
            std::env::vars(),
        )
    }

    /// Like [`Config::load`], with `default_env` when `LONGSHORE_ENV` is unset
    /// (`longshore dev` defaults to `dev`).
    pub fn load_with_default_env(
        layers: &Layers<'_>,
        default_env: &str,
    ) -> Result<Config, ConfigError> {
        let env_name = std::env::var("LONGSHORE_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| default_env.to_string());
        Self::load_layers(
            layers,
            Path::new("config"),
            Some(&env_name),
            std::env::vars(),
        )
    }

    /// The runtime's defaults alone ([`Layers::RUNTIME`]) with an explicit config
    /// directory, environment name and variables (tests).
    pub fn load_runtime_from(
        dir: &Path,
        env_name: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::load_layers(&Layers::RUNTIME, dir, env_name, vars)
    }

    /// Loads `layers` with an explicit config directory, environment name and
    /// variables.
    pub fn load_layers(
        layers: &Layers<'_>,
        dir: &Path,
        env_name: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        for text in layers.defaults {
            // admerge: a pipeline's schedules are appended to the runtime's.
            fig = fig.admerge(Toml::string(text));
        }
        // merge: an array it sets (schedules, tokens) replaces the defaults'.
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
            } else if let (Some(dev), "dev") = (layers.dev, name) {
                fig = fig.admerge(Toml::string(dev));
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
        let figment_error = |e: figment::Error| {
            let key = e.path.join(".");
            let msg = without_source_lines(&e.kind.to_string());
            if key.is_empty() {
                ConfigError::Load(without_value(&msg))
            } else {
                ConfigError::invalid(key, msg)
            }
        };
        let mut cfg: Config = fig.extract().map_err(figment_error)?;
        let tables: BTreeMap<String, serde_json::Value> = fig.extract().map_err(figment_error)?;
        cfg.sections = tables
            .into_iter()
            .filter(|(k, _)| !RUNTIME_TABLES.contains(&k.as_str()))
            .collect();
        if let Some(known) = layers.sections {
            cfg.check_sections(known)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// A pipeline's section as configured (`Null` when absent).
    pub fn raw_section(&self, name: &str) -> &serde_json::Value {
        static NULL: serde_json::Value = serde_json::Value::Null;
        self.sections.get(name).unwrap_or(&NULL)
    }

    /// Types a pipeline's section (`[billing]`, …; absent: typed from `null`): an
    /// unknown or ill-typed key is an error that names it
    /// (`billing.charge_threshold_usd: …`).
    pub fn section<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, ConfigError> {
        self.typed(name, self.raw_section(name))
    }

    /// Types `value`, a part of a section found under `name` (`chat.credits`), naming
    /// the key of any error as [`Config::section`] does.
    pub fn typed<T: serde::de::DeserializeOwned>(
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

    /// Refuses a top-level table that is neither the runtime's nor one of `known` (the
    /// sections the binary's pipelines read): a misspelt `[biling]` is an error, not
    /// settings silently ignored.
    pub fn check_sections(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.sections.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let mut all: Vec<&str> = RUNTIME_TABLES.iter().chain(known).copied().collect();
                all.sort_unstable();
                Err(ConfigError::invalid(
                    k.clone(),
                    format!("is not a table anything reads (known: {})", all.join(", ")),
                ))
            }
        }
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.worker.validate()?;
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
        let Some(default) = self.queues.get("default") else {
            return Err(ConfigError::invalid("queues.default", "is required"));
        };
        if default.concurrency.is_some() {
            return Err(ConfigError::invalid(
                "queues.default.concurrency",
                "is not a queue default: set worker.concurrency (every queue's), or concurrency in a queue's own table",
            ));
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
        Config::load_runtime_from(Path::new("/nonexistent"), None, vars)
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
        let e = Config::load_runtime_from(&dir, Some("test"), std::iter::empty())
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!e.contains("CANARY-SECRET-41"), "the line was echoed: {e}");
        assert!(e.contains("line 2"), "{e}");
    }

    /// `[queues.default]` is what every queue inherits, but a queue's concurrency falls
    /// back to `worker.concurrency`: a default there would be silently ignored, so it is
    /// refused, naming the key to use.
    #[test]
    fn a_default_concurrency_is_refused_not_ignored() {
        let e = load(&[("LONGSHORE__QUEUES__DEFAULT__CONCURRENCY", "4")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("queues.default.concurrency") && e.contains("worker.concurrency"),
            "{e}"
        );
        let c = load(&[("LONGSHORE__QUEUES__PROBE__CONCURRENCY", "4")]).unwrap();
        assert_eq!(c.queue("probe").concurrency, 4);
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
        let billing =
            serde_json::json!({"vault_key": c.raw_section("billing")["vault_key"].clone()});
        let e = c.typed::<B>("billing", &billing).unwrap_err().to_string();
        assert!(
            e.contains("billing.vault_key") && !e.contains("918273645"),
            "{e}"
        );
    }

    #[test]
    fn pipeline_sections_are_kept_and_an_unclaimed_table_is_refused() {
        let c = load(&[("LONGSHORE__BILLING__VAULT_PATH", "/tmp/v.csv")]).unwrap();
        assert_eq!(c.raw_section("billing")["vault_path"], "/tmp/v.csv");
        assert!(c.raw_section("nothing").is_null());
        assert!(
            !c.sections.contains_key("worker"),
            "runtime tables are not sections"
        );
        let known = ["billing", "market", "chat", "probe", "traffic"];
        let c = load(&[("LONGSHORE__BILING__VAULT_PATH", "/tmp/v.csv")]).unwrap();
        let e = c.check_sections(&known).unwrap_err().to_string();
        assert!(e.contains("biling") && e.contains("known: billing"), "{e}");
        load(&[]).unwrap().check_sections(&known).unwrap();
    }

    /// Every field of [`Config`] is in [`RUNTIME_TABLES`], and nothing else is: a new
    /// runtime table must not be taken for a pipeline's section.
    #[test]
    fn runtime_tables_are_the_config_fields() {
        let v = serde_json::to_value(load(&[]).unwrap()).unwrap();
        let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut listed = RUNTIME_TABLES.to_vec();
        listed.sort_unstable();
        assert_eq!(fields, listed);
    }

    #[test]
    fn database_url_never_in_debug() {
        let c = load(&[("DATABASE_URL", "postgres://u:hunter2canary@h/db")]).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2canary"), "{dbg}");
    }

    #[test]
    fn secrets_are_redacted_when_serialized() {
        let c = load(&[
            ("DATABASE_URL", "postgres://u:hunter2canary@h/db"),
            ("LONGSHORE__HOOKS__GH__SECRET", "hooksecretcanary"),
            ("LONGSHORE__HOOKS__GH__QUEUE", "probe"),
            ("LONGSHORE__HOOKS__GH__SIGNATURE_HEADER", "x-sig"),
            ("LONGSHORE__HOOKS__GH__ALLOW_REPLAY", "true"),
        ])
        .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""url":"[redacted]""#), "{json}");
        assert!(json.contains(r#""secret":"[redacted]""#), "{json}");
        assert!(!json.contains("canary"), "{json}");
    }
}
