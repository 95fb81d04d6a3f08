//! The fleet against a PostgreSQL that restarts, crashes, pauses or loses backends
//! (rows 8-11 of ../shared/RELIABILITY.md). Each test owns a private cluster, so the
//! shared test server is never disturbed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PgBouncer, PrivatePg, Proc, config_dir, count, db, eventually};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

fn ingress_config() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"
db_timeout = "1s"

[[ingress.tokens]]
name = "t"
sha256 = "{}"
queues = ["*"]
rate_per_second = 100000
burst = 100000

[[schedules]]
name = "tick"
cron = "* * * * * *"
queue = "maintenance"
args = {{ task = "expire_idempotency_keys" }}
"#,
        hex::encode(Sha256::digest(b"tok"))
    )
}

/// An enqueue that was not answered 202: the status (0: no answer within the client's
/// timeout, or no connection) and the body, which carries the error's machine code.
#[derive(Debug)]
struct Refused {
    status: u16,
    #[allow(dead_code, reason = "read through Debug, in failure messages")]
    body: String,
}

/// One enqueue of probe `id`, keyed by it (`Idempotency-Key: probe-{id}`), so sending the
/// same id again can never make a second job.
async fn post(http: &reqwest::Client, base: &str, id: i64) -> Result<i64, Refused> {
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok")
        .header("idempotency-key", format!("probe-{id}"))
        .body(format!(r#"{{"id":{id},"effect":true}}"#))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| Refused {
            status: 0,
            body: e.to_string(),
        })?;
    if r.status() == 202 {
        Ok(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap())
    } else {
        Err(Refused {
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        })
    }
}

/// A setup enqueue, before any fault: retried while the answer is 503 or none (the
/// ingress's 1 s database timeout can expire on a loaded machine), which the key makes
/// safe; any other refusal fails the test with the ingress's log.
async fn post_setup(http: &reqwest::Client, base: &str, id: i64, ingress: &Proc) -> i64 {
    let t0 = Instant::now();
    loop {
        match post(http, base, id).await {
            Ok(job) => return job,
            Err(e)
                if (e.status == 503 || e.status == 0) && t0.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!(
                "setup enqueue {id} refused: {e:?}\ningress log:\n{}",
                ingress.logs()
            ),
        }
    }
}

/// Row 8: a restart under load; ingress, scheduler and worker reconnect by themselves
/// within 30 s; nothing lost, nothing twice.
#[tokio::test]
async fn row8_restart_everything_reconnects() {
    let pg = PrivatePg::start("row8").await;
    let dir = config_dir(&ingress_config());
    let env = [("LONGSHORE_ENV", "test")];
    let ingress = Proc::spawn_in(Some(&dir), &pg.url, &["ingress"], &env);
    let _sched = Proc::spawn_in(Some(&dir), &pg.url, &["scheduler"], &env);
    let _worker = Proc::spawn_in(Some(&dir), &pg.url, &["worker"], &env);
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    for i in 0..200 {
        accepted.push(post_setup(&http, &base, i, &ingress).await);
    }
    let restart_at = chrono::Utc::now();
    let t0 = Instant::now();
    pg.pg.restart().expect("restart");
    // The ingress answers 202 again by itself. One id, resent until accepted: an
    // attempt answered 503 may still have committed, and its key makes the resend find
    // that job instead of making a second.
    loop {
        match post(&http, &base, 1000).await {
            Ok(id) => {
                accepted.push(id);
                break;
            }
            Err(e) => assert!(
                e.status == 503 || e.status == 0,
                "only 503 while reconnecting, got {e:?}"
            ),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "ingress did not recover in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = t0.elapsed();
    let pool = pg.pool().await;
    // Every accepted job done exactly once; the scheduler fires again after the restart.
    let n = accepted.len() as i64;
    eventually(Duration::from_secs(30), "all accepted jobs done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM probe_effects").await == n).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(30), "a scheduled fire after the restart", || {
        let pool = pool.clone();
        async move {
            let after: i64 = sqlx::query_scalar("SELECT count(*) FROM longshore.schedule_fires WHERE fire_at > $1 + interval '1 second'")
                .bind(restart_at)
                .fetch_one(&pool)
                .await
                .ok()?;
            (after >= 2).then_some(())
        }
    })
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM pgmq.a_probe").await, n);
    eprintln!("ingress recovered {recovered:?} after the restart began");
}

/// Row 9: a crash (`pg_ctl stop -m immediate`) while clients enqueue: every enqueue
/// that was answered 202 is there after recovery.
#[tokio::test]
async fn row9_crash_loses_no_acknowledged_enqueue() {
    let pg = PrivatePg::start("row9").await;
    let dir = config_dir(&ingress_config());
    let ingress = Proc::spawn_in(
        Some(&dir),
        &pg.url,
        &["ingress"],
        &[("LONGSHORE_ENV", "test")],
    );
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, base, accepted, stop) =
            (http.clone(), base.clone(), accepted.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = c * 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(id) = post(&http, &base, i).await {
                    accepted.lock().await.push(id);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.pg.crash().expect("crash");
    let before_crash = accepted.lock().await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.pg.start_again().expect("recover");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let ids = accepted.lock().await.clone();
    assert!(
        before_crash > 10 && ids.len() > before_crash,
        "enqueues before and after the crash ({before_crash}, {})",
        ids.len()
    );
    let pool = pg.pool().await;
    let present: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.q_probe WHERE msg_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        present.len(),
        ids.len(),
        "every acknowledged enqueue survived the crash"
    );
}

/// Row 10: the server paused (SIGSTOP): the ingress answers 503 within its timeout and
/// /readyz says unhealthy, nothing hangs; after SIGCONT everything completes once.
#[tokio::test]
async fn row10_a_paused_server_gives_timeouts_not_hangs() {
    let pg = PrivatePg::start("row10").await;
    let dir = config_dir(&ingress_config());
    let env = [("LONGSHORE_ENV", "test")];
    let ingress = Proc::spawn_in(Some(&dir), &pg.url, &["ingress"], &env);
    let _worker = Proc::spawn_in(Some(&dir), &pg.url, &["worker"], &env);
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    for i in 0..50 {
        accepted.push(post_setup(&http, &base, i, &ingress).await);
    }
    pg.signal_server("STOP");
    let t0 = Instant::now();
    let refused = post(&http, &base, 999)
        .await
        .expect_err("no 202 while paused");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "answered within the db timeout: {:?}",
        t0.elapsed()
    );
    let r = http
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the process itself is fine");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.signal_server("CONT");
    let id = eventually(Duration::from_secs(30), "202 after resume", || {
        let (http, base) = (http.clone(), base.clone());
        async move { post(&http, &base, 1000).await.ok() }
    })
    .await;
    accepted.push(id);
    let pool = pg.pool().await;
    let n = accepted.len() as i64;
    eventually(Duration::from_secs(30), "all accepted jobs done once", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await >= n).then_some(()) }
    })
    .await;
    let effects = count(&pool, "SELECT count(*) FROM probe_effects").await;
    // Job 999 may have committed although the client was told 503 (the answer was
    // unknown); every other job's effect exists once.
    assert!(
        effects == n || effects == n + 1,
        "{effects} effects for {n} accepted jobs"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE (headers->'result'->>'duplicate')::bool"
        )
        .await,
        0
    );
}

/// Row 11: backends terminated mid-transaction: rolled back, the pool heals, jobs are
/// retried; every effect exactly once.
#[tokio::test]
async fn row11_terminated_backends_roll_back_and_jobs_retry() {
    let t = db().await;
    common::send_probes(
        &t.pool,
        3_000,
        serde_json::json!({"effect": true, "hold_ms": 5}),
    )
    .await;
    let _w = Proc::spawn(
        &t.url,
        &["worker"],
        &[("LONGSHORE__QUEUES__PROBE__BACKOFF_BASE", "20ms")],
    );
    let mut terminated = 0i64;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        terminated += sqlx::query_scalar::<_, i64>(
            r#"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'longshore-worker%'"#,
        )
        .fetch_one(&t.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(terminated > 5, "backends were terminated ({terminated})");
    let pool = t.pool.clone();
    eventually(Duration::from_secs(60), "all 3000 done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 3000).then_some(()) }
    })
    .await;
    common::assert_probes_done_exactly_once(&t.pool, 3000).await;
}

fn pooler_config() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"
db_timeout = "5s"

[[ingress.tokens]]
name = "t"
sha256 = "{}"
queues = ["*"]
rate_per_second = 100000
burst = 100000

[queues.probe]
max_attempts = 3
backoff_base = "50ms"
backoff_cap = "200ms"
# Short, so a job of 7 s lives on heartbeats.
lease = "3s"

[[schedules]]
name = "tick"
cron = "* * * * * *"
queue = "maintenance"
args = {{ task = "expire_idempotency_keys" }}

# VACUUM cannot run in a transaction: a simple query, through the pooler too.
[[schedules]]
name = "vacuum"
cron = "*/2 * * * * *"
queue = "maintenance"
args = {{ task = "vacuum_queues", min_dead_tuples = 1 }}
"#,
        hex::encode(Sha256::digest(b"tok"))
    )
}

async fn post_body(http: &reqwest::Client, base: &str, body: &str, key: Option<&str>) -> i64 {
    let mut r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok")
        .body(body.to_string())
        .timeout(Duration::from_secs(10));
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    let r = r.send().await.expect("ingress answers");
    assert_eq!(r.status(), 202, "{body}: {}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

/// Issue 16: the runtime's core through a real PgBouncer in transaction mode, two
/// server connections shared by an ingress, a scheduler, two workers and the CLI:
/// enqueue (plain, keyed, CLI), claim, acknowledgement with effects, retry, dead
/// letter, scheduled fires, `?wait` (polling: no LISTEN through the pooler). The
/// pooler wipes a backend after every transaction, so any statement the runtime ran
/// outside a transaction fails here (the next test shows that it would).
#[tokio::test]
async fn the_runtime_core_runs_through_pgbouncer_in_transaction_mode() {
    let t = db().await;
    let pgb = PgBouncer::start(&t.url, 2).await;
    let url = pgb.url(&t.url);
    let dir = config_dir(&pooler_config());
    let env = [
        ("LONGSHORE_ENV", "test"),
        ("LONGSHORE__DATABASE__POOLER", "transaction"),
        // Not a default, so the test sees the setting arrive with each transaction.
        ("LONGSHORE__DATABASE__CONTROL_LOCK_TIMEOUT", "1500ms"),
    ];
    // The CLI on the binary's defaults, but through the pooler as well.
    let cli_env = [("LONGSHORE__DATABASE__POOLER", "transaction")];
    let ingress = Proc::spawn_in(Some(&dir), &url, &["ingress"], &env);
    let sched = Proc::spawn_in(Some(&dir), &url, &["scheduler"], &env);
    let workers: Vec<Proc> = (0..2)
        .map(|_| {
            let args = [
                "worker",
                "--concurrency",
                "8",
                "--queues",
                "probe,maintenance",
            ];
            Proc::spawn_in(Some(&dir), &url, &args, &env)
        })
        .collect();
    let base = format!("http://{}", ingress.ingress_addr().await);
    let http = reqwest::Client::new();

    for i in 0..150 {
        post_body(
            &http,
            &base,
            &format!(r#"{{"id":{i},"effect":true}}"#),
            None,
        )
        .await;
    }
    for i in 1000..1020 {
        let b = format!(r#"{{"id":{i},"effect":true,"fail_times":1}}"#);
        post_body(&http, &base, &b, None).await;
    }
    for i in 2000..2005 {
        post_body(
            &http,
            &base,
            &format!(r#"{{"id":{i},"fail_times":10}}"#),
            None,
        )
        .await;
    }
    let keyed = r#"{"id":3000,"effect":true}"#;
    let first = post_body(&http, &base, keyed, Some("k-3000")).await;
    assert_eq!(post_body(&http, &base, keyed, Some("k-3000")).await, first);
    let (code, out, err) = common::run_cli(
        &url,
        &["enqueue", "probe", r#"{"id":4000,"effect":true}"#],
        &cli_env,
    );
    assert_eq!(code, 0, "CLI enqueue through the pooler: {out}{err}");
    // `?wait` without LISTEN: answered by re-reading, well before its deadline.
    let waited = post_body(
        &http,
        &base,
        r#"{"id":5000,"effect":true,"sleep_ms":300}"#,
        None,
    )
    .await;
    let asked = Instant::now();
    let s: Value = http
        .get(format!("{base}/v1/jobs/probe/{waited}?wait=20"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["state"], "done", "{s}");
    // Re-read every second (not the 10 s safety re-check of a trusted waiter).
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );

    // Outlives its lease twice over: only heartbeats keep it from a second run.
    post_body(
        &http,
        &base,
        r#"{"id":6000,"effect":true,"sleep_ms":7000}"#,
        None,
    )
    .await;

    let effects = 150 + 20 + 4;
    let pool = &t.pool;
    eventually(
        Duration::from_secs(60),
        "every job done or dead",
        || async {
            let done = count(pool, "SELECT count(*) FROM probe_effects").await;
            let dead = count(
                pool,
                "SELECT count(*) FROM longshore.dead_letters WHERE queue = 'probe'",
            )
            .await;
            let left = count(pool, "SELECT count(*) FROM pgmq.q_probe").await;
            (done == effects && dead == 5 && left == 0).then_some(())
        },
    )
    .await;
    // Each effect once, each retried job run twice, the dead ones three times.
    assert_eq!(
        count(pool, "SELECT count(*) FROM pgmq.a_probe").await,
        effects
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE (headers->'result'->>'duplicate')::bool"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM probe_effects WHERE id >= 1000 AND id < 1020 AND attempt = 2"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM longshore.dead_letters WHERE queue = 'probe' AND attempts = 3"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM probe_effects WHERE id = 6000 AND attempt = 1"
        )
        .await,
        1,
        "the long job ran once, on heartbeats"
    );
    eventually(Duration::from_secs(10), "scheduled fires", || async {
        (count(pool, "SELECT count(*) FROM longshore.schedule_fires").await >= 2).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "a vacuum through the pooler",
        || async {
            let n = count(
                pool,
                r#"SELECT count(*) FROM pgmq.a_maintenance
              WHERE jsonb_array_length(headers->'result'->'vacuumed') > 0
                AND jsonb_array_length(headers->'result'->'failed') = 0"#,
            )
            .await;
            (n > 0).then_some(())
        },
    )
    .await;
    let (code, out, err) = common::run_cli(&url, &["queues", "--json"], &cli_env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(r#""queue":"probe""#), "{out}");
    // Migrations need a session of their own: refused with a code, nothing half done.
    let (code, out, err) = common::run_cli(&url, &["migrate"], &cli_env);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("E_MIGRATE_POOLER"), "{err}");

    // It all went through the pooler: every backend of our processes is one of its
    // (at most two) server connections.
    let db_name = t.name.as_str();
    let servers: Vec<i32> = pgb
        .show("SERVERS")
        .lines()
        .map(|l| l.split('|').collect::<Vec<_>>())
        .filter(|f| f.get(2) == Some(&db_name))
        .filter_map(|f| f.get(15).and_then(|p| p.parse().ok()))
        .collect();
    assert!((1..=2).contains(&servers.len()), "{}", pgb.show("SERVERS"));
    let ours: Vec<i32> = sqlx::query_scalar(
        r#"SELECT pid FROM pg_stat_activity WHERE datname = current_database()
          AND application_name LIKE 'longshore-%'"#,
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        ours.iter().all(|p| servers.contains(p)),
        "backends {ours:?} outside the pooler's {servers:?}"
    );
    let clients = pgb
        .show("CLIENTS")
        .lines()
        .filter(|l| l.split('|').nth(2) == Some(db_name))
        .count();
    assert!(clients >= 4, "{}", pgb.show("CLIENTS"));
    let procs = [("ingress", &ingress), ("scheduler", &sched)]
        .into_iter()
        .chain(workers.iter().map(|w| ("worker", w)));
    for (name, p) in procs {
        let logs = p.logs();
        for bad in [
            "prepared statement",
            "unsupported startup parameter",
            "ERROR",
        ] {
            assert!(!logs.contains(bad), "{name} logged {bad:?}:\n{logs}");
        }
        if name == "worker" {
            assert!(logs.contains("no LISTEN, consumers poll"), "{logs}");
            // What a control transaction ran with, as the server reports it.
            for setting in [
                "statement_timeout=5s",
                "lock_timeout=1500ms",
                "plan_cache_mode=force_custom_plan",
            ] {
                assert!(logs.contains(setting), "{setting}:\n{logs}");
            }
        }
    }
}

/// The pooler above is hostile enough to catch a statement run outside a transaction:
/// parsed on one backend, wiped when that transaction-less round trip ends, its bind
/// finds nothing. Inside a transaction the same statement works. And a process left on
/// `database.pooler = "none"` cannot even connect (its startup options are refused).
#[tokio::test]
async fn pgbouncer_in_transaction_mode_refuses_what_the_pooler_mode_avoids() {
    let t = db().await;
    let pgb = PgBouncer::start(&t.url, 2).await;
    let url = pgb.url(&t.url);
    let opts: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.statement_cache_capacity(0).extra_float_digits(None))
        .await
        .unwrap();
    let outside = sqlx::query_scalar::<_, i32>("SELECT $1::int4")
        .bind(7)
        .fetch_one(&pool)
        .await;
    let e = outside
        .expect_err("a bind after the backend was reset")
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let mut tx = pool.begin().await.unwrap();
    let inside: i32 = sqlx::query_scalar("SELECT $1::int4")
        .bind(7)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 7);
    tx.commit().await.unwrap();

    let dir = config_dir(&pooler_config());
    let mut w = Proc::spawn_in(Some(&dir), &url, &["worker"], &[("LONGSHORE_ENV", "test")]);
    let code = w.wait_exit(Duration::from_secs(20)).await;
    assert_ne!(code, Some(0));
    assert!(
        w.logs().contains("unsupported startup parameter"),
        "{}",
        w.logs()
    );
}
