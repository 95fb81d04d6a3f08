//! The operator commands and `longshore dev`, through the real binary.

mod common;

use std::time::Duration;

use common::{Proc, RunTrace, count, db, eventually, run_cli};

#[tokio::test]
async fn enqueue_queues_and_dlq_commands() {
    let t = db().await;
    let (code, out, err) = run_cli(
        &t.url,
        &["enqueue", "probe", r#"{"id":1}"#, "--key", "k1"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (_, out, _) = run_cli(
        &t.url,
        &["enqueue", "probe", r#"{"id":1}"#, "--key", "k1"],
        &[],
    );
    let again: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["duplicate"], true);
    let (code, _, _) = run_cli(
        &t.url,
        &["enqueue", "probe", r#"{"id":2}"#, "--delay", "1h"],
        &[],
    );
    assert_eq!(code, 0);

    let (code, out, _) = run_cli(&t.url, &["queues", "--json"], &[]);
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds = common::registry().kinds().count();
    assert_eq!(rows.len(), kinds, "one row per registered queue: {out}");
    let row = rows
        .iter()
        .find(|r| r["queue"] == "probe")
        .expect("probe row");
    assert_eq!(
        (
            row["queue"].as_str(),
            row["visible"].as_i64(),
            row["delayed"].as_i64()
        ),
        (Some("probe"), Some(1), Some(1))
    );
    let (_, table, _) = run_cli(&t.url, &["queues"], &[]);
    assert!(
        table.starts_with("QUEUE") && table.contains("probe"),
        "{table}"
    );

    // A dead letter through the worker, then list / retry / purge.
    sqlx::query("SELECT pgmq.send('probe', '[1,2]')")
        .execute(&t.pool)
        .await
        .unwrap();
    let w = Proc::spawn(&t.url, &["worker"], &[]);
    let pool = t.pool.clone();
    eventually(Duration::from_secs(10), "dead letter", || {
        let pool = pool.clone();
        async move {
            let n = count(&pool, "SELECT count(*) FROM longshore.dead_letters").await;
            (n == 1).then_some(())
        }
    })
    .await;
    drop(w);
    let (code, out, _) = run_cli(&t.url, &["dlq", "list", "probe"], &[]);
    assert_eq!(code, 0);
    let dl: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        dl["last_error"].as_str().unwrap().contains("invalid args"),
        "{dl}"
    );
    let (code, out, _) = run_cli(
        &t.url,
        &["dlq", "retry", "probe", &dl["id"].to_string()],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("\"queue\":\"probe\""), "{out}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.operator_actions WHERE action = 'dlq_retry' AND actor LIKE 'cli:%'").await,
        1,
        "a retry by id is recorded"
    );
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.q_probe WHERE message = '[1,2]'"
        )
        .await,
        1
    );
    sqlx::query("INSERT INTO longshore.dead_letters (queue, msg_id, attempts, last_error, enqueued_at) VALUES ('probe', 999, 1, 'x', now())")
        .execute(&t.pool)
        .await
        .unwrap();
    let (code, out, err) = run_cli(&t.url, &["dlq", "purge", "probe"], &[]);
    assert_eq!(code, 0, "{err}");
    let purged: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(purged["affected"], 1, "{out}");
}

#[tokio::test]
async fn bad_input_is_a_clear_error_with_exit_code_2() {
    let t = db().await;
    // (args, environment, what stderr must say)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["enqueue", "nosuch", "{}"],
            &[],
            "unknown queue \"nosuch\"",
        ),
        (&["enqueue", "x; drop table", "{}"], &[], "may only contain"),
        (&["enqueue", "probe", "{not json"], &[], "args are not JSON"),
        (
            &["enqueue", "probe", r#"{"id":"one"}"#],
            &[],
            "args do not fit probe",
        ),
        (
            &["enqueue", "probe", "[1,2]"],
            &[],
            "expected a JSON object",
        ),
        (
            &["worker", "--queues", "nosuch"],
            &[],
            "no handler is registered for queue \"nosuch\"",
        ),
        (
            &["worker"],
            &[("LONGSHORE__WORKER__CONCURRENCY", "many")],
            "worker.concurrency",
        ),
        (
            &["worker"],
            &[("LONGSHORE__QUEUES__PROBE__LEASE", "1ms")],
            "queues.probe.lease",
        ),
    ];
    for (args, env, needle) in cases {
        let (code, _, err) = run_cli(&t.url, args, env);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
    }
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        0,
        "nothing enqueued"
    );
}

#[tokio::test]
async fn secrets_in_the_database_url_never_reach_output() {
    // A wrong password for a server that needs none would still connect on trust
    // auth, so point at a closed port: the error path must not print the URL.
    let url = "postgres://canary:hunter2-canary-secret@127.0.0.1:1/db";
    let (code, out, err) = run_cli(
        url,
        &["queues"],
        &[("LONGSHORE__DATABASE__ACQUIRE_TIMEOUT", "1s")],
    );
    assert_ne!(code, 0);
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
}

/// POSTs `body` to `/v1/{path}` with the dev token (202 expected), then waits for the
/// job on `queue` and returns its status.
async fn post_and_wait(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    body: String,
    queue: &str,
) -> serde_json::Value {
    let r = http
        .post(format!("http://{addr}/v1/{path}"))
        .header("Authorization", "Bearer dev-token")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    http.get(format!("http://{addr}/v1/jobs/{queue}/{id}?wait=10"))
        .header("Authorization", "Bearer dev-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Issue 3's acceptance path: `longshore dev` accepts the README's curl with the dev
/// token, the job completes, `?wait=` returns done, /metrics shows the queue series.
#[tokio::test]
async fn dev_serves_the_readme_curl_and_stops_cleanly() {
    let t = db().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // The dev overlay's traffic simulator and vault write under .longshore/: not here.
    let dir = std::env::temp_dir().join(format!("longshore-dev-curl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dev = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["dev"],
        &[("LONGSHORE__INGRESS__LISTEN", &listen)],
    );
    let addr = dev.ingress_addr().await;
    assert!(
        dev.logs().contains("Bearer dev-token"),
        "dev prints a curl example: {}",
        dev.logs()
    );
    let http = reqwest::Client::new();
    let s = post_and_wait(
        &http,
        &addr,
        "queues/probe/jobs",
        r#"{"id":1,"effect":true}"#.into(),
        "probe",
    )
    .await;
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects").await,
        1
    );
    let metrics = eventually(Duration::from_secs(15), "queue series", || {
        let (http, addr) = (http.clone(), addr.clone());
        async move {
            let m = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            m.contains("longshore_queue_depth{queue=\"probe\"}")
                .then_some(m)
        }
    })
    .await;
    assert!(
        metrics.contains("longshore_jobs_total{queue=\"probe\",outcome=\"done\"}"),
        "{metrics}"
    );
    dev.signal("INT");
    assert_eq!(
        dev.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        dev.logs()
    );
}

/// Issue 4's acceptance path: `longshore dev` seeds demo customers, its traffic
/// simulator writes HAProxy files into the spool, and the scheduled pipeline carries
/// them to usage records, charge intents confirmed on the chain simulator, and a vault
/// without the suspended customer's keys. `POST /v1/logs` feeds the same pipeline.
#[tokio::test]
async fn dev_runs_the_billing_pipeline_on_simulated_traffic() {
    let t = db().await;
    let dir = std::env::temp_dir().join(format!("longshore-dev-billing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut dev = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["dev"],
        &[
            ("LONGSHORE__INGRESS__LISTEN", &listen),
            ("LONGSHORE__TRAFFIC__INTERVAL", "1s"),
            ("LONGSHORE__TRAFFIC__LINES", "1000"),
            // The dev overlay's own roots (relative to `dir`), not the suite's.
            ("LONGSHORE__BILLING__LOG_ROOTS", common::UNSET),
            ("LONGSHORE__BILLING__VAULT_ROOTS", common::UNSET),
        ],
    );
    let addr = dev.ingress_addr().await;
    // The simulator starts beside the ingress; its log line may follow the address.
    eventually(
        Duration::from_secs(10),
        "the traffic simulator named in the log",
        || {
            let logs = dev.logs();
            async move { logs.contains("dev traffic simulator").then_some(()) }
        },
    )
    .await;

    // Raw lines through the ingress.
    let line = "Jan 27 21:52:56 lb1 haproxy[3098]: 10.0.0.7:61818 [27/Jan/2026:21:52:56.086] fe_api~ be_seal/s1 0/0/1/1/2 200 517 - - ---- 1/1/0/0/0 0/0 {1001|seal} {} \"POST /v1/seal HTTP/1.1\"";
    let http = reqwest::Client::new();
    let s = post_and_wait(
        &http,
        &addr,
        "logs",
        format!("{line}\nnot a log line\n"),
        "ingest_logs",
    )
    .await;
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(
        (
            s["result"]["inserted"].as_i64(),
            s["result"]["malformed"].as_i64()
        ),
        (Some(1), Some(1)),
        "{s}"
    );

    // An empty batch and a missing token are refused with their codes.
    let r = http
        .post(format!("http://{addr}/v1/logs"))
        .header("Authorization", "Bearer dev-token")
        .body("\n \n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "empty_batch"
    );
    let r = http
        .post(format!("http://{addr}/v1/logs"))
        .body(line)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let pool = t.pool.clone();
    eventually(Duration::from_secs(90), "usage charged on the simulator", || {
        let pool = pool.clone();
        async move {
            let files = count(&pool, "SELECT count(*) FROM ingested_files WHERE source LIKE '%haproxy-%'").await;
            let usage = count(&pool, "SELECT coalesce(sum(billable_count), 0)::bigint FROM usage_records").await;
            let charged = count(&pool, "SELECT count(*) FROM charge_intents WHERE state = 'confirmed' AND usage_amount > 0").await;
            (files > 0 && usage > 0 && charged > 0).then_some(())
        }
    })
    .await;
    assert!(
        dev.logs().contains("SIMULATOR"),
        "the chain simulator names itself"
    );
    // Customer 1004 cannot pay its base fee: suspended, with the rule's details.
    let (state, reason): (String, Option<String>) = sqlx::query_as(
        "SELECT state, suspend_reason FROM service_instances WHERE customer_id = 1004",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("suspended", Some("insufficient_balance"))
    );
    // The vault (dev key) has the other customers' keys and not 1004's.
    let vault = dir.join(".longshore/vault/ma_vault.csv");
    let customers = eventually(Duration::from_secs(40), "the vault without 1004", || {
        let vault = vault.clone();
        async move {
            let text = std::fs::read_to_string(&vault).ok()?;
            let mut c: Vec<String> = text
                .lines()
                .skip(1)
                .map(|l| l.split(',').next().unwrap().to_string())
                .collect();
            c.dedup();
            // The file can predate the suspension: its regeneration follows within
            // the coalescing window, so wait for the version without 1004.
            (!c.is_empty() && !c.iter().any(|c| c == "1004")).then_some(c)
        }
    })
    .await;
    assert_eq!(customers, ["1001", "1002", "1003"]);
    // Ingested files leave the spool for done/ (once quiet for MOVE_QUIET).
    let done = dir.join(".longshore/logs/done");
    eventually(
        Duration::from_secs(40),
        "a spool file moved to done/",
        || {
            let done = done.clone();
            async move {
                let n = std::fs::read_dir(&done).map(|d| d.count()).unwrap_or(0);
                (n > 0).then_some(())
            }
        },
    )
    .await;
    // The ledger agrees with the intents, read in one statement (one snapshot: the
    // fleet is still charging, and a charge commits its ledger row and its intent's
    // state together, so two separate counts could straddle a commit).
    let (confirmed, charges): (i64, i64) = sqlx::query_as(
        r#"SELECT (SELECT count(*) FROM charge_intents WHERE state = 'confirmed'),
                (SELECT count(*) FROM escrow_transactions WHERE tx_type = 'charge')"#,
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(confirmed, charges);
    // The market pipeline on the simulator: the seeded watchers are backfilled into
    // signals, and the win-rate tick scores them.
    eventually(
        Duration::from_secs(60),
        "signals and win-rates for the three demo pairs",
        || async {
            let pairs = count(
                &t.pool,
                "SELECT count(DISTINCT (symbol, timeframe)) FROM signals",
            )
            .await;
            // A pair may have no directional signal with a known outcome yet
            // (sample 0): its row is there all the same.
            let rates = count(&t.pool, "SELECT count(*) FROM win_rate").await;
            (pairs == 3 && rates == 3).then_some(())
        },
    )
    .await;
    assert!(
        count(
            &t.pool,
            "SELECT count(*) FROM signals WHERE direction <> 'flat'"
        )
        .await
            > 0,
        "the simulator's market produces directional signals"
    );
    assert!(
        dev.logs()
            .contains("market simulator (seed 42, deterministic; not market data)")
    );
    // The chat pipeline on the echo simulator: the README's POST, then a waiting GET.
    let s = post_and_wait(
        &http,
        &addr,
        "queues/llm_call/jobs",
        r#"{"request_id":"7d8f4e2a-1111-4c3b-9a57-0f7c1d2e3f40","user_id":"0b7e0a52-2222-4c3b-9a57-0f7c1d2e3f40","messages":[{"role":"user","content":"Hello?"}]}"#.into(),
        "llm_call",
    )
    .await;
    assert_eq!(s["state"], "done", "{s}");
    let r = &s["result"];
    assert_eq!(
        (r["provider"].as_str(), r["content"].as_str()),
        (Some("grok"), Some("echo: Hello?")),
        "{s}"
    );
    // grok: 6 input tokens (2 + 4 for the message), 3 output → ceil(1.018) = 2.
    assert_eq!(
        (r["credits_charged"].as_i64(), r["balance"].as_i64()),
        (Some(2), Some(98))
    );
    assert!(dev.logs().contains("echo simulator"));
    dev.signal("INT");
    assert_eq!(
        dev.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        dev.logs()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded default on a machine with PostgreSQL installed but not running: a
/// private cluster is created, started, used and stopped.
#[tokio::test]
async fn a_private_cluster_starts_serves_and_stops() {
    let dir = std::env::temp_dir().join(format!("longshore-embedded-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.clone();
    let pg = tokio::task::spawn_blocking(move || longshore_workers::embedded::Embedded::start(&d))
        .await
        .unwrap()
        .expect("initdb/pg_ctl found and the cluster started");
    let pool = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    longshore_workers::db::migrate(&pool, &common::MIGRATOR, &common::registry())
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT pgmq.send('probe', '{\"id\":1}')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(id >= 1);
    pool.close().await;
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn json_logs_are_one_json_object_per_line() {
    let t = db().await;
    let mut w = Proc::spawn(&t.url, &["worker"], &[("LONGSHORE__LOG__FORMAT", "json")]);
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 1, \"fail_times\": 1}')")
        .execute(&t.pool)
        .await
        .unwrap();
    let w_log = w.log.clone();
    eventually(Duration::from_secs(10), "a retry logged", || {
        let w_log = w_log.clone();
        async move {
            let l = std::fs::read_to_string(&w_log).unwrap_or_default();
            l.contains("will retry").then_some(())
        }
    })
    .await;
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await, Some(0));
    let logs = w.logs();
    let mut saw_job_span = false;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        if v["message"] == "will retry" {
            assert_eq!(
                v["span"]["queue"], "probe",
                "job span carries the queue: {line}"
            );
            assert_eq!(v["span"]["attempt"], 1, "{line}");
            saw_job_span = true;
        }
    }
    assert!(saw_job_span, "{logs}");
}

/// Issue 13: `dlq retry QUEUE` with no ids re-sends every dead letter in bounded
/// batches, each its own transaction (never one statement over the whole table).
#[tokio::test]
async fn dlq_retry_of_a_whole_queue_works_in_bounded_batches() {
    let t = db().await;
    sqlx::query(
        r#"INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at)
         SELECT 'probe', i, jsonb_build_object('id', i), '{"free_reads": 2, "deaths": 1}', 3, 'boom', now()
         FROM generate_series(1, 2500) i"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    let (code, out, err) = run_cli(&t.url, &["dlq", "retry", "probe", "--batch", "1000"], &[]);
    assert_eq!(code, 0, "{err}");
    // One operator action per batch, each its own transaction.
    let batches: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT action, (detail->>'affected')::bigint, actor FROM longshore.operator_actions ORDER BY id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    let sizes: Vec<i64> = batches.iter().map(|b| b.1).collect();
    assert_eq!(sizes, vec![1000, 1000, 500], "{batches:?}");
    assert!(
        batches
            .iter()
            .all(|b| b.0 == "bulk_retry" && b.2.starts_with("cli:")),
        "{batches:?}"
    );
    let done: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(done["affected"], 2500, "{out}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await,
        2500
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.q_probe WHERE headers ?| array['free_reads', 'deaths', 'last_error']").await,
        0,
        "fresh jobs: attempts start over"
    );
    let (code, _, err) = run_cli(&t.url, &["dlq", "retry", "probe", "--batch", "0"], &[]);
    assert_eq!(code, 2, "{err}");
}

/// Issue 19: `longshore queue pause` stops every worker of the fleet claiming from the
/// queue (two processes here), while the queue still takes enqueues and a job already
/// running finishes; `queues` and the metrics show the pause; `resume` wakes the fleet
/// and the queue drains. Each action is recorded with who did it. An unknown queue is a
/// usage error.
#[tokio::test]
async fn a_paused_queue_takes_jobs_no_worker_claims_them_and_resume_drains_it() {
    let t = db().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let env = [
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
        ("LONGSHORE__METRICS__SAMPLE_INTERVAL", "200ms"),
    ];
    let _w1 = Proc::spawn(&t.url, &["worker", "--metrics-port", &port], &env);
    let _w2 = Proc::spawn(&t.url, &["worker"], &env);
    let status = |id: i64| {
        let pool = t.pool.clone();
        async move {
            longshore_workers::testing::job_status(&pool, "probe", id)
                .await
                .map(|s| (s.state, s.attempts))
        }
    };
    let enqueue = |args: &str| {
        let (code, out, err) = run_cli(&t.url, &["enqueue", "probe", args], &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    // A job running when the pause comes.
    let running = enqueue(r#"{"id":1,"sleep_ms":1500}"#);
    eventually(Duration::from_secs(10), "the first job running", || async {
        (status(running).await?.0 == longshore_workers::store::JobState::Running).then_some(())
    })
    .await;

    let (code, out, err) = run_cli(
        &t.url,
        &[
            "queue",
            "pause",
            "probe",
            "--reason",
            "maintenance window",
            "--by",
            "ops:ana",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (answer["paused"].as_bool(), answer["changed"].as_bool()),
        (Some(true), Some(true))
    );
    let waiting: Vec<i64> = (2..=6)
        .map(|i| enqueue(&format!(r#"{{"id":{i}}}"#)))
        .collect();

    // The running job finishes; the queued ones stay unclaimed by either worker, over
    // many polls of both (100 ms each) and one idle sleep's cap.
    eventually(Duration::from_secs(10), "the running job done", || async {
        (status(running).await?.0 == longshore_workers::store::JobState::Done).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &waiting {
        assert_eq!(
            status(*id).await,
            Some((longshore_workers::store::JobState::Queued, 0)),
            "job {id} was claimed from a paused queue"
        );
    }
    let (_, out, _) = run_cli(&t.url, &["queues", "--json"], &[]);
    let probe: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["queue"] == "probe")
        .unwrap();
    assert_eq!(
        (probe["paused"].as_bool(), probe["visible"].as_i64()),
        (Some(true), Some(5))
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(Duration::from_secs(10), "the paused gauge", || {
        let url = url.clone();
        async move {
            let m = reqwest::get(&url).await.ok()?.text().await.ok()?;
            m.contains(r#"longshore_queue_paused{queue="probe"} 1"#)
                .then_some(())
        }
    })
    .await;

    let (code, out, err) = run_cli(
        &t.url,
        &["queue", "resume", "probe", "--by", "ops:ana"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""changed":true"#), "{out}");
    for id in &waiting {
        let id = *id;
        eventually(
            Duration::from_secs(10),
            "resumed jobs done",
            || async move {
                (status(id).await?.0 == longshore_workers::store::JobState::Done).then_some(())
            },
        )
        .await;
    }
    let actions: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT actor, action, detail FROM longshore.operator_actions WHERE queue = 'probe' ORDER BY id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        actions
            .iter()
            .map(|(a, b, _)| (a.as_str(), b.as_str()))
            .collect::<Vec<_>>(),
        [("ops:ana", "pause"), ("ops:ana", "resume")]
    );
    assert_eq!(actions[0].2["reason"], "maintenance window");

    let (code, _, err) = run_cli(&t.url, &["queue", "pause", "nosuchqueue"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("E_UNKNOWN_QUEUE"), "{err}");
}

/// Issue 19: `longshore job cancel` takes a waiting job out for good (it is recorded as
/// `cancelled` and never runs: its effect is never written), stops a running one at its
/// worker's next heartbeat (its transaction rolled back), and says so for a job already
/// ended or unknown;
/// `longshore job retry` makes a delayed job visible now. Every action is recorded.
#[tokio::test]
async fn job_cancel_and_retry_now() {
    use longshore_workers::store::JobState;
    let t = db().await;
    let enqueue = |args: &[&str]| {
        let mut all = vec!["enqueue", "probe"];
        all.extend_from_slice(args);
        let (code, out, err) = run_cli(&t.url, &all, &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    let state = |id: i64| {
        let pool = t.pool.clone();
        async move {
            longshore_workers::testing::job_status(&pool, "probe", id)
                .await
                .map(|s| s.state)
        }
    };
    let job = |args: &[&str]| {
        let mut all = vec!["job"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--by", "ops:ana"]);
        run_cli(&t.url, &all, &[])
    };

    // Waiting jobs, no worker yet: one visible, one delayed an hour.
    let visible = enqueue(&[r#"{"id":1,"effect":true}"#]);
    let delayed = enqueue(&[r#"{"id":2,"effect":true}"#, "--delay", "1h"]);
    for id in [visible, delayed] {
        let (code, out, err) = job(&["cancel", "probe", &id.to_string()]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(r#""outcome":"cancelled""#), "{out}");
        assert_eq!(state(id).await, Some(JobState::Cancelled));
    }
    let (code, out, _) = job(&["cancel", "probe", &visible.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains(r#""outcome":"final""#), "{out}");
    let (code, _, err) = job(&["cancel", "probe", "999999"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("E_UNKNOWN_JOB"), "{err}");

    // retry: a delayed job becomes visible now.
    let later = enqueue(&[r#"{"id":3,"effect":true}"#, "--delay", "1h"]);
    let (code, out, err) = job(&["retry", "probe", &later.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""outcome":"visible""#), "{out}");
    let (_, out, _) = job(&["retry", "probe", &later.to_string()]);
    assert!(out.contains(r#""outcome":"unchanged""#), "{out}");

    // A worker now: the retried job runs, the cancelled ones never do.
    let _w = Proc::spawn(
        &t.url,
        &["worker"],
        &[
            ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
            ("LONGSHORE__QUEUES__PROBE__LEASE", "3s"),
        ],
    );
    eventually(Duration::from_secs(10), "the retried job done", || async {
        (state(later).await? == JobState::Done).then_some(())
    })
    .await;
    // A running job: its worker sees the request at its next heartbeat (the lease is
    // 3 s here, a heartbeat every second) and stops it; the effect it wrote in its
    // transaction is rolled back, and it ends cancelled long before its 20 s hold.
    let running = enqueue(&[r#"{"id":4,"effect":true,"hold_ms":20000}"#]);
    eventually(Duration::from_secs(10), "a running job", || async {
        (state(running).await? == JobState::Running).then_some(())
    })
    .await;
    let (code, out, err) = job(&["cancel", "probe", &running.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""outcome":"requested""#), "{out}");
    eventually(
        Duration::from_secs(10),
        "the running job cancelled",
        || async { (state(running).await? == JobState::Cancelled).then_some(()) },
    )
    .await;
    // By the worker that ran it, at its heartbeat: the first and only attempt, not
    // re-claimed after its lease ran out (`deaths`) nor released (`free_reads`).
    let (attempts, headers): (i32, serde_json::Value) = sqlx::query_as(
        "SELECT attempts, headers FROM longshore.cancelled_jobs WHERE queue = 'probe' AND msg_id = $1",
    )
    .bind(running)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1, "{headers}");
    assert!(
        headers.get("deaths").is_none() && headers.get("free_reads").is_none(),
        "{headers}"
    );
    assert_eq!(headers["cancel_requested"]["by"], "ops:ana");
    // A job put back with a cancel request on it (its run ended in a retry before its
    // worker saw the request) is recorded cancelled by the next claim, not run.
    let put_back: i64 = sqlx::query_scalar(
        r#"SELECT pgmq.send('probe', '{"id":5,"effect":true}', '{"cancel_requested":{"by":"ops:ana"}}'::jsonb, 0)"#,
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the put-back job cancelled",
        || async { (state(put_back).await? == JobState::Cancelled).then_some(()) },
    )
    .await;
    let by: String = sqlx::query_scalar(
        "SELECT cancelled_by FROM longshore.cancelled_jobs WHERE queue = 'probe' AND msg_id = $1",
    )
    .bind(put_back)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(by, "ops:ana");
    // A dead letter that still carries a cancel request (its run failed before the
    // request was seen): an operator's `dlq retry` runs it, the request dropped.
    sqlx::query(
        r#"INSERT INTO longshore.dead_letters (queue, msg_id, message, headers, attempts, last_error, enqueued_at)
           VALUES ('probe', 424242, '{"id":6,"effect":true}', '{"cancel_requested":{"by":"ops:ana"}}', 1, 'x', now())"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    let (code, _, err) = run_cli(&t.url, &["dlq", "retry", "probe"], &[]);
    assert_eq!(code, 0, "{err}");
    let pool = t.pool.clone();
    eventually(
        Duration::from_secs(10),
        "the retried dead letter run",
        || {
            let pool = pool.clone();
            async move {
                (count(&pool, "SELECT count(*) FROM probe_effects WHERE id = 6").await == 1)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM probe_effects WHERE id IN (1, 2, 4, 5)"
        )
        .await,
        0,
        "a cancelled job ran"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects WHERE id = 3").await,
        1
    );
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM longshore.operator_actions WHERE actor = 'ops:ana'"
        )
        .await,
        7
    );
}

/// Issue 19: `job bulk` acts on exactly the jobs its filter matches (state, error text,
/// age), in bounded batches each recorded with who did it, and never on a job a worker
/// holds; an action that does not apply to the state is refused with a code.
#[tokio::test]
async fn job_bulk_acts_on_what_the_filter_matches_in_recorded_batches() {
    let t = db().await;
    // 30 retrying with a timeout, enqueued 2 h ago; 20 retrying with another error; 25
    // retrying with a timeout but enqueued just now; 15 delayed; 10 visible; 5 held by
    // a worker (read, lease running) whose last error is a timeout too.
    sqlx::query(
        r#"
INSERT INTO pgmq.q_probe (vt, enqueued_at, read_ct, last_read_at, message, headers)
SELECT now() + interval '1 hour',
       CASE WHEN i <= 50 THEN now() - interval '2 hours' ELSE now() END,
       CASE WHEN i <= 75 THEN 2 WHEN i <= 90 THEN 0 WHEN i <= 100 THEN 0 ELSE 1 END,
       CASE WHEN i > 100 THEN now() END,
       jsonb_build_object('id', i),
       CASE WHEN i <= 30 OR (i > 50 AND i <= 75) OR i > 100
            THEN '{"last_error": "upstream TIMEOUT after 30s"}'::jsonb
            WHEN i <= 50 THEN '{"last_error": "bad gateway"}'::jsonb
            ELSE '{}'::jsonb END
  FROM generate_series(1, 105) i
"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    // The visible ten are due now.
    sqlx::query("UPDATE pgmq.q_probe SET vt = now() - interval '1 second' WHERE (message->>'id')::int BETWEEN 91 AND 100")
        .execute(&t.pool)
        .await
        .unwrap();
    let ids = |sql: &'static str| {
        let pool = t.pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(sql)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };

    let (code, out, err) = run_cli(
        &t.url,
        &[
            "job",
            "bulk",
            "cancel",
            "probe",
            "--state",
            "retrying",
            "--error",
            "timeout",
            "--older-than",
            "1h",
            "--batch",
            "7",
            "--by",
            "ops:ana",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["affected"], 30, "{out}");
    assert_eq!(
        ids("SELECT (message->>'id')::int FROM longshore.cancelled_jobs ORDER BY 1").await,
        (1..=30).collect::<Vec<_>>(),
        "exactly the old timeouts"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.cancelled_jobs WHERE cancelled_by = 'ops:ana' AND attempts = 2").await,
        30
    );
    let batches: Vec<i64> = sqlx::query_scalar(
        "SELECT (detail->>'affected')::bigint FROM longshore.operator_actions WHERE action = 'bulk_cancel' AND actor = 'ops:ana' ORDER BY id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(batches, vec![7, 7, 7, 7, 2], "batches of --batch");
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.q_probe WHERE (message->>'id')::int > 100"
        )
        .await,
        5,
        "a held job is never a bulk target"
    );

    // One more delayed job far past the others' ids: the batches walk the ids in
    // stretches of BULK_WINDOW and still reach it.
    sqlx::query(
        "INSERT INTO pgmq.q_probe (msg_id, vt, message) OVERRIDING SYSTEM VALUE VALUES (500000, now() + interval '1 hour', '{\"id\": 999}')",
    )
    .execute(&t.pool)
    .await
    .unwrap();
    // Retry the delayed ones: visible now, nothing else moves.
    let (code, out, err) = run_cli(
        &t.url,
        &["job", "bulk", "retry", "probe", "--state", "delayed"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"affected\":16"), "{out}");
    let mut want: Vec<i32> = (76..=100).collect();
    want.push(999);
    assert_eq!(
        ids("SELECT (message->>'id')::int FROM pgmq.q_probe WHERE vt <= now() ORDER BY 1").await,
        want,
        "the 16 delayed and the 10 that were visible"
    );

    // Dead letters: purge by error text; refused actions exit 2 with a code.
    sqlx::query(
        r#"INSERT INTO longshore.dead_letters (queue, msg_id, message, attempts, last_error, enqueued_at)
         SELECT 'probe', 1000 + i, jsonb_build_object('id', i), 5,
                CASE WHEN i % 2 = 0 THEN 'invalid args: x' ELSE 'provider 503' END, now()
           FROM generate_series(1, 40) i"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    let (code, out, err) = run_cli(
        &t.url,
        &[
            "job",
            "bulk",
            "purge",
            "probe",
            "--state",
            "dead",
            "--error",
            "INVALID ARGS",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"affected\":20"), "{out}");
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM longshore.dead_letters WHERE last_error = 'provider 503'"
        )
        .await,
        20
    );
    for (args, what) in [
        (
            ["job", "bulk", "cancel", "probe", "--state", "dead"],
            "cancel dead",
        ),
        (
            ["job", "bulk", "purge", "probe", "--state", "visible"],
            "purge live",
        ),
        (
            ["job", "bulk", "retry", "probe", "--state", "visible"],
            "retry visible",
        ),
    ] {
        let (code, _, err) = run_cli(&t.url, &args, &[]);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("E_BULK_NOT_APPLICABLE"), "{what}: {err}");
    }
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        20,
        "a refused action changed nothing"
    );
}

/// Issue 19: a bulk cancel racing a worker that is claiming from the same queue: every
/// job ends exactly once, done or cancelled, never both, never lost, and no job that
/// was cancelled ever started a run (the batch locks what it takes with SKIP LOCKED and
/// re-checks each row is not held as it deletes it).
#[tokio::test]
async fn a_bulk_cancel_racing_a_claiming_worker_loses_and_doubles_nothing() {
    let t = db().await;
    let trace = RunTrace::new("bulk-race");
    // 600 runs of 100 ms at 16 at a time: about 4 s of work, so the cancel (a process
    // start away) meets a worker still claiming even on a loaded machine.
    common::send_probes(&t.pool, 600, serde_json::json!({"sleep_ms": 100})).await;
    let (k, v) = trace.env();
    let w = Proc::spawn(
        &t.url,
        &["worker"],
        &[(k, &v), ("LONGSHORE__WORKER__CONCURRENCY", "16")],
    );
    let pool = t.pool.clone();
    eventually(Duration::from_secs(20), "the worker claiming", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await >= 20).then_some(()) }
    })
    .await;
    // Small batches, so the cancel and the claims interleave many times.
    let (code, out, err) = run_cli(
        &t.url,
        &[
            "job", "bulk", "cancel", "probe", "--state", "visible", "--batch", "7",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let cancelled = v["affected"].as_i64().unwrap();
    eventually(Duration::from_secs(30), "every job settled", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.q_probe").await == 0).then_some(()) }
    })
    .await;
    drop(w);
    let done = count(&t.pool, "SELECT count(*) FROM pgmq.a_probe").await;
    let gone = count(&t.pool, "SELECT count(*) FROM longshore.cancelled_jobs").await;
    assert_eq!(gone, cancelled, "{out}");
    assert!(
        cancelled > 0 && done > 20,
        "both sides got some: {done} done, {cancelled} cancelled"
    );
    assert_eq!(done + gone, 600, "every job ended exactly once");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.a_probe a JOIN longshore.cancelled_jobs c ON c.msg_id = a.msg_id").await,
        0,
        "never both"
    );
    let cancelled_ids: Vec<i64> =
        sqlx::query_scalar("SELECT (message->>'id')::bigint FROM longshore.cancelled_jobs")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    let starts = trace.starts();
    let ran: Vec<&i64> = cancelled_ids
        .iter()
        .filter(|i| starts.contains_key(i))
        .collect();
    assert!(ran.is_empty(), "cancelled jobs that started a run: {ran:?}");
    assert!(trace.overlaps().is_empty());
}
