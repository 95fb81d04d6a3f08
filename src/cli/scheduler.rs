//! `longshore scheduler`: fires the configured schedules (any number of replicas).

use longshore_workers::scheduler::{self, Schedule};
use longshore_workers::telemetry;

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> CliResult {
    let cfg = app::config()?;
    let schedules = compile(&cfg)?;
    if cfg.scheduler.metrics_port != 0 {
        let addr = ([0, 0, 0, 0], cfg.scheduler.metrics_port).into();
        telemetry::init_metrics(Some(addr))
            .map_err(|e| CliError::usage(anyhow::anyhow!("metrics: {e}")))?;
    }
    let pool = app::pool(&cfg, "longshore-scheduler").await?;
    let stop = app::shutdown_on_signals();
    let sampler = (cfg.scheduler.metrics_port != 0).then(|| {
        tokio::spawn(telemetry::sample_queues(
            pool.clone(),
            cfg.metrics.sample_interval,
            stop.clone(),
        ))
    });
    scheduler::run(pool, schedules, stop).await;
    if let Some(s) = sampler {
        let _ = s.await;
    }
    Ok(())
}

/// The enabled schedules, checked against the job kinds.
pub fn compile(cfg: &longshore_workers::Config) -> Result<Vec<Schedule>, CliError> {
    let registry = app::door_registry(cfg)?;
    cfg.schedules
        .iter()
        .filter(|s| s.enabled)
        .map(|s| Schedule::compile(s, &registry).map_err(CliError::usage))
        .collect()
}
