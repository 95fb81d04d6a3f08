//! Migrates `DATABASE_URL` with the SQL migrations of a directory (the runtime's
//! PostgreSQL setup, pgmq included, then the directory's files), creating no queue.
//! For tooling that needs the schema before anything that checks SQL against it can
//! build (`.ci/sqlx-prepare`): `cargo run -p longshore-workers --example migrate --
//! migrations`.

use std::path::Path;

use longshore_workers::{Registry, db};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: migrate MIGRATIONS_DIR")?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let migrator = sqlx::migrate::Migrator::new(Path::new(&dir)).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    db::migrate(&pool, &migrator, &Registry::new()).await?;
    println!("migrated with {dir}");
    Ok(())
}
