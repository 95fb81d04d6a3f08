//! The dev market simulator: deterministic, seeded candles behind the same traits as
//! Cryptometer and KingFisher. Not market data: logs and stored rows say "simulator".
//!
//! Each candle is a pure function of (seed, symbol, timeframe, open time), so every
//! fetch of the same candle agrees and history is stable across restarts. The log
//! price is a seeded random walk within each 256-candle block (hashed increments),
//! anchored to two slow waves so trends form and turn: RSI extremes, MACD and EMA
//! crosses and occasional volume spikes all occur, and signals go long, short and flat.

use std::f64::consts::TAU;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use super::market::{ClusterSource, Liquidations, MarketSource, SourceError};
use crate::market::types::{Candle, Cluster, Symbol, Timeframe};

pub struct MarketSimulator {
    seed: u64,
    history: usize,
    /// A fixed "now" for tests; `None` = the wall clock.
    now: Mutex<Option<DateTime<Utc>>>,
}

/// splitmix64: a well-mixed 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string (stable across Rust versions, unlike `DefaultHasher`).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Uniform in [-1, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

impl MarketSimulator {
    pub fn new(seed: u64, history: usize) -> Self {
        MarketSimulator {
            seed,
            history: history.max(1),
            now: Mutex::new(None),
        }
    }

    /// Pins the simulator's clock (tests).
    pub fn set_now(&self, now: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    fn now(&self) -> DateTime<Utc> {
        self.now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(Utc::now)
    }

    fn key(&self, symbol: &Symbol, tf: Timeframe) -> u64 {
        mix(self.seed ^ fnv(&symbol.to_string()) ^ fnv(tf.as_str()).rotate_left(17))
    }

    fn base_price(&self, symbol: &Symbol) -> f64 {
        // 5 .. 50,000, fixed per symbol.
        let u = (unit(mix(self.seed ^ fnv(symbol.base()))) + 1.0) / 2.0;
        5.0 * 10f64.powf(4.0 * u)
    }

    /// Log price at candle index `k` (candles since the epoch).
    fn log_price(&self, key: u64, base: f64, k: i64) -> f64 {
        const BLOCK: i64 = 256;
        let start = k - k.rem_euclid(BLOCK);
        let walk: f64 = (start + 1..=k)
            .map(|i| 0.003 * unit(mix(key ^ i as u64)))
            .sum();
        let phase = unit(key) * TAU;
        let waves =
            0.06 * (TAU * k as f64 / 211.0 + phase).sin() + 0.025 * (TAU * k as f64 / 37.0).sin();
        base.ln() + waves + walk
    }

    pub fn candle(&self, symbol: &Symbol, tf: Timeframe, k: i64) -> Candle {
        let key = self.key(symbol, tf);
        let base = self.base_price(symbol);
        let open = self.log_price(key, base, k - 1).exp();
        let close = self.log_price(key, base, k).exp();
        let h = mix(key ^ (k as u64).rotate_left(32));
        let wick = |s: u64| 0.0015 * (unit(mix(h ^ s)) + 1.0);
        let high = open.max(close) * (1.0 + wick(1));
        let low = open.min(close) * (1.0 - wick(2));
        let spike = if unit(mix(h ^ 3)) > 0.6 { 2.5 } else { 1.0 };
        let volume = 1_000.0 * (1.0 + 0.4 * unit(mix(h ^ 4))) * spike;
        Candle {
            open_time: Utc
                .timestamp_opt(k * tf.seconds(), 0)
                .single()
                .unwrap_or_else(Utc::now),
            open,
            high,
            low,
            close,
            volume,
        }
    }

    fn current_index(&self, tf: Timeframe) -> i64 {
        tf.floor(self.now()).timestamp() / tf.seconds()
    }
}

#[async_trait]
impl MarketSource for MarketSimulator {
    fn describe(&self) -> String {
        format!(
            "market simulator (seed {}, deterministic; not market data)",
            self.seed
        )
    }
    fn simulated(&self) -> bool {
        true
    }
    async fn candles(
        &self,
        symbol: &Symbol,
        tf: Timeframe,
        limit: usize,
    ) -> Result<Vec<Candle>, SourceError> {
        // Weekly candles are not on the epoch grid; the simulator serves 1m..1d.
        if tf == Timeframe::W1 {
            return Err(SourceError::rejected(
                "market simulator: 1w is not simulated",
            ));
        }
        let now = self.current_index(tf);
        // `history` is the simulator's cap per request, as an exchange has one.
        let first = now - self.history.min(limit.max(1)) as i64 + 1;
        Ok((first..=now).map(|k| self.candle(symbol, tf, k)).collect())
    }
    async fn ls_ratio(&self, symbol: &Symbol, tf: Timeframe) -> Result<Option<f64>, SourceError> {
        // Crowded short while the price rises, crowded long while it falls.
        let key = self.key(symbol, tf);
        let base = self.base_price(symbol);
        let k = self.current_index(tf) - 1;
        let slope = self.log_price(key, base, k) - self.log_price(key, base, k - 12);
        Ok(Some((1.0 - 8.0 * slope).clamp(0.4, 2.5)))
    }
    async fn liquidations(&self, symbol: &Symbol) -> Result<Option<Liquidations>, SourceError> {
        let h =
            mix(self.seed ^ fnv(&symbol.to_string()) ^ self.current_index(Timeframe::H1) as u64);
        Ok(Some(Liquidations {
            longs: 1e6 * (1.5 + unit(h)),
            shorts: 1e6 * (1.5 + unit(mix(h))),
        }))
    }
}

#[async_trait]
impl ClusterSource for MarketSimulator {
    fn describe(&self) -> String {
        "liquidation cluster simulator (not market data)".into()
    }
    async fn clusters(&self, symbol: &Symbol) -> Result<Vec<Cluster>, SourceError> {
        let c = self.candle(symbol, Timeframe::M5, self.current_index(Timeframe::M5) - 1);
        let h = mix(self.seed ^ fnv(symbol.base()) ^ c.open_time.timestamp() as u64);
        // Usually 3% away; now and then within 2%.
        let d = if unit(h) > 0.6 { 0.015 } else { 0.03 };
        Ok(vec![
            Cluster {
                price: c.close * (1.0 + d),
                volume: 2e6,
                side: "short".into(),
            },
            Cluster {
                price: c.close * (1.0 - d),
                volume: 1.5e6,
                side: "long".into(),
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::types::validate_candles;

    #[tokio::test]
    async fn deterministic_valid_and_varied() {
        let sim = MarketSimulator::new(42, 300);
        sim.set_now("2026-11-19T13:47:12Z".parse().unwrap());
        let btc: Symbol = "BTC/USDT".parse().unwrap();
        let a = sim.candles(&btc, Timeframe::H1, 1000).await.unwrap();
        let b = sim.candles(&btc, Timeframe::H1, 1000).await.unwrap();
        assert_eq!(a, b, "the same candles every time");
        assert_eq!(a.len(), 300);
        assert_eq!(
            a.last().unwrap().open_time.to_rfc3339(),
            "2026-11-19T13:00:00+00:00"
        );
        validate_candles(&a, Timeframe::H1).unwrap();
        // Consecutive candles join: each opens at the previous close.
        for w in a.windows(2) {
            assert!((w[1].open - w[0].close).abs() < 1e-9 * w[0].close);
        }
        // Another seed, another market.
        let other = MarketSimulator::new(7, 300);
        other.set_now("2026-11-19T13:47:12Z".parse().unwrap());
        assert_ne!(other.candles(&btc, Timeframe::H1, 1000).await.unwrap(), a);
        // It moves: the range over 300 candles is more than 5%.
        let (lo, hi) = a
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), c| (l.min(c.low), h.max(c.high)));
        assert!(hi / lo > 1.05, "{lo}..{hi}");
        assert!(sim.candles(&btc, Timeframe::W1, 1000).await.is_err());
    }
}
