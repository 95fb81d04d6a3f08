//! `sweep_charge_intents {older_than}` (scheduled): re-drives charge intents left in
//! `created`/`signed`/`sent` longer than `older_than`, each through `charge_escrow`.

use std::time::Duration;

use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::charge_escrow::ChargeEscrow;

/// `sweep_charge_intents {older_than}` (scheduled): re-drives intents left in
/// `created`/`signed`/`sent` longer than `older_than` (their job may have been
/// dead-lettered, or a worker may have died holding it). One job per intent per
/// window, by idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepChargeIntents {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
}

impl JobArgs for SweepChargeIntents {
    const KIND: &'static str = "sweep_charge_intents";
}

pub struct SweepChargeIntentsHandler;

impl Handler for SweepChargeIntentsHandler {
    type Args = SweepChargeIntents;

    async fn handle(
        &self,
        a: SweepChargeIntents,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            r#"SELECT intent_id FROM charge_intents WHERE state IN ('created', 'signed', 'sent')
             AND updated_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT 10000"#,
        )
        .bind(a.older_than.as_secs_f64())
        .fetch_all(ctx.pool())
        .await?;
        let mut enqueued = 0;
        for id in &ids {
            let opts = EnqueueOptions::default()
                .key(format!("sweep:{id}"))
                .ttl(a.older_than.max(Duration::from_secs(1)));
            let e = enqueue_on(ctx.tx().await?, &ChargeEscrow { intent_id: *id }, opts)
                .await
                .map_err(JobError::retry)?;
            enqueued += usize::from(!e.duplicate);
        }
        Outcome::done_with(json!({"stuck": ids.len(), "enqueued": enqueued}))
    }
}
