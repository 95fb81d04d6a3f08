//! Shared by the test binaries: a fresh database per test, the real binary as a child
//! process, and polling helpers (bounded waits, never a fixed sleep as an assertion).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use longshore_workers::config::Config;
use longshore_workers::testing::TestDb;
use sqlx::PgPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn db() -> TestDb {
    TestDb::create(&MIGRATOR, &registry()).await
}

/// Every job kind with the test configuration's settings.
pub fn registry() -> longshore_workers::Registry {
    longshore_jobs::registry(&config(&[])).expect("registry")
}

/// What every test process and in-process configuration gets unless a test says
/// otherwise: the probe's fault knobs on, and the temp directory allowed for the
/// file-touching jobs, logs and vaults alike (tests put their spools and vaults there).
pub fn test_env() -> Vec<(String, String)> {
    vec![
        ("LONGSHORE__PROBE__FAULT_KNOBS".into(), "true".into()),
        (
            "LONGSHORE__BILLING__LOG_ROOTS".into(),
            format!("[{:?}]", std::env::temp_dir().display().to_string()),
        ),
        (
            "LONGSHORE__BILLING__VAULT_ROOTS".into(),
            format!("[{:?}]", std::env::temp_dir().display().to_string()),
        ),
    ]
}

/// An environment value for [`Proc::spawn`] that removes the variable instead, so a
/// test sees the binary's default rather than [`test_env`]'s.
pub const UNSET: &str = "\u{0}unset";

/// Configuration as the binary would load it, plus `LONGSHORE__…` overrides.
pub fn config(vars: &[(&str, &str)]) -> Arc<Config> {
    let mut all = test_env();
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let vars = all.into_iter();
    Arc::new(
        Config::load_layers(
            &longshore_jobs::layers(None),
            &PathBuf::from("config"),
            None,
            vars,
        )
        .expect("test config"),
    )
}

/// Polls `f` until it returns Some or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A read-only observation. On a starved machine the test's own pool can time out
/// while workers hold the CPU; the observer retries that (and only that) a few times,
/// so a slow read is not mistaken for a failure of the system under test.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    let mut tries = 0;
    loop {
        match sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await {
            Ok(n) => return n,
            Err(sqlx::Error::PoolTimedOut) if tries < 3 => tries += 1,
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

/// A `longshore` child process with its stderr captured to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(db_url: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Self::spawn_in(None, db_url, args, env)
    }

    /// Runs with `dir` as the working directory, so `dir/config/*.toml` is loaded.
    pub fn spawn_in(
        dir: Option<&std::path::Path>,
        db_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "longshore-test-{}-{}.log",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_longshore"));
        c.args(args)
            .env("DATABASE_URL", db_url)
            .env("LONGSHORE__LOG__LEVEL", "info,sqlx=warn")
            .env_remove("RUST_LOG")
            .env_remove("LONGSHORE_ENV")
            .envs(test_env())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            // A variable given as `UNSET` is removed: the binary's own default applies.
            if *v == UNSET {
                c.env_remove(k);
            } else {
                c.env(k, v);
            }
        }
        if let Some(d) = dir {
            c.current_dir(d);
        }
        Proc {
            child: c.spawn().expect("spawn longshore"),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// Waits for exit up to `limit`; returns the exit code (None if killed by signal).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The ingress's address, from its "listening on" line.
    pub async fn ingress_addr(&self) -> String {
        eventually(Duration::from_secs(15), "ingress listening", || async {
            self.logs().lines().find_map(|l| {
                l.split("listening on http://")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
        })
        .await
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs the binary to completion: (exit code, stdout, stderr).
pub fn run_cli(db_url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longshore"));
    c.args(args)
        .env("DATABASE_URL", db_url)
        .env_remove("RUST_LOG")
        .env_remove("LONGSHORE_ENV")
        .envs(test_env());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run longshore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory with `config/test.toml` holding `toml`; use with `LONGSHORE_ENV=test`.
pub fn config_dir(toml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "longshore-cfg-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/test.toml"), toml).unwrap();
    dir
}

/// A private PostgreSQL cluster for tests that restart, crash or pause the server.
/// Migrated; stopped and removed on drop.
pub struct PrivatePg {
    pub pg: longshore_workers::embedded::Embedded,
    pub url: String,
    dir: PathBuf,
}

impl PrivatePg {
    pub async fn start(tag: &str) -> PrivatePg {
        let dir = std::env::temp_dir().join(format!("longshore-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.clone();
        let pg =
            tokio::task::spawn_blocking(move || longshore_workers::embedded::Embedded::start(&d))
                .await
                .unwrap()
                .expect("private cluster");
        let url = pg.url("postgres");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .unwrap();
        longshore_workers::db::migrate(&pool, &MIGRATOR, &registry())
            .await
            .unwrap();
        pool.close().await;
        PrivatePg { pg, url, dir }
    }

    /// A small pool for the test's own queries; re-create it after a restart.
    pub async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .unwrap()
    }

    pub fn signal_server(&self, sig: &str) {
        for pid in self.pg.server_pids() {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.signal_server("CONT");
        let _ = self.pg.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `n` probe jobs with plain `pgmq.send_batch`: ids 1..=n, each with `extra`
/// merged into its args (e.g. `{"effect": true, "sleep_ms": 2}`).
pub async fn send_probes(pool: &PgPool, n: i64, extra: serde_json::Value) {
    sqlx::query(
        r#"SELECT pgmq.send_batch('probe', array_agg(jsonb_build_object('id', i) || $2::jsonb))
         FROM generate_series(1, $1::bigint) i"#,
    )
    .bind(n)
    .bind(extra)
    .execute(pool)
    .await
    .expect("send_batch");
}

/// Every one of `n` probe jobs done exactly once: `n` effects, `n` archived, none left,
/// none dead, and no completed run that found its effect already written (a duplicate
/// run that got past the fence).
pub async fn assert_probes_done_exactly_once(pool: &PgPool, n: i64) {
    assert_eq!(
        count(pool, "SELECT count(*) FROM probe_effects").await,
        n,
        "effects"
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM pgmq.a_probe").await,
        n,
        "each job acknowledged once"
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM pgmq.q_probe").await,
        0,
        "nothing left in the queue"
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0,
        "nothing dead"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE (headers->'result'->>'duplicate')::bool"
        )
        .await,
        0,
        "no completed run found its effect already written"
    );
}

/// The probe's execution trace (`[probe] trace_dir`): every run's start and end, and
/// the runs that started while another run of the same job was executing.
pub struct RunTrace {
    pub dir: PathBuf,
}

impl RunTrace {
    pub fn new(tag: &str) -> RunTrace {
        let dir = std::env::temp_dir().join(format!(
            "longshore-trace-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        RunTrace { dir }
    }

    /// The environment that makes a `longshore` process trace its probe runs here.
    pub fn env(&self) -> (&'static str, String) {
        (
            "LONGSHORE__PROBE__TRACE_DIR",
            self.dir.display().to_string(),
        )
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs started, per job id.
    pub fn starts(&self) -> std::collections::BTreeMap<i64, usize> {
        let mut m = std::collections::BTreeMap::new();
        for l in self.lines("runs.log") {
            let mut w = l.split(' ');
            if w.next() == Some("start")
                && let Some(id) = w.next().and_then(|i| i.parse().ok())
            {
                *m.entry(id).or_default() += 1;
            }
        }
        m
    }

    /// Runs that began while another run of the same job was still executing.
    pub fn overlaps(&self) -> Vec<String> {
        self.lines("overlaps.log")
    }
}

impl Drop for RunTrace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real PgBouncer (Debian's `pgbouncer`) in transaction mode in front of the shared
/// test server, on a port of its own; stopped when dropped.
///
/// As hostile as a busy production pooler: `pool_size` server connections shared by
/// every client (so transactions of different processes interleave on one backend),
/// and `server_reset_query_always`, so a backend is wiped (`DISCARD ALL`) each time a
/// transaction ends and a statement parsed outside a transaction is gone, always,
/// when its bind arrives. The reset is also what the runtime asks of a PgBouncer older
/// than 1.21 (docs/poolers.md).
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    /// In front of the server that `url` (any database on it) names.
    pub async fn start(url: &str, pool_size: u32) -> PgBouncer {
        use std::str::FromStr;
        let server = sqlx::postgres::PgConnectOptions::from_str(url).expect("a database URL");
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)");
        // From 1.21 PgBouncer can keep prepared statements itself (and from 1.24 does by
        // default), which would make a statement outside a transaction succeed here:
        // off, as on the 1.18 these tests are written against.
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let minor: u32 = version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.strip_prefix("1."))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let keep_none = if minor >= 21 {
            "max_prepared_statements = 0\n"
        } else {
            ""
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("longshore-pgbouncer-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("auth file");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={host} port={sport}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 1000\n\
                 server_reset_query = DISCARD ALL\nserver_reset_query_always = 1\n{keep_none}\
                 admin_users = postgres\nlogfile = {d}/pgbouncer.log\n",
                host = server.get_host(),
                sport = server.get_port(),
                d = dir.display()
            ),
        )
        .expect("pgbouncer.ini");
        let ini = dir.join("pgbouncer.ini");
        let root = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        // PgBouncer refuses to run as root: drop to the postgres user. setpriv execs (the
        // child is PgBouncer itself, so a kill reaches it) and has it killed with the
        // test process, so a test that dies leaves no PgBouncer behind.
        let mut c = if root {
            let _ = Command::new("chown")
                .args(["-R", "postgres", &dir.display().to_string()])
                .status();
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--pdeathsig",
                "KILL",
                bin,
            ]);
            c
        } else {
            Command::new(bin)
        };
        let child = c
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        let mut b = PgBouncer { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready when its own log says it listens on our port (not merely when something
        // answers there).
        while !b.log().contains(&format!("listening on 127.0.0.1:{port}")) {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("pgbouncer exited ({st}):\n{}", b.log());
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer not listening after 10 s:\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    }

    /// `url` (a database on the server behind this PgBouncer) through this PgBouncer.
    pub fn url(&self, url: &str) -> String {
        use sqlx::ConnectOptions;
        use std::str::FromStr;
        sqlx::postgres::PgConnectOptions::from_str(url)
            .expect("a database URL")
            .host("127.0.0.1")
            .port(self.port)
            .to_url_lossy()
            .to_string()
    }

    /// A `SHOW …` of PgBouncer's admin console, as psql prints it unaligned.
    pub fn show(&self, what: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-F",
                "|",
                "pgbouncer",
                "-c",
                &format!("SHOW {what}"),
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "SHOW {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Hex SHA-256 of a token, as `ingress.tokens[].sha256` holds it (computed here, not
/// by the runtime's own function, so a wrong hash there fails the tests).
pub fn sha(t: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(t.as_bytes()))
}
