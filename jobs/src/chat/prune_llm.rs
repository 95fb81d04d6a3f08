//! `prune_llm {older_than}` (daily; default schedule 90 days): deletes provider
//! attempts and stored answers older than the retention. The credits ledger is kept (it
//! is the money's record, and its unique charge per request_id still stops a very late
//! retry of a pruned request from charging twice), and so is `llm_requests`, the
//! tombstone of every answered request_id: a replay after pruning is refused
//! (`request_expired`, or `request_id_conflict` for another user), never answered free.

use std::time::Duration;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneLlm {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
}

impl JobArgs for PruneLlm {
    const KIND: &'static str = "prune_llm";
}

pub struct PruneLlmHandler;

impl Handler for PruneLlmHandler {
    type Args = PruneLlm;

    async fn handle(&self, a: PruneLlm, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let cutoff = crate::prune::cutoff(a.older_than)?;
        // Answers first: they reference their attempt.
        let tables = [
            ("llm_answers", "created_at"),
            ("llm_attempts", "created_at"),
        ];
        let deleted = crate::prune::delete_before(ctx.pool(), cutoff, &tables).await?;
        Outcome::done_with(json!({"cutoff": cutoff, "deleted": deleted}))
    }
}
