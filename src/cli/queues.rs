//! `longshore queues [--json]`: a row per queue.

use longshore_workers::QueueName;
use longshore_workers::db;
use longshore_workers::store::{self, QueueSql, QueueStats};

use super::app::{self, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let pool = app::pool(&cfg, "longshore-cli").await?;
    // A session per statement (a short transaction each through a pooler; see
    // `longshore_workers::db::Session`).
    let st = db::Deadline::Statement;
    let mut rows = Vec::new();
    for name in db::run(&pool, st, async |c| store::existing_queues(c).await).await? {
        let Ok(q) = QueueName::parse(&name) else {
            continue;
        };
        let sql = QueueSql::new(q);
        rows.push(db::run(&pool, st, async |c| sql.stats(c).await).await?);
    }
    if args.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({
                    "queue": r.queue, "visible": r.visible, "in_flight": r.in_flight, "delayed": r.delayed,
                    "oldest_age_seconds": r.oldest_age_seconds, "dead_letters": r.dead_letters, "archived": r.archived,
                    "paused": r.paused,
                })
            );
        }
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

fn table(rows: &[QueueStats]) -> String {
    let mut out = format!(
        "{:<24} {:>9} {:>9} {:>9} {:>12} {:>9} {:>10} {:>7}\n",
        "QUEUE", "VISIBLE", "IN_FLIGHT", "DELAYED", "OLDEST_AGE", "DEAD", "ARCHIVED", "PAUSED"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<24} {:>9} {:>9} {:>9} {:>11.1}s {:>9} {:>10} {:>7}\n",
            r.queue,
            r.visible,
            r.in_flight,
            r.delayed,
            r.oldest_age_seconds,
            r.dead_letters,
            r.archived,
            if r.paused { "yes" } else { "" }
        ));
    }
    out
}
