//! What every command shares: configuration, logging, the database, signals.

use std::sync::Arc;

use anyhow::Context as _;
use longshore_workers::config::Config;
use longshore_workers::db;
use longshore_workers::embedded::{self, Embedded};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The migrations of the whole fleet: runtime and domain, one folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An error with the exit code it deserves: 2 for bad input, 1 for everything else.
pub struct CliError {
    inner: anyhow::Error,
    code: u8,
}

impl CliError {
    pub fn usage(e: impl Into<anyhow::Error>) -> Self {
        CliError {
            inner: e.into(),
            code: 2,
        }
    }
    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError {
            inner: e.into(),
            code: 1,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.inner)
        } else {
            write!(f, "{}", self.inner)
        }
    }
}

pub type CliResult = Result<(), CliError>;

/// The fleet's embedded configuration: the runtime's and the pipelines' defaults, and
/// the `dev` environment (`config/dev.toml`) for `longshore dev` from any directory.
pub const LAYERS: longshore_workers::config::Layers<'static> =
    longshore_jobs::layers(Some(include_str!("../../config/dev.toml")));

/// Loads and validates configuration (every pipeline setting; the secrets of outside
/// clients are checked where a handler runs: the worker, `dev`), installs logging.
pub fn config() -> Result<Arc<Config>, CliError> {
    let cfg = Config::load(&LAYERS).map_err(CliError::usage)?;
    longshore_workers::telemetry::init_logging(&cfg.log);
    door_registry(&cfg)?;
    Ok(Arc::new(cfg))
}

/// Every job kind, with its pipeline settings from `cfg` (a bad one is a usage error).
pub fn registry(cfg: &Config) -> Result<longshore_workers::Registry, CliError> {
    longshore_jobs::registry(cfg).map_err(CliError::usage)
}

/// The job kinds for a process that checks and enqueues but runs no handler: it needs
/// none of the outside services' secrets.
pub fn door_registry(cfg: &Config) -> Result<longshore_workers::Registry, CliError> {
    longshore_jobs::door_registry(cfg).map_err(CliError::usage)
}

/// The configured database (DATABASE_URL / database.url), required.
pub async fn pool(cfg: &Config, app: &str) -> Result<PgPool, CliError> {
    let url = cfg.database_url().ok_or_else(|| {
        CliError::usage(anyhow::anyhow!(
            "no database configured: set DATABASE_URL (or LONGSHORE__DATABASE__URL); `longshore dev` runs without one"
        ))
    })?;
    Ok(db::connect(url, &cfg.database, app).await?)
}

/// Like [`pool`], but connects on first use.
pub fn pool_lazy(cfg: &Config, app: &str) -> Result<PgPool, CliError> {
    let url = cfg.database_url().ok_or_else(|| {
        CliError::usage(anyhow::anyhow!(
            "no database configured: set DATABASE_URL (or LONGSHORE__DATABASE__URL)"
        ))
    })?;
    Ok(db::connect_lazy(url, &cfg.database, app)?)
}

/// The embedded default: the configured database; else a `longshore` database on
/// 127.0.0.1:5432; else a private cluster under `dev.data_dir`, stopped by the caller.
pub async fn embedded_default(
    cfg: &Config,
    app: &str,
) -> Result<(PgPool, Option<Embedded>), CliError> {
    if let Some(url) = cfg.database_url() {
        return Ok((db::connect(url, &cfg.database, app).await?, None));
    }
    let (server, cluster) = if embedded::local_server_listening() {
        info!("using the PostgreSQL server on 127.0.0.1:5432");
        ("postgres://postgres@127.0.0.1:5432".to_string(), None)
    } else {
        let dir = std::path::PathBuf::from(&cfg.dev.data_dir);
        let pg = tokio::task::spawn_blocking(move || Embedded::start(&dir))
            .await
            .context("starting the private cluster")??;
        (
            format!("postgres://postgres@127.0.0.1:{}", pg.port()),
            Some(pg),
        )
    };
    let admin = db::connect(&format!("{server}/postgres"), &cfg.database, app).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'longshore')")
            .fetch_one(&admin)
            .await?;
    if !exists
        && let Err(e) = sqlx::query("CREATE DATABASE longshore")
            .execute(&admin)
            .await
    {
        warn!(error = %e, "could not create database longshore (another process may have)");
    }
    admin.close().await;
    let pool = db::connect(&format!("{server}/longshore"), &cfg.database, app).await?;
    Ok((pool, cluster))
}

/// Migrates with every job kind this build knows.
pub async fn migrate(pool: &PgPool, cfg: &Config) -> CliResult {
    db::migrate(pool, &MIGRATOR, &door_registry(cfg)?).await?;
    Ok(())
}

/// Makes a write past `ulimit -f` (a full disk's cousin) fail with EFBIG instead of
/// killing the process with SIGXFSZ, so the job that wrote reports and retries.
pub fn survive_file_size_limit() {
    const SIGXFSZ: i32 = 25;
    if let Ok(mut s) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ))
    {
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                warn!("a write exceeded the file size limit (SIGXFSZ)");
            }
        });
    }
}

/// A token cancelled on SIGTERM or SIGINT; a second signal exits at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                info!("shutdown requested: no new jobs; draining");
                t.cancel();
            } else {
                warn!("second signal: exiting now; unfinished jobs run again after their lease");
                std::process::exit(130);
            }
        }
    });
    token
}

/// A progress bar on stderr for long CLI work (`total` known: a bar; else a spinner with
/// a count). indicatif hides it when stderr is not a terminal, so logs and pipes stay
/// quiet.
pub fn progress(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let pb = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
                .expect("a valid template")
                .progress_chars("=> "),
        ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                .expect("a valid template"),
        ),
    };
    pb.set_message(what.to_string());
    pb
}
