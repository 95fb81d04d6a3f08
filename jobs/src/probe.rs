//! `probe`: a job kind for operators (check a deployment end to end), the benchmark and
//! the fault tests.
//!
//! Args: `{"id": i64, "sleep_ms"?: u64, "fail_times"?: u32, "effect"?: bool,
//! "hold_ms"?: u64, "panic"?: bool}`. It sleeps `sleep_ms`, answers `Retry` on its
//! first `fail_times` attempts, panics on every attempt with `panic: true`, and with
//! `effect: true` inserts `id` into `probe_effects(id primary key, attempt)` in its
//! completion transaction, then holds that transaction open `hold_ms`. The result
//! says whether the effect was already there (`duplicate`). Args that are not such an
//! object are dead-lettered at once with the parse error.

use std::time::Duration;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_times: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<bool>,
    /// After writing the effect, hold the completion transaction open this long (so a
    /// test can kill the worker after the effect and before the acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// Panic on every attempt (the poison-message test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic: Option<bool>,
}

impl JobArgs for Probe {
    const KIND: &'static str = "probe";
}

impl Probe {
    pub fn new(id: i64) -> Self {
        Probe {
            id,
            sleep_ms: None,
            fail_times: None,
            effect: None,
            hold_ms: None,
            panic: None,
        }
    }
}

pub struct ProbeHandler;

impl Handler for ProbeHandler {
    type Args = Probe;

    async fn handle(&self, args: Probe, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if let Some(ms) = args.sleep_ms.filter(|ms| *ms > 0) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if args.panic == Some(true) {
            panic!("probe {} asked to panic", args.id);
        }
        if ctx.attempt <= args.fail_times.unwrap_or(0) {
            return Err(JobError::retry(format!(
                "probe {} fails on attempt {} of its first {}",
                args.id,
                ctx.attempt,
                args.fail_times.unwrap_or(0)
            )));
        }
        let mut duplicate = false;
        if args.effect == Some(true) {
            // The natural key makes the effect idempotent: a duplicate delivery of the
            // same id (RELIABILITY row 7) finds it written and changes nothing.
            let attempt = ctx.attempt as i32;
            let written = sqlx::query(
                "INSERT INTO probe_effects (id, attempt) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(args.id)
            .bind(attempt)
            .execute(ctx.tx().await?)
            .await?
            .rows_affected();
            duplicate = written == 0;
            if let Some(ms) = args.hold_ms.filter(|ms| *ms > 0) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Outcome::done_with(json!({"id": args.id, "attempt": ctx.attempt, "duplicate": duplicate}))
    }
}
