//! Test kit shared by the runtime's tests, the job kinds' tests and users' own tests.
//!
//! [`TestDb::create`] gives each test its own database, cloned from a template that
//! already has pgmq, the migrations and the queues (built once per migration set, under
//! an advisory lock, so concurrent test processes agree). The server is found like
//! `longshore dev` finds it: `DATABASE_URL`, else 127.0.0.1:5432, else a private
//! cluster under the temp directory, started once and left running for later runs.
//!
//! For a job author's assertions, in the manner of `Oban.Testing` and `rivertest`:
//! [`all_enqueued`] / [`assert_enqueued`] (what is waiting in a kind's queue),
//! [`results`] / [`job_result`] / [`count_dead`] (what finished), [`visible_at`], [`Fleet`] (a real worker in the
//! test's process, started and stopped in one place) and [`drain`] (run a kind's queue
//! through the real claim, execute and completion path until nothing is due). Tests
//! that use these never name pgmq's tables.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::embedded::{self, Embedded};
use crate::job::JobArgs;
use crate::queue_name::QueueName;
use crate::registry::Registry;
use crate::store::{JobStatus, QueueSql};
use crate::worker::{Worker, WorkerError};

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
    /// The database's name.
    pub name: String,
    /// URL of this database (give it to a spawned `longshore` as `DATABASE_URL`).
    pub url: String,
    /// A pool on this database.
    pub pool: PgPool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// Creates a database from a migrated template (made once per server, migration set and registry), with a queue for every kind of `registry`.
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

/// The queue's validated name (a kind's queue is named after the kind).
fn queue_of(kind: &str) -> QueueName {
    QueueName::parse(kind).unwrap_or_else(|e| panic!("{kind:?} is not a queue name: {e}"))
}

/// The args of every job of kind `A` still in its queue (due, delayed, in backoff or
/// running), oldest first.
pub async fn all_enqueued<A: JobArgs>(pool: &PgPool) -> Vec<A> {
    let q = queue_of(A::KIND);
    let rows: Vec<Value> =
        sqlx::query_scalar(&format!("SELECT message FROM pgmq.q_{q} ORDER BY msg_id"))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("reading queue {q}: {e}"));
    rows.into_iter()
        .map(|m| {
            serde_json::from_value(m.clone())
                .unwrap_or_else(|e| panic!("a {} job's args do not decode ({e}): {m}", A::KIND))
        })
        .collect()
}

/// How many jobs of `kind` are still in its queue (due, delayed, in backoff or
/// running).
pub async fn count_enqueued(pool: &PgPool, kind: &str) -> i64 {
    let q = queue_of(kind);
    sqlx::query_scalar(&format!("SELECT count(*) FROM pgmq.q_{q}"))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("counting queue {q}: {e}"))
}

/// Panics, listing what is there, unless a job of kind `A` whose args contain `subset`
/// (JSON containment, `@>`) is in its queue; returns the matching jobs' args.
pub async fn assert_enqueued<A: JobArgs>(pool: &PgPool, subset: Value) -> Vec<A> {
    let q = queue_of(A::KIND);
    let found: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT message FROM pgmq.q_{q} WHERE message @> $1 ORDER BY msg_id"
    ))
    .bind(&subset)
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("reading queue {q}: {e}"));
    if found.is_empty() {
        let all: Vec<Value> =
            sqlx::query_scalar(&format!("SELECT message FROM pgmq.q_{q} ORDER BY msg_id"))
                .fetch_all(pool)
                .await
                .unwrap_or_default();
        panic!(
            "no {} job with args containing {subset} is enqueued; the queue holds {}: {all:?}",
            A::KIND,
            all.len()
        );
    }
    found
        .into_iter()
        .map(|m| serde_json::from_value(m).expect("the args decode"))
        .collect()
}

/// Where job `id` of `kind` stands (queued, running, done, dead), with its attempts,
/// last error and result; `None` when unknown.
pub async fn job_status(pool: &PgPool, kind: &str, id: i64) -> Option<JobStatus> {
    QueueSql::new(queue_of(kind))
        .status(pool, id)
        .await
        .unwrap_or_else(|e| panic!("reading job {kind}/{id}: {e}"))
}

/// The result a done job of `kind` returned (`Outcome::Done` with a value); `None` if
/// it is not done or returned none.
pub async fn job_result(pool: &PgPool, kind: &str, id: i64) -> Option<Value> {
    job_status(pool, kind, id).await.and_then(|s| s.result)
}

/// Every done job of `kind` kept in its archive, in the order they were enqueued: its
/// id and its result (`Value::Null` when it returned none).
pub async fn results(pool: &PgPool, kind: &str) -> Vec<(i64, Value)> {
    let q = queue_of(kind);
    sqlx::query_as(&format!(
        "SELECT msg_id, coalesce(headers -> 'result', 'null') FROM pgmq.a_{q} ORDER BY msg_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("reading archive {q}: {e}"))
}

/// Like [`results`], in the order the jobs finished (jobs acknowledged together, by id).
pub async fn results_in_finish_order(pool: &PgPool, kind: &str) -> Vec<(i64, Value)> {
    let q = queue_of(kind);
    sqlx::query_as(&format!(
        r#"SELECT msg_id, coalesce(headers -> 'result', 'null') FROM pgmq.a_{q}
         ORDER BY archived_at, msg_id"#
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("reading archive {q}: {e}"))
}

/// How many jobs of `kind` are dead letters.
pub async fn count_dead(pool: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM longshore.dead_letters WHERE queue = $1")
        .bind(queue_of(kind).as_str())
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("counting dead letters of {kind}: {e}"))
}

/// When job `id` of `kind` becomes visible to a claim (its delay, backoff, snooze or
/// lease end); `None` when it is no longer in its queue.
pub async fn visible_at(
    pool: &PgPool,
    kind: &str,
    id: i64,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let q = queue_of(kind);
    sqlx::query_scalar(&format!("SELECT vt FROM pgmq.q_{q} WHERE msg_id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap_or_else(|e| panic!("reading job {kind}/{id}: {e}"))
}

/// How many jobs of `kind` are done: kept in its archive, or recorded as completed on a
/// queue whose `on_done` is `delete`.
pub async fn count_done(pool: &PgPool, kind: &str) -> i64 {
    let q = queue_of(kind);
    sqlx::query_scalar(&format!(
        r#"SELECT (SELECT count(*) FROM pgmq.a_{q})
              + (SELECT count(*) FROM longshore.completions WHERE queue = $1)"#
    ))
    .bind(q.as_str())
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("counting done jobs of {q}: {e}"))
}

/// The args of every job of `kind` still in its queue, as JSON, oldest first (for
/// comparing with `json!`; [`all_enqueued`] decodes them).
pub async fn enqueued_args(pool: &PgPool, kind: &str) -> Vec<Value> {
    let q = queue_of(kind);
    sqlx::query_scalar(&format!("SELECT message FROM pgmq.q_{q} ORDER BY msg_id"))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("reading queue {q}: {e}"))
}

/// The args of every job of `kind` waiting or kept in its archive, by id: what was
/// ever enqueued and not pruned, run or not.
pub async fn ever_enqueued(pool: &PgPool, kind: &str) -> Vec<Value> {
    let q = queue_of(kind);
    sqlx::query_scalar(&format!(
        r#"SELECT message FROM (SELECT msg_id, message FROM pgmq.q_{q}
                              UNION ALL SELECT msg_id, message FROM pgmq.a_{q}) j ORDER BY msg_id"#
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("reading queue {q}: {e}"))
}

/// Deletes every job of `kind`, waiting or archived (a test resetting between rounds).
pub async fn clear_jobs(pool: &PgPool, kind: &str) {
    let q = queue_of(kind);
    sqlx::query(&format!("TRUNCATE pgmq.q_{q}, pgmq.a_{q}"))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("clearing {q}: {e}"));
}

/// A real worker running in the test's process (every queue of `registry`, or some),
/// stopped as a shutdown signal would stop it.
pub struct Fleet {
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), WorkerError>>>,
}

impl Fleet {
    /// Starts a worker on every queue of `registry`.
    pub fn start(pool: &PgPool, registry: Registry, config: Arc<Config>) -> Fleet {
        Fleet::spawn(Worker::new(pool.clone(), registry, config))
    }

    /// Starts a worker on the queues of `kinds` only.
    pub fn start_only(
        pool: &PgPool,
        registry: Registry,
        config: Arc<Config>,
        kinds: &[&str],
    ) -> Fleet {
        let names: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
        let w = Worker::new(pool.clone(), registry, config)
            .only(&names)
            .unwrap_or_else(|e| panic!("{e}"));
        Fleet::spawn(w)
    }

    fn spawn(w: Worker) -> Fleet {
        let stop = CancellationToken::new();
        let handle = Some(tokio::spawn(w.run(stop.clone())));
        Fleet { stop, handle }
    }

    /// Stops the worker (drain, then release) and waits for it; panics if it failed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .expect("the worker task panicked")
                .expect("the worker failed");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A test that panics before `stop` must not leave a worker running on.
        self.stop.cancel();
    }
}

/// Runs the queues of `kinds` through a real worker until none of them holds a job that
/// is due or running, then stops it. Jobs scheduled for later, and retries waiting in
/// backoff, are left where they are (and so is anything another kind enqueues). Panics
/// after `limit` with what is left.
pub async fn drain(
    pool: &PgPool,
    registry: Registry,
    config: Arc<Config>,
    kinds: &[&str],
    limit: Duration,
) {
    let fleet = Fleet::start_only(pool, registry, config, kinds);
    let queues: Vec<QueueName> = kinds.iter().map(|k| queue_of(k)).collect();
    let t0 = Instant::now();
    let mut quiet = 0;
    loop {
        let mut busy = 0i64;
        for q in &queues {
            busy += sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM pgmq.q_{q} WHERE vt <= clock_timestamp() OR last_read_at IS NOT NULL"
            ))
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("reading queue {q}: {e}"));
        }
        // Twice in a row: a job's completion may enqueue a follow-up of a drained kind.
        quiet = if busy == 0 { quiet + 1 } else { 0 };
        if quiet == 2 {
            break;
        }
        assert!(
            t0.elapsed() < limit,
            "drain of {kinds:?}: {busy} job(s) still due or running after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.stop().await;
}
