//! `prune_market {older_than}` (daily; default schedule 90 days): deletes candles,
//! indicators, risk metrics and liquidation clusters older than the retention.
//! Signals and win-rates are kept: they are the strategy's record.

use std::time::Duration;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        let cutoff = crate::prune::cutoff(a.older_than)?;
        let tables = [
            ("candles", "open_time"),
            ("indicators", "at"),
            ("risk_metric", "at"),
            ("liq_clusters", "at"),
        ];
        let deleted = crate::prune::delete_before(ctx.tx().await?, cutoff, &tables).await?;
        Outcome::done_with(json!({"cutoff": cutoff, "deleted": deleted}))
    }
}
