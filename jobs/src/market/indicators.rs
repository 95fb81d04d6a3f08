//! Technical indicators computed from candles (SPEC-MARKET "ingest_indicators"):
//! RSI(14) with Wilder's smoothing, EMA, MACD(12,26,9), ATR(14) with Wilder's
//! smoothing, and realised volatility.
//!
//! Every function takes the series oldest first and returns one value per input
//! position, `None` until enough data has been seen (no value is ever invented from a
//! short series). Inputs must be finite; callers validate candles before this.

use super::types::Timeframe;

/// Exponential moving average with α = 2 / (period + 1), seeded with the simple
/// average of the first `period` values (the usual convention; the first value is at
/// index `period - 1`).
pub fn ema(values: &[f64], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; values.len()];
    if period == 0 || values.len() < period {
        return out;
    }
    let alpha = 2.0 / (period as f64 + 1.0);
    let mut prev = values[..period].iter().sum::<f64>() / period as f64;
    out[period - 1] = Some(prev);
    for (i, v) in values.iter().enumerate().skip(period) {
        prev = alpha * v + (1.0 - alpha) * prev;
        out[i] = Some(prev);
    }
    out
}

/// Wilder's smoothing (an EMA with α = 1 / period), seeded with the simple average of
/// the first `period` values.
fn wilder(values: &[f64], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; values.len()];
    if period == 0 || values.len() < period {
        return out;
    }
    let mut prev = values[..period].iter().sum::<f64>() / period as f64;
    out[period - 1] = Some(prev);
    for (i, v) in values.iter().enumerate().skip(period) {
        prev = (prev * (period as f64 - 1.0) + v) / period as f64;
        out[i] = Some(prev);
    }
    out
}

/// RSI with Wilder's smoothing of gains and losses. The first value is at index
/// `period` (it needs `period` changes). All gains → 100; no movement at all → 50.
pub fn rsi(closes: &[f64], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; closes.len()];
    if closes.len() <= period || period == 0 {
        return out;
    }
    let changes: Vec<f64> = closes.windows(2).map(|w| w[1] - w[0]).collect();
    let gains: Vec<f64> = changes.iter().map(|c| c.max(0.0)).collect();
    let losses: Vec<f64> = changes.iter().map(|c| (-c).max(0.0)).collect();
    let (g, l) = (wilder(&gains, period), wilder(&losses, period));
    for i in 0..changes.len() {
        if let (Some(g), Some(l)) = (g[i], l[i]) {
            out[i + 1] = Some(if l == 0.0 {
                if g == 0.0 { 50.0 } else { 100.0 }
            } else {
                100.0 - 100.0 / (1.0 + g / l)
            });
        }
    }
    out
}

/// MACD line (EMA(fast) − EMA(slow)), its signal line (EMA(signal) of the MACD line,
/// seeded once the line exists) and the histogram.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Macd {
    pub line: f64,
    pub signal: f64,
    pub histogram: f64,
}

pub fn macd(closes: &[f64], fast: usize, slow: usize, signal: usize) -> Vec<Option<Macd>> {
    let (f, s) = (ema(closes, fast), ema(closes, slow));
    let line: Vec<Option<f64>> = f.iter().zip(&s).map(|(f, s)| Some((*f)? - (*s)?)).collect();
    let start = line.iter().position(Option::is_some);
    let mut out = vec![None; closes.len()];
    let Some(start) = start else { return out };
    let defined: Vec<f64> = line[start..].iter().map(|v| v.expect("defined")).collect();
    let sig = ema(&defined, signal);
    for (k, sg) in sig.iter().enumerate() {
        if let Some(sg) = sg {
            let l = defined[k];
            out[start + k] = Some(Macd {
                line: l,
                signal: *sg,
                histogram: l - sg,
            });
        }
    }
    out
}

/// Average true range with Wilder's smoothing. The true range of the first candle is
/// its high − low; later ones also reach to the previous close.
pub fn atr(high: &[f64], low: &[f64], close: &[f64], period: usize) -> Vec<Option<f64>> {
    let n = high.len().min(low.len()).min(close.len());
    let tr: Vec<f64> = (0..n)
        .map(|i| {
            let hl = high[i] - low[i];
            if i == 0 {
                hl
            } else {
                hl.max((high[i] - close[i - 1]).abs())
                    .max((low[i] - close[i - 1]).abs())
            }
        })
        .collect();
    wilder(&tr, period)
}

/// The one horizon the strategy's volatility thresholds are stated in: a day.
pub const VOLATILITY_HORIZON: &str = "1d";
const VOLATILITY_HORIZON_SECONDS: f64 = 86_400.0;

/// A per-candle volatility scaled to [`VOLATILITY_HORIZON`] by the square-root-of-time
/// rule (log returns of independent candles add their variances):
/// `σ · √(86400 / timeframe seconds)`. A 1m σ of 0.001 is 0.038 a day, a 1w σ of 0.1 is
/// 0.038 a day: the same market, the same number, whichever chart it is read on.
pub fn to_horizon(per_candle: f64, tf: Timeframe) -> f64 {
    per_candle * (VOLATILITY_HORIZON_SECONDS / tf.seconds() as f64).sqrt()
}

/// Realised volatility: the sample standard deviation of the last `window` log
/// returns (not annualised; per candle of the series' timeframe). Thresholds compare
/// it after [`to_horizon`].
pub fn realised_volatility(closes: &[f64], window: usize) -> Option<f64> {
    if window < 2 || closes.len() < window + 1 {
        return None;
    }
    let tail = &closes[closes.len() - window - 1..];
    let r: Vec<f64> = tail.windows(2).map(|w| (w[1] / w[0]).ln()).collect();
    let mean = r.iter().sum::<f64>() / r.len() as f64;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (r.len() as f64 - 1.0);
    Some(var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatility_scales_to_one_day_on_every_timeframe() {
        // A random walk with a daily σ of 4% has per-candle σ = 0.04·√(tf/1d); scaled
        // back it is 0.04 on every timeframe (the thresholds' meaning).
        for tf in Timeframe::ALL {
            let per_candle = 0.04 * (tf.seconds() as f64 / 86_400.0).sqrt();
            assert!((to_horizon(per_candle, tf) - 0.04).abs() < 1e-12, "{tf}");
        }
        assert_eq!(to_horizon(0.05, Timeframe::D1), 0.05);
        assert!((to_horizon(0.001, Timeframe::M1) - 0.001 * 1440f64.sqrt()).abs() < 1e-15);
    }

    fn close_to(got: Option<f64>, want: f64, tol: f64) {
        let got = got.expect("a value");
        assert!((got - want).abs() <= tol, "got {got}, want {want} ± {tol}");
    }

    /// The RSI worked example of StockCharts' ChartSchool ("Relative Strength Index"),
    /// which follows Wilder's method: 33 closes, RSI(14) from the 15th. The published
    /// table rounds its first average gain and loss to 2 decimals (0.24 / 0.10), which
    /// moves its RSI by up to 0.07, so it is checked within 0.08; the unrounded values,
    /// computed independently (Python, same definitions), within 0.005.
    #[test]
    fn rsi_matches_the_published_wilder_example() {
        let closes = [
            44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03,
            45.61, 46.28, 46.28, 46.00, 46.03, 46.41, 46.22, 45.64, 46.21, 46.25, 45.71, 46.45,
            45.78, 45.35, 44.03, 44.18, 44.22, 44.57, 43.42, 42.66, 43.13,
        ];
        let want = [
            70.53, 66.32, 66.55, 69.41, 66.36, 57.97, 62.93, 63.26, 56.06, 62.38, 54.71, 50.42,
            39.99, 41.46, 41.87, 45.46, 37.30, 33.08, 37.77,
        ];
        let exact = [
            70.46, 66.25, 66.48, 69.35, 66.29, 57.92, 62.88, 63.21, 56.01, 62.34, 54.67, 50.39,
            40.02, 41.49, 41.90, 45.50, 37.32, 33.09, 37.79,
        ];
        let got = rsi(&closes, 14);
        assert!(got[..14].iter().all(Option::is_none));
        for (k, (w, x)) in want.iter().zip(exact).enumerate() {
            close_to(got[14 + k], *w, 0.08);
            close_to(got[14 + k], x, 0.005);
        }
        // Degenerate series: only gains, no movement.
        let up: Vec<f64> = (0..20).map(f64::from).collect();
        assert_eq!(rsi(&up, 14)[19], Some(100.0));
        assert_eq!(rsi(&[5.0; 20], 14)[19], Some(50.0));
        assert!(rsi(&closes[..14], 14).iter().all(Option::is_none));
    }

    /// EMA(10) of StockCharts' "Moving Averages" example (22 closes, published to 2
    /// decimals; tolerance 0.01).
    #[test]
    fn ema_matches_the_published_example() {
        let closes = [
            22.27, 22.19, 22.08, 22.17, 22.18, 22.13, 22.23, 22.43, 22.24, 22.29, 22.15, 22.39,
            22.38, 22.61, 23.36, 24.05, 23.75, 23.83, 23.95, 23.63, 23.82, 23.87,
        ];
        let want = [
            22.22, 22.21, 22.24, 22.27, 22.33, 22.52, 22.80, 22.97, 23.13, 23.28, 23.34, 23.43,
            23.51,
        ];
        let got = ema(&closes, 10);
        assert!(got[..9].iter().all(Option::is_none));
        for (k, w) in want.iter().enumerate() {
            close_to(got[9 + k], *w, 0.01);
        }
    }

    /// MACD(12,26,9) on a fixed series, against values computed independently (a
    /// separate Python implementation of the same definitions, run once; numbers
    /// checked in to 6 decimals, tolerance 1e-6).
    #[test]
    fn macd_matches_independently_computed_values() {
        let closes: Vec<f64> = (0..40)
            .map(|i| 100.0 + (i as f64 * 0.7).sin() * 5.0 + i as f64 * 0.3)
            .collect();
        let got = macd(&closes, 12, 26, 9);
        assert!(
            got[..33].iter().all(Option::is_none),
            "line from 25, signal from 33"
        );
        let m = got[39].unwrap();
        close_to(Some(m.line), MACD_LINE_39, 1e-6);
        close_to(Some(m.signal), MACD_SIGNAL_39, 1e-6);
        assert!(got[33].is_some());
        close_to(Some(m.histogram), MACD_LINE_39 - MACD_SIGNAL_39, 1e-6);
    }

    const MACD_LINE_39: f64 = 2.551_997_945;
    const MACD_SIGNAL_39: f64 = 1.913_378_430;

    /// A hand-checkable series: constant ranges of 2 with no gaps → ATR 2; a gap makes
    /// the true range reach to the previous close, smoothed in Wilder's way.
    #[test]
    fn atr_uses_true_range_and_wilder_smoothing() {
        let high = [11.0; 20];
        let low = [9.0; 20];
        let close = [10.0; 20];
        let a = atr(&high, &low, &close, 14);
        assert!(a[..13].iter().all(Option::is_none));
        close_to(a[13], 2.0, 1e-12);
        // A gap up: high 15, low 13 after a close of 10 → true range 5.
        let mut h = high.to_vec();
        let mut l = low.to_vec();
        h[14] = 15.0;
        l[14] = 13.0;
        let a = atr(&h, &l, &close, 14);
        close_to(a[14], (2.0 * 13.0 + 5.0) / 14.0, 1e-12);
    }

    #[test]
    fn realised_volatility_is_the_stdev_of_log_returns() {
        // Alternating ±10% moves: log returns ln(1.1), ln(1/1.1), …
        let mut closes = vec![100.0];
        for i in 0..20 {
            let last = *closes.last().unwrap();
            closes.push(if i % 2 == 0 { last * 1.1 } else { last / 1.1 });
        }
        let r = 1.1f64.ln();
        // 20 returns, mean 0, each ±r → sample stdev r * sqrt(20/19).
        close_to(
            realised_volatility(&closes, 20),
            r * (20.0f64 / 19.0).sqrt(),
            1e-12,
        );
        assert_eq!(realised_volatility(&closes[..5], 20), None);
        assert_eq!(realised_volatility(&[100.0; 30], 20), Some(0.0));
    }
}
