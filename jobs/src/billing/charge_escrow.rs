//! `charge_escrow {intent_id}`: moves a charge intent to the chain exactly once.
//!
//! Each step is its own transaction and a compare-and-set on the intent's state, so a
//! crash anywhere resumes from the row, and two runs for one intent cannot both act:
//! 1. `created` → latest blockhash, build and sign (transfer_checked as the delegate +
//!    memo `longshore:charge:<intent_id>`), store bytes, signature and the
//!    transaction's `last_valid_block_height` → `signed`. Nothing is sent before the
//!    bytes are stored.
//! 2. `signed`/`sent` → always look the stored signature up first. Landed → confirm
//!    (or fail if the program rejected it). Unknown and the chain's height is still
//!    within the transaction's validity → send the **same bytes** (`sent`) and poll.
//!    Unknown and the height has passed it by a safety margin → that transaction can
//!    never land; only then sign a new one (the memo stays the same). The height is
//!    read *before* the status, so a transaction that landed at its last valid height
//!    is seen.
//! 3. Confirmed → in one transaction: usage records get `charged_amount`, the customer's
//!    balance and month total move, an `escrow_transactions` row is written (its
//!    `tx_digest` is the signature, unique).
//! 4. Rejected by the chain (allowance, funds, bad account) or invalid before building
//!    (row 23) → `failed`, the slices are released (billable again), the service is
//!    suspended with the reason (`charge_failed`), and the vault drops its keys.
//!
//! With no chain configured (`billing.chain.backend = "none"`) intents wait: the job
//! retries and nothing is lost. `sweep_charge_intents` re-drives intents left in
//! `created`/`signed`/`sent` (for example after their job was dead-lettered).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::config::BillingConfig;
use super::vault::request_regeneration;
use crate::clients::chain::{
    Chain, ChainError, Charge, SignedTx, TxStatus, UNITS_PER_CENT, memo_for,
};

/// A transaction is treated as expired only when the chain's height is past its
/// `last_valid_block_height` by this many blocks (about 13 s): a node behind a load
/// balancer that lags the one that answered the status must not make us re-sign.
pub const EXPIRY_MARGIN_BLOCKS: u64 = 32;
pub const CHARGE_FAILED: &str = "charge_failed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChargeEscrow {
    pub intent_id: Uuid,
}

impl JobArgs for ChargeEscrow {
    const KIND: &'static str = "charge_escrow";
}

pub struct ChargeEscrowHandler {
    cfg: Arc<BillingConfig>,
    /// Built on first use, so only processes that charge start a chain client.
    chain: OnceLock<Option<Arc<dyn Chain>>>,
}

impl ChargeEscrowHandler {
    /// The chain `billing.chain` names.
    pub fn new(cfg: Arc<BillingConfig>) -> Self {
        ChargeEscrowHandler {
            cfg,
            chain: OnceLock::new(),
        }
    }

    /// A given chain (tests, embedding).
    pub fn with_chain(cfg: Arc<BillingConfig>, chain: Option<Arc<dyn Chain>>) -> Self {
        ChargeEscrowHandler {
            cfg,
            chain: OnceLock::from(chain),
        }
    }
}

impl Handler for ChargeEscrowHandler {
    type Args = ChargeEscrow;

    async fn handle(&self, a: ChargeEscrow, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let chain = self.chain.get_or_init(|| {
            let chain = self.cfg.chain.build().expect("validated with the config");
            if let Some(c) = &chain {
                tracing::info!(chain = c.describe(), "charge_escrow: chain client ready");
            }
            chain
        });
        let Some(chain) = chain else {
            return Err(JobError::retry(
                "billing.chain.backend is \"none\": the intent waits for a configured chain",
            ));
        };
        let d = Driver {
            pool: ctx.pool().clone(),
            chain: chain.as_ref(),
            cfg: &self.cfg,
            intent_id: a.intent_id,
        };
        match d.drive().await {
            Ok(Some(done)) => Outcome::done_with(done),
            // Sent but not confirmed within confirm_timeout: come back and look again.
            Ok(None) => Outcome::snooze(self.cfg.chain.poll_interval * 4),
            Err(Step::Db(e)) => Err(e.into()),
            Err(Step::Chain(e)) => Err(JobError::retry(e)),
            Err(Step::Missing) => Err(JobError::fail(format!("no intent {}", a.intent_id))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Step {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("chain: {0}")]
    Chain(ChainError),
    #[error("no such intent")]
    Missing,
}

struct Intent {
    state: String,
    customer_id: i32,
    service_type: String,
    amount: Decimal,
    signature: Option<String>,
    signed_tx: Option<Vec<u8>>,
    last_valid_block_height: Option<i64>,
    escrow_account: Option<String>,
}

pub struct Driver<'a> {
    pub pool: PgPool,
    pub chain: &'a dyn Chain,
    pub cfg: &'a BillingConfig,
    pub intent_id: Uuid,
}

impl Driver<'_> {
    async fn load(&self) -> Result<Intent, Step> {
        let r = sqlx::query(
            "SELECT i.state, i.customer_id, i.service_type::text, i.amount, i.signature::text, \
                    i.signed_tx, i.last_valid_block_height, c.escrow_account::text \
             FROM charge_intents i JOIN customers c USING (customer_id) WHERE intent_id = $1",
        )
        .bind(self.intent_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Step::Missing)?;
        Ok(Intent {
            state: r.try_get(0)?,
            customer_id: r.try_get(1)?,
            service_type: r.try_get(2)?,
            amount: r.try_get(3)?,
            signature: r.try_get(4)?,
            signed_tx: r.try_get(5)?,
            last_valid_block_height: r.try_get(6)?,
            escrow_account: r.try_get(7)?,
        })
    }

    /// Runs the intent as far as it goes now: `Some(result)` when it is confirmed or
    /// failed, `None` when it was sent and is not confirmed yet.
    pub async fn drive(&self) -> Result<Option<serde_json::Value>, Step> {
        let chain = |e| Step::Chain(e);
        loop {
            let i = self.load().await?;
            match i.state.as_str() {
                "confirmed" | "failed" => {
                    return Ok(Some(json!({
                        "intent_id": self.intent_id,
                        "state": i.state,
                        "signature": i.signature,
                    })));
                }
                "created" => self.sign(&i, None).await?,
                _ => {
                    let sig = i
                        .signature
                        .clone()
                        .expect("signed intents have a signature");
                    let bytes = i.signed_tx.clone().expect("signed intents have bytes");
                    let lvbh = i.last_valid_block_height.unwrap_or(0) as u64;
                    // Height first, then status: a transaction that lands at its last
                    // valid height is seen by the status read that follows.
                    let height = self.chain.block_height().await.map_err(chain)?;
                    match self.status(&sig).await? {
                        Some(TxStatus::Landed { err: None }) => {
                            self.confirm(&i, &sig).await?;
                            continue;
                        }
                        Some(TxStatus::Landed { err: Some(e) }) => {
                            self.fail(&i, &format!("the chain rejected the transfer: {e}"))
                                .await?;
                            continue;
                        }
                        Some(TxStatus::Pending) => {}
                        None if height <= lvbh => {
                            let tx = SignedTx {
                                bytes,
                                signature: sig.clone(),
                            };
                            match self.chain.send(&tx).await {
                                Ok(_) => self.mark_sent(&sig).await?,
                                Err(ChainError::Rejected(e)) => {
                                    self.fail(&i, &format!("the chain rejected the transfer: {e}"))
                                        .await?;
                                    continue;
                                }
                                // A timeout may have landed it: the next look finds it.
                                Err(e) => return Err(chain(e)),
                            }
                        }
                        None if height > lvbh + EXPIRY_MARGIN_BLOCKS => {
                            // Proven expired. One more safety net: our memo on the
                            // escrow account's history.
                            if let Some(found) = self.find_by_memo(&i).await? {
                                self.confirm(&i, &found).await?;
                                continue;
                            }
                            tracing::warn!(intent_id = %self.intent_id, signature = sig, "transaction expired unseen; signing a new one");
                            self.sign(&i, Some(&sig)).await?;
                            continue;
                        }
                        // Past its height but within the margin: wait for certainty.
                        None => {}
                    }
                    return self.poll(&i, &sig).await;
                }
            }
        }
    }

    /// Builds and signs the charge (a new blockhash, the same memo) and stores it,
    /// replacing the expired signature `replacing` if given. A charge that cannot be
    /// built (row 23) or that the chain refuses fails the intent instead.
    async fn sign(&self, i: &Intent, replacing: Option<&str>) -> Result<(), Step> {
        let signed = match self.charge(i) {
            Ok(charge) => {
                let bh = self.chain.latest_blockhash().await.map_err(Step::Chain)?;
                self.chain
                    .sign_charge(&charge, &bh)
                    .await
                    .map(|s| (s, bh.last_valid_block_height))
            }
            Err(e) => Err(e),
        };
        match signed {
            Ok((s, lvbh)) => self.store_signed(replacing, &s, lvbh).await,
            Err(e @ (ChainError::Invalid(_) | ChainError::Rejected(_))) => {
                self.fail(i, &e.to_string()).await
            }
            Err(e) => Err(Step::Chain(e)),
        }
    }

    /// Polls the signature until it lands or `confirm_timeout` passes.
    async fn poll(&self, i: &Intent, sig: &str) -> Result<Option<serde_json::Value>, Step> {
        let deadline = Instant::now() + self.cfg.chain.confirm_timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(self.cfg.chain.poll_interval).await;
            match self.status(sig).await {
                Ok(Some(TxStatus::Landed { err: None })) => {
                    self.confirm(i, sig).await?;
                    return Box::pin(self.drive()).await;
                }
                Ok(Some(TxStatus::Landed { err: Some(e) })) => {
                    self.fail(i, &format!("the chain rejected the transfer: {e}"))
                        .await?;
                    return Box::pin(self.drive()).await;
                }
                Ok(_) => {}
                Err(Step::Chain(e)) => {
                    tracing::debug!(error = %e, "status poll failed; polling on");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    async fn status(&self, sig: &str) -> Result<Option<TxStatus>, Step> {
        let mut v = self
            .chain
            .signature_statuses(&[sig.to_string()])
            .await
            .map_err(Step::Chain)?;
        Ok(v.pop().flatten())
    }

    async fn find_by_memo(&self, i: &Intent) -> Result<Option<String>, Step> {
        let Some(acct) = &i.escrow_account else {
            return Ok(None);
        };
        let memo = memo_for(&self.intent_id);
        let sigs = self
            .chain
            .signatures_for_address(acct, 1000)
            .await
            .map_err(Step::Chain)?;
        Ok(sigs
            .into_iter()
            .find(|s| s.err.is_none() && s.memo.as_deref().is_some_and(|m| m.contains(&memo)))
            .map(|s| s.signature))
    }

    fn charge(&self, i: &Intent) -> Result<Charge, ChainError> {
        let source = i
            .escrow_account
            .clone()
            .ok_or_else(|| ChainError::Invalid("the customer has no escrow account".into()))?;
        let cents = (i.amount * Decimal::ONE_HUNDRED)
            .to_u64()
            .filter(|c| Decimal::from(*c) == i.amount * Decimal::ONE_HUNDRED)
            .ok_or_else(|| {
                ChainError::Invalid(format!("amount {} is not whole cents", i.amount))
            })?;
        let charge = Charge {
            source,
            amount: cents * UNITS_PER_CENT,
            memo: memo_for(&self.intent_id),
        };
        crate::clients::chain::validate_charge(&charge, self.cfg.chain.max_charge_units())?;
        Ok(charge)
    }

    async fn store_signed(
        &self,
        replacing: Option<&str>,
        signed: &SignedTx,
        lvbh: u64,
    ) -> Result<(), Step> {
        let r = sqlx::query(
            "UPDATE charge_intents SET state = 'signed', signature = $2, signed_tx = $3, \
               last_valid_block_height = $4, attempts = attempts + 1, updated_at = now() \
             WHERE intent_id = $1 AND ((state = 'created' AND $5::text IS NULL) \
                                       OR (state IN ('signed', 'sent') AND signature = $5))",
        )
        .bind(self.intent_id)
        .bind(&signed.signature)
        .bind(&signed.bytes)
        .bind(lvbh as i64)
        .bind(replacing)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            tracing::info!(intent_id = %self.intent_id, signature = signed.signature, last_valid_block_height = lvbh, "charge signed");
        }
        Ok(())
    }

    async fn mark_sent(&self, sig: &str) -> Result<(), Step> {
        sqlx::query(
            "UPDATE charge_intents SET state = 'sent', updated_at = now() \
             WHERE intent_id = $1 AND state IN ('signed', 'sent') AND signature = $2",
        )
        .bind(self.intent_id)
        .bind(sig)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The bookkeeping of a landed charge, once.
    async fn confirm(&self, i: &Intent, sig: &str) -> Result<(), Step> {
        let mut tx = self.pool.begin().await?;
        let won = sqlx::query(
            "UPDATE charge_intents SET state = 'confirmed', signature = $2, last_error = NULL, \
               updated_at = now() \
             WHERE intent_id = $1 AND state IN ('signed', 'sent') RETURNING billing_month",
        )
        .bind(self.intent_id)
        .bind(sig)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = won else {
            return Ok(()); // another run confirmed or failed it
        };
        let billing_month: chrono::NaiveDate = row.try_get(0)?;
        let cents = (i.amount * Decimal::ONE_HUNDRED)
            .to_i64()
            .expect("whole cents");
        sqlx::query(
            "UPDATE usage_records u SET charged_amount = coalesce(u.charged_amount, 0) + r.amount \
             FROM charge_intent_records r \
             WHERE r.intent_id = $1 AND NOT r.released AND u.record_id = r.record_id",
        )
        .bind(self.intent_id)
        .execute(&mut *tx)
        .await?;
        // The month it counts against: this month, or last month if it was created
        // before a monthly reset (older months are history only).
        sqlx::query(
            "UPDATE customers SET current_balance_usd_cents = current_balance_usd_cents - $2, \
               current_month_charged_usd_cents = current_month_charged_usd_cents \
                 + CASE WHEN $3 = current_month_start THEN $2 ELSE 0 END, \
               last_month_charged_usd_cents = last_month_charged_usd_cents \
                 + CASE WHEN $3 = (current_month_start - interval '1 month')::date THEN $2 ELSE 0 END, \
               updated_at = now() \
             WHERE customer_id = $1",
        )
        .bind(i.customer_id)
        .bind(cents)
        .bind(billing_month)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO escrow_transactions (customer_id, tx_digest, tx_type, amount, asset_type) \
             VALUES ($1, $2, 'charge', $3, 'USDC')",
        )
        .bind(i.customer_id)
        .bind(sig)
        .bind(i.amount)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!("longshore_billing_charges_total", "outcome" => "confirmed").increment(1);
        tracing::info!(intent_id = %self.intent_id, customer_id = i.customer_id, amount = %i.amount, signature = sig, "charge confirmed");
        Ok(())
    }

    /// A charge that cannot happen: release its usage, suspend the service.
    async fn fail(&self, i: &Intent, reason: &str) -> Result<(), Step> {
        let mut tx = self.pool.begin().await?;
        let won = sqlx::query(
            "UPDATE charge_intents SET state = 'failed', last_error = $2, updated_at = now() \
             WHERE intent_id = $1 AND state IN ('created', 'signed', 'sent')",
        )
        .bind(self.intent_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if won.rows_affected() == 0 {
            return Ok(());
        }
        sqlx::query(
            "WITH rel AS (UPDATE charge_intent_records SET released = true \
                          WHERE intent_id = $1 AND NOT released RETURNING record_id, from_count) \
             UPDATE usage_records u SET billed_count = rel.from_count FROM rel \
             WHERE u.record_id = rel.record_id",
        )
        .bind(self.intent_id)
        .execute(&mut *tx)
        .await?;
        let details = json!({"intent_id": self.intent_id, "error": reason});
        sqlx::query(
            "UPDATE service_instances SET state = 'suspended', suspend_reason = $3, \
               suspend_details = $4, suspended_at = coalesce(suspended_at, now()) \
             WHERE customer_id = $1 AND service_type = $2",
        )
        .bind(i.customer_id)
        .bind(&i.service_type)
        .bind(CHARGE_FAILED)
        .bind(&details)
        .execute(&mut *tx)
        .await?;
        if !self.cfg.vault_path.is_empty() {
            request_regeneration(&mut tx, &self.cfg.vault_path, self.cfg.vault_coalesce)
                .await
                .map_err(|e| Step::Db(e.into_sqlx()))?;
        }
        tx.commit().await?;
        metrics::counter!("longshore_billing_charges_total", "outcome" => "failed").increment(1);
        tracing::warn!(intent_id = %self.intent_id, customer_id = i.customer_id, service_type = i.service_type, reason, "charge failed; service suspended");
        Ok(())
    }
}

/// `sweep_charge_intents {older_than}` (scheduled): re-drives intents left in
/// `created`/`signed`/`sent` longer than `older_than` (their job may have been
/// dead-lettered, or a worker may have died holding it). One job per intent per
/// window, by idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepChargeIntents {
    #[serde(with = "humantime_serde")]
    pub older_than: Duration,
}

impl JobArgs for SweepChargeIntents {
    const KIND: &'static str = "sweep_charge_intents";
}

pub struct SweepChargeIntentsHandler;

impl Handler for SweepChargeIntentsHandler {
    type Args = SweepChargeIntents;

    async fn handle(
        &self,
        a: SweepChargeIntents,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT intent_id FROM charge_intents WHERE state IN ('created', 'signed', 'sent') \
             AND updated_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT 10000",
        )
        .bind(a.older_than.as_secs_f64())
        .fetch_all(ctx.pool())
        .await?;
        let mut enqueued = 0;
        for id in &ids {
            let opts = EnqueueOptions::default()
                .key(format!("sweep:{id}"))
                .ttl(a.older_than.max(Duration::from_secs(1)));
            let e = enqueue_on(ctx.tx().await?, &ChargeEscrow { intent_id: *id }, opts)
                .await
                .map_err(JobError::retry)?;
            enqueued += usize::from(!e.duplicate);
        }
        Outcome::done_with(json!({"stuck": ids.len(), "enqueued": enqueued}))
    }
}
