//! `sync_watcher`: one change of a user's watched symbol, delivered by the app's signed
//! database webhook (`POST /v1/hooks/watchers`, HMAC-SHA256 of the raw body in
//! `x-hmac-sha256`). The body is the job's args, in the database-webhook shape:
//!
//! ```json
//! {"type": "INSERT", "table": "watchers", "schema": "public",
//!  "record": {"id": "…", "user_id": "…", "symbol": "BTC/USDT", "timeframe": "1h",
//!             "strategy": {}, "active": true, "updated_at": "2026-11-22T10:00:00Z"},
//!  "old_record": null}
//! ```
//!
//! `UPDATE` carries the new `record`; `DELETE` carries `old_record` (its `id` is enough).
//! The shape is checked at the door: the ingress answers 422 with the reason, and a
//! bad symbol or timeframe never becomes a job.
//!
//! Webhooks can arrive late, twice or out of order:
//! - a delivery older than the stored row (`updated_at`) changes nothing;
//! - a DELETE leaves a tombstone, so a late INSERT/UPDATE of that id stays deleted;
//! - a re-added watcher (new id, same user, symbol and timeframe) replaces the old row
//!   if it is newer.
//!
//! When a (symbol, timeframe) gets its first active watcher and has no signals yet,
//! an `ingest_indicators` with a backfill is enqueued in the same transaction, so its
//! history (and so its win-rate) is there at once.

use chrono::{DateTime, Utc};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

use super::config::Market;
use super::ingest_indicators::IngestIndicators;
use super::types::{Symbol, Timeframe};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

/// A watcher row as the app sends it. Columns we do not use are ignored (the app may
/// add some).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatcherRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub symbol: Symbol,
    pub timeframe: Timeframe,
    #[serde(default = "empty_object")]
    pub strategy: Value,
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

fn empty_object() -> Value {
    json!({})
}
fn yes() -> bool {
    true
}

/// What a DELETE needs of the old row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OldRecord {
    pub id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSyncWatcher")]
pub struct SyncWatcher {
    #[serde(rename = "type")]
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default)]
    pub record: Option<WatcherRecord>,
    #[serde(default)]
    pub old_record: Option<OldRecord>,
}

#[derive(Deserialize)]
struct RawSyncWatcher {
    #[serde(rename = "type")]
    op: Op,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    record: Option<WatcherRecord>,
    #[serde(default)]
    old_record: Option<OldRecord>,
}

impl TryFrom<RawSyncWatcher> for SyncWatcher {
    type Error = String;
    fn try_from(r: RawSyncWatcher) -> Result<Self, String> {
        if let Some(t) = &r.table
            && t != "watchers"
        {
            return Err(format!("table {t:?} is not watchers"));
        }
        match r.op {
            Op::Insert | Op::Update if r.record.is_none() => {
                let op = if r.op == Op::Insert {
                    "INSERT"
                } else {
                    "UPDATE"
                };
                return Err(format!("{op} needs a record"));
            }
            Op::Delete if r.old_record.is_none() && r.record.is_none() => {
                return Err("DELETE needs old_record (at least its id)".into());
            }
            _ => {}
        }
        Ok(SyncWatcher {
            op: r.op,
            table: r.table,
            schema: r.schema,
            record: r.record,
            old_record: r.old_record,
        })
    }
}

impl JobArgs for SyncWatcher {
    const KIND: &'static str = "sync_watcher";
    /// The body is the app database's webhook: its rows carry columns we do not use,
    /// and may grow new ones.
    const STRICT: bool = false;
}

pub struct SyncWatcherHandler(pub Arc<Market>);

impl Handler for SyncWatcherHandler {
    type Args = SyncWatcher;

    async fn handle(&self, a: SyncWatcher, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let backfill = self.0.cfg.backfill;
        let tx = ctx.tx().await?;
        // Every delivery of one watcher takes its lock first, before reading anything:
        // an INSERT that checked for a tombstone and a DELETE that wrote one can then
        // never interleave (the INSERT would revive a deleted watcher for good).
        let id = match (&a.old_record, &a.record) {
            (Some(o), _) if a.op == Op::Delete => Some(o.id),
            (_, Some(r)) => Some(r.id),
            (Some(o), None) => Some(o.id),
            (None, None) => None,
        };
        if let Some(id) = id {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($2 || $1::text))")
                .bind(id)
                .bind(crate::locks::WATCHER_NS)
                .execute(&mut *tx)
                .await?;
        }
        match (a.op, a.record) {
            (Op::Delete, rec) => {
                let id = a
                    .old_record
                    .map(|o| o.id)
                    .or(rec.map(|r| r.id))
                    .ok_or_else(|| JobError::fail("DELETE without an id"))?;
                sqlx::query("INSERT INTO watcher_tombstones (id, deleted_at) VALUES ($1, now()) ON CONFLICT DO NOTHING")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let n = sqlx::query("DELETE FROM watchers WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                Outcome::done_with(
                    json!({"watcher": id, "applied": if n > 0 { "deleted" } else { "tombstoned" }}),
                )
            }
            (_, None) => Err(JobError::fail("INSERT/UPDATE without a record")),
            (_, Some(r)) => {
                let gone: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM watcher_tombstones WHERE id = $1)",
                )
                .bind(r.id)
                .fetch_one(&mut *tx)
                .await?;
                if gone {
                    return Outcome::done_with(
                        json!({"watcher": r.id, "applied": "ignored: deleted earlier"}),
                    );
                }
                let (symbol, tf) = (r.symbol.to_string(), r.timeframe.as_str());
                // Serialise changes to one (symbol, timeframe) so "first watcher" is
                // decided once.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($3 || $1 || ':' || $2))")
                    .bind(&symbol)
                    .bind(tf)
                    .bind(crate::locks::WATCHERS_NS)
                    .execute(&mut *tx)
                    .await?;
                let watched_before: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM watchers WHERE symbol = $1 AND timeframe = $2 AND active)",
                )
                .bind(&symbol)
                .bind(tf)
                .fetch_one(&mut *tx)
                .await?;
                // A delivery without the app's updated_at cannot say it is newer than
                // anything: it is the oldest state there is (written only where no row
                // is, and any dated delivery wins over it).
                let updated_at: Option<DateTime<Utc>> = r.updated_at;
                // A re-added watcher: the older row for the same key makes way.
                sqlx::query(
                    r#"DELETE FROM watchers WHERE user_id = $1 AND symbol = $2 AND timeframe = $3
                     AND id <> $4 AND $5::timestamptz IS NOT NULL AND updated_at <= $5"#,
                )
                .bind(r.user_id)
                .bind(&symbol)
                .bind(tf)
                .bind(r.id)
                .bind(updated_at)
                .execute(&mut *tx)
                .await?;
                let applied: Option<bool> = sqlx::query_scalar(
                    r#"INSERT INTO watchers (id, user_id, symbol, timeframe, strategy, active, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), coalesce($8, '-infinity'))
                     ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, symbol = excluded.symbol,
                       timeframe = excluded.timeframe, strategy = excluded.strategy, active = excluded.active,
                       updated_at = excluded.updated_at
                     WHERE watchers.updated_at <= excluded.updated_at
                     RETURNING (xmax = 0)"#,
                )
                .bind(r.id)
                .bind(r.user_id)
                .bind(&symbol)
                .bind(tf)
                .bind(&r.strategy)
                .bind(r.active)
                .bind(r.created_at)
                .bind(updated_at)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| match e {
                    // The same user still watches this pair under another id whose row is
                    // newer (or this delivery is undated): that watcher's DELETE is on
                    // its way or this delivery is out of date. Retried on the backoff, so
                    // it applies once the DELETE has; dead-lettered with this reason if
                    // it never comes.
                    sqlx::Error::Database(d) if d.is_unique_violation() => JobError::retry(format!(
                        "watcher {}: user {} still watches {symbol} {tf} under a newer watcher (waiting for its DELETE)",
                        r.id, r.user_id
                    )),
                    e => e.into(),
                })?;
                let Some(inserted) = applied else {
                    return Outcome::done_with(
                        json!({"watcher": r.id, "applied": "ignored: stale"}),
                    );
                };
                let mut backfill_job = None;
                if r.active && !watched_before && backfill > 0 && self.0.source.is_some() {
                    let has_signals: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM signals WHERE symbol = $1 AND timeframe = $2)",
                    )
                    .bind(&symbol)
                    .bind(tf)
                    .fetch_one(&mut *tx)
                    .await?;
                    if !has_signals {
                        let args = IngestIndicators {
                            symbol: r.symbol.clone(),
                            timeframe: r.timeframe,
                            backfill: Some(backfill),
                            candle: None,
                        };
                        // A backfill that dies (its quota retries spent, a bad answer)
                        // must not hold its key: the pair's next first watcher asks again.
                        let key = format!("backfill:{symbol}:{tf}");
                        let opts = EnqueueOptions::default().key(key).free_key_when_dead();
                        let job = enqueue_on(tx, &args, opts)
                            .await
                            .map_err(|e| JobError::retry(e.into_sqlx()))?;
                        backfill_job = Some(job.id);
                    }
                }
                Outcome::done_with(json!({
                    "watcher": r.id,
                    "applied": if inserted { "inserted" } else { "updated" },
                    "backfill_job": backfill_job,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_is_checked_at_the_door() {
        let ok = json!({"type": "INSERT", "table": "watchers", "record": {
            "id": "5d0c2a4e-1b57-4f0e-9d7e-0a4b3c2d1e0f", "user_id": "6e1d3b5f-2c68-4a1f-8e8f-1b5c4d3e2f10",
            "symbol": "btc-usdt", "timeframe": "1h", "extra_column": 1}});
        let w: SyncWatcher = serde_json::from_value(ok).unwrap();
        assert_eq!(w.record.unwrap().symbol.to_string(), "BTC/USDT");
        let del =
            json!({"type": "DELETE", "old_record": {"id": "5d0c2a4e-1b57-4f0e-9d7e-0a4b3c2d1e0f"}});
        assert!(serde_json::from_value::<SyncWatcher>(del).is_ok());
        for (bad, want) in [
            (json!({"type": "INSERT"}), "needs a record"),
            (json!({"type": "DELETE"}), "needs old_record"),
            (json!({"type": "TRUNCATE"}), "unknown variant"),
            (
                json!({"type": "INSERT", "table": "users", "record": null}),
                "not watchers",
            ),
            (
                json!({"type": "INSERT", "record": {"id": "5d0c2a4e-1b57-4f0e-9d7e-0a4b3c2d1e0f",
                "user_id": "6e1d3b5f-2c68-4a1f-8e8f-1b5c4d3e2f10", "symbol": "BTC/USDT", "timeframe": "2h"}}),
                "timeframe",
            ),
            (
                json!({"type": "INSERT", "record": {"id": "5d0c2a4e-1b57-4f0e-9d7e-0a4b3c2d1e0f",
                "user_id": "6e1d3b5f-2c68-4a1f-8e8f-1b5c4d3e2f10", "symbol": "BTCUSDT", "timeframe": "1h"}}),
                "not a pair",
            ),
        ] {
            let e = serde_json::from_value::<SyncWatcher>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }
}
