//! The scheduler: cron schedules from config, each fire recorded as a unique
//! `(schedule, fire_at)` row in the same transaction as its enqueue, so any number of
//! scheduler replicas fire each tick exactly once, with no leader and no host identity.
//!
//! Missed fires (the schedulers were all down): `skip` waits for the next tick;
//! `latest` enqueues the most recent missed one at start. A scheduler that stalls while
//! running (paused, or a fire that retried past later ticks) never fires the burst it
//! slept through: with `skip` none of those ticks, with `latest` the latest once.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Missed, ScheduleConfig};
use crate::enqueue::queue_sql;
use crate::queue_name::QueueName;
use crate::registry::Registry;
use crate::store;
use crate::telemetry as t;

/// Why a schedule was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule {0:?}: {1}")]
    /// The schedule (by name) and what is wrong with it.
    Invalid(String, String),
}

/// A schedule ready to run.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The schedule's name, unique in the configuration.
    pub name: String,
    cron: cron::Schedule,
    tz: Tz,
    queue: QueueName,
    args: Value,
    missed: Missed,
}

impl Schedule {
    /// Checks a configured schedule against the registry: its queue must be a known
    /// kind and its args must fit that kind.
    pub fn compile(c: &ScheduleConfig, registry: &Registry) -> Result<Schedule, ScheduleError> {
        let bad = |m: String| ScheduleError::Invalid(c.name.clone(), m);
        let cron = cron::Schedule::from_str(&c.cron)
            .map_err(|e| bad(format!("cron {:?}: {e}", c.cron)))?;
        let tz = c.timezone.parse::<Tz>().map_err(|e| bad(e.to_string()))?;
        let queue = QueueName::parse(&c.queue).map_err(|e| bad(e.to_string()))?;
        registry
            .validate(queue.as_str(), &c.args)
            .map_err(|e| bad(format!("args for {queue}: {e}")))?;
        Ok(Schedule {
            name: c.name.clone(),
            cron,
            tz,
            queue,
            args: c.args.clone(),
            missed: c.missed,
        })
    }

    /// The queue it enqueues to.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }

    /// Its cron expression and time zone, as configured.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.cron, self.tz)
    }

    /// The first fire strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .after(&t.with_timezone(&self.tz))
            .next()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest fire in `(after, until]`, if any.
    pub fn latest_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.cron
            .after(&after.with_timezone(&self.tz))
            .map(|d| d.with_timezone(&Utc))
            .take_while(|d| *d <= until)
            .last()
    }
}

/// Runs every schedule until `stop`.
pub async fn run(pool: PgPool, schedules: Vec<Schedule>, stop: CancellationToken) {
    let mut tasks = JoinSet::new();
    info!(schedules = ?schedules.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), "scheduler started");
    for s in schedules {
        tasks.spawn(run_one(pool.clone(), s, stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
    info!("scheduler stopped");
}

async fn run_one(pool: PgPool, s: Schedule, stop: CancellationToken) {
    if s.missed == Missed::Latest {
        // Retry until the database answers: the missed fire is worth the wait.
        let mut tries = 0;
        let last = loop {
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                r = crate::db::run(&pool, crate::db::Deadline::Statement, async |c| {
                    store::last_fire(c, &s.name).await
                }) => r,
            };
            match read {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    warn!(schedule = s.name, error = %e, "cannot read the last fire");
                    let wait = crate::backoff::delay(
                        tries,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        if let Some(missed) = last.and_then(|l| s.latest_between(l, Utc::now())) {
            info!(schedule = s.name, fire_at = %missed, "enqueuing the latest missed fire");
            fire(&pool, &s, missed, &stop).await;
        }
    }
    let mut after = Utc::now();
    loop {
        let Some(at) = s.next_after(after) else {
            info!(schedule = s.name, "no further fires");
            return;
        };
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // After a stall (this process paused, a database outage outlasting a tick),
        // several ticks may be due at once: never a burst. `skip` fires none of the
        // ticks it slept through (as after downtime); `latest` fires the latest once.
        let due = s.latest_between(after, Utc::now()).unwrap_or(at);
        if due != at {
            match s.missed {
                Missed::Skip => {
                    info!(schedule = s.name, from = %at, to = %due, "ticks passed while the scheduler stalled; skipped (missed = \"skip\")");
                    after = due;
                    continue;
                }
                Missed::Latest => {
                    info!(schedule = s.name, from = %at, fired = %due, "ticks passed while the scheduler stalled; firing the latest only");
                }
            }
        }
        fire(&pool, &s, due, &stop).await;
        after = due;
    }
}

/// Fires `at` once across all replicas. Retries database errors until the next tick
/// is due; past that, this fire is given up (another replica may have made it).
async fn fire(pool: &PgPool, s: &Schedule, at: DateTime<Utc>, stop: &CancellationToken) {
    let give_up = s
        .next_after(at)
        .unwrap_or(at + chrono::Duration::minutes(1));
    let sql = queue_sql(&s.queue);
    let mut tries = 0;
    loop {
        let attempt = async {
            let mut tx = crate::db::begin(pool, crate::db::Deadline::Statement).await?;
            let id = store::fire_schedule(&mut tx, &sql, &s.name, at, &s.args).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(id)
        };
        // Raced with `stop`: a database that does not answer must not hold up a
        // shutdown (an unfinished fire rolls back; another replica or the next start
        // makes it, per the missed-fire policy).
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        match r {
            Ok(Some(id)) => {
                metrics::counter!(t::SCHEDULE_FIRES, "schedule" => s.name.clone(), "result" => "fired").increment(1);
                info!(schedule = s.name, fire_at = %at, id, queue = %s.queue, "fired");
                return;
            }
            Ok(None) => {
                metrics::counter!(t::SCHEDULE_FIRES, "schedule" => s.name.clone(), "result" => "taken").increment(1);
                return;
            }
            Err(e) => {
                tries += 1;
                if Utc::now() >= give_up {
                    warn!(schedule = s.name, fire_at = %at, error = %e, "fire given up; the next tick is due");
                    return;
                }
                let wait = crate::backoff::delay(
                    tries,
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                );
                warn!(schedule = s.name, error = %e, retry_in = ?wait, "fire failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cron: &str, tz: &str) -> Schedule {
        Schedule {
            name: "t".into(),
            cron: cron::Schedule::from_str(cron).unwrap(),
            tz: tz.parse().unwrap(),
            queue: QueueName::parse("probe").unwrap(),
            args: serde_json::json!({}),
            missed: Missed::Skip,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn seconds_and_time_zones() {
        let every_second = sched("* * * * * *", "UTC");
        assert_eq!(
            every_second.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:00:01Z"))
        );
        // 09:00 in New York is 14:00 UTC in winter, 13:00 UTC in summer.
        let nine = sched("0 0 9 * * *", "America/New_York");
        assert_eq!(
            nine.next_after(at("2026-01-15T00:00:00Z")),
            Some(at("2026-01-15T14:00:00Z"))
        );
        assert_eq!(
            nine.next_after(at("2026-07-15T00:00:00Z")),
            Some(at("2026-07-15T13:00:00Z"))
        );
    }

    #[test]
    fn latest_missed_fire() {
        let five = sched("0 */5 * * * *", "UTC");
        assert_eq!(
            five.latest_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:17:30Z")),
            Some(at("2026-01-01T00:15:00Z"))
        );
        assert_eq!(
            five.latest_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:04:59Z")),
            None
        );
    }
}
