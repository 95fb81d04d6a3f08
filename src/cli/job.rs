//! `longshore job cancel|retry QUEUE ID`: operator actions on one job.

use anyhow::anyhow;
use longshore_workers::QueueName;
use longshore_workers::db;
use longshore_workers::store::{self, Cancel, QueueSql};

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
    let (queue, id, by) = match &args.action {
        Action::Cancel { queue, id, by } | Action::Retry { queue, id, by } => {
            (queue.clone(), *id, by.clone())
        }
    };
    let q = QueueName::parse(&queue).map_err(|e| CliError::usage(anyhow!("{queue:?}: {e}")))?;
    let actor = actor(by);
    let pool = app::pool(&cfg, "longshore-cli").await?;
    let sql = QueueSql::new(q.clone());
    let mut tx = db::begin(&pool, db::Deadline::Statement).await?;
    let answer = match args.action {
        Action::Cancel { .. } => {
            let c = store::cancel_job(&mut tx, &sql, id, &actor).await?;
            tx.commit().await?;
            match c {
                Cancel::Cancelled | Cancel::Requested | Cancel::Final => {}
                Cancel::Unknown => {
                    return Err(CliError::usage(anyhow!(
                        "E_UNKNOWN_JOB: {queue} has no job {id}"
                    )));
                }
            }
            serde_json::json!({"queue": q.as_str(), "id": id, "outcome": c, "by": actor})
        }
        Action::Retry { .. } => {
            let r = store::retry_now(&mut tx, &sql, id, &actor).await?;
            tx.commit().await?;
            serde_json::json!({"queue": q.as_str(), "id": id, "outcome": r, "by": actor})
        }
    };
    println!("{answer}");
    Ok(())
}
