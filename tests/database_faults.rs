//! The fleet against a PostgreSQL that restarts, crashes, pauses or loses backends
//! (rows 8-11 of ../shared/RELIABILITY.md). Each test owns a private cluster, so the
//! shared test server is never disturbed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PrivatePg, Proc, config_dir, count, db, eventually};
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

async fn post(http: &reqwest::Client, base: &str, id: i64) -> Result<i64, u16> {
    let r = http
        .post(format!("{base}/v1/queues/probe/jobs"))
        .bearer_auth("tok")
        .body(format!(r#"{{"id":{id},"effect":true}}"#))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|_| 0u16)?;
    if r.status() == 202 {
        Ok(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap())
    } else {
        Err(r.status().as_u16())
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
        accepted.push(post(&http, &base, i).await.expect("202 before the restart"));
    }
    let restart_at = chrono::Utc::now();
    let t0 = Instant::now();
    pg.pg.restart().expect("restart");
    // The ingress answers 202 again by itself.
    let mut i = 1000;
    loop {
        match post(&http, &base, i).await {
            Ok(id) => {
                accepted.push(id);
                break;
            }
            Err(code) => assert!(
                code == 503 || code == 0,
                "only 503 while reconnecting, got {code}"
            ),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "ingress did not recover in 30 s"
        );
        i += 1;
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
        accepted.push(post(&http, &base, i).await.expect("202"));
    }
    pg.signal_server("STOP");
    let t0 = Instant::now();
    let code = post(&http, &base, 999)
        .await
        .expect_err("no 202 while paused");
    assert_eq!(code, 503);
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
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'longshore-worker%'",
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
