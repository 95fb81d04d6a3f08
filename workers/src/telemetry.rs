//! Logs and metrics: names of every series the runtime exports, the tracing subscriber,
//! and the Prometheus exporter.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub const QUEUE_DEPTH: &str = "longshore_queue_depth";
pub const QUEUE_INFLIGHT: &str = "longshore_queue_inflight";
pub const QUEUE_DELAYED: &str = "longshore_queue_delayed";
pub const QUEUE_OLDEST_AGE: &str = "longshore_queue_oldest_age_seconds";
pub const DEAD_LETTERS: &str = "longshore_dead_letters";
pub const JOBS_TOTAL: &str = "longshore_jobs_total";
pub const JOB_DURATION: &str = "longshore_job_duration_seconds";
pub const JOB_WAIT: &str = "longshore_job_wait_seconds";
pub const STALE_ACKS: &str = "longshore_stale_acks_total";

/// Installs the global tracing subscriber: JSON lines or readable text.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests, `dev` calling into `worker`) is not an error.
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the Prometheus recorder; serves `/metrics` on `listen` when given.
pub fn init_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    let mut b = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(JOB_DURATION.into()), &buckets)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOB_WAIT.into()), &buckets))
        .map_err(|e| e.to_string())?;
    if let Some(addr) = listen {
        b = b.with_http_listener(addr);
        let (recorder, exporter) = b.build().map_err(|e| e.to_string())?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        tokio::spawn(exporter);
        Ok(handle)
    } else {
        b.install_recorder().map_err(|e| e.to_string())
    }
}
