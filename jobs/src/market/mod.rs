//! The market pipeline (../shared/SPEC-MARKET.md). Built so far:
//! - [`indicators`]: RSI(14), EMA, MACD(12,26,9), ATR(14), realised volatility.
//!
//! Not yet: the Cryptometer/KingFisher clients, the simulator, the job kinds
//! (`sync_watcher`, `market_tick`, `ingest_indicators`, `compute_signals`,
//! `compute_winrate`, cleanup) and their tables (issue 6).

pub mod indicators;
