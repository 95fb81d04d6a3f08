//! `longshore enqueue QUEUE JSON [--delay 10s] [--key K]`.

use std::time::Duration;

use anyhow::anyhow;
use longshore_workers::{EnqueueOptions, QueueName, enqueue_json};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// The queue (= job kind).
    pub queue: String,
    /// The job's args as JSON.
    pub json: String,
    /// Visible after this long ("10s", "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Idempotency key: a repeat within the TTL returns the first job's id.
    #[arg(long)]
    pub key: Option<String>,
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let queue = QueueName::parse(&args.queue).map_err(CliError::usage)?;
    let registry = app::door_registry(&cfg)?;
    if !registry.contains(queue.as_str()) {
        let known: Vec<_> = registry.kinds().collect();
        return Err(CliError::usage(anyhow!(
            "unknown queue \"{queue}\"; known: {}",
            known.join(", ")
        )));
    }
    let body: serde_json::Value = serde_json::from_str(&args.json)
        .map_err(|e| CliError::usage(anyhow!("args are not JSON: {e}")))?;
    registry
        .validate(queue.as_str(), &body)
        .map_err(|e| CliError::usage(anyhow!("args do not fit {queue}: {e}")))?;
    let pool = app::pool(&cfg, "longshore-enqueue").await?;
    let opts = EnqueueOptions {
        delay: args.delay,
        idempotency_key: args.key,
        idempotency_ttl: Some(cfg.enqueue.idempotency_ttl),
        ..Default::default()
    };
    let e = enqueue_json(&pool, &queue, body, opts).await?;
    println!(
        "{}",
        serde_json::json!({"queue": queue.as_str(), "id": e.id, "duplicate": e.duplicate})
    );
    Ok(())
}
