//! `longshore worker [--queues a,b] [--concurrency N]`.

use std::sync::Arc;

use longshore_workers::Worker;
use longshore_workers::telemetry;

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Queues to work (comma-separated); default: every registered kind.
    #[arg(long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Handlers running at once per queue (overrides worker.concurrency).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Serve /metrics on this port (overrides worker.metrics_port; 0 = off).
    #[arg(long)]
    pub metrics_port: Option<u16>,
}

pub async fn run(args: Args) -> CliResult {
    let mut cfg = (*app::config()?).clone();
    if let Some(c) = args.concurrency {
        cfg.worker.concurrency = c;
        for q in cfg.queues.values_mut() {
            q.concurrency = None;
        }
    }
    if let Some(p) = args.metrics_port {
        cfg.worker.metrics_port = p;
    }
    cfg.validate().map_err(CliError::usage)?;
    let cfg = Arc::new(cfg);
    if cfg.worker.metrics_port != 0 {
        let addr = ([0, 0, 0, 0], cfg.worker.metrics_port).into();
        telemetry::init_metrics(Some(addr))
            .map_err(|e| CliError::usage(anyhow::anyhow!("metrics: {e}")))?;
    }
    let pool = app::pool(&cfg, "longshore-worker").await?;
    let stop = app::shutdown_on_signals();
    app::survive_file_size_limit();
    let sampler = (cfg.worker.metrics_port != 0).then(|| {
        tokio::spawn(telemetry::sample_queues(
            pool.clone(),
            cfg.metrics.sample_interval,
            stop.clone(),
        ))
    });
    let mut worker = Worker::new(pool, app::registry(&cfg)?, cfg);
    if !args.queues.is_empty() {
        worker = worker.only(&args.queues).map_err(CliError::usage)?;
    }
    worker.run(stop).await?;
    if let Some(s) = sampler {
        let _ = s.await;
    }
    Ok(())
}
