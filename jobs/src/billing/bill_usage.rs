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
//!    one would pass the customer's cap.
//! 4. One intent covers exactly the slices it charges (`charge_intent_records`, whose
//!    unique index makes a request impossible to bill twice), and `charge_escrow
//!    {intent_id}` is enqueued in the same transaction. If the whole amount is more
//!    than both rules leave (or than `chain.max_charge_usd`), the intent is cut to
//!    what fits: the base fee first, then the oldest usage, down to the request. The
//!    rest stays unbilled; if a rule is why, the service is suspended with that rule's
//!    details for the rest (its keys leave the vault), to be billed when the rule
//!    passes (a deposit, the monthly reset). A backlog larger than the cap is billed
//!    up to the cap, not refused whole every cycle.
//!
//! A service with an intent in flight gets no second one (a unique index enforces
//! one in flight), but its unbilled usage is still judged by both rules on top of
//! what is in flight, so it is suspended as soon as it runs past them.
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
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::charge_escrow::ChargeEscrow;
use super::config::{BillingConfig, MAX_PRICE_USD};
use super::regenerate_vault::request_regeneration;
use crate::clients::chain::{Chain, ChainError, TxStatus};

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
    /// Customers left for the next cycle: their escrow balance could not be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unread: Vec<i32>,
}

pub struct BillUsageHandler(pub Arc<BillingConfig>);

impl Handler for BillUsageHandler {
    type Args = BillUsage;

    async fn handle(&self, a: BillUsage, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let chain = self.0.chain_client();
        // One clock for the cycle: the database's (whose `now()` stamps the usage
        // windows and the intents), not this host's.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(ctx.pool())
            .await?;
        let report =
            run_cycle_on(ctx.pool(), &self.0, chain.as_deref(), a.customer_id, now).await?;
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

/// One billing cycle as of `now`, one transaction per customer, judging the balance
/// the database holds (no chain: `backend = "none"`, and tests of the rules alone).
pub async fn run_cycle(
    pool: &PgPool,
    cfg: &BillingConfig,
    only: Option<i32>,
    now: DateTime<Utc>,
) -> Result<BillReport, sqlx::Error> {
    run_cycle_on(pool, cfg, None, only, now).await
}

/// One billing cycle as of `now`. With a chain, each customer's balance is first read
/// from its escrow account: what the delegate may take (the smaller of the tokens and
/// the allowance approved to it; nothing if another delegate is approved), stored as
/// `current_balance_usd_cents`, so `insufficient_balance` judges the money that is
/// really there, deposits included. Read outside the customer's transaction (no lock
/// held across an RPC); a customer whose account cannot be read is left for the next
/// cycle (`unread`), neither charged nor suspended on a guess.
pub async fn run_cycle_on(
    pool: &PgPool,
    cfg: &BillingConfig,
    chain: Option<&dyn Chain>,
    only: Option<i32>,
    now: DateTime<Utc>,
) -> Result<BillReport, sqlx::Error> {
    let month = month_start(now);
    // Customers with something to do: a reset, unbilled usage, a base fee owed, or a
    // service suspended for a billing reason.
    let ids: Vec<i32> = sqlx::query_scalar!(
        r#"SELECT customer_id AS "customer_id!" FROM customers WHERE current_month_start < $1
         UNION SELECT customer_id FROM usage_records WHERE billable_count > billed_count
         UNION SELECT customer_id FROM service_instances s WHERE is_enabled AND (
            suspend_reason IN ('insufficient_balance', 'monthly_limit_exceeded')
            OR (state = 'active' AND (NOT EXISTS (SELECT 1 FROM charge_intents i
                WHERE i.customer_id = s.customer_id AND i.service_type = s.service_type
                AND i.base_fee_month = $1 AND i.state <> 'failed')
              OR EXISTS (SELECT 1 FROM charge_intents f
                WHERE f.customer_id = s.customer_id AND f.service_type = s.service_type
                AND f.state = 'failed' AND f.base_fee_month < $1
                AND NOT EXISTS (SELECT 1 FROM charge_intents g
                    WHERE g.customer_id = f.customer_id AND g.service_type = f.service_type
                    AND g.base_fee_month = f.base_fee_month AND g.state <> 'failed')))))
         ORDER BY 1"#,
        month,
    )
    .fetch_all(pool)
    .await?;
    let mut report = BillReport::default();
    for id in ids.into_iter().filter(|id| only.is_none_or(|o| o == *id)) {
        let on_chain = match chain {
            None => None,
            Some(chain) => match read_escrow(pool, chain, cfg, id).await {
                Ok(c) => Some(c),
                Err(EscrowRead::Db(e)) => return Err(e),
                Err(EscrowRead::Chain(e)) => {
                    metrics::counter!(crate::telemetry::BILLING_BALANCE_UNREAD).increment(1);
                    tracing::warn!(customer_id = id, error = %e, "escrow balance unreadable; the customer waits for the next cycle");
                    report.unread.push(id);
                    continue;
                }
            },
        };
        let mut tx = pool.begin().await?;
        bill_customer(&mut tx, cfg, id, month, on_chain.as_ref(), &mut report).await?;
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
    /// An intent of this service is still in flight (at most one may be).
    in_flight: bool,
}

enum EscrowRead {
    Db(sqlx::Error),
    Chain(ChainError),
}

/// How many of a customer's intents have settled (confirmed or failed): a change
/// between the chain read and the row lock means the read may be stale.
const SETTLED: &str = "SELECT count(*) FROM charge_intents WHERE customer_id = $1 AND state IN ('confirmed', 'failed')";

/// A customer's escrow as read from the chain, before its transaction.
struct EscrowBalance {
    /// What the account lets the delegate take, in whole cents.
    cents: i64,
    /// Intents in flight whose transfer has already landed: the balance read no
    /// longer holds their amount, so they are not subtracted again.
    landed: Vec<Uuid>,
    /// [`SETTLED`] before the read.
    settled: i64,
}

/// What customer `id`'s escrow account lets the delegate take: 0 without an account
/// (or with none on chain, an address that is not a token account, another delegate
/// approved, or another mint than `chain.usdc_mint`). The statuses of its intents in
/// flight are read first and the account from a node at least as far along, so a
/// transfer that lands in between is at worst counted twice (a cautious error), never
/// missed.
async fn read_escrow(
    pool: &PgPool,
    chain: &dyn Chain,
    cfg: &BillingConfig,
    id: i32,
) -> Result<EscrowBalance, EscrowRead> {
    let (escrow, settled): (Option<String>, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT escrow_account FROM customers WHERE customer_id = $1), ({SETTLED})"
    ))
    .bind(id)
    .fetch_one(pool)
    .await
    .map_err(EscrowRead::Db)?;
    let Some(escrow) = escrow.filter(|e| !e.is_empty()) else {
        return Ok(EscrowBalance {
            cents: 0,
            landed: Vec::new(),
            settled,
        });
    };
    let flying: Vec<(Uuid, String)> = sqlx::query!(
        r#"SELECT i.intent_id, s.signature FROM charge_intents i
         JOIN charge_intent_signatures s USING (intent_id)
         WHERE i.customer_id = $1 AND i.state IN ('signed', 'sent')"#,
        id,
    )
    .fetch_all(pool)
    .await
    .map_err(EscrowRead::Db)?
    .into_iter()
    .map(|r| (r.intent_id, r.signature))
    .collect();
    let mut landed = Vec::new();
    let mut min_slot = None;
    if !flying.is_empty() {
        let sigs: Vec<String> = flying.iter().map(|f| f.1.clone()).collect();
        let st = chain
            .signature_statuses(&sigs)
            .await
            .map_err(EscrowRead::Chain)?;
        // The account is read from a node that has the landed transfers, no more: the
        // statuses' own context is the processed bank, ahead of the confirmed one an
        // account read at our commitment answers from.
        for ((intent, _), status) in flying.iter().zip(&st.value) {
            if let Some(TxStatus::Landed { err: None, slot }) = status {
                landed.push(*intent);
                min_slot = min_slot.max(Some(*slot));
            }
        }
    }
    let account = match chain.token_account_at(&escrow, min_slot).await {
        Ok(a) => a,
        // Not an address, not a token account: nothing there to charge.
        Err(ChainError::Invalid(why)) => {
            tracing::warn!(
                customer_id = id,
                why,
                "the escrow account is not a token account"
            );
            None
        }
        Err(e) => return Err(EscrowRead::Chain(e)),
    };
    // The simulator has one mint of its own; a real chain, the configured one.
    let rpc = cfg.chain.backend == super::config::ChainBackend::Rpc;
    let units = account.map_or(0, |a| {
        let our_mint = !rpc || a.mint == cfg.chain.usdc_mint;
        if our_mint && a.delegate.as_deref() == Some(chain.delegate().as_str()) {
            a.amount.min(a.delegated_amount)
        } else {
            0
        }
    });
    Ok(EscrowBalance {
        // USDC has 6 decimals: 10,000 units a cent.
        cents: i64::try_from(units / 10_000).unwrap_or(i64::MAX),
        landed,
        settled,
    })
}

async fn bill_customer(
    tx: &mut PgConnection,
    cfg: &BillingConfig,
    customer_id: i32,
    month: NaiveDate,
    on_chain: Option<&EscrowBalance>,
    report: &mut BillReport,
) -> Result<(), sqlx::Error> {
    let Some(c) = sqlx::query!(
        r#"SELECT current_balance_usd_cents, current_month_charged_usd_cents,
                max_monthly_usd_cents, current_month_start
         FROM customers WHERE customer_id = $1 FOR UPDATE"#,
        customer_id,
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(());
    };
    let mut balance = c.current_balance_usd_cents;
    if let Some(read) = on_chain {
        // Under the row lock, which a charge's booking takes too: one that settled
        // since the read was taken makes the read stale (its amount may be in neither
        // the balance read nor what is pending). Next cycle reads anew.
        let settled: i64 = sqlx::query_scalar(SETTLED)
            .bind(customer_id)
            .fetch_one(&mut *tx)
            .await?;
        if settled != read.settled {
            tracing::info!(
                customer_id,
                "a charge settled during the balance read; the customer waits for the next cycle"
            );
            report.unread.push(customer_id);
            return Ok(());
        }
        let cents = read.cents;
        if cents != balance {
            sqlx::query!(
                r#"UPDATE customers SET current_balance_usd_cents = $2, updated_at = now()
                 WHERE customer_id = $1"#,
                customer_id,
                cents,
            )
            .execute(&mut *tx)
            .await?;
        }
        balance = cents;
    }
    let mut month_charged = c.current_month_charged_usd_cents;
    let max_monthly = c.max_monthly_usd_cents;
    let started = c.current_month_start;
    // The month is the row's when the row is ahead of this cycle's clock: a cycle that
    // began at 23:58 on the 31st and reaches a customer another cycle already reset
    // bills February against February's counter, not January against it.
    let month = month.max(started);
    if started < month {
        // The 1st (UTC): this month's total becomes last month's, unless a month or
        // more passed without a cycle (then last month charged nothing).
        let last = if started.checked_add_months(Months::new(1)) == Some(month) {
            month_charged
        } else {
            0
        };
        sqlx::query!(
            r#"UPDATE customers SET last_month_charged_usd_cents = $2,
             current_month_charged_usd_cents = 0, current_month_start = $3, updated_at = now()
             WHERE customer_id = $1"#,
            customer_id,
            last,
            month,
        )
        .execute(&mut *tx)
        .await?;
        month_charged = 0;
        report.resets += 1;
        tracing::info!(customer_id, %month, "monthly reset");
    }
    // Charges in flight: they will leave the balance; those of this month count
    // against its cap (an older month's, confirming late, count against that month).
    // Those already landed on chain left the balance read from it: they count
    // against the month, not again against the balance.
    let landed: Vec<Uuid> = on_chain.map(|r| r.landed.clone()).unwrap_or_default();
    let pending = sqlx::query!(
        r#"SELECT coalesce(sum(ceil(amount * 100)) FILTER (WHERE intent_id <> ALL($3)), 0)::bigint AS "all!",
                coalesce(sum(ceil(amount * 100)) FILTER (WHERE billing_month = $2), 0)::bigint AS "month!"
         FROM charge_intents WHERE customer_id = $1 AND state IN ('created', 'signed', 'sent')"#,
        customer_id,
        month,
        &landed,
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut pending_cents = pending.all;
    let mut pending_month_cents = pending.month;

    // Services with an intent in flight too: their unbilled usage is still judged by
    // both rules (on top of what is in flight), only no second intent is made.
    let services: Vec<Service> = sqlx::query_as!(
        Service,
        r#"SELECT service_type, tier, state, suspend_reason, config,
                EXISTS (SELECT 1 FROM charge_intents i WHERE i.customer_id = s.customer_id
                    AND i.service_type = s.service_type
                    AND i.state IN ('created', 'signed', 'sent')) AS "in_flight!"
         FROM service_instances s WHERE customer_id = $1 AND is_enabled
         ORDER BY service_type FOR UPDATE"#,
        customer_id,
    )
    .fetch_all(&mut *tx)
    .await?;

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
        let slices = sqlx::query!(
            r#"SELECT record_id, billed_count, billable_count, window_start < $3 AS "ended!"
             FROM usage_records WHERE customer_id = $1 AND service_type = $2
               AND billable_count > billed_count ORDER BY record_id FOR UPDATE"#,
            customer_id,
            &s.service_type,
            month.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut usage = Decimal::ZERO;
        let mut month_ended = false;
        let mut parts = Vec::with_capacity(slices.len());
        for r in &slices {
            let (id, from, to, ended) = (r.record_id, r.billed_count, r.billable_count, r.ended);
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
        // resuming it means paying its month), so a re-check sees the same amount. The
        // oldest month owed first: this month's, or an earlier one whose base-fee
        // intent failed (the chain refused it; the service resumed since), one month
        // per intent.
        let fee_month: Option<NaiveDate> = sqlx::query_scalar!(
            r#"SELECT m AS "m!" FROM (SELECT base_fee_month AS m FROM charge_intents
                             WHERE customer_id = $1 AND service_type = $2
                               AND state = 'failed' AND base_fee_month < $3
                            UNION SELECT $3::date) x
             WHERE NOT EXISTS (SELECT 1 FROM charge_intents i WHERE i.customer_id = $1
                 AND i.service_type = $2 AND i.base_fee_month = x.m AND i.state <> 'failed')
             ORDER BY m LIMIT 1"#,
            customer_id,
            &s.service_type,
            month,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let base_fee = match fee_month {
            Some(_) => base_fee(cfg, &s),
            None => Decimal::ZERO,
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
        let rules = Rules {
            balance,
            month_charged,
            max_monthly,
            pending_cents,
            pending_month_cents,
        };
        if s.in_flight {
            // Projected: what is unbilled, on top of what is in flight.
            match rules.check(amount_cents) {
                Err(refusal) => suspend(tx, cfg, customer_id, &s, &refusal, report).await?,
                Ok(()) => {
                    if billing_suspension {
                        resume(tx, cfg, customer_id, &s.service_type, report).await?;
                    }
                    // Spoken for: the services judged after this one see it, so one
                    // is not resumed on money another then takes.
                    pending_cents = pending_cents.saturating_add(amount_cents);
                    pending_month_cents = pending_month_cents.saturating_add(amount_cents);
                }
            }
            continue;
        }
        // The most one intent may be: what both rules leave, and the chain's limit.
        let allowed = rules.allowed_cents().min(cfg.chain.max_charge_cents());
        let (taken, taken_usage) = if amount_cents <= allowed {
            (parts, usage)
        } else {
            match cut(base_fee, &parts, price, allowed, cfg.minimum_charge_usd) {
                Some(c) => c,
                None => (Vec::new(), Decimal::ZERO),
            }
        };
        let taken_total = taken_usage.saturating_add(base_fee);
        let taken_cents = if taken.is_empty() && base_fee.is_zero() {
            0
        } else {
            charge_cents(taken_total, cfg.minimum_charge_usd)
        };
        let taken_cents = if taken_cents > allowed {
            0
        } else {
            taken_cents
        };
        if taken_cents > 0 {
            create_intent(
                tx,
                customer_id,
                &s.service_type,
                (taken_usage, base_fee, taken_cents),
                &taken,
                (month, fee_month.filter(|_| !base_fee.is_zero())),
                report,
            )
            .await?;
            pending_cents += taken_cents;
            pending_month_cents += taken_cents;
        }
        if taken_cents == amount_cents {
            if billing_suspension {
                resume(tx, cfg, customer_id, &s.service_type, report).await?;
            }
            continue;
        }
        // A rest stays unbilled. If a rule is why, the service is suspended with that
        // rule's details for the rest; if only the chain's limit is, it waits for the
        // next cycle after this intent settles.
        // What the whole would have cost, less what this intent takes: the pieces of a
        // cut never cost more than the whole (each rounds up on its own).
        let rest =
            (amount_cents - taken_cents).max(charge_cents(Decimal::ZERO, cfg.minimum_charge_usd));
        let after = Rules {
            pending_cents,
            pending_month_cents,
            ..rules
        };
        match after.check(rest) {
            Err(refusal) => suspend(tx, cfg, customer_id, &s, &refusal, report).await?,
            Ok(()) if taken_cents == 0 => tracing::error!(
                customer_id,
                service_type = s.service_type,
                amount_cents,
                "a charge cannot be cut under billing.chain.max_charge_usd (a base fee above it?); nothing billed"
            ),
            Ok(()) => {
                if billing_suspension {
                    resume(tx, cfg, customer_id, &s.service_type, report).await?;
                }
            }
        }
    }
    Ok(())
}

/// What the two rules judge against: the customer's row and what is in flight.
#[derive(Debug, Clone, Copy)]
struct Rules {
    balance: i64,
    month_charged: i64,
    max_monthly: i64,
    pending_cents: i64,
    pending_month_cents: i64,
}

impl Rules {
    fn check(&self, amount_cents: i64) -> Result<(), Refusal> {
        check_charge(
            self.balance,
            self.month_charged,
            self.max_monthly,
            self.pending_cents,
            self.pending_month_cents,
            amount_cents,
        )
    }

    /// The largest amount both rules let through now.
    fn allowed_cents(&self) -> i64 {
        let available = self.balance.saturating_sub(self.pending_cents);
        let authorized = self
            .max_monthly
            .saturating_sub(self.month_charged.saturating_add(self.pending_month_cents));
        available.min(authorized).max(0)
    }
}

/// A slice of a usage record: `(record_id, from_count, to_count, amount)`.
type Part = (i64, i64, i64, Decimal);

/// The oldest usage that fits in `allowed_cents` with the base fee (owed first, and
/// never split): whole slices, then part of the next one, down to the request. `None`
/// when not even the base fee (or the minimum charge) fits.
fn cut(
    base_fee: Decimal,
    parts: &[Part],
    price: Decimal,
    allowed_cents: i64,
    minimum: Decimal,
) -> Option<(Vec<Part>, Decimal)> {
    let budget = Decimal::new(allowed_cents, 2);
    if base_fee > budget {
        return None;
    }
    let mut total = base_fee;
    let mut out = Vec::new();
    for &(id, from, to, amount) in parts {
        if let Some(t) = total.checked_add(amount)
            && t <= budget
        {
            total = t;
            out.push((id, from, to, amount));
            continue;
        }
        if price > Decimal::ZERO {
            let fit = ((budget - total) * Decimal::from(10_000) / price)
                .floor()
                .to_i64()
                .unwrap_or(0)
                .min(to - from - 1);
            if fit > 0 {
                let amount = Decimal::from(fit) * price / Decimal::from(10_000);
                total += amount;
                out.push((id, from, from + fit, amount));
            }
        }
        break;
    }
    let usage = total - base_fee;
    let cents = charge_cents(total, minimum);
    (!total.is_zero() && cents <= allowed_cents).then_some((out, usage))
}

/// One intent for exactly `parts` (and the base fee, if any), with `charge_escrow`
/// enqueued in the same transaction.
async fn create_intent(
    tx: &mut PgConnection,
    customer_id: i32,
    service_type: &str,
    (usage, base_fee, amount_cents): (Decimal, Decimal, i64),
    parts: &[Part],
    (month, fee_month): (NaiveDate, Option<NaiveDate>),
    report: &mut BillReport,
) -> Result<(), sqlx::Error> {
    let intent_id = Uuid::new_v4();
    let amount = Decimal::new(amount_cents, 2);
    sqlx::query!(
        r#"INSERT INTO charge_intents (intent_id, customer_id, service_type, amount, usage_amount,
           base_fee_amount, base_fee_month, billing_month, first_record_id, last_record_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"#,
        intent_id,
        customer_id,
        service_type,
        amount,
        usage,
        base_fee,
        fee_month,
        month,
        parts.first().map(|p| p.0),
        parts.last().map(|p| p.0),
    )
    .execute(&mut *tx)
    .await?;
    if !parts.is_empty() {
        let ids: Vec<i64> = parts.iter().map(|p| p.0).collect();
        let froms: Vec<i64> = parts.iter().map(|p| p.1).collect();
        let tos: Vec<i64> = parts.iter().map(|p| p.2).collect();
        let amounts: Vec<Decimal> = parts.iter().map(|p| p.3).collect();
        sqlx::query!(
            r#"WITH s AS (SELECT * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::numeric[])
                        AS t(record_id, from_count, to_count, amount)),
             ins AS (INSERT INTO charge_intent_records (intent_id, record_id, from_count, to_count, amount)
                     SELECT $1, record_id, from_count, to_count, amount FROM s)
             UPDATE usage_records u SET billed_count = s.to_count FROM s WHERE u.record_id = s.record_id"#,
            intent_id,
            &ids,
            &froms,
            &tos,
            &amounts,
        )
        .execute(&mut *tx)
        .await?;
    }
    enqueue_on(tx, &ChargeEscrow { intent_id }, EnqueueOptions::default())
        .await
        .map_err(longshore_workers::EnqueueError::into_sqlx)?;
    metrics::counter!(crate::telemetry::BILLING_INTENTS).increment(1);
    tracing::info!(
        customer_id,
        service_type,
        %intent_id,
        amount = %amount,
        records = parts.len(),
        "charge intent created"
    );
    report.intents.push(json!({
        "intent_id": intent_id,
        "customer_id": customer_id,
        "service_type": service_type,
        "amount_usd": usd(amount_cents),
        "usage_usd": usage.normalize().to_string(),
        "base_fee_usd": base_fee.normalize().to_string(),
        "records": parts.len(),
    }));
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
    sqlx::query!(
        r#"UPDATE service_instances SET state = 'suspended', suspend_reason = $3, suspend_details = $4,
           suspended_at = CASE WHEN state = 'suspended' THEN suspended_at ELSE now() END
         WHERE customer_id = $1 AND service_type = $2"#,
        customer_id,
        &s.service_type,
        refusal.code,
        &refusal.details,
    )
    .execute(&mut *tx)
    .await?;
    if changed {
        metrics::counter!(crate::telemetry::BILLING_SUSPENSIONS, "reason" => refusal.code)
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
    sqlx::query!(
        r#"UPDATE service_instances SET state = 'active', suspend_reason = NULL,
           suspend_details = NULL, suspended_at = NULL
         WHERE customer_id = $1 AND service_type = $2"#,
        customer_id,
        service_type,
    )
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
