//! `longshore bench`: throughput and latency of the runtime on the `probe` kind, in a
//! throwaway database `longshore_bench` on the configured (or embedded default) server.
//!
//! Phases:
//! 1. **store**: the raw queue statements, 2 clients, 100-message batches on a
//!    pre-filled queue: pgmq's `pgmq.read` + `pgmq.archive` functions vs. our prepared
//!    claim + fenced archive. Why the runtime uses the latter.
//! 2. **drain**: N jobs queued first (batched enqueue), then worked: jobs/s.
//! 3. **end to end**: a producer bulk-enqueues N jobs while the worker runs: jobs/s
//!    from first enqueue to last ack, and enqueue-commit → handler-start percentiles.
//! 4. **idle latency**: one job at a time at a fixed rate: enqueue-commit →
//!    handler-start percentiles on an idle fleet (LISTEN/NOTIFY wake-up).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use longshore_jobs::probe::Probe;
use longshore_workers::config::Config;
use longshore_workers::store::{Fence, QueueSql};
use longshore_workers::{EnqueueOptions, Observer, QueueName, Worker, db, enqueue, enqueue_many};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::app::{self, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Jobs in the drain and end-to-end phases.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Handlers running at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Jobs in the idle-latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub latency_jobs: usize,
    /// Enqueue rate of the idle-latency phase, jobs/s.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Recorder {
    starts: Mutex<HashMap<i64, Instant>>,
    done: AtomicUsize,
    stale: AtomicUsize,
    progress: Notify,
}

impl Observer for Recorder {
    fn job_started(&self, _q: &str, id: i64, _attempt: u32) {
        self.starts
            .lock()
            .expect("not poisoned")
            .insert(id, Instant::now());
    }
    fn acked(&self, _q: &str, done: usize, stale: usize) {
        self.done.fetch_add(done, Ordering::Relaxed);
        self.stale.fetch_add(stale, Ordering::Relaxed);
        self.progress.notify_one();
    }
}

impl Recorder {
    async fn wait_done(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.done.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), self.progress.notified()).await;
        }
        true
    }
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let (pool, cluster) = app::embedded_default(&cfg, "longshore-bench").await?;
    let opts: PgConnectOptions = (*pool.connect_options()).clone();
    pool.close().await;
    let r = bench(&cfg, opts, &args).await;
    if let Some(pg) = cluster {
        tokio::task::spawn_blocking(move || pg.stop()).await??;
    }
    r
}

async fn fresh_db(cfg: &Config, opts: &PgConnectOptions) -> Result<PgPool, super::app::CliError> {
    let admin = sqlx::PgPool::connect_with(opts.clone().database("postgres")).await?;
    sqlx::query("DROP DATABASE IF EXISTS longshore_bench WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE longshore_bench")
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut dbcfg = cfg.database.clone();
    dbcfg.max_connections = 16;
    let url = opts
        .clone()
        .database("longshore_bench")
        .to_url_lossy()
        .to_string();
    let pool = db::connect(&url, &dbcfg, "longshore-bench").await?;
    app::migrate(&pool).await?;
    Ok(pool)
}

async fn bench(cfg: &Config, opts: PgConnectOptions, args: &Args) -> CliResult {
    let mut cfg = cfg.clone();
    cfg.worker.concurrency = args.concurrency;
    cfg.worker.ack_batch = args.concurrency.max(100);
    for q in cfg.queues.values_mut() {
        q.concurrency = None;
    }
    cfg.validate().map_err(super::app::CliError::usage)?;
    let cfg = Arc::new(cfg);
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };

    // 1. store
    let pool = fresh_db(&cfg, &opts).await?;
    say("phase 1/4: raw store statements (2 clients, batches of 100)".into());
    let store_n = args.jobs.min(100_000);
    let pgmq_rate = store_phase(&pool, store_n, true).await?;
    let ours_rate = store_phase(&pool, store_n, false).await?;

    // 2. drain
    say(format!(
        "phase 2/4: drain {} queued jobs, concurrency {}",
        args.jobs, args.concurrency
    ));
    let t = Instant::now();
    fill(&pool, args.jobs).await?;
    let enqueue_rate = args.jobs as f64 / t.elapsed().as_secs_f64();
    let rec = Arc::new(Recorder::default());
    let (drain_rate, drain_stale) = {
        let stop = CancellationToken::new();
        let w = Worker::new(pool.clone(), longshore_jobs::registry(), cfg.clone())
            .only(&["probe".to_string()])?
            .observer(rec.clone());
        let t = Instant::now();
        let h = tokio::spawn(w.run(stop.clone()));
        let ok = rec.wait_done(args.jobs, Duration::from_secs(600)).await;
        let secs = t.elapsed().as_secs_f64();
        stop.cancel();
        let _ = h.await;
        if !ok {
            return Err(anyhow::anyhow!("drain did not finish within 10 minutes").into());
        }
        (args.jobs as f64 / secs, rec.stale.load(Ordering::Relaxed))
    };
    pool.close().await;

    // 3. end to end
    let pool = fresh_db(&cfg, &opts).await?;
    say(format!(
        "phase 3/4: end to end, {} jobs enqueued while working",
        args.jobs
    ));
    let rec = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let w = Worker::new(pool.clone(), longshore_jobs::registry(), cfg.clone())
        .only(&["probe".to_string()])?
        .observer(rec.clone());
    let h = tokio::spawn(w.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let mut commits: HashMap<i64, Instant> = HashMap::with_capacity(args.jobs);
    let batch: Vec<Probe> = (0..500).map(Probe::new).collect();
    let mut sent = 0;
    while sent < args.jobs {
        let n = (args.jobs - sent).min(batch.len());
        let ids = enqueue_many(&pool, &batch[..n], EnqueueOptions::default()).await?;
        let at = Instant::now();
        commits.extend(ids.into_iter().map(|id| (id, at)));
        sent += n;
    }
    let ok = rec.wait_done(args.jobs, Duration::from_secs(600)).await;
    let e2e_secs = t.elapsed().as_secs_f64();
    stop.cancel();
    let _ = h.await;
    if !ok {
        return Err(anyhow::anyhow!("end-to-end phase did not finish within 10 minutes").into());
    }
    let e2e_rate = args.jobs as f64 / e2e_secs;
    let e2e_lat = latencies(&rec, &commits);
    pool.close().await;

    // 4. idle latency
    let pool = fresh_db(&cfg, &opts).await?;
    say(format!(
        "phase 4/4: idle latency, {} jobs at {}/s",
        args.latency_jobs, args.rate
    ));
    let rec = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let w = Worker::new(pool.clone(), longshore_jobs::registry(), cfg.clone())
        .only(&["probe".to_string()])?
        .observer(rec.clone());
    let h = tokio::spawn(w.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut commits = HashMap::with_capacity(args.latency_jobs);
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    for i in 0..args.latency_jobs {
        tick.tick().await;
        let e = enqueue(&pool, &Probe::new(i as i64), EnqueueOptions::default()).await?;
        commits.insert(e.id, Instant::now());
    }
    let ok = rec
        .wait_done(args.latency_jobs, Duration::from_secs(120))
        .await;
    stop.cancel();
    let _ = h.await;
    if !ok {
        return Err(anyhow::anyhow!("idle-latency phase did not finish").into());
    }
    let idle_lat = latencies(&rec, &commits);
    pool.close().await;

    let report = json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "store_msgs_per_s": {"pgmq_read_archive": pgmq_rate.round(), "prepared_claim_fenced_archive": ours_rate.round()},
        "enqueue_batched_jobs_per_s": enqueue_rate.round(),
        "drain_jobs_per_s": drain_rate.round(),
        "drain_stale_acks": drain_stale,
        "end_to_end_jobs_per_s": e2e_rate.round(),
        "end_to_end_latency_ms": e2e_lat,
        "idle_latency_ms": idle_lat,
        "jobs": args.jobs, "concurrency": args.concurrency, "latency_jobs": args.latency_jobs, "rate": args.rate,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "longshore bench ({} jobs, concurrency {})",
            args.jobs, args.concurrency
        );
        println!(
            "  store, pgmq.read + pgmq.archive        {:>9.0} msgs/s",
            pgmq_rate
        );
        println!(
            "  store, prepared claim + fenced archive {:>9.0} msgs/s",
            ours_rate
        );
        println!(
            "  enqueue, batches of 1000               {:>9.0} jobs/s",
            enqueue_rate
        );
        println!(
            "  drain (queued first)                   {:>9.0} jobs/s",
            drain_rate
        );
        println!(
            "  end to end (enqueue while working)     {:>9.0} jobs/s",
            e2e_rate
        );
        println!(
            "  end to end enqueue→start  p50 {} p90 {} p99 {} ms",
            e2e_lat["p50"], e2e_lat["p90"], e2e_lat["p99"]
        );
        println!(
            "  idle ({}/s) enqueue→start  p50 {} p90 {} p99 {} ms",
            args.rate, idle_lat["p50"], idle_lat["p90"], idle_lat["p99"]
        );
    }
    Ok(())
}

async fn fill(pool: &PgPool, n: usize) -> Result<(), super::app::CliError> {
    let batch: Vec<Probe> = (0..1000).map(Probe::new).collect();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(batch.len());
        enqueue_many(pool, &batch[..k], EnqueueOptions::default()).await?;
        sent += k;
    }
    Ok(())
}

/// Claim + archive loop on a pre-filled queue with 2 clients; msgs/s.
async fn store_phase(
    pool: &PgPool,
    n: usize,
    pgmq_functions: bool,
) -> Result<f64, super::app::CliError> {
    fill(pool, n).await?;
    let sql = Arc::new(QueueSql::new(QueueName::parse("probe").expect("valid")));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let pool = pool.clone();
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let got = if pgmq_functions {
                    let ids: Vec<i64> =
                        sqlx::query_scalar("SELECT msg_id FROM pgmq.read('probe', 30, 100)")
                            .fetch_all(&pool)
                            .await?;
                    if !ids.is_empty() {
                        sqlx::query("SELECT pgmq.archive('probe', $1::bigint[])")
                            .bind(&ids)
                            .execute(&pool)
                            .await?;
                    }
                    ids.len()
                } else {
                    let batch = sql.claim(&pool, 100, Duration::from_secs(30)).await?;
                    let acks: Vec<(Fence, Option<serde_json::Value>)> = batch
                        .iter()
                        .map(|c| {
                            (
                                Fence {
                                    msg_id: c.msg_id,
                                    read_ct: c.read_ct,
                                },
                                None,
                            )
                        })
                        .collect();
                    if !acks.is_empty() {
                        sql.ack_archive(&pool, &acks).await?;
                    }
                    acks.len()
                };
                if got == 0 {
                    return Ok::<usize, sqlx::Error>(done);
                }
                done += got;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(anyhow::Error::from)??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

fn latencies(rec: &Recorder, commits: &HashMap<i64, Instant>) -> serde_json::Value {
    let starts = rec.starts.lock().expect("not poisoned");
    let mut ms: Vec<f64> = commits
        .iter()
        .filter_map(|(id, c)| {
            starts
                .get(id)
                .map(|s| s.saturating_duration_since(*c).as_secs_f64() * 1e3)
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| {
        if ms.is_empty() {
            return 0.0;
        }
        let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
        (ms[i] * 1000.0).round() / 1000.0
    };
    json!({"p50": p(0.50), "p90": p(0.90), "p99": p(0.99), "max": p(1.0), "samples": ms.len()})
}
