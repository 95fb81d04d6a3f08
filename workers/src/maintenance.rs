//! Maintenance as ordinary scheduled jobs (config `[[schedules]]` on queue
//! `maintenance`): archive retention, dead-letter retention, idempotency-key expiry and
//! scheduler-fire retention, and vacuuming bloated queue tables. Retention periods are
//! the jobs' args, so each schedule carries its own.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::job::{Handler, JobArgs, JobContext, JobError, Outcome};
use crate::store;

/// The args of a `maintenance` job: one task, with its retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Maintenance {
    /// What to do.
    pub task: Task,
    /// Age beyond which rows go (required by the prune tasks), e.g. `"7d"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub older_than: Option<Duration>,
    /// `vacuum_queues`: the dead tuples that make a queue table worth a vacuum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_dead_tuples: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// One maintenance task.
pub enum Task {
    /// Delete archived (done) messages older than `older_than`, in committed batches.
    PruneArchives,
    /// Delete dead letters that failed, and jobs cancelled, longer than `older_than`
    /// ago.
    PruneDeadLetters,
    /// Delete idempotency keys past their expiry (each key's TTL was fixed at enqueue).
    ExpireIdempotencyKeys,
    /// Delete schedule fires older than `older_than` (each schedule's latest stays:
    /// it is the fence of the next fire).
    PruneScheduleFires,
    /// `VACUUM (ANALYZE)` of the queue tables with at least `min_dead_tuples` dead
    /// tuples (default 10,000): the fallback where autovacuum is off or behind.
    VacuumQueues,
}

impl JobArgs for Maintenance {
    const KIND: &'static str = "maintenance";
}

/// Runs [`Maintenance`] jobs; registered by every fleet.
pub struct MaintenanceHandler;

impl Handler for MaintenanceHandler {
    type Args = Maintenance;
    const POOLER_SAFE: bool = true;

    async fn handle(&self, a: Maintenance, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let age = || {
            a.older_than
                .ok_or_else(|| JobError::fail(format!("{:?} needs older_than", a.task)))
        };
        let deleted = match a.task {
            Task::PruneArchives => {
                let age = age()?;
                // Committed batch by batch, not in the job's transaction (retention.rs).
                store::prune_archives(ctx.pool(), age, store::PRUNE_BATCH).await?
            }
            Task::PruneDeadLetters => store::prune_dead_letters(ctx.tx().await?, age()?).await?,
            Task::ExpireIdempotencyKeys => store::expire_idempotency_keys(ctx.tx().await?).await?,
            Task::PruneScheduleFires => {
                store::prune_schedule_fires(ctx.tx().await?, age()?).await?
            }
            Task::VacuumQueues => {
                // Outside the job's transaction: VACUUM cannot run in one.
                let min = a.min_dead_tuples.unwrap_or(10_000).max(1);
                let done = store::vacuum_queues(ctx.pool(), min).await?;
                if !done.vacuumed.is_empty() {
                    tracing::info!(tables = ?done.vacuumed, "vacuumed pgmq tables");
                }
                // A table that failed is tried again at the next fire (every minute by
                // default), not by retrying this job.
                return Outcome::done_with(
                    json!({"task": a.task, "vacuumed": done.vacuumed, "failed": done.failed}),
                );
            }
        };
        tracing::info!(task = ?a.task, deleted, "maintenance");
        Outcome::done_with(json!({"task": a.task, "deleted": deleted}))
    }
}
