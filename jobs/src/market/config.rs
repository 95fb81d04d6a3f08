//! `[market]` settings: the data source, the strategy's weights and thresholds, the
//! guardrails and the win-rate rule. Checked at start; an error names its key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use longshore_workers::config::{Config, ConfigError};
use serde::Deserialize;

use super::guardrails::GuardrailConfig;
use super::strategy::StrategyConfig;
use crate::clients::cryptometer::{Cryptometer, CryptometerConfig};
use crate::clients::kingfisher::{KingFisher, KingFisherConfig};
use crate::clients::market::{ClusterSource, MarketSource};
use crate::clients::market_sim::MarketSimulator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// No market data: ticks enqueue nothing.
    None,
    /// The dev simulator (also simulates liquidation clusters).
    Simulator,
    Cryptometer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WinrateConfig {
    /// A signal's outcome is the close this long after it, rounded up to whole candles
    /// of the signal's timeframe ([`WinrateConfig::horizon_for`]).
    #[serde(with = "humantime_serde")]
    pub horizon: Duration,
    /// A long wins above +threshold, a short below −threshold (0.01 = 1%).
    pub threshold: f64,
}

impl WinrateConfig {
    /// The horizon on a timeframe: `horizon` rounded up to whole candles, at least one
    /// (4h: 240 candles on 1m, one on 4h; a day on 1d and a week on 1w, where a 4-hour
    /// outcome cannot be read from the candles at all).
    pub fn horizon_for(&self, tf: super::types::Timeframe) -> (i64, i64) {
        let step = tf.seconds();
        let candles = ((self.horizon.as_secs() as i64 + step - 1) / step).max(1);
        (candles * step, candles)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketConfig {
    pub source: SourceKind,
    pub simulator_seed: u64,
    /// Candles the simulator serves per request.
    pub simulator_history: usize,
    /// When a (symbol, timeframe) is first watched, indicators and signals are computed
    /// for this many past candles, so win-rates have history at once.
    pub backfill: u32,
    /// Candles in the realised-volatility window.
    pub volatility_window: usize,
    /// How long candles, indicators and clusters are kept (`prune_market`'s default);
    /// win-rates never look back further.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    pub cryptometer: CryptometerConfig,
    pub kingfisher: KingFisherConfig,
    pub strategy: StrategyConfig,
    pub guardrails: GuardrailConfig,
    pub winrate: WinrateConfig,
}

type Sources = (
    Option<Arc<dyn MarketSource>>,
    Option<Arc<dyn ClusterSource>>,
);

/// The market pipeline's settings and sources, shared by its handlers.
pub struct Market {
    pub cfg: MarketConfig,
    pub source: Option<Arc<dyn MarketSource>>,
    pub clusters: Option<Arc<dyn ClusterSource>>,
    described: AtomicBool,
}

impl Market {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        Self::from_config_for(cfg, crate::Clients::Build)
    }

    /// With [`crate::Clients::Skip`], no source is built (and no API key needed).
    pub fn from_config_for(cfg: &Config, clients: crate::Clients) -> Result<Self, ConfigError> {
        let m: MarketConfig = cfg.section("market")?;
        let bad = |key: &str, msg: String| ConfigError::Invalid {
            key: format!("market.{key}"),
            message: msg,
        };
        m.strategy.check().map_err(|e| bad("strategy", e))?;
        if m.volatility_window < 2 {
            return Err(bad("volatility_window", "must be at least 2".into()));
        }
        if m.retention < Duration::from_secs(86_400) {
            return Err(bad("retention", "must be at least 1d".into()));
        }
        if m.winrate.horizon.is_zero() {
            return Err(bad("winrate.horizon", "must be positive".into()));
        }
        if !(m.winrate.threshold.is_finite() && m.winrate.threshold >= 0.0) {
            return Err(bad(
                "winrate.threshold",
                "must be a non-negative fraction".into(),
            ));
        }
        let (source, clusters): Sources = match m.source {
            _ if clients == crate::Clients::Skip => (None, None),
            SourceKind::None => (None, None),
            SourceKind::Simulator => {
                let sim = Arc::new(MarketSimulator::new(m.simulator_seed, m.simulator_history));
                (Some(sim.clone()), Some(sim))
            }
            SourceKind::Cryptometer => (
                Some(Arc::new(
                    Cryptometer::new(&m.cryptometer).map_err(|e| bad("cryptometer", e))?,
                )),
                None,
            ),
        };
        // A configured KingFisher URL wins over the simulator's clusters.
        let kingfisher = match clients {
            crate::Clients::Build => {
                KingFisher::new(&m.kingfisher).map_err(|e| bad("kingfisher.url", e))?
            }
            crate::Clients::Skip => None,
        };
        let clusters = match kingfisher {
            Some(kf) => Some(Arc::new(kf) as Arc<dyn ClusterSource>),
            None => clusters,
        };
        Ok(Market {
            cfg: m,
            source,
            clusters,
            described: AtomicBool::new(false),
        })
    }

    /// Logs where market data comes from, once per process, on first use.
    pub fn describe_once(&self) {
        if self.described.swap(true, Ordering::Relaxed) {
            return;
        }
        let source = self
            .source
            .as_ref()
            .map_or("none".to_string(), |s| s.describe());
        let clusters = self
            .clusters
            .as_ref()
            .map_or("not configured".to_string(), |c| c.describe());
        tracing::info!(%source, %clusters, strategy = %self.cfg.strategy.version, "market data sources");
    }
}

#[cfg(test)]
mod tests {
    use super::super::types::Timeframe;
    use super::*;

    /// Issue 17, item 7: the win-rate horizon per timeframe, in whole candles: 4 h on
    /// 1m–4h, one candle on 1d and 1w (stated in the result as seconds and candles).
    #[test]
    fn the_horizon_is_whole_candles_on_every_timeframe() {
        let w = WinrateConfig {
            horizon: Duration::from_secs(4 * 3600),
            threshold: 0.01,
        };
        let cases = [
            (Timeframe::M1, 240),
            (Timeframe::M5, 48),
            (Timeframe::M15, 16),
            (Timeframe::M30, 8),
            (Timeframe::H1, 4),
            (Timeframe::H4, 1),
            (Timeframe::D1, 1),
            (Timeframe::W1, 1),
        ];
        for (tf, candles) in cases {
            assert_eq!(
                w.horizon_for(tf),
                (candles * tf.seconds(), candles),
                "{tf:?}"
            );
        }
        // A horizon that is not a whole number of candles rounds up.
        let odd = WinrateConfig {
            horizon: Duration::from_secs(90 * 60),
            threshold: 0.01,
        };
        assert_eq!(odd.horizon_for(Timeframe::H1), (7200, 2));
    }
}
