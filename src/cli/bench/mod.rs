//! `longshore bench`: throughput and latency of the runtime on the `probe` kind, in a
//! throwaway database `longshore_bench` on the configured (or embedded default) server.
//!
//! Phases (`--phases store,drain,e2e,idle`, all by default):
//! 1. **store**: the raw queue statements, 2 clients, 100-message batches on a
//!    pre-filled queue: pgmq's `pgmq.read` + `pgmq.archive` functions vs. our prepared
//!    claim + fenced archive. Why the runtime uses the latter.
//! 2. **drain**: N jobs queued first (batched enqueue), then worked: jobs/s.
//! 3. **end to end**: a producer bulk-enqueues N jobs while the worker runs: jobs/s
//!    from first enqueue to last ack, and enqueue-commit → handler-start percentiles.
//! 4. **idle latency**: one job at a time at a fixed rate: enqueue-commit →
//!    handler-start percentiles on an idle fleet (LISTEN/NOTIFY wake-up).
//!
//! Scenarios (named only; `--scenario` is another name for `--phases`):
//! - **delayed**: the drain twice, alone and behind `--delayed-jobs` jobs scheduled for
//!   tomorrow with lower ids, and the ratio: what invisible rows cost a claim.
//! - **effects**, **waiters**, **queues**, **soak**, **sampler**: the runtime at scale,
//!   see [`scale`].
//!
//! Pipeline phases (named only): `ingest`, `aggregate` (billing), `signals` (market) and
//! `llm` (chat: `llm_call` jobs on the echo simulator with no delay, so the figure is
//! what the fleet adds per call: pre-call checks, the attempt, the stored answer, the
//! charge and the acknowledgement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use longshore_jobs::billing::aggregate_usage::aggregate_chunk;
use longshore_jobs::billing::ingest_logs::ingest;
use longshore_jobs::probe::Probe;
use longshore_workers::config::Config;
use longshore_workers::store::{Fence, QueueSql};
use longshore_workers::{EnqueueOptions, Observer, QueueName, Worker, db, enqueue, enqueue_many};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::app::{self, CliError, CliResult};

mod scale;

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
    /// Phases to run (comma-separated): store, drain, e2e, idle, the billing
    /// pipeline's ingest (HAProxy lines parsed and stored) and aggregate, the
    /// market pipeline's signals (candles validated, indicators, strategy v1), and the
    /// chat pipeline's llm (llm_call jobs on the echo simulator).
    #[arg(
        long,
        alias = "scenario",
        value_delimiter = ',',
        default_value = "store,drain,e2e,idle"
    )]
    pub phases: Vec<String>,
    /// Jobs scheduled for tomorrow, queued ahead of the visible ones, in the delayed
    /// phase.
    #[arg(long, default_value_t = 200_000)]
    pub delayed_jobs: usize,
    /// Log lines in the ingest phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub ingest_lines: usize,
    /// Raw rows in the aggregate phase.
    #[arg(long, default_value_t = 10_000_000)]
    pub aggregate_rows: i64,
    /// Candles in the signals phase.
    #[arg(long, default_value_t = 200_000)]
    pub signal_candles: usize,
    /// llm_call jobs in the llm phase.
    #[arg(long, default_value_t = 5_000)]
    pub llm_calls: usize,
    /// Jobs per run of the effects scenario.
    #[arg(long, default_value_t = 20_000)]
    pub effect_jobs: usize,
    /// Concurrent long polls in the waiters scenario.
    #[arg(long, default_value_t = 1_000)]
    pub waiters: usize,
    /// Completions per second in the waiters scenario.
    #[arg(long, default_value_t = 200)]
    pub completion_rate: u32,
    /// Registered queues in the queues scenario.
    #[arg(long, default_value_t = 500)]
    pub queues: usize,
    /// Minutes of the soak scenario.
    #[arg(long, default_value_t = 10)]
    pub minutes: u32,
    /// Producer rate of the soak scenario, jobs/s.
    #[arg(long, default_value_t = 2_000)]
    pub soak_rate: u32,
    /// Soak: every 10 s, prune archived jobs older than this and vacuum the queue
    /// tables past 10,000 dead tuples, as the default schedules do (0s: neither).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub soak_retention: Duration,
    /// Soak: how often the retention and vacuum run (the default schedules: 1m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub soak_upkeep: Duration,
    /// Archived rows the sampler scenario fills in.
    #[arg(long, default_value_t = 10_000_000)]
    pub archived_rows: i64,
    /// Archived jobs in the admin scenario (at most --archived-rows).
    #[arg(long, default_value_t = 1_000_000)]
    pub admin_archived: i64,
    /// Samplers started at once in the sampler scenario (processes serving /metrics).
    #[arg(long, default_value_t = 24)]
    pub replicas: usize,
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
    /// Waits for `n` jobs done, with a progress bar on a terminal (hidden off one, and
    /// drawn at most a few times a second, so it costs the measurement nothing).
    async fn wait_done(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let pb = app::progress(Some(n as u64), "jobs done");
        while self.done.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                pb.abandon();
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), self.progress.notified()).await;
            pb.set_position(self.done.load(Ordering::Relaxed).min(n) as u64);
        }
        pb.finish_and_clear();
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

async fn fresh_db(cfg: &Config, opts: &PgConnectOptions) -> Result<PgPool, CliError> {
    fresh_db_sized(cfg, opts, 16).await
}

/// A fresh `longshore_bench` database, migrated, and a pool of `connections` to it.
async fn fresh_db_sized(
    cfg: &Config,
    opts: &PgConnectOptions,
    connections: u32,
) -> Result<PgPool, CliError> {
    let admin = sqlx::PgPool::connect_with(opts.clone().database("postgres")).await?;
    sqlx::query("DROP DATABASE IF EXISTS longshore_bench WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE longshore_bench")
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut dbcfg = cfg.database.clone();
    dbcfg.max_connections = connections;
    // Filling millions of rows is one long statement; the benchmark's own pool has no
    // statement timeout.
    dbcfg.statement_timeout = Duration::ZERO;
    let url = opts
        .clone()
        .database("longshore_bench")
        .to_url_lossy()
        .to_string();
    let pool = db::connect(&url, &dbcfg, "longshore-bench").await?;
    app::migrate(&pool, cfg).await?;
    Ok(pool)
}

async fn bench(cfg: &Config, opts: PgConnectOptions, args: &Args) -> CliResult {
    let mut cfg = cfg.clone();
    cfg.worker.concurrency = args.concurrency;
    cfg.worker.ack_batch = args.concurrency.max(100);
    for q in cfg.queues.values_mut() {
        q.concurrency = None;
    }
    cfg.validate().map_err(CliError::usage)?;
    let cfg = Arc::new(cfg);
    for p in &args.phases {
        if ![
            "store",
            "drain",
            "e2e",
            "idle",
            "delayed",
            "effects",
            "waiters",
            "queues",
            "soak",
            "sampler",
            "admin",
            "ingest",
            "aggregate",
            "signals",
            "llm",
        ]
        .contains(&p.as_str())
        {
            return Err(CliError::usage(anyhow::anyhow!(
                "unknown phase {p:?}: store, drain, e2e, idle, delayed, effects, waiters, queues, soak, sampler, admin, ingest, aggregate, signals, llm"
            )));
        }
    }
    let run = |p: &str| args.phases.iter().any(|x| x == p);
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let mut report = serde_json::Map::new();
    report.insert("jobs".into(), json!(args.jobs));
    report.insert("concurrency".into(), json!(args.concurrency));
    report.insert(
        "cores".into(),
        json!(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    );
    let mut lines = Vec::new();

    if run("store") {
        say("store: raw claim + archive statements (2 clients, batches of 100)".into());
        let n = args.jobs.min(100_000);
        // Each variant on a fresh database: no dead tuples or archive left by another.
        let mut rates = Vec::new();
        for v in [
            StoreVariant::PgmqFunctions,
            StoreVariant::PgmqReadFencedAck,
            StoreVariant::Prepared,
        ] {
            let pool = fresh_db(&cfg, &opts).await?;
            rates.push(store_phase(&pool, n, v).await?);
            pool.close().await;
        }
        let (pgmq, mixed, ours) = (rates[0], rates[1], rates[2]);
        report.insert(
            "store_msgs_per_s".into(),
            json!({"pgmq_read_archive_unfenced": pgmq.round(), "pgmq_read_fenced_archive": mixed.round(),
                   "prepared_claim_fenced_archive": ours.round()}),
        );
        lines.push(format!(
            "store, pgmq.read + pgmq.archive (unfenced)  {pgmq:>9.0} msgs/s"
        ));
        lines.push(format!(
            "store, pgmq.read + fenced archive           {mixed:>9.0} msgs/s"
        ));
        lines.push(format!(
            "store, prepared claim + fenced archive      {ours:>9.0} msgs/s"
        ));
    }
    if run("drain") {
        say(format!(
            "drain: {} jobs queued first, concurrency {}",
            args.jobs, args.concurrency
        ));
        let pool = fresh_db(&cfg, &opts).await?;
        let t = Instant::now();
        fill(&pool, args.jobs).await?;
        let enqueue_rate = args.jobs as f64 / t.elapsed().as_secs_f64();
        let drained = drain(&pool, &cfg, args.jobs, "drain").await;
        pool.close().await;
        let (rate, rec) = drained?;
        report.insert(
            "enqueue_batched_jobs_per_s".into(),
            json!(enqueue_rate.round()),
        );
        report.insert("drain_jobs_per_s".into(), json!(rate.round()));
        report.insert(
            "drain_stale_acks".into(),
            json!(rec.stale.load(Ordering::Relaxed)),
        );
        lines.push(format!(
            "enqueue, batches of 1000                    {enqueue_rate:>9.0} jobs/s"
        ));
        lines.push(format!(
            "drain (queued first)                        {rate:>9.0} jobs/s"
        ));
    }
    if run("e2e") {
        say(format!(
            "end to end: {} jobs enqueued in batches of 500 while working",
            args.jobs
        ));
        let pool = fresh_db(&cfg, &opts).await?;
        let rec = Arc::new(Recorder::default());
        let fleet = Fleet::start(&pool, &cfg, rec.clone(), "probe")?;
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
        let rate = args.jobs as f64 / t.elapsed().as_secs_f64();
        fleet.stop().await;
        pool.close().await;
        if !ok {
            return Err(
                anyhow::anyhow!("end-to-end phase did not finish within 10 minutes").into(),
            );
        }
        let lat = latencies(&rec, &commits);
        lines.push(format!(
            "end to end (enqueue while working)          {rate:>9.0} jobs/s"
        ));
        lines.push(format!(
            "end to end enqueue→start      p50 {} p90 {} p99 {} ms",
            lat["p50"], lat["p90"], lat["p99"]
        ));
        report.insert("end_to_end_jobs_per_s".into(), json!(rate.round()));
        report.insert("end_to_end_latency_ms".into(), lat);
    }
    if run("idle") {
        say(format!(
            "idle latency: {} jobs one at a time at {}/s",
            args.latency_jobs, args.rate
        ));
        let pool = fresh_db(&cfg, &opts).await?;
        let rec = Arc::new(Recorder::default());
        let fleet = Fleet::start(&pool, &cfg, rec.clone(), "probe")?;
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
        fleet.stop().await;
        pool.close().await;
        if !ok {
            return Err(anyhow::anyhow!("idle-latency phase did not finish").into());
        }
        let lat = latencies(&rec, &commits);
        lines.push(format!(
            "idle ({}/s) enqueue→start      p50 {} p90 {} p99 {} ms",
            args.rate, lat["p50"], lat["p90"], lat["p99"]
        ));
        report.insert("idle_rate_jobs_per_s".into(), json!(args.rate));
        report.insert("idle_latency_ms".into(), lat);
    }

    if run("delayed") {
        say(format!(
            "delayed: {} visible jobs alone, then behind {} jobs delayed a day (lower ids): \
             raw claim + ack (2 clients, batches of 100) and a worker's drain",
            args.jobs, args.delayed_jobs
        ));
        // (store msgs/s, drain jobs/s) without and with the delayed rows.
        let mut rates = Vec::new();
        for delayed in [0, args.delayed_jobs] {
            let pool = fresh_db(&cfg, &opts).await?;
            schedule_later(&pool, delayed).await?;
            let store = store_phase(&pool, args.jobs, StoreVariant::Prepared).await?;
            pool.close().await;

            let pool = fresh_db(&cfg, &opts).await?;
            schedule_later(&pool, delayed).await?;
            fill(&pool, args.jobs).await?;
            sqlx::query("ANALYZE pgmq.q_probe").execute(&pool).await?;
            let (drained, _) = drain(&pool, &cfg, args.jobs, "delayed phase").await?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_probe")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            if left != delayed as i64 {
                return Err(anyhow::anyhow!(
                    "delayed phase: {left} jobs left in the queue, expected the {delayed} delayed ones"
                )
                .into());
            }
            rates.push((store, drained));
        }
        let (alone, behind) = (rates[0], rates[1]);
        let ratio = |a: f64, b: f64| (b / a * 100.0).round() / 100.0;
        report.insert(
            "delayed".into(),
            json!({"delayed_jobs": args.delayed_jobs,
                   "store_msgs_per_s": {"alone": alone.0.round(), "behind_delayed": behind.0.round(),
                                        "ratio": ratio(alone.0, behind.0)},
                   "drain_jobs_per_s": {"alone": alone.1.round(), "behind_delayed": behind.1.round(),
                                        "ratio": ratio(alone.1, behind.1)}}),
        );
        lines.push(format!(
            "store claim + ack: alone {:>7.0}, behind {} delayed {:>7.0} msgs/s (ratio {:.2})",
            alone.0,
            args.delayed_jobs,
            behind.0,
            ratio(alone.0, behind.0)
        ));
        lines.push(format!(
            "worker drain:      alone {:>7.0}, behind {} delayed {:>7.0} jobs/s (ratio {:.2})",
            alone.1,
            args.delayed_jobs,
            behind.1,
            ratio(alone.1, behind.1)
        ));
    }

    if run("effects") {
        let f = scale::effects(&cfg, &opts, args.effect_jobs, &say).await?;
        lines.extend(f.lines);
        report.insert("effects".into(), f.json);
    }
    if run("waiters") {
        let f = scale::waiters(&cfg, &opts, args.waiters, args.completion_rate, &say).await?;
        lines.extend(f.lines);
        report.insert("waiters".into(), f.json);
    }
    if run("queues") {
        let f = scale::queues(&cfg, &opts, args.queues.max(1), &say).await?;
        lines.extend(f.lines);
        report.insert("queues".into(), f.json);
    }

    if run("sampler") {
        let f = scale::sampler(
            &cfg,
            &opts,
            args.archived_rows.max(0),
            args.replicas.max(1),
            &say,
        )
        .await?;
        lines.extend(f.lines);
        report.insert("sampler".into(), f.json);
    }

    if run("admin") {
        let f = scale::admin(
            &cfg,
            &opts,
            args.archived_rows.max(0).min(args.admin_archived),
            &say,
        )
        .await?;
        lines.extend(f.lines);
        report.insert("admin".into(), f.json);
    }

    if run("soak") {
        let f = scale::soak(
            &cfg,
            &opts,
            args.minutes,
            args.soak_rate,
            args.soak_retention,
            args.soak_upkeep,
            &say,
        )
        .await?;
        lines.extend(f.lines);
        report.insert("soak".into(), f.json);
    }

    if run("ingest") {
        say(format!(
            "ingest: {} HAProxy lines, 2 writers, files of 100,000 lines",
            args.ingest_lines
        ));
        let pool = fresh_db(&cfg, &opts).await?;
        let rate = ingest_phase(&pool, args.ingest_lines).await?;
        pool.close().await;
        report.insert("ingest_lines_per_s".into(), json!(rate.round()));
        lines.push(format!(
            "ingest, parse + COPY                        {rate:>9.0} lines/s"
        ));
    }
    if run("aggregate") {
        say(format!(
            "aggregate: {} raw rows into hourly usage",
            args.aggregate_rows
        ));
        let pool = fresh_db(&cfg, &opts).await?;
        let secs = aggregate_phase(&pool, args.aggregate_rows).await?;
        pool.close().await;
        report.insert(
            "aggregate_seconds".into(),
            json!((secs * 100.0).round() / 100.0),
        );
        report.insert("aggregate_rows".into(), json!(args.aggregate_rows));
        lines.push(format!(
            "aggregate {} raw rows            {secs:>9.2} s",
            args.aggregate_rows
        ));
    }

    if run("signals") {
        let n = args.signal_candles.max(100);
        say(format!(
            "signals: {n} simulated 1m candles through validation, indicators and strategy v1"
        ));
        let rate = signals_phase(&cfg, n)?;
        report.insert("signal_candles_per_s".into(), json!(rate.round()));
        lines.push(format!(
            "signals, candles → indicators → strategy {rate:>9.0} candles/s"
        ));
    }

    if run("llm") {
        let n = args.llm_calls.max(1);
        say(format!(
            "llm: {n} llm_call jobs on the echo simulator (no provider delay), 100 users"
        ));
        let mut llm_cfg = (*cfg).clone();
        for p in ["grok", "gpt", "claude"] {
            llm_cfg.sections.entry("chat".into()).or_default()["providers"][p] =
                json!({"kind": "echo", "model": "bench-echo"});
        }
        let llm_cfg = Arc::new(llm_cfg);
        let pool = fresh_db(&llm_cfg, &opts).await?;
        let rate = llm_phase(&pool, &llm_cfg, n).await?;
        pool.close().await;
        report.insert("llm_calls_per_s".into(), json!(rate.round()));
        lines.push(format!(
            "llm_call, echo provider (fleet overhead) {rate:>9.0} calls/s"
        ));
    }

    if args.json {
        println!("{}", serde_json::Value::Object(report));
    } else {
        println!(
            "longshore bench ({} jobs, concurrency {})",
            args.jobs, args.concurrency
        );
        for l in lines {
            println!("  {l}");
        }
    }
    Ok(())
}

/// CPU cost of the market pipeline per candle: validation, every indicator over the
/// series, and strategy v1 on every candle (no database, no network).
fn signals_phase(cfg: &Config, n: usize) -> Result<f64, CliError> {
    use longshore_jobs::clients::market_sim::MarketSimulator;
    use longshore_jobs::market::ingest_indicators::indicator_rows;
    use longshore_jobs::market::strategy::{Clusters, evaluate};
    use longshore_jobs::market::types::{Timeframe, validate_candles};
    let market =
        longshore_jobs::market::config::Market::from_config(cfg).map_err(CliError::usage)?;
    let sim = MarketSimulator::new(42, n);
    let symbol = "BTC/USDT".parse().expect("a symbol");
    let candles: Vec<_> = (1..=n as i64)
        .map(|k| sim.candle(&symbol, Timeframe::M1, k))
        .collect();
    let t = Instant::now();
    validate_candles(&candles, Timeframe::M1)
        .map_err(|e| anyhow::anyhow!("simulated candles: {e}"))?;
    let rows = indicator_rows(
        &candles,
        Timeframe::M1,
        market.cfg.strategy.volume_window,
        market.cfg.volatility_window,
    );
    let mut directional = 0usize;
    for r in &rows {
        let x = r.inputs(Timeframe::M1, None, Clusters::Known(Vec::new()));
        let e = evaluate(&market.cfg.strategy, &x);
        directional +=
            usize::from(e.direction != longshore_jobs::market::strategy::Direction::Flat);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(directional);
    Ok(n as f64 / secs)
}

/// `n` llm_call jobs over 100 funded users, queued first, then worked: calls/s. Checks
/// that every call was answered and charged exactly once.
async fn llm_phase(pool: &PgPool, cfg: &Arc<Config>, n: usize) -> Result<f64, CliError> {
    use longshore_jobs::chat::credits::{CreditsConfig, grant};
    use longshore_jobs::chat::llm_call::{LlmCall, Messages};
    use longshore_jobs::clients::llm::{Message, Role};
    let credits = CreditsConfig::from_config(cfg).map_err(CliError::usage)?;
    let users: Vec<uuid::Uuid> = (0..100).map(|_| uuid::Uuid::new_v4()).collect();
    for u in &users {
        let mut tx = pool.begin().await?;
        grant(&mut tx, &credits, *u, 1_000_000).await?;
        tx.commit().await?;
    }
    let calls: Vec<LlmCall> = (0..n)
        .map(|i| LlmCall {
            request_id: uuid::Uuid::new_v4(),
            user_id: users[i % users.len()],
            messages: Messages::try_from(vec![Message {
                role: Role::User,
                content: format!("benchmark question {i}: how deep is the queue?"),
            }])
            .expect("one message"),
            hint: None,
            max_tokens: std::num::NonZeroU32::new(64),
        })
        .collect();
    for chunk in calls.chunks(1000) {
        enqueue_many(pool, chunk, EnqueueOptions::default()).await?;
    }
    let rec = Arc::new(Recorder::default());
    let fleet = Fleet::start(pool, cfg, rec.clone(), "llm_call")?;
    let t = Instant::now();
    let ok = rec.wait_done(n, Duration::from_secs(600)).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    fleet.stop().await;
    if !ok {
        return Err(anyhow::anyhow!("the llm phase did not finish within 10 minutes").into());
    }
    let (charged, answers): (i64, i64) = sqlx::query_as(
        r#"SELECT (SELECT count(*) FROM credits_ledger WHERE reason = 'charge'),
                (SELECT count(*) FROM llm_answers)"#,
    )
    .fetch_one(pool)
    .await?;
    if charged != n as i64 || answers != n as i64 {
        return Err(
            anyhow::anyhow!("llm phase: {n} calls, {answers} answers, {charged} charges").into(),
        );
    }
    Ok(rate)
}

/// A worker on one queue, running in this process.
struct Fleet {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), longshore_workers::WorkerError>>,
}

impl Fleet {
    fn start(
        pool: &PgPool,
        cfg: &Arc<Config>,
        rec: Arc<Recorder>,
        queue: &str,
    ) -> Result<Fleet, CliError> {
        let stop = CancellationToken::new();
        let w = Worker::new(pool.clone(), app::registry(cfg)?, cfg.clone())
            .only(&[queue.to_string()])?
            .observer(rec);
        let handle = tokio::spawn(w.run(stop.clone()));
        Ok(Fleet { stop, handle })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

/// `n` probe jobs visible only tomorrow.
async fn schedule_later(pool: &PgPool, n: usize) -> Result<(), CliError> {
    let later = EnqueueOptions::default().delay(Duration::from_secs(86_400));
    fill_with(pool, n, later).await
}

async fn fill(pool: &PgPool, n: usize) -> Result<(), CliError> {
    fill_with(pool, n, EnqueueOptions::default()).await
}

/// `n` probe jobs in batches of 1,000, each batch enqueued with `opts`.
async fn fill_with(pool: &PgPool, n: usize, opts: EnqueueOptions) -> Result<(), CliError> {
    fill_made(pool, n, opts, Probe::new).await
}

/// `n` probe jobs made by `make` from ids 0..n (distinct: an effect's primary key), in
/// batches of 1,000 enqueued with `opts`.
async fn fill_made(
    pool: &PgPool,
    n: usize,
    opts: EnqueueOptions,
    make: impl Fn(i64) -> Probe,
) -> Result<(), CliError> {
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(1000);
        let batch: Vec<Probe> = (sent..sent + k).map(|i| make(i as i64)).collect();
        enqueue_many(pool, &batch, opts.clone()).await?;
        sent += k;
    }
    Ok(())
}

/// A worker on `probe` drains the `n` jobs already queued: jobs/s, and what it saw.
async fn drain(
    pool: &PgPool,
    cfg: &Arc<Config>,
    n: usize,
    what: &str,
) -> Result<(f64, Arc<Recorder>), CliError> {
    let rec = Arc::new(Recorder::default());
    let fleet = Fleet::start(pool, cfg, rec.clone(), "probe")?;
    let t = Instant::now();
    let ok = rec.wait_done(n, Duration::from_secs(600)).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    fleet.stop().await;
    if !ok {
        return Err(anyhow::anyhow!("{what} did not finish within 10 minutes").into());
    }
    Ok((rate, rec))
}

/// Parses and stores `n` generated HAProxy lines with two concurrent ingests; lines/s.
async fn ingest_phase(pool: &PgPool, n: usize) -> Result<f64, CliError> {
    let files: Vec<Vec<u8>> = (0..n.div_ceil(100_000))
        .map(|f| {
            let mut text = String::with_capacity(100_000 * 200);
            for i in (f * 100_000)..((f + 1) * 100_000).min(n) {
                let (c, hour, min, status) = (1 + i % 50, i % 24, i % 60, [200, 200, 301, 404, 500][i % 5]);
                text.push_str(&format!(
                    "Jan 27 {hour:02}:{min:02}:00 lb1 haproxy[3098]: 10.0.{}.{}:61818 [27/Jan/2026:{hour:02}:{min:02}:{:02}.{:03}] \
                     fe_api~ be_seal/s1 0/0/1/1/2 {status} {} - - ---- 1/1/0/0/0 0/0 {{{c}|seal}} {{}} \"POST /v1/seal HTTP/1.1\"\n",
                    i % 250, (i / 250) % 250, i % 60, i % 1000, 100 + i % 900
                ));
            }
            text.into_bytes()
        })
        .collect();
    let files = Arc::new(files);
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (pool, files, next) = (pool.clone(), files.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(f) = files.get(i) else {
                    return Ok::<(), sqlx::Error>(());
                };
                let mut tx = pool.begin().await?;
                ingest(&mut tx, &format!("bench-{i}"), f).await?;
                tx.commit().await?;
            }
        }));
    }
    for task in tasks {
        task.await.map_err(anyhow::Error::from)??;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Fills `haproxy_logs` with `rows` rows (untimed), then times the aggregation; seconds.
async fn aggregate_phase(pool: &PgPool, rows: i64) -> Result<f64, CliError> {
    // One day's partition, created the way ingests create it.
    let mut tx = pool.begin().await?;
    ingest(
        &mut tx,
        "seed",
        b"Jan 27 00:00:00 lb1 haproxy[1]: 10.0.0.1:1 [27/Jan/2026:00:00:00.000] fe be/s 0/0/0/0/0 200 1 - - ---- 0/0/0/0/0 0/0 {1|seal} {} \"GET / HTTP/1.1\"\n",
    )
    .await?;
    tx.commit().await?;
    sqlx::query(
        r#"INSERT INTO haproxy_logs (ts, customer_id, service_type, method, status_code, bytes_out, duration_ms, client_ip, backend, server, file_sha256, line_no)
         SELECT '2026-01-27'::timestamptz + (i % 86400) * interval '1 second', 1 + i % 500, 'seal', 'POST',
           (ARRAY[200, 200, 301, 404, 500])[1 + i % 5], 100 + i % 900, 2, '10.0.0.1', 'be_seal', 's1', repeat('0', 64), i
         FROM generate_series(1, $1::bigint) i"#,
    )
    .bind(rows - 1)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE haproxy_logs").execute(pool).await?;
    let t = Instant::now();
    loop {
        let mut tx = pool.begin().await?;
        let (_, more) = aggregate_chunk(&mut tx, 1_000_000).await?;
        tx.commit().await?;
        if !more {
            break;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// How the store phase claims and acknowledges.
#[derive(Clone, Copy)]
enum StoreVariant {
    /// `pgmq.read` + `pgmq.archive(ids)`: pgmq's functions, unfenced.
    PgmqFunctions,
    /// `pgmq.read` + our fenced archive.
    PgmqReadFencedAck,
    /// Our prepared claim + fenced archive (what the runtime uses).
    Prepared,
}

/// Claim + archive loop on a pre-filled queue with 2 clients, fetching and decoding
/// whole messages as a worker must; msgs/s.
async fn store_phase(pool: &PgPool, n: usize, v: StoreVariant) -> Result<f64, CliError> {
    fill(pool, n).await?;
    // Planned against statistics, as a queue is once autovacuum has seen it (a table
    // never analysed gets a sort of every visible row per claim).
    sqlx::query("ANALYZE pgmq.q_probe").execute(pool).await?;
    let sql = Arc::new(QueueSql::new(QueueName::parse("probe").expect("valid")));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let pool = pool.clone();
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let claimed: Vec<(i64, i32, serde_json::Value, Option<serde_json::Value>)> = match v {
                    StoreVariant::PgmqFunctions | StoreVariant::PgmqReadFencedAck => {
                        sqlx::query_as("SELECT msg_id, read_ct, message, headers FROM pgmq.read('probe', 30, 100)")
                            .fetch_all(&pool)
                            .await?
                    }
                    StoreVariant::Prepared => sql
                        .claim(&pool, 100, Duration::from_secs(30))
                        .await?
                        .into_iter()
                        .map(|c| (c.msg_id, c.read_ct, c.message, Some(c.headers)))
                        .collect(),
                };
                if claimed.is_empty() {
                    return Ok::<usize, sqlx::Error>(done);
                }
                match v {
                    StoreVariant::PgmqFunctions => {
                        let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
                        sqlx::query("SELECT pgmq.archive('probe', $1::bigint[])")
                            .bind(&ids)
                            .execute(&pool)
                            .await?;
                    }
                    StoreVariant::PgmqReadFencedAck | StoreVariant::Prepared => {
                        let acks: Vec<(Fence, Option<serde_json::Value>)> = claimed
                            .iter()
                            .map(|c| (Fence { msg_id: c.0, read_ct: c.1 }, None))
                            .collect();
                        sql.ack_archive(&pool, &acks).await?;
                    }
                }
                done += claimed.len();
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
    let mut waits: Vec<Duration> = commits
        .iter()
        .filter_map(|(id, c)| starts.get(id).map(|s| s.saturating_duration_since(*c)))
        .collect();
    percentiles(&mut waits)
}

/// p50, p90, p99 and max of `d` in milliseconds (to the microsecond), and the count.
fn percentiles(d: &mut [Duration]) -> serde_json::Value {
    d.sort_unstable();
    let p = |q: f64| {
        if d.is_empty() {
            return 0.0;
        }
        let i = ((d.len() as f64 - 1.0) * q).round() as usize;
        (d[i].as_secs_f64() * 1e6).round() / 1000.0
    };
    json!({"p50": p(0.50), "p90": p(0.90), "p99": p(0.99), "max": p(1.0), "samples": d.len()})
}
