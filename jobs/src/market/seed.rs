//! Demo watchers and positions for `longshore dev`, delivered the way the app does:
//! as `sync_watcher` jobs (so a new pair is backfilled and its win-rate appears at once).

use longshore_workers::{EnqueueOptions, enqueue};
use serde_json::json;
use sqlx::PgPool;

use super::sync_watcher::SyncWatcher;

/// The demo user and what it watches.
pub const DEMO_USER: &str = "00000000-0000-4000-8000-000000000001";
pub const DEMO_WATCHERS: [(&str, &str, &str); 3] = [
    ("00000000-0000-4000-8000-000000000b01", "BTC/USDT", "1m"),
    ("00000000-0000-4000-8000-000000000e05", "ETH/USDT", "5m"),
    ("00000000-0000-4000-8000-000000000515", "SOL/USDT", "15m"),
];

/// Enqueues one INSERT delivery per demo watcher (once: keyed), and gives each demo
/// symbol a small position so the guardrails have a book to read. Returns how many
/// deliveries were new.
pub async fn seed_demo_watchers(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut new = 0;
    for (id, symbol, tf) in DEMO_WATCHERS {
        let body = json!({"type": "INSERT", "table": "watchers", "schema": "public", "record": {
            "id": id, "user_id": DEMO_USER, "symbol": symbol, "timeframe": tf,
            "strategy": {"name": "v1"}, "active": true}, "old_record": null});
        let args: SyncWatcher = serde_json::from_value(body).expect("a valid demo delivery");
        let e = enqueue(
            pool,
            &args,
            EnqueueOptions::default().key(format!("dev:watcher:{id}")),
        )
        .await
        .map_err(|e| e.into_sqlx())?;
        if !e.duplicate {
            new += 1;
        }
        sqlx::query(
            "INSERT INTO positions (symbol, size, portfolio_value) VALUES ($1, 5000, 100000) ON CONFLICT DO NOTHING",
        )
        .bind(symbol)
        .execute(pool)
        .await?;
    }
    Ok(new)
}
