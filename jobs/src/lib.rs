//! # longshore-jobs: every job kind
//!
//! One file per kind: an args type with a stable `KIND` (its queue name) and a handler.
//! [`registry`] lists every kind once; the binary hands it to the runtime.
//! Pipelines get a folder each (`market/`, `billing/`, `chat/`), outside services
//! `clients/`.

pub mod admin_views;
pub mod billing;
pub mod chat;
pub mod clients;
pub mod files;
pub mod locks;
pub mod market;
pub mod probe;
pub mod prune;
pub mod telemetry;

use std::sync::Arc;

use longshore_workers::Registry;
use longshore_workers::config::{Config, ConfigError};

/// Whether a registry builds the outside clients its handlers call (market sources,
/// chat providers, the chain), which need the pipelines' secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    Build,
    /// For processes that check and enqueue but never run a handler.
    Skip,
}

/// Every job kind this build knows, with its settings from `cfg`, ready to run. An
/// invalid pipeline setting is an error naming its key.
pub fn registry(cfg: &Config) -> Result<Registry, ConfigError> {
    build(cfg, Clients::Build)
}

/// The same kinds, for processes that only check and enqueue (the ingress, the
/// scheduler, the CLI): args are checked exactly as a worker checks them, but no
/// outside client is built, so these processes need none of the secrets a worker
/// needs (provider and RPC keys, the delegate keypair).
pub fn door_registry(cfg: &Config) -> Result<Registry, ConfigError> {
    build(cfg, Clients::Skip)
}

/// The pipelines' defaults (`jobs/defaults.toml`): their sections, queue overrides and
/// schedules, loaded after the runtime's.
pub const DEFAULTS: &str = include_str!("../defaults.toml");

/// The embedded configuration of a fleet that runs these pipelines: the runtime's
/// defaults, then [`DEFAULTS`], with [`SECTIONS`] the only other tables accepted, and
/// `dev` as the embedded `dev` environment (the binary's `config/dev.toml`).
pub const fn layers(dev: Option<&'static str>) -> longshore_workers::config::Layers<'static> {
    longshore_workers::config::Layers {
        defaults: &[longshore_workers::config::RUNTIME_DEFAULTS, DEFAULTS],
        dev,
        sections: Some(SECTIONS),
    }
}

/// The configuration sections the pipelines own (`[billing]`, …); any other top-level
/// table that is not the runtime's is refused at load.
pub const SECTIONS: &[&str] = &["billing", "market", "chat", "probe", "traffic"];

fn build(cfg: &Config, clients: Clients) -> Result<Registry, ConfigError> {
    cfg.check_sections(SECTIONS)?;
    billing::traffic::TrafficConfig::from_config(cfg)?;
    let billing = Arc::new(billing::config::BillingConfig::from_config_for(
        cfg, clients,
    )?);
    let market = Arc::new(market::config::Market::from_config_for(cfg, clients)?);
    let chat = Arc::new(chat::config::Chat::from_config_for(cfg, clients)?);
    Ok(Registry::new()
        .register(probe::ProbeHandler::from_config(cfg)?)
        .register(billing::ingest_logs::IngestLogsHandler(billing.clone()))
        .text_route(billing::ingest_logs::log_route())
        .admin_view(admin_views::CREDITS)
        .admin_view(admin_views::BILLING)
        .admin_view(admin_views::LLM_ERRORS)
        .register(billing::scan_log_spool::ScanLogSpoolHandler(
            billing.clone(),
        ))
        .register(billing::aggregate_usage::AggregateUsageHandler)
        .register(billing::bill_usage::BillUsageHandler(billing.clone()))
        .register(billing::charge_escrow::ChargeEscrowHandler::new(
            billing.clone(),
        ))
        .register(billing::sweep_charge_intents::SweepChargeIntentsHandler)
        .register(billing::regenerate_vault::RegenerateVaultHandler(billing))
        .register(billing::prune_raw_logs::PruneRawLogsHandler)
        .register(market::sync_watcher::SyncWatcherHandler(market.clone()))
        .register(market::market_tick::MarketTickHandler(market.clone()))
        .register(market::ingest_indicators::IngestIndicatorsHandler(
            market.clone(),
        ))
        .register(market::compute_signals::ComputeSignalsHandler(
            market.clone(),
        ))
        .register(market::compute_winrate::ComputeWinrateHandler(
            market.clone(),
        ))
        .register(market::prune_market::PruneMarketHandler(market))
        .register(chat::llm_call::LlmCallHandler(chat))
        .register(chat::prune_llm::PruneLlmHandler)
        .register(longshore_workers::maintenance::MaintenanceHandler))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn names(cfg: &Config) -> Vec<&str> {
        cfg.schedules.iter().map(|s| s.name.as_str()).collect()
    }

    /// The runtime's defaults carry no pipeline; the fleet's layers add the pipelines'
    /// sections and append their schedules to the runtime's maintenance ones.
    #[test]
    fn the_pipelines_defaults_layer_over_the_runtimes() {
        let nowhere = Path::new("/nonexistent");
        let runtime = Config::load_runtime_from(nowhere, None, std::iter::empty()).unwrap();
        assert!(runtime.sections.is_empty(), "{:?}", runtime.sections.keys());
        assert!(names(&runtime).contains(&"prune_archives"));
        assert!(!names(&runtime).contains(&"bill_usage"));

        let fleet = Config::load_layers(&layers(None), nowhere, None, std::iter::empty()).unwrap();
        for s in ["billing", "market", "chat"] {
            assert!(fleet.sections.contains_key(s), "{s}");
        }
        let all = names(&fleet);
        for n in [
            "prune_archives",
            "vacuum_queues",
            "bill_usage",
            "market_ingest",
        ] {
            assert!(all.contains(&n), "{n} in {all:?}");
        }
        assert_eq!(fleet.queue("llm_call").max_attempts, 3);

        // A table no pipeline owns is refused at load, naming the known ones.
        let typo = [(
            "LONGSHORE__BILING__PRICE_PER_10K_USD".to_string(),
            "2".to_string(),
        )];
        let e = Config::load_layers(&layers(None), nowhere, None, typo).unwrap_err();
        assert!(
            e.to_string().contains("biling") && e.to_string().contains("billing"),
            "{e}"
        );
    }
}
