//! Scenarios of the runtime at production scale (issue 16), each printing figures:
//!
//! - **effects**: `probe` jobs with `effect: true` (one `ctx.tx()` per job, its insert and
//!   the fenced acknowledgement in one commit) at concurrency 16, 64 and 256, with no
//!   one waiting on the queue (its completions do not notify) and with a waiter's watch
//!   on it (every completing commit notifies, as every one did before), beside the same
//!   machine's ceiling for one-row transactions at that many connections (`pgbench`,
//!   run here).
//! - **waiters**: an ingress with `--waiters` concurrent `?wait=30` long polls on jobs
//!   that complete at `--rate` per second: status reads per completion, and how long
//!   after its job was due each answer came.
//! - **queues**: one idle worker process with `--queues` registered queues: its CPU and
//!   PostgreSQL's (all `postgres` processes), transactions per second, then one job
//!   at a time on queues in turn: enqueue → start percentiles.
//! - **soak**: a producer at `--soak-rate` and a worker for `--minutes`: jobs/s done
//!   per minute, and the queue table's size and dead tuples (bloat under claim,
//!   heartbeat and acknowledgement updates, none of which is HOT) and the archive's rows,
//!   with the default schedules' retention and vacuum on a short clock
//!   (`--soak-retention`; `0s` for neither).
//! - **sampler**: `--archived-rows` archived jobs, then the queue sampler: the cost of
//!   one counting sample, and how many of `--replicas` samplers started at once count.
//! - **admin**: `--admin-archived` archived jobs (1 M) and dead letters, cancelled and
//!   waiting jobs and a credits ledger beside them: each admin API read route's p50,
//!   p95 and max (the console reads through the same functions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use longshore_jobs::probe::{Probe, ProbeHandler};
use longshore_workers::config::{Config, TokenConfig};
use longshore_workers::ingress::Ingress;
use longshore_workers::{
    EnqueueOptions, Observer, Registry, Worker, db, enqueue, enqueue_many, store,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use super::super::app::{self, CliError};
use super::{drain, fill_made, fresh_db_sized, percentiles};

/// What a scenario prints and what it adds to the JSON report.
pub(super) struct Figures {
    pub lines: Vec<String>,
    pub json: Value,
}

fn err(s: String) -> CliError {
    anyhow::anyhow!(s).into()
}

async fn server_max_connections(opts: &PgConnectOptions) -> Result<u32, CliError> {
    let admin = PgPool::connect_with(opts.clone().database("postgres")).await?;
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&admin)
        .await?;
    admin.close().await;
    max.parse()
        .map_err(|_| err(format!("max_connections {max:?}")))
}

/// One-row insert transactions per second with `clients` connections, by pgbench.
async fn pgbench_ceiling(opts: &PgConnectOptions, clients: u32) -> Result<f64, CliError> {
    let pool = PgPool::connect_with(opts.clone().database("longshore_bench")).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_one_row (id bigserial PRIMARY KEY, v int)")
        .execute(&pool)
        .await?;
    pool.close().await;
    let script = std::env::temp_dir().join(format!("longshore-bench-{}.sql", std::process::id()));
    std::fs::write(&script, "INSERT INTO bench_one_row (v) VALUES (1);\n")?;
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-T", "8", "-j", "2", "-c", &clients.to_string(), "-f"])
        .arg(&script)
        .args(["-h", opts.get_host(), "-p", &opts.get_port().to_string()])
        .args(["-U", opts.get_username(), "longshore_bench"])
        .output()
        .await
        .map_err(|e| {
            err(format!(
                "pgbench could not start ({e}); install postgresql-client"
            ))
        })?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| {
            err(format!(
                "pgbench gave no tps: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            ))
        })
}

pub(super) async fn effects(
    cfg: &Config,
    opts: &PgConnectOptions,
    n: usize,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    let server_max = server_max_connections(opts).await?;
    let mut lines = Vec::new();
    let mut rows = Vec::new();
    for c in [16usize, 64, 256] {
        // Handlers commit on the handler pool: at most what the server allows, leaving
        // room for the control pool, the lease keeper, the listener and this bench.
        let conns = (c as u32).min(server_max.saturating_sub(20)).max(1);
        say(format!(
            "effects: {n} jobs with one ctx.tx() each, concurrency {c}, {conns} handler connections"
        ));
        let mut ccfg = cfg.clone();
        ccfg.worker.concurrency = c;
        ccfg.worker.max_handlers = c;
        ccfg.worker.ack_batch = c.max(100);
        let ccfg = Arc::new(ccfg);
        let mut rates = Vec::new();
        for watched in [false, true] {
            let pool = fresh_db_sized(&ccfg, opts, conns).await?;
            if watched {
                sqlx::query(
                    "INSERT INTO longshore.done_watch VALUES ('probe', now() + interval '1 day')",
                )
                .execute(&pool)
                .await?;
            }
            let effect = |i| Probe {
                effect: Some(true),
                ..Probe::new(i)
            };
            fill_made(&pool, n, EnqueueOptions::default(), effect).await?;
            sqlx::query("ANALYZE pgmq.q_probe").execute(&pool).await?;
            let (rate, _) = drain(&pool, &ccfg, n, "effects phase").await?;
            let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_effects")
                .fetch_one(&pool)
                .await?;
            if effects != n as i64 {
                return Err(err(format!(
                    "effects phase: {effects} effects for {n} jobs"
                )));
            }
            // The worker's connections are closed before pgbench opens as many.
            pool.close().await;
            if !watched {
                rates.push(pgbench_ceiling(opts, conns).await?);
            }
            rates.push(rate);
        }
        let (ceiling, quiet, watched) = (rates[0], rates[1], rates[2]);
        let ratio = (quiet / ceiling * 100.0).round() / 100.0;
        lines.push(format!(
            "effects c={c:<3} ({conns} conns): {quiet:>6.0} jobs/s unwatched, {watched:>6.0} watched (every commit notifies); pgbench one-row {ceiling:>6.0} tx/s; ratio {ratio:.2}"
        ));
        rows.push(json!({"concurrency": c, "connections": conns,
            "jobs_per_s": quiet.round(), "jobs_per_s_watched": watched.round(),
            "pgbench_one_row_tps": ceiling.round(), "ratio": ratio}));
    }
    Ok(Figures {
        lines,
        json: json!(rows),
    })
}

pub(super) async fn waiters(
    cfg: &Config,
    opts: &PgConnectOptions,
    n: usize,
    rate: u32,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    say(format!(
        "waiters: {n} concurrent ?wait=30 long polls, their jobs completing at {rate}/s"
    ));
    let mut wcfg = cfg.clone();
    wcfg.worker.concurrency = 256;
    wcfg.ingress.max_waiters = n + 100;
    wcfg.ingress.max_connections = 2 * n + 100;
    wcfg.ingress.max_connections_per_address = 2 * n + 100;
    // A token of the bench's own (sha256 of "bench-token"), unthrottled.
    let token: TokenConfig = serde_json::from_value(json!({
        "name": "bench",
        "sha256": "7137e16f75a1d75b6fd65930672814806cdc1a0d6e0aa38611afc996a402258b",
        "queues": ["*"], "scopes": ["read_all"],
        "rate_per_second": 1_000_000, "burst": 1_000_000
    }))
    .map_err(|e| err(e.to_string()))?;
    wcfg.ingress.tokens.push(token);
    let wcfg = Arc::new(wcfg);
    let pool = fresh_db_sized(&wcfg, opts, 40).await?;

    // Due one after another at `rate`, starting once every waiter is in.
    let step = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let lead = Duration::from_secs(4) + Duration::from_millis(n as u64);
    let base = chrono::Utc::now() + chrono::Duration::from_std(lead).expect("small");
    let base_at = Instant::now() + lead;
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let at = base + chrono::Duration::from_std(step * i as u32).expect("small");
        let e = enqueue(
            &pool,
            &Probe::new(i as i64),
            EnqueueOptions::default().run_at(at),
        )
        .await?;
        jobs.push((e.id, base_at + step * i as u32));
    }

    let stop = CancellationToken::new();
    let worker = Worker::new(pool.clone(), app::registry(&wcfg)?, wcfg.clone())
        .only(&["probe".to_string()])?;
    let worker = tokio::spawn(worker.run(stop.clone()));
    let ingress = Ingress::new(pool.clone(), app::door_registry(&wcfg)?, wcfg.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serving = tokio::spawn(ingress.clone().serve(listener, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let reads_before = ingress.status_reads();
    let mut asks = tokio::task::JoinSet::new();
    for (id, due) in jobs {
        let (http, url) = (
            http.clone(),
            format!("http://{addr}/v1/jobs/probe/{id}?wait=30"),
        );
        asks.spawn(async move {
            let r = http.get(url).bearer_auth("bench-token").send().await;
            let at = Instant::now();
            let state = match r {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["state"].as_str().map(str::to_string)),
                Err(_) => None,
            };
            (state, at.saturating_duration_since(due))
        });
    }
    let mut lags = Vec::with_capacity(n);
    let mut not_done = 0;
    while let Some(r) = asks.join_next().await {
        let (state, lag) = r.map_err(|e| err(e.to_string()))?;
        if state.as_deref() != Some("done") {
            not_done += 1;
        }
        lags.push(lag);
    }
    let reads = ingress.status_reads() - reads_before;
    stop.cancel();
    let _ = serving.await;
    let _ = worker.await;
    pool.close().await;
    if not_done > 0 {
        return Err(err(format!(
            "waiters: {not_done} of {n} long polls did not answer done"
        )));
    }
    let per = reads as f64 / n as f64;
    let lat = percentiles(&mut lags);
    Ok(Figures {
        lines: vec![
            format!(
                "waiters: {n} long polls, {rate} completions/s: {reads} status reads, {per:.2} per completion"
            ),
            format!(
                "waiters: answer after the job was due  p50 {} p90 {} p99 {} ms",
                lat["p50"], lat["p90"], lat["p99"]
            ),
        ],
        json: json!({"waiters": n, "completions_per_s": rate, "status_reads": reads,
                     "reads_per_completion": (per * 100.0).round() / 100.0, "answer_after_due_ms": lat}),
    })
}

/// Starts by (queue, id): msg ids repeat across queues.
#[derive(Default)]
struct Starts(Mutex<HashMap<(String, i64), Instant>>);

impl Observer for Starts {
    fn job_started(&self, q: &str, id: i64, _attempt: u32) {
        self.0
            .lock()
            .expect("not poisoned")
            .insert((q.to_string(), id), Instant::now());
    }
}

/// CPU seconds used so far by the process `pid` (`self` for this one).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) in clock ticks (USER_HZ, 100 on Linux).
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds of every `postgres` process on this machine.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|p| cpu_seconds(&p))
        .sum()
}

async fn transactions(pool: &PgPool) -> Result<i64, CliError> {
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

pub(super) async fn queues(
    cfg: &Config,
    opts: &PgConnectOptions,
    nq: usize,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    say(format!(
        "queues: one idle worker process with {nq} queues (concurrency 16 each), then one job at a time across them"
    ));
    let mut qcfg = cfg.clone();
    qcfg.worker.concurrency = 16;
    qcfg.worker.ack_batch = 500;
    let qcfg = Arc::new(qcfg);
    let names: Vec<&'static str> = (0..nq)
        .map(|i| &*Box::leak(format!("bench_q{i:04}").into_boxed_str()))
        .collect();
    let mut reg = Registry::new();
    for &name in &names {
        reg = reg.register_as(
            name,
            ProbeHandler::from_config(&qcfg).map_err(CliError::usage)?,
        );
    }
    let pool = fresh_db_sized(&qcfg, opts, 8).await?;
    db::migrate(&pool, &app::MIGRATOR, &reg).await?;

    let starts = Arc::new(Starts::default());
    let stop = CancellationToken::new();
    let worker = Worker::new(pool.clone(), reg, qcfg.clone()).observer(starts.clone());
    let worker = tokio::spawn(worker.run(stop.clone()));
    // Start-up: every consumer's first claims and the listener.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Two idle sleeps at least: an idle consumer looks again every idle_poll_max.
    let window =
        (qcfg.worker.idle_poll_max * 2 + Duration::from_secs(5)).max(Duration::from_secs(20));
    let (w0, p0, x0, t0) = (
        cpu_seconds("self").unwrap_or(0.0),
        postgres_cpu_seconds(),
        transactions(&pool).await?,
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    // pg_stat_database is flushed by each backend within a second or so.
    let secs = t0.elapsed().as_secs_f64();
    let (w1, p1) = (cpu_seconds("self").unwrap_or(0.0), postgres_cpu_seconds());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let x1 = transactions(&pool).await?;
    let worker_pct = (w1 - w0) / secs * 100.0;
    say(format!("queues: measured {secs:.0} s idle"));
    let pg_pct = (p1 - p0) / secs * 100.0;
    let tps = (x1 - x0) as f64 / secs;

    // One job at a time, each on the next queue: enqueue commit → handler start.
    let mut commits = HashMap::new();
    let jobs = 200.min(nq.max(1) * 4);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for k in 0..jobs {
        tick.tick().await;
        let q = names[(k * 7) % nq];
        let qn = longshore_workers::QueueName::parse(q).map_err(|e| err(e.to_string()))?;
        let e = longshore_workers::enqueue_json(
            &pool,
            &qn,
            json!({"id": k}),
            EnqueueOptions::default(),
        )
        .await?;
        commits.insert((q.to_string(), e.id), Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = starts.0.lock().expect("not poisoned").len();
        if got >= jobs {
            break;
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "queues: {got} of {jobs} jobs started in a minute"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = worker.await;
    pool.close().await;
    let started = starts.0.lock().expect("not poisoned");
    let mut waits: Vec<Duration> = commits
        .iter()
        .filter_map(|(k, c)| started.get(k).map(|s| s.saturating_duration_since(*c)))
        .collect();
    let lat = percentiles(&mut waits);
    Ok(Figures {
        lines: vec![
            format!(
                "queues: {nq} idle queues: worker {worker_pct:.2}% of a core, PostgreSQL {pg_pct:.2}%, {tps:.1} transactions/s"
            ),
            format!(
                "queues: one job at a time across them, enqueue→start  p50 {} p90 {} p99 {} ms",
                lat["p50"], lat["p90"], lat["p99"]
            ),
        ],
        json: json!({"queues": nq, "idle_worker_cpu_pct": (worker_pct * 10.0).round() / 10.0,
                     "idle_postgres_cpu_pct": (pg_pct * 10.0).round() / 10.0,
                     "idle_transactions_per_s": tps.round(), "enqueue_to_start_ms": lat}),
    })
}

/// Size and dead tuples of the probe queue table (with its indexes and TOAST).
/// The queue table's size, dead and live tuples; the archive's size and rows.
async fn queue_table(pool: &PgPool) -> Result<(i64, i64, i64, i64, i64), CliError> {
    Ok(sqlx::query_as(
        "SELECT pg_total_relation_size('pgmq.q_probe'), coalesce(n_dead_tup, 0), coalesce(n_live_tup, 0),
                pg_total_relation_size('pgmq.a_probe'), (SELECT count(*) FROM pgmq.a_probe)
           FROM pg_stat_user_tables WHERE relid = 'pgmq.q_probe'::regclass",
    )
    .fetch_one(pool)
    .await?)
}

pub(super) async fn soak(
    cfg: &Config,
    opts: &PgConnectOptions,
    minutes: u32,
    rate: u32,
    retention: Duration,
    upkeep_every: Duration,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    say(format!(
        "soak: a producer at {rate} jobs/s and a worker (concurrency 64) for {minutes} min; per minute: jobs/s done, the queue table's size and dead tuples, archived rows{}",
        if retention.is_zero() {
            String::from(" (no retention, no vacuum)")
        } else {
            format!(
                " (every {}: archives older than {} pruned, then the pgmq tables past 10,000 dead tuples vacuumed, as the default schedules do)",
                humantime::format_duration(upkeep_every),
                humantime::format_duration(retention)
            )
        }
    ));
    let mut scfg = cfg.clone();
    scfg.worker.concurrency = 64;
    scfg.worker.ack_batch = 500;
    let scfg = Arc::new(scfg);
    let pool = fresh_db_sized(&scfg, opts, 16).await?;
    let rec = Arc::new(super::Recorder::default());
    let fleet = super::Fleet::start(&pool, &scfg, rec.clone(), "probe")?;
    let stop = CancellationToken::new();
    let producer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            // Batches of 20 every 1/(rate/20) s.
            let batch: Vec<Probe> = (0..20).map(Probe::new).collect();
            let every = Duration::from_secs_f64(20.0 / f64::from(rate.max(20)));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                if enqueue_many(&pool, &batch, EnqueueOptions::default())
                    .await
                    .is_ok()
                {
                    sent += batch.len() as u64;
                }
            }
            sent
        })
    };
    // What the default schedules do, on a short clock: retention that keeps the
    // archive at about rate × retention rows, and the fallback vacuum.
    let upkeep = (!retention.is_zero()).then(|| {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(upkeep_every.max(Duration::from_secs(1)));
            let (mut pruned, mut vacuums) = (0u64, 0usize);
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match store::prune_archives(&pool, retention, store::PRUNE_BATCH).await {
                    Ok(n) => pruned += n,
                    Err(e) => tracing::warn!(error = %e, "soak: prune failed"),
                }
                match store::vacuum_queues(&pool, 10_000).await {
                    Ok(v) => vacuums += v.vacuumed.len(),
                    Err(e) => tracing::warn!(error = %e, "soak: vacuum failed"),
                }
            }
            (pruned, vacuums)
        })
    });
    let mut lines = Vec::new();
    let mut rows = Vec::new();
    let mut last = 0usize;
    for m in 1..=minutes.max(1) {
        // Read every second, the minute's highest figures kept: a reading once a
        // minute would only show where the vacuum cycle happened to be.
        let (mut size, mut dead, mut asize, mut archived) = (0i64, 0i64, 0i64, 0i64);
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (s, d, _, a, n) = queue_table(&pool).await?;
            size = size.max(s);
            dead = dead.max(d);
            asize = asize.max(a);
            archived = archived.max(n);
        }
        let done = rec.done.load(std::sync::atomic::Ordering::Relaxed);
        let per_s = (done - last) as f64 / 60.0;
        last = done;
        let line = format!(
            "soak minute {m:>2}: {per_s:>6.0} jobs/s done; highest: queue table {:>5.1} MB, {dead:>7} dead tuples; archive {:>6.1} MB, {archived:>8} rows",
            size as f64 / 1e6,
            asize as f64 / 1e6
        );
        say(line.clone());
        lines.push(line);
        rows.push(json!({"minute": m, "jobs_per_s": per_s.round(), "max_table_bytes": size, "max_dead_tuples": dead, "max_archive_bytes": asize, "max_archived": archived}));
    }
    stop.cancel();
    let sent = producer.await.map_err(|e| err(e.to_string()))?;
    if let Some(u) = upkeep {
        let (pruned, vacuums) = u.await.map_err(|e| err(e.to_string()))?;
        lines.push(format!(
            "soak upkeep: {pruned} archived rows pruned, {vacuums} table vacuums (queue table and archive)"
        ));
    }
    fleet.stop().await;
    pool.close().await;
    let first = rows
        .first()
        .and_then(|r| r["jobs_per_s"].as_f64())
        .unwrap_or(0.0);
    let lastr = rows
        .last()
        .and_then(|r| r["jobs_per_s"].as_f64())
        .unwrap_or(0.0);
    let ratio = if first > 0.0 {
        (lastr / first * 100.0).round() / 100.0
    } else {
        0.0
    };
    lines.push(format!(
        "soak: {sent} enqueued; last minute / first minute = {ratio:.2}"
    ));
    Ok(Figures {
        lines,
        json: json!({"minutes": rows, "enqueued": sent, "last_over_first": ratio}),
    })
}

/// `--scenario sampler`: the queue sampler (`telemetry::sample_once`) with
/// `archived_rows` archived jobs: the cost of one counting sample, and how many of
/// `replicas` samplers started together count (one per interval should).
pub(super) async fn sampler(
    cfg: &Config,
    opts: &PgConnectOptions,
    archived_rows: i64,
    replicas: usize,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    use longshore_workers::telemetry::sample_once;
    say(format!(
        "sampler: {archived_rows} archived jobs; one counting sample (20 runs), then {replicas} samplers at once"
    ));
    let pool = fresh_db_sized(cfg, opts, (replicas as u32 + 2).max(4)).await?;
    let t0 = Instant::now();
    // In slices, so no single statement runs for minutes.
    let slice = 1_000_000i64;
    let mut filled = 0i64;
    while filled < archived_rows {
        let n = slice.min(archived_rows - filled);
        sqlx::query(
            r#"INSERT INTO pgmq.a_probe (msg_id, read_ct, enqueued_at, archived_at, vt, message, headers)
             SELECT i, 1, now() - interval '1 day', now() - (i % 86400) * interval '1 second', now(),
                    jsonb_build_object('id', i), NULL
               FROM generate_series($1::bigint, $2::bigint) i"#,
        )
        .bind(filled + 1)
        .bind(filled + n)
        .execute(&pool)
        .await?;
        filled += n;
    }
    sqlx::raw_sql("VACUUM ANALYZE pgmq.a_probe")
        .execute(&pool)
        .await?;
    say(format!(
        "sampler: filled {archived_rows} archived rows in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    // `every` of zero: each call is due, so each one counts.
    let mut runs = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = sample_once(&pool, Duration::ZERO)
            .await
            .map_err(|e| err(e.to_string()))?;
        if !s.counted {
            return Err(err("a due sample did not count".into()));
        }
        runs.push(t.elapsed());
    }
    let cost = percentiles(&mut runs);
    // Replicas started together, as after a rollout: one counts, the rest read.
    sqlx::query("UPDATE longshore.queue_sampler SET sampled_at = now() - interval '1 hour'")
        .execute(&pool)
        .await?;
    let every = Duration::from_secs(5);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..replicas {
        let pool = pool.clone();
        set.spawn(async move {
            let t = Instant::now();
            let r = sample_once(&pool, every).await;
            (r.map(|s| s.counted), t.elapsed())
        });
    }
    let (mut counted, mut reads) = (0usize, Vec::new());
    while let Some(r) = set.join_next().await {
        let (c, took) = r.map_err(|e| err(e.to_string()))?;
        if c.map_err(|e| err(e.to_string()))? {
            counted += 1;
        } else {
            reads.push(took);
        }
    }
    let read = percentiles(&mut reads);
    pool.close().await;
    let lines = vec![
        format!(
            "sampler: one counting sample at {archived_rows} archived rows: p50 {} ms, p99 {} ms",
            cost["p50"], cost["p99"]
        ),
        format!(
            "sampler: {replicas} samplers at once: {counted} counted; the others read the figures in p50 {} ms",
            read["p50"]
        ),
    ];
    Ok(Figures {
        lines,
        json: json!({"archived_rows": archived_rows, "counting_sample_ms": cost, "replicas": replicas, "counted": counted, "reading_sample_ms": read}),
    })
}

/// **admin**: the admin API's read routes (what the console shows) over `archived_rows`
/// archived jobs, 20,000 dead letters, 20,000 cancelled jobs, 50,000 waiting jobs and a
/// ledger of 200,000 charges: p50 / p95 / max of 30 requests per route, over HTTP to an
/// in-process ingress. The goal is every route within 200 ms at 1 M archived.
pub(super) async fn admin(
    cfg: &Config,
    opts: &PgConnectOptions,
    archived_rows: i64,
    say: &dyn Fn(String),
) -> Result<Figures, CliError> {
    say(format!(
        "admin: {archived_rows} archived jobs, 20,000 dead letters, 20,000 cancelled, 50,000 waiting; 30 requests per route"
    ));
    let mut wcfg = cfg.clone();
    let token: TokenConfig = serde_json::from_value(json!({
        "name": "bench-admin", "sha256": longshore_workers::ingress::hash_token("bench-admin"),
        "scopes": ["admin:read"], "rate_per_second": 1_000_000, "burst": 1_000_000
    }))
    .map_err(|e| err(e.to_string()))?;
    wcfg.ingress.tokens.push(token);
    let wcfg = Arc::new(wcfg);
    let pool = fresh_db_sized(&wcfg, opts, 8).await?;
    let t0 = Instant::now();
    let pb = app::progress(Some(archived_rows.max(0) as u64), "filling the archive");
    let slice = 500_000i64;
    let mut filled = 0i64;
    while filled < archived_rows {
        let n = slice.min(archived_rows - filled);
        sqlx::query(
            r#"INSERT INTO pgmq.a_probe (msg_id, read_ct, enqueued_at, archived_at, vt, message, headers)
             SELECT i, 1, now() - interval '1 day', now() - (i % 86400) * interval '1 second', now(),
                    jsonb_build_object('id', i, 'user', i % 1000), '{"result": {"ok": true}}'
               FROM generate_series($1::bigint, $2::bigint) i"#,
        )
        .bind(filled + 1)
        .bind(filled + n)
        .execute(&pool)
        .await?;
        filled += n;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    sqlx::raw_sql(
        r#"
SELECT setval('pgmq.q_probe_msg_id_seq', greatest((SELECT max(msg_id) FROM pgmq.a_probe), 1));
INSERT INTO pgmq.q_probe (vt, message, headers, read_ct)
SELECT now() + interval '1 hour', jsonb_build_object('id', i), jsonb_build_object('last_error', 'boom ' || i), i % 2
  FROM generate_series(1, 50000) i;
INSERT INTO longshore.dead_letters (queue, msg_id, message, attempts, last_error, enqueued_at, failed_at)
SELECT 'probe', 100000000 + i, jsonb_build_object('id', i), 5, 'upstream ' || (i % 7), now() - interval '2 days', now() - i * interval '1 second'
  FROM generate_series(1, 20000) i;
INSERT INTO longshore.cancelled_jobs (queue, msg_id, message, attempts, enqueued_at, cancelled_by)
SELECT 'probe', 200000000 + i, jsonb_build_object('id', i), 1, now(), 'bench'
  FROM generate_series(1, 20000) i;
INSERT INTO credit_accounts (user_id) SELECT md5(i::text)::uuid FROM generate_series(1, 2000) i;
INSERT INTO credits_ledger (user_id, delta, provider, reason, request_id, created_at)
SELECT md5((i % 2000 + 1)::text)::uuid, -(i % 50 + 1), CASE WHEN i % 3 = 0 THEN 'openai' ELSE 'anthropic' END,
       'charge', gen_random_uuid(), now() - (i % 604800) * interval '1 second'
  FROM generate_series(1, 200000) i;
"#,
    )
    .execute(&pool)
    .await?;
    // Outside the fill's implicit transaction (VACUUM refuses to run in one).
    sqlx::raw_sql(
        "VACUUM ANALYZE pgmq.a_probe, pgmq.q_probe, longshore.dead_letters, longshore.cancelled_jobs, credits_ledger",
    )
    .execute(&pool)
    .await?;
    say(format!(
        "admin: filled in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    let stop = CancellationToken::new();
    let ingress = Ingress::new(pool.clone(), app::door_registry(&wcfg)?, wcfg.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serving = tokio::spawn(ingress.serve(listener, stop.clone()));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let routes = [
        "/v1/admin/queues",
        "/v1/admin/queues/probe/jobs?state=done",
        "/v1/admin/queues/probe/jobs?state=done&before=500000",
        "/v1/admin/queues/probe/jobs?state=done&id=123456",
        "/v1/admin/queues/probe/jobs?state=done&contains=%7B%22user%22%3A7%7D",
        "/v1/admin/queues/probe/jobs?state=retrying",
        "/v1/admin/queues/probe/jobs?state=dead",
        "/v1/admin/queues/probe/jobs?state=cancelled",
        "/v1/admin/jobs/probe/123456",
        "/v1/admin/dead_letters?queue=probe&error=upstream%203",
        "/v1/admin/schedules",
        "/v1/admin/errors",
        "/v1/admin/views/credits?window=7d",
        "/v1/admin/views/billing",
        "/ui",
        "/ui/queues/probe?state=done",
        "/ui/queues/probe?state=retrying",
        "/ui/jobs/probe/123456",
        "/ui/dead?queue=probe",
        "/ui/errors",
    ];
    // The console's pages, as a signed-in browser gets them.
    let signed_in = http
        .post(format!("http://{addr}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=bench-admin")
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| err("the console's sign-in set no cookie".into()))?
        .to_string();
    let mut lines = Vec::new();
    let mut out = serde_json::Map::new();
    let mut worst = Duration::ZERO;
    for r in routes {
        let mut took = Vec::with_capacity(30);
        for _ in 0..30 {
            let t = Instant::now();
            let resp = http
                .get(format!("http://{addr}{r}"))
                .bearer_auth("bench-admin")
                .header("cookie", &cookie)
                .send()
                .await
                .map_err(|e| err(e.to_string()))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| err(e.to_string()))?;
            took.push(t.elapsed());
            if !status.is_success() {
                return Err(err(format!(
                    "{r}: {status} {}",
                    String::from_utf8_lossy(&body)
                )));
            }
        }
        took.sort();
        let (p50, p95, max) = (took[14], took[28], took[29]);
        worst = worst.max(p95);
        lines.push(format!(
            "admin {r:<58} p50 {:>6.1} ms  p95 {:>6.1} ms  max {:>6.1} ms",
            ms(p50),
            ms(p95),
            ms(max)
        ));
        out.insert(
            r.to_string(),
            json!({"p50_ms": ms(p50), "p95_ms": ms(p95), "max_ms": ms(max)}),
        );
    }
    lines.push(format!(
        "admin worst p95 {:.1} ms (goal: within 200 ms at 1 M archived)",
        ms(worst)
    ));
    stop.cancel();
    let _ = serving.await;
    pool.close().await;
    Ok(Figures {
        lines,
        json: json!({"archived_rows": archived_rows, "routes": out, "worst_p95_ms": ms(worst)}),
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
