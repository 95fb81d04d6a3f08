//! `aggregate_usage {chunk?}` (every 5 minutes): rows of `haproxy_logs` above the
//! watermark, grouped by (hour window, customer, service), added into `usage_records`:
//! `request_count`, `billable_count` (2xx/3xx only), `bytes_transferred`.
//!
//! Each chunk of ids is one transaction that upserts and moves the watermark, so a run
//! killed anywhere counts every row exactly once when it runs again; the last chunk
//! commits with the job's acknowledgement.
//!
//! bigserial ids are handed out before commit, so ingests can commit out of id order:
//! a watermark moved past an id whose row is not yet committed would skip that row
//! forever. Each chunk therefore takes the ingest lock exclusively (ingests hold it
//! shared), so every id at or below the max it reads is committed. (The spec's
//! "original global manager" had this race; this closes it.)

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateUsage {
    /// Raw rows per transaction (default 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<i64>,
}

impl JobArgs for AggregateUsage {
    const KIND: &'static str = "aggregate_usage";
}

pub struct AggregateUsageHandler;

impl Handler for AggregateUsageHandler {
    type Args = AggregateUsage;

    async fn handle(&self, a: AggregateUsage, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let chunk = a.chunk.unwrap_or(1_000_000);
        if chunk < 1 {
            return Err(JobError::fail("chunk must be positive"));
        }
        let (mut rows, mut chunks) = (0i64, 0);
        loop {
            let mut tx = ctx.pool().begin().await?;
            let (n, more) = aggregate_chunk(&mut tx, chunk).await?;
            tx.commit().await?;
            rows += n;
            chunks += 1;
            if !more {
                break;
            }
        }
        Outcome::done_with(json!({"rows": rows, "chunks": chunks}))
    }
}

/// Aggregates up to `chunk` rows past the watermark; returns (rows, whether more wait).
pub async fn aggregate_chunk(
    tx: &mut PgConnection,
    chunk: i64,
) -> Result<(i64, bool), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(crate::locks::INGEST)
        .execute(&mut *tx)
        .await?;
    let last: i64 = sqlx::query_scalar(
        "SELECT last_id FROM aggregation_watermarks WHERE name = 'usage' FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await?;
    let max: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM haproxy_logs WHERE id > $1")
        .bind(last)
        .fetch_one(&mut *tx)
        .await?;
    let Some(max) = max else {
        return Ok((0, false));
    };
    let hi = max.min(last.saturating_add(chunk));
    let rows: i64 = sqlx::query_scalar(
        r#"WITH agg AS (
           SELECT customer_id, service_type, date_trunc('hour', ts) AS w, count(*) AS n,
                  count(*) FILTER (WHERE status_code BETWEEN 200 AND 399) AS billable,
                  coalesce(sum(bytes_out), 0) AS bytes
           FROM haproxy_logs WHERE id > $1 AND id <= $2 GROUP BY 1, 2, 3),
         up AS (
           INSERT INTO usage_records (customer_id, service_type, window_start, window_end, request_count, billable_count, bytes_transferred)
           SELECT customer_id, service_type, w, w + interval '1 hour', n, billable, bytes FROM agg
           ON CONFLICT (customer_id, service_type, window_start) DO UPDATE SET
             request_count = usage_records.request_count + excluded.request_count,
             billable_count = usage_records.billable_count + excluded.billable_count,
             bytes_transferred = usage_records.bytes_transferred + excluded.bytes_transferred)
         SELECT coalesce(sum(n), 0)::bigint FROM agg"#,
    )
    .bind(last)
    .bind(hi)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE aggregation_watermarks SET last_id = $1 WHERE name = 'usage'")
        .bind(hi)
        .execute(&mut *tx)
        .await?;
    Ok((rows, hi < max))
}
