//! Usage billing against a real PostgreSQL: ingesting HAProxy logs (exactly once per
//! file, malformed lines reported) and aggregating them into usage records (sums equal
//! raw counts, also after kill -9 at random points: row 3 of RELIABILITY.md).

mod common;

use std::time::Duration;

use common::{Proc, count, db, eventually};
use longshore_jobs::billing::aggregate_usage::{AggregateUsage, aggregate_chunk};
use longshore_jobs::billing::ingest_logs::{IngestLogs, ingest};
use longshore_workers::testing::{clear_jobs, count_done, results};
use longshore_workers::{EnqueueOptions, enqueue};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::PgPool;

/// A log line for customer `c`, service `s`, at `day` `hour:min`, with `status`.
fn line(c: i32, s: &str, day: u32, hour: u32, min: u32, status: i32, bytes: i64) -> String {
    format!(
        "Jan {day:02} {hour:02}:{min:02}:00 lb1 haproxy[3098]: 10.0.0.7:61818 [{day:02}/Jan/2026:{hour:02}:{min:02}:00.000] \
         fe_api~ be_{s}/s1 0/0/1/1/2 {status} {bytes} - - ---- 1/1/0/0/0 0/0 {{{c}|{s}}} {{}} \"POST /v1/{s} HTTP/1.1\""
    )
}

/// Sums per (customer, service, hour) from the raw rows vs. the usage records.
async fn assert_usage_matches_raw(pool: &PgPool) {
    let diff: i64 = sqlx::query_scalar(
        r#"WITH raw AS (SELECT customer_id, service_type, date_trunc('hour', ts) w, count(*) n,
            count(*) FILTER (WHERE status_code BETWEEN 200 AND 399) b, sum(bytes_out) by FROM haproxy_logs GROUP BY 1,2,3),
         agg AS (SELECT customer_id, service_type, window_start w, request_count n, billable_count b, bytes_transferred by FROM usage_records)
         SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM agg UNION ALL SELECT * FROM agg EXCEPT SELECT * FROM raw) d"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(diff, 0, "usage_records differ from the raw counts");
    let total = count(pool, "SELECT count(*) FROM haproxy_logs").await;
    assert_eq!(
        count(
            pool,
            "SELECT coalesce(sum(request_count), 0)::bigint FROM usage_records"
        )
        .await,
        total
    );
}

#[tokio::test]
async fn a_file_is_ingested_once_and_malformed_lines_are_reported() {
    let t = db().await;
    let dir = std::env::temp_dir().join(format!("longshore-spool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.log");
    let mut text = String::new();
    text.push_str(&line(1, "seal", 27, 21, 52, 200, 517));
    text.push('\n');
    text.push_str("garbage that is not a log line\n");
    text.push_str(&line(2, "seal", 28, 0, 1, 404, 10)); // the next day: a second partition
    text.push('\n');
    text.push_str(&line(3, "seal", 28, 0, 2, 200, 10).replace("{3|seal}", "{}"));
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    let p = path.to_string_lossy().to_string();

    let mut tx = t.pool.begin().await.unwrap();
    let r = ingest(&mut tx, &p, &std::fs::read(&path).unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (r.lines, r.inserted, r.malformed, r.already_ingested),
        (4, 2, 2, false)
    );
    assert_eq!(r.errors[0]["line"], 2);
    assert_eq!(r.errors[0]["file"], p.as_str());
    assert!(
        r.errors[0]["reason"]
            .as_str()
            .unwrap()
            .contains("accept date"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.errors[1]["line"], 4);
    assert!(
        r.errors[1]["reason"].as_str().unwrap().contains("capture"),
        "{:?}",
        r.errors
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM haproxy_logs_20260127").await,
        1
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM haproxy_logs_20260128").await,
        1
    );

    // Again, through the queue and a worker: nothing inserted twice.
    enqueue(
        &t.pool,
        &IngestLogs {
            path: Some(p.clone()),
            lines: None,
            customers: None,
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap();
    let mut w = Proc::spawn(&t.url, &["worker"], &[]);
    let pool = t.pool.clone();
    let result: Value = eventually(Duration::from_secs(10), "re-ingest done", || {
        let pool = pool.clone();
        async move {
            results(&pool, "ingest_logs")
                .await
                .first()
                .map(|(_, r)| r.clone())
        }
    })
    .await;
    assert_eq!(result["already_ingested"], true, "{result}");
    assert_eq!(count(&t.pool, "SELECT count(*) FROM haproxy_logs").await, 2);
    // A missing file is a clear, final error.
    let missing = dir.join("missing.log").display().to_string();
    enqueue(
        &t.pool,
        &IngestLogs {
            path: Some(missing.clone()),
            lines: None,
            customers: None,
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap();
    let pool = t.pool.clone();
    let err: String = eventually(Duration::from_secs(10), "dead letter", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar(
                "SELECT last_error FROM longshore.dead_letters WHERE queue = 'ingest_logs'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    assert!(err.contains(&format!("{missing}: no such file")), "{err}");
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_spool_scan_enqueues_each_file_once() {
    let t = db().await;
    let dir = std::env::temp_dir().join(format!("longshore-spool2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, c) in [("a.log", 1), ("b.log", 2), ("c.log.tmp", 3), (".hidden", 4)] {
        std::fs::write(dir.join(name), line(c, "seal", 27, 10, 0, 200, 1) + "\n").unwrap();
    }
    let scan = longshore_jobs::billing::scan_log_spool::ScanLogSpool {
        dir: dir.to_string_lossy().into(),
        done_dir: None,
    };
    for _ in 0..2 {
        enqueue(&t.pool, &scan, EnqueueOptions::default())
            .await
            .unwrap();
    }
    let _w = Proc::spawn(&t.url, &["worker"], &[]);
    let pool = t.pool.clone();
    eventually(Duration::from_secs(15), "two files ingested", || {
        let pool = pool.clone();
        async move {
            let scans = count_done(&pool, "scan_log_spool").await;
            let ingests = count_done(&pool, "ingest_logs").await;
            (scans == 2 && ingests == 2).then_some(())
        }
    })
    .await;
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM haproxy_logs").await,
        2,
        "temp and hidden files skipped"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM ingested_files").await,
        2
    );

    // With a done directory, ingested files leave the spool; a new file stays until
    // its own ingest commits, then leaves on a later scan.
    std::fs::write(dir.join("d.log"), line(5, "seal", 27, 11, 0, 200, 1) + "\n").unwrap();
    // Quiet for a minute (a file written within MOVE_QUIET may still be growing).
    let quiet = |name: &str| {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(name))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    };
    for f in ["a.log", "b.log", "d.log"] {
        quiet(f);
    }
    let done = dir.join("done");
    let scan = longshore_jobs::billing::scan_log_spool::ScanLogSpool {
        dir: dir.to_string_lossy().into(),
        done_dir: Some(done.to_string_lossy().into()),
    };
    enqueue(&t.pool, &scan, EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "d.log ingested", || {
        let pool = pool.clone();
        async move {
            (count(&pool, "SELECT count(*) FROM ingested_files").await == 3).then_some(())
        }
    })
    .await;
    assert!(done.join("a.log").exists() && done.join("b.log").exists());
    assert!(dir.join("d.log").exists(), "not ingested when the scan ran");
    assert!(dir.join("c.log.tmp").exists() && dir.join(".hidden").exists());
    enqueue(&t.pool, &scan, EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "d.log moved", || {
        let done = done.clone();
        async move { done.join("d.log").exists().then_some(()) }
    })
    .await;
    assert_eq!(count(&t.pool, "SELECT count(*) FROM haproxy_logs").await, 3);
    // Ingested but written just now: it stays until quiet, then moves.
    let fresh = line(6, "seal", 27, 11, 0, 200, 1) + "\n";
    std::fs::write(dir.join("fresh.log"), &fresh).unwrap();
    let mut tx = t.pool.begin().await.unwrap();
    ingest(&mut tx, "fresh", fresh.as_bytes()).await.unwrap();
    tx.commit().await.unwrap();
    let scans = |n: i64| {
        let pool = pool.clone();
        async move {
            eventually(Duration::from_secs(15), "the scan done", || {
                let pool = pool.clone();
                async move { (count_done(&pool, "scan_log_spool").await >= n).then_some(()) }
            })
            .await
        }
    };
    let before = count_done(&t.pool, "scan_log_spool").await;
    enqueue(&t.pool, &scan, EnqueueOptions::default())
        .await
        .unwrap();
    scans(before + 1).await;
    assert!(
        dir.join("fresh.log").exists(),
        "not moved while it may grow"
    );
    quiet("fresh.log");
    enqueue(&t.pool, &scan, EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "fresh.log moved", || {
        let done = done.clone();
        async move { done.join("fresh.log").exists().then_some(()) }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Generates `n` lines over 3 customers, 2 services, 6 hours, statuses 200/301/404/500.
fn random_lines(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let c = rng.random_range(1..=3);
            let s = ["seal", "vault"][rng.random_range(0..2)];
            let status = [200, 301, 404, 500][rng.random_range(0..4)];
            line(
                c,
                s,
                27,
                rng.random_range(0..6),
                rng.random_range(0..60),
                status,
                rng.random_range(0..5000),
            )
        })
        .collect()
}

#[tokio::test]
async fn aggregation_counts_each_row_once_across_chunks_and_reruns() {
    let t = db().await;
    for (i, chunk) in random_lines(6_000, 1).chunks(1_000).enumerate() {
        let mut tx = t.pool.begin().await.unwrap();
        ingest(&mut tx, &format!("f{i}"), chunk.join("\n").as_bytes())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut tx = t.pool.begin().await.unwrap();
    // Small chunks: many transactions, the watermark moving each time.
    let mut chunks = 0;
    loop {
        let (_, more) = aggregate_chunk(&mut tx, 700).await.unwrap();
        chunks += 1;
        if !more {
            break;
        }
    }
    tx.commit().await.unwrap();
    assert!(chunks >= 9, "{chunks}");
    assert_usage_matches_raw(&t.pool).await;
    // Running again changes nothing; new rows are added on top.
    let mut tx = t.pool.begin().await.unwrap();
    assert_eq!(aggregate_chunk(&mut tx, 700).await.unwrap(), (0, false));
    ingest(&mut tx, "late", random_lines(500, 2).join("\n").as_bytes())
        .await
        .unwrap();
    while aggregate_chunk(&mut tx, 10_000).await.unwrap().1 {}
    tx.commit().await.unwrap();
    assert_usage_matches_raw(&t.pool).await;
}

/// An ingest that has taken its ids but not committed must not be skipped by the
/// watermark: the aggregation waits for it, then counts its rows.
#[tokio::test]
async fn the_watermark_never_passes_an_uncommitted_ingest() {
    let t = db().await;
    let mut committed = t.pool.begin().await.unwrap();
    ingest(
        &mut committed,
        "first",
        random_lines(100, 4).join("\n").as_bytes(),
    )
    .await
    .unwrap();
    committed.commit().await.unwrap();
    let mut open = t.pool.begin().await.unwrap();
    ingest(
        &mut open,
        "open",
        random_lines(100, 3).join("\n").as_bytes(),
    )
    .await
    .unwrap();
    let pool = t.pool.clone();
    let agg = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        while aggregate_chunk(&mut tx, 1_000_000).await.unwrap().1 {}
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !agg.is_finished(),
        "the aggregation waits for the open ingest"
    );
    open.commit().await.unwrap();
    agg.await.unwrap();
    // One pass counted both ingests: nothing was left behind the watermark.
    assert_eq!(
        count(
            &t.pool,
            "SELECT coalesce(sum(request_count),0)::bigint FROM usage_records"
        )
        .await,
        200
    );
    assert_usage_matches_raw(&t.pool).await;
}

/// Row 3: the aggregation worker killed with -9 at random points (20 seeds), then
/// re-run: sums equal raw counts per key and window every time.
#[tokio::test]
async fn row3_aggregation_killed_at_random_points_counts_each_row_once() {
    let t = db().await;
    let lines = random_lines(40_000, 7);
    for (i, chunk) in lines.chunks(10_000).enumerate() {
        let mut tx = t.pool.begin().await.unwrap();
        ingest(&mut tx, &format!("k{i}"), chunk.join("\n").as_bytes())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let env = [
        ("LONGSHORE__QUEUES__AGGREGATE_USAGE__LEASE", "1s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
    ];
    let mut killed_mid_run = 0;
    for seed in 0..20u64 {
        sqlx::query("TRUNCATE usage_records CASCADE")
            .execute(&t.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE aggregation_watermarks SET last_id = 0")
            .execute(&t.pool)
            .await
            .unwrap();
        clear_jobs(&t.pool, "aggregate_usage").await;
        enqueue(
            &t.pool,
            &AggregateUsage { chunk: Some(1_000) },
            EnqueueOptions::default(),
        )
        .await
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut w = Proc::spawn(&t.url, &["worker", "--queues", "aggregate_usage"], &env);
        // Kill at a random point after the run has begun (its first chunk committed).
        let pool = t.pool.clone();
        eventually(Duration::from_secs(10), "aggregation started", || {
            let pool = pool.clone();
            async move {
                (count(
                    &pool,
                    "SELECT last_id FROM aggregation_watermarks WHERE name = 'usage'",
                )
                .await
                    > 0)
                .then_some(())
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        w.kill9();
        let partial = count(
            &t.pool,
            "SELECT coalesce(sum(request_count),0)::bigint FROM usage_records",
        )
        .await;
        if partial > 0 && partial < lines.len() as i64 {
            killed_mid_run += 1;
        }
        let mut w = Proc::spawn(&t.url, &["worker", "--queues", "aggregate_usage"], &env);
        let pool = t.pool.clone();
        eventually(
            Duration::from_secs(20),
            "aggregation done after the kill",
            || {
                let pool = pool.clone();
                async move { (count_done(&pool, "aggregate_usage").await == 1).then_some(()) }
            },
        )
        .await;
        w.kill9();
        assert_usage_matches_raw(&t.pool).await;
    }
    eprintln!("{killed_mid_run} of 20 kills landed mid-run");
    assert!(
        killed_mid_run >= 3,
        "some kills landed mid-run ({killed_mid_run} of 20)"
    );
}

#[tokio::test]
async fn raw_log_retention_drops_old_aggregated_days_only() {
    let t = db().await;
    let old = |day: u32| line(1, "seal", day, 10, 0, 200, 1).replace("Jan/2026", "Jan/2020");
    let mut tx = t.pool.begin().await.unwrap();
    ingest(&mut tx, "old", format!("{}\n{}", old(1), old(2)).as_bytes())
        .await
        .unwrap();
    while aggregate_chunk(&mut tx, 1_000_000).await.unwrap().1 {}
    // Day 3 of 2020 arrives after the aggregation ran: not yet counted.
    ingest(&mut tx, "late", old(3).as_bytes()).await.unwrap();
    let recent = line(1, "seal", 27, 10, 0, 200, 1).replace(
        "27/Jan/2026",
        &chrono::Utc::now().format("%d/%b/%Y").to_string(),
    );
    ingest(&mut tx, "recent", recent.as_bytes()).await.unwrap();
    tx.commit().await.unwrap();
    enqueue(
        &t.pool,
        &longshore_jobs::billing::prune_raw_logs::PruneRawLogs {
            older_than: Duration::from_secs(90 * 86_400),
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap();
    let _w = Proc::spawn(&t.url, &["worker", "--queues", "prune_raw_logs"], &[]);
    let pool = t.pool.clone();
    let result: Value = eventually(Duration::from_secs(10), "prune done", || {
        let pool = pool.clone();
        async move {
            results(&pool, "prune_raw_logs")
                .await
                .first()
                .map(|(_, r)| r.clone())
        }
    })
    .await;
    assert_eq!(
        result["dropped"],
        serde_json::json!(["haproxy_logs_20200101", "haproxy_logs_20200102"])
    );
    assert_eq!(
        result["kept_unaggregated"],
        serde_json::json!(["haproxy_logs_20200103"])
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM haproxy_logs").await,
        2,
        "the late day and today remain"
    );
}

#[tokio::test]
async fn the_billing_report_shows_usage_charges_and_limits() {
    let t = db().await;
    sqlx::query("INSERT INTO customers (customer_id, current_balance_usd_cents, max_monthly_usd_cents, current_month_charged_usd_cents) VALUES (1, 1234, 20000, 500), (2, 0, 20000, 0)")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO service_instances (instance_id, customer_id, service_type, tier, state, suspend_reason) VALUES (gen_random_uuid(), 1, 'seal', 'pro', 'active', NULL), (gen_random_uuid(), 2, 'seal', 'starter', 'suspended', 'insufficient_balance')")
        .execute(&t.pool)
        .await
        .unwrap();
    let lines = [
        line(1, "seal", 27, 10, 0, 200, 100),
        line(1, "seal", 27, 11, 0, 404, 50),
        line(2, "seal", 27, 10, 0, 200, 7),
    ];
    let mut tx = t.pool.begin().await.unwrap();
    ingest(&mut tx, "r", lines.join("\n").as_bytes())
        .await
        .unwrap();
    while aggregate_chunk(&mut tx, 1_000_000).await.unwrap().1 {}
    tx.commit().await.unwrap();
    sqlx::query("UPDATE usage_records SET charged_amount = 0.0001, billed_count = billable_count WHERE customer_id = 1 AND window_start = '2026-01-27 10:00+00'")
        .execute(&t.pool)
        .await
        .unwrap();
    let (code, out, err) = common::run_cli(
        &t.url,
        &["billing", "report", "--month", "2026-01", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["requests"].as_i64(), rows[0]["billable"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(rows[0]["unbilled_billable"], 0);
    assert_eq!(rows[0]["charged_usd"], "0.00010000");
    assert_eq!(rows[0]["balance_usd_cents"], 1234);
    assert_eq!(rows[1]["state"], "suspended");
    let (code, out, _) = common::run_cli(
        &t.url,
        &["billing", "report", "--customer", "2", "--month", "2026-01"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("suspended: insufficient_balance"), "{out}");
    assert!(!out.contains("\n         1 "), "only customer 2: {out}");
    let (_, out, _) = common::run_cli(
        &t.url,
        &["billing", "report", "--month", "2025-12", "--json"],
        &[],
    );
    assert!(out.trim().is_empty(), "no usage that month");
    let (code, _, err) = common::run_cli(&t.url, &["billing", "report", "--month", "Jan"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("YYYY-MM"), "{err}");
}

/// Issue 15 item 9: pricing that is out of range is refused at start, naming the key
/// (a price past the cap, a charge ceiling past what USDC units hold); negative ones
/// were already refused.
#[test]
fn bad_pricing_is_refused_at_start_with_its_key() {
    use longshore_jobs::billing::config::BillingConfig;
    for (key, var, value) in [
        (
            "billing.price_per_10k_usd",
            "LONGSHORE__BILLING__PRICE_PER_10K_USD",
            "99999999999",
        ),
        (
            "billing.base_fee_usd.pro",
            "LONGSHORE__BILLING__BASE_FEE_USD__PRO",
            "5000000",
        ),
        (
            "billing.chain.max_charge_usd",
            "LONGSHORE__BILLING__CHAIN__MAX_CHARGE_USD",
            "100000000000",
        ),
        (
            "billing.base_fee_usd.starter",
            "LONGSHORE__BILLING__BASE_FEE_USD__STARTER",
            "-1",
        ),
        // A base fee ($20 for starter) above the largest charge could never be billed.
        (
            "billing.base_fee_usd.starter",
            "LONGSHORE__BILLING__CHAIN__MAX_CHARGE_USD",
            "10",
        ),
        // Line numbers and COPY field lengths are 32-bit: a file must stay below 2 GiB.
        (
            "billing.max_log_file_bytes",
            "LONGSHORE__BILLING__MAX_LOG_FILE_BYTES",
            "2147483648",
        ),
    ] {
        let e = BillingConfig::from_config(&common::config(&[(var, value)]))
            .err()
            .unwrap_or_else(|| panic!("{var}={value} was accepted"))
            .to_string();
        assert!(e.contains(key), "{var}: {e}");
    }
}

/// Issue 15 item 8: HAProxy's accept date is the load balancer's local time; with
/// `billing.haproxy_utc_offset` it is stored in UTC, so a request at 01:30 on
/// February 1st in UTC+2 is January's usage. And every session of ours runs in UTC
/// whatever the database's default zone (a server set to UTC+14 would otherwise move
/// `date_trunc('month', now())` a day ahead at 23:58).
#[tokio::test]
async fn local_haproxy_times_are_stored_in_utc_and_sessions_run_in_utc() {
    let t = db().await;
    let line = line(1, "seal", 1, 1, 30, 200, 10).replace("/Jan/", "/Feb/");
    let mut tx = t.pool.begin().await.unwrap();
    let plus2 = chrono::FixedOffset::east_opt(2 * 3600).unwrap();
    longshore_jobs::billing::ingest_logs::ingest_from(
        &mut tx,
        "lb-cet",
        line.as_bytes(),
        None,
        plus2,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let ts: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT ts FROM haproxy_logs")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(
        ts,
        "2026-01-31T23:30:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
    // And the setting, as configured.
    let cfg = longshore_jobs::billing::config::BillingConfig::from_config(&common::config(&[(
        "LONGSHORE__BILLING__HAPROXY_UTC_OFFSET",
        "\"-05:30\"",
    )]))
    .unwrap();
    assert_eq!(
        cfg.haproxy_utc_offset.local_minus_utc(),
        -(5 * 3600 + 30 * 60)
    );
    let bad = longshore_jobs::billing::config::BillingConfig::from_config(&common::config(&[(
        "LONGSHORE__BILLING__HAPROXY_UTC_OFFSET",
        "\"CET\"",
    )]))
    .unwrap_err()
    .to_string();
    assert!(bad.contains("billing.haproxy_utc_offset"), "{bad}");

    sqlx::query(&format!(
        "ALTER DATABASE \"{}\" SET timezone = 'Pacific/Kiritimati'",
        t.name
    ))
    .execute(&t.pool)
    .await
    .unwrap();
    let cfg = common::config(&[]);
    let pool = longshore_workers::db::connect(&t.url, &cfg.database, "tz-test")
        .await
        .unwrap();
    let tz: String = sqlx::query_scalar("SHOW TimeZone")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        tz, "UTC",
        "the database's default zone does not reach our sessions"
    );
}

/// Issue 15 item 10: a request is stored (and billed) once however its line arrives: a
/// spool file that grew between scans, a POST retried with other batch boundaries, a
/// copytruncate re-cut under another name, the same line twice in one batch. Before,
/// dedupe was per whole-file checksum and each of these re-inserted lines.
#[tokio::test]
async fn each_line_is_stored_once_however_it_is_cut() {
    let t = db().await;
    let l: Vec<String> = (0..7)
        .map(|m| line(1, "seal", 27, 10, m, 200, 100))
        .collect();
    let batch = |ls: &[&String]| ls.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n");
    let mut seen = Vec::new();
    for (source, text) in [
        ("haproxy.log", batch(&[&l[0], &l[1]])),
        // The same file, grown since the last scan.
        ("haproxy.log", batch(&[&l[0], &l[1], &l[2]])),
        // A POST retried with other boundaries.
        ("post-1", batch(&[&l[2], &l[3]])),
        ("post-2", batch(&[&l[3], &l[4]])),
        // copytruncate: the old content under the rotated name, then the rest.
        ("haproxy.log.1", batch(&[&l[0], &l[1], &l[2], &l[3], &l[4]])),
        // One line twice in a batch, another between them.
        ("haproxy.log", batch(&[&l[5], &l[6], &l[5]])),
        // The same request through another syslog relay (its own prefix).
        (
            "relay-2",
            l[5].replace("lb1 haproxy[3098]", "lb1-relay haproxy[77]"),
        ),
    ] {
        let mut tx = t.pool.begin().await.unwrap();
        let r = ingest(&mut tx, source, text.as_bytes()).await.unwrap();
        tx.commit().await.unwrap();
        seen.push((r.inserted, r.duplicates));
    }
    assert_eq!(
        seen,
        [(2, 0), (1, 2), (1, 1), (1, 1), (0, 5), (2, 1), (0, 1)]
    );
    // The repeated line is stored at its first line number.
    let at: Vec<i32> = sqlx::query_scalar(
        "SELECT line_no FROM haproxy_logs WHERE ts >= '2026-01-27 10:05:00+00' ORDER BY ts",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(at, [1, 2]);
    // A file read while its last line is being written: that line waits whole.
    let growing = format!("{}\n{}", l[0], &l[1][..40]);
    let n = longshore_jobs::billing::ingest_logs::complete_lines(growing.as_bytes());
    assert_eq!(&growing.as_bytes()[..n], format!("{}\n", l[0]).as_bytes());
    assert_eq!(
        longshore_jobs::billing::ingest_logs::complete_lines(b"no newline"),
        0
    );
    assert_eq!(count(&t.pool, "SELECT count(*) FROM haproxy_logs").await, 7);
    let mut tx = t.pool.begin().await.unwrap();
    aggregate_chunk(&mut tx, 1_000).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(
            &t.pool,
            "SELECT sum(billable_count)::bigint FROM usage_records"
        )
        .await,
        7,
        "seven requests, seven billable"
    );
    assert_usage_matches_raw(&t.pool).await;
    // Bytes first read by a shipper limited to customer 1 (customer 2's line refused)
    // are not "seen" for an unrestricted ingest of the same bytes: customer 2's line
    // is stored then, customer 1's is not stored again.
    let mixed = format!(
        "{}\n{}",
        line(1, "seal", 27, 11, 0, 200, 1),
        line(2, "seal", 27, 11, 1, 200, 1)
    );
    let utc = chrono::FixedOffset::east_opt(0).unwrap();
    let mut got = Vec::new();
    for allowed in [Some(&[1_i64][..]), None] {
        let mut tx = t.pool.begin().await.unwrap();
        let r = longshore_jobs::billing::ingest_logs::ingest_from(
            &mut tx,
            "ship",
            mixed.as_bytes(),
            allowed,
            utc,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        got.push((r.already_ingested, r.inserted, r.duplicates));
    }
    assert_eq!(got, [(false, 1, 0), (false, 1, 1)]);
}

/// Rows go to the server in COPY's binary format, encoded by us: every column of every
/// kind of value (a NULL duration, status -1, IPv6, `<NOSRV>`, non-ASCII names, sub-second
/// times, a byte count past i32) reads back as the parser saw it, through the plain COPY
/// and through the staging path a repeat takes.
#[tokio::test]
async fn binary_rows_are_what_postgres_reads() {
    use longshore_jobs::billing::haproxy::parse_line;
    let t = db().await;
    let base = line(7, "seal", 27, 21, 52, 200, 517).replace(":00.000]", ":56.086]");
    let lines = [
        base.clone(),
        base.replace("0/0/1/1/2", "0/0/1/-1/-1")
            .replace(" 200 517 ", " -1 0 ")
            .replace("be_seal/s1", "be_seal/<NOSRV>"),
        base.replace("10.0.0.7:61818", "[2001:db8::7]:443")
            .replace("be_seal/s1", "bé_ünï/s-1.x")
            .replace(" 200 517 ", " 503 9876543210123 ")
            .replace("{7|seal}", "{2147483647|llm_2}")
            .replace("\"POST /v1/seal HTTP/1.1\"", "\"<BADREQ>\""),
        // Before PostgreSQL's epoch (a negative timestamp), to the microsecond.
        base.replace("27/Jan/2026:21:52:56.086]", "31/Dec/1999:23:59:59.123456]"),
    ];
    let text = lines.join("\n");
    let mut tx = t.pool.begin().await.unwrap();
    let r = ingest(&mut tx, "binary", text.as_bytes()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((r.inserted, r.malformed), (4, 0), "{r:?}");
    // Again with one new line: the duplicate-safe staging path.
    let more = format!("{text}\n{}", base.replace(":56.086]", ":57.001]"));
    let mut tx = t.pool.begin().await.unwrap();
    let r = ingest(&mut tx, "binary-again", more.as_bytes())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((r.inserted, r.duplicates), (1, 4), "{r:?}");

    type Row = (
        chrono::DateTime<chrono::Utc>,
        i32,
        String,
        String,
        i16,
        i64,
        Option<i32>,
        String,
        String,
        String,
        i32,
        uuid::Uuid,
    );
    let rows: Vec<Row> = sqlx::query_as(
        r#"SELECT ts, customer_id, service_type, method, status_code, bytes_out, duration_ms,
                client_ip, backend, server, line_no, line_key FROM haproxy_logs ORDER BY ts, line_no"#,
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    let mut want: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 1, l.as_str()))
        .collect();
    let last = more.lines().last().unwrap();
    want.push((5, last));
    let mut want: Vec<Row> = want
        .into_iter()
        .map(|(n, l)| {
            let p = parse_line(l.as_bytes()).unwrap();
            (
                p.ts,
                p.customer_id,
                p.service_type,
                p.method,
                p.status_code,
                p.bytes_out,
                p.duration_ms,
                p.client_ip,
                p.backend,
                p.server,
                n as i32,
                uuid::Uuid::from_bytes(p.key),
            )
        })
        .collect();
    want.sort_by_key(|a| (a.0, a.10));
    assert_eq!(rows, want);
    // Sorted by time: the 1999 line first.
    assert_eq!(rows[0].0.to_rfc3339(), "1999-12-31T23:59:59.123456+00:00");
    assert_eq!(rows[2].6, None, "a -1 total time is NULL");
    assert_eq!(rows[3].7, "2001:db8::7");
    assert_eq!(rows[3].3, "<BADREQ>");
    let file_keys: i64 = count(
        &t.pool,
        "SELECT count(DISTINCT file_key) FROM haproxy_logs WHERE file_key IS NOT NULL",
    )
    .await;
    assert_eq!(file_keys, 2, "each ingest names its file");
}
