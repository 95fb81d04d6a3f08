//! `prune_market {older_than}` (daily; default schedule 90 days): deletes candles,
//! indicators, risk metrics and liquidation clusters older than the retention.
//! Signals and win-rates are kept: they are the strategy's record.

use std::time::Duration;

use chrono::Utc;
use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneMarket {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
}

impl JobArgs for PruneMarket {
    const KIND: &'static str = "prune_market";
}

pub struct PruneMarketHandler;

impl Handler for PruneMarketHandler {
    type Args = PruneMarket;

    async fn handle(&self, a: PruneMarket, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if a.older_than < Duration::from_secs(86_400) {
            return Err(JobError::fail(
                "older_than must be at least 1d (a guard against typos)",
            ));
        }
        let cutoff =
            Utc::now() - chrono::Duration::from_std(a.older_than).map_err(JobError::fail)?;
        let tx = ctx.tx().await?;
        let mut out = serde_json::Map::new();
        for (table, column) in [
            ("candles", "open_time"),
            ("indicators", "at"),
            ("risk_metric", "at"),
            ("liq_clusters", "at"),
        ] {
            // Table and column names are the constants above.
            let n = sqlx::query(&format!("DELETE FROM {table} WHERE {column} < $1"))
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            out.insert(table.into(), json!(n));
        }
        Outcome::done_with(json!({"cutoff": cutoff, "deleted": out}))
    }
}
