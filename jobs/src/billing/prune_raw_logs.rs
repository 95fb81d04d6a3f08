//! `prune_raw_logs {older_than}` (daily): drops day partitions of `haproxy_logs` whose
//! whole day is older than the retention (default schedule: 90 days). A partition that
//! still holds rows above the aggregation watermark is kept (and reported): dropping it
//! would lose usage that was never counted.

use std::time::Duration;

use chrono::NaiveDate;
use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneRawLogs {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
}

impl JobArgs for PruneRawLogs {
    const KIND: &'static str = "prune_raw_logs";
}

pub struct PruneRawLogsHandler;

impl Handler for PruneRawLogsHandler {
    type Args = PruneRawLogs;

    async fn handle(&self, a: PruneRawLogs, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let cutoff = crate::prune::cutoff(a.older_than)?;
        let tx = ctx.tx().await?;
        let parts: Vec<String> = sqlx::query_scalar(
            r#"SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'haproxy_logs'::regclass ORDER BY 1"#,
        )
        .fetch_all(&mut *tx)
        .await?;
        let watermark: i64 =
            sqlx::query_scalar("SELECT last_id FROM aggregation_watermarks WHERE name = 'usage'")
                .fetch_one(&mut *tx)
                .await?;
        let (mut dropped, mut kept) = (Vec::new(), Vec::new());
        for p in parts {
            let Some(day) = p
                .strip_prefix("haproxy_logs_")
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
            else {
                continue;
            };
            let day_end = (day + chrono::Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc();
            if day_end > cutoff {
                continue;
            }
            // The name came from pg_catalog and parsed as haproxy_logs_YYYYMMDD: safe.
            let unaggregated: bool =
                sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {p} WHERE id > $1)"))
                    .bind(watermark)
                    .fetch_one(&mut *tx)
                    .await?;
            if unaggregated {
                tracing::warn!(
                    partition = p,
                    "not dropped: it holds rows not yet aggregated"
                );
                kept.push(p);
                continue;
            }
            sqlx::query(&format!("DROP TABLE {p}"))
                .execute(&mut *tx)
                .await?;
            dropped.push(p);
        }
        Outcome::done_with(json!({"dropped": dropped, "kept_unaggregated": kept}))
    }
}
