//! Logs and metrics: names of every series the runtime exports, the tracing subscriber,
//! and the Prometheus exporter.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::store::QueueStats;

// Every series is described for operators in docs/operations.md.

/// Gauge `{queue}`: messages visible now, waiting to be claimed.
pub const QUEUE_DEPTH: &str = "longshore_queue_depth";
/// Gauge `{queue}`: messages claimed, lease running.
pub const QUEUE_INFLIGHT: &str = "longshore_queue_inflight";
/// Gauge `{queue}`: messages not yet due (delayed, in backoff, snoozed).
pub const QUEUE_DELAYED: &str = "longshore_queue_delayed";
/// Gauge `{queue}`: age of the oldest visible message, seconds.
pub const QUEUE_OLDEST_AGE: &str = "longshore_queue_oldest_age_seconds";
/// Gauge `{queue}`: dead letters.
pub const DEAD_LETTERS: &str = "longshore_dead_letters";
/// Gauge `{queue}`: 1 while an operator has the queue paused, else 0.
pub const QUEUE_PAUSED: &str = "longshore_queue_paused";
/// Age of the oldest queue figures exported (they are counted once per interval for
/// the fleet; a count that keeps failing shows here).
pub const QUEUE_SAMPLE_AGE: &str = "longshore_queue_sample_age_seconds";
/// Counter `{queue,outcome}`: how runs ended (done, retry, snooze, fail, exhausted,
/// released, lapsed, lost, cancelled), and messages settled at claim without a run
/// (`exhausted`, `fail` when undecodable, `cancelled` by an operator). Jobs handed back unrun at a shutdown are
/// not counted.
pub const JOBS_TOTAL: &str = "longshore_jobs_total";
/// Histogram `{queue}`: how long a run took.
pub const JOB_DURATION: &str = "longshore_job_duration_seconds";
/// Histogram `{queue}`: from due to started, first attempts only.
pub const JOB_WAIT: &str = "longshore_job_wait_seconds";
/// Counter `{queue}`: fenced writes that changed nothing (another claim held the
/// message), and running jobs found no longer held.
pub const STALE_ACKS: &str = "longshore_stale_acks_total";
/// Runs cancelled because their lease could not be extended in time.
pub const LEASES_LAPSED: &str = "longshore_leases_lapsed_total";
/// Counter `{route,method,status}`: ingress requests answered.
pub const HTTP_REQUESTS: &str = "longshore_http_requests_total";
/// Histogram `{route}`: ingress request durations.
pub const HTTP_DURATION: &str = "longshore_http_request_duration_seconds";
/// Idle connections closed to make room for a new one at `ingress.max_connections`.
pub const HTTP_EVICTED: &str = "longshore_http_connections_evicted_total";
/// Connections refused because every open one was busy at the cap.
pub const HTTP_REFUSED: &str = "longshore_http_connections_refused_total";
/// Counter `{schedule,result}`: fires this process enqueued (`fired`) or found taken
/// by another replica (`taken`).
pub const SCHEDULE_FIRES: &str = "longshore_schedule_fires_total";

/// Keeps the per-queue gauges every `every` until `stop`. Every process that serves
/// `/metrics` runs one and exports the same figures (aggregate with `max by (queue)`),
/// but only one process per interval, fleet-wide, counts them ([`sample_once`]).
pub async fn sample_queues(pool: PgPool, every: Duration, stop: CancellationToken) {
    let mut exported = std::collections::BTreeSet::new();
    loop {
        // Raced with `stop`, so a server that does not answer cannot hold up a shutdown.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = sample_once(&pool, every) => match r {
                Ok(sample) => export(&sample, &mut exported),
                Err(e) => tracing::warn!(error = %e, "queue sample failed"),
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One statement of the sampler, in its own session (its own transaction through a
/// pooler: the election must commit before the count starts).
async fn run<T>(
    pool: &PgPool,
    f: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    crate::db::run(pool, crate::db::Deadline::Statement, f).await
}

/// What [`sample_once`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// This call did the counting (it was due and no other process had it).
    pub counted: bool,
    /// Queues whose count failed in this call (they keep their last figures).
    pub failed: Vec<String>,
    /// The figures of every queue (fresh or, for a failed count, the last ones).
    pub queues: Vec<QueueStats>,
    /// Age of the oldest figures in `queues`, seconds.
    pub age_seconds: f64,
}

/// The fleet's latest queue figures, counting them first if they are older than
/// `every`: one process per interval scans the queue tables, whatever the number of
/// replicas, and everyone else reads a small table (`longshore.queue_samples`). The
/// archives are never counted (no gauge exports them; `longshore queues` does).
///
/// The election is one committed statement (two processes updating the row at once:
/// the second re-checks it after the first commits and finds it not due), so the
/// process that counts holds no transaction, id or lock while it scans. Each queue is
/// counted and written on its own: one that fails (a statement timeout, a table gone)
/// keeps its last figures, and its age shows in `longshore_queue_sample_age_seconds`,
/// while the others are counted. A count that dies with its process loses one interval.
pub async fn sample_once(pool: &PgPool, every: Duration) -> Result<Sample, sqlx::Error> {
    // Due a little early: a sampler whose sleeps drift keeps the interval.
    let counted = run(pool, async |c| {
        sqlx::query_scalar::<_, bool>(
            r#"UPDATE longshore.queue_sampler SET sampled_at = now()
              WHERE id AND sampled_at <= now() - make_interval(secs => $1) RETURNING true"#,
        )
        .bind(every.as_secs_f64() * 0.9)
        .fetch_optional(c)
        .await
    })
    .await?
    .is_some();
    let mut failed = Vec::new();
    if counted {
        let names = run(pool, async |c| crate::store::existing_queues(c).await).await?;
        for q in &names {
            let Ok(name) = crate::queue_name::QueueName::parse(q) else {
                continue;
            };
            let sql = crate::enqueue::queue_sql(&name);
            let r = match run(pool, async |c| sql.gauges(c).await).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(queue = q, error = %e, "queue count failed; its gauges keep their last figures");
                    failed.push(q.clone());
                    continue;
                }
            };
            let write = sqlx::query(
                r#"INSERT INTO longshore.queue_samples AS s
                   (queue, visible, in_flight, delayed, oldest_age_seconds, dead_letters, sampled_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now())
                 ON CONFLICT (queue) DO UPDATE SET visible = excluded.visible, in_flight = excluded.in_flight,
                   delayed = excluded.delayed, oldest_age_seconds = excluded.oldest_age_seconds,
                   dead_letters = excluded.dead_letters, sampled_at = excluded.sampled_at"#,
            )
            .bind(&r.queue)
            .bind(r.visible)
            .bind(r.in_flight)
            .bind(r.delayed)
            .bind(r.oldest_age_seconds)
            .bind(r.dead_letters);
            run(pool, async |c| write.execute(c).await).await?;
        }
        run(pool, async |c| {
            sqlx::query("DELETE FROM longshore.queue_samples WHERE queue <> ALL ($1)")
                .bind(&names)
                .execute(c)
                .await
        })
        .await?;
    }
    let rows = run(pool, async |c| read_samples(c).await).await?;
    let age_seconds = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    let queues = rows.into_iter().map(|(s, _)| s).collect();
    Ok(Sample {
        counted,
        failed,
        queues,
        age_seconds,
    })
}

/// The fleet's latest queue figures (`longshore.queue_samples`) with each one's age in
/// seconds, by queue; the pause is read live (a small table), not sampled. The archive
/// is not counted (`archived` is 0).
pub async fn read_samples(
    c: &mut sqlx::PgConnection,
) -> Result<Vec<(QueueStats, f64)>, sqlx::Error> {
    let rows = sqlx::query_as::<_, (String, i64, i64, i64, f64, i64, f64, bool)>(
        r#"SELECT s.queue, s.visible, s.in_flight, s.delayed, s.oldest_age_seconds, s.dead_letters,
                extract(epoch FROM now() - s.sampled_at)::float8, coalesce(c.paused, false)
           FROM longshore.queue_samples s LEFT JOIN longshore.queue_controls c USING (queue)
          ORDER BY s.queue"#,
    )
    .fetch_all(c)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                queue,
                visible,
                in_flight,
                delayed,
                oldest_age_seconds,
                dead_letters,
                age,
                paused,
            )| {
                let s = QueueStats {
                    queue,
                    visible,
                    in_flight,
                    delayed,
                    oldest_age_seconds,
                    dead_letters,
                    archived: 0,
                    paused,
                };
                (s, age)
            },
        )
        .collect())
}

/// Sets the gauges of `sample`; a queue exported before and gone now (dropped) is set
/// to zero, so a fleet-wide `max` does not keep its last depth.
fn export(sample: &Sample, exported: &mut std::collections::BTreeSet<String>) {
    let now: std::collections::BTreeSet<String> =
        sample.queues.iter().map(|s| s.queue.clone()).collect();
    let gone = exported.difference(&now).cloned().map(|queue| QueueStats {
        queue,
        ..QueueStats::default()
    });
    for s in sample.queues.iter().cloned().chain(gone) {
        let q = s.queue;
        metrics::gauge!(QUEUE_DEPTH, "queue" => q.clone()).set(s.visible as f64);
        metrics::gauge!(QUEUE_INFLIGHT, "queue" => q.clone()).set(s.in_flight as f64);
        metrics::gauge!(QUEUE_DELAYED, "queue" => q.clone()).set(s.delayed as f64);
        metrics::gauge!(QUEUE_OLDEST_AGE, "queue" => q.clone()).set(s.oldest_age_seconds);
        metrics::gauge!(DEAD_LETTERS, "queue" => q.clone()).set(s.dead_letters as f64);
        metrics::gauge!(QUEUE_PAUSED, "queue" => q).set(if s.paused { 1.0 } else { 0.0 });
    }
    metrics::gauge!(QUEUE_SAMPLE_AGE).set(sample.age_seconds);
    *exported = now;
}

/// Installs the global tracing subscriber: JSON lines or readable text.
///
/// Text lines carry colours only on a terminal. Anywhere else (a file, a log pipeline)
/// every control character inside a line is escaped (`\n`, `\x1b`), so a value from a
/// job's args that reaches a log line through an error message cannot forge a line or
/// send escape sequences. On a terminal too, a newline or carriage return inside a
/// line is escaped (the formatter's colour sequences pass; tracing escapes ESC in
/// field values itself). JSON lines are escaped by the encoding itself.
pub fn init_logging(cfg: &LogConfig) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let tty = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(tty)
        .with_writer(move || Escaping {
            inner: std::io::stderr(),
            keep_ansi: tty,
        });
    // try_init: a second call (tests, `dev` calling into `worker`) is not an error.
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A writer that escapes control characters inside each written line (the formatter
/// writes one whole event per call; its final newline is kept).
struct Escaping<W> {
    inner: W,
    /// On a terminal: ESC passes (colours); line breaks are still escaped.
    keep_ansi: bool,
}

impl<W: std::io::Write> std::io::Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let escaped = |b: u8| b.is_ascii_control() && b != b'\n' && !(self.keep_ansi && b != b'\r');
        if !buf.iter().any(|&b| escaped(b)) && !inner_newline(buf) {
            return self.inner.write_all(buf).map(|_| buf.len());
        }
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b'\t'),
                b if b.is_ascii_control() && !self.keep_ansi => {
                    out.extend_from_slice(format!("\\x{b:02x}").as_bytes())
                }
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out).map(|_| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A newline before the last byte.
fn inner_newline(buf: &[u8]) -> bool {
    buf.len() > 1 && buf[..buf.len() - 1].contains(&b'\n')
}

/// The exporter's histogram buckets. Every histogram named `*_seconds` is a Prometheus
/// histogram (aggregatable across processes, as the alert rules need), the pipelines'
/// too; without buckets the exporter would make it a summary, whose quantiles cannot be
/// combined. A metric named in full takes its own buckets over the suffix's.
fn builder() -> Result<PrometheusBuilder, String> {
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), &latency))
        .map_err(|e| e.to_string())
}

/// Installs the Prometheus recorder; serves `/metrics` on `listen` when given.
pub fn init_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, String> {
    let mut b = builder()?;
    if let Some(addr) = listen {
        b = b.with_http_listener(addr);
        let (recorder, exporter) = b.build().map_err(|e| e.to_string())?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        tokio::spawn(exporter);
        Ok(handle)
    } else {
        b.install_recorder().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::Escaping;

    /// A pipeline's `*_seconds` histogram is exported with buckets (not as a summary),
    /// and the HTTP latency keeps its finer ones.
    #[test]
    fn seconds_histograms_have_buckets() {
        let recorder = super::builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("longshore_some_pipeline_seconds", "provider" => "p").record(7.0);
            metrics::histogram!(super::HTTP_DURATION).record(0.2);
            metrics::histogram!(super::JOB_WAIT).record(0.2);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"longshore_some_pipeline_seconds_bucket{provider="p",le="10"} 1"#),
            "{text}"
        );
        assert!(!text.contains("quantile="), "{text}");
        assert!(
            text.contains(r#"longshore_http_request_duration_seconds_bucket{le="30"} 1"#)
                && !text.contains(r#"longshore_http_request_duration_seconds_bucket{le="60"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"longshore_job_wait_seconds_bucket{le="300"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn control_characters_inside_a_line_are_escaped() {
        let mut w = Escaping {
            inner: Vec::new(),
            keep_ansi: false,
        };
        w.write_all(b"error=x\n2026 INFO forged\x1b[2J\tok\n")
            .unwrap();
        assert_eq!(w.inner, b"error=x\\n2026 INFO forged\\x1b[2J\tok\n");
        let mut plain = Escaping {
            inner: Vec::new(),
            keep_ansi: false,
        };
        plain.write_all("caf\u{e9} fine\n".as_bytes()).unwrap();
        assert_eq!(plain.inner, "caf\u{e9} fine\n".as_bytes());
        // A terminal: colours pass, forged lines do not.
        let mut tty = Escaping {
            inner: Vec::new(),
            keep_ansi: true,
        };
        tty.write_all(b"\x1b[32mINFO\x1b[0m a\nb\rc\n").unwrap();
        assert_eq!(tty.inner, b"\x1b[32mINFO\x1b[0m a\\nb\\rc\n");
    }
}
