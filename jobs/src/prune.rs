//! What the retention jobs share: the cutoff with its guard against typos (all of
//! `prune_market`, `prune_llm`, `prune_raw_logs`), and a time-ranged delete over a fixed
//! list of tables (the first two; raw logs drop whole day partitions).

use std::time::Duration;

use chrono::{DateTime, Utc};
use longshore_workers::JobError;
use serde_json::{Map, Value, json};
use sqlx::PgConnection;

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

/// Deletes rows of each `(table, column)` whose column is before `cutoff`; returns the
/// count per table. The names are the caller's constants, never input.
pub async fn delete_before(
    tx: &mut PgConnection,
    cutoff: DateTime<Utc>,
    tables: &[(&'static str, &'static str)],
) -> Result<Map<String, Value>, sqlx::Error> {
    let mut out = Map::new();
    for (table, column) in tables {
        let n = sqlx::query(&format!("DELETE FROM {table} WHERE {column} < $1"))
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        out.insert((*table).into(), json!(n));
    }
    Ok(out)
}
