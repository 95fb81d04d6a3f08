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

use crate::job::JobArgs;
use crate::queue_name::{QueueName, QueueNameError};
use crate::store::{self, NewMessage, QueueSql};

/// Default idempotency-key lifetime when the caller does not set one.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

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
}

impl EnqueueOptions {
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    pub fn run_at(mut self, t: DateTime<Utc>) -> Self {
        self.run_at = Some(t);
        self
    }
    pub fn key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = Some(ttl);
        self
    }

    fn visible_at(&self) -> Option<DateTime<Utc>> {
        self.run_at.or_else(|| {
            self.delay.filter(|d| !d.is_zero()).map(|d| {
                Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
            })
        })
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    /// True when an earlier job with the same idempotency key was returned instead.
    pub duplicate: bool,
    /// For a duplicate: whether the earlier job's args equal these.
    pub same_body: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("invalid queue name: {0}")]
    QueueName(#[from] QueueNameError),
    #[error("queue {0:?} does not exist (run `longshore migrate`)")]
    UnknownQueue(String),
    #[error("job args are not serialisable: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("idempotency key must be 1 to 200 printable characters")]
    BadKey,
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
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

/// Enqueues many typed jobs of one kind with the same options, in one statement.
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
    let jobs: Vec<(Value, EnqueueOptions)> = bodies
        .into_iter()
        .map(|b| {
            let mut o = opts.clone();
            o.idempotency_key = None;
            (b, o)
        })
        .collect();
    Ok(enqueue_json_many(ex, &queue, jobs)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect())
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
    for (_, o) in &jobs {
        if let Some(k) = &o.idempotency_key
            && (k.is_empty() || k.len() > 200 || k.chars().any(char::is_control))
        {
            return Err(EnqueueError::BadKey);
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
        if let Some((id, same_body)) = store::idempotency_lookup(&mut tx, queue, &key, &body)
            .await
            .map_err(|e| db_err(queue, e))?
        {
            out.push(Enqueued {
                id,
                duplicate: true,
                same_body,
            });
            continue;
        }
        let id = sql
            .insert(&mut *tx, &[new_message(body.clone(), &opts)])
            .await
            .map_err(|e| db_err(queue, e))?[0];
        let ttl = opts.idempotency_ttl.unwrap_or(DEFAULT_IDEMPOTENCY_TTL);
        store::idempotency_record(&mut tx, queue, &key, &body, id, ttl)
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
