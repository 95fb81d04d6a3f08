//! `longshore dev`: ingress, workers and scheduler in one process on the embedded
//! default, with the `dev` configuration overlay (a known token, a demo schedule).

use longshore_workers::{Config, Worker, scheduler, telemetry};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> CliResult {
    let cfg = Config::load_with_default_env(&app::LAYERS, "dev").map_err(CliError::usage)?;
    telemetry::init_logging(&cfg.log);
    let cfg = std::sync::Arc::new(cfg);
    let schedules = super::scheduler::compile(&cfg)?;
    let metrics = telemetry::init_metrics(None).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let (pool, cluster) = app::embedded_default(&cfg, "longshore-dev").await?;
    let result = async {
        app::migrate(&pool, &cfg).await?;
        let seeded = longshore_jobs::billing::seed::seed_demo(&pool).await?;
        if seeded > 0 {
            tracing::info!(customers = seeded, "seeded the demo billing customers (1001-1004)");
        }
        let watchers = longshore_jobs::market::seed::seed_demo_watchers(&pool).await?;
        if watchers > 0 {
            tracing::info!(watchers, "seeded the demo watchers (BTC/USDT 1m, ETH/USDT 5m, SOL/USDT 15m) on the market simulator");
        }
        // The vault's directory, so the first regenerate_vault has somewhere to write.
        if let Ok(b) = longshore_jobs::billing::config::BillingConfig::from_config_for(
            &cfg,
            longshore_jobs::Clients::Skip,
        ) && let Some(dir) = std::path::Path::new(&b.vault_path).parent()
            && !b.vault_path.is_empty()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::error!(dir = %dir.display(), error = %e, "dev: cannot create the vault directory");
        }
        let stop = app::shutdown_on_signals();
        let traffic = longshore_jobs::billing::traffic::TrafficConfig::from_config(&cfg)
            .map_err(CliError::usage)?;
        let traffic = traffic.enabled().then(|| {
            tokio::spawn(longshore_jobs::billing::traffic::simulate(
                traffic,
                stop.clone(),
            ))
        });
    app::survive_file_size_limit();
        let worker = Worker::new(pool.clone(), app::registry(&cfg)?, cfg.clone());
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
        if let Some(t) = traffic {
            t.await?;
        }
        served
    }
    .await;
    // Bounded: closing waits for every connection, and a database that does not answer
    // must not keep the process from exiting.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), pool.close()).await;
    if let Some(pg) = cluster {
        tokio::task::spawn_blocking(move || pg.stop()).await??;
    }
    result
}
