//! `bill_usage {customer_id?}` (every 5 minutes, after aggregation): prices unbilled
//! usage and turns it into charge intents.
//!
//! One transaction per customer, holding the customer's row lock, so racing cycles
//! serialise per customer and the second finds nothing left to do:
//! 1. Monthly reset on the 1st (UTC): last month ← this month, this month ← 0.
//! 2. Per enabled service: the unbilled slices of its usage records, priced with
//!    `rust_decimal` (price per 10,000 billable requests), plus the month's base fee
//!    (and add-ons) if not charged yet. A charge is due when the usage reaches the
//!    threshold, its month has ended, a base fee is owed, or the service is suspended
//!    for a billing reason (it is re-checked every cycle and resumes when it passes).
//! 3. The amount is rounded up to the cent (at least the minimum) and checked:
//!    `insufficient_balance` if the balance, less every charge still in flight, is short;
//!    `monthly_limit_exceeded` if this month's charges, plus those in flight, plus this
//!    one would pass the customer's cap. Either suspends the service with the rule's
//!    details and asks for a vault regeneration (its keys leave the file).
//! 4. Otherwise one intent covers exactly those slices (`charge_intent_records`, whose
//!    unique index makes a request impossible to bill twice), and `charge_escrow
//!    {intent_id}` is enqueued in the same transaction.
//!
//! A service with an intent in flight is skipped until that intent confirms or fails
//! (a unique index enforces one in flight), so every check sees every pending amount.
//! Running a cycle twice gives the same result: the second finds the slices taken.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::charge_escrow::ChargeEscrow;
use super::config::{BillingConfig, MAX_PRICE_USD};
use super::vault::request_regeneration;

/// Suspension reasons this cycle sets and lifts. Others (an operator's, a chain
/// rejection) are left for a person.
pub const INSUFFICIENT_BALANCE: &str = "insufficient_balance";
pub const MONTHLY_LIMIT_EXCEEDED: &str = "monthly_limit_exceeded";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BillUsage {
    /// Bill one customer only (operators); default: every customer with work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<i32>,
}

impl JobArgs for BillUsage {
    const KIND: &'static str = "bill_usage";
}

/// What one cycle did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BillReport {
    pub customers: usize,
    pub resets: usize,
    pub intents: Vec<Value>,
    pub suspended: Vec<Value>,
    pub resumed: Vec<Value>,
}

pub struct BillUsageHandler(pub Arc<BillingConfig>);

impl Handler for BillUsageHandler {
    type Args = BillUsage;

    async fn handle(&self, a: BillUsage, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let report = run_cycle(ctx.pool(), &self.0, a.customer_id, Utc::now()).await?;
        Outcome::done_with(report)
    }
}

/// A rule that stops a charge, with the spec's details (USD as decimal strings).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: &'static str,
    pub details: Value,
}

/// US cents as a decimal string: 1234 → "12.34".
pub fn usd(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

/// An amount in USD rounded up to the cent, at least `minimum` (both in USD). An
/// amount too large for cents saturates (the balance rule then refuses it with the
/// amount shown) rather than overflowing.
pub fn charge_cents(amount: Decimal, minimum: Decimal) -> i64 {
    let cents = |d: Decimal| {
        d.checked_mul(Decimal::ONE_HUNDRED)
            .map(|c| c.ceil())
            .and_then(|c| c.to_i64())
            .unwrap_or(i64::MAX)
    };
    cents(amount).max(cents(minimum))
}

/// The two pre-charge rules. `pending_cents` are charges in flight for the customer
/// (they will leave the balance); `pending_month_cents` those counting against this
/// month.
pub fn check_charge(
    balance_cents: i64,
    month_charged_cents: i64,
    max_monthly_cents: i64,
    pending_cents: i64,
    pending_month_cents: i64,
    amount_cents: i64,
) -> Result<(), Refusal> {
    let available = balance_cents.saturating_sub(pending_cents);
    if available < amount_cents {
        return Err(Refusal {
            code: INSUFFICIENT_BALANCE,
            details: json!({
                "current_balance_usd": usd(available),
                "estimated_cost_usd": usd(amount_cents),
                "required_deposit_usd": usd(amount_cents.saturating_sub(available)),
            }),
        });
    }
    let charged = month_charged_cents.saturating_add(pending_month_cents);
    if charged.saturating_add(amount_cents) > max_monthly_cents {
        return Err(Refusal {
            code: MONTHLY_LIMIT_EXCEEDED,
            details: json!({
                "max_monthly_usd": usd(max_monthly_cents),
                "current_month_charged_usd": usd(charged),
                "estimated_cost_usd": usd(amount_cents),
                "remaining_authorization_usd": usd((max_monthly_cents - charged).max(0)),
            }),
        });
    }
    Ok(())
}

fn month_start(now: DateTime<Utc>) -> NaiveDate {
    now.date_naive().with_day(1).expect("day 1 exists")
}

/// One billing cycle as of `now`, one transaction per customer.
pub async fn run_cycle(
    pool: &PgPool,
    cfg: &BillingConfig,
    only: Option<i32>,
    now: DateTime<Utc>,
) -> Result<BillReport, sqlx::Error> {
    let month = month_start(now);
    // Customers with something to do: a reset, unbilled usage, a base fee owed, or a
    // service suspended for a billing reason.
    let ids: Vec<i32> = sqlx::query_scalar(
        "SELECT customer_id FROM customers WHERE current_month_start < $1 \
         UNION SELECT customer_id FROM usage_records WHERE billable_count > billed_count \
         UNION SELECT customer_id FROM service_instances s WHERE is_enabled AND ( \
            suspend_reason IN ('insufficient_balance', 'monthly_limit_exceeded') \
            OR (state = 'active' AND NOT EXISTS (SELECT 1 FROM charge_intents i \
                WHERE i.customer_id = s.customer_id AND i.service_type = s.service_type \
                AND i.base_fee_month = $1 AND i.state <> 'failed'))) \
         ORDER BY 1",
    )
    .bind(month)
    .fetch_all(pool)
    .await?;
    let mut report = BillReport::default();
    for id in ids.into_iter().filter(|id| only.is_none_or(|o| o == *id)) {
        let mut tx = pool.begin().await?;
        bill_customer(&mut tx, cfg, id, month, &mut report).await?;
        tx.commit().await?;
        report.customers += 1;
    }
    Ok(report)
}

struct Service {
    service_type: String,
    tier: String,
    state: String,
    suspend_reason: Option<String>,
    config: Value,
}

async fn bill_customer(
    tx: &mut PgConnection,
    cfg: &BillingConfig,
    customer_id: i32,
    month: NaiveDate,
    report: &mut BillReport,
) -> Result<(), sqlx::Error> {
    let Some(c) = sqlx::query(
        "SELECT current_balance_usd_cents, current_month_charged_usd_cents, \
                max_monthly_usd_cents, current_month_start \
         FROM customers WHERE customer_id = $1 FOR UPDATE",
    )
    .bind(customer_id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(());
    };
    let balance: i64 = c.try_get(0)?;
    let mut month_charged: i64 = c.try_get(1)?;
    let max_monthly: i64 = c.try_get(2)?;
    let started: NaiveDate = c.try_get(3)?;
    if started < month {
        // The 1st (UTC): this month's total becomes last month's, unless a month or
        // more passed without a cycle (then last month charged nothing).
        let last = if started.checked_add_months(Months::new(1)) == Some(month) {
            month_charged
        } else {
            0
        };
        sqlx::query(
            "UPDATE customers SET last_month_charged_usd_cents = $2, \
             current_month_charged_usd_cents = 0, current_month_start = $3, updated_at = now() \
             WHERE customer_id = $1",
        )
        .bind(customer_id)
        .bind(last)
        .bind(month)
        .execute(&mut *tx)
        .await?;
        month_charged = 0;
        report.resets += 1;
        tracing::info!(customer_id, %month, "monthly reset");
    }
    // Charges in flight: they will leave the balance; those of this month count
    // against its cap (an older month's, confirming late, count against that month).
    let pending = sqlx::query(
        "SELECT coalesce(sum(ceil(amount * 100)), 0)::bigint, \
                coalesce(sum(ceil(amount * 100)) FILTER (WHERE billing_month = $2), 0)::bigint \
         FROM charge_intents WHERE customer_id = $1 AND state IN ('created', 'signed', 'sent')",
    )
    .bind(customer_id)
    .bind(month)
    .fetch_one(&mut *tx)
    .await?;
    let mut pending_cents: i64 = pending.try_get(0)?;
    let mut pending_month_cents: i64 = pending.try_get(1)?;

    let services: Vec<Service> = sqlx::query(
        "SELECT service_type::text, tier, state, suspend_reason, config FROM service_instances s \
         WHERE customer_id = $1 AND is_enabled \
           AND NOT EXISTS (SELECT 1 FROM charge_intents i WHERE i.customer_id = s.customer_id \
               AND i.service_type = s.service_type AND i.state IN ('created', 'signed', 'sent')) \
         ORDER BY service_type FOR UPDATE",
    )
    .bind(customer_id)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| {
        Ok(Service {
            service_type: r.try_get(0)?,
            tier: r.try_get(1)?,
            state: r.try_get(2)?,
            suspend_reason: r.try_get(3)?,
            config: r.try_get(4)?,
        })
    })
    .collect::<Result<_, sqlx::Error>>()?;

    for s in services {
        let billing_suspension = s.state == "suspended"
            && matches!(
                s.suspend_reason.as_deref(),
                Some(INSUFFICIENT_BALANCE | MONTHLY_LIMIT_EXCEEDED)
            );
        if s.state != "active" && !billing_suspension {
            continue; // suspended by an operator or a chain rejection: a person decides
        }
        let price = decimal_in(&s.config, "price_per_10k_usd").unwrap_or(cfg.price_per_10k_usd);
        // The unbilled slices, oldest first.
        let slices = sqlx::query(
            "SELECT record_id, billed_count, billable_count, window_start < $3 AS ended \
             FROM usage_records WHERE customer_id = $1 AND service_type = $2 \
               AND billable_count > billed_count ORDER BY record_id FOR UPDATE",
        )
        .bind(customer_id)
        .bind(&s.service_type)
        .bind(month.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        .fetch_all(&mut *tx)
        .await?;
        let mut usage = Decimal::ZERO;
        let mut month_ended = false;
        let mut parts = Vec::with_capacity(slices.len());
        for r in &slices {
            let (id, from, to, ended): (i64, i64, i64, bool) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            // Checked: a count and a price within their bounds fit, but a total that
            // would not is the maximum, which no balance covers.
            let amount = Decimal::from(to - from)
                .checked_mul(price)
                .map(|a| a / Decimal::from(10_000))
                .unwrap_or(Decimal::MAX);
            usage = usage.saturating_add(amount);
            month_ended |= ended;
            parts.push((id, from, to, amount));
        }
        // Owed by a service we would charge (active, or suspended for a billing reason:
        // resuming it means paying its month), so a re-check sees the same amount.
        let base_fee_owed: bool = !sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM charge_intents WHERE customer_id = $1 \
                 AND service_type = $2 AND base_fee_month = $3 AND state <> 'failed')",
        )
        .bind(customer_id)
        .bind(&s.service_type)
        .bind(month)
        .fetch_one(&mut *tx)
        .await?;
        let base_fee = if base_fee_owed {
            base_fee(cfg, &s)
        } else {
            Decimal::ZERO
        };
        let total = usage.saturating_add(base_fee);
        if total.is_zero() {
            if billing_suspension {
                resume(tx, cfg, customer_id, &s.service_type, report).await?;
            }
            continue;
        }
        let due = usage >= cfg.charge_threshold_usd
            || (month_ended && !usage.is_zero())
            || !base_fee.is_zero()
            || billing_suspension;
        if !due {
            continue;
        }
        let amount_cents = charge_cents(total, cfg.minimum_charge_usd);
        if let Err(refusal) = check_charge(
            balance,
            month_charged,
            max_monthly,
            pending_cents,
            pending_month_cents,
            amount_cents,
        ) {
            suspend(tx, cfg, customer_id, &s, &refusal, report).await?;
            continue;
        }
        if billing_suspension {
            resume(tx, cfg, customer_id, &s.service_type, report).await?;
        }
        let intent_id = Uuid::new_v4();
        let amount = Decimal::new(amount_cents, 2);
        sqlx::query(
            "INSERT INTO charge_intents (intent_id, customer_id, service_type, amount, usage_amount, \
               base_fee_amount, base_fee_month, billing_month, first_record_id, last_record_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(intent_id)
        .bind(customer_id)
        .bind(&s.service_type)
        .bind(amount)
        .bind(usage)
        .bind(base_fee)
        .bind((!base_fee.is_zero()).then_some(month))
        .bind(month)
        .bind(parts.first().map(|p| p.0))
        .bind(parts.last().map(|p| p.0))
        .execute(&mut *tx)
        .await?;
        if !parts.is_empty() {
            let ids: Vec<i64> = parts.iter().map(|p| p.0).collect();
            let froms: Vec<i64> = parts.iter().map(|p| p.1).collect();
            let tos: Vec<i64> = parts.iter().map(|p| p.2).collect();
            let amounts: Vec<Decimal> = parts.iter().map(|p| p.3).collect();
            sqlx::query(
                "WITH s AS (SELECT * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::numeric[]) \
                            AS t(record_id, from_count, to_count, amount)), \
                 ins AS (INSERT INTO charge_intent_records (intent_id, record_id, from_count, to_count, amount) \
                         SELECT $1, record_id, from_count, to_count, amount FROM s) \
                 UPDATE usage_records u SET billed_count = s.to_count FROM s WHERE u.record_id = s.record_id",
            )
            .bind(intent_id)
            .bind(&ids)
            .bind(&froms)
            .bind(&tos)
            .bind(&amounts)
            .execute(&mut *tx)
            .await?;
        }
        enqueue_on(tx, &ChargeEscrow { intent_id }, EnqueueOptions::default())
            .await
            .map_err(longshore_workers::EnqueueError::into_sqlx)?;
        pending_cents += amount_cents;
        pending_month_cents += amount_cents;
        metrics::counter!("longshore_billing_intents_total").increment(1);
        tracing::info!(
            customer_id,
            service_type = s.service_type,
            %intent_id,
            amount = %amount,
            records = parts.len(),
            "charge intent created"
        );
        report.intents.push(json!({
            "intent_id": intent_id,
            "customer_id": customer_id,
            "service_type": s.service_type,
            "amount_usd": usd(amount_cents),
            "usage_usd": usage.normalize().to_string(),
            "base_fee_usd": base_fee.normalize().to_string(),
            "records": parts.len(),
        }));
    }
    Ok(())
}

/// A decimal from a service's `config` (a string or a number).
fn decimal_in(config: &Value, key: &str) -> Option<Decimal> {
    match config.get(key)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

/// The month's base fee: the service's own, else its tier's; plus its add-ons. A
/// service's own value that is negative or beyond [`MAX_PRICE_USD`] is not a price
/// (a negative add-on would be a discount nobody approved): it is ignored, with a
/// warning naming the service.
fn base_fee(cfg: &BillingConfig, s: &Service) -> Decimal {
    let priced = |what: &str, d: Decimal| {
        let ok = d >= Decimal::ZERO && d <= MAX_PRICE_USD;
        if !ok {
            tracing::warn!(service_type = s.service_type, what, value = %d, "a service's price is out of range; ignored");
        }
        ok
    };
    let fee = decimal_in(&s.config, "base_fee_usd")
        .filter(|d| priced("base_fee_usd", *d))
        .or_else(|| cfg.base_fee_usd.get(&s.tier))
        .unwrap_or(Decimal::ZERO);
    let addons: Decimal = s
        .config
        .get("addons")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| decimal_in(x, "monthly_usd"))
                .filter(|d| priced("addons.monthly_usd", *d))
                .fold(Decimal::ZERO, Decimal::saturating_add)
        })
        .unwrap_or(Decimal::ZERO);
    fee.saturating_add(addons)
}

async fn suspend(
    tx: &mut PgConnection,
    cfg: &BillingConfig,
    customer_id: i32,
    s: &Service,
    refusal: &Refusal,
    report: &mut BillReport,
) -> Result<(), sqlx::Error> {
    let changed = s.state != "suspended" || s.suspend_reason.as_deref() != Some(refusal.code);
    sqlx::query(
        "UPDATE service_instances SET state = 'suspended', suspend_reason = $3, suspend_details = $4, \
           suspended_at = CASE WHEN state = 'suspended' THEN suspended_at ELSE now() END \
         WHERE customer_id = $1 AND service_type = $2",
    )
    .bind(customer_id)
    .bind(&s.service_type)
    .bind(refusal.code)
    .bind(&refusal.details)
    .execute(&mut *tx)
    .await?;
    if changed {
        metrics::counter!("longshore_billing_suspensions_total", "reason" => refusal.code)
            .increment(1);
        tracing::warn!(
            customer_id,
            service_type = s.service_type,
            reason = refusal.code,
            details = %refusal.details,
            "service suspended"
        );
        report.suspended.push(json!({
            "customer_id": customer_id,
            "service_type": s.service_type,
            "reason": refusal.code,
            "details": refusal.details,
        }));
        regenerate_vault_soon(tx, cfg).await?;
    }
    Ok(())
}

async fn resume(
    tx: &mut PgConnection,
    cfg: &BillingConfig,
    customer_id: i32,
    service_type: &str,
    report: &mut BillReport,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE service_instances SET state = 'active', suspend_reason = NULL, \
           suspend_details = NULL, suspended_at = NULL \
         WHERE customer_id = $1 AND service_type = $2",
    )
    .bind(customer_id)
    .bind(service_type)
    .execute(&mut *tx)
    .await?;
    tracing::info!(customer_id, service_type, "service resumed");
    report
        .resumed
        .push(json!({"customer_id": customer_id, "service_type": service_type}));
    regenerate_vault_soon(tx, cfg).await
}

async fn regenerate_vault_soon(
    tx: &mut PgConnection,
    cfg: &BillingConfig,
) -> Result<(), sqlx::Error> {
    if cfg.vault_path.is_empty() {
        return Ok(());
    }
    request_regeneration(tx, &cfg.vault_path, cfg.vault_coalesce)
        .await
        .map(drop)
        .map_err(longshore_workers::EnqueueError::into_sqlx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    #[test]
    fn amounts_too_large_saturate_and_are_refused_not_panics() {
        // Before: `to_i64().expect(..)` panicked (the job looped on the panic).
        assert_eq!(charge_cents(Decimal::MAX, dec!(0.01)), i64::MAX);
        let r = check_charge(10_000, i64::MAX - 5, i64::MAX, 0, 10, i64::MAX).unwrap_err();
        assert_eq!(r.code, INSUFFICIENT_BALANCE);
        let r = check_charge(i64::MAX, i64::MAX - 5, i64::MAX - 1, 0, 10, 100).unwrap_err();
        assert_eq!(r.code, MONTHLY_LIMIT_EXCEEDED);
    }

    #[test]
    fn cents_round_up_with_a_minimum() {
        assert_eq!(charge_cents(dec!(5.0001), dec!(0.01)), 501);
        assert_eq!(charge_cents(dec!(5.00), dec!(0.01)), 500);
        assert_eq!(charge_cents(dec!(0.0001), dec!(0.01)), 1);
        assert_eq!(charge_cents(dec!(0.0001), dec!(0.50)), 50);
        // 12,345 billable at $1 per 10,000 = $1.2345 → $1.24.
        assert_eq!(
            charge_cents(
                Decimal::from(12_345) * dec!(1.00) / Decimal::from(10_000),
                dec!(0.01)
            ),
            124
        );
        assert_eq!(usd(124), "1.24");
        assert_eq!(usd(5), "0.05");
        assert_eq!(usd(-250), "-2.50");
    }

    #[test]
    fn the_two_rules_with_their_details() {
        assert_eq!(check_charge(1000, 0, 20000, 0, 0, 1000), Ok(()));
        let r = check_charge(1000, 0, 20000, 200, 200, 900).unwrap_err();
        assert_eq!(r.code, "insufficient_balance");
        assert_eq!(
            r.details,
            json!({"current_balance_usd": "8.00", "estimated_cost_usd": "9.00", "required_deposit_usd": "1.00"})
        );
        let r = check_charge(100_000, 19_500, 20_000, 0, 0, 501).unwrap_err();
        assert_eq!(r.code, "monthly_limit_exceeded");
        assert_eq!(
            r.details,
            json!({"max_monthly_usd": "200.00", "current_month_charged_usd": "195.00",
                   "estimated_cost_usd": "5.01", "remaining_authorization_usd": "5.00"})
        );
        // Exactly at the cap passes.
        assert_eq!(check_charge(100_000, 19_500, 20_000, 0, 0, 500), Ok(()));
    }
}
