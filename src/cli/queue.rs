//! `longshore queue pause|resume QUEUE`: operator controls of one queue.

use anyhow::anyhow;
use longshore_workers::QueueName;
use longshore_workers::db;
use longshore_workers::store;

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Stop every worker claiming from the queue (fleet-wide, from each one's next
    /// claim); enqueues are still taken and running jobs finish.
    Pause {
        queue: String,
        /// Why, recorded with the pause.
        #[arg(long)]
        reason: Option<String>,
        /// Who, recorded with the action [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
    },
    /// Let workers claim from the queue again (they are woken at once).
    Resume {
        queue: String,
        /// Who, recorded with the action [default: cli:$USER].
        #[arg(long)]
        by: Option<String>,
    },
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let (queue, paused, reason, by) = match args.action {
        Action::Pause { queue, reason, by } => (queue, true, reason, by),
        Action::Resume { queue, by } => (queue, false, None, by),
    };
    let q = QueueName::parse(&queue).map_err(|e| CliError::usage(anyhow!("{queue:?}: {e}")))?;
    let actor = super::job::actor(by);
    let pool = app::pool(&cfg, "longshore-cli").await?;
    let existing = db::run(&pool, db::Deadline::Statement, async |c| {
        store::existing_queues(c).await
    })
    .await?;
    if !existing.iter().any(|e| e == q.as_str()) {
        return Err(CliError::usage(anyhow!(
            "E_UNKNOWN_QUEUE: there is no queue {queue:?} (`longshore queues` lists them)"
        )));
    }
    let mut tx = db::begin(&pool, db::Deadline::Statement).await?;
    let changed = store::set_paused(&mut tx, &q, paused, &actor, reason.as_deref()).await?;
    tx.commit().await?;
    println!(
        "{}",
        serde_json::json!({"queue": q.as_str(), "paused": paused, "changed": changed, "by": actor})
    );
    Ok(())
}
