//! Strategy v1 (SPEC-MARKET "compute_signals"), a pure function of its inputs so every
//! rule is tested by a table. The doubling guardrails are in [`super::guardrails`].
//!
//! Decisions the spec leaves open, recorded here:
//! - The volume rule compares the last candle's volume with the average of the
//!   `volume_window` candles *before* it, and its sign is the last candle's direction
//!   (close above open: +, below: −, equal: no contribution).
//! - An input that could not be computed (too little history, no L/S ratio from the
//!   source) fires no rule and is listed under `missing` in the signal's metadata.
//! - Guardrails compare stored scores (|score|): `score − previous score`, with no
//!   previous signal counting as 0. Unknown volatility fails its check (the cautious
//!   side). A flat signal has nothing to double: the decision says so.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::indicators::Macd;
use super::types::Cluster;

/// Rule weights; the implemented rules' weights sum to 1 so the score spans [-1, 1].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub rsi: f64,
    pub macd: f64,
    pub ema_cross: f64,
    pub trend: f64,
    pub ls_ratio: f64,
    pub volume: f64,
}

impl Weights {
    pub fn sum(&self) -> f64 {
        self.rsi + self.macd + self.ema_cross + self.trend + self.ls_ratio + self.volume
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    /// Stored with every signal; signals and win-rates are kept per version.
    pub version: String,
    pub weights: Weights,
    pub rsi_oversold: f64,
    pub rsi_overbought: f64,
    /// L/S ratio below this: crowded short (contrarian long).
    pub ls_crowded_short: f64,
    /// L/S ratio above this: crowded long (contrarian short).
    pub ls_crowded_long: f64,
    /// The last volume must exceed this many times the window's average.
    pub volume_spike: f64,
    pub volume_window: usize,
    /// Realised volatility above this multiplies the score by `high_volatility_multiplier`.
    pub high_volatility: f64,
    pub high_volatility_multiplier: f64,
    /// A liquidation cluster within this fraction of the price multiplies the score by
    /// `liquidation_multiplier`.
    pub liquidation_distance: f64,
    pub liquidation_multiplier: f64,
    /// Score above this: long.
    pub long_threshold: f64,
    /// Score below this: short.
    pub short_threshold: f64,
    /// Stop distance from entry (0.02: ×0.98 for a long, ×1.02 for a short).
    pub stop_loss_pct: f64,
    /// Take-profit distances from entry, nearest first.
    pub take_profit_pcts: Vec<f64>,
}

impl StrategyConfig {
    /// What types cannot check: weights summing to 1, ordered thresholds.
    pub fn check(&self) -> Result<(), String> {
        let w = &self.weights;
        let all = [w.rsi, w.macd, w.ema_cross, w.trend, w.ls_ratio, w.volume];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err("weights must be finite and non-negative".into());
        }
        if (w.sum() - 1.0).abs() > 1e-9 {
            return Err(format!("weights must sum to 1 (they sum to {})", w.sum()));
        }
        if !(self.short_threshold < 0.0 && self.long_threshold > 0.0) {
            return Err("short_threshold must be negative and long_threshold positive".into());
        }
        if self.rsi_oversold >= self.rsi_overbought {
            return Err("rsi_oversold must be below rsi_overbought".into());
        }
        if self.ls_crowded_short >= self.ls_crowded_long {
            return Err("ls_crowded_short must be below ls_crowded_long".into());
        }
        if self.volume_window == 0 {
            return Err("volume_window must be positive".into());
        }
        if self.version.is_empty() {
            return Err("version must not be empty".into());
        }
        Ok(())
    }
}

/// What the strategy reads for one candle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    pub open: f64,
    pub close: f64,
    pub volume: f64,
    pub rsi: Option<f64>,
    pub macd: Option<Macd>,
    pub ema20: Option<f64>,
    pub ema50: Option<f64>,
    /// Average volume of the window before the last candle.
    pub volume_avg: Option<f64>,
    pub volatility: Option<f64>,
    pub ls_ratio: Option<f64>,
    pub clusters: Clusters,
}

/// What is known of liquidation clusters near this candle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "clusters")]
pub enum Clusters {
    /// No cluster source is configured (the reasons say so).
    #[default]
    NotConfigured,
    /// Configured, but nothing was fetched for this candle (an error, or history).
    Unavailable,
    Known(Vec<Cluster>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Long,
    Short,
    Flat,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Long => "long",
            Self::Short => "short",
            Self::Flat => "flat",
        }
    }
}

/// A strategy's verdict on one candle.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Signed, after multipliers, within [-1, 1].
    pub score: f64,
    pub direction: Direction,
    pub entry: f64,
    pub stop_loss: Option<f64>,
    pub take_profits: Vec<f64>,
    /// Every rule and multiplier that fired, and notes (a skipped source).
    pub reasons: Vec<Value>,
    /// Inputs that were not available, so their rules could not fire.
    pub missing: Vec<&'static str>,
}

impl Evaluation {
    /// The names of the rules that fired, in order.
    pub fn fired(&self) -> Vec<&str> {
        self.reasons
            .iter()
            .filter_map(|r| r.get("rule").and_then(Value::as_str))
            .collect()
    }
}

fn rule(name: &str, contribution: f64, value: Value) -> Value {
    json!({"rule": name, "contribution": contribution, "value": value})
}

/// Strategy v1.
/// Scores and their differences are compared with thresholds at six decimals: binary
/// floating point would otherwise decide exact boundaries by its rounding (0.75 × 0.8 =
/// 0.6000000000000001, which is above a 0.6 threshold; 0.8 − 0.7 = 0.10000000000000009,
/// above a 0.1 delta, while 0.75 − 0.65 falls below it). Six decimals is also what a
/// signal's stored score keeps.
pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

pub fn evaluate(cfg: &StrategyConfig, x: &Inputs) -> Evaluation {
    let w = &cfg.weights;
    let mut score = 0.0;
    let mut reasons = Vec::new();
    let mut missing = Vec::new();
    let mut fire = |name: &str, c: f64, v: Value, score: &mut f64| {
        *score += c;
        reasons.push(rule(name, c, v));
    };

    match x.rsi {
        Some(r) if r < cfg.rsi_oversold => fire("rsi_oversold", w.rsi, json!(r), &mut score),
        Some(r) if r > cfg.rsi_overbought => fire("rsi_overbought", -w.rsi, json!(r), &mut score),
        Some(_) => {}
        None => missing.push("rsi"),
    }
    match x.macd {
        Some(m) if m.line > m.signal => fire(
            "macd_above_signal",
            w.macd,
            json!({"line": m.line, "signal": m.signal}),
            &mut score,
        ),
        Some(m) if m.line < m.signal => fire(
            "macd_below_signal",
            -w.macd,
            json!({"line": m.line, "signal": m.signal}),
            &mut score,
        ),
        Some(_) => {}
        None => missing.push("macd"),
    }
    match (x.ema20, x.ema50) {
        (Some(a), Some(b)) if a > b => fire(
            "ema20_above_ema50",
            w.ema_cross,
            json!({"ema20": a, "ema50": b}),
            &mut score,
        ),
        (Some(a), Some(b)) if a < b => fire(
            "ema20_below_ema50",
            -w.ema_cross,
            json!({"ema20": a, "ema50": b}),
            &mut score,
        ),
        (Some(_), Some(_)) => {}
        _ => missing.push("ema"),
    }
    match x.ema50 {
        Some(e) if x.close > e => fire(
            "close_above_ema50",
            w.trend,
            json!({"close": x.close, "ema50": e}),
            &mut score,
        ),
        Some(e) if x.close < e => fire(
            "close_below_ema50",
            -w.trend,
            json!({"close": x.close, "ema50": e}),
            &mut score,
        ),
        Some(_) => {}
        None => {}
    }
    match x.ls_ratio {
        Some(r) if r < cfg.ls_crowded_short => {
            fire("ls_crowded_short", w.ls_ratio, json!(r), &mut score)
        }
        Some(r) if r > cfg.ls_crowded_long => {
            fire("ls_crowded_long", -w.ls_ratio, json!(r), &mut score)
        }
        Some(_) => {}
        None => missing.push("ls_ratio"),
    }
    match x.volume_avg {
        Some(avg) if x.volume > cfg.volume_spike * avg && x.close != x.open => {
            let up = x.close > x.open;
            let v = json!({"volume": x.volume, "average": avg});
            if up {
                fire("volume_spike_up", w.volume, v, &mut score);
            } else {
                fire("volume_spike_down", -w.volume, v, &mut score);
            }
        }
        Some(_) => {}
        None => missing.push("volume_average"),
    }

    match x.volatility {
        Some(v) if v > cfg.high_volatility => {
            score *= cfg.high_volatility_multiplier;
            reasons.push(json!({"rule": "high_volatility", "multiplier": cfg.high_volatility_multiplier, "value": v}));
        }
        Some(_) => {}
        None => missing.push("volatility"),
    }
    match &x.clusters {
        Clusters::Known(cs) => {
            let near = cs
                .iter()
                .map(|c| ((c.price - x.close) / x.close).abs())
                .filter(|d| *d <= cfg.liquidation_distance)
                .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.min(d))));
            if let Some(d) = near {
                score *= cfg.liquidation_multiplier;
                reasons.push(json!({"rule": "liquidation_nearby", "multiplier": cfg.liquidation_multiplier, "value": d}));
            }
        }
        Clusters::NotConfigured => {
            reasons.push(json!({"note": "liquidation_clusters_not_configured"}))
        }
        Clusters::Unavailable => reasons.push(json!({"note": "liquidation_clusters_unavailable"})),
    }

    let score = round6(score.clamp(-1.0, 1.0));
    let direction = if score > cfg.long_threshold {
        Direction::Long
    } else if score < cfg.short_threshold {
        Direction::Short
    } else {
        Direction::Flat
    };
    let entry = x.close;
    let (stop_loss, take_profits) = match direction {
        Direction::Long => (
            Some(entry * (1.0 - cfg.stop_loss_pct)),
            cfg.take_profit_pcts
                .iter()
                .map(|p| entry * (1.0 + p))
                .collect(),
        ),
        Direction::Short => (
            Some(entry * (1.0 + cfg.stop_loss_pct)),
            cfg.take_profit_pcts
                .iter()
                .map(|p| entry * (1.0 - p))
                .collect(),
        ),
        Direction::Flat => (None, Vec::new()),
    };
    Evaluation {
        score,
        direction,
        entry,
        stop_loss,
        take_profits,
        reasons,
        missing,
    }
}

#[cfg(test)]
mod tests;
