//! `longshore migrate`.

use super::app::{self, CliResult};

pub async fn run() -> CliResult {
    let cfg = app::config()?;
    let pool = app::pool(&cfg, "longshore-migrate").await?;
    app::migrate(&pool, &cfg).await?;
    let kinds: Vec<_> = app::door_registry(&cfg)?.kinds().collect();
    println!("migrated; queues: {}", kinds.join(", "));
    Ok(())
}
