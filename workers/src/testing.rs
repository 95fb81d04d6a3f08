//! Test kit shared by the runtime's tests, the job kinds' tests and users' own tests.
//!
//! [`TestDb::create`] gives each test its own database, cloned from a template that
//! already has pgmq, the migrations and the queues (built once per migration set, under
//! an advisory lock, so concurrent test processes agree). The server is found like
//! `longshore dev` finds it: `DATABASE_URL`, else 127.0.0.1:5432, else a private
//! cluster under the temp directory, started once and left running for later runs.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::embedded::{self, Embedded};
use crate::registry::Registry;

/// The admin URL (database `postgres`) of the server tests use.
pub fn server_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        let opts = PgConnectOptions::from_str(&url).expect("DATABASE_URL is a valid URL");
        return opts.database("postgres").to_url_lossy().to_string();
    }
    if embedded::local_server_listening() {
        return "postgres://postgres@127.0.0.1:5432/postgres".into();
    }
    let dir = std::env::var_os("LONGSHORE_TEST_PG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("longshore-test-pg"));
    std::fs::create_dir_all(&dir).expect("create test cluster dir");
    // One process starts the cluster; the others wait on the lock and reuse it.
    let lock = std::fs::File::create(std::env::temp_dir().join("longshore-test-pg.lock"))
        .expect("lock file");
    lock.lock().expect("lock test cluster");
    let pg = Embedded::start(&dir).expect("start a private PostgreSQL for tests");
    let url = pg.url("postgres");
    drop(lock);
    url
}

/// A database of one's own, migrated, with every registered queue.
pub struct TestDb {
    pub name: String,
    /// URL of this database (give it to a spawned `longshore` as `DATABASE_URL`).
    pub url: String,
    pub pool: PgPool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    pub async fn create(migrator: &Migrator, registry: &Registry) -> TestDb {
        let admin_url = server_url();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test server");
        let template = ensure_template(&mut admin, &admin_url, migrator, registry).await;
        drop_orphans(&mut admin).await;
        let name = format!(
            "ls_t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop stale test db");
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut admin)
            .await
            .expect("create test db");
        let url = PgConnectOptions::from_str(&admin_url)
            .expect("valid")
            .database(&name)
            .to_url_lossy()
            .to_string();
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect to test db");
        TestDb { name, url, pool }
    }
}

async fn ensure_template(
    admin: &mut PgConnection,
    admin_url: &str,
    migrator: &Migrator,
    registry: &Registry,
) -> String {
    let mut h = DefaultHasher::new();
    for m in migrator.iter() {
        m.version.hash(&mut h);
        m.checksum.hash(&mut h);
    }
    registry.kinds().for_each(|k| k.hash(&mut h));
    crate::store::QUEUE_OBJECTS_VERSION.hash(&mut h);
    let template = format!("ls_tmpl_{:016x}", h.finish());
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(crate::locks::TEST_TEMPLATE)
        .execute(&mut *admin)
        .await
        .expect("template lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut *admin)
            .await
            .expect("query pg_database");
    if !exists {
        let building = format!("{template}_build");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .execute(&mut *admin)
            .await
            .expect("drop half-built template");
        sqlx::query(&format!("CREATE DATABASE {building}"))
            .execute(&mut *admin)
            .await
            .expect("create template");
        let url = PgConnectOptions::from_str(admin_url)
            .expect("valid")
            .database(&building)
            .to_url_lossy()
            .to_string();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect template");
        crate::db::migrate(&pool, migrator, registry)
            .await
            .expect("migrate template");
        pool.close().await;
        sqlx::query(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(&mut *admin)
            .await
            .expect("publish template");
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(crate::locks::TEST_TEMPLATE)
        .execute(&mut *admin)
        .await
        .expect("template unlock");
    template
}

/// Drops test databases whose creating process is gone.
async fn drop_orphans(admin: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'ls\\_t\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for n in names {
        let pid = n.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}
