//! `longshore dlq list|retry|purge QUEUE [ID…]`.

use anyhow::anyhow;
use longshore_workers::QueueName;
use longshore_workers::db;
use longshore_workers::store::{self, BulkAction, BulkFilter, BulkState, QueueSql};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// List dead letters (all of the queue's, or the given ids) as JSON lines.
    List {
        queue: String,
        ids: Vec<i64>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Re-send dead letters to their queue as fresh jobs (attempts start over). With no
    /// ids, all of the queue's, in transactions of --batch each.
    Retry {
        queue: String,
        ids: Vec<i64>,
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
    /// Delete dead letters (all of the queue's when no ids are given).
    Purge { queue: String, ids: Vec<i64> },
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let parse = |q: &str| QueueName::parse(q).map_err(|e| CliError::usage(anyhow!("{q:?}: {e}")));
    let pool = app::pool(&cfg, "longshore-cli").await?;
    let by = super::job::actor(None);
    match args.action {
        Action::List { queue, ids, limit } => {
            let q = parse(&queue)?;
            let found = db::run(&pool, db::Deadline::Statement, async |c| {
                store::dead_letters(c, &q, &ids, limit).await
            })
            .await?;
            for d in found {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        Action::Retry { queue, ids, batch } => {
            let q = parse(&queue)?;
            if batch < 1 {
                return Err(CliError::usage(anyhow!("--batch must be at least 1")));
            }
            let sql = QueueSql::new(q.clone());
            if !ids.is_empty() {
                // Recorded as the console's and the API's are.
                let mut tx = db::begin(&pool, db::Deadline::Statement).await?;
                let done = store::dead_letter_action(&mut tx, &sql, &ids, true, &by).await?;
                tx.commit().await?;
                let moved = done["resent"].as_array().cloned().unwrap_or_default();
                for pair in &moved {
                    println!(
                        "{}",
                        serde_json::json!({"dead_letter": pair[0], "queue": q.as_str(), "id": pair[1]})
                    );
                }
                eprintln!("re-sent {} dead letter(s) to {q}", moved.len());
            } else {
                // All of them: the bulk action (bounded batches, each its own
                // transaction, up to the newest dead letter there was when we started;
                // recorded; a progress bar on a terminal).
                super::job::run_bulk(&pool, &q, &all_dead(), BulkAction::Retry, batch, &by).await?;
            }
        }
        Action::Purge { queue, ids } => {
            let q = parse(&queue)?;
            if ids.is_empty() {
                super::job::run_bulk(&pool, &q, &all_dead(), BulkAction::Purge, 1000, &by).await?;
            } else {
                let sql = QueueSql::new(q.clone());
                let mut tx = db::begin(&pool, db::Deadline::Statement).await?;
                let done = store::dead_letter_action(&mut tx, &sql, &ids, false, &by).await?;
                tx.commit().await?;
                eprintln!("purged {} dead letter(s) from {q}", done["affected"]);
            }
        }
    }
    Ok(())
}

fn all_dead() -> BulkFilter {
    BulkFilter {
        state: BulkState::Dead,
        error: None,
        older_than: None,
    }
}
