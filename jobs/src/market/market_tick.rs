//! `market_tick {task}`: the scheduled fan-out over the watched (symbol, timeframe)
//! pairs: distinct pairs with at least one active watcher.
//!
//! - `task = "ingest_indicators"` (every 5 minutes): one `ingest_indicators` per pair
//!   for the pair's newest closed candle as of the tick's fire time (not the clock of
//!   whichever host runs it: a fire run a little early would name the candle before),
//!   keyed by that candle (`ingest:BTC/USDT:1h:<open time>`), so a slow, repeated or
//!   overlapping tick never ingests a candle twice; a 1h pair is ingested once an hour
//!   although the tick runs every 5 minutes. The ingest catches up every candle since
//!   the last one stored, so a 1m pair loses none between ticks. The key holds for the
//!   candle's timeframe (at least an hour) and stops holding if its ingest is
//!   dead-lettered: a refused ingest never blocks the next tick's.
//! - `task = "compute_winrate"` (hourly): one `compute_winrate` per pair, keyed by
//!   this tick, so a retried tick enqueues nothing twice.
//!
//! The jobs commit with the tick's acknowledgement. With `market.source = "none"` the
//! ingest tick enqueues nothing and says so.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::compute_winrate::ComputeWinrate;
use super::config::Market;
use super::ingest_indicators::IngestIndicators;
use super::types::{Symbol, Timeframe};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    IngestIndicators,
    ComputeWinrate,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MarketTick {
    #[serde(default)]
    pub task: Task,
    /// For `compute_winrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback_days: Option<u16>,
}

impl JobArgs for MarketTick {
    const KIND: &'static str = "market_tick";
}

pub struct MarketTickHandler(pub Arc<Market>);

impl Handler for MarketTickHandler {
    type Args = MarketTick;

    async fn handle(&self, a: MarketTick, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if a.task == Task::IngestIndicators && self.0.source.is_none() {
            return Outcome::done_with(
                json!({"skipped": "no market source (market.source = \"none\")"}),
            );
        }
        let tick = ctx.job_id;
        // The instant this tick stands for: its fire, else (run by hand) the clock.
        let now = ctx.fire_at.unwrap_or_else(Utc::now);
        let tx = ctx.tx().await?;
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT symbol, timeframe FROM watchers WHERE active ORDER BY 1, 2",
        )
        .fetch_all(&mut *tx)
        .await?;
        let (mut enqueued, mut existing) = (0, 0);
        for (s, t) in pairs {
            // Rows were checked on the way in; a row that no longer parses is skipped loudly.
            let (Ok(symbol), Ok(tf)) = (s.parse::<Symbol>(), t.parse::<Timeframe>()) else {
                tracing::warn!(
                    symbol = s,
                    timeframe = t,
                    "market_tick: a watcher row does not parse; skipped"
                );
                continue;
            };
            let job = match a.task {
                Task::IngestIndicators => {
                    let candle = tf.last_closed(now);
                    let key = format!("ingest:{s}:{t}:{}", candle.timestamp());
                    let args = IngestIndicators {
                        symbol,
                        timeframe: tf,
                        backfill: None,
                        candle: Some(candle),
                    };
                    let ttl = tf
                        .duration()
                        .to_std()
                        .unwrap_or_default()
                        .max(Duration::from_secs(3600));
                    let opts = EnqueueOptions::default()
                        .key(key)
                        .ttl(ttl)
                        .free_key_when_dead();
                    enqueue_on(tx, &args, opts).await
                }
                Task::ComputeWinrate => {
                    let key = format!("winrate:{s}:{t}:{tick}");
                    let args = ComputeWinrate {
                        symbol,
                        timeframe: tf,
                        lookback_days: a.lookback_days.unwrap_or(30),
                    };
                    enqueue_on(tx, &args, EnqueueOptions::default().key(key)).await
                }
            }
            .map_err(|e| JobError::retry(e.into_sqlx()))?;
            if job.duplicate {
                existing += 1;
            } else {
                enqueued += 1;
            }
        }
        Outcome::done_with(json!({"enqueued": enqueued, "already_enqueued": existing}))
    }
}
