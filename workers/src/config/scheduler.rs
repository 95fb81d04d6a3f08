//! `[scheduler]` and `[[schedules]]`: cron schedules and their checks.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};
use crate::queue_name::QueueName;

#[derive(Debug, Clone, Deserialize, Serialize)]
/// `[scheduler]`: the scheduler process.
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Port for `/metrics` of a scheduler process; 0 = do not serve.
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
/// One `[[schedules]]` entry: a job enqueued on a cron, each fire exactly once across
/// scheduler replicas.
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique; the fence of its fires, so renaming a schedule starts it afresh.
    pub name: String,
    /// Cron with seconds: `sec min hour day-of-month month day-of-week [year]`.
    pub cron: String,
    /// The queue (job kind) each fire enqueues to.
    pub queue: String,
    /// The job's arguments; they must decode as the kind's args (checked when an enabled
    /// schedule is compiled: by the scheduler and `longshore dev` at start).
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// IANA time zone the cron is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    /// After downtime: `skip` missed fires, or enqueue the `latest` one.
    #[serde(default)]
    pub missed: Missed,
    /// A disabled schedule never fires; only its form (name, cron, time zone) is checked.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}
fn utc() -> String {
    "UTC".into()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
/// What a schedule does about fires that fell in a downtime.
pub enum Missed {
    /// Enqueue none of them; the next fire is the next one due.
    #[default]
    Skip,
    /// Enqueue the most recent missed fire once, then go on.
    Latest,
}

impl Config {
    pub(super) fn validate_schedules(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (n, s) in self.schedules.iter().enumerate() {
            let key = |f: &str| format!("schedules[{n}].{f}");
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{:?} is empty or not unique", s.name),
                ));
            }
            s.cron
                .parse::<cron::Schedule>()
                .map_err(|e| ConfigError::invalid(key("cron"), format!("{:?}: {e}", s.cron)))?;
            s.timezone
                .parse::<chrono_tz::Tz>()
                .map_err(|e| ConfigError::invalid(key("timezone"), e.to_string()))?;
            QueueName::parse(&s.queue)
                .map_err(|e| ConfigError::invalid(key("queue"), e.to_string()))?;
            if !s.args.is_object() {
                return Err(ConfigError::invalid(
                    key("args"),
                    "must be a table (JSON object)",
                ));
            }
        }
        Ok(())
    }
}
