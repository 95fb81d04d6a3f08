//! `ingest_logs {path}` or `{lines}`: HAProxy log lines into `haproxy_logs`, with COPY.
//!
//! Exactly once per file: its SHA-256 goes into `ingested_files` in the same transaction
//! as its rows (the job's completion transaction), so a re-ingest, a retry or a second
//! job for the same file inserts nothing. Malformed lines are counted, reported (file,
//! line, reason) in the job's result and in `longshore_log_lines_malformed_total`, and
//! never stop the rest of the file.
//!
//! Ingests hold a shared advisory lock that `aggregate_usage` takes exclusively, so the
//! aggregation's watermark never passes an id whose row has not committed yet.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use super::haproxy::{LogRecord, parse_line};
use crate::files::ReadError;

/// At most this many malformed lines are listed in a job's result (all are counted).
const MAX_REPORTED: usize = 100;

/// `POST /v1/logs`, the ingress route of this kind: raw HAProxy lines as text (one per
/// line; blank lines ignored) → one `ingest_logs {lines}` job, for a token with the
/// `logs` scope only (billable usage is the log shipper's to post). A token restricted
/// to some customers passes them on (`customers`), and only their lines are ingested.
/// Re-posting the same content ingests nothing twice.
pub fn log_route() -> longshore_workers::ingress::TextRoute {
    longshore_workers::ingress::TextRoute {
        path: "/v1/logs",
        scope: "logs",
        queue: <IngestLogs as JobArgs>::KIND,
        to_args: log_args,
        openapi: include_str!("logs_route.openapi.json"),
    }
}

fn log_args(
    text: &str,
    caller: longshore_workers::ingress::Caller<'_>,
) -> Result<serde_json::Value, longshore_workers::ingress::Refusal> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(longshore_workers::ingress::Refusal::Empty(
            "the body has no log lines".into(),
        ));
    }
    let mut args = json!({ "lines": lines });
    if let Some(c) = caller.customers {
        args["customers"] = json!(c);
    }
    Ok(args)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestLogs {
    /// A file to read (from the spool directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Or the lines themselves (a batch POSTed through the ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<String>>,
    /// The only customers whose lines are accepted (the posting token's allowlist);
    /// others are counted as malformed with the reason. Unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customers: Option<Vec<i64>>,
}

impl JobArgs for IngestLogs {
    const KIND: &'static str = "ingest_logs";
}

/// What an ingest did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestReport {
    pub source: String,
    pub sha256: String,
    pub lines: usize,
    pub inserted: usize,
    pub malformed: usize,
    /// Good lines already stored (from an earlier file, batch or re-cut, or twice in
    /// this one): not inserted again, so not billed again.
    #[serde(default)]
    pub duplicates: usize,
    /// The first malformed lines: `{file, line, reason}`.
    pub errors: Vec<serde_json::Value>,
    /// True when this content had been ingested before (nothing inserted).
    pub already_ingested: bool,
}

pub struct IngestLogsHandler(pub std::sync::Arc<super::config::BillingConfig>);

impl Handler for IngestLogsHandler {
    type Args = IngestLogs;

    fn check(&self, a: &IngestLogs) -> Result<(), String> {
        match &a.path {
            Some(p) => self.0.log_dirs.check(p).map(|_| ()),
            None => Ok(()),
        }
    }

    async fn handle(&self, a: IngestLogs, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let allowed = a.customers;
        let (source, bytes) = match (a.path, a.lines) {
            (Some(p), None) => {
                // Confined at the open, bounded in size (files.rs).
                match self.0.read_log(&p).await {
                    Ok(mut b) => {
                        // A file still being written may end inside a line: that line
                        // waits for its newline (the next scan sees the file changed),
                        // or it would be stored cut and again whole.
                        let complete = complete_lines(&b);
                        if complete < b.len() {
                            tracing::debug!(
                                path = p,
                                held = b.len() - complete,
                                "an unterminated last line waits for its newline"
                            );
                            b.truncate(complete);
                        }
                        (p, b)
                    }
                    Err(ReadError::NotFound(m) | ReadError::Refused(m)) => {
                        return Err(JobError::fail(m));
                    }
                    Err(ReadError::Io(m)) => return Err(JobError::retry(m)),
                }
            }
            (None, Some(lines)) => ("batch".to_string(), lines.join("\n").into_bytes()),
            _ => return Err(JobError::fail("give exactly one of path and lines")),
        };
        let report = ingest_from(
            ctx.tx().await?,
            &source,
            &bytes,
            allowed.as_deref(),
            self.0.haproxy_utc_offset,
        )
        .await?;
        if report.malformed > 0 {
            tracing::warn!(
                source = report.source,
                malformed = report.malformed,
                "malformed log lines"
            );
        }
        Outcome::done_with(report)
    }
}

/// Parses `bytes` and stores the good lines, in the caller's transaction.
pub async fn ingest(
    tx: &mut PgConnection,
    source: &str,
    bytes: &[u8],
) -> Result<IngestReport, sqlx::Error> {
    let utc = chrono::FixedOffset::east_opt(0).expect("zero is an offset");
    ingest_from(tx, source, bytes, None, utc).await
}

/// [`ingest`], accepting only lines of the `allowed` customers (when given), whose
/// accept dates are local time at `offset` (`billing.haproxy_utc_offset`).
pub async fn ingest_from(
    tx: &mut PgConnection,
    source: &str,
    bytes: &[u8],
    allowed: Option<&[i64]>,
    offset: chrono::FixedOffset,
) -> Result<IngestReport, sqlx::Error> {
    let shift = chrono::TimeDelta::seconds(i64::from(offset.local_minus_utc()));
    // The whole-content key that skips a repeat at once. Read under an allowlist, the
    // same bytes are another ingest (lines of other customers were refused): keyed
    // apart, so a later unrestricted ingest of them is not skipped as seen.
    let sha = {
        let mut h = Sha256::new();
        h.update(bytes);
        if let Some(a) = allowed {
            let mut ids = a.to_vec();
            ids.sort_unstable();
            h.update(format!("\0allowed:{ids:?}").as_bytes());
        }
        h.finalize()
    };
    // Each row names its file by the key's first 8 bytes (the whole 64-character
    // checksum on every row was a third of the row, and of the COPY's time).
    let file_key = i64::from_be_bytes(sha[..8].try_into().expect("8 of 32 bytes"));
    let sha = hex::encode(sha);
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(crate::locks::INGEST)
        .execute(&mut *tx)
        .await?;
    let seen: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ingested_files WHERE sha256 = $1)")
            .bind(&sha)
            .fetch_one(&mut *tx)
            .await?;
    let mut report = IngestReport {
        source: source.to_string(),
        sha256: sha.clone(),
        lines: 0,
        inserted: 0,
        malformed: 0,
        duplicates: 0,
        errors: Vec::new(),
        already_ingested: seen,
    };
    if seen {
        return Ok(report);
    }
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    report.lines = lines.len();
    let mut good: Vec<(usize, LogRecord)> = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        match parse_line(raw) {
            Ok(r) if allowed.is_some_and(|a| !a.contains(&i64::from(r.customer_id))) => {
                report.malformed += 1;
                if report.errors.len() < MAX_REPORTED {
                    report.errors.push(json!({"file": source, "line": i + 1,
                        "reason": format!("customer {} is not one this log source may report", r.customer_id)}));
                }
            }
            Ok(mut r) => {
                r.ts -= shift; // local → UTC
                good.push((i + 1, r));
            }
            Err(e) => {
                report.malformed += 1;
                if report.errors.len() < MAX_REPORTED {
                    report
                        .errors
                        .push(json!({"file": source, "line": i + 1, "reason": e.to_string()}));
                }
            }
        }
    }
    metrics::counter!(crate::telemetry::LOG_LINES_MALFORMED).increment(report.malformed as u64);

    // In key order: index inserts land near each other, and two ingests of overlapping
    // lines take their keys in one order (they wait, never deadlock). The same line
    // twice in this batch sorts side by side (its key fixes its timestamp) and is kept
    // once, at its first line number. Sorted by index, not by moving the records.
    let mut order: Vec<(DateTime<Utc>, u128, u32)> = good
        .iter()
        .enumerate()
        // Big-endian: the integer orders as the uuid's bytes do in PostgreSQL.
        .map(|(at, (_, r))| (r.ts, u128::from_be_bytes(r.key), at as u32))
        .collect();
    order.sort_unstable();
    order.dedup_by(|b, a| a.1 == b.1);
    report.duplicates += good.len() - order.len();

    let days: BTreeSet<NaiveDate> = order.iter().map(|(ts, _, _)| ts.date_naive()).collect();
    for d in days {
        ensure_partition(tx, d).await?;
    }
    if !order.is_empty() {
        let mut rows = CopyRows::with_capacity(order.len());
        for (_, _, at) in &order {
            let (line_no, r) = &good[*at as usize];
            rows.push(r, file_key, *line_no);
        }
        report.inserted = store_lines(tx, &rows.finish(), order.len()).await?;
        report.duplicates += order.len() - report.inserted;
    }
    metrics::counter!(crate::telemetry::LOG_LINES_INGESTED).increment(report.inserted as u64);
    metrics::counter!(crate::telemetry::LOG_LINES_DUPLICATE).increment(report.duplicates as u64);
    sqlx::query("INSERT INTO ingested_files (sha256, source, lines, inserted, malformed) VALUES ($1, $2, $3, $4, $5)")
        .bind(&sha)
        .bind(source)
        .bind(report.lines as i32)
        .bind(report.inserted as i32)
        .bind(report.malformed as i32)
        .execute(&mut *tx)
        .await?;
    Ok(report)
}

const COLUMNS: &str = r#"ts, customer_id, service_type, method, status_code, bytes_out,
                       duration_ms, client_ip, backend, server, file_key, line_no, line_key"#;

/// Stores `n` COPY rows, each line once; how many were new. The common case (no line
/// seen before) is one COPY straight into the table, whose unique key refuses the
/// whole batch if any line is already there; only then (a re-read, a re-cut, a retried
/// POST) do the rows go through a session-local staging table and an `INSERT ... ON
/// CONFLICT DO NOTHING`, several times slower, that keeps the new ones.
async fn store_lines(tx: &mut PgConnection, rows: &[u8], n: usize) -> Result<usize, sqlx::Error> {
    sqlx::query("SAVEPOINT ingest_lines")
        .execute(&mut *tx)
        .await?;
    match copy_rows(tx, "haproxy_logs", rows).await {
        Ok(()) => {
            sqlx::query("RELEASE SAVEPOINT ingest_lines")
                .execute(&mut *tx)
                .await?;
            return Ok(n);
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT ingest_lines")
                .execute(&mut *tx)
                .await?;
        }
        Err(e) => return Err(e),
    }
    let staged: bool = sqlx::query_scalar("SELECT to_regclass('pg_temp.ingest_stage') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if staged {
        // Emptied at every commit; this is for a second batch in one transaction.
        sqlx::query("TRUNCATE ingest_stage")
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::query(
            r#"CREATE TEMP TABLE ingest_stage (ts timestamptz, customer_id integer,
               service_type text, method text, status_code smallint, bytes_out bigint,
               duration_ms integer, client_ip text, backend text, server text,
               file_key bigint, line_no integer, line_key uuid) ON COMMIT DELETE ROWS"#,
        )
        .execute(&mut *tx)
        .await?;
    }
    copy_rows(tx, "ingest_stage", rows).await?;
    let inserted = sqlx::query(&format!(
        r#"INSERT INTO haproxy_logs ({COLUMNS}) SELECT {COLUMNS} FROM ingest_stage
         ORDER BY ts, line_key ON CONFLICT (ts, line_key) WHERE line_key IS NOT NULL DO NOTHING"#
    ))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted as usize)
}

async fn copy_rows(tx: &mut PgConnection, table: &str, rows: &[u8]) -> Result<(), sqlx::Error> {
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(rows).await?;
    copy.finish().await?;
    Ok(())
}

/// How many leading bytes of `b` are whole lines (up to and with the last newline).
pub fn complete_lines(b: &[u8]) -> usize {
    b.iter().rposition(|c| *c == b'\n').map_or(0, |i| i + 1)
}

/// Rows in COPY's binary format (PostgreSQL's `COPY ... (FORMAT binary)`: a signature,
/// then per row a field count and each field as a length and its bytes in the type's
/// binary form), in [`COLUMNS`] order. Binary, not text: no timestamp, number or uuid
/// is formatted here or parsed by the server (a quarter of the ingest's CPU in text),
/// and no value needs escaping. sqlx has no encoder for it and tokio-postgres's is
/// tied to its own client, so these few lines are ours; `binary_rows_are_what_postgres_reads`
/// checks them against the server.
struct CopyRows(Vec<u8>);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl CopyRows {
    fn with_capacity(rows: usize) -> Self {
        let mut b = Vec::with_capacity(19 + rows * 140 + 2);
        b.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        b.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        b.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        CopyRows(b)
    }

    fn push(&mut self, r: &LogRecord, file_key: i64, line_no: usize) {
        let b = &mut self.0;
        b.extend_from_slice(&13i16.to_be_bytes());
        let int8 = |b: &mut Vec<u8>, v: i64| {
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&v.to_be_bytes());
        };
        let int4 = |b: &mut Vec<u8>, v: i32| {
            b.extend_from_slice(&4i32.to_be_bytes());
            b.extend_from_slice(&v.to_be_bytes());
        };
        let text = |b: &mut Vec<u8>, v: &str| {
            // A field is part of one line of a file under max_log_file_bytes (< 2 GiB).
            let len = i32::try_from(v.len()).expect("a field shorter than its file");
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        };
        int8(b, r.ts.timestamp_micros() - PG_EPOCH_MICROS);
        int4(b, r.customer_id);
        text(b, &r.service_type);
        text(b, &r.method);
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(&r.status_code.to_be_bytes());
        int8(b, r.bytes_out);
        match r.duration_ms {
            Some(d) => int4(b, d),
            None => b.extend_from_slice(&(-1i32).to_be_bytes()), // NULL
        }
        text(b, &r.client_ip);
        text(b, &r.backend);
        text(b, &r.server);
        int8(b, file_key);
        // A file under max_log_file_bytes (< 2 GiB) has fewer than 2^31 lines.
        int4(b, i32::try_from(line_no).expect("a line number within i32"));
        b.extend_from_slice(&16i32.to_be_bytes());
        b.extend_from_slice(&r.key);
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

/// Partition name of a day: `haproxy_logs_YYYYMMDD`.
pub fn partition_name(d: NaiveDate) -> String {
    format!("haproxy_logs_{:04}{:02}{:02}", d.year(), d.month(), d.day())
}

async fn ensure_partition(tx: &mut PgConnection, d: NaiveDate) -> Result<(), sqlx::Error> {
    let name = partition_name(d);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Ok(());
    }
    // Serialise creators of the same partition.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))")
        .bind(&name)
        .bind(crate::locks::LOG_PARTITION_SEED)
        .execute(&mut *tx)
        .await?;
    let from: DateTime<Utc> = d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let to = from + Duration::days(1);
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF haproxy_logs FOR VALUES FROM ('{}') TO ('{}')",
        from.to_rfc3339(),
        to.to_rfc3339()
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use longshore_workers::ingress::{Caller, Refusal};

    use super::*;

    #[test]
    fn the_log_route_keeps_every_non_blank_line_and_the_tokens_customers() {
        let all = Caller { customers: None };
        assert_eq!(
            log_args("a\n\n  \nb \r\n", all).unwrap(),
            json!({"lines": ["a", "b "]})
        );
        let some = Caller {
            customers: Some(&[1001, 1002]),
        };
        assert_eq!(
            log_args("a", some).unwrap(),
            json!({"lines": ["a"], "customers": [1001, 1002]})
        );
        assert!(matches!(log_args(" \n\t\n", all), Err(Refusal::Empty(_))));
        // The args it makes are what the kind accepts.
        let args: IngestLogs = serde_json::from_value(log_args("x", some).unwrap()).unwrap();
        assert_eq!(args.lines, Some(vec!["x".to_string()]));
        assert_eq!(args.customers, Some(vec![1001, 1002]));
    }
}
