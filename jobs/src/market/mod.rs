//! The market pipeline (../shared/SPEC-MARKET.md):
//!
//! ```text
//! webhook ─► sync_watcher ─► watchers ──(market_tick, every 5 min)──► ingest_indicators
//!   ingest_indicators ─► candles, indicators, risk_metric, liq_clusters ─► compute_signals
//!   compute_signals ─► signals (+ doubling guardrails in metadata)
//!   market_tick {task: compute_winrate} (hourly) ─► compute_winrate ─► win_rate
//!   prune_market (daily) drops candles and indicators past the retention
//! ```
//!
//! - [`types`]: symbols, timeframes, candles and their validation.
//! - [`indicators`]: RSI(14), EMA, MACD(12,26,9), ATR(14), realised volatility.
//! - [`strategy`]: strategy v1 and the doubling guardrails, as pure functions.
//! - [`config`]: `[market]` and the sources it builds (Cryptometer, KingFisher, the
//!   simulator, in `crate::clients`).

pub mod compute_signals;
pub mod compute_winrate;
pub mod config;
pub mod guardrails;
pub mod indicators;
pub mod ingest_indicators;
pub mod market_tick;
pub mod prune_market;
pub mod seed;
pub mod strategy;
pub mod sync_watcher;
pub mod types;

use longshore_workers::JobError;

use crate::clients::market::SourceError;

/// A source's failure as a job outcome: transient → retried (after the client's own
/// retries), rejected → dead-lettered with its message.
pub(crate) fn source_error(what: &str, e: SourceError) -> JobError {
    match e {
        SourceError::Transient { message, .. } => JobError::retry(format!("{what}: {message}")),
        SourceError::Rejected(m) => JobError::fail(format!("{what}: {m}")),
    }
}
