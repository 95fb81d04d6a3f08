//! `compute_winrate {symbol, timeframe, lookback_days = 30}` (hourly, fanned out by
//! `market_tick {task: "compute_winrate"}`): how often the strategy's directional
//! signals of the last `lookback_days` were right.
//!
//! A signal's outcome is the close of the candle of its (symbol, timeframe) opening
//! exactly one horizon after the signal's candle: `market.winrate.horizon` (4 h)
//! rounded up to whole candles of the timeframe (4 h on 1m..4h, one candle on 1d and
//! 1w), stated in `params` (`horizon_seconds`, `horizon_candles`). A long wins above
//! +`threshold` (1%), a short below −threshold, both measured from the entry price.
//! Not counted, each counted in `params`: `pending` (the outcome candle is not stored
//! and nothing after it is), `gap` (it is missing but later candles are stored: the
//! outcome is unknown, never read from another candle), `excluded_quality` (signals
//! computed across a gap or on too little history), and flat signals
//! (`flat_excluded`). With no sample the win-rate is NULL. The lookback is capped at
//! `market.retention` (candles older than that are pruned): `lookback_days_used`.
//! Upserted per (symbol, timeframe, lookback_days, strategy version).

use std::sync::Arc;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::Market;
use super::types::{Symbol, Timeframe};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeWinrate {
    pub symbol: Symbol,
    pub timeframe: Timeframe,
    #[serde(default = "thirty")]
    pub lookback_days: u16,
}

fn thirty() -> u16 {
    30
}

impl JobArgs for ComputeWinrate {
    const KIND: &'static str = "compute_winrate";
}

pub struct ComputeWinrateHandler(pub Arc<Market>);

impl Handler for ComputeWinrateHandler {
    type Args = ComputeWinrate;

    async fn handle(&self, a: ComputeWinrate, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if a.lookback_days == 0 {
            return Err(JobError::fail("lookback_days must be positive"));
        }
        let m = &self.0.cfg;
        let (horizon, horizon_candles) = m.winrate.horizon_for(a.timeframe);
        let retention_days = (m.retention.as_secs() / 86_400).max(1) as i32;
        let lookback = (a.lookback_days as i32).min(retention_days);
        let tx = ctx.tx().await?;
        let row: Value = sqlx::query_scalar(
            r#"WITH s AS (
               SELECT s.direction, s.entry_price,
                 coalesce(s.metadata->>'quality', 'ok') = 'ok' AS sound,
                 (SELECT c.close FROM candles c WHERE c.symbol = s.symbol AND c.timeframe = s.timeframe
                    AND c.open_time = s.at + make_interval(secs => $5)) AS outcome,
                 EXISTS (SELECT 1 FROM candles c WHERE c.symbol = s.symbol AND c.timeframe = s.timeframe
                    AND c.open_time > s.at + make_interval(secs => $5)) AS later
               FROM signals s
               WHERE s.symbol = $1 AND s.timeframe = $2 AND s.strategy_version = $3
                 AND s.at >= now() - make_interval(days => $4)),
             k AS (
               SELECT CASE WHEN sound THEN direction ELSE 'unsound' END AS direction,
                 outcome IS NOT NULL AS known, outcome IS NULL AND later AS gap,
                 CASE direction WHEN 'long' THEN outcome > entry_price * (1 + $6::numeric)
                                WHEN 'short' THEN outcome < entry_price * (1 - $6::numeric) END AS won
               FROM s)
             SELECT jsonb_build_object(
               'sample_size', count(*) FILTER (WHERE direction IN ('long', 'short') AND known),
               'wins', count(*) FILTER (WHERE direction IN ('long', 'short') AND known AND won),
               'long_sample', count(*) FILTER (WHERE direction = 'long' AND known),
               'long_wins', count(*) FILTER (WHERE direction = 'long' AND known AND won),
               'short_sample', count(*) FILTER (WHERE direction = 'short' AND known),
               'short_wins', count(*) FILTER (WHERE direction = 'short' AND known AND won),
               'flat_excluded', count(*) FILTER (WHERE direction = 'flat'),
               'excluded_quality', count(*) FILTER (WHERE direction = 'unsound'),
               'gap', count(*) FILTER (WHERE direction IN ('long', 'short') AND gap),
               'pending', count(*) FILTER (WHERE direction IN ('long', 'short') AND NOT known AND NOT gap)) FROM k"#,
        )
        .bind(a.symbol.to_string())
        .bind(a.timeframe.as_str())
        .bind(&m.strategy.version)
        .bind(lookback)
        .bind(horizon as f64)
        .bind(m.winrate.threshold)
        .fetch_one(&mut *tx)
        .await?;
        let n = |k: &str| row[k].as_i64().unwrap_or(0);
        let (sample, wins) = (n("sample_size"), n("wins"));
        let rate = (sample > 0).then(|| wins as f64 / sample as f64);
        let mut params = row.clone();
        params["horizon_seconds"] = json!(horizon);
        params["horizon_candles"] = json!(horizon_candles);
        params["lookback_days_used"] = json!(lookback);
        params["threshold"] = json!(m.winrate.threshold);
        sqlx::query(
            r#"INSERT INTO win_rate (symbol, timeframe, lookback_days, strategy_version, win_rate, sample_size, params, computed_at)
             VALUES ($1, $2, $3, $4, $5::float8, $6, $7, now())
             ON CONFLICT (symbol, timeframe, lookback_days, strategy_version) DO UPDATE SET
               win_rate = excluded.win_rate, sample_size = excluded.sample_size, params = excluded.params,
               computed_at = excluded.computed_at"#,
        )
        .bind(a.symbol.to_string())
        .bind(a.timeframe.as_str())
        .bind(a.lookback_days as i32)
        .bind(&m.strategy.version)
        .bind(rate)
        .bind(sample as i32)
        .bind(&params)
        .execute(&mut *tx)
        .await?;
        Outcome::done_with(json!({"win_rate": rate, "sample_size": sample, "wins": wins}))
    }
}
