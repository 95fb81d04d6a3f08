//! `ingest_indicators {symbol, timeframe, candle?, backfill?}`: candles from the market
//! source, indicators computed from them, L/S ratio, liquidations and liquidation
//! clusters; then `compute_signals` for the candles it stored.
//!
//! - Only closed candles are stored and used (`open_time + timeframe <= now`): a signal
//!   is never computed on a candle that is still forming.
//! - **No candle is skipped.** Indicators are stored for every closed candle after the
//!   last one stored (a delayed job, a 1m pair under the 5-minute tick, an outage: all
//!   caught up, at most [`MAX_CATCH_UP`] candles), and `compute_signals` carries that
//!   range. A job `for` a candle (the tick's) waits until that candle has closed by
//!   this host's clock and the source serves it; a source that still lacks it after a
//!   grace period (`min(timeframe, 5 min)` past the close) is taken as a gap.
//! - **Warm-up and gaps.** The source is asked for the history the indicators need
//!   ([`warm_up`]: 50 candles for EMA(50), more if the volume or volatility windows
//!   are longer) before the first candle computed. Each row records how many
//!   contiguous candles end at it and its quality: `ok`, `gap` (a missing candle
//!   within the warm-up window) or `short_history` (the source served too little);
//!   signals carry it and win-rates leave out all but `ok`.
//! - The source's candles are validated whole before anything is written (NaN,
//!   non-positive prices, out of order): a bad answer is dead-lettered with the reason
//!   and nothing of it is stored.
//! - Everything is fetched before the transaction opens; candles, indicators,
//!   `risk_metric`, `liq_clusters` and the `compute_signals` job commit together with
//!   the job's acknowledgement. A candle or indicator row that would not change is not
//!   rewritten.
//! - The L/S ratio, liquidations and clusters are extras for the newest candle, with
//!   the time they were fetched: when one fails, the error is recorded with the
//!   candle's data and the signal's rule simply cannot fire. With nothing new to
//!   compute they are not fetched at all (the source allows 1 request/s).
//! - `backfill: N` stores indicators for the last N closed candles and has
//!   `compute_signals` evaluate them as history.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::compute_signals::ComputeSignals;
use super::config::Market;
use super::indicators::{atr, ema, macd, realised_volatility, rsi, to_horizon};
use super::source_error;
use super::strategy::{Clusters, Inputs};
use super::types::{Candle, Symbol, Timeframe};
use crate::clients::market::SourceError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestIndicators {
    pub symbol: Symbol,
    pub timeframe: Timeframe,
    /// Compute indicators and signals for this many past candles, as history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<u32>,
    /// The closed candle this ingest is for (its open time; the tick's): the job waits
    /// until it has closed and the source serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candle: Option<DateTime<Utc>>,
}

impl JobArgs for IngestIndicators {
    const KIND: &'static str = "ingest_indicators";
}

pub struct IngestIndicatorsHandler(pub Arc<Market>);

/// How far a row's indicators can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// At least [`warm_up`] contiguous candles end at this one.
    Ok,
    /// A candle is missing within the warm-up window: the indicators span a gap.
    Gap,
    /// The series starts within the warm-up window: too little history.
    ShortHistory,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Ok => "ok",
            Quality::Gap => "gap",
            Quality::ShortHistory => "short_history",
        }
    }
}

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
    /// Realised volatility per candle (the stdev of per-candle log returns); compared
    /// with thresholds only after [`to_horizon`].
    pub volatility: Option<f64>,
    /// Average volume of the `volume_window` candles before this one.
    pub volume_avg: Option<f64>,
    /// Contiguous candles ending at this one in the series it was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<u32>,
    /// Absent on rows stored before quality was recorded: read as `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
}

impl IndicatorRow {
    /// The strategy's inputs for this row, with the market data fetched beside it.
    /// Volatility is scaled to the strategy's one horizon (a day), so its thresholds
    /// mean the same on every timeframe.
    pub fn inputs(&self, tf: Timeframe, ls_ratio: Option<f64>, clusters: Clusters) -> Inputs {
        Inputs {
            open: self.open,
            close: self.close,
            volume: self.volume,
            rsi: self.rsi14,
            macd: self.macd,
            ema20: self.ema20,
            ema50: self.ema50,
            volume_avg: self.volume_avg,
            volatility: self.volatility.map(|v| to_horizon(v, tf)),
            ls_ratio,
            clusters,
        }
    }

    pub fn quality(&self) -> Quality {
        self.quality.unwrap_or(Quality::Ok)
    }
}

/// Candles of history the indicators need before a row is complete: EMA(50) has its
/// first value at the 50th candle (MACD(12,26,9) at the 34th, RSI(14) at the 15th), the
/// volume average and the volatility each need their window plus the candle itself.
pub fn warm_up(volume_window: usize, volatility_window: usize) -> usize {
    50.max(volume_window + 1).max(volatility_window + 1)
}

/// Indicator rows for every candle of a series, oldest first, each with its contiguous
/// history and quality.
pub fn indicator_rows(
    candles: &[Candle],
    tf: Timeframe,
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
    let warm = warm_up(volume_window, volatility_window);
    let mut run = 0u32;
    candles
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let contiguous =
                i > 0 && (c.open_time - candles[i - 1].open_time).num_seconds() == tf.seconds();
            run = if contiguous { run + 1 } else { 1 };
            let quality = if run as usize >= warm {
                Quality::Ok
            } else if (run as usize) < i + 1 {
                Quality::Gap
            } else {
                Quality::ShortHistory
            };
            IndicatorRow {
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
                history: Some(run),
                quality: Some(quality),
            }
        })
        .collect()
}

/// `{volatility, volatility_daily, max_drawdown, sharpe}` of a series: the realised
/// volatility of its end (per candle, and scaled to a day), the largest peak-to-trough
/// fall of its closes (a fraction), and the Sharpe ratio of its log returns (risk-free
/// rate 0) annualised for the timeframe.
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
    let vol = realised_volatility(&close, volatility_window);
    json!({
        "volatility": vol,
        "volatility_daily": vol.map(|v| to_horizon(v, tf)),
        "max_drawdown": mdd,
        "sharpe": sharpe,
        "candles": candles.len(),
    })
}

/// How long past a candle's close a job for it waits for the source to serve it.
fn grace(tf: Timeframe) -> chrono::Duration {
    tf.duration().min(chrono::Duration::minutes(5))
}

/// The most candles one ingest catches up after an outage (each closed candle since the
/// last stored one). Its own bound, not `market.backfill`: that is how much history a
/// *new* pair gets, and a fleet configured with little of it must still catch up every
/// candle it missed. A thousand candles is 16 h of 1m, 41 days of 1h; an outage longer
/// than the source's window loses candles, and the job counts them (`lost`).
pub const MAX_CATCH_UP: usize = 1000;

/// Candles asked for beyond the ones computed (the forming one among them, so one fewer
/// closed candle of history). [`warm_up`] is when
/// every indicator has a value (EMA50 at its 50th candle, seeded with a plain average);
/// 300 candles is when the seeds no longer matter (an EMA50 seed weighs (49/51)^250 ≈
/// 0.00004, RSI(14)'s far less), so a live row is computed as a backfilled one is and
/// win-rates measure what trades live. Rows are `ok` from `warm_up` on.
pub const HISTORY: usize = 300;

/// How often a job waiting for its candle asks the source again.
const SOURCE_LAG_POLL: Duration = Duration::from_secs(10);

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
        let (sym, tfs) = (symbol.to_string(), tf.as_str());
        let now = Utc::now();
        // A job for a candle that has not closed by this clock (the tick fired a little
        // early, or this host is behind) waits for the close rather than ingesting the
        // candle before it.
        if let Some(c) = a.candle {
            let closes = c + tf.duration();
            if closes > now {
                let wait = (closes - now).to_std().unwrap_or_default() + Duration::from_secs(1);
                return Outcome::snooze(wait);
            }
        }
        let stored: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(at) FROM indicators WHERE symbol = $1 AND timeframe = $2 AND source = 'internal'",
        )
        .bind(&sym)
        .bind(tfs)
        .fetch_one(ctx.pool())
        .await?;
        // Candles to compute: a backfill's count, else each closed candle after the last
        // stored one (at most [`MAX_CATCH_UP`]), else (a first ingest) the newest.
        let wanted = match (a.backfill, stored) {
            (Some(n), _) => n.max(1) as usize,
            (None, Some(s)) => (((tf.last_closed(now) - s).num_seconds() / tf.seconds()).max(1)
                as usize)
                .min(MAX_CATCH_UP),
            (None, None) => 1,
        };
        let warm = warm_up(m.cfg.strategy.volume_window, m.cfg.volatility_window);
        // The history before the first candle computed (enough for the EMAs and RSI to
        // forget their seed, not only to have a value); the source counts the candle
        // still forming among them, so 299 closed ones come before the first computed.
        let limit = wanted + warm.max(HISTORY);
        let fetched = match source.candles(symbol, tf, limit).await {
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
        let newest_served = fetched.last().map(|c| c.open_time);
        let closed: Vec<Candle> = fetched
            .into_iter()
            .filter(|c| c.open_time + tf.duration() <= now)
            .collect();
        let Some(last) = closed.last().map(|c| c.open_time) else {
            return Err(JobError::fail(format!(
                "candles: the source returned no closed {tf} candle for {symbol}"
            )));
        };
        // Closed by this host's clock is not final at the source: a candle is taken as
        // final once the source serves the next one (the forming candle), or once the
        // grace after its close has passed. Before that the source may still be
        // filling it (a tick fires the instant the candle closes), and a signal on its
        // partial close and volume would stand.
        if newest_served == Some(last) && now < last + tf.duration() + grace(tf) {
            tracing::info!(%symbol, %tf, candle = %last, "the source has not started the next candle: waiting for this one to be final");
            return Outcome::snooze(SOURCE_LAG_POLL);
        }
        let mut missing_candle = None;
        if let Some(c) = a.candle
            && last < c
        {
            if now < c + tf.duration() + grace(tf) {
                tracing::info!(%symbol, %tf, candle = %c, newest = %last, "the source does not serve the candle yet: waiting");
                return Outcome::snooze(SOURCE_LAG_POLL);
            }
            tracing::warn!(%symbol, %tf, candle = %c, newest = %last, "the source never served the candle: a gap");
            missing_candle = Some(c);
        }

        let rows = indicator_rows(
            &closed,
            tf,
            m.cfg.strategy.volume_window,
            m.cfg.volatility_window,
        );
        let first = match (a.backfill, stored) {
            (Some(n), _) => rows.len().saturating_sub(n.max(1) as usize),
            (None, Some(s)) => closed
                .iter()
                .position(|c| c.open_time > s)
                .unwrap_or(closed.len()),
            (None, None) => rows.len() - 1,
        };
        // Candles between the last stored and the first the source still serves are
        // lost for good (the source's window moved on): said, never silent.
        let lost = match (a.backfill, stored, closed.get(first)) {
            (None, Some(s), Some(c)) => ((c.open_time - s).num_seconds() / tf.seconds() - 1).max(0),
            _ => 0,
        };
        if lost > 0 {
            tracing::warn!(%symbol, %tf, lost, since = ?stored, "candles older than the source's window were never ingested");
        }
        let new = &rows[first..];
        let ats: Vec<DateTime<Utc>> = closed[first..].iter().map(|c| c.open_time).collect();
        let datas: Vec<Value> = new
            .iter()
            .map(|r| serde_json::to_value(r).expect("plain data"))
            .collect();
        let quality_counts = |q: Quality| new.iter().filter(|r| r.quality() == q).count();

        if new.is_empty() {
            upsert_candles(ctx.tx().await?, &sym, tfs, &closed).await?;
            return Outcome::done_with(json!({
                "candles": closed.len(),
                "indicators": 0,
                "at": last,
                "up_to_date": true,
                "missing_candle": missing_candle,
            }));
        }

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
        let fetched_at = Utc::now();

        let tx = ctx.tx().await?;
        upsert_candles(tx, &sym, tfs, &closed).await?;
        sqlx::query(
            r#"INSERT INTO indicators (symbol, timeframe, at, data, source)
             SELECT $1, $2, at, data, 'internal' FROM unnest($3::timestamptz[], $4::jsonb[]) AS x(at, data)
             ON CONFLICT (symbol, timeframe, at, source) DO UPDATE SET data = excluded.data
             WHERE indicators.data IS DISTINCT FROM excluded.data"#,
        )
        .bind(&sym)
        .bind(tfs)
        .bind(&ats)
        .bind(&datas)
        .execute(&mut *tx)
        .await?;
        // The source's own market data for the newest candle, and when it was fetched.
        let market = json!({
            "ls_ratio": ls_ratio,
            "liquidations": liquidations,
            "errors": errors,
            "simulated": source.simulated(),
            "fetched_at": fetched_at,
        });
        sqlx::query(
            r#"INSERT INTO indicators (symbol, timeframe, at, data, source) VALUES ($1, $2, $3, $4, 'cryptometer')
             ON CONFLICT (symbol, timeframe, at, source) DO UPDATE SET data = excluded.data"#,
        )
        .bind(&sym)
        .bind(tfs)
        .bind(last)
        .bind(&market)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            r#"INSERT INTO risk_metric (symbol, timeframe, at, metrics) VALUES ($1, $2, $3, $4)
             ON CONFLICT (symbol, timeframe, at) DO UPDATE SET metrics = excluded.metrics"#,
        )
        .bind(&sym)
        .bind(tfs)
        .bind(last)
        .bind(risk_metrics(&closed, tf, m.cfg.volatility_window))
        .execute(&mut *tx)
        .await?;
        if let Clusters::Known(cs) = &clusters {
            sqlx::query(
                r#"INSERT INTO liq_clusters (symbol, timeframe, at, clusters, fetched_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (symbol, timeframe, at) DO UPDATE SET clusters = excluded.clusters, fetched_at = excluded.fetched_at"#,
            )
            .bind(&sym)
            .bind(tfs)
            .bind(last)
            .bind(serde_json::to_value(cs).expect("plain data"))
            .bind(fetched_at)
            .execute(&mut *tx)
            .await?;
        }
        let since = (ats.len() > 1).then(|| ats[0]);
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
            at: Some(last),
            backfill: a.backfill.is_some(),
        };
        let job = enqueue_on(tx, &next, EnqueueOptions::default().key(key))
            .await
            .map_err(|e| JobError::retry(e.into_sqlx()))?;
        Outcome::done_with(json!({
            "candles": closed.len(),
            "indicators": ats.len(),
            "at": last,
            "lost": lost,
            "gap": quality_counts(Quality::Gap),
            "short_history": quality_counts(Quality::ShortHistory),
            "missing_candle": missing_candle,
            "compute_signals": job.id,
            "errors": errors,
        }))
    }
}

/// Upserts a series; a candle the source answers unchanged is not rewritten (no dead
/// tuple, no WAL).
async fn upsert_candles(
    tx: &mut sqlx::PgConnection,
    sym: &str,
    tf: &str,
    closed: &[Candle],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume)
         SELECT $1, $2, t, o, h, l, c, v FROM unnest($3::timestamptz[], $4::float8[], $5::float8[],
           $6::float8[], $7::float8[], $8::float8[]) AS x(t, o, h, l, c, v)
         ON CONFLICT (symbol, timeframe, open_time) DO UPDATE SET open = excluded.open,
           high = excluded.high, low = excluded.low, close = excluded.close, volume = excluded.volume
         WHERE (candles.open, candles.high, candles.low, candles.close, candles.volume)
           IS DISTINCT FROM (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume)"#,
    )
    .bind(sym)
    .bind(tf)
    .bind(closed.iter().map(|c| c.open_time).collect::<Vec<_>>())
    .bind(closed.iter().map(|c| c.open).collect::<Vec<_>>())
    .bind(closed.iter().map(|c| c.high).collect::<Vec<_>>())
    .bind(closed.iter().map(|c| c.low).collect::<Vec<_>>())
    .bind(closed.iter().map(|c| c.close).collect::<Vec<_>>())
    .bind(closed.iter().map(|c| c.volume).collect::<Vec<_>>())
    .execute(tx)
    .await?;
    Ok(())
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
    fn quality_marks_short_history_and_gaps_within_the_warm_up() {
        let warm = warm_up(20, 20);
        assert_eq!(warm, 50, "EMA50 is the longest");
        assert_eq!(warm_up(60, 20), 61, "a longer volume window raises it");
        let closes: Vec<f64> = (0..130).map(|i| 100.0 + (i % 7) as f64).collect();
        let mut candles = series(&closes);
        // Candle 70 is missing: 69 and 71 are two hours apart.
        candles.remove(70);
        let rows = indicator_rows(&candles, Timeframe::H1, 20, 20);
        let q = |i: usize| (rows[i].quality(), rows[i].history);
        assert_eq!(q(0), (Quality::ShortHistory, Some(1)));
        assert_eq!(q(48), (Quality::ShortHistory, Some(49)));
        assert_eq!(q(49), (Quality::Ok, Some(50)), "the 50th candle is warm");
        assert_eq!(q(69), (Quality::Ok, Some(70)));
        // After the gap the run restarts, and the rows are a gap, not short history,
        // until a whole warm-up of contiguous candles ends at them again.
        assert_eq!(q(70), (Quality::Gap, Some(1)));
        assert_eq!(q(70 + warm - 2), (Quality::Gap, Some(warm as u32 - 1)));
        assert_eq!(q(70 + warm - 1), (Quality::Ok, Some(warm as u32)));
        // Candles spaced unlike the timeframe are never contiguous.
        let rows = indicator_rows(&series(&closes)[..10], Timeframe::H4, 20, 20);
        assert!(
            rows[1..].iter().all(|r| r.quality() == Quality::Gap),
            "1 h apart is not contiguous on 4h"
        );
    }

    #[test]
    fn rows_and_risk() {
        let closes: Vec<f64> = (0..60).map(|i| 100.0 + i as f64).collect();
        let rows = indicator_rows(&series(&closes), Timeframe::H1, 20, 20);
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
