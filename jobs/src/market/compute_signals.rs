//! `compute_signals {symbol, timeframe, at?, since?, backfill?}`: strategy v1 on the
//! stored indicators, with the doubling guardrails, into `signals`.
//!
//! The job carries its candles: every indicators row from `since` (or `at` alone) to
//! `at` that has no signal of this strategy version yet, oldest first; a live job also
//! fills any unsignalled candle of the last `MAX_CATCH_UP` before them, as history. A job without
//! `at` (enqueued before it existed) evaluates the newest row, or every row from
//! `since` on as a backfill. `backfill: true` marks history: its doublings count within
//! the job, never in the live position. A signal is written once per (symbol,
//! timeframe, candle, version): a repeated job changes nothing. Signals commit with the
//! job's acknowledgement.
//!
//! Each signal's metadata says what it was computed on: `quality` (`ok`, `gap`,
//! `short_history`; win-rates count only `ok`), `volatility` (per candle and scaled to
//! the one-day horizon the thresholds are in), and `stale` (extras fetched more than
//! [`stale_after`] after the candle closed, which are not that candle's and are left
//! out).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::Market;
use super::guardrails::{Position, Previous, doubling};
use super::indicators::VOLATILITY_HORIZON;
use super::ingest_indicators::{IndicatorRow, MAX_CATCH_UP};
use super::strategy::{Clusters, Direction, evaluate, round6};
use super::types::{Cluster, Symbol, Timeframe};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeSignals {
    pub symbol: Symbol,
    pub timeframe: Timeframe,
    /// The first candle to evaluate; absent: `at` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// The newest candle to evaluate (the ingest's newest stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// History, not the live position (a watcher's backfill).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backfill: bool,
}

/// Market data fetched later than this after a candle closed describes a later market
/// than that candle's: one timeframe, at least the 10 minutes a tick's catch-up takes.
pub fn stale_after(tf: Timeframe) -> chrono::Duration {
    tf.duration().max(chrono::Duration::minutes(10))
}

impl JobArgs for ComputeSignals {
    const KIND: &'static str = "compute_signals";
}

pub struct ComputeSignalsHandler(pub Arc<Market>);

type Row = (
    DateTime<Utc>,
    Value,
    Option<Value>,
    Option<Value>,
    Option<DateTime<Utc>>,
);

impl Handler for ComputeSignalsHandler {
    type Args = ComputeSignals;

    async fn handle(&self, a: ComputeSignals, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let m = &self.0;
        let (strategy, guard) = (&m.cfg.strategy, &m.cfg.guardrails);
        let (sym, tf) = (a.symbol.to_string(), a.timeframe.as_str());
        // A job from before `at` existed with `since` was a backfill.
        let history = a.backfill || (a.since.is_some() && a.at.is_none());
        let tx = ctx.tx().await?;
        // One evaluator per symbol at a time: "the previous signal" must be settled.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($2 || $1))")
            .bind(&sym)
            .bind(crate::locks::SIGNALS_NS)
            .execute(&mut *tx)
            .await?;
        // A live job also evaluates every candle before its own that has indicators but
        // no signal (up to MAX_CATCH_UP candles back), oldest first: a job that was
        // dead-lettered, or is still in backoff, leaves no hole the next one does not
        // fill, and "the previous signal" is always settled before a candle is judged.
        let repair_from = match a.at {
            Some(at) if !history => Some(at - a.timeframe.duration() * MAX_CATCH_UP as i32),
            _ => None,
        };
        let mut unreadable = Vec::new();
        let rows: Vec<Row> = sqlx::query_as(
            r#"SELECT i.at, i.data, x.data, l.clusters, l.fetched_at FROM indicators i
             LEFT JOIN indicators x ON x.symbol = i.symbol AND x.timeframe = i.timeframe AND x.at = i.at AND x.source = 'cryptometer'
             LEFT JOIN liq_clusters l ON l.symbol = i.symbol AND l.timeframe = i.timeframe AND l.at = i.at
             WHERE i.symbol = $1 AND i.timeframe = $2 AND i.source = 'internal'
               AND i.at >= coalesce(least($3::timestamptz, $6::timestamptz), $5::timestamptz,
                     (SELECT max(at) FROM indicators WHERE symbol = $1 AND timeframe = $2 AND source = 'internal'))
               AND ($5::timestamptz IS NULL OR i.at <= $5)
               AND NOT EXISTS (SELECT 1 FROM signals s WHERE s.symbol = i.symbol AND s.timeframe = i.timeframe AND s.at = i.at AND s.strategy_version = $4)
             ORDER BY i.at"#,
        )
        .bind(&sym)
        .bind(tf)
        .bind(a.since)
        .bind(&strategy.version)
        .bind(a.at)
        .bind(repair_from)
        .fetch_all(&mut *tx)
        .await?;
        let position: Option<(f64, f64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT size::float8, portfolio_value::float8, last_increase_at FROM positions WHERE symbol = $1",
        )
        .bind(&sym)
        .fetch_optional(&mut *tx)
        .await?;
        let mut position = position.map(|(size, portfolio_value, last_increase_at)| Position {
            size,
            portfolio_value,
            last_increase_at,
        });
        let mut counts = json!({"long": 0, "short": 0, "flat": 0});
        for (at, data, market, clusters, clusters_fetched_at) in rows {
            // Only the job's own candle is live: catch-up rows before it (candles missed
            // during an outage) are past, and doubling on them now would act on old
            // news and pass the cooldown once per missed candle.
            let history = history || a.at.is_some_and(|newest| at < newest);
            let ind: IndicatorRow = match serde_json::from_value(data) {
                Ok(ind) => ind,
                // An earlier candle's unreadable row must not stop every later job
                // that repairs holes: said, counted and left unsignalled.
                Err(e) if a.at.is_some_and(|newest| at < newest) => {
                    tracing::warn!(symbol = %sym, timeframe = tf, %at, error = %e, "unreadable indicators row: no signal for it");
                    unreadable.push(at);
                    continue;
                }
                Err(e) => return Err(JobError::fail(format!("indicators at {at}: {e}"))),
            };
            let market = market.unwrap_or(Value::Null);
            let closed_at = at + a.timeframe.duration();
            // A job that runs long after its candle closed (a quota retry, a backlog)
            // evaluates it as history: doubling now would act at a stale price and start
            // a cooldown that refuses the fresh candle after it.
            let late = !history && Utc::now() > closed_at + stale_after(a.timeframe);
            let history = history || late;
            let fresh = |t: Option<DateTime<Utc>>| {
                t.is_none_or(|t| t <= closed_at + stale_after(a.timeframe))
            };
            let mut stale = Vec::new();
            let market_fetched_at = market
                .get("fetched_at")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<DateTime<Utc>>().ok());
            let ls_ratio = market.get("ls_ratio").and_then(Value::as_f64);
            let ls_ratio = if ls_ratio.is_some() && !fresh(market_fetched_at) {
                stale.push("ls_ratio");
                None
            } else {
                ls_ratio
            };
            let clusters = match clusters {
                Some(_) if !fresh(clusters_fetched_at) => {
                    stale.push("clusters");
                    Clusters::Unavailable
                }
                Some(c) => Clusters::Known(
                    serde_json::from_value::<Vec<Cluster>>(c)
                        .map_err(|e| JobError::fail(format!("liq_clusters at {at}: {e}")))?,
                ),
                None if m.clusters.is_some() => Clusters::Unavailable,
                None => Clusters::NotConfigured,
            };
            let inputs = ind.inputs(a.timeframe, ls_ratio, clusters);
            let e = evaluate(strategy, &inputs);
            let score = round6(e.score.abs());
            // The previous signal of this timeframe (another timeframe's is another
            // view) pointing the same way: a long's conviction is measured against the
            // last long, whatever flats came between; with none, it rose from nothing.
            let previous: Option<(i64, f64)> = sqlx::query_as(
                r#"SELECT id, score::float8 FROM signals WHERE symbol = $1 AND strategy_version = $2 AND at < $3
                   AND timeframe = $4 AND direction = $5
                 ORDER BY at DESC, id DESC LIMIT 1"#,
            )
            .bind(&sym)
            .bind(&strategy.version)
            .bind(at)
            .bind(tf)
            .bind(e.direction.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let previous = previous.map(|(id, score)| Previous { id, score });
            // A candle's signal is known when the candle closes: the cooldown is counted
            // between close times (`closed_at`), which order the timeframes of one
            // position rightly (a day's candle opens a day before its signal exists).
            let guardrails = doubling(
                guard,
                e.direction,
                score,
                inputs.volatility,
                previous.as_ref(),
                position.as_ref(),
                // The candle's close, not the clock: a backfill judges each candle
                // against the doublings before it.
                closed_at,
            );
            let allowed = guardrails["allowed"] == Value::Bool(true);
            let metadata = json!({
                "signed_score": round6(e.score),
                "guardrails": guardrails,
                "missing": e.missing,
                "quality": ind.quality().as_str(),
                "history": ind.history,
                "live": !history,
                "late": late,
                "volatility": {
                    "per_candle": ind.volatility,
                    "value": inputs.volatility,
                    "horizon": VOLATILITY_HORIZON,
                },
                "stale": stale,
                "simulated": market.get("simulated").cloned().unwrap_or(Value::Bool(false)),
            });
            let inserted = sqlx::query(
                r#"INSERT INTO signals (symbol, timeframe, at, direction, score, entry_price, stop_loss, take_profit,
                   confidence, reasons, strategy_version, metadata)
                 VALUES ($1, $2, $3, $4, $5::float8, $6::float8, $7::float8, $8::float8[]::numeric[], $5::float8, $9, $10, $11)
                 ON CONFLICT (symbol, timeframe, at, strategy_version) DO NOTHING"#,
            )
            .bind(&sym)
            .bind(tf)
            .bind(at)
            .bind(e.direction.as_str())
            .bind(score)
            .bind(e.entry)
            .bind(e.stop_loss)
            .bind(&e.take_profits)
            .bind(Value::Array(e.reasons.clone()))
            .bind(&strategy.version)
            .bind(&metadata)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // An allowed doubling of a signal just written starts the cooldown (for the
            // candles after it in this job too). A backfill's doublings are history: they
            // count within the job, never in the live position.
            if allowed && inserted == 1 {
                if !history {
                    sqlx::query(
                        "UPDATE positions SET last_increase_at = greatest(last_increase_at, $2) WHERE symbol = $1",
                    )
                    .bind(&sym)
                    .bind(closed_at)
                    .execute(&mut *tx)
                    .await?;
                }
                if let Some(p) = position.as_mut() {
                    p.last_increase_at =
                        Some(p.last_increase_at.map_or(closed_at, |l| l.max(closed_at)));
                }
            }
            let k = e.direction.as_str();
            counts[k] = json!(counts[k].as_i64().unwrap_or(0) + 1);
            if e.direction != Direction::Flat && !history {
                tracing::info!(symbol = %sym, timeframe = tf, %at, direction = k, score, "signal");
            }
        }
        Outcome::done_with(
            json!({"signals": counts, "strategy": strategy.version, "unreadable": unreadable}),
        )
    }
}
