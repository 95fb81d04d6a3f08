//! `longshore dev`: ingress, workers and scheduler in one process on the embedded
//! default, with the `dev` configuration overlay (a known token, a demo schedule).

use longshore_workers::{Config, Worker, scheduler, telemetry};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> CliResult {
    let cfg = Config::load_with_default_env("dev").map_err(CliError::usage)?;
    telemetry::init_logging(&cfg.log);
    let cfg = std::sync::Arc::new(cfg);
    let schedules = super::scheduler::compile(&cfg)?;
    let metrics = telemetry::init_metrics(None).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let (pool, cluster) = app::embedded_default(&cfg, "longshore-dev").await?;
    let result = async {
        app::migrate(&pool).await?;
        let stop = app::shutdown_on_signals();
    app::survive_file_size_limit();
        let worker = Worker::new(pool.clone(), longshore_jobs::registry(), cfg.clone());
        let queues = worker.queue_names().join(", ");
        let w = tokio::spawn(worker.run(stop.clone()));
        let s = tokio::spawn(scheduler::run(pool.clone(), schedules, stop.clone()));
        let port = cfg.ingress.listen.rsplit(':').next().unwrap_or("8080").to_string();
        eprintln!(
            "longshore dev: working queues {queues}\n  try: curl -H 'Authorization: Bearer dev-token' -d '{{\"id\":1,\"effect\":true}}' localhost:{port}/v1/queues/probe/jobs\n  then: curl -H 'Authorization: Bearer dev-token' 'localhost:{port}/v1/jobs/probe/<id>?wait=5'"
        );
        let served = super::ingress::serve(pool.clone(), cfg.clone(), metrics, stop.clone()).await;
        stop.cancel();
        w.await??;
        s.await?;
        served
    }
    .await;
    pool.close().await;
    if let Some(pg) = cluster {
        tokio::task::spawn_blocking(move || pg.stop()).await??;
    }
    result
}
