//! Enqueueing jobs from Rust, through a pool, a connection or a transaction (so a
//! business row and its job commit together).
//!
//! Plain SQL producers need none of this: `select pgmq.send('probe', '{"id":1}')` works;
//! such jobs simply have no idempotency key.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use sqlx::{Acquire, PgConnection, Postgres};

use crate::clean;
use crate::job::JobArgs;
use crate::queue_name::{QueueName, QueueNameError};
use crate::store::{self, NewMessage, QueueSql};

/// Default idempotency-key lifetime when the caller does not set one.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// How to enqueue a job: when it becomes visible, its idempotency key, and who enqueued it.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Visible after this long.
    pub delay: Option<Duration>,
    /// Visible at this time (wins over `delay`).
    pub run_at: Option<DateTime<Utc>>,
    /// A second enqueue with the same key within `idempotency_ttl` returns the first
    /// job's id and enqueues nothing.
    pub idempotency_key: Option<String>,
    /// Lifetime of the key; `None` = [`DEFAULT_IDEMPOTENCY_TTL`].
    pub idempotency_ttl: Option<Duration>,
    /// The key stops holding once the job it made is dead-lettered: a later enqueue
    /// with the key makes a new job (River's unique states without `discarded`). For
    /// work a later attempt may redo (a market ingest a quota refused); not for keys a
    /// caller replays to learn the first outcome. Single enqueues only: a batch's key
    /// always holds.
    pub free_key_when_dead: bool,
    /// Who enqueued it (`token:<name>`, `hook:<source>`), kept in the `principal`
    /// header: the ingress answers a job's status only to its principal (or a token
    /// that may read every job of the queue).
    pub principal: Option<String>,
}

impl EnqueueOptions {
    /// Visible after `d` (clamped to ten years, so no caller can overflow the clock).
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// Visible at `t` (wins over [`EnqueueOptions::delay`]).
    pub fn run_at(mut self, t: DateTime<Utc>) -> Self {
        self.run_at = Some(t);
        self
    }
    /// The idempotency key: a second enqueue with it, within its TTL, returns the first job.
    pub fn key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }
    /// How long the idempotency key holds (default [`DEFAULT_IDEMPOTENCY_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = Some(ttl);
        self
    }
    /// See [`EnqueueOptions::free_key_when_dead`].
    pub fn free_key_when_dead(mut self) -> Self {
        self.free_key_when_dead = true;
        self
    }

    /// When the job becomes visible; a delay is clamped to [`clean::MAX_DELAY`] so no
    /// caller can overflow the clock.
    fn visible_at(&self) -> Option<DateTime<Utc>> {
        self.run_at.or_else(|| {
            self.delay.filter(|d| !d.is_zero()).map(|d| {
                let d =
                    chrono::Duration::from_std(clean::delay(d)).unwrap_or(chrono::Duration::MAX);
                let now = Utc::now();
                now.checked_add_signed(d).unwrap_or(now)
            })
        })
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id in its queue (the pgmq `msg_id`); for a duplicate, the first job's.
    pub id: i64,
    /// True when an earlier job with the same idempotency key was returned instead.
    pub duplicate: bool,
    /// For a duplicate: whether the earlier job's args equal these.
    pub same_body: bool,
}

/// Why an enqueue was refused; nothing was enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("invalid queue name: {0}")]
    /// The queue name is not a valid one.
    QueueName(#[from] QueueNameError),
    #[error("queue {0:?} does not exist (run `longshore migrate`)")]
    /// The queue's table does not exist: the database is not migrated for this kind.
    UnknownQueue(String),
    #[error("job args are not serialisable: {0}")]
    /// The args did not serialise to JSON.
    Serialize(#[from] serde_json::Error),
    #[error("idempotency key must be 1 to 300 printable characters")]
    /// The idempotency key is empty, too long or not printable.
    BadKey,
    #[error("database: {0}")]
    /// The database refused or could not be reached.
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for EnqueueError {
    fn from(e: sqlx::Error) -> Self {
        EnqueueError::Database(e)
    }
}

impl EnqueueError {
    /// As an `sqlx::Error`, for code whose errors are database errors (a bad queue
    /// name or unserialisable args become an encode error).
    pub fn into_sqlx(self) -> sqlx::Error {
        match self {
            EnqueueError::Database(e) => e,
            other => sqlx::Error::Encode(Box::new(other)),
        }
    }
}

fn db_err(queue: &QueueName, e: sqlx::Error) -> EnqueueError {
    if let sqlx::Error::Database(d) = &e
        && d.code().as_deref() == Some("42P01")
    {
        return EnqueueError::UnknownQueue(queue.to_string());
    }
    EnqueueError::Database(e)
}

/// The statements of a queue, built once per process.
pub(crate) fn queue_sql(name: &QueueName) -> Arc<QueueSql> {
    static CACHE: OnceLock<RwLock<HashMap<QueueName, Arc<QueueSql>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(q) = cache.read().expect("not poisoned").get(name) {
        return q.clone();
    }
    let q = Arc::new(QueueSql::new(name.clone()));
    cache
        .write()
        .expect("not poisoned")
        .entry(name.clone())
        .or_insert(q)
        .clone()
}

/// Enqueues one typed job on its kind's queue.
pub async fn enqueue<'c, A: JobArgs>(
    ex: impl Acquire<'c, Database = Postgres>,
    args: &A,
    opts: EnqueueOptions,
) -> Result<Enqueued, EnqueueError> {
    let queue = QueueName::parse(A::KIND)?;
    enqueue_json(ex, &queue, serde_json::to_value(args)?, opts).await
}

/// [`enqueue`] on a concrete connection (typically a handler's `ctx.tx()`, so the job
/// commits with the handler's acknowledgement). Non-generic over the executor, which
/// keeps handler futures `Send` where the `Acquire`-generic form trips the compiler's
/// higher-ranked lifetime check.
pub fn enqueue_on<'a, A: JobArgs>(
    conn: &'a mut PgConnection,
    args: &'a A,
    opts: EnqueueOptions,
) -> BoxFuture<'a, Result<Enqueued, EnqueueError>> {
    Box::pin(async move {
        let queue = QueueName::parse(A::KIND)?;
        let body = serde_json::to_value(args)?;
        let mut out = enqueue_conn(conn, &queue, vec![(body, opts)]).await?;
        Ok(out.pop().expect("one in, one out"))
    })
}

/// Enqueues many typed jobs of one kind with the same options, in one statement. With
/// an idempotency key the key covers the whole batch: a repeat within its TTL returns
/// the first batch's ids and enqueues nothing.
pub async fn enqueue_many<'c, A: JobArgs>(
    ex: impl Acquire<'c, Database = Postgres>,
    args: &[A],
    opts: EnqueueOptions,
) -> Result<Vec<i64>, EnqueueError> {
    let queue = QueueName::parse(A::KIND)?;
    let bodies = args
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let mut conn = ex.acquire().await.map_err(EnqueueError::Database)?;
    Ok(enqueue_batch(&mut conn, &queue, bodies, opts).await?.ids)
}

/// The answer to a batch enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEnqueued {
    /// The jobs' ids, in the order of the args.
    pub ids: Vec<i64>,
    /// True when an earlier batch with the same idempotency key was returned instead.
    pub duplicate: bool,
    /// For a duplicate: whether the earlier batch's args equal these.
    pub same_body: bool,
}

/// Enqueues jobs of one kind with the same options, all or nothing. An idempotency key
/// in `opts` is the batch's: the whole array of args is recorded under it once.
pub async fn enqueue_batch(
    conn: &mut PgConnection,
    queue: &QueueName,
    bodies: Vec<Value>,
    opts: EnqueueOptions,
) -> Result<BatchEnqueued, EnqueueError> {
    if let Some(mut tx) = pooled_tx(conn).await? {
        let out = enqueue_batch_in(&mut tx, queue, bodies, opts).await?;
        tx.commit().await.map_err(EnqueueError::Database)?;
        return Ok(out);
    }
    enqueue_batch_in(conn, queue, bodies, opts).await
}

/// Through a transaction-mode pooler, an enqueue on a connection outside a transaction
/// gets one of its own ([`crate::db::Session`] says why).
async fn pooled_tx(
    conn: &mut PgConnection,
) -> Result<Option<sqlx::Transaction<'_, Postgres>>, EnqueueError> {
    if !crate::db::pooled() || sqlx::Connection::is_in_transaction(conn) {
        return Ok(None);
    }
    crate::db::begin_on(conn, crate::db::Deadline::Statement)
        .await
        .map(Some)
        .map_err(EnqueueError::Database)
}

async fn enqueue_batch_in(
    conn: &mut PgConnection,
    queue: &QueueName,
    bodies: Vec<Value>,
    opts: EnqueueOptions,
) -> Result<BatchEnqueued, EnqueueError> {
    let Some(key) = opts.idempotency_key.clone() else {
        let jobs = bodies.into_iter().map(|b| (b, opts.clone())).collect();
        let ids = enqueue_conn(conn, queue, jobs)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();
        return Ok(BatchEnqueued {
            ids,
            duplicate: false,
            same_body: true,
        });
    };
    check_key(&key)?;
    let sql = queue_sql(queue);
    let all = Value::Array(bodies);
    let keyed = keyed_content(&all, &opts);
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(EnqueueError::Database)?;
    if let Some(e) = store::idempotency_lookup(&mut tx, queue, &key, &keyed, false)
        .await
        .map_err(|e| db_err(queue, e))?
    {
        return Ok(BatchEnqueued {
            ids: e.msg_ids.unwrap_or_else(|| vec![e.msg_id]),
            duplicate: true,
            same_body: e.same_body,
        });
    }
    let Value::Array(bodies) = &all else {
        unreachable!("built as an array above")
    };
    let mut per_job = opts.clone();
    per_job.idempotency_key = None;
    let msgs: Vec<NewMessage> = bodies
        .iter()
        .map(|b| {
            let mut m = new_message(b.clone(), &per_job);
            // Record the batch's key on each job, so an operator can tell where it came from.
            if let Value::Object(h) = &mut m.headers {
                h.insert("idempotency_key".into(), json!(key));
            } else {
                m.headers = json!({"idempotency_key": key});
            }
            m
        })
        .collect();
    let ids = sql
        .insert(&mut *tx, &msgs)
        .await
        .map_err(|e| db_err(queue, e))?;
    if let Some(&first) = ids.first() {
        let ttl = opts.idempotency_ttl.unwrap_or(DEFAULT_IDEMPOTENCY_TTL);
        store::idempotency_record(&mut tx, queue, &key, &keyed, first, Some(&ids), ttl)
            .await
            .map_err(|e| db_err(queue, e))?;
    }
    tx.commit().await.map_err(EnqueueError::Database)?;
    Ok(BatchEnqueued {
        ids,
        duplicate: false,
        same_body: true,
    })
}

/// What a key's repeat must match: the args and the options asked for (a repeat with
/// another delay or run_at is a different request, not a retry). Args alone when no
/// option is set.
fn keyed_content(body: &Value, opts: &EnqueueOptions) -> Value {
    if opts.delay.is_none() && opts.run_at.is_none() {
        return body.clone();
    }
    json!({
        "args": body,
        "delay_ms": opts.delay.map(|d| d.as_millis() as u64),
        "run_at": opts.run_at.map(|t| t.to_rfc3339()),
    })
}

/// A key: 1 to 300 characters, none a control character but the unit separator
/// (U+001F) the ingress puts between a principal and its caller's key, which no caller
/// of the ingress can send.
fn check_key(k: &str) -> Result<(), EnqueueError> {
    if k.is_empty() || k.len() > 300 || k.chars().any(|c| c.is_control() && c != '\u{1f}') {
        return Err(EnqueueError::BadKey);
    }
    Ok(())
}

/// Enqueues one job given as JSON (the CLI and the ingress use this after validating
/// the args against the kind).
pub async fn enqueue_json<'c>(
    ex: impl Acquire<'c, Database = Postgres>,
    queue: &QueueName,
    body: Value,
    opts: EnqueueOptions,
) -> Result<Enqueued, EnqueueError> {
    let mut out = enqueue_json_many(ex, queue, vec![(body, opts)]).await?;
    Ok(out.pop().expect("one in, one out"))
}

/// Enqueues jobs given as JSON, each with its own options, all or nothing. Jobs without
/// an idempotency key go in one statement.
pub async fn enqueue_json_many<'c>(
    ex: impl Acquire<'c, Database = Postgres>,
    queue: &QueueName,
    jobs: Vec<(Value, EnqueueOptions)>,
) -> Result<Vec<Enqueued>, EnqueueError> {
    let mut conn = ex.acquire().await.map_err(EnqueueError::Database)?;
    enqueue_conn(&mut conn, queue, jobs).await
}

/// [`enqueue_json_many`] on a concrete connection; inside an open transaction the
/// keyed path uses a savepoint.
pub async fn enqueue_conn(
    conn: &mut PgConnection,
    queue: &QueueName,
    jobs: Vec<(Value, EnqueueOptions)>,
) -> Result<Vec<Enqueued>, EnqueueError> {
    if let Some(mut tx) = pooled_tx(conn).await? {
        let out = enqueue_conn_in(&mut tx, queue, jobs).await?;
        tx.commit().await.map_err(EnqueueError::Database)?;
        return Ok(out);
    }
    enqueue_conn_in(conn, queue, jobs).await
}

async fn enqueue_conn_in(
    conn: &mut PgConnection,
    queue: &QueueName,
    jobs: Vec<(Value, EnqueueOptions)>,
) -> Result<Vec<Enqueued>, EnqueueError> {
    for (_, o) in &jobs {
        if let Some(k) = &o.idempotency_key {
            check_key(k)?;
        }
    }
    let sql = queue_sql(queue);
    let keyed = jobs.iter().any(|(_, o)| o.idempotency_key.is_some());
    if !keyed {
        let msgs: Vec<NewMessage> = jobs.into_iter().map(|(b, o)| new_message(b, &o)).collect();
        let ids = sql
            .insert(&mut *conn, &msgs)
            .await
            .map_err(|e| db_err(queue, e))?;
        return Ok(ids
            .into_iter()
            .map(|id| Enqueued {
                id,
                duplicate: false,
                same_body: true,
            })
            .collect());
    }
    // Keyed: one transaction (a savepoint inside the caller's), the key locked first.
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(EnqueueError::Database)?;
    let mut out = Vec::with_capacity(jobs.len());
    for (body, opts) in jobs {
        let Some(key) = opts.idempotency_key.clone() else {
            let id = sql
                .insert(&mut *tx, &[new_message(body, &opts)])
                .await
                .map_err(|e| db_err(queue, e))?[0];
            out.push(Enqueued {
                id,
                duplicate: false,
                same_body: true,
            });
            continue;
        };
        let content = keyed_content(&body, &opts);
        if let Some(e) =
            store::idempotency_lookup(&mut tx, queue, &key, &content, opts.free_key_when_dead)
                .await
                .map_err(|e| db_err(queue, e))?
        {
            out.push(Enqueued {
                id: e.msg_id,
                duplicate: true,
                same_body: e.same_body,
            });
            continue;
        }
        let id = sql
            .insert(&mut *tx, &[new_message(body.clone(), &opts)])
            .await
            .map_err(|e| db_err(queue, e))?[0];
        let ttl = opts.idempotency_ttl.unwrap_or(DEFAULT_IDEMPOTENCY_TTL);
        store::idempotency_record(&mut tx, queue, &key, &content, id, None, ttl)
            .await
            .map_err(|e| db_err(queue, e))?;
        out.push(Enqueued {
            id,
            duplicate: false,
            same_body: true,
        });
    }
    tx.commit().await.map_err(EnqueueError::Database)?;
    Ok(out)
}

fn new_message(body: Value, opts: &EnqueueOptions) -> NewMessage {
    let visible_at = opts.visible_at();
    let mut h = Map::new();
    if let Some(k) = &opts.idempotency_key {
        h.insert("idempotency_key".into(), json!(k));
    }
    if let Some(t) = visible_at {
        h.insert("run_at".into(), json!(t.to_rfc3339()));
    }
    if let Some(p) = &opts.principal {
        h.insert("principal".into(), json!(p));
    }
    NewMessage {
        body,
        headers: if h.is_empty() {
            Value::Null
        } else {
            Value::Object(h)
        },
        visible_at,
    }
}
