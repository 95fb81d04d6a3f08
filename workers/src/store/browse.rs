//! What operators read (the admin API and the console): jobs of a queue by state with
//! keyset pagination, one job, recent errors, schedules' last fires.
//!
//! Every read is bounded whatever the tables hold: pages walk a primary key from a
//! cursor (`before`, newest first) and stop at `limit`; a search by JSON containment on
//! args, which no index serves, looks at most [`SEARCH_WINDOW`] ids per request and
//! says where to go on (`next_before`), so a search over a million archived jobs is a
//! series of bounded requests, never one long scan. Args and headers are shown with
//! secret-looking fields redacted ([`redact`]).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use super::QueueSql;

/// Most ids a containment search looks at in one request.
pub const SEARCH_WINDOW: i64 = 20_000;

/// Most rows in one page.
pub const MAX_PAGE: i64 = 500;

/// A job's state as operators filter by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListState {
    /// Due now, not held.
    Visible,
    /// Enqueued for later, never run.
    Delayed,
    /// Waiting in backoff after a failed attempt.
    Retrying,
    /// Held by a worker (lease running).
    Running,
    /// Done (archived, or recorded as completed on a `delete` queue).
    Done,
    /// Dead-lettered.
    Dead,
    /// Cancelled by an operator.
    Cancelled,
}

impl ListState {
    /// Every state, in the order the console shows them.
    pub const ALL: [ListState; 7] = [
        ListState::Visible,
        ListState::Delayed,
        ListState::Retrying,
        ListState::Running,
        ListState::Done,
        ListState::Dead,
        ListState::Cancelled,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            ListState::Visible => "visible",
            ListState::Delayed => "delayed",
            ListState::Retrying => "retrying",
            ListState::Running => "running",
            ListState::Done => "done",
            ListState::Dead => "dead",
            ListState::Cancelled => "cancelled",
        }
    }

    /// Parses [`ListState::as_str`].
    pub fn parse(s: &str) -> Option<ListState> {
        ListState::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Which jobs of a queue to list.
#[derive(Debug, Clone)]
pub struct JobQuery {
    /// Their state.
    pub state: ListState,
    /// Only ids below this (the previous page's `next_before`).
    pub before: Option<i64>,
    /// Most rows (capped at [`MAX_PAGE`]).
    pub limit: i64,
    /// Only this id.
    pub id: Option<i64>,
    /// Only jobs whose args contain this JSON (`@>`).
    pub contains: Option<Value>,
}

/// One row of a job list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    /// The job's id in its queue.
    pub id: i64,
    /// Attempts spent.
    pub attempts: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it is due (waiting jobs), its lease ends (running), or it ended.
    pub at: Option<DateTime<Utc>>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Its args, redacted.
    pub args: Value,
}

/// A page of jobs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobPage {
    /// The queue.
    pub queue: String,
    /// The state listed.
    pub state: ListState,
    /// The jobs, newest first.
    pub jobs: Vec<JobRow>,
    /// Pass as `before` for the next page; `null` when there is none.
    pub next_before: Option<i64>,
}

/// Lists jobs of `sql`'s queue: see [`JobQuery`].
pub async fn list_jobs(
    c: &mut PgConnection,
    sql: &QueueSql,
    q: &JobQuery,
) -> Result<JobPage, sqlx::Error> {
    let limit = q.limit.clamp(1, MAX_PAGE);
    let name = sql.name.as_str();
    // (source, id column, attempts, at, last error, state condition)
    // Each source is read on its own by its primary key and the pages merged here (a
    // UNION of the archive and the completion records is planned as a sort of the whole
    // archive once the small table has no statistics).
    let froms: Vec<String> = match q.state {
        ListState::Visible | ListState::Delayed | ListState::Retrying | ListState::Running => {
            let cond = match q.state {
                ListState::Visible => "vt <= clock_timestamp()",
                ListState::Delayed => {
                    "last_read_at IS NULL AND vt > clock_timestamp() AND read_ct = 0"
                }
                ListState::Retrying => {
                    "last_read_at IS NULL AND vt > clock_timestamp() AND read_ct > 0"
                }
                _ => "last_read_at IS NOT NULL AND vt > clock_timestamp()",
            };
            vec![super::render(
                &format!(
                    "SELECT msg_id AS id, longshore.attempts(read_ct, headers) AS attempts, enqueued_at, vt AS at, \
                     longshore.headers(headers) ->> 'last_error' AS last_error, message FROM {{q}} WHERE {cond}"
                ),
                &sql.name,
            )]
        }
        ListState::Done => vec![
            super::render(
                "SELECT msg_id AS id, longshore.attempts(read_ct, headers) AS attempts, enqueued_at, archived_at AS at, \
                 NULL::text AS last_error, message FROM {a}",
                &sql.name,
            ),
            format!(
                "SELECT msg_id AS id, attempts, done_at AS enqueued_at, done_at AS at, NULL::text AS last_error, NULL::jsonb AS message \
                 FROM longshore.completions WHERE queue = '{name}'"
            ),
        ],
        ListState::Dead => vec![format!(
            "SELECT msg_id AS id, attempts, enqueued_at, failed_at AS at, last_error, message \
             FROM longshore.dead_letters WHERE queue = '{name}'"
        )],
        ListState::Cancelled => vec![format!(
            "SELECT msg_id AS id, attempts, enqueued_at, cancelled_at AS at, 'cancelled by ' || cancelled_by AS last_error, message \
             FROM longshore.cancelled_jobs WHERE queue = '{name}'"
        )],
    };
    // A search no index serves (containment on args; a state of the queue table, whose
    // rows in other states may fill it) looks at one window of ids below the cursor.
    let windowed = q.id.is_none()
        && (q.contains.is_some()
            || matches!(
                q.state,
                ListState::Visible | ListState::Delayed | ListState::Retrying | ListState::Running
            ));
    let mut floor = None;
    let mut lowest = 0;
    if windowed {
        let (min, max) = id_range(c, sql, q.state).await?;
        lowest = min;
        floor = Some(q.before.unwrap_or(max + 1).saturating_sub(SEARCH_WINDOW));
    }
    // Only the filters given, each bound: one plan per shape, never a generic plan
    // that cannot use the primary key for an `id = $n` PostgreSQL could not see.
    let mut jobs = Vec::new();
    for from in &froms {
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT id, attempts, enqueued_at, at, last_error, coalesce(message, 'null'::jsonb) FROM ({from}) j WHERE true"
        ));
        if let Some(b) = q.before {
            qb.push(" AND id < ").push_bind(b);
        }
        if let Some(id) = q.id {
            qb.push(" AND id = ").push_bind(id);
        }
        if let Some(v) = &q.contains {
            qb.push(" AND message @> ").push_bind(v.clone());
        }
        if let Some(f) = floor {
            qb.push(" AND id >= ").push_bind(f);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
        for r in qb.build().fetch_all(&mut *c).await? {
            jobs.push(JobRow {
                id: r.try_get(0)?,
                attempts: r.try_get::<i32, _>(1)?.max(0),
                enqueued_at: r.try_get(2)?,
                at: r.try_get(3)?,
                last_error: r.try_get::<Option<String>, _>(4)?.map(|e| redact_text(&e)),
                args: redact(&r.try_get::<Value, _>(5)?),
            });
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
    jobs.truncate(limit as usize + 1);
    let more = jobs.len() as i64 > limit;
    jobs.truncate(limit as usize);
    let next_before = if more {
        jobs.last().map(|j| j.id)
    } else {
        // A window that ended with ids below it still to look at.
        floor.filter(|f| *f > lowest)
    };
    Ok(JobPage {
        queue: name.to_string(),
        state: q.state,
        jobs,
        next_before,
    })
}

/// The lowest and highest id where `state` lives (0, 0 when none): first and last rows
/// of a primary key.
async fn id_range(
    c: &mut PgConnection,
    sql: &QueueSql,
    state: ListState,
) -> Result<(i64, i64), sqlx::Error> {
    let stmt = match state {
        ListState::Done => super::render(
            "SELECT coalesce(least((SELECT min(msg_id) FROM {a}), \
             (SELECT min(msg_id) FROM longshore.completions WHERE queue = '{name}')), 0)::bigint, \
             coalesce(greatest((SELECT max(msg_id) FROM {a}), \
             (SELECT max(msg_id) FROM longshore.completions WHERE queue = '{name}')), 0)::bigint",
            &sql.name,
        ),
        ListState::Dead => format!(
            "SELECT coalesce(min(msg_id), 0)::bigint, coalesce(max(msg_id), 0)::bigint FROM longshore.dead_letters WHERE queue = '{}'",
            sql.name
        ),
        ListState::Cancelled => format!(
            "SELECT coalesce(min(msg_id), 0)::bigint, coalesce(max(msg_id), 0)::bigint FROM longshore.cancelled_jobs WHERE queue = '{}'",
            sql.name
        ),
        _ => super::render(
            "SELECT coalesce(min(msg_id), 0)::bigint, coalesce(max(msg_id), 0)::bigint FROM {q}",
            &sql.name,
        ),
    };
    sqlx::query_as(&stmt).fetch_one(c).await
}

/// One job, all there is about it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobDetail {
    /// The queue.
    pub queue: String,
    /// The job's id.
    pub id: i64,
    /// Where it is.
    pub state: ListState,
    /// Attempts spent.
    pub attempts: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it is due, its lease ends, or it ended.
    pub at: Option<DateTime<Utc>>,
    /// Its last error.
    pub last_error: Option<String>,
    /// Its args, redacted.
    pub args: Value,
    /// Its headers, redacted (the result is shown apart).
    pub headers: Value,
    /// Its handler's result (done jobs of an `archive` queue).
    pub result: Option<Value>,
    /// Each failed attempt's error, oldest first (the last 10): `{"attempt", "error",
    /// "at"}`.
    pub errors: Vec<Value>,
    /// What operators did to it, oldest first.
    pub actions: Vec<Value>,
}

/// One job of `sql`'s queue, wherever it is; `None` when unknown (or pruned).
pub async fn job_detail(
    c: &mut PgConnection,
    sql: &QueueSql,
    id: i64,
) -> Result<Option<JobDetail>, sqlx::Error> {
    let stmt = super::render(
        r#"
SELECT CASE WHEN vt <= clock_timestamp() THEN 'visible'
            WHEN last_read_at IS NOT NULL THEN 'running'
            WHEN read_ct = 0 THEN 'delayed' ELSE 'retrying' END,
       longshore.attempts(read_ct, headers), enqueued_at, vt,
       longshore.headers(headers) ->> 'last_error', message, headers
  FROM {q} WHERE msg_id = $1
UNION ALL
SELECT 'done', longshore.attempts(read_ct, headers), enqueued_at, archived_at,
       longshore.headers(headers) ->> 'last_error', message, headers
  FROM {a} WHERE msg_id = $1
UNION ALL
SELECT 'done', attempts, done_at, done_at, NULL, NULL, NULL
  FROM longshore.completions WHERE queue = '{name}' AND msg_id = $1
UNION ALL
SELECT 'dead', attempts, enqueued_at, failed_at, last_error, message, headers
  FROM longshore.dead_letters WHERE queue = '{name}' AND msg_id = $1
UNION ALL
SELECT 'cancelled', attempts, enqueued_at, cancelled_at, 'cancelled by ' || cancelled_by, message, headers
  FROM longshore.cancelled_jobs WHERE queue = '{name}' AND msg_id = $1
LIMIT 1
"#,
        &sql.name,
    );
    let Some(r) = sqlx::query(&stmt).bind(id).fetch_optional(&mut *c).await? else {
        return Ok(None);
    };
    let state: String = r.try_get(0)?;
    let mut headers: Value = r
        .try_get::<Option<Value>, _>(6)?
        .unwrap_or(Value::Object(Default::default()));
    let result = headers.as_object_mut().and_then(|h| h.remove("result"));
    let errors = match headers.as_object_mut().and_then(|h| h.remove("errors")) {
        Some(Value::Array(a)) => a.iter().map(redact).collect(),
        _ => Vec::new(),
    };
    // (Served by operator_actions_job_idx.)
    let actions: Vec<Value> = sqlx::query_scalar(
        r#"SELECT jsonb_build_object('at', at, 'actor', actor, 'action', action, 'detail', detail)
             FROM longshore.operator_actions
            WHERE queue = $1 AND detail ->> 'id' = $2::text
            ORDER BY id LIMIT 100"#,
    )
    .bind(sql.name.as_str())
    .bind(id)
    .fetch_all(&mut *c)
    .await?;
    Ok(Some(JobDetail {
        queue: sql.name.as_str().to_string(),
        id,
        state: ListState::parse(&state).unwrap_or(ListState::Visible),
        attempts: r.try_get::<i32, _>(1)?.max(0),
        enqueued_at: r.try_get(2)?,
        at: r.try_get(3)?,
        last_error: r.try_get::<Option<String>, _>(4)?.map(|e| redact_text(&e)),
        args: redact(&r.try_get::<Option<Value>, _>(5)?.unwrap_or(Value::Null)),
        headers: redact(&headers),
        result: result.map(|v| redact(&v)),
        errors,
        actions,
    }))
}

/// An error operators should see: a dead letter, or a job retrying after one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentError {
    /// The queue.
    pub queue: String,
    /// The job.
    pub id: i64,
    /// `dead` or `retrying`.
    pub state: ListState,
    /// Attempts spent.
    pub attempts: i32,
    /// The error.
    pub error: String,
    /// When it died, or when its next attempt is due.
    pub at: DateTime<Utc>,
}

/// The newest dead letters of every queue, and the jobs of `queues` retrying after an
/// error (at most `limit` of each, newest first).
pub async fn recent_errors(
    c: &mut PgConnection,
    queues: &[std::sync::Arc<QueueSql>],
    limit: i64,
) -> Result<Vec<RecentError>, sqlx::Error> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut out = Vec::new();
    let dead = sqlx::query(
        "SELECT queue, msg_id, attempts, last_error, failed_at FROM longshore.dead_letters ORDER BY failed_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *c)
    .await?;
    for r in dead {
        out.push(RecentError {
            queue: r.try_get(0)?,
            id: r.try_get(1)?,
            state: ListState::Dead,
            attempts: r.try_get(2)?,
            error: redact_text(&r.try_get::<String, _>(3)?),
            at: r.try_get(4)?,
        });
    }
    // Retrying jobs: each queue's newest, among its newest SEARCH_WINDOW ids (a backlog
    // of visible jobs must not make this a scan of the queue).
    let mut retrying = Vec::new();
    for sql in queues {
        let rows = sqlx::query(&super::render(
            "SELECT msg_id, longshore.attempts(read_ct, headers), longshore.headers(headers) ->> 'last_error', vt \
               FROM {q} WHERE last_read_at IS NULL AND read_ct > 0 AND vt > clock_timestamp() \
                 AND longshore.headers(headers) ? 'last_error' \
                 AND msg_id >= (SELECT coalesce(max(msg_id), 0) FROM {q}) - $2 \
              ORDER BY msg_id DESC LIMIT $1",
            &sql.name,
        ))
        .bind(limit)
        .bind(SEARCH_WINDOW)
        .fetch_all(&mut *c)
        .await?;
        for r in rows {
            retrying.push(RecentError {
                queue: sql.name.as_str().to_string(),
                id: r.try_get(0)?,
                state: ListState::Retrying,
                attempts: r.try_get(1)?,
                error: redact_text(&r.try_get::<String, _>(2)?),
                at: r.try_get(3)?,
            });
        }
    }
    retrying.sort_by_key(|e| std::cmp::Reverse(e.at));
    retrying.truncate(limit as usize);
    out.extend(retrying);
    Ok(out)
}

/// One recorded fire of a schedule, with its job's outcome now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fire {
    /// The fire time it was for.
    pub fire_at: DateTime<Utc>,
    /// Its job.
    pub id: i64,
    /// Where that job is (`null`: pruned).
    pub state: Option<ListState>,
}

/// The last `n` fires of `schedule`, newest first, each with its job's state.
pub async fn last_fires(
    c: &mut PgConnection,
    sql: &QueueSql,
    schedule: &str,
    n: i64,
) -> Result<Vec<Fire>, sqlx::Error> {
    let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT fire_at, msg_id FROM longshore.schedule_fires WHERE schedule = $1 ORDER BY fire_at DESC LIMIT $2",
    )
    .bind(schedule)
    .bind(n.clamp(1, 50))
    .fetch_all(&mut *c)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (fire_at, id) in rows {
        let state = sql.status(&mut *c, id).await?.map(|s| match s.state {
            super::JobState::Queued => ListState::Visible,
            super::JobState::Running => ListState::Running,
            super::JobState::Done => ListState::Done,
            super::JobState::Dead => ListState::Dead,
            super::JobState::Cancelled => ListState::Cancelled,
        });
        out.push(Fire { fire_at, id, state });
    }
    Ok(out)
}

/// A page of dead letters (of one queue, or of all), newest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterPage {
    /// The dead letters (args and headers redacted).
    pub dead_letters: Vec<super::DeadLetter>,
    /// Pass as `before` for the next page; `null` when there is none.
    pub next_before: Option<i64>,
}

/// Dead letters newest first by their own id, below `before`, of `queue` (all queues
/// when `None`), whose last error contains `error` (case-insensitive).
pub async fn dead_letter_page(
    c: &mut PgConnection,
    queue: Option<&str>,
    error: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<DeadLetterPage, sqlx::Error> {
    let limit = limit.clamp(1, MAX_PAGE);
    // Filtered pages look at one window of ids (the filters select from the whole
    // table's primary key order; a rare match must not mean a scan of all of it).
    let mut floor = None;
    let mut lowest = 0;
    if queue.is_some() || error.is_some() {
        let (min, max): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(min(id), 0)::bigint, coalesce(max(id), 0)::bigint FROM longshore.dead_letters",
        )
        .fetch_one(&mut *c)
        .await?;
        lowest = min;
        floor = Some(before.unwrap_or(max + 1).saturating_sub(SEARCH_WINDOW));
    }
    let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "SELECT id, queue, msg_id, coalesce(message, 'null'::jsonb), coalesce(headers, '{}'::jsonb), \
         attempts, last_error, enqueued_at, failed_at FROM longshore.dead_letters WHERE true",
    );
    if let Some(q) = queue {
        qb.push(" AND queue = ").push_bind(q.to_string());
    }
    if let Some(e) = error {
        // Matched against the text as it is shown (redacted), so a filter cannot test
        // guesses at a redacted credential: the window's errors are read and matched
        // here, then the page's rows fetched by id.
        let needle = e.to_lowercase();
        let mut scan = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "SELECT id, last_error FROM longshore.dead_letters WHERE true",
        );
        if let Some(q) = queue {
            scan.push(" AND queue = ").push_bind(q.to_string());
        }
        if let Some(b) = before {
            scan.push(" AND id < ").push_bind(b);
        }
        if let Some(f) = floor {
            scan.push(" AND id >= ").push_bind(f);
        }
        scan.push(" ORDER BY id DESC");
        let hits: Vec<i64> = scan
            .build_query_as::<(i64, String)>()
            .fetch_all(&mut *c)
            .await?
            .into_iter()
            .filter(|(_, text)| redact_text(text).to_lowercase().contains(&needle))
            .map(|(id, _)| id)
            .take(limit as usize + 1)
            .collect();
        qb.push(" AND id = ANY(").push_bind(hits).push(")");
    }
    if let Some(b) = before {
        qb.push(" AND id < ").push_bind(b);
    }
    if let Some(f) = floor {
        qb.push(" AND id >= ").push_bind(f);
    }
    qb.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let rows = qb.build().fetch_all(&mut *c).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(super::DeadLetter {
            id: r.try_get(0)?,
            queue: r.try_get(1)?,
            msg_id: r.try_get(2)?,
            message: redact(&r.try_get::<Value, _>(3)?),
            headers: redact(&r.try_get::<Value, _>(4)?),
            attempts: r.try_get(5)?,
            last_error: redact_text(&r.try_get::<String, _>(6)?),
            enqueued_at: r.try_get(7)?,
            failed_at: r.try_get(8)?,
        });
    }
    let more = out.len() as i64 > limit;
    out.truncate(limit as usize);
    Ok(DeadLetterPage {
        next_before: if more {
            out.last().map(|d| d.id)
        } else {
            floor.filter(|f| *f > lowest)
        },
        dead_letters: out,
    })
}

/// Field names whose values are shown as `"[redacted]"`: any that, lowercased with `-`
/// and `_` taken out, contains one of these.
const SECRET_WORDS: [&str; 14] = [
    "secret",
    "password",
    "passwd",
    "token",
    "authorization",
    "credential",
    "private",
    "apikey",
    "accesskey",
    "signingkey",
    "cookie",
    "mnemonic",
    "seedphrase",
    "jwt",
];

/// Field names that are secrets when they are the whole name (as parts of longer names
/// they mean other things: `author`, `passenger`).
const SECRET_NAMES: [&str; 4] = ["auth", "pass", "pwd", "bearer"];

/// Whether a field of this name holds a secret.
pub fn secret_field(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect();
    // Token counts (`max_tokens`, `input_tokens`, `token_count`) are not tokens.
    let n = n.replace("tokens", "").replace("tokencount", "");
    SECRET_WORDS.iter().any(|w| n.contains(w)) || SECRET_NAMES.contains(&n.as_str())
}

/// Whether a string value is a credential whatever its field is called: `Bearer x`,
/// `Basic x`, `sk-…` and nothing else (text around one goes through [`redact_text`]).
fn secret_value(s: &str) -> bool {
    let l = s.trim().to_ascii_lowercase();
    let words: Vec<&str> = l.split_whitespace().collect();
    match words.as_slice() {
        ["bearer" | "basic", cred] => cred.len() >= 8,
        [one] => one.starts_with("sk-") && one.len() >= 8,
        _ => false,
    }
}

/// `v` with the value of every secret-looking field (at any depth, see
/// [`secret_field`]), every credential-looking string (`Bearer …`, `sk-…`) and every
/// `{"name": "api_key", "value": …}` pair's value replaced by `"[redacted]"`; other
/// strings go through [`redact_text`].
pub fn redact(v: &Value) -> Value {
    const R: &str = "[redacted]";
    match v {
        Value::Object(m) => {
            // A name/value pair list (`[{"name": "x-api-key", "value": "…"}]`).
            let named_secret = ["name", "key", "header"]
                .iter()
                .any(|k| m.get(*k).and_then(Value::as_str).is_some_and(secret_field));
            Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        if secret_field(k) || (named_secret && k == "value") {
                            (k.clone(), Value::String(R.into()))
                        } else {
                            (k.clone(), redact(v))
                        }
                    })
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        Value::String(s) if secret_value(s) => Value::String(R.into()),
        Value::String(s) => Value::String(redact_text(s)),
        other => other.clone(),
    }
}

/// Free text (an error message, a URL) with credentials in it replaced: the word after
/// `Bearer `/`Basic `, and the value of a `key=value` whose key is a secret's name
/// (`?api-key=…`, `token=…`).
pub fn redact_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let stop = |b: u8| b.is_ascii_whitespace() || b"&\"'),;]}>".contains(&b);
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        let lower = rest.get(..7).map(str::to_ascii_lowercase);
        let at_word = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if at_word
            && let Some(l) = &lower
            && (l == "bearer " || l.starts_with("basic "))
        {
            let skip = if l == "bearer " { 7 } else { 6 };
            let mut j = i + skip;
            while j < s.len() && !stop(bytes[j]) {
                j += 1;
            }
            // A credential, not a word: 8 characters or more of token alphabet.
            let word = &s[i + skip..j];
            if word.len() >= 8
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
            {
                out.push_str(&rest[..skip]);
                out.push_str("[redacted]");
                i = j;
                continue;
            }
        }
        if bytes[i] == b'=' {
            // The key before this '=': back to the last delimiter.
            let start = s[..i]
                .char_indices()
                .rev()
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
                .map_or(0, |(p, c)| p + c.len_utf8());
            if start < i && secret_field(&s[start..i]) {
                out.push('=');
                let mut j = i + 1;
                while j < s.len() && !stop(bytes[j]) {
                    j += 1;
                }
                if j > i + 1 {
                    out.push_str("[redacted]");
                }
                i = j;
                continue;
            }
        }
        let ch = rest.chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Whether a containment search names a redacted field (refused: it would let a reader
/// test guesses at a value it is not shown).
pub fn searches_secret(v: &Value) -> bool {
    // Whatever `redact` would change is not searchable.
    redact(v) != *v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_text_are_redacted() {
        assert_eq!(
            redact_text(
                "POST https://rpc.example/?api-key=abc123&x=1 failed: Bearer sk-9abcdefgh refused"
            ),
            "POST https://rpc.example/?api-key=[redacted]&x=1 failed: Bearer [redacted] refused"
        );
        assert_eq!(
            redact_text("token=t0k; author=ana"),
            "token=[redacted]; author=ana"
        );
        assert_eq!(redact_text("plain error, 3 = 3"), "plain error, 3 = 3");
        assert_eq!(
            redact_text("ünïcode secret=v é"),
            "ünïcode secret=[redacted] é"
        );
        // Multi-byte characters right before '=' (a chat message's text).
        assert_eq!(
            redact_text("größe=5 ß=1 €token=abc"),
            "größe=5 ß=1 €token=[redacted]"
        );
        assert_eq!(
            redact_text("the basic plan failed; max_tokens=4096"),
            "the basic plan failed; max_tokens=4096"
        );
        assert!(
            !secret_field("input_tokens")
                && !secret_field("max_tokens")
                && secret_field("refresh_token")
        );
        assert!(searches_secret(
            &serde_json::json!({"name": "x-api-key", "value": "guess"})
        ));
        assert!(searches_secret(
            &serde_json::json!({"url": "https://h/?token=guess"})
        ));
        assert!(searches_secret(
            &serde_json::json!({"a": {"X-Api-Key": "k"}})
        ));
        assert!(!searches_secret(
            &serde_json::json!({"user": 7, "author": "x"})
        ));
        assert_eq!(
            redact(
                &serde_json::json!([{"name": "x-api-key", "value": "k"}, {"url": "https://h/?token=z"}, "Bearer q1w2e3r4t5"])
            ),
            serde_json::json!([{"name": "x-api-key", "value": "[redacted]"}, {"url": "https://h/?token=[redacted]"}, "[redacted]"])
        );
    }

    #[test]
    fn secret_looking_fields_are_redacted_at_any_depth() {
        let v = serde_json::json!({
            "user": "ana", "API_KEY": "k", "nested": [{"refresh_token": "t", "n": 1}],
            "creds": {"Password": "p", "kind": "basic"}, "idempotency_key": "abc", "author": "x"
        });
        assert_eq!(
            redact(&v),
            serde_json::json!({
                "user": "ana", "API_KEY": "[redacted]", "nested": [{"refresh_token": "[redacted]", "n": 1}],
                "creds": {"Password": "[redacted]", "kind": "basic"}, "idempotency_key": "abc", "author": "x"
            })
        );
    }
}
