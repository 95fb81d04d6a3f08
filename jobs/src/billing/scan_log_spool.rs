//! `scan_log_spool {dir}`: a scheduled tick that lists the spool directory and enqueues
//! one `ingest_logs {path}` per file. The idempotency key (path, size, mtime) keeps a
//! slow or repeated tick from enqueuing a file twice; the ingest itself is exactly once
//! by checksum either way. The enqueues commit with this job's acknowledgement.

use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, ResultExt, enqueue_on,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::config::BillingConfig;
use super::ingest_logs::IngestLogs;
use crate::files::ReadError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanLogSpool {
    pub dir: String,
    /// Files whose content is already ingested move here (created if missing), so the
    /// spool holds only work. A file leaves the spool only after its checksum is in
    /// `ingested_files`: its rows are committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_dir: Option<String>,
}

impl JobArgs for ScanLogSpool {
    const KIND: &'static str = "scan_log_spool";
}

/// A spool file moves to `done_dir` only once unmodified this long.
pub const MOVE_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

pub struct ScanLogSpoolHandler(pub std::sync::Arc<super::config::BillingConfig>);

impl Handler for ScanLogSpoolHandler {
    type Args = ScanLogSpool;

    fn check(&self, a: &ScanLogSpool) -> Result<(), String> {
        self.0.log_dirs.check(&a.dir)?;
        if let Some(d) = &a.done_dir {
            self.0.log_dirs.check(d)?;
        }
        Ok(())
    }

    async fn handle(&self, a: ScanLogSpool, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let mut entries = match tokio::fs::read_dir(&a.dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(JobError::fail(format!(
                    "spool directory {}: not found",
                    a.dir
                )));
            }
            Err(e) => return Err(JobError::retry(format!("spool directory {}: {e}", a.dir))),
        };
        let mut files: Vec<(String, u64, u128)> = Vec::new();
        while let Some(e) = entries.next_entry().await.retryable()? {
            let name = e.file_name().to_string_lossy().to_string();
            let meta = e.metadata().await.retryable()?;
            // Writers put `.tmp`/dot files down first and rename when complete.
            if !meta.is_file() || name.starts_with('.') || name.ends_with(".tmp") {
                continue;
            }
            let mtime = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            files.push((e.path().to_string_lossy().to_string(), meta.len(), mtime));
        }
        files.sort();
        let mut moved = 0;
        if let Some(done) = &a.done_dir {
            let mut left = Vec::with_capacity(files.len());
            // A file written within the quiet period may still be growing: it stays
            // (its new lines would otherwise leave with it, unread).
            let quiet_since = std::time::SystemTime::now()
                .checked_sub(MOVE_QUIET)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            for f in files {
                if f.2 > quiet_since {
                    left.push(f);
                    continue;
                }
                match ingested(ctx, &self.0, &f.0).await? {
                    None => continue, // gone: another scan moved it
                    Some(false) => left.push(f),
                    Some(true) => {
                        // Pinned directories (files.rs): a done_dir swapped for a link
                        // since the check cannot redirect the move.
                        let (roots, from, to) =
                            (self.0.log_dirs.clone(), f.0.clone(), done.clone());
                        let r = tokio::task::spawn_blocking(move || roots.rename_into(&from, &to))
                            .await
                            .unwrap_or_else(|e| Err(ReadError::Io(e.to_string())));
                        match r {
                            Ok(()) => moved += 1,
                            Err(ReadError::NotFound(_)) => {} // another scan moved it
                            // One file that cannot move must not stop the scan (and
                            // the enqueues of every other file).
                            Err(ReadError::Refused(m) | ReadError::Io(m)) => {
                                tracing::warn!(path = f.0, reason = m, "spool file not moved");
                            }
                        }
                    }
                }
            }
            files = left;
        }
        let mut enqueued = 0;
        for (path, len, mtime) in &files {
            let key = format!("spool:{path}:{len}:{mtime}");
            let args = IngestLogs {
                path: Some(path.clone()),
                lines: None,
                customers: None,
            };
            let e = enqueue_on(ctx.tx().await?, &args, EnqueueOptions::default().key(key))
                .await
                .retryable()?;
            enqueued += usize::from(!e.duplicate);
        }
        Outcome::done_with(json!({"files": files.len(), "enqueued": enqueued, "moved": moved}))
    }
}

/// Whether this file's content is committed in `ingested_files` (`None`: the file is
/// gone).
/// Read confined and bounded (files.rs): an entry swapped for a link since the listing,
/// or one too large, is left where it is (never moved) and its ingest reports why.
async fn ingested(
    ctx: &JobContext,
    cfg: &BillingConfig,
    path: &str,
) -> Result<Option<bool>, JobError> {
    let bytes = match cfg.read_log(path).await {
        Ok(b) => b,
        Err(ReadError::NotFound(_)) => return Ok(None),
        Err(ReadError::Refused(m)) => {
            tracing::warn!(path, reason = m, "spool entry not read");
            return Ok(Some(false));
        }
        Err(ReadError::Io(m)) => return Err(JobError::retry(m)),
    };
    let sha = hex::encode(Sha256::digest(&bytes));
    Ok(Some(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ingested_files WHERE sha256 = $1)")
            .bind(sha)
            .fetch_one(ctx.pool())
            .await?,
    ))
}
