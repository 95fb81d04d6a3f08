//! Bulk operator actions: retry, purge or cancel every job of a queue that matches a
//! filter (state, error text, age), in bounded batches.
//!
//! Each batch is one transaction over at most `limit` rows, taken in id order after the
//! previous batch's last id and up to the newest id there was when the operator asked
//! (so jobs that arrive, or die again, meanwhile are not swept up by the same action).
//! A batch locks only the rows it acts on (`FOR UPDATE SKIP LOCKED`; a row a worker is
//! settling at that instant is skipped, not waited for), so no statement holds a big
//! table. Every batch is recorded in `longshore.operator_actions` with who did it.
//!
//! What applies where (decided here, refused with a message otherwise):
//! - dead letters: `retry` re-sends them as fresh jobs, `purge` deletes them;
//! - waiting jobs (`visible`, `delayed`, `retrying` in backoff): `cancel` ends them as
//!   `cancelled` (recorded; nothing accepted is dropped silently, so there is no purge
//!   of live jobs), `retry` makes delayed and backing-off ones visible now.
//!
//! Running jobs are not bulk targets: cancel them one by one (`longshore job cancel`),
//! which reaches their handler.

use std::time::Duration;

use sqlx::PgConnection;

use super::QueueSql;
use super::controls::{record, wake};
use super::dead_letters::{Selection, retry_dead_letters};

/// Most ids one batch looks at.
pub const BULK_WINDOW: i64 = 50_000;

/// Which jobs a bulk action considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkState {
    /// Dead letters of the queue.
    Dead,
    /// Due now, not held by a worker.
    Visible,
    /// Enqueued to run later, never run yet.
    Delayed,
    /// Failed at least once, waiting in backoff for the next attempt.
    Retrying,
}

impl BulkState {
    /// The state's name (as the CLI and the API spell it).
    pub fn as_str(self) -> &'static str {
        match self {
            BulkState::Dead => "dead",
            BulkState::Visible => "visible",
            BulkState::Delayed => "delayed",
            BulkState::Retrying => "retrying",
        }
    }

    /// Parses [`BulkState::as_str`].
    pub fn parse(s: &str) -> Option<BulkState> {
        [
            BulkState::Dead,
            BulkState::Visible,
            BulkState::Delayed,
            BulkState::Retrying,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }
}

/// What to do with the matching jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    /// Dead letters: re-send. Delayed or retrying jobs: visible now.
    Retry,
    /// Dead letters only: delete.
    Purge,
    /// Waiting jobs only: end as cancelled.
    Cancel,
}

impl BulkAction {
    fn as_str(self) -> &'static str {
        match self {
            BulkAction::Retry => "bulk_retry",
            BulkAction::Purge => "bulk_purge",
            BulkAction::Cancel => "bulk_cancel",
        }
    }
}

/// The jobs of one queue a bulk action applies to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BulkFilter {
    /// Which state.
    pub state: BulkState,
    /// Only jobs whose last error contains this text (case-insensitive).
    pub error: Option<String>,
    /// Only jobs enqueued at least this long ago.
    #[serde(with = "humantime_serde")]
    pub older_than: Option<Duration>,
}

impl BulkFilter {
    /// Refuses an action that does not apply to the filter's state, with the reason.
    pub fn check(&self, action: BulkAction) -> Result<(), String> {
        match (action, self.state) {
            (BulkAction::Retry | BulkAction::Purge, BulkState::Dead) => Ok(()),
            (BulkAction::Cancel, BulkState::Dead) => Err(
                "a dead letter has already ended: retry it or purge it, there is nothing to cancel"
                    .into(),
            ),
            (BulkAction::Purge, _) => Err(format!(
                "purge applies to dead letters; {} jobs are live: cancel them (they are recorded as cancelled)",
                self.state.as_str()
            )),
            (BulkAction::Retry, BulkState::Visible) => {
                Err("visible jobs are due already: there is nothing to retry".into())
            }
            (BulkAction::Retry | BulkAction::Cancel, _) => Ok(()),
        }
    }

    fn age_seconds(&self) -> f64 {
        self.older_than.map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Where a bulk action stands after a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkBatch {
    /// How many jobs this batch acted on.
    pub affected: u64,
    /// The last id the batch looked at: the next batch starts after it. `None`: nothing
    /// left to look at, the action is done.
    pub next_after: Option<i64>,
}

/// The newest id a bulk action over `state` considers (taken once, when it starts).
pub async fn bulk_bound(
    ex: &mut PgConnection,
    sql: &QueueSql,
    state: BulkState,
) -> Result<i64, sqlx::Error> {
    let stmt = match state {
        BulkState::Dead => format!(
            "SELECT coalesce(max(id), 0)::bigint FROM longshore.dead_letters WHERE queue = '{}'",
            sql.name
        ),
        _ => super::render(
            "SELECT coalesce(max(msg_id), 0)::bigint FROM {q}",
            &sql.name,
        ),
    };
    sqlx::query_scalar(&stmt).fetch_one(ex).await
}

/// How many jobs match (for a progress bar and the operator's confirmation): counted up
/// to `cap` and no further, so a count over a big table stays cheap.
pub async fn bulk_count(
    ex: &mut PgConnection,
    sql: &QueueSql,
    filter: &BulkFilter,
    up_to: i64,
    cap: i64,
) -> Result<i64, sqlx::Error> {
    let stmt = format!(
        "SELECT count(*)::bigint FROM ({} LIMIT $5) m",
        matching(sql, filter.state, false)
    );
    sqlx::query_scalar(&stmt)
        .bind(0_i64)
        .bind(up_to)
        .bind(filter.error.as_deref())
        .bind(filter.age_seconds())
        .bind(cap)
        .fetch_one(ex)
        .await
}

/// The ids matching `state` in `($1, $2]`, error text `$3`, enqueued `$4` seconds ago or
/// earlier, in id order (the caller adds the `LIMIT`).
fn matching(sql: &QueueSql, state: BulkState, lock: bool) -> String {
    let lock = if lock { " FOR UPDATE SKIP LOCKED" } else { "" };
    let common = "AND ($3::text IS NULL OR strpos(lower({err}), lower($3)) > 0) \
                  AND enqueued_at <= now() - make_interval(secs => $4::float8)";
    match state {
        BulkState::Dead => format!(
            "SELECT id FROM longshore.dead_letters WHERE queue = '{}' AND id > $1 AND id <= $2 {} ORDER BY id{lock}",
            sql.name,
            common.replace("{err}", "last_error"),
        ),
        _ => {
            // Not held (never read, or put back: a retry or release clears
            // last_read_at), and due now or later as the state says.
            let when = match state {
                BulkState::Visible => "vt <= clock_timestamp()",
                BulkState::Delayed => {
                    "last_read_at IS NULL AND vt > clock_timestamp() AND read_ct = 0"
                }
                _ => "last_read_at IS NULL AND vt > clock_timestamp() AND read_ct > 0",
            };
            // A visible row may have been read before (a lease that ran out): only
            // rows no worker holds, which vt <= now already says.
            super::render(
                &format!(
                    "SELECT msg_id AS id FROM {{q}} WHERE msg_id > $1 AND msg_id <= $2 AND {when} {} ORDER BY msg_id{lock}",
                    common.replace("{err}", "(longshore.headers(headers) ->> 'last_error')"),
                ),
                &sql.name,
            )
        }
    }
}

/// One batch of a bulk action, in the caller's transaction: acts on at most `limit`
/// matching jobs with an id in `(after, up_to]` and records it under `actor`.
#[allow(clippy::too_many_arguments)]
pub async fn bulk_batch(
    tx: &mut PgConnection,
    sql: &QueueSql,
    filter: &BulkFilter,
    action: BulkAction,
    after: i64,
    up_to: i64,
    limit: i64,
    actor: &str,
) -> Result<BulkBatch, sqlx::Error> {
    // One stretch of ids per batch: a filter that matches rarely walks at most
    // BULK_WINDOW ids in a statement, never the whole table.
    let window_end = up_to.min(after.saturating_add(BULK_WINDOW));
    let pick = format!("{} LIMIT $5", matching(sql, filter.state, true));
    let ids: Vec<i64> = sqlx::query_scalar(&pick)
        .bind(after)
        .bind(window_end)
        .bind(filter.error.as_deref())
        .bind(filter.age_seconds())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    let Some(&last) = ids.last() else {
        return Ok(BulkBatch {
            affected: 0,
            next_after: (window_end < up_to).then_some(window_end),
        });
    };
    let affected = match (action, filter.state) {
        (BulkAction::Retry, BulkState::Dead) => {
            retry_dead_letters(&mut *tx, sql, Selection::Ids(&ids))
                .await?
                .len() as u64
        }
        (BulkAction::Purge, _) => {
            sqlx::query("DELETE FROM longshore.dead_letters WHERE queue = $1 AND id = ANY($2)")
                .bind(sql.name.as_str())
                .bind(&ids)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        }
        (BulkAction::Retry, _) => {
            let n = sqlx::query(&super::render(
                "UPDATE {q} SET vt = clock_timestamp() WHERE msg_id = ANY($1) AND last_read_at IS NULL AND vt > clock_timestamp()",
                &sql.name,
            ))
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                wake(tx, &sql.name).await?;
            }
            n
        }
        (BulkAction::Cancel, _) => {
            sqlx::query(&super::render(
                r#"
WITH gone AS (
    DELETE FROM {q}
     WHERE msg_id = ANY($1) AND (last_read_at IS NULL OR vt <= clock_timestamp())
    RETURNING msg_id, read_ct, message, headers, enqueued_at
)
INSERT INTO longshore.cancelled_jobs (queue, msg_id, message, headers, attempts, enqueued_at, cancelled_by)
SELECT '{name}', msg_id, message, headers, longshore.attempts(read_ct, headers), enqueued_at, $2
  FROM gone
"#,
                &sql.name,
            ))
            .bind(&ids)
            .bind(actor)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        }
    };
    record(
        tx,
        actor,
        action.as_str(),
        &sql.name,
        serde_json::json!({
            "filter": filter, "affected": affected,
            "first_id": ids[0], "last_id": last, "up_to": up_to,
        }),
    )
    .await?;
    Ok(BulkBatch {
        affected,
        // A full batch may have left matches in the stretch; a short one took them all.
        next_after: Some(if ids.len() as i64 == limit {
            last
        } else {
            window_end
        }),
    })
}

/// Runs a whole bulk action: batches of `limit`, each its own transaction, until none
/// is left; `progress` hears each batch's count. Returns how many jobs it acted on and
/// the newest id it considered (for a count of what still matches within the same
/// bound).
pub async fn bulk(
    pool: &sqlx::PgPool,
    sql: &QueueSql,
    filter: &BulkFilter,
    action: BulkAction,
    limit: i64,
    actor: &str,
    mut progress: impl FnMut(u64),
) -> Result<(u64, i64), sqlx::Error> {
    use crate::db::{self, Deadline};
    let up_to = db::run(pool, Deadline::Statement, async |c| {
        bulk_bound(c, sql, filter.state).await
    })
    .await?;
    let mut after = 0_i64;
    let mut total = 0_u64;
    loop {
        let mut tx = db::begin(pool, Deadline::Statement).await?;
        let b = bulk_batch(&mut tx, sql, filter, action, after, up_to, limit, actor).await?;
        tx.commit().await?;
        total += b.affected;
        progress(b.affected);
        match b.next_after {
            Some(n) => after = n,
            None => return Ok((total, up_to)),
        }
    }
}
