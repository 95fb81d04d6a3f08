//! What the retention jobs share: the cutoff with its guard against typos (all of
//! `prune_market`, `prune_llm`, `prune_raw_logs`), and a time-ranged delete over a fixed
//! list of tables (the first two; raw logs drop whole day partitions).

use std::time::Duration;

use chrono::{DateTime, Utc};
use longshore_workers::JobError;
use serde_json::{Map, Value, json};
use sqlx::PgPool;

/// `now - older_than`; anything under a day is refused (a guard against `"90"` meaning
/// 90 seconds).
pub fn cutoff(older_than: Duration) -> Result<DateTime<Utc>, JobError> {
    if older_than < Duration::from_secs(86_400) {
        return Err(JobError::fail(
            "older_than must be at least 1d (a guard against typos)",
        ));
    }
    Ok(Utc::now() - chrono::Duration::from_std(older_than).map_err(JobError::fail)?)
}

/// Rows one prune statement deletes at most: each batch is its own short transaction
/// (an index range scan on the pruned column), so no statement holds locks or bloats
/// the table for long however much is due.
pub const BATCH: i64 = 5_000;

/// Deletes rows of each `(table, column)` whose column is before `cutoff`, in batches
/// of [`BATCH`] committed one by one (a rerun after a crash finishes the rest); returns
/// the count per table. The names are the caller's constants, never input.
pub async fn delete_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    tables: &[(&'static str, &'static str)],
) -> Result<Map<String, Value>, sqlx::Error> {
    let mut out = Map::new();
    for (table, column) in tables {
        let sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
        );
        let mut total = 0u64;
        loop {
            let n = sqlx::query(&sql)
                .bind(cutoff)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            total += n;
            if n < BATCH as u64 {
                break;
            }
        }
        out.insert((*table).into(), json!(total));
    }
    Ok(out)
}
