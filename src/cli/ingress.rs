//! `longshore ingress`: the HTTP ingress.

use std::sync::Arc;

use longshore_workers::config::Config;
use longshore_workers::ingress::Ingress;
use longshore_workers::{db, telemetry};
use tokio_util::sync::CancellationToken;

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Listen address (overrides ingress.listen), e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: Option<String>,
}

pub async fn run(args: Args) -> CliResult {
    let mut cfg = (*app::config()?).clone();
    if let Some(l) = args.listen {
        cfg.ingress.listen = l;
    }
    cfg.validate().map_err(CliError::usage)?;
    let cfg = Arc::new(cfg);
    let metrics = telemetry::init_metrics(None).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    // Lazy: the ingress starts (and answers 503 + Retry-After) while the database is
    // down, instead of refusing to start.
    let pool = app::pool_lazy(&cfg, "longshore-ingress")?;
    let stop = app::shutdown_on_signals();
    serve(pool, cfg, metrics, stop).await
}

/// Binds, announces where it listens, samples queue gauges and serves until `stop`.
pub async fn serve(
    pool: sqlx::PgPool,
    cfg: Arc<Config>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) -> CliResult {
    // The ingress answers 503 rather than wait long for a connection.
    let mut dbcfg = cfg.database.clone();
    dbcfg.acquire_timeout = cfg.ingress.db_timeout;
    let ingress_pool = db::connect_like(&pool, &dbcfg, "longshore-ingress");
    // Checked before the port is bound: a refused configuration never listens.
    let registry = app::door_registry(&cfg)?;
    longshore_workers::ingress::check_config(&cfg, &registry)
        .map_err(|e| CliError::usage(anyhow::anyhow!("configuration: {e}")))?;
    let listener = tokio::net::TcpListener::bind(&cfg.ingress.listen)
        .await
        .map_err(|e| {
            CliError::usage(anyhow::anyhow!(
                "ingress.listen {}: {e}",
                cfg.ingress.listen
            ))
        })?;
    let addr = listener.local_addr()?;
    eprintln!("longshore ingress listening on http://{addr}");
    tracing::info!(%addr, "ingress listening");
    let sampler = tokio::spawn(telemetry::sample_queues(
        pool,
        cfg.metrics.sample_interval,
        stop.clone(),
    ));
    let ingress = Ingress::new(ingress_pool, registry, cfg, Some(metrics));
    ingress.serve(listener, stop).await?;
    let _ = sampler.await;
    Ok(())
}
