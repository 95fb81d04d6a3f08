//! The job contract: what a job kind is, what a handler gets and what it returns.
//!
//! A job kind is an args type with a stable string [`JobArgs::KIND`] (which is also the
//! name of its pgmq queue) plus a [`Handler`]. Renaming the Rust type never orphans
//! queued jobs, because only `KIND` is stored.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// The arguments of a job kind. `KIND` is the queue name: `[a-z0-9_]`, at most 47 chars.
pub trait JobArgs: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind's name, also its queue's: `[a-z0-9_]`, at most 47 characters.
    const KIND: &'static str;
    /// Whether the door (ingress, CLI, schedules) refuses args with fields this type
    /// does not know, at any depth (true), or accepts them (false: a kind whose body is
    /// someone else's shape, like a database webhook whose rows may grow columns).
    /// Workers always ignore unknown fields, so a producer deployed before its workers
    /// does not dead-letter jobs. The check sees plain structs and externally tagged
    /// enums; fields under `#[serde(flatten)]`, internally tagged or untagged enums
    /// are not reported, so keep args types plain.
    const STRICT: bool = true;
    /// Whether callers outside the fleet may enqueue this kind over HTTP
    /// (`POST /v1/queues/{kind}/jobs`) and read its jobs. Default no: maintenance, file
    /// and pipeline-internal kinds are enqueued by schedules, other jobs, webhooks the
    /// operator configured, and the CLI. A token's `"*"` means every public kind.
    const PUBLIC: bool = false;
}

/// Runs jobs of one kind.
///
/// Return `Ok(Outcome::Done(..))` (see [`Outcome::done`]), `Ok(Outcome::Snooze(..))`,
/// or an error: a [`JobError::Retry`] is retried with backoff, a [`JobError::Fail`]
/// dead-letters at once. Use [`ResultExt::retryable`] / [`ResultExt::fatal`] to
/// classify foreign errors with `?`. A panic or a timeout counts as a retry.
pub trait Handler: Send + Sync + 'static {
    /// The args this handler runs on.
    type Args: JobArgs;

    /// Runs one attempt of a job. Effects written through `ctx.tx()` commit with the job's completion, or not at all.
    fn handle(
        &self,
        args: Self::Args,
        ctx: &mut JobContext,
    ) -> impl Future<Output = Result<Outcome, JobError>> + Send;

    /// Checks args against this handler's own settings (a path outside the configured
    /// directories, a test-only knob with tests off). Runs at the door (ingress, CLI,
    /// schedules: a 422 / exit 2) and again before each run (a `Fail`), so it holds
    /// wherever a job came from, plain `pgmq.send` included.
    fn check(&self, _args: &Self::Args) -> Result<(), String> {
        Ok(())
    }

    /// True when every statement this handler runs is inside a transaction
    /// (`ctx.tx()`, [`crate::db::begin`], [`crate::db::run`]) or is a simple query with
    /// no parameters (what cannot run in a transaction, such as `VACUUM`: one round trip,
    /// nothing for a pooler to misroute), so it works through a
    /// transaction-mode pooler (`database.pooler = "transaction"`). A worker on a pooler
    /// warns at start about the kinds it serves that do not say so (docs/poolers.md).
    const POOLER_SAFE: bool = false;
}

/// What became of one run of a job. Non-exhaustive: the runtime may learn new outcomes
/// (a cancellation) without breaking handlers that match on these.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Acknowledged: archived (or deleted, per queue config); the result, if any, is
    /// kept with the archived message.
    Done(Option<Value>),
    /// Made visible again after the backoff for this attempt; the error is recorded.
    Retry(String),
    /// Made visible again after the given duration. Does not spend an attempt.
    Snooze(Duration),
    /// Dead-lettered at once: input that can never succeed.
    Fail(String),
}

impl Outcome {
    /// Done, with no result.
    pub fn done() -> Result<Outcome, JobError> {
        Ok(Outcome::Done(None))
    }

    /// Done, with `result` stored as the job's result (what `GET …?wait=` answers).
    pub fn done_with(result: impl Serialize) -> Result<Outcome, JobError> {
        match serde_json::to_value(result) {
            Ok(v) => Ok(Outcome::Done(Some(v))),
            Err(e) => Err(JobError::Fail(format!("result is not serialisable: {e}"))),
        }
    }

    /// Not now: run again after `after`, without counting an attempt.
    pub fn snooze(after: Duration) -> Result<Outcome, JobError> {
        Ok(Outcome::Snooze(after))
    }

    /// The label used in metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Retry(_) => "retry",
            Outcome::Snooze(_) => "snooze",
            Outcome::Fail(_) => "fail",
        }
    }
}

/// A handler's error, already classified. Non-exhaustive, as [`Outcome`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Transient: try again later (with backoff, up to the queue's max attempts).
    #[error("{0}")]
    Retry(String),
    /// Permanent: dead-letter now.
    #[error("{0}")]
    Fail(String),
}

impl JobError {
    /// A transient error: retried with backoff.
    pub fn retry(msg: impl std::fmt::Display) -> Self {
        JobError::Retry(msg.to_string())
    }
    /// A permanent error: dead-lettered at once.
    pub fn fail(msg: impl std::fmt::Display) -> Self {
        JobError::Fail(msg.to_string())
    }
}

impl From<JobError> for Outcome {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Retry(m) => Outcome::Retry(m),
            JobError::Fail(m) => Outcome::Fail(m),
        }
    }
}

/// Database errors are transient from a job's point of view (connection lost, deadlock,
/// serialization failure). A handler that knows better maps them itself.
impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Retry(format!("database: {e}"))
    }
}

/// Classify any error for `?` in a handler: `client.get(..).await.retryable()?`.
pub trait ResultExt<T> {
    /// Any error becomes [`JobError::Retry`].
    fn retryable(self) -> Result<T, JobError>;
    /// Any error becomes [`JobError::Fail`].
    fn fatal(self) -> Result<T, JobError>;
}

impl<T, E: std::fmt::Display> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, JobError> {
        self.map_err(JobError::retry)
    }
    fn fatal(self) -> Result<T, JobError> {
        self.map_err(JobError::fail)
    }
}

/// Everything a handler knows about the run it is in.
pub struct JobContext {
    /// The pgmq `msg_id`.
    pub job_id: i64,
    /// The queue (the kind's name).
    pub queue: &'static str,
    /// 1 for the first run; snoozes and shutdown releases do not count.
    pub attempt: u32,
    /// The queue's `max_attempts`: the run after the last one is dead-lettered.
    pub max_attempts: u32,
    /// When the job was first enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// Who enqueued it (`token:<name>`, `hook:<source>`), when it came through the
    /// ingress; `None` for jobs enqueued by the scheduler, the CLI or SQL.
    pub principal: Option<String>,
    /// The fire this job was enqueued for, when the scheduler enqueued it (its
    /// `fire_at` header): the instant the run stands for, which a tick should use
    /// rather than its own clock (a fire may run a little early by this host's clock,
    /// or late).
    pub fire_at: Option<DateTime<Utc>>,
    /// Cancelled when the lease is lost, the worker's shutdown grace period ends, or an
    /// operator cancels the job (`longshore job cancel`). Long handlers should watch it;
    /// the runtime drops the handler soon after. A retry answered to a shutdown is
    /// released instead (no attempt spent), and anything but `done` answered to an
    /// operator's cancel is cancelled; other answers stand.
    pub cancel: CancellationToken,
    pool: PgPool,
    tx: Option<Transaction<'static, Postgres>>,
}

impl JobContext {
    pub(crate) fn new(
        job_id: i64,
        queue: &'static str,
        attempt: u32,
        max_attempts: u32,
        enqueued_at: DateTime<Utc>,
        cancel: CancellationToken,
        pool: PgPool,
    ) -> Self {
        JobContext {
            job_id,
            queue,
            attempt,
            max_attempts,
            enqueued_at,
            principal: None,
            fire_at: None,
            cancel,
            pool,
            tx: None,
        }
    }

    /// The completion transaction: writes made through it commit in the same
    /// transaction as this job's fenced acknowledgement, or not at all (retry, failure,
    /// lost lease). Begun on first use.
    pub async fn tx(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.tx.is_none() {
            self.tx = Some(crate::db::begin(&self.pool, crate::db::Deadline::Statement).await?);
        }
        Ok(self.tx.as_mut().expect("just set"))
    }

    /// A pool for reads or for writes that must stand even if the job is retried.
    ///
    /// Through a transaction-mode pooler (`database.pooler = "transaction"`) run
    /// statements on it inside a transaction ([`crate::db::begin`], [`crate::db::run`]):
    /// outside one, the pooler may parse a statement on one server and bind it on another.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn take_tx(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.tx.take()
    }
}
