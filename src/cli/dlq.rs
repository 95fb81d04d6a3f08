//! `longshore dlq list|retry|purge QUEUE [ID…]`.

use anyhow::anyhow;
use longshore_workers::QueueName;
use longshore_workers::store::{self, QueueSql};

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
    /// Re-send dead letters to their queue as fresh jobs (attempts start over).
    Retry { queue: String, ids: Vec<i64> },
    /// Delete dead letters (all of the queue's when no ids are given).
    Purge { queue: String, ids: Vec<i64> },
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let parse = |q: &str| QueueName::parse(q).map_err(|e| CliError::usage(anyhow!("{q:?}: {e}")));
    let pool = app::pool(&cfg, "longshore-cli").await?;
    match args.action {
        Action::List { queue, ids, limit } => {
            let q = parse(&queue)?;
            for d in store::dead_letters(&pool, &q, &ids, limit).await? {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        Action::Retry { queue, ids } => {
            let q = parse(&queue)?;
            let mut tx = pool.begin().await?;
            let moved = store::retry_dead_letters(&mut tx, &QueueSql::new(q.clone()), &ids).await?;
            tx.commit().await?;
            for (dl, id) in &moved {
                println!(
                    "{}",
                    serde_json::json!({"dead_letter": dl, "queue": q.as_str(), "id": id})
                );
            }
            eprintln!("re-sent {} dead letter(s) to {q}", moved.len());
        }
        Action::Purge { queue, ids } => {
            let q = parse(&queue)?;
            let n = store::purge_dead_letters(&pool, &q, &ids).await?;
            eprintln!("purged {n} dead letter(s) from {q}");
        }
    }
    Ok(())
}
