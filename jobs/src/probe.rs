//! `probe`: a job kind for operators (check a deployment end to end), the benchmark and
//! the fault tests.
//!
//! Args: `{"id": i64, "sleep_ms"?: u64, "fail_times"?: u32, "effect"?: bool,
//! "hold_ms"?: u64, "panic"?: bool, "abort"?: bool, "block_ms"?: u64}`. It blocks its
//! thread `block_ms` (synchronous code that no cancellation reaches), sleeps `sleep_ms`, answers
//! `Retry` on its first `fail_times` attempts, panics on every attempt with `panic:
//! true`, kills its whole process with `abort: true` (`std::process::abort`, as an OOM
//! kill or a crash in native code would), and with `effect: true` inserts `id` into
//! `probe_effects(id primary key, attempt)` in its completion transaction, then holds
//! that transaction open `hold_ms`. The result says whether the effect was already there
//! (`duplicate`). Args that are not such an object are dead-lettered at once with the
//! parse error.
//!
//! **Execution trace** (`[probe] trace_dir`, for tests): every run appends `start` and,
//! however it ends (returned, cancelled, panicked), `end` lines to `runs.log` in that
//! directory, and holds an exclusive `flock` on `<id>.lock` while it runs. A run that
//! finds the lock taken (another run of the same job is executing right now, in this
//! process or another) appends to `overlaps.log`. This counts executions, not effects:
//! a second run whose effect is fenced out still shows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use longshore_workers::config::{Config, ConfigError};
use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_times: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<bool>,
    /// After writing the effect, hold the completion transaction open this long (so a
    /// test can kill the worker after the effect and before the acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// Panic on every attempt (the poison-message test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic: Option<bool>,
    /// Abort the whole process on every attempt (the crash-loop test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<bool>,
    /// Block its thread this long in synchronous code, deaf to cancellation (the
    /// stuck-handler test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ms: Option<u64>,
    /// While sleeping, watch the cancellation token and answer it with a retry, as a
    /// handler that stops an outside call does (`llm_call`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_cancel: Option<bool>,
}

impl JobArgs for Probe {
    const KIND: &'static str = "probe";
    const PUBLIC: bool = true;
}

impl Probe {
    pub fn new(id: i64) -> Self {
        Probe {
            id,
            sleep_ms: None,
            fail_times: None,
            effect: None,
            hold_ms: None,
            panic: None,
            abort: None,
            block_ms: None,
            answer_cancel: None,
        }
    }
}

/// `[probe]`: settings for tests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Where runs are traced (see the module docs); empty: not traced.
    #[serde(default)]
    pub trace_dir: String,
    /// The fault knobs (`hold_ms`, `panic`, `abort`, `block_ms`, `sleep_ms` above
    /// [`MAX_PLAIN_SLEEP_MS`]) work only when this is on: tests and `dev`. Off, a probe
    /// with one is refused at the door and dead-lettered if it got in anyway, so an
    /// operator's probe can neither hold connections nor kill a worker.
    #[serde(default)]
    pub fault_knobs: bool,
}

/// The longest `sleep_ms` a probe may ask for with the fault knobs off.
pub const MAX_PLAIN_SLEEP_MS: u64 = 1_000;

#[derive(Default)]
pub struct ProbeHandler {
    trace_dir: Option<PathBuf>,
    fault_knobs: bool,
}

impl ProbeHandler {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        let c: ProbeConfig = if cfg.raw_section("probe").is_null() {
            ProbeConfig::default()
        } else {
            cfg.section("probe")?
        };
        let trace_dir = (!c.trace_dir.is_empty()).then(|| PathBuf::from(c.trace_dir));
        if let Some(d) = &trace_dir {
            std::fs::create_dir_all(d).map_err(|e| ConfigError::Invalid {
                key: "probe.trace_dir".into(),
                message: e.to_string(),
            })?;
        }
        Ok(ProbeHandler {
            trace_dir,
            fault_knobs: c.fault_knobs,
        })
    }
}

/// One traced run: `start` now, `end` when dropped, the job's lock held meanwhile.
struct Trace {
    dir: PathBuf,
    line: String,
    _lock: Option<std::fs::File>,
}

impl Trace {
    fn begin(dir: &Path, id: i64, attempt: u32) -> Trace {
        let line = format!("{id} {attempt} {}", std::process::id());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{id}.lock")))
            .ok();
        let held = match &lock {
            Some(f) => f.try_lock().is_ok(),
            None => false,
        };
        if !held {
            append(dir, "overlaps.log", &line);
        }
        append(dir, "runs.log", &format!("start {line}"));
        Trace {
            dir: dir.to_path_buf(),
            line,
            _lock: lock.filter(|_| held),
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        append(&self.dir, "runs.log", &format!("end {}", self.line));
    }
}

/// One line, in one `write` with `O_APPEND`, so lines of concurrent runs never mix.
fn append(dir: &Path, file: &str, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
    {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

impl Handler for ProbeHandler {
    type Args = Probe;
    const POOLER_SAFE: bool = true;

    fn check(&self, a: &Probe) -> Result<(), String> {
        if self.fault_knobs {
            return Ok(());
        }
        let knob = [
            ("hold_ms", a.hold_ms.is_some()),
            ("panic", a.panic.is_some()),
            ("abort", a.abort.is_some()),
            ("block_ms", a.block_ms.is_some()),
            (
                "sleep_ms",
                a.sleep_ms.is_some_and(|ms| ms > MAX_PLAIN_SLEEP_MS),
            ),
        ]
        .into_iter()
        .find(|(_, set)| *set);
        match knob {
            None => Ok(()),
            Some((k, _)) => Err(format!(
                "{k} is a fault knob for tests (sleep_ms up to {MAX_PLAIN_SLEEP_MS} is fine); it works only with probe.fault_knobs = true"
            )),
        }
    }

    async fn handle(&self, args: Probe, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let _trace = self
            .trace_dir
            .as_deref()
            .map(|d| Trace::begin(d, args.id, ctx.attempt));
        if args.abort == Some(true) {
            tracing::error!(id = args.id, "probe asked to abort its process");
            std::process::abort();
        }
        if let Some(ms) = args.block_ms.filter(|ms| *ms > 0) {
            // Stuck in synchronous code, as badly as real code gets stuck: it blocks its
            // runtime thread (and any task waiting in that thread's queue), and no
            // cancellation reaches it. The lease keeper has a thread of its own.
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(ms) = args.sleep_ms.filter(|ms| *ms > 0) {
            let sleep = tokio::time::sleep(Duration::from_millis(ms));
            if args.answer_cancel == Some(true) {
                tokio::select! {
                    _ = sleep => {}
                    _ = ctx.cancel.cancelled() => {
                        return Err(JobError::retry(format!("probe {} stopped: cancelled", args.id)));
                    }
                }
            } else {
                sleep.await;
            }
        }
        if args.panic == Some(true) {
            panic!("probe {} asked to panic", args.id);
        }
        if ctx.attempt <= args.fail_times.unwrap_or(0) {
            return Err(JobError::retry(format!(
                "probe {} fails on attempt {} of its first {}",
                args.id,
                ctx.attempt,
                args.fail_times.unwrap_or(0)
            )));
        }
        let mut duplicate = false;
        if args.effect == Some(true) {
            // The natural key makes the effect idempotent: a duplicate delivery of the
            // same id (RELIABILITY row 7) finds it written and changes nothing.
            let attempt = ctx.attempt as i32;
            let written = sqlx::query(
                "INSERT INTO probe_effects (id, attempt) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(args.id)
            .bind(attempt)
            .execute(ctx.tx().await?)
            .await?
            .rows_affected();
            duplicate = written == 0;
            if let Some(ms) = args.hold_ms.filter(|ms| *ms > 0) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Outcome::done_with(json!({"id": args.id, "attempt": ctx.attempt, "duplicate": duplicate}))
    }
}
