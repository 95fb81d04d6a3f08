//! Command-line interface: one file per command.

mod app;
mod bench;
mod billing;
mod credits;
mod dev;
mod dlq;
mod enqueue;
mod ingress;
mod job;
mod migrate;
mod queue;
mod queues;
mod scheduler;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longshore",
    version,
    about = "A queue-driven background worker fleet on PostgreSQL (pgmq)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install pgmq, apply migrations, create one queue per job kind (idempotent).
    Migrate,
    /// Work jobs until SIGTERM/SIGINT.
    Worker(worker::Args),
    /// The HTTP ingress: enqueue, job status, signed webhooks, health, metrics.
    Ingress(ingress::Args),
    /// Fire the configured schedules (run any number of replicas).
    Scheduler(scheduler::Args),
    /// Everything in one process on the embedded default (private PostgreSQL if none).
    Dev(dev::Args),
    /// Enqueue one job: `longshore enqueue probe '{"id":1}' --delay 10s --key k1`.
    Enqueue(enqueue::Args),
    /// Per-queue counts: visible, in flight, delayed, oldest age, dead letters.
    Queues(queues::Args),
    /// Operator controls of one queue: pause, resume.
    Queue(queue::Args),
    /// Operator actions on one job: cancel, retry now.
    Job(job::Args),
    /// Dead letters: list, retry (re-send to their queue) or purge.
    Dlq(dlq::Args),
    /// Throughput and latency benchmark on the `probe` kind.
    Bench(bench::Args),
    /// Billing tools for operators.
    Billing(billing::Args),
    /// Chat credits for operators: grant, balance.
    Credits(credits::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A handler's panic is a retry, not news: one log line, no backtrace on stderr.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %msg, at = %at, "panicked");
    }));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Migrate => migrate::run().await,
            Command::Worker(a) => worker::run(a).await,
            Command::Ingress(a) => ingress::run(a).await,
            Command::Scheduler(a) => scheduler::run(a).await,
            Command::Dev(a) => dev::run(a).await,
            Command::Enqueue(a) => enqueue::run(a).await,
            Command::Queues(a) => queues::run(a).await,
            Command::Queue(a) => queue::run(a).await,
            Command::Job(a) => job::run(a).await,
            Command::Dlq(a) => dlq::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Billing(a) => billing::run(a).await,
            Command::Credits(a) => credits::run(a).await,
        }
    });
    // Bounded: a task stuck in synchronous code (a handler that ignores cancellation)
    // must not keep the process from exiting once the command is done.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
