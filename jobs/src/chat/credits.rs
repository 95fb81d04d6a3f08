//! Credits: a ledger per user (`credits_ledger`, balance = Σ delta), prices per
//! provider, tier limits, the checks made before a call and the charge made after it.
//!
//! A charge is exactly once per `request_id` (a unique index) and never takes a balance
//! below zero: charges of one user are serialised on the user's `credit_accounts` row
//! (`FOR UPDATE`), the balance is summed under that lock, and the row is inserted only
//! if it covers the cost.

use std::collections::BTreeMap;

use longshore_workers::config::{Config, ConfigError};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// Credits per 1,000 tokens, and the minimum per call.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    pub minimum: Decimal,
}

impl Price {
    /// `ceil(in/1000 × input + out/1000 × output + minimum)`, in exact decimals.
    pub fn credits(&self, input_tokens: u32, output_tokens: u32) -> i64 {
        let k = Decimal::from(1000);
        let c = Decimal::from(input_tokens) / k * self.input
            + Decimal::from(output_tokens) / k * self.output
            + self.minimum;
        i64::try_from(c.ceil()).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Pro,
    Enterprise,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "free" => Some(Tier::Free),
            "pro" => Some(Tier::Pro),
            "enterprise" => Some(Tier::Enterprise),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    pub free: u32,
    pub pro: u32,
    pub enterprise: u32,
}

impl TierLimits {
    pub fn max_output_tokens(&self, t: Tier) -> u32 {
        match t {
            Tier::Free => self.free,
            Tier::Pro => self.pro,
            Tier::Enterprise => self.enterprise,
        }
    }
}

/// `[chat.credits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    /// Credits a new account starts with (a ledger row).
    pub signup_bonus: i64,
    /// A call is refused below this balance.
    pub min_balance: i64,
    /// A call whose worst case costs more than this is refused.
    pub max_per_request: i64,
    /// Output tokens a request may ask for, per tier.
    pub max_output_tokens: TierLimits,
    /// Per provider name.
    pub prices: BTreeMap<String, Price>,
    /// A hold (the worst case reserved by a call in flight) older than this no longer
    /// counts: its job died holding it.
    #[serde(with = "humantime_serde", default = "default_hold_ttl")]
    pub hold_ttl: std::time::Duration,
}

fn default_hold_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}

impl CreditsConfig {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        // Only the credits part is typed here; the providers are the llm_call's.
        let credits = cfg
            .raw_section("chat")
            .get("credits")
            .cloned()
            .unwrap_or(Value::Null);
        let c: CreditsConfig = cfg.typed("chat.credits", &credits)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: &str| ConfigError::Invalid {
            key: "chat.credits".into(),
            message: message.into(),
        };
        if self.hold_ttl.is_zero() {
            return Err(bad(
                "hold_ttl must be positive (a zero TTL would hold nothing)",
            ));
        }
        if self.signup_bonus < 0 || self.min_balance < 0 || self.max_per_request <= 0 {
            return Err(bad(
                "signup_bonus and min_balance must not be negative, max_per_request must be positive",
            ));
        }
        if self.prices.values().any(|p| {
            p.input < Decimal::ZERO || p.output < Decimal::ZERO || p.minimum < Decimal::ZERO
        }) {
            return Err(bad("prices must not be negative"));
        }
        Ok(())
    }
}

/// Why a call is refused before it is made. `code` is the machine code; `status` the
/// HTTP-style status the chat API passes on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub code: &'static str,
    pub status: u16,
    pub message: String,
    pub balance: i64,
    pub required: i64,
}

/// Input tokens of `chars` characters of messages, estimated before the call (the
/// provider's count is known only after): 1 token per 4 characters, rounded up, plus 4
/// per message for the chat format.
pub fn estimate_input_tokens(chars: usize, messages: usize) -> u32 {
    u32::try_from(chars.div_ceil(4) + 4 * messages).unwrap_or(u32::MAX)
}

/// The pre-call checks: the worst case (estimated input, the tier's max output) must be
/// within the per-request cap, and the balance at least `min_balance` and the worst case.
pub fn check(
    cfg: &CreditsConfig,
    price: &Price,
    balance: i64,
    input_estimate: u32,
    max_output: u32,
) -> Result<i64, Refusal> {
    let worst = price.credits(input_estimate, max_output);
    if worst > cfg.max_per_request {
        return Err(Refusal {
            code: "request_too_expensive",
            status: 413,
            message: format!(
                "the worst case of this request is {worst} credits, over the per-request cap of {}",
                cfg.max_per_request
            ),
            balance,
            required: worst,
        });
    }
    let required = worst.max(cfg.min_balance);
    if balance < required {
        return Err(Refusal {
            code: "insufficient_credits",
            status: 402,
            message: format!(
                "the balance is {balance} credits; this request needs up to {required}"
            ),
            balance,
            required,
        });
    }
    Ok(worst)
}

/// The outcome of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// Charged now; the balance after.
    Charged { credits: i64, balance: i64 },
    /// This request was charged before (a retry): nothing changed.
    AlreadyCharged { credits: i64 },
    /// The balance does not cover it: nothing changed.
    Insufficient { balance: i64, credits: i64 },
}

/// Creates the account with its signup bonus if it does not exist; locks it.
/// Returns the tier.
pub async fn open_account(
    tx: &mut PgConnection,
    user: Uuid,
    cfg: &CreditsConfig,
) -> Result<Tier, sqlx::Error> {
    let created: Option<String> = sqlx::query_scalar!(
        "INSERT INTO credit_accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING tier",
        user,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if created.is_some() && cfg.signup_bonus > 0 {
        sqlx::query!(
            "INSERT INTO credits_ledger (user_id, delta, reason) VALUES ($1, $2, 'signup_bonus')",
            user,
            cfg.signup_bonus as i32,
        )
        .execute(&mut *tx)
        .await?;
    }
    let tier: String = sqlx::query_scalar!(
        "SELECT tier FROM credit_accounts WHERE user_id = $1 FOR UPDATE",
        user
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(Tier::parse(&tier).unwrap_or(Tier::Free))
}

/// Σ delta of a user (0 without an account).
pub async fn balance(conn: &mut PgConnection, user: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(sum(delta), 0)::bigint AS "balance!" FROM credits_ledger WHERE user_id = $1"#,
        user,
    )
    .fetch_one(conn)
    .await
}

/// Credits of `user` held by calls in flight other than `request_id` (live holds
/// only; the user's expired ones, left by jobs that died, are deleted here). Call under
/// the account's lock ([`open_account`]).
pub async fn held_by_others(
    tx: &mut PgConnection,
    user: Uuid,
    request_id: Uuid,
    ttl: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query!(
        r#"DELETE FROM credit_holds WHERE user_id = $1
         AND created_at <= now() - make_interval(secs => $2)"#,
        user,
        ttl.as_secs_f64(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query_scalar!(
        r#"SELECT coalesce(sum(credits), 0)::bigint AS "held!" FROM credit_holds
         WHERE user_id = $1 AND request_id <> $2 AND created_at > now() - make_interval(secs => $3)"#,
        user,
        request_id,
        ttl.as_secs_f64(),
    )
    .fetch_one(&mut *tx)
    .await
}

/// Holds `credits` for `request_id` (replacing an earlier hold of the same request, a
/// retry's). Call under the account's lock, after checking the available balance.
pub async fn hold(
    tx: &mut PgConnection,
    user: Uuid,
    request_id: Uuid,
    credits: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"INSERT INTO credit_holds (request_id, user_id, credits) VALUES ($1, $2, $3)
         ON CONFLICT (request_id) DO UPDATE SET credits = EXCLUDED.credits, created_at = now()
         WHERE credit_holds.user_id = EXCLUDED.user_id"#,
        request_id,
        user,
        i32::try_from(credits).unwrap_or(i32::MAX),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Releases `user`'s hold of `request_id`; what it held, if any.
pub async fn release(
    tx: &mut PgConnection,
    user: Uuid,
    request_id: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    let held: Option<i32> = sqlx::query_scalar!(
        "DELETE FROM credit_holds WHERE request_id = $1 AND user_id = $2 RETURNING credits",
        request_id,
        user,
    )
    .fetch_optional(&mut *tx)
    .await?;
    Ok(held.map(i64::from))
}

/// Binds the account of `user` to `principal` if nothing owns it yet; whether the
/// account is `principal`'s (so one ingress caller cannot spend, or read the balance
/// of, another's users). Call after [`open_account`], in its transaction.
pub async fn owned_by(
    tx: &mut PgConnection,
    user: Uuid,
    principal: &str,
) -> Result<bool, sqlx::Error> {
    let owner: Option<String> = sqlx::query_scalar!(
        "UPDATE credit_accounts SET owner = coalesce(owner, $2) WHERE user_id = $1 RETURNING owner",
        user,
        principal,
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(owner.as_deref() == Some(principal))
}

/// Charges `credits` for `request_id` once, never below zero. Call inside the
/// transaction that also completes the request.
pub async fn charge(
    tx: &mut PgConnection,
    cfg: &CreditsConfig,
    user: Uuid,
    request_id: Uuid,
    credits: i64,
    provider: &str,
    units: serde_json::Value,
) -> Result<Charge, sqlx::Error> {
    open_account(tx, user, cfg).await?;
    let earlier: Option<i32> = sqlx::query_scalar!(
        r#"SELECT -delta AS "credits!" FROM credits_ledger WHERE request_id = $1 AND reason = 'charge'"#,
        request_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(c) = earlier {
        return Ok(Charge::AlreadyCharged { credits: c as i64 });
    }
    let bal = balance(tx, user).await?;
    // What other calls in flight hold is not this charge's to take (a call whose real
    // input outgrew its estimate must not spend a parallel call's hold).
    let available = bal - held_by_others(tx, user, request_id, cfg.hold_ttl).await?;
    if available < credits || i32::try_from(credits).is_err() {
        return Ok(Charge::Insufficient {
            balance: available,
            credits,
        });
    }
    if credits > 0 {
        sqlx::query!(
            r#"INSERT INTO credits_ledger (user_id, delta, provider, units, reason, request_id)
             VALUES ($1, $2, $3, $4, 'charge', $5)"#,
            user,
            -(credits as i32),
            provider,
            units,
            request_id,
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(Charge::Charged {
        credits,
        balance: bal - credits,
    })
}

/// An operator's grant (positive) to a user; opens the account if needed. Returns the
/// balance after.
pub async fn grant(
    tx: &mut PgConnection,
    cfg: &CreditsConfig,
    user: Uuid,
    credits: i64,
) -> Result<i64, sqlx::Error> {
    open_account(tx, user, cfg).await?;
    sqlx::query!(
        "INSERT INTO credits_ledger (user_id, delta, reason) VALUES ($1, $2, 'grant')",
        user,
        credits as i32,
    )
    .execute(&mut *tx)
    .await?;
    balance(tx, user).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    fn prices() -> [(&'static str, Price); 3] {
        [
            (
                "grok",
                Price {
                    input: dec!(1),
                    output: dec!(4),
                    minimum: dec!(1),
                },
            ),
            (
                "gpt",
                Price {
                    input: dec!(3),
                    output: dec!(10),
                    minimum: dec!(2),
                },
            ),
            (
                "claude",
                Price {
                    input: dec!(3),
                    output: dec!(10),
                    minimum: dec!(2),
                },
            ),
        ]
    }

    #[test]
    fn the_spec_worked_examples() {
        let [grok, gpt, claude] = prices().map(|(_, p)| p);
        assert_eq!(grok.credits(500, 1000), 6); // 0.5 + 4 + 1 = 5.5 → 6
        assert_eq!(gpt.credits(1500, 2000), 27); // 4.5 + 20 + 2 = 26.5 → 27
        assert_eq!(claude.credits(2000, 3000), 38); // 6 + 30 + 2 = 38
        assert_eq!(grok.credits(0, 0), 1, "the minimum");
        assert_eq!(grok.credits(1, 0), 2, "any fraction rounds up");
    }

    #[test]
    fn pre_call_checks() {
        let cfg = CreditsConfig {
            signup_bonus: 100,
            min_balance: 5,
            max_per_request: 100,
            max_output_tokens: TierLimits {
                free: 1024,
                pro: 4096,
                enterprise: 8192,
            },
            prices: prices()
                .into_iter()
                .map(|(n, p)| (n.to_string(), p))
                .collect(),
            hold_ttl: default_hold_ttl(),
        };
        let grok = cfg.prices["grok"];
        let gpt = cfg.prices["gpt"];
        // Free tier on grok: 1000 in, 1024 out → 1 + 4.096 + 1 = 6.096 → 7.
        assert_eq!(check(&cfg, &grok, 100, 1000, 1024), Ok(7));
        let r = check(&cfg, &grok, 6, 1000, 1024).unwrap_err();
        assert_eq!(
            (r.code, r.status, r.required),
            ("insufficient_credits", 402, 7)
        );
        // Below the minimum balance even when the worst case is smaller.
        let r = check(&cfg, &grok, 4, 10, 10).unwrap_err();
        assert_eq!((r.code, r.required), ("insufficient_credits", 5));
        // Enterprise on gpt: 8192 out alone is 81.92 + 2; with 6000 in it is over 100.
        let r = check(&cfg, &gpt, 10_000, 6000, 8192).unwrap_err();
        assert_eq!((r.code, r.status), ("request_too_expensive", 413));
        assert!(r.message.contains("cap of 100"), "{}", r.message);
        assert_eq!(estimate_input_tokens(10, 2), 3 + 8);
    }
}
