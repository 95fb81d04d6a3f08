//! `longshore job cancel|retry QUEUE ID`: operator actions on one job;
//! `longshore job bulk retry|purge|cancel QUEUE --state …`: on every job a filter
//! matches, in bounded batches (see `longshore_workers::store::bulk`).

use anyhow::anyhow;
use longshore_workers::QueueName;
use longshore_workers::db;
use longshore_workers::store::{self, BulkAction, BulkFilter, BulkState, Cancel, QueueSql};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Cancel a job: a waiting one (visible, delayed, in retry backoff) never runs
    /// (`outcome`: cancelled); a running one is stopped at its worker's next heartbeat,
    /// its transaction rolled back (`outcome`: requested). Either ends `cancelled`.
    Cancel {
        queue: String,
        id: i64,
        /// Who, recorded with the action [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Make a delayed job, or one waiting in retry backoff, visible now.
    Retry {
        queue: String,
        id: i64,
        /// Who, recorded with the action [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Retry, purge or cancel every job of QUEUE in a state, optionally only those whose
    /// last error contains a text or that were enqueued long enough ago. Dead letters:
    /// retry (re-send) or purge; visible, delayed, retrying jobs: cancel, or retry
    /// (delayed and retrying ones become visible now). Prints one JSON line.
    Bulk {
        #[arg(value_enum)]
        action: BulkArg,
        queue: String,
        /// dead, visible, delayed or retrying.
        #[arg(long, value_parser = parse_state)]
        state: BulkState,
        /// Only jobs whose last error contains this text (case-insensitive).
        #[arg(long)]
        error: Option<String>,
        /// Only jobs enqueued at least this long ago (`90s`, `2h`, `3d`).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Jobs per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
        /// Who, recorded with the action [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BulkArg {
    Retry,
    Purge,
    Cancel,
}

fn parse_state(s: &str) -> Result<BulkState, String> {
    BulkState::parse(s).ok_or_else(|| format!("{s:?}: one of dead, visible, delayed, retrying"))
}

/// Runs a bulk action with a progress bar (hidden off a terminal); prints one JSON line.
pub async fn run_bulk(
    pool: &sqlx::PgPool,
    q: &QueueName,
    filter: &BulkFilter,
    action: BulkAction,
    batch: i64,
    actor: &str,
) -> CliResult {
    if batch < 1 {
        return Err(CliError::usage(anyhow!("--batch must be at least 1")));
    }
    filter
        .check(action)
        .map_err(|e| CliError::usage(anyhow!("E_BULK_NOT_APPLICABLE: {e}")))?;
    let sql = QueueSql::new(q.clone());
    // A capped count for the bar (past it, a spinner): a bounded read however big the
    // queue is.
    let cap = 100_000;
    let total = db::run(pool, db::Deadline::Statement, async |c| {
        let up_to = store::bulk_bound(c, &sql, filter.state).await?;
        store::bulk_count(c, &sql, filter, up_to, cap).await
    })
    .await
    .ok(); // best effort: no count in time, a spinner
    let pb = app::progress(
        total.filter(|t| *t < cap).map(|t| t as u64),
        action_name(action),
    );
    let (n, up_to) = store::bulk(pool, &sql, filter, action, batch, actor, |n| pb.inc(n)).await?;
    pb.finish_and_clear();
    // Rows a worker held as a batch passed were skipped: how many still match (within
    // the action's bound, so jobs that arrived since are not counted).
    let still = db::run(pool, db::Deadline::Statement, async |c| {
        store::bulk_count(c, &sql, filter, up_to, 10_000).await
    })
    .await
    .ok();
    println!(
        "{}",
        serde_json::json!({"queue": q.as_str(), "action": action, "filter": filter, "affected": n, "still_matching": still, "by": actor})
    );
    Ok(())
}

fn action_name(a: BulkAction) -> &'static str {
    match a {
        BulkAction::Retry => "retry",
        BulkAction::Purge => "purge",
        BulkAction::Cancel => "cancel",
    }
}

/// `--by`, else `cli:$USER`.
pub fn actor(by: Option<String>) -> String {
    by.unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    })
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let parse = |q: &str| QueueName::parse(q).map_err(|e| CliError::usage(anyhow!("{q:?}: {e}")));
    let (cancel, queue, id, by) = match args.action {
        Action::Bulk {
            action,
            queue,
            state,
            error,
            older_than,
            batch,
            by,
        } => {
            let q = parse(&queue)?;
            let action = match action {
                BulkArg::Retry => BulkAction::Retry,
                BulkArg::Purge => BulkAction::Purge,
                BulkArg::Cancel => BulkAction::Cancel,
            };
            let filter = BulkFilter {
                state,
                error,
                older_than,
            };
            let pool = app::pool(&cfg, "longshore-cli").await?;
            return run_bulk(&pool, &q, &filter, action, batch, &actor(by)).await;
        }
        Action::Cancel { queue, id, by } => (true, queue, id, by),
        Action::Retry { queue, id, by } => (false, queue, id, by),
    };
    let q = parse(&queue)?;
    let actor = actor(by);
    let pool = app::pool(&cfg, "longshore-cli").await?;
    let sql = QueueSql::new(q.clone());
    let mut tx = db::begin(&pool, db::Deadline::Statement).await?;
    let answer = if cancel {
        let c = store::cancel_job(&mut tx, &sql, id, &actor).await?;
        tx.commit().await?;
        if c == Cancel::Unknown {
            return Err(CliError::usage(anyhow!(
                "E_UNKNOWN_JOB: {queue} has no job {id}"
            )));
        }
        serde_json::json!({"queue": q.as_str(), "id": id, "outcome": c, "by": actor})
    } else {
        let r = store::retry_now(&mut tx, &sql, id, &actor).await?;
        tx.commit().await?;
        serde_json::json!({"queue": q.as_str(), "id": id, "outcome": r, "by": actor})
    };
    println!("{answer}");
    Ok(())
}
