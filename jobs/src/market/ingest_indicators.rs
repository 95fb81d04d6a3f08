//! `ingest_indicators {symbol, timeframe, backfill?}`: candles from the market source,
//! indicators computed from them, L/S ratio, liquidations and liquidation clusters;
//! then `compute_signals`.
//!
//! - Only closed candles are stored and used (`open_time + timeframe <= now`): a signal
//!   is never computed on a candle that is still forming.
//! - The source's candles are validated whole before anything is written (NaN,
//!   non-positive prices, out of order): a bad answer is dead-lettered with the reason
//!   and nothing of it is stored.
//! - Everything is fetched before the transaction opens; candles, indicators,
//!   `risk_metric`, `liq_clusters` and the `compute_signals` job commit together with
//!   the job's acknowledgement.
//! - The L/S ratio, liquidations and clusters are extras: when one fails, the error is
//!   recorded with the candle's data and the signal's rule simply cannot fire.
//! - `backfill: N` stores indicators for the last N closed candles (not only the
//!   newest) and has `compute_signals` evaluate all of them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::compute_signals::ComputeSignals;
use super::config::Market;
use super::indicators::{atr, ema, macd, realised_volatility, rsi};
use super::source_error;
use super::strategy::{Clusters, Inputs};
use super::types::{Candle, Symbol, Timeframe};
use crate::clients::market::SourceError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestIndicators {
    pub symbol: Symbol,
    pub timeframe: Timeframe,
    /// Compute indicators and signals for this many past candles, not only the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<u32>,
}

impl JobArgs for IngestIndicators {
    const KIND: &'static str = "ingest_indicators";
}

pub struct IngestIndicatorsHandler(pub Arc<Market>);

/// The indicator values of one candle, as stored in `indicators.data` (source
/// `internal`). Missing values are `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndicatorRow {
    pub open: f64,
    pub close: f64,
    pub volume: f64,
    pub rsi14: Option<f64>,
    pub macd: Option<super::indicators::Macd>,
    pub ema20: Option<f64>,
    pub ema50: Option<f64>,
    pub atr14: Option<f64>,
    pub volatility: Option<f64>,
    /// Average volume of the `volume_window` candles before this one.
    pub volume_avg: Option<f64>,
}

impl IndicatorRow {
    /// The strategy's inputs for this row, with the market data fetched beside it.
    pub fn inputs(&self, ls_ratio: Option<f64>, clusters: Clusters) -> Inputs {
        Inputs {
            open: self.open,
            close: self.close,
            volume: self.volume,
            rsi: self.rsi14,
            macd: self.macd,
            ema20: self.ema20,
            ema50: self.ema50,
            volume_avg: self.volume_avg,
            volatility: self.volatility,
            ls_ratio,
            clusters,
        }
    }
}

/// Indicator rows for every candle of a series, oldest first.
pub fn indicator_rows(
    candles: &[Candle],
    volume_window: usize,
    volatility_window: usize,
) -> Vec<IndicatorRow> {
    let close: Vec<f64> = candles.iter().map(|c| c.close).collect();
    let high: Vec<f64> = candles.iter().map(|c| c.high).collect();
    let low: Vec<f64> = candles.iter().map(|c| c.low).collect();
    let (r, m, e20, e50, a) = (
        rsi(&close, 14),
        macd(&close, 12, 26, 9),
        ema(&close, 20),
        ema(&close, 50),
        atr(&high, &low, &close, 14),
    );
    candles
        .iter()
        .enumerate()
        .map(|(i, c)| IndicatorRow {
            open: c.open,
            close: c.close,
            volume: c.volume,
            rsi14: r[i],
            macd: m[i],
            ema20: e20[i],
            ema50: e50[i],
            atr14: a[i],
            volatility: realised_volatility(&close[..=i], volatility_window),
            volume_avg: (i >= volume_window && volume_window > 0).then(|| {
                candles[i - volume_window..i]
                    .iter()
                    .map(|c| c.volume)
                    .sum::<f64>()
                    / volume_window as f64
            }),
        })
        .collect()
}

/// `{volatility, max_drawdown, sharpe}` of a series: the realised volatility of its
/// end, the largest peak-to-trough fall of its closes (a fraction), and the Sharpe
/// ratio of its log returns (risk-free rate 0) annualised for the timeframe.
pub fn risk_metrics(candles: &[Candle], tf: Timeframe, volatility_window: usize) -> Value {
    let close: Vec<f64> = candles.iter().map(|c| c.close).collect();
    let mut peak = f64::MIN;
    let mut mdd = 0f64;
    for c in &close {
        peak = peak.max(*c);
        mdd = mdd.max((peak - c) / peak);
    }
    let r: Vec<f64> = close.windows(2).map(|w| (w[1] / w[0]).ln()).collect();
    let sharpe = (r.len() >= 2).then(|| {
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        let sd =
            (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (r.len() as f64 - 1.0)).sqrt();
        let per_year = (365.0 * 86_400.0 / tf.seconds() as f64).sqrt();
        if sd > 0.0 { mean / sd * per_year } else { 0.0 }
    });
    json!({
        "volatility": realised_volatility(&close, volatility_window),
        "max_drawdown": mdd,
        "sharpe": sharpe,
        "candles": candles.len(),
    })
}

impl Handler for IngestIndicatorsHandler {
    type Args = IngestIndicators;

    async fn handle(&self, a: IngestIndicators, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let m = &self.0;
        m.describe_once();
        let Some(source) = m.source.clone() else {
            return Err(JobError::fail(
                "no market source is configured (market.source = \"none\")",
            ));
        };
        let (symbol, tf) = (&a.symbol, a.timeframe);
        let fetched = match source.candles(symbol, tf).await {
            Ok(c) => c,
            Err(SourceError::Transient {
                retry_after: Some(after),
                message,
            }) => {
                tracing::warn!(%symbol, %tf, error = %message, ?after, "market source asks to wait: snoozing");
                return Outcome::snooze(after);
            }
            Err(e) => return Err(source_error("candles", e)),
        };
        let now = Utc::now();
        let closed: Vec<Candle> = fetched
            .into_iter()
            .filter(|c| c.open_time + tf.duration() <= now)
            .collect();
        let Some(last) = closed.last().map(|c| c.open_time) else {
            return Err(JobError::fail(format!(
                "candles: the source returned no closed {tf} candle for {symbol}"
            )));
        };

        let extra_error = |what: &str, e: SourceError| {
            tracing::warn!(%symbol, %tf, error = %e, "{what} unavailable; signals go without it");
            Value::String(e.to_string())
        };
        let mut errors = serde_json::Map::new();
        let ls_ratio = source.ls_ratio(symbol, tf).await.unwrap_or_else(|e| {
            errors.insert("ls_ratio".into(), extra_error("L/S ratio", e));
            None
        });
        let liquidations = source.liquidations(symbol).await.unwrap_or_else(|e| {
            errors.insert("liquidations".into(), extra_error("liquidations", e));
            None
        });
        let clusters = match &m.clusters {
            None => Clusters::NotConfigured,
            Some(c) => match c.clusters(symbol).await {
                Ok(cs) => Clusters::Known(cs),
                Err(e) => {
                    errors.insert("clusters".into(), extra_error("liquidation clusters", e));
                    Clusters::Unavailable
                }
            },
        };

        let rows = indicator_rows(
            &closed,
            m.cfg.strategy.volume_window,
            m.cfg.volatility_window,
        );
        let keep = a.backfill.unwrap_or(1).max(1) as usize;
        let first = rows.len().saturating_sub(keep);
        let ats: Vec<DateTime<Utc>> = closed[first..].iter().map(|c| c.open_time).collect();
        let datas: Vec<Value> = rows[first..]
            .iter()
            .map(|r| serde_json::to_value(r).expect("plain data"))
            .collect();

        let (sym, tfs) = (symbol.to_string(), tf.as_str());
        let tx = ctx.tx().await?;
        sqlx::query(
            "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume) \
             SELECT $1, $2, t, o, h, l, c, v FROM unnest($3::timestamptz[], $4::float8[], $5::float8[], \
               $6::float8[], $7::float8[], $8::float8[]) AS x(t, o, h, l, c, v) \
             ON CONFLICT (symbol, timeframe, open_time) DO UPDATE SET open = excluded.open, \
               high = excluded.high, low = excluded.low, close = excluded.close, volume = excluded.volume",
        )
        .bind(&sym)
        .bind(tfs)
        .bind(closed.iter().map(|c| c.open_time).collect::<Vec<_>>())
        .bind(closed.iter().map(|c| c.open).collect::<Vec<_>>())
        .bind(closed.iter().map(|c| c.high).collect::<Vec<_>>())
        .bind(closed.iter().map(|c| c.low).collect::<Vec<_>>())
        .bind(closed.iter().map(|c| c.close).collect::<Vec<_>>())
        .bind(closed.iter().map(|c| c.volume).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO indicators (symbol, timeframe, at, data, source) \
             SELECT $1, $2, at, data, 'internal' FROM unnest($3::timestamptz[], $4::jsonb[]) AS x(at, data) \
             ON CONFLICT (symbol, timeframe, at, source) DO UPDATE SET data = excluded.data",
        )
        .bind(&sym)
        .bind(tfs)
        .bind(&ats)
        .bind(&datas)
        .execute(&mut *tx)
        .await?;
        // The source's own market data for the newest candle.
        let market = json!({
            "ls_ratio": ls_ratio,
            "liquidations": liquidations,
            "errors": errors,
            "simulated": source.simulated(),
        });
        sqlx::query(
            "INSERT INTO indicators (symbol, timeframe, at, data, source) VALUES ($1, $2, $3, $4, 'cryptometer') \
             ON CONFLICT (symbol, timeframe, at, source) DO UPDATE SET data = excluded.data",
        )
        .bind(&sym)
        .bind(tfs)
        .bind(last)
        .bind(&market)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO risk_metric (symbol, timeframe, at, metrics) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (symbol, timeframe, at) DO UPDATE SET metrics = excluded.metrics",
        )
        .bind(&sym)
        .bind(tfs)
        .bind(last)
        .bind(risk_metrics(&closed, tf, m.cfg.volatility_window))
        .execute(&mut *tx)
        .await?;
        if let Clusters::Known(cs) = &clusters {
            sqlx::query(
                "INSERT INTO liq_clusters (symbol, at, clusters) VALUES ($1, $2, $3) \
                 ON CONFLICT (symbol, at) DO UPDATE SET clusters = excluded.clusters",
            )
            .bind(&sym)
            .bind(last)
            .bind(serde_json::to_value(cs).expect("plain data"))
            .execute(&mut *tx)
            .await?;
        }
        let since = (keep > 1).then(|| ats[0]);
        let key = match since {
            Some(s) => format!(
                "signals:{sym}:{tfs}:{}:since:{}",
                last.timestamp(),
                s.timestamp()
            ),
            None => format!("signals:{sym}:{tfs}:{}", last.timestamp()),
        };
        let next = ComputeSignals {
            symbol: symbol.clone(),
            timeframe: tf,
            since,
        };
        let job = enqueue_on(tx, &next, EnqueueOptions::default().key(key))
            .await
            .map_err(|e| JobError::retry(e.into_sqlx()))?;
        Outcome::done_with(json!({
            "candles": closed.len(),
            "indicators": ats.len(),
            "at": last,
            "compute_signals": job.id,
            "errors": errors,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn series(closes: &[f64]) -> Vec<Candle> {
        closes
            .iter()
            .enumerate()
            .map(|(i, c)| Candle {
                open_time: Utc.timestamp_opt(i as i64 * 3600, 0).unwrap(),
                open: *c,
                high: c * 1.01,
                low: c * 0.99,
                close: *c,
                volume: if i == closes.len() - 1 { 50.0 } else { 10.0 },
            })
            .collect()
    }

    #[test]
    fn rows_and_risk() {
        let closes: Vec<f64> = (0..60).map(|i| 100.0 + i as f64).collect();
        let rows = indicator_rows(&series(&closes), 20, 20);
        let last = rows.last().unwrap();
        assert!(last.ema20.unwrap() > last.ema50.unwrap(), "a steady rise");
        assert_eq!(last.rsi14, Some(100.0), "only gains");
        assert_eq!(
            last.volume_avg,
            Some(10.0),
            "the window before the last candle"
        );
        assert!(rows[19].volume_avg.is_none() && rows[20].volume_avg.is_some());
        assert!(rows[48].ema50.is_none() && rows[49].ema50.is_some());

        let down = series(&[100.0, 120.0, 90.0, 110.0, 60.0, 80.0]);
        let r = risk_metrics(&down, Timeframe::H1, 3);
        assert!(
            (r["max_drawdown"].as_f64().unwrap() - 0.5).abs() < 1e-12,
            "120 → 60"
        );
        assert!(r["volatility"].as_f64().unwrap() > 0.0);
        assert_eq!(r["candles"], json!(6));
    }
}
