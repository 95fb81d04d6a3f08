//! The market pipeline's vocabulary: symbols, timeframes and candles, each checked
//! where it enters (a webhook, a source's answer) so nothing downstream sees a bad one.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A trading pair, stored as `BASE/QUOTE` in upper case (`BTC/USDT`). `btc-usdt` and
/// `BTC_USDT` are accepted and normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Symbol {
    base: String,
    quote: String,
}

impl Symbol {
    pub fn base(&self) -> &str {
        &self.base
    }
    pub fn quote(&self) -> &str {
        &self.quote
    }
    /// Cryptometer's `pair` parameter: `BTC-USDT`.
    pub fn pair(&self) -> String {
        format!("{}-{}", self.base, self.quote)
    }
}

impl FromStr for Symbol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("symbol {s:?} is not a pair like BTC/USDT");
        let up = s.trim().to_ascii_uppercase();
        let (base, quote) = up
            .split_once(['/', '-', '_'])
            .filter(|(b, q)| {
                (1..=20).contains(&b.len())
                    && (1..=10).contains(&q.len())
                    && b.bytes()
                        .chain(q.bytes())
                        .all(|c| c.is_ascii_alphanumeric())
            })
            .ok_or_else(bad)?;
        Ok(Symbol {
            base: base.into(),
            quote: quote.into(),
        })
    }
}

impl TryFrom<String> for Symbol {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Symbol> for String {
    fn from(s: Symbol) -> String {
        s.to_string()
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.quote)
    }
}

/// A candle length, as the spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Timeframe {
    M1,
    M5,
    M15,
    M30,
    H1,
    H4,
    D1,
    W1,
}

impl TryFrom<String> for Timeframe {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Timeframe> for String {
    fn from(t: Timeframe) -> String {
        t.as_str().into()
    }
}

impl Timeframe {
    pub const ALL: [Timeframe; 8] = [
        Self::M1,
        Self::M5,
        Self::M15,
        Self::M30,
        Self::H1,
        Self::H4,
        Self::D1,
        Self::W1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::M1 => "1m",
            Self::M5 => "5m",
            Self::M15 => "15m",
            Self::M30 => "30m",
            Self::H1 => "1h",
            Self::H4 => "4h",
            Self::D1 => "1d",
            Self::W1 => "1w",
        }
    }

    pub fn seconds(self) -> i64 {
        match self {
            Self::M1 => 60,
            Self::M5 => 300,
            Self::M15 => 900,
            Self::M30 => 1800,
            Self::H1 => 3600,
            Self::H4 => 14_400,
            Self::D1 => 86_400,
            Self::W1 => 604_800,
        }
    }

    pub fn duration(self) -> Duration {
        Duration::seconds(self.seconds())
    }

    /// The open time of the candle that contains `t`. Weeks open on Monday 00:00 UTC
    /// (as exchanges do); 1970-01-01 was a Thursday, hence the 4-day offset.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let offset = if self == Self::W1 { 4 * 86_400 } else { 0 };
        let s = t.timestamp() - offset;
        let floored = s - s.rem_euclid(self.seconds()) + offset;
        Utc.timestamp_opt(floored, 0).single().unwrap_or(t)
    }

    /// The open time of the newest candle that has closed by `now`.
    pub fn last_closed(self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.floor(now) - self.duration()
    }
}

impl FromStr for Timeframe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("timeframe {s:?} is not one of 1m, 5m, 15m, 30m, 1h, 4h, 1d, 1w")
            })
    }
}

impl fmt::Display for Timeframe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One OHLCV candle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candle {
    pub open_time: DateTime<Utc>,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
}

/// Why a source's candles were refused. The whole answer is refused: nothing of it is
/// written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CandleError {
    #[error("candle {index} ({at}): {field} is {value}, not a finite positive price")]
    BadPrice {
        index: usize,
        at: DateTime<Utc>,
        field: &'static str,
        value: f64,
    },
    #[error("candle {index} ({at}): volume is {value}, not a finite non-negative number")]
    BadVolume {
        index: usize,
        at: DateTime<Utc>,
        value: f64,
    },
    #[error("candle {index} ({at}): high {high} / low {low} do not contain open and close")]
    BadRange {
        index: usize,
        at: DateTime<Utc>,
        high: f64,
        low: f64,
    },
    #[error(
        "candle {index} opens at {at}, not after the one before it ({prev}): out of order or duplicated"
    )]
    OutOfOrder {
        index: usize,
        at: DateTime<Utc>,
        prev: DateTime<Utc>,
    },
    #[error("candle {index} opens at {at}, which is not on a {timeframe} boundary")]
    Misaligned {
        index: usize,
        at: DateTime<Utc>,
        timeframe: Timeframe,
    },
}

/// Checks a series oldest first: finite positive prices, `low ≤ open, close ≤ high`,
/// non-negative volume, open times strictly increasing and on the timeframe's grid.
pub fn validate_candles(candles: &[Candle], tf: Timeframe) -> Result<(), CandleError> {
    let mut prev: Option<DateTime<Utc>> = None;
    for (index, c) in candles.iter().enumerate() {
        let at = c.open_time;
        for (field, value) in [
            ("open", c.open),
            ("high", c.high),
            ("low", c.low),
            ("close", c.close),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(CandleError::BadPrice {
                    index,
                    at,
                    field,
                    value,
                });
            }
        }
        if !(c.volume.is_finite() && c.volume >= 0.0) {
            return Err(CandleError::BadVolume {
                index,
                at,
                value: c.volume,
            });
        }
        if c.low > c.open.min(c.close) || c.high < c.open.max(c.close) {
            return Err(CandleError::BadRange {
                index,
                at,
                high: c.high,
                low: c.low,
            });
        }
        if tf.floor(at) != at {
            return Err(CandleError::Misaligned {
                index,
                at,
                timeframe: tf,
            });
        }
        if let Some(p) = prev
            && at <= p
        {
            return Err(CandleError::OutOfOrder { index, at, prev: p });
        }
        prev = Some(at);
    }
    Ok(())
}

/// A liquidation cluster: a price level where positions of `side` would be liquidated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub price: f64,
    pub volume: f64,
    pub side: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn symbols_normalise_and_bad_ones_are_refused() {
        for s in ["BTC/USDT", "btc-usdt", "Btc_Usdt", " BTC/USDT "] {
            let sym: Symbol = s.parse().unwrap();
            assert_eq!(sym.to_string(), "BTC/USDT");
            assert_eq!(sym.pair(), "BTC-USDT");
        }
        for s in [
            "BTC",
            "/USDT",
            "BTC/",
            "BTC/US DT",
            "BTC/USDT/X",
            "BTC/ÜSDT",
            "",
        ] {
            let e = s.parse::<Symbol>().unwrap_err();
            assert!(e.contains("not a pair"), "{s}: {e}");
        }
    }

    #[test]
    fn timeframes_floor_to_their_grid() {
        let now = t("2026-11-19T13:47:12Z"); // a Thursday
        assert_eq!(Timeframe::M5.floor(now), t("2026-11-19T13:45:00Z"));
        assert_eq!(Timeframe::H4.floor(now), t("2026-11-19T12:00:00Z"));
        assert_eq!(Timeframe::D1.floor(now), t("2026-11-19T00:00:00Z"));
        assert_eq!(Timeframe::W1.floor(now), t("2026-11-16T00:00:00Z")); // Monday
        assert_eq!(Timeframe::H1.last_closed(now), t("2026-11-19T12:00:00Z"));
        assert!(
            "2h".parse::<Timeframe>()
                .unwrap_err()
                .contains("not one of")
        );
        for tf in Timeframe::ALL {
            assert_eq!(tf.as_str().parse::<Timeframe>().unwrap(), tf);
        }
    }

    fn candle(at: &str, o: f64, h: f64, l: f64, c: f64, v: f64) -> Candle {
        Candle {
            open_time: t(at),
            open: o,
            high: h,
            low: l,
            close: c,
            volume: v,
        }
    }

    #[test]
    fn candles_are_checked_whole() {
        let ok = candle("2026-11-19T12:00:00Z", 10.0, 11.0, 9.0, 10.5, 3.0);
        let next = candle("2026-11-19T13:00:00Z", 10.5, 12.0, 10.0, 11.0, 0.0);
        validate_candles(&[ok.clone(), next.clone()], Timeframe::H1).unwrap();

        let cases: Vec<(Vec<Candle>, &str)> = vec![
            (
                vec![candle(
                    "2026-11-19T12:00:00Z",
                    f64::NAN,
                    11.0,
                    9.0,
                    10.0,
                    1.0,
                )],
                "open is NaN",
            ),
            (
                vec![candle("2026-11-19T12:00:00Z", 10.0, 11.0, 9.0, -1.0, 1.0)],
                "close is -1",
            ),
            (
                vec![candle("2026-11-19T12:00:00Z", 10.0, 11.0, 0.0, 10.0, 1.0)],
                "low is 0",
            ),
            (
                vec![candle(
                    "2026-11-19T12:00:00Z",
                    10.0,
                    f64::INFINITY,
                    9.0,
                    10.0,
                    1.0,
                )],
                "high is inf",
            ),
            (
                vec![candle("2026-11-19T12:00:00Z", 10.0, 11.0, 9.0, 10.0, -5.0)],
                "volume is -5",
            ),
            (
                vec![candle("2026-11-19T12:00:00Z", 10.0, 10.2, 9.0, 10.5, 1.0)],
                "do not contain",
            ),
            (vec![next.clone(), ok.clone()], "out of order"),
            (vec![ok.clone(), ok.clone()], "out of order or duplicated"),
            (
                vec![candle("2026-11-19T12:30:00Z", 10.0, 11.0, 9.0, 10.0, 1.0)],
                "not on a 1h boundary",
            ),
        ];
        for (series, want) in cases {
            let e = validate_candles(&series, Timeframe::H1)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }
}
