//! The market-data seam: what `ingest_indicators` needs from a market source
//! (Cryptometer in production, [`super::market_sim`] in dev) and from a liquidation
//! cluster source (KingFisher, optional).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::market::types::{Candle, Cluster, Symbol, Timeframe};

/// Why a source could not answer. Messages never carry credentials.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// Worth trying again later (429, 5xx, timeouts, connection errors) once the
    /// client's own bounded retries are spent. `retry_after` is the server's hint.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Will not get better by repeating the same request: `"success":"false"`, other
    /// 4xx, malformed or invalid data.
    #[error("{0}")]
    Rejected(String),
}

impl SourceError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::Rejected(message.into())
    }
}

/// Aggregated liquidations over the source's window, in the quote currency.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Liquidations {
    pub longs: f64,
    pub shorts: f64,
}

#[async_trait]
pub trait MarketSource: Send + Sync {
    /// What this is, for the log: `cryptometer at https://api.cryptometer.io`, or a
    /// simulator named as one.
    fn describe(&self) -> String;
    /// Whether it is a simulator (its data is marked so in the database).
    fn simulated(&self) -> bool;
    /// Up to `limit` recent candles, oldest first, checked (see
    /// [`crate::market::types::validate_candles`]); the newest may still be forming. A
    /// source may serve fewer than asked (its own cap, a young market): the caller
    /// checks the history it got.
    async fn candles(
        &self,
        symbol: &Symbol,
        tf: Timeframe,
        limit: usize,
    ) -> Result<Vec<Candle>, SourceError>;
    /// The latest long/short account ratio, if the source has one.
    async fn ls_ratio(&self, symbol: &Symbol, tf: Timeframe) -> Result<Option<f64>, SourceError>;
    async fn liquidations(&self, symbol: &Symbol) -> Result<Option<Liquidations>, SourceError>;
}

#[async_trait]
pub trait ClusterSource: Send + Sync {
    fn describe(&self) -> String;
    async fn clusters(&self, symbol: &Symbol) -> Result<Vec<Cluster>, SourceError>;
}

/// A JSON number, or a string holding one (sources send both).
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Checks `[{price, volume, side}]` clusters: finite positive prices, non-negative
/// volumes, a side of `long` or `short` (`buy`/`sell` are read as short/long
/// liquidations' sides as KingFisher labels them: a `buy` cluster liquidates shorts).
pub fn parse_clusters(data: &Value) -> Result<Vec<Cluster>, SourceError> {
    let items = data
        .as_array()
        .ok_or_else(|| SourceError::rejected("clusters: expected a JSON array"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let price = c.get("price").and_then(number);
            let volume = c.get("volume").and_then(number);
            let side = c
                .get("side")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase);
            match (price, volume, side.as_deref()) {
                (Some(p), Some(v), Some(s))
                    if p.is_finite() && p > 0.0 && v.is_finite() && v >= 0.0 =>
                {
                    let side = match s {
                        "long" | "sell" => "long",
                        "short" | "buy" => "short",
                        _ => {
                            return Err(SourceError::rejected(format!(
                                "cluster {i}: side {s:?} is not long or short"
                            )));
                        }
                    };
                    Ok(Cluster {
                        price: p,
                        volume: v,
                        side: side.into(),
                    })
                }
                _ => Err(SourceError::rejected(format!(
                    "cluster {i}: needs a finite positive price, a non-negative volume and a side"
                ))),
            }
        })
        .collect()
}
