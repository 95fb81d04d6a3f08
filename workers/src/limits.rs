//! Fleet-wide rate limits (issue 20, groundwork): one PostgreSQL row per key (GCRA; see
//! the `rate_limits` migration), so every replica shares one budget. A take is one
//! statement on an autocommit connection; it holds the key's row lock only for that
//! statement.
//!
//! Not wired into the pipelines yet: the Cryptometer client, the chat caps and the
//! ingress's per-token limits are still per process (issue 20 lists them).

use std::time::Duration;

use sqlx::PgPool;

use crate::db::{self, Deadline};

/// One slot per `every`, with `burst` slots of slack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// The emission interval: the sustained rate is one per `every`.
    pub every: Duration,
    /// Slots that may be taken at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// `n` per `period`, burst `burst`.
    pub fn per(n: u32, period: Duration, burst: u32) -> RateLimit {
        RateLimit {
            every: period / n.max(1),
            burst: burst.max(1),
        }
    }
}

/// Takes one slot of `key`: `None` when taken, else how long until one can be.
pub async fn take(
    pool: &PgPool,
    key: &str,
    limit: RateLimit,
) -> Result<Option<Duration>, sqlx::Error> {
    let wait: f64 = db::run(pool, Deadline::Statement, async |c| {
        sqlx::query_scalar("SELECT longshore.rate_take($1, $2, $3)")
            .bind(key)
            .bind(limit.every.as_secs_f64())
            .bind(i32::try_from(limit.burst).unwrap_or(i32::MAX))
            .fetch_one(c)
            .await
    })
    .await?;
    Ok((wait > 0.0).then(|| Duration::from_secs_f64(wait)))
}

/// Waits until a slot of `key` is taken (sleeping what the limiter says between tries).
pub async fn until_ready(pool: &PgPool, key: &str, limit: RateLimit) -> Result<(), sqlx::Error> {
    while let Some(wait) = take(pool, key, limit).await? {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}
