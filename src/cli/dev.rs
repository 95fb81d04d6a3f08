//! `longshore dev`: the whole fleet in one process on the embedded default.

use longshore_workers::Worker;

use super::app::{self, CliResult};

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> CliResult {
    let cfg = app::config()?;
    let (pool, cluster) = app::embedded_default(&cfg, "longshore-dev").await?;
    let result = async {
        app::migrate(&pool).await?;
        let worker = Worker::new(pool.clone(), longshore_jobs::registry(), cfg.clone());
        println!(
            "longshore dev: working queues {}. Try: longshore enqueue probe '{{\"id\":1,\"effect\":true}}'",
            worker.queue_names().join(", ")
        );
        worker.run(app::shutdown_on_signals()).await?;
        CliResult::Ok(())
    }
    .await;
    pool.close().await;
    if let Some(pg) = cluster {
        tokio::task::spawn_blocking(move || pg.stop()).await??;
    }
    result
}
