//! `[chat]`: the providers, the router (first provider per hint, fallback chains) and
//! the credits. Checked at start: every provider a route can reach exists and has a
//! price, so a call never fails on configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use longshore_workers::config::{Config, ConfigError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::credits::CreditsConfig;
use crate::clients::llm::{ChatProvider, OpenAiProvider, ProviderConfig, ProviderKind};
use crate::clients::llm_echo::EchoProvider;

/// What the caller says about the request; it picks the first provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hint {
    /// The request uses tools.
    Tools,
    /// The request needs deeper reasoning.
    Deep,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// The first provider of a request without a hint.
    pub default_provider: String,
    /// The first provider per hint.
    #[serde(default)]
    pub hints: BTreeMap<Hint, String>,
    /// Who is tried after whom: `grok = ["gpt", "claude"]`.
    #[serde(default)]
    pub fallback: BTreeMap<String, Vec<String>>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub credits: CreditsConfig,
}

impl ChatConfig {
    /// The providers to try, in order: the hint's (or the default) first, then its
    /// fallback chain, each once.
    pub fn route(&self, hint: Option<Hint>) -> Vec<&str> {
        let first = hint
            .and_then(|h| self.hints.get(&h))
            .unwrap_or(&self.default_provider);
        let mut chain = vec![first.as_str()];
        for p in self.fallback.get(first).into_iter().flatten() {
            if !chain.contains(&p.as_str()) {
                chain.push(p);
            }
        }
        chain
    }

    fn check(&self) -> Result<(), (String, String)> {
        let known = |key: String, name: &str| {
            if self.providers.contains_key(name) {
                Ok(())
            } else {
                Err((key, format!("no provider {name:?} in [chat.providers]")))
            }
        };
        known("chat.default_provider".into(), &self.default_provider)?;
        for (h, p) in &self.hints {
            known(format!("chat.hints.{h:?}").to_lowercase(), p)?;
        }
        for (from, chain) in &self.fallback {
            known(format!("chat.fallback.{from}"), from)?;
            for p in chain {
                known(format!("chat.fallback.{from}"), p)?;
            }
        }
        for name in self.providers.keys() {
            if !self.credits.prices.contains_key(name) {
                return Err((
                    format!("chat.credits.prices.{name}"),
                    format!("provider {name:?} has no price"),
                ));
            }
        }
        Ok(())
    }
}

/// The chat pipeline's settings and providers, shared by its handlers.
pub struct Chat {
    pub cfg: ChatConfig,
    pub providers: BTreeMap<String, Arc<dyn ChatProvider>>,
    described: AtomicBool,
}

impl Chat {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        Self::from_config_for(cfg, crate::Clients::Build)
    }

    /// With [`crate::Clients::Skip`], no provider client is built (and no key needed).
    pub fn from_config_for(cfg: &Config, clients: crate::Clients) -> Result<Self, ConfigError> {
        let c: ChatConfig = cfg.section("chat")?;
        c.credits.validate()?;
        c.check()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        match clients {
            crate::Clients::Build => Self::with_config(c),
            crate::Clients::Skip => Ok(Chat {
                cfg: c,
                providers: BTreeMap::new(),
                described: AtomicBool::new(false),
            }),
        }
    }

    pub fn with_config(c: ChatConfig) -> Result<Self, ConfigError> {
        let mut providers: BTreeMap<String, Arc<dyn ChatProvider>> = BTreeMap::new();
        for (name, p) in &c.providers {
            let provider: Arc<dyn ChatProvider> = match p.kind {
                ProviderKind::Echo => Arc::new(EchoProvider::new(name, &p.model, p.echo_delay)),
                ProviderKind::Openai => {
                    Arc::new(OpenAiProvider::new(name, p).map_err(|message| {
                        ConfigError::Invalid {
                            key: format!("chat.providers.{name}"),
                            message,
                        }
                    })?)
                }
            };
            providers.insert(name.clone(), provider);
        }
        Ok(Chat {
            cfg: c,
            providers,
            described: AtomicBool::new(false),
        })
    }

    /// Logs the providers and routes, once per process, on first use.
    pub fn describe_once(&self) {
        if self.described.swap(true, Ordering::Relaxed) {
            return;
        }
        for p in self.providers.values() {
            tracing::info!(provider = %p.describe(), "chat provider");
        }
        let routes: Value = [None, Some(Hint::Tools), Some(Hint::Deep)]
            .into_iter()
            .map(|h| {
                let key = h.map_or("default".to_string(), |h| format!("{h:?}").to_lowercase());
                (key, Value::from(self.cfg.route(h).join(" → ")))
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        tracing::info!(%routes, "chat routes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(patch: Value) -> Result<Chat, ConfigError> {
        let mut v = json!({
            "default_provider": "grok",
            "hints": {"tools": "gpt", "deep": "gpt"},
            "fallback": {"grok": ["gpt", "claude"], "gpt": ["claude", "grok"], "claude": ["gpt", "grok"]},
            "providers": {
                "grok": {"kind": "echo", "model": "g"},
                "gpt": {"kind": "echo", "model": "o"},
                "claude": {"kind": "echo", "model": "c"},
            },
            "credits": {
                "signup_bonus": 100, "min_balance": 5, "max_per_request": 100,
                "max_output_tokens": {"free": 1024, "pro": 4096, "enterprise": 8192},
                "prices": {
                    "grok": {"input": "1", "output": "4", "minimum": "1"},
                    "gpt": {"input": "3", "output": "10", "minimum": "2"},
                    "claude": {"input": "3", "output": "10", "minimum": "2"},
                },
            },
        });
        json_patch(&mut v, patch);
        let c: ChatConfig = serde_json::from_value(v).map_err(|e| ConfigError::Invalid {
            key: "chat".into(),
            message: e.to_string(),
        })?;
        c.check()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        Chat::with_config(c)
    }

    /// Merges `patch` into `v` (objects recursively; null removes).
    fn json_patch(v: &mut Value, patch: Value) {
        match (v, patch) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, p) in b {
                    if p.is_null() {
                        a.remove(&k);
                    } else {
                        json_patch(a.entry(k).or_insert(Value::Null), p);
                    }
                }
            }
            (v, p) => *v = p,
        }
    }

    #[test]
    fn routes_follow_the_spec() {
        let c = cfg(json!({})).unwrap();
        assert_eq!(c.cfg.route(None), ["grok", "gpt", "claude"]);
        assert_eq!(c.cfg.route(Some(Hint::Tools)), ["gpt", "claude", "grok"]);
        assert_eq!(c.cfg.route(Some(Hint::Deep)), ["gpt", "claude", "grok"]);
        let c = cfg(json!({"default_provider": "claude"})).unwrap();
        assert_eq!(c.cfg.route(None), ["claude", "gpt", "grok"]);
        // A chain that names its own head or repeats a provider tries each once.
        let c = cfg(json!({"fallback": {"grok": ["grok", "gpt", "gpt"]}})).unwrap();
        assert_eq!(c.cfg.route(None), ["grok", "gpt"]);
        // No chain: only the first.
        let c = cfg(json!({"fallback": null})).unwrap();
        assert_eq!(c.cfg.route(None), ["grok"]);
    }

    #[test]
    fn a_route_to_an_unknown_or_unpriced_provider_is_refused_at_start() {
        let e = |patch: Value| match cfg(patch) {
            Err(ConfigError::Invalid { key, message }) => format!("{key}: {message}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(
            e(json!({"default_provider": "mistral"})),
            "chat.default_provider: no provider \"mistral\" in [chat.providers]"
        );
        assert!(e(json!({"hints": {"deep": "o9"}})).starts_with("chat.hints.deep:"));
        assert!(e(json!({"fallback": {"gpt": ["x"]}})).starts_with("chat.fallback.gpt:"));
        assert!(
            e(json!({"providers": {"local": {"kind": "echo", "model": "l"}}}))
                .starts_with("chat.credits.prices.local:")
        );
        assert!(
            e(json!({"providers": {"grok": {"kind": "openai", "base_url": "x", "model": "g"}}}))
                .starts_with("chat.providers.grok:")
        );
        assert!(e(json!({"hints": {"fast": "grok"}})).contains("unknown variant"));
    }
}
