//! `prune_market {older_than?}` (daily; default `market.retention`, 90 days): deletes
//! candles, indicators, risk metrics, liquidation clusters and watcher tombstones older
//! than the retention, in bounded batches. Signals and win-rates are kept: they are the
//! strategy's record. (A tombstone outlives any webhook retry by months.)

use std::sync::Arc;
use std::time::Duration;

use super::config::Market;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneMarket {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub older_than: Option<Duration>,
}

impl JobArgs for PruneMarket {
    const KIND: &'static str = "prune_market";
}

pub struct PruneMarketHandler(pub Arc<Market>);

impl Handler for PruneMarketHandler {
    type Args = PruneMarket;

    async fn handle(&self, a: PruneMarket, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let cutoff = crate::prune::cutoff(a.older_than.unwrap_or(self.0.cfg.retention))?;
        let tables = [
            ("candles", "open_time"),
            ("indicators", "at"),
            ("risk_metric", "at"),
            ("liq_clusters", "at"),
            ("watcher_tombstones", "deleted_at"),
        ];
        let deleted = crate::prune::delete_before(ctx.pool(), cutoff, &tables).await?;
        Outcome::done_with(json!({"cutoff": cutoff, "deleted": deleted}))
    }
}
