// Every public item is documented, and a new one without docs warns (CI denies
// warnings in `cargo doc` and clippy).
#![warn(missing_docs)]
//! # longshore-workers: the runtime
//!
//! A domain-agnostic job runtime on PostgreSQL queues (pgmq). It knows nothing of any
//! pipeline; job kinds live in `longshore-jobs` and are wired in by the binary.
//!
//! Layout:
//! - [`job`]: the contract: [`JobArgs`] (a stable kind), [`Handler`], [`Outcome`],
//!   [`JobContext`] (attempt, id, cancellation, the completion transaction).
//! - [`registry`]: every kind once, by queue name.
//! - [`mod@enqueue`]: enqueue through a pool, a connection or a transaction.
//! - [`store`]: **all** queue SQL: claim, fenced ack/retry/snooze/bury, heartbeat.
//! - [`worker`]: consumers, heartbeats, batched acks, shutdown; [`listener`] wakes them.
//! - `outcome` + [`backoff`]: from a handler's outcome to what the store does.
//! - [`ingress`]: the HTTP ingress (enqueue, job status, webhooks, health, metrics).
//! - [`scheduler`]: cron schedules, each fire exactly once across replicas;
//!   [`maintenance`]: retention jobs run by schedules.
//! - [`config`], [`db`] (pools, migrate), [`telemetry`] (logs, metrics),
//!   [`embedded`] (a private PostgreSQL for `dev`), [`testing`] (the test kit).

pub mod backoff;
pub mod clean;
pub mod config;
pub mod db;
pub mod embedded;
pub mod enqueue;
pub mod ingress;
pub mod job;
pub mod limits;
pub mod listener;
pub mod locks;
pub mod maintenance;
pub(crate) mod outcome;
pub mod queue_name;
pub mod registry;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod worker;

/// `docs/job-kinds.md`, compiled as a doctest so the guide cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../docs/job-kinds.md")]
pub struct JobKindsGuide;

pub use config::Config;
pub use enqueue::{
    BatchEnqueued, EnqueueError, EnqueueOptions, Enqueued, enqueue, enqueue_batch, enqueue_conn,
    enqueue_json, enqueue_json_many, enqueue_many, enqueue_on,
};
pub use job::{Handler, JobArgs, JobContext, JobError, Outcome, ResultExt};
pub use queue_name::QueueName;
pub use registry::{AdminView, Registry, ViewParams, ViewSection};
pub use worker::{Observer, Worker, WorkerError};
