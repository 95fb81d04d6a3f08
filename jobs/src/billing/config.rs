//! `[billing]` settings: prices, the charge threshold, base fees and vault rate limits,
//! by tier. Prices are decimal strings ("1.00"), never floats.

use std::sync::Arc;
use std::time::Duration;

use longshore_workers::config::{Config, ConfigError};
use rust_decimal::Decimal;
use secrecy::SecretString;
use serde::Deserialize;

use super::vault::{VaultError, VaultKey};
use crate::clients::chain::Chain;
use crate::clients::chain_sim::SimulatedChain;

/// A value per service tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers<T> {
    pub starter: T,
    pub pro: T,
    pub enterprise: T,
}

impl<T: Copy> Tiers<T> {
    pub fn get(&self, tier: &str) -> Option<T> {
        match tier {
            "starter" => Some(self.starter),
            "pro" => Some(self.pro),
            "enterprise" => Some(self.enterprise),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// USD per 10,000 billable (2xx/3xx) requests, every tier. A service's
    /// `config.price_per_10k_usd` overrides it.
    pub price_per_10k_usd: Decimal,
    /// Unbilled usage is charged once it reaches this (or when its month has ended).
    pub charge_threshold_usd: Decimal,
    /// The smallest charge; a charge is rounded up to the cent.
    pub minimum_charge_usd: Decimal,
    /// Monthly base fee per tier, charged in advance with the month's first charge. A
    /// service's `config.base_fee_usd` overrides it (enterprise contracts), and its
    /// `config.addons = [{name, monthly_usd}]` add to it.
    pub base_fee_usd: Tiers<Decimal>,
    /// Requests per second HAProxy allows a key, per tier (the vault's `rate_limit`).
    pub rate_limits: Tiers<u32>,
    /// The vault file to regenerate after a suspension or resume; "" = none.
    pub vault_path: String,
    /// Changes within this window are written to the vault once.
    #[serde(with = "humantime_serde")]
    pub vault_coalesce: Duration,
    /// The vault key (base64 of 32 bytes). Unset: the `LONGSHORE_VAULT_KEY` variable.
    #[serde(default)]
    pub vault_key: Option<SecretString>,
    pub chain: ChainConfig,
}

/// Where escrow charges go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainBackend {
    /// No chain: intents wait (their jobs retry), nothing is lost.
    None,
    /// The in-memory dev simulator: moves no money.
    Simulator,
    /// Solana over JSON-RPC.
    Rpc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub backend: ChainBackend,
    /// The treasury's USDC token account (base58), where charges go.
    pub treasury_token_account: String,
    /// No single charge may move more than this (row 23: a bad amount never leaves).
    pub max_charge_usd: Decimal,
    /// After sending, poll the signature this long before looking again later.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The simulator's starting balance and allowance for each escrow account.
    pub simulator_escrow_usd: Decimal,
}

impl ChainConfig {
    /// `max_charge_usd` in USDC base units.
    pub fn max_charge_units(&self) -> u64 {
        usd_to_units(self.max_charge_usd)
    }

    /// The chain this configuration names (`None` for `backend = "none"`).
    pub fn build(&self) -> Result<Option<Arc<dyn Chain>>, ConfigError> {
        match self.backend {
            ChainBackend::None => Ok(None),
            ChainBackend::Simulator => Ok(Some(Arc::new(SimulatedChain::new(
                if self.treasury_token_account.is_empty() {
                    "simulated-treasury".into()
                } else {
                    self.treasury_token_account.clone()
                },
                usd_to_units(self.simulator_escrow_usd),
                self.max_charge_units(),
            )))),
            ChainBackend::Rpc => Err(rpc_not_built()),
        }
    }
}

fn rpc_not_built() -> ConfigError {
    ConfigError::Invalid {
        key: "billing.chain.backend".into(),
        message: "\"rpc\" (Solana JSON-RPC) is not in this build yet; use \"none\" (intents wait) or \"simulator\" (dev)".into(),
    }
}

fn usd_to_units(usd: Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive as _;
    (usd * Decimal::from(1_000_000))
        .floor()
        .to_u64()
        .unwrap_or(0)
}

impl BillingConfig {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        let b: BillingConfig = cfg.section("billing", &cfg.billing)?;
        let bad = |key: &str, msg: &str| {
            Err(ConfigError::Invalid {
                key: format!("billing.{key}"),
                message: msg.to_string(),
            })
        };
        if b.price_per_10k_usd < Decimal::ZERO {
            return bad("price_per_10k_usd", "must not be negative");
        }
        if b.minimum_charge_usd <= Decimal::ZERO || b.minimum_charge_usd.scale() > 2 {
            return bad("minimum_charge_usd", "must be a positive amount in cents");
        }
        if b.charge_threshold_usd < b.minimum_charge_usd {
            return bad(
                "charge_threshold_usd",
                "must be at least minimum_charge_usd",
            );
        }
        for (tier, fee) in [
            ("starter", b.base_fee_usd.starter),
            ("pro", b.base_fee_usd.pro),
            ("enterprise", b.base_fee_usd.enterprise),
        ] {
            if fee < Decimal::ZERO {
                return bad(&format!("base_fee_usd.{tier}"), "must not be negative");
            }
        }
        if [
            b.rate_limits.starter,
            b.rate_limits.pro,
            b.rate_limits.enterprise,
        ]
        .contains(&0)
        {
            return bad("rate_limits", "must be positive");
        }
        if b.chain.max_charge_usd <= Decimal::ZERO {
            return bad("chain.max_charge_usd", "must be positive");
        }
        if b.chain.poll_interval.is_zero() || b.chain.confirm_timeout.is_zero() {
            return bad(
                "chain",
                "poll_interval and confirm_timeout must be positive",
            );
        }
        if b.chain.backend == ChainBackend::Rpc {
            return Err(rpc_not_built());
        }
        if !b.chain.treasury_token_account.is_empty()
            && crate::clients::chain::validate_address("treasury", &b.chain.treasury_token_account)
                .is_err()
        {
            return bad(
                "chain.treasury_token_account",
                "must be a Solana address (base58 of 32 bytes)",
            );
        }
        if let Some(k) = &b.vault_key {
            use secrecy::ExposeSecret as _;
            if VaultKey::from_base64(k.expose_secret()).is_err() {
                return bad("vault_key", "must be 32 bytes, base64-encoded");
            }
        }
        Ok(b)
    }

    /// The vault key from the config, else from `LONGSHORE_VAULT_KEY`.
    pub fn vault_key(&self) -> Result<VaultKey, VaultError> {
        use secrecy::ExposeSecret as _;
        match &self.vault_key {
            Some(k) => VaultKey::from_base64(k.expose_secret()),
            None => VaultKey::from_env(),
        }
    }
}
