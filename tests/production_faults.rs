//! The fleet under production-shaped faults (rows 36-39 of ../shared/RELIABILITY.md,
//! issue 13): a PostgreSQL paused longer than the lease while long handlers run, a job
//! that kills its process, SIGTERM while the database does not answer. The real binary,
//! real signals, private clusters; executions are counted by the probe's trace, not
//! only effects.

mod common;

use std::time::{Duration, Instant};

use common::{PrivatePg, Proc, RunTrace, count, db, eventually};
use serde_json::json;
use sqlx::PgPool;

const IN_FLIGHT: &str =
    "SELECT count(*) FROM pgmq.q_probe WHERE last_read_at IS NOT NULL AND vt > now()";

async fn wait_count(pool: &PgPool, sql: &'static str, n: i64, limit: Duration) {
    let pool = pool.clone();
    eventually(limit, sql, || {
        let pool = pool.clone();
        async move { (count(&pool, sql).await == n).then_some(()) }
    })
    .await;
}

/// Row 36 (issue 13, items 1 and 2): handlers that run longer than the database is
/// paused, a pause longer than the lease, two worker processes. No run may start while
/// another run of the same job still executes (in the same process, which re-claims its
/// own message when the lease ran out, or in the other), and every job ends done once.
/// Scaled from the issue's 20 s handlers / 30 s lease / 40 s pause to 10 s / 4 s / 7 s.
#[tokio::test]
async fn row36_a_pause_longer_than_the_lease_starts_no_second_execution() {
    let pg = PrivatePg::start("row36").await;
    let pool = pg.pool().await;
    common::send_probes(&pool, 8, json!({"effect": true, "sleep_ms": 10_000})).await;
    let trace = RunTrace::new("row36");
    let (k, v) = trace.env();
    let env = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "4s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "200ms"),
        (k, v.as_str()),
    ];
    let a = Proc::spawn(&pg.url, &["worker"], &env);
    let b = Proc::spawn(&pg.url, &["worker"], &env);
    wait_count(&pool, IN_FLIGHT, 8, Duration::from_secs(15)).await;
    pg.signal_server("STOP");
    tokio::time::sleep(Duration::from_secs(7)).await;
    pg.signal_server("CONT");
    wait_count(
        &pool,
        "SELECT count(*) FROM pgmq.a_probe",
        8,
        Duration::from_secs(90),
    )
    .await;
    let logs = format!("A:\n{}\nB:\n{}", a.logs(), b.logs());
    assert!(
        trace.overlaps().is_empty(),
        "a run started while another run of the same job was executing: {:?}\n{logs}",
        trace.overlaps()
    );
    assert!(
        logs.contains("lease could not be extended in time"),
        "the pause outlasted the lease, so runs were cancelled\n{logs}"
    );
    common::assert_probes_done_exactly_once(&pool, 8).await;
    let starts = trace.starts();
    assert_eq!(starts.len(), 8, "{starts:?}");
    eprintln!("executions per job (sequential only): {starts:?}");
}

/// Row 37 (item 3): a job that aborts its process, a supervisor restarting the worker.
/// It is dead-lettered after exactly `max_attempts` deaths with that reason, and the
/// 1,000 jobs queued behind it, some of them in flight beside it at every crash, are
/// all done once.
#[tokio::test]
async fn row37_a_job_that_kills_its_process_is_buried_after_max_attempts() {
    let t = db().await;
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 0, \"abort\": true}')")
        .execute(&t.pool)
        .await
        .unwrap();
    common::send_probes(&t.pool, 1_000, json!({"effect": true})).await;
    // A 3 s lease: short enough for a quick test, long enough that a busy machine
    // does not make good jobs' leases lapse (which would spend their attempts too).
    let env = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "3s"),
        ("LONGSHORE__QUEUES__PROBE__MAX_ATTEMPTS", "3"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
    ];
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut deaths = 0;
    let mut w = Proc::spawn(&t.url, &["worker"], &env);
    loop {
        if let Some(st) = w.child.try_wait().unwrap() {
            assert!(st.code().is_none(), "died by a signal (abort): {st:?}");
            deaths += 1;
            w = Proc::spawn(&t.url, &["worker"], &env);
        }
        let done = count(&t.pool, "SELECT count(*) FROM probe_effects").await;
        let dead = count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await;
        if done == 1_000 && dead == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} done, {dead} dead after {deaths} deaths\n{}",
            w.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deaths, 3, "the supervisor restarted it max_attempts times");
    let (id, attempts, err): (String, i32, String) =
        sqlx::query_as("SELECT message->>'id', attempts, last_error FROM longshore.dead_letters")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!((id.as_str(), attempts), ("0", 3));
    assert!(
        err.contains("the worker died or lost its lease running this job 3 time(s) in a row"),
        "{err}"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.a_probe").await,
        1_000
    );
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 0);
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE (headers->'result'->>'duplicate')::bool"
        )
        .await,
        0
    );
}

/// Row 39 (item 6): SIGTERM while PostgreSQL is paused. The worker exits 0 within the
/// grace period plus its shutdown slack, having released what it could; the rest come
/// back after their lease and are done once.
#[tokio::test]
async fn row39_sigterm_while_postgres_is_paused_exits_within_the_grace_period() {
    let pg = PrivatePg::start("row39").await;
    let pool = pg.pool().await;
    common::send_probes(&pool, 10, json!({"effect": true, "sleep_ms": 60_000})).await;
    let env = [
        ("LONGSHORE__WORKER__SHUTDOWN_GRACE", "2s"),
        ("LONGSHORE__QUEUES__PROBE__LEASE", "5s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "200ms"),
    ];
    let mut w = Proc::spawn(&pg.url, &["worker"], &env);
    wait_count(&pool, IN_FLIGHT, 10, Duration::from_secs(15)).await;
    pg.signal_server("STOP");
    let t0 = Instant::now();
    w.signal("TERM");
    let code = w.wait_exit(Duration::from_secs(15)).await;
    let took = t0.elapsed();
    pg.signal_server("CONT");
    assert_eq!(code, Some(0), "{}", w.logs());
    assert!(
        took < Duration::from_secs(2 + 3 + 3),
        "exited {took:?} after SIGTERM (grace 2 s + slack 3 s, + 3 s for a busy machine)\n{}",
        w.logs()
    );
    sqlx::query("UPDATE pgmq.q_probe SET message = message - 'sleep_ms'")
        .execute(&pool)
        .await
        .unwrap();
    let _w2 = Proc::spawn(&pg.url, &["worker"], &env);
    wait_count(
        &pool,
        "SELECT count(*) FROM pgmq.a_probe",
        10,
        Duration::from_secs(30),
    )
    .await;
    common::assert_probes_done_exactly_once(&pool, 10).await;
}

/// Item 2: the default configuration does not warn about itself at start (it used to
/// warn once per queue that its concurrency exceeded the pool), and states its
/// connection budget instead.
#[tokio::test]
async fn a_worker_on_the_defaults_starts_without_warnings() {
    let t = db().await;
    // The binary's own defaults, not the suite's (whose log and vault roots are both
    // the temp directory, which is warned about).
    let defaults = [
        ("LONGSHORE__BILLING__LOG_ROOTS", common::UNSET),
        ("LONGSHORE__BILLING__VAULT_ROOTS", common::UNSET),
        ("LONGSHORE__PROBE__FAULT_KNOBS", common::UNSET),
    ];
    let w = Proc::spawn(&t.url, &["worker"], &defaults);
    let logs = eventually(Duration::from_secs(15), "worker started", || async {
        let l = w.logs();
        l.contains("worker started").then_some(l)
    })
    .await;
    // The server's own settings are not the binary's defaults: a server without
    // autovacuum (this development machine's) is rightly warned about.
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| !l.contains("autovacuum is off on this server"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert!(logs.contains("connection budget"), "{logs}");
}

/// Item 5: rolling deploys. A newer producer sends a field this build does not know:
/// the worker runs the jobs (and says so once per kind), the CLI's door refuses it.
#[tokio::test]
async fn unknown_fields_are_ignored_by_workers_and_logged_once() {
    let t = db().await;
    common::send_probes(&t.pool, 5, json!({"effect": true, "priority": "high"})).await;
    let w = Proc::spawn(&t.url, &["worker"], &[]);
    wait_count(
        &t.pool,
        "SELECT count(*) FROM pgmq.a_probe",
        5,
        Duration::from_secs(20),
    )
    .await;
    common::assert_probes_done_exactly_once(&t.pool, 5).await;
    let logs = w.logs();
    assert_eq!(
        logs.matches("args carry fields this build does not know")
            .count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("priority"), "{logs}");
    let (code, _, err) = common::run_cli(
        &t.url,
        &["enqueue", "probe", r#"{"id": 9, "priority": "high"}"#],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `priority`"), "{err}");
}

/// Smaller edge (issue 13): acknowledgements already in flight are never counted as
/// lost leases, and an outcome waiting behind a slow flush keeps its lease. One flush
/// writes the done jobs, then a dead letter; each statement is slow before it touches
/// any row (a statement trigger sleeps 2.5 s), together longer than the 2 s lease; two
/// workers. Before the fix the heartbeat still held the done jobs, found their rows
/// gone and counted each as a lost lease; and the dead letter's lease, not extended
/// while its write waited, let the other worker take the job meanwhile.
#[tokio::test]
async fn acknowledgements_in_flight_are_not_counted_as_lost_leases() {
    let t = db().await;
    sqlx::raw_sql(
        r#"CREATE FUNCTION slow_settle() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF (current_query() LIKE '%INSERT INTO longshore.dead_letters%'
               OR current_query() LIKE '%INSERT INTO pgmq.a_probe%')
              AND current_query() NOT LIKE '%SKIP LOCKED%' THEN PERFORM pg_sleep(2.5); END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER slow_settle BEFORE DELETE ON pgmq.q_probe
         FOR EACH STATEMENT EXECUTE FUNCTION slow_settle();"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    common::send_probes(&t.pool, 12, json!({})).await;
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": \"not a number\"}')")
        .execute(&t.pool)
        .await
        .unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string()
    };
    let env = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "2s"),
        ("LONGSHORE__WORKER__ACK_FLUSH", "300ms"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "200ms"),
    ];
    let ports = [free_port(), free_port()];
    let workers: Vec<Proc> = ports
        .iter()
        .map(|p| Proc::spawn(&t.url, &["worker", "--metrics-port", p], &env))
        .collect();
    let logs = || {
        workers
            .iter()
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while count(
        &t.pool,
        "SELECT (SELECT count(*) FROM pgmq.a_probe) + (SELECT count(*) FROM longshore.dead_letters)",
    )
    .await
        < 13
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not all settled: {:?}\n{}",
            sqlx::query_as::<_, (i64, i32, bool)>(
                "SELECT msg_id, read_ct, vt > now() FROM pgmq.q_probe ORDER BY 1"
            )
            .fetch_all(&t.pool)
            .await
            .unwrap(),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for port in &ports {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let text = eventually(Duration::from_secs(10), "worker metrics", || {
            let url = url.clone();
            async move {
                let t = reqwest::get(&url).await.ok()?.text().await.ok()?;
                // Served (the queue gauges are sampled at start); a worker that got no job
                // has no job counters.
                t.contains("longshore_queue_depth").then_some(t)
            }
        })
        .await;
        let stale: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("longshore_stale_acks_total") && !l.ends_with(" 0"))
            .collect();
        assert!(stale.is_empty(), "{stale:?}\n{}", logs());
    }
    assert!(!logs().contains("lease lost"), "{}", logs());
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE read_ct = 1"
        )
        .await,
        12,
        "each ran once"
    );
    assert_eq!(
        count(
            &t.pool,
            "SELECT attempts::bigint FROM longshore.dead_letters"
        )
        .await,
        1,
        "the bad one was claimed once: its lease held while its burial was slow\n{}",
        logs()
    );
}

/// Shutdown (issue 13, review): a claim still in flight when SIGTERM arrives may be
/// granted by the server; its messages are released at once (visible, attempt not
/// spent), not left leased to nobody until their lease ends. The claim is made slow (a
/// statement trigger sleeps 2 s in the claim only) and the signal lands during it.
#[tokio::test]
async fn a_claim_in_flight_at_the_signal_is_released() {
    let t = db().await;
    // No polling: the one claim after the insert is the NOTIFY's, so it sees the jobs.
    let w = Proc::spawn(
        &t.url,
        &["worker"],
        &[("LONGSHORE__WORKER__POLL_INTERVAL", "600s")],
    );
    eventually(Duration::from_secs(15), "worker started", || async {
        w.logs().contains("worker started").then_some(())
    })
    .await;
    // Let the claims every consumer makes at start finish before the claim is slowed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::raw_sql(
        r#"CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF current_query() LIKE '%normal AS%' THEN PERFORM pg_sleep(2); END IF; RETURN NULL; END $$;
         CREATE TRIGGER slow_claim BEFORE UPDATE ON pgmq.q_probe
         FOR EACH STATEMENT EXECUTE FUNCTION slow_claim();"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    let mut w = w;
    common::send_probes(&t.pool, 5, json!({"effect": true})).await;
    // The NOTIFY wakes the consumer: its claim, which sees the jobs, sleeps in the trigger.
    eventually(Duration::from_secs(10), "the claim is running", || async {
        let n = count(
            &t.pool,
            r#"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
             AND query LIKE '%normal AS%pgmq.q_probe%' AND wait_event = 'PgSleep'"#,
        )
        .await;
        (n >= 1).then_some(())
    })
    .await;
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(40)).await,
        Some(0),
        "{}",
        w.logs()
    );
    assert_eq!(
        count(
            &t.pool,
            r#"SELECT count(*) FROM pgmq.q_probe WHERE vt <= now() AND last_read_at IS NULL
             AND longshore.header_int(headers, 'free_reads') = 1"#
        )
        .await,
        5,
        "released, visible now, attempt not spent\n{:?}\n{}",
        sqlx::query_as::<_, (i64, i32, Option<serde_json::Value>, bool, bool)>(
            "SELECT msg_id, read_ct, headers, vt <= now(), last_read_at IS NULL FROM pgmq.q_probe"
        )
        .fetch_all(&t.pool)
        .await
        .unwrap(),
        w.logs()
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects").await,
        0,
        "none ran"
    );
}

/// Item 2, last part: a handler stuck in synchronous code (deaf to cancellation) past
/// its timeout does not hold its job forever. Its lease is no longer extended after
/// `timeout`, it lapses, and another worker does the job while the stuck run is still
/// blocked (the trace shows the stuck run has not ended when the job is done); the stuck
/// run's late writes are fenced out. Before the fix the heartbeat kept extending the
/// lease until the handler unblocked, 20 s later.
#[tokio::test]
async fn a_handler_stuck_past_its_timeout_lets_its_job_go() {
    let t = db().await;
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 1, \"effect\": true, \"block_ms\": 20000}')")
        .execute(&t.pool)
        .await
        .unwrap();
    let trace = RunTrace::new("stuck");
    let (k, v) = trace.env();
    let env = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "4s"),
        ("LONGSHORE__QUEUES__PROBE__TIMEOUT", "5s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
        (k, v.as_str()),
    ];
    let a = Proc::spawn(&t.url, &["worker"], &env);
    wait_count(&t.pool, IN_FLIGHT, 1, Duration::from_secs(10)).await;
    // Later runs are not stuck.
    sqlx::query("UPDATE pgmq.q_probe SET message = message - 'block_ms'")
        .execute(&t.pool)
        .await
        .unwrap();
    let b = Proc::spawn(&t.url, &["worker"], &env);
    wait_count(
        &t.pool,
        "SELECT count(*) FROM pgmq.a_probe",
        1,
        Duration::from_secs(30),
    )
    .await;
    let runs = std::fs::read_to_string(trace.dir.join("runs.log")).unwrap_or_default();
    let stuck = format!("1 1 {}", a.pid());
    assert!(
        runs.contains(&format!("start {stuck}")) && !runs.contains(&format!("end {stuck}")),
        "the job was done while the stuck run was still blocked\n{runs}\nA:\n{}\nB:\n{}",
        a.logs(),
        b.logs()
    );
    // The stuck run wakes after 20 s; its writes must change nothing.
    eventually(Duration::from_secs(40), "the stuck run ended", || {
        let runs = std::fs::read_to_string(trace.dir.join("runs.log")).unwrap_or_default();
        let ended = format!("end {stuck}");
        async move { runs.contains(&ended).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::assert_probes_done_exactly_once(&t.pool, 1).await;
    assert!(
        count(&t.pool, "SELECT attempt::bigint FROM probe_effects").await >= 2,
        "the effect is a later run's"
    );
}

/// Handlers that occupy every runtime thread with synchronous or CPU-bound work for
/// longer than the lease (but within their timeout) are alive, and keep their leases:
/// the lease keeper runs on a thread of its own. Two workers, lease 4 s, jobs that
/// block their thread for 10 s: no second execution starts while one is running. (With
/// heartbeats on the handlers' runtime, both threads blocked meant no heartbeat, the
/// leases lapsed and the other worker ran the same jobs beside them.)
#[tokio::test]
async fn busy_handler_threads_cannot_starve_the_leases() {
    let t = db().await;
    // As many as the runtime has threads here (one per core; 2 on CI): both blocked.
    // More would leave their ctx.tx() waits stalled behind the blocked threads too.
    let n = std::thread::available_parallelism().map_or(2, |n| n.get()) as i64;
    common::send_probes(&t.pool, n, json!({"effect": true, "block_ms": 10_000})).await;
    let trace = RunTrace::new("busy");
    let (k, v) = trace.env();
    let env = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "4s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
        (k, v.as_str()),
    ];
    let a = Proc::spawn(&t.url, &["worker"], &env);
    wait_count(&t.pool, IN_FLIGHT, n, Duration::from_secs(10)).await;
    let b = Proc::spawn(&t.url, &["worker"], &env);
    let pool = t.pool.clone();
    eventually(Duration::from_secs(60), "all done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == n).then_some(()) }
    })
    .await;
    assert!(
        trace.overlaps().is_empty(),
        "{:?}\nA:\n{}\nB:\n{}",
        trace.overlaps(),
        a.logs(),
        b.logs()
    );
    common::assert_probes_done_exactly_once(&t.pool, n).await;
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE read_ct = 1"
        )
        .await,
        n,
        "each claimed once: no lease lapsed\nA:\n{}\nB:\n{}",
        a.logs(),
        b.logs()
    );
}
