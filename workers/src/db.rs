//! Connection pools and migrations.

use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool, Postgres, Transaction};
use tracing::info;

use crate::config::{DatabaseConfig, Pooler};
use crate::queue_name::QueueName;
use crate::registry::Registry;
use crate::store;

/// Why a pool, a migration or the pgmq install failed. No variant holds the URL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is not echoed: it may hold a password.
    #[error("database url is not valid (check DATABASE_URL / database.url)")]
    BadUrl,
    /// The server could not be reached or refused the session.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A statement failed.
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    /// A migration failed or the applied ones differ from the binary's.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// pgmq's embedded SQL did not install.
    #[error("pgmq install failed: {0}")]
    Pgmq(String),
    /// Migrations hold a session-level advisory lock across many transactions, which a
    /// transaction-mode pooler cannot give.
    #[error(
        "E_MIGRATE_POOLER: migrations need a session of their own; run `longshore migrate` against the server directly (a DATABASE_URL without the pooler, database.pooler = \"none\")"
    )]
    MigrateThroughPooler,
    /// A second pool asked for another `database.pooler` than the first.
    #[error(
        "E_POOLER_CONFLICT: this process already connected with another database.pooler; one process reaches its database one way"
    )]
    PoolerConflict,
    /// Startup options from the URL (`?options=`) or `PGOPTIONS`, which a
    /// transaction-mode pooler refuses.
    #[error(
        "E_POOLER_OPTIONS: startup options (the URL's options= or PGOPTIONS) cannot pass a transaction-mode pooler; remove them (the fleet sets its timeouts per transaction)"
    )]
    PoolerOptions,
}

/// How this process reaches its database, set by the first pool made from the
/// configuration ([`connect`], [`connect_lazy`]): a process talks to its database one
/// way, and the code that opens sessions and transactions (claims, acknowledgements,
/// `ctx.tx()`, enqueues) asks here rather than carry the setting through every layer.
/// Unset (pools made by hand, tests) means straight to the server.
static POOLED: OnceLock<Option<Pooled>> = OnceLock::new();

/// Through a transaction-mode pooler: the statements that open a transaction, with
/// this process's timeouts (a pooler cannot carry them as startup options).
#[derive(Debug)]
struct Pooled {
    statement: String,
    control: String,
}

fn note_pooler(cfg: &DatabaseConfig) -> Result<(), DbError> {
    let want = match cfg.pooler {
        Pooler::None => None,
        Pooler::Transaction => {
            let ms = |d: Duration| d.as_millis();
            // Custom plans, as the startup option asks on a direct connection: behind a
            // pooler that keeps prepared statements (PgBouncer >= 1.21 with
            // `max_prepared_statements`) one statement serves every client, and a
            // generic plan made while a queue was small would walk it once it is big.
            let head = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";
            // A zero statement timeout is left to the role's default, as on a direct
            // connection (where 0 sends no option).
            let statement = if cfg.statement_timeout.is_zero() {
                head.to_string()
            } else {
                format!(
                    "{head}; SET LOCAL statement_timeout = {}",
                    ms(cfg.statement_timeout)
                )
            };
            Some(Pooled {
                statement,
                control: format!(
                    "{head}; SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
                    ms(cfg.control_timeout),
                    ms(cfg.control_lock_timeout)
                ),
            })
        }
    };
    let pooled = want.is_some();
    let had = POOLED.get_or_init(|| want);
    // One process, one way to its database: sessions and transactions ask the mode
    // here, so a second pool made another way would be driven wrongly.
    if had.is_some() != pooled {
        return Err(DbError::PoolerConflict);
    }
    Ok(())
}

/// True when this process reaches PostgreSQL through a transaction-mode pooler: no
/// LISTEN (consumers and `?wait` poll), every statement inside a transaction.
pub fn pooled() -> bool {
    matches!(POOLED.get(), Some(Some(_)))
}

/// Which timeouts a session or transaction gets through a pooler (on a direct
/// connection the pool's startup options set them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `database.statement_timeout`: handlers, enqueues, the ingress, the scheduler.
    Statement,
    /// `database.control_timeout` and `control_lock_timeout`: claims, outcome writes,
    /// heartbeats.
    Control,
}

fn pooled_begin(d: Deadline) -> Option<&'static str> {
    let p = POOLED.get()?.as_ref()?;
    Some(match d {
        Deadline::Statement => &p.statement,
        Deadline::Control => &p.control,
    })
}

/// Opens a transaction on `pool`. Through a pooler it begins with this process's
/// timeouts (one round trip: `BEGIN; SET LOCAL …`).
pub async fn begin(
    pool: &PgPool,
    d: Deadline,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    match pooled_begin(d) {
        None => pool.begin().await,
        Some(stmt) => begin_pooled(pool, stmt).await,
    }
}

/// `pool.begin_with(stmt)` on a task of its own, so that a caller's timeout cannot cut
/// it short. sqlx counts a transaction as begun only once the server has answered the
/// BEGIN; dropped while waiting, it queues no ROLLBACK, and the connection goes back to
/// its pool inside a transaction, which a transaction-mode pooler then keeps tied to
/// that idle client (one server fewer for everybody, at the moment the pooler is
/// already slow). On its own task the begin finishes; a transaction nobody awaits any
/// more is dropped there and rolls back properly.
async fn begin_pooled(
    pool: &PgPool,
    stmt: &'static str,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin_with(stmt).await })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e.to_string())))?
}

/// [`begin`] on a connection already held.
pub async fn begin_on(
    conn: &mut PgConnection,
    d: Deadline,
) -> Result<Transaction<'_, Postgres>, sqlx::Error> {
    use sqlx::Connection;
    match pooled_begin(d) {
        // Inside a transaction already: a savepoint (sqlx refuses a custom BEGIN there).
        Some(stmt) if !conn.is_in_transaction() => conn.begin_with(stmt).await,
        _ => conn.begin().await,
    }
}

/// Where statements that need no transaction of their own run: a pooled connection
/// straight to the server; through a transaction-mode pooler, a transaction.
///
/// sqlx parses a statement and binds it in two round trips; a pooler in transaction
/// mode may hand a server back to its pool between them when no transaction is open,
/// and the bind then meets another server (where the statement does not exist, or,
/// worse, another client's statement of the same name does). Inside a transaction
/// both reach the same server. End with [`Session::finish`]: dropped, a pooled
/// session rolls back.
#[must_use = "finish a session: dropped, a pooled one rolls back"]
pub struct Session(SessionConn);

enum SessionConn {
    Direct(PoolConnection<Postgres>),
    Pooled(Transaction<'static, Postgres>),
}

impl Session {
    /// A connection from `pool`; through a transaction-mode pooler, a transaction
    /// opened with `d`'s timeouts.
    pub async fn open(pool: &PgPool, d: Deadline) -> Result<Session, sqlx::Error> {
        Ok(Session(match pooled_begin(d) {
            None => SessionConn::Direct(pool.acquire().await?),
            Some(stmt) => SessionConn::Pooled(begin_pooled(pool, stmt).await?),
        }))
    }

    /// Commits a pooled session; a direct one goes back to its pool.
    pub async fn finish(self) -> Result<(), sqlx::Error> {
        match self.0 {
            SessionConn::Direct(_) => Ok(()),
            SessionConn::Pooled(tx) => tx.commit().await,
        }
    }
}

impl Deref for Session {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match &self.0 {
            SessionConn::Direct(c) => c,
            SessionConn::Pooled(t) => t,
        }
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.0 {
            SessionConn::Direct(c) => c,
            SessionConn::Pooled(t) => t,
        }
    }
}

/// Runs `f` in a [`Session`] on `pool` and finishes it: the way the runtime runs a
/// statement (or a few that need no transaction) on a pool.
pub async fn run<T, E>(
    pool: &PgPool,
    d: Deadline,
    f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
    let mut s = Session::open(pool, d).await?;
    let out = f(&mut s).await?;
    s.finish().await?;
    Ok(out)
}

/// Opens a pool: bounded acquire wait (never hangs), server-side statement timeout,
/// an application name so operators can tell our connections apart.
pub async fn connect(url: &str, cfg: &DatabaseConfig, app: &str) -> Result<PgPool, DbError> {
    note_pooler(cfg)?;
    pool_options(cfg)
        .connect_with(connect_options(url, cfg, app)?)
        .await
        .map_err(DbError::Connect)
}

/// Like [`connect`], but opens connections on first use: a process that must start
/// while the database is down (the ingress answers 503 meanwhile).
pub fn connect_lazy(url: &str, cfg: &DatabaseConfig, app: &str) -> Result<PgPool, DbError> {
    note_pooler(cfg)?;
    Ok(pool_options(cfg).connect_lazy_with(connect_options(url, cfg, app)?))
}

fn pool_options(cfg: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .min_connections(0)
        .acquire_timeout(cfg.acquire_timeout)
        .test_before_acquire(false)
}

fn connect_options(
    url: &str,
    cfg: &DatabaseConfig,
    app: &str,
) -> Result<PgConnectOptions, DbError> {
    let mut opts = PgConnectOptions::from_str(url)
        .map_err(|_| DbError::BadUrl)?
        .application_name(app)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
    if cfg.pooler == Pooler::Transaction {
        // A transaction-mode pooler refuses startup options (PgBouncer: "unsupported
        // startup parameter: options") and cannot keep a prepared statement past the
        // transaction that made it. Without the cache each statement is parsed where it
        // runs and planned for its parameters (a custom plan), which is what
        // `plan_cache_mode` asks for below; timeouts come with each transaction.
        // Nor `extra_float_digits` (PgBouncer refuses it unless told to ignore it;
        // results come in binary anyway).
        if opts.get_options().is_some() {
            return Err(DbError::PoolerOptions);
        }
        return Ok(opts.statement_cache_capacity(0).extra_float_digits(None));
    }
    // Queue tables swing from empty to millions of rows. A generic plan cached while a
    // table was small (a hash join over a sequential scan) makes every later claim
    // O(table); custom plans are made against the table as it is now, for tens of
    // microseconds of planning per statement. Measured: 27 ms vs 0.3 ms per claim of
    // 256 at 200k queued rows.
    opts = opts.options([("plan_cache_mode", "force_custom_plan")]);
    if !cfg.statement_timeout.is_zero() {
        opts = opts.options([(
            "statement_timeout",
            format!("{}", cfg.statement_timeout.as_millis()),
        )]);
    }
    Ok(opts)
}

/// A second pool to the same database as `pool` with other pool settings (the ingress
/// wants a short acquire timeout). Connects lazily.
pub fn connect_like(pool: &PgPool, cfg: &DatabaseConfig, app: &str) -> PgPool {
    let opts = (*pool.connect_options()).clone().application_name(app);
    pool_options(cfg).connect_lazy_with(opts)
}

/// A worker's control pool: the same database as `pool`, `database.control_connections`
/// connections that claims and batched outcome writes share, with the control
/// deadlines on the server side too (`statement_timeout`, `lock_timeout`). Connects
/// lazily.
///
/// sqlx keeps 100 prepared statements per connection; a queue needs about six here, so
/// past about 16 busy queues statements are parsed again. That is kept: sized to hold
/// every queue's, one connection's cache would cost the server about 200 KB a
/// statement (measured: a prepared claim's plan source and query trees), 600 MB per
/// connection at 500 queues.
pub fn control_pool(pool: &PgPool, cfg: &DatabaseConfig) -> PgPool {
    let opts = (*pool.connect_options()).clone();
    let app = format!(
        "{}-control",
        opts.get_application_name().unwrap_or("longshore")
    );
    control_like(opts.application_name(&app), cfg, cfg.control_connections)
}

/// The lease keeper's pool (two connections, the control deadlines), made on the keeper's
/// own runtime, since a pool's connections belong to the runtime that opened them.
pub fn lease_pool(opts: PgConnectOptions, cfg: &DatabaseConfig) -> PgPool {
    let app = format!(
        "{}-leases",
        opts.get_application_name().unwrap_or("longshore")
    );
    control_like(opts.application_name(&app), cfg, 2)
}

fn control_like(opts: PgConnectOptions, cfg: &DatabaseConfig, size: u32) -> PgPool {
    let ms = |d: Duration| d.as_millis().to_string();
    let opts = if cfg.pooler == Pooler::Transaction {
        opts // Set per transaction ([`Deadline::Control`]).
    } else {
        opts.options([
            ("statement_timeout", ms(cfg.control_timeout)),
            ("lock_timeout", ms(cfg.control_lock_timeout)),
        ])
    };
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(cfg.control_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(opts)
}

/// `longshore migrate`: installs pgmq (extension if the server has it, else the
/// embedded SQL), applies the migrations, creates one queue per registered kind.
/// Idempotent; concurrent runs serialise on an advisory lock.
pub async fn migrate(
    pool: &PgPool,
    migrator: &Migrator,
    registry: &Registry,
) -> Result<(), DbError> {
    if pooled() {
        return Err(DbError::MigrateThroughPooler);
    }
    let mut conn = pool.acquire().await.map_err(DbError::Connect)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(crate::locks::MIGRATE)
        .execute(&mut *conn)
        .await?;
    let r = migrate_locked(&mut conn, pool, migrator, registry).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(crate::locks::MIGRATE)
        .execute(&mut *conn)
        .await;
    r
}

async fn migrate_locked(
    conn: &mut sqlx::PgConnection,
    pool: &PgPool,
    migrator: &Migrator,
    registry: &Registry,
) -> Result<(), DbError> {
    install_pgmq(conn, pool).await?;
    migrator.run(&mut *conn).await?;
    for kind in registry.kinds() {
        let name = QueueName::parse(kind).expect("registry validates kinds");
        store::create_queue(conn, &name).await?;
    }
    Ok(())
}

async fn install_pgmq(conn: &mut sqlx::PgConnection, pool: &PgPool) -> Result<(), DbError> {
    let installed_as_sql: bool = sqlx::query_scalar("SELECT to_regclass('pgmq.meta') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let ext_installed: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgmq')")
            .fetch_one(&mut *conn)
            .await?;
    if ext_installed {
        return Ok(());
    }
    let ext_available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if ext_available && !installed_as_sql {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pgmq")
            .execute(&mut *conn)
            .await?;
        info!("installed pgmq as an extension");
        return Ok(());
    }
    // No extension on this server: the pgmq crate's embedded SQL (idempotent: it keeps
    // its own record of applied scripts).
    pgmq::install::install_sql_from_embedded(pool)
        .await
        .map_err(|e| DbError::Pgmq(e.to_string()))?;
    if !installed_as_sql {
        info!("installed pgmq from its embedded SQL");
    }
    Ok(())
}
