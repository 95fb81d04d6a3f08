//! `longshore migrate`.

use super::app::{self, CliResult};

pub async fn run() -> CliResult {
    let cfg = app::config()?;
    let pool = app::pool(&cfg, "longshore-migrate").await?;
    app::migrate(&pool).await?;
    let kinds: Vec<_> = longshore_jobs::registry().kinds().collect();
    println!("migrated; queues: {}", kinds.join(", "));
    Ok(())
}
