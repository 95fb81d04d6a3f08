//! `[billing]` settings: prices, the charge threshold, base fees and vault rate limits,
//! by tier. Prices are decimal strings ("1.00"), never floats.

use std::sync::Arc;
use std::time::Duration;

use longshore_workers::config::{Config, ConfigError};
use rust_decimal::Decimal;
use secrecy::SecretString;
use serde::Deserialize;

use super::regenerate_vault::{VaultError, VaultKey};
use crate::clients::chain::Chain;
#[cfg(feature = "solana-rpc")]
use crate::clients::chain_rpc::{Delegate, RpcChain, RpcChainConfig};
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
    /// Directories the log jobs may use (`ingest_logs`'s path, `scan_log_spool`'s
    /// dirs), symlinks resolved. Empty: none.
    #[serde(default)]
    pub log_roots: Vec<String>,
    /// Directories `regenerate_vault` may write in (and `vault_path` must lie in).
    /// Kept apart from `log_roots`: a log job never reads or moves the vault.
    #[serde(default)]
    pub vault_roots: Vec<String>,
    /// Replaced by `log_roots` and `vault_roots`: refused at start with that advice,
    /// so an old config does not silently lose (or widen) its confinement.
    #[serde(default)]
    file_roots: Option<serde::de::IgnoredAny>,
    /// `log_roots`, checked.
    #[serde(skip, default = "no_log_roots")]
    pub log_dirs: crate::files::FileRoots,
    /// `vault_roots`, checked.
    #[serde(skip, default = "no_vault_roots")]
    pub vault_dirs: crate::files::FileRoots,
    /// The vault file's permissions, octal (default "0600": the owner's alone).
    #[serde(default = "default_vault_mode", deserialize_with = "octal_mode")]
    pub vault_mode: u32,
    /// The largest log file `ingest_logs` (and the spool scan) reads; larger ones
    /// fail with the reason instead of being read into memory.
    #[serde(default = "default_max_log_file_bytes")]
    pub max_log_file_bytes: u64,
    /// HAProxy writes its accept date (`%tr`) in the load balancer's local time,
    /// without an offset: this is that offset ("+02:00"; default "+00:00", UTC).
    /// Lines are stored in UTC.
    #[serde(default = "default_haproxy_offset", deserialize_with = "utc_offset")]
    pub haproxy_utc_offset: chrono::FixedOffset,
    pub chain: ChainConfig,
    /// The one chain client of this process, built on first use and shared by every
    /// handler (so the simulator's balances are the ones its charges moved).
    #[serde(skip)]
    client: SharedChain,
}

/// A lazily built chain client, shared by the clones of one [`BillingConfig`].
#[derive(Clone, Default)]
struct SharedChain(Arc<std::sync::OnceLock<Option<Arc<dyn Chain>>>>);

impl std::fmt::Debug for SharedChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "SharedChain(not built)",
            Some(None) => "SharedChain(none)",
            Some(Some(_)) => "SharedChain(built)",
        })
    }
}

impl BillingConfig {
    /// The chain `billing.chain` names (`None` for `backend = "none"`), built once.
    pub fn chain_client(&self) -> Option<Arc<dyn Chain>> {
        self.client
            .0
            .get_or_init(|| {
                let chain = self.chain.build().expect("validated with the config");
                if let Some(c) = &chain {
                    tracing::info!(chain = c.describe(), "billing: chain client ready");
                }
                chain
            })
            .clone()
    }

    /// Reads a log file for `ingest_logs` or the spool scan: confined to
    /// `log_roots` at the open and at most `max_log_file_bytes` (see
    /// [`crate::files::FileRoots::read`]), off the async threads.
    pub async fn read_log(&self, path: &str) -> Result<Vec<u8>, crate::files::ReadError> {
        let (roots, max, path) = (
            self.log_dirs.clone(),
            self.max_log_file_bytes,
            path.to_string(),
        );
        tokio::task::spawn_blocking(move || roots.read(&path, max))
            .await
            .unwrap_or_else(|e| Err(crate::files::ReadError::Io(e.to_string())))
    }
}

fn default_haproxy_offset() -> chrono::FixedOffset {
    chrono::FixedOffset::east_opt(0).expect("zero is an offset")
}

/// "+HH:MM" or "-HH:MM" (or "Z").
fn utc_offset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<chrono::FixedOffset, D::Error> {
    let s = String::deserialize(d)?;
    parse_utc_offset(&s)
        .ok_or_else(|| serde::de::Error::custom("not a UTC offset like \"+02:00\" or \"-05:30\""))
}

fn parse_utc_offset(s: &str) -> Option<chrono::FixedOffset> {
    if s == "Z" {
        return chrono::FixedOffset::east_opt(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m > 59 {
        return None;
    }
    chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

fn no_log_roots() -> crate::files::FileRoots {
    crate::files::FileRoots::none("billing.log_roots")
}

fn no_vault_roots() -> crate::files::FileRoots {
    crate::files::FileRoots::none("billing.vault_roots")
}

/// 1 GiB: several hours of a busy HAProxy, far below what would exhaust memory.
fn default_max_log_file_bytes() -> u64 {
    1 << 30
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
    /// Simulator escrow accounts that start with another amount (address → USD).
    #[serde(default)]
    pub simulator_escrows: std::collections::BTreeMap<String, Decimal>,
    /// `rpc`: the JSON-RPC endpoint. A secret: providers put API keys in it; logs show
    /// only its scheme and host.
    #[serde(default)]
    pub rpc_url: Option<SecretString>,
    /// `rpc`: the commitment a charge must reach to be booked (`confirmed` or
    /// `finalized`; `processed` is refused: it books forks).
    #[serde(default)]
    pub commitment: Commitment,
    /// Below this many lamports of SOL on the delegate (which pays every fee) the
    /// worker warns; `longshore_chain_delegate_lamports` shows the balance.
    #[serde(default = "default_delegate_low_lamports")]
    pub delegate_low_lamports: u64,
    /// How long a charge waits before trying again when the delegate cannot pay the
    /// fee (no attempt is spent and the customer is not touched).
    #[serde(with = "humantime_serde", default = "default_fee_payer_retry")]
    pub fee_payer_retry: Duration,
    /// `rpc`: per request.
    #[serde(with = "humantime_serde", default = "default_rpc_timeout")]
    pub rpc_timeout: Duration,
    /// `rpc`: the USDC mint (base58); `transfer_checked` verifies it and its decimals.
    #[serde(default)]
    pub usdc_mint: String,
    /// `rpc`: the delegate's keypair file (`solana-keygen` JSON). It signs charges and
    /// pays their fees.
    #[serde(default)]
    pub delegate_keypair_file: Option<std::path::PathBuf>,
    /// `rpc`: the delegate's keypair itself (JSON array or base58), for example from
    /// `LONGSHORE__BILLING__CHAIN__DELEGATE_KEYPAIR`. Never logged.
    #[serde(default, deserialize_with = "keypair_secret")]
    pub delegate_keypair: Option<SecretString>,
}

/// The keypair as a string (JSON array text or base58), or as the array itself: an
/// environment value `[1,2,…]` reaches us already parsed into numbers.
fn keypair_secret<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        Bytes(Vec<u8>),
    }
    Ok(match Option::<Form>::deserialize(d) {
        Ok(Some(Form::Text(s))) => Some(SecretString::from(s)),
        Ok(Some(Form::Bytes(b))) => Some(SecretString::from(format!("{b:?}"))),
        Ok(None) => None,
        // Never echo the value: untagged errors are generic, but say what is expected.
        Err(_) => {
            return Err(serde::de::Error::custom(
                "expected a keypair: a JSON array of 64 bytes or base58",
            ));
        }
    })
}

/// 0.05 SOL: about ten thousand charges at 5,000 lamports each.
fn default_delegate_low_lamports() -> u64 {
    50_000_000
}

fn default_fee_payer_retry() -> Duration {
    Duration::from_secs(30)
}

fn default_rpc_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Commitment {
    Processed,
    #[default]
    Confirmed,
    Finalized,
}

impl ChainConfig {
    /// `max_charge_usd` in whole cents (an intent is cut to it).
    pub fn max_charge_cents(&self) -> i64 {
        use rust_decimal::prelude::ToPrimitive as _;
        (self.max_charge_usd * Decimal::ONE_HUNDRED)
            .floor()
            .to_i64()
            .unwrap_or(i64::MAX)
    }

    /// `max_charge_usd` in USDC base units.
    pub fn max_charge_units(&self) -> u64 {
        usd_to_units(self.max_charge_usd)
    }

    /// The chain this configuration names (`None` for `backend = "none"`).
    pub fn build(&self) -> Result<Option<Arc<dyn Chain>>, ConfigError> {
        match self.backend {
            ChainBackend::None => Ok(None),
            ChainBackend::Simulator => Ok(Some(Arc::new(
                SimulatedChain::new(
                    if self.treasury_token_account.is_empty() {
                        "simulated-treasury".into()
                    } else {
                        self.treasury_token_account.clone()
                    },
                    usd_to_units(self.simulator_escrow_usd),
                    self.max_charge_units(),
                )
                .with_escrows(
                    self.simulator_escrows
                        .iter()
                        .map(|(a, usd)| (a.clone(), usd_to_units(*usd))),
                ),
            ))),
            #[cfg(feature = "solana-rpc")]
            ChainBackend::Rpc => Ok(Some(Arc::new(RpcChain::new(self.rpc_config()?)))),
            #[cfg(not(feature = "solana-rpc"))]
            ChainBackend::Rpc => Err(rpc_not_built()),
        }
    }

    /// Without the `solana-rpc` feature, `backend = "rpc"` is refused at start.
    #[cfg(not(feature = "solana-rpc"))]
    pub fn rpc_config(&self) -> Result<(), ConfigError> {
        Err(rpc_not_built())
    }

    #[cfg(feature = "solana-rpc")]
    /// The Solana RPC settings, checked: every key `rpc` needs, the addresses parsed
    /// and the delegate keypair loaded. Errors name the key, never the secret.
    pub fn rpc_config(&self) -> Result<RpcChainConfig, ConfigError> {
        use secrecy::ExposeSecret as _;
        let bad = |key: &str, message: String| ConfigError::Invalid {
            key: format!("billing.chain.{key}"),
            message,
        };
        let url = match &self.rpc_url {
            Some(u) if !u.expose_secret().trim().is_empty() => u.expose_secret().trim().to_string(),
            _ => return Err(bad("rpc_url", "is required for backend \"rpc\"".into())),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("rpc_url", "must be an http(s) URL".into()));
        }
        use std::str::FromStr as _;
        let address = |key: &str, v: &str| {
            solana_address::Address::from_str(v)
                .map_err(|_| bad(key, "must be a Solana address (base58 of 32 bytes)".into()))
        };
        let mint = address("usdc_mint", &self.usdc_mint)?;
        let treasury = address("treasury_token_account", &self.treasury_token_account)?;
        let (key, secret) = match (&self.delegate_keypair, &self.delegate_keypair_file) {
            (Some(s), _) => ("delegate_keypair", s.expose_secret().to_string()),
            (None, Some(path)) => (
                "delegate_keypair_file",
                std::fs::read_to_string(path).map_err(|e| {
                    bad("delegate_keypair_file", format!("{}: {e}", path.display()))
                })?,
            ),
            (None, None) => {
                return Err(bad(
                    "delegate_keypair_file",
                    "backend \"rpc\" needs the delegate's keypair (delegate_keypair_file or delegate_keypair)".into(),
                ));
            }
        };
        let delegate = Delegate::parse(&secret).map_err(|m| bad(key, m))?;
        use solana_commitment_config::CommitmentConfig;
        let commitment = match self.commitment {
            Commitment::Processed => CommitmentConfig::processed(),
            Commitment::Confirmed => CommitmentConfig::confirmed(),
            Commitment::Finalized => CommitmentConfig::finalized(),
        };
        Ok(RpcChainConfig {
            url,
            commitment,
            timeout: self.rpc_timeout,
            mint,
            treasury,
            delegate,
            max_units: self.max_charge_units(),
        })
    }
}

#[cfg(not(feature = "solana-rpc"))]
fn rpc_not_built() -> ConfigError {
    ConfigError::Invalid {
        key: "billing.chain.backend".into(),
        message: "\"rpc\" (Solana JSON-RPC) is not in this build: build with `--features solana-rpc` (release images do), or use \"none\" (intents wait) or \"simulator\" (dev)".into(),
    }
}

/// The most any configured price or fee may be, in USD: beyond it is a typo (and the
/// arithmetic on a month of usage could overflow).
pub const MAX_PRICE_USD: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
/// The most `chain.max_charge_usd` may be (it must fit in USDC base units).
pub const MAX_CHARGE_USD: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

fn usd_to_units(usd: Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive as _;
    (usd * Decimal::from(1_000_000))
        .floor()
        .to_u64()
        .unwrap_or(0)
}

impl BillingConfig {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        Self::from_config_for(cfg, crate::Clients::Build)
    }

    /// With [`crate::Clients::Skip`], the chain's RPC settings (the delegate keypair
    /// among them) are not required: the process never charges.
    pub fn from_config_for(cfg: &Config, clients: crate::Clients) -> Result<Self, ConfigError> {
        let mut b: BillingConfig = cfg.section("billing")?;
        if b.file_roots.is_some() {
            return Err(ConfigError::Invalid {
                key: "billing.file_roots".into(),
                message: "replaced by billing.log_roots (ingest_logs, scan_log_spool) and \
                          billing.vault_roots (regenerate_vault): list each job's directories \
                          apart"
                    .into(),
            });
        }
        for (key, list, dirs) in [
            ("billing.log_roots", &b.log_roots, &mut b.log_dirs),
            ("billing.vault_roots", &b.vault_roots, &mut b.vault_dirs),
        ] {
            *dirs = crate::files::FileRoots::new(key, list).map_err(|e| ConfigError::Invalid {
                key: key.into(),
                message: e,
            })?;
        }
        // Warned, not refused: a test or a single-user box may share one scratch
        // directory; in production keep them apart.
        if let Some((l, v)) = b.log_dirs.overlap(&b.vault_dirs)
            && clients == crate::Clients::Build
        {
            tracing::warn!(
                log_root = %l.display(),
                vault_root = %v.display(),
                "billing.log_roots and billing.vault_roots overlap: a log job could read or move the vault; keep them apart"
            );
        }
        if !b.vault_path.is_empty()
            && let Err(e) = b.vault_dirs.check(&b.vault_path)
        {
            return Err(ConfigError::Invalid {
                key: "billing.vault_path".into(),
                message: e,
            });
        }
        let bad = |key: &str, msg: &str| {
            Err(ConfigError::Invalid {
                key: format!("billing.{key}"),
                message: msg.to_string(),
            })
        };
        if b.price_per_10k_usd < Decimal::ZERO {
            return bad("price_per_10k_usd", "must not be negative");
        }
        // Amounts beyond these are typos, and their arithmetic could overflow.
        for (key, v) in [
            ("price_per_10k_usd", b.price_per_10k_usd),
            ("minimum_charge_usd", b.minimum_charge_usd),
            ("charge_threshold_usd", b.charge_threshold_usd),
            ("base_fee_usd.starter", b.base_fee_usd.starter),
            ("base_fee_usd.pro", b.base_fee_usd.pro),
            ("base_fee_usd.enterprise", b.base_fee_usd.enterprise),
        ] {
            if v > MAX_PRICE_USD {
                return bad(key, &format!("must be at most {MAX_PRICE_USD} USD"));
            }
        }
        // Below 2 GiB a file has fewer than 2^31 lines and fields: line numbers and COPY's
        // field lengths are 32-bit.
        if b.max_log_file_bytes == 0 || b.max_log_file_bytes > i32::MAX as u64 {
            return bad(
                "max_log_file_bytes",
                "must be between 1 byte and 2 GiB - 1 (line numbers are 32-bit)",
            );
        }
        if b.chain.max_charge_usd > MAX_CHARGE_USD {
            return bad(
                "chain.max_charge_usd",
                &format!("must be at most {MAX_CHARGE_USD} USD"),
            );
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
        // A charge is cut to max_charge_usd, but a base fee is never split: one above
        // it could never be billed.
        for (tier, fee) in [
            ("starter", b.base_fee_usd.starter),
            ("pro", b.base_fee_usd.pro),
            ("enterprise", b.base_fee_usd.enterprise),
        ] {
            if fee > b.chain.max_charge_usd || b.minimum_charge_usd > b.chain.max_charge_usd {
                return bad(
                    &format!("base_fee_usd.{tier}"),
                    "the base fee and minimum_charge_usd must not exceed chain.max_charge_usd (a base fee is never split)",
                );
            }
        }
        if b.chain.commitment == Commitment::Processed {
            return bad(
                "chain.commitment",
                "\"processed\" is refused: a processed transaction can be on a fork that is \
                 dropped, and the charge would be booked without the money; use \"confirmed\" \
                 (the default) or \"finalized\"",
            );
        }
        if b.chain.fee_payer_retry.is_zero() {
            return bad("chain.fee_payer_retry", "must be positive");
        }
        if b.chain.poll_interval.is_zero() || b.chain.confirm_timeout.is_zero() {
            return bad(
                "chain",
                "poll_interval and confirm_timeout must be positive",
            );
        }
        if b.chain.backend == ChainBackend::Rpc && clients == crate::Clients::Build {
            b.chain.rpc_config()?;
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

fn default_vault_mode() -> u32 {
    super::regenerate_vault::DEFAULT_MODE
}

/// An octal file mode as a string ("0640"), at most 0777.
fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not an octal mode like \"0640\""))
        })
}
