//! `charge_escrow {intent_id}`: moves a charge intent to the chain exactly once.
//!
//! Each step is its own transaction and a compare-and-set on the intent's state, so a
//! crash anywhere resumes from the row, and two runs for one intent cannot both act:
//! 1. `created` → latest blockhash, build and sign (transfer_checked as the delegate +
//!    memo `longshore:charge:<intent_id>`), store bytes, signature and the
//!    transaction's `last_valid_block_height` → `signed`. Nothing is sent before the
//!    bytes are stored.
//! 2. `signed`/`sent` → read the tip (height and slot from one answer), then the
//!    status of **every** signature the intent ever had (`charge_intent_signatures`).
//!    - One landed → confirm it (landing is proof from any node).
//!    - The current one landed with a program error → fail (the fee was paid, nothing
//!      moved; every earlier signature was dead before it was signed).
//!    - Unknown and the tip is still within its validity → send the **same bytes**
//!      again and poll. A preflight refusal of the first send of a signature fails
//!      the intent; a refusal of a resend is no proof (a node whose accounts have the
//!      transfer but whose status view does not refuses it), so it is noted and the
//!      intent fails only once every signature is shown dead.
//!    - Unknown and the tip is past its validity by a safety margin → it may be dead.
//!      Proof needs a status answer from a node at or past the tip's slot, and a memo
//!      search of the escrow's history (`minContextSlot` = that slot) that reaches
//!      back before the first signature could land and finds no transfer that is
//!      really the charge (from the escrow, signed by our delegate, for the amount,
//!      with exactly the memo). Only then: sign a new one (same memo), kept beside the
//!      others. An answer from a lagging node, or a history that is too short, proves
//!      nothing: the intent waits.
//!    - A delegate that cannot pay the fee (no SOL) is the operator's problem: the
//!      job snoozes (`fee_payer_retry`), nothing fails, the customer is untouched.
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
use std::time::Instant;

use longshore_workers::{Handler, JobArgs, JobContext, JobError, Outcome};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::config::BillingConfig;
use super::regenerate_vault::request_regeneration;
use crate::clients::chain::{
    Blockhash, Chain, ChainError, Charge, MemoSearch, SignedTx, TxStatus, UNITS_PER_CENT,
    find_charge, memo_for,
};

/// A transaction is treated as possibly expired only when the chain's height is past
/// its `last_valid_block_height` by this many blocks (about 13 s); the proof itself
/// rests on answers from nodes at or past the slot that height was read at.
pub const EXPIRY_MARGIN_BLOCKS: u64 = 32;
pub const CHARGE_FAILED: &str = "charge_failed";
/// Solana's fee for a transaction with one signature.
pub const MIN_FEE_LAMPORTS: u64 = 5_000;

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
        let chain = self.chain.get_or_init(|| self.cfg.chain_client());
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
            // The operator's to fix (the delegate's SOL): the charge waits without
            // spending its attempts, and the customer is not touched.
            Err(Step::Chain(e @ ChainError::FeePayer(_))) => {
                tracing::warn!(intent_id = %a.intent_id, error = %e, "the delegate cannot pay the fee; the charge waits");
                Outcome::snooze(self.cfg.chain.fee_payer_retry)
            }
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

/// One signature an intent had: the exact bytes, when they stop being valid, the slot
/// at or before which they cannot land, and the escrow they are from. (How often each
/// was sent is counted in the row, for the compare-and-set of a refusal.)
struct Sig {
    signature: String,
    bytes: Vec<u8>,
    lvbh: u64,
    signed_slot: u64,
    source: String,
}

struct Intent {
    state: String,
    customer_id: i32,
    service_type: String,
    amount: Decimal,
    escrow_account: Option<String>,
    /// A refusal that fails the intent once no signature can still land.
    rejection: Option<String>,
    /// The signature the intent now carries (the newest; every earlier one was shown
    /// dead before it was signed).
    current: Option<String>,
    /// Every signature it ever had.
    sigs: Vec<Sig>,
}

impl Intent {
    fn current(&self) -> Option<&Sig> {
        let c = self.current.as_deref()?;
        self.sigs.iter().find(|s| s.signature == c)
    }

    fn units(&self) -> Option<u64> {
        (self.amount * Decimal::ONE_HUNDRED)
            .to_u64()
            .filter(|c| Decimal::from(*c) == self.amount * Decimal::ONE_HUNDRED)
            .and_then(|c| c.checked_mul(UNITS_PER_CENT))
    }
}

/// What the driver does after judging the chain's answers.
enum Next {
    /// The row moved (confirmed, failed, signed anew): load it and go on.
    Again,
    /// Sent or in flight: poll for it a while.
    Wait,
}

pub struct Driver<'a> {
    pub pool: PgPool,
    pub chain: &'a dyn Chain,
    pub cfg: &'a BillingConfig,
    pub intent_id: Uuid,
}

impl Driver<'_> {
    async fn load(&self) -> Result<Intent, Step> {
        let r = sqlx::query!(
            r#"SELECT i.state, i.customer_id, i.service_type, i.amount, i.signature,
                    i.rejection, c.escrow_account
             FROM charge_intents i JOIN customers c USING (customer_id) WHERE intent_id = $1"#,
            self.intent_id,
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Step::Missing)?;
        let sigs = sqlx::query!(
            r#"SELECT signature, signed_tx, last_valid_block_height, signed_slot, source
             FROM charge_intent_signatures WHERE intent_id = $1 ORDER BY created_at, signature"#,
            self.intent_id,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| Sig {
            signature: r.signature,
            bytes: r.signed_tx,
            lvbh: r.last_valid_block_height.max(0) as u64,
            signed_slot: r.signed_slot.max(0) as u64,
            source: r.source,
        })
        .collect();
        Ok(Intent {
            state: r.state,
            customer_id: r.customer_id,
            service_type: r.service_type,
            amount: r.amount,
            current: r.signature,
            rejection: r.rejection,
            escrow_account: r.escrow_account,
            sigs,
        })
    }

    /// Runs the intent as far as it goes now: `Some(result)` when it is confirmed or
    /// failed, `None` when it was sent and is not confirmed yet.
    pub async fn drive(&self) -> Result<Option<serde_json::Value>, Step> {
        loop {
            let i = self.load().await?;
            let next = match i.state.as_str() {
                "confirmed" | "failed" => {
                    return Ok(Some(json!({
                        "intent_id": self.intent_id,
                        "state": i.state,
                        "signature": i.current,
                    })));
                }
                "created" => {
                    self.sign(&i, None).await?;
                    Next::Again
                }
                _ if i.current().is_none() => {
                    // A row from before every signature was kept: nothing to judge by.
                    return Err(Step::Chain(ChainError::Unavailable(
                        "the intent's signature is not in charge_intent_signatures".into(),
                    )));
                }
                _ => self.judge(&i).await?,
            };
            match next {
                Next::Again => continue,
                Next::Wait => return self.poll(&i).await,
            }
        }
    }

    /// Reads the chain about every signature the intent had and acts on what it
    /// proves. Landing is proof from any node; absence is proof only from a node at or
    /// past the height the expiry rests on, with the memo search agreeing.
    async fn judge(&self, i: &Intent) -> Result<Next, Step> {
        let chain = Step::Chain;
        let cur = i.current().expect("checked by drive");
        let all: Vec<String> = i.sigs.iter().map(|s| s.signature.clone()).collect();
        // A driver is at work: the sweep leaves this intent to it.
        self.touch().await?;
        // Height and slot from one answer, before the statuses: a transaction that
        // lands at its last valid height is seen by the reads that follow.
        let tip = self.chain.tip().await.map_err(chain)?;
        let st = self.chain.signature_statuses(&all).await.map_err(chain)?;
        for (sig, status) in all.iter().zip(&st.value) {
            if matches!(status, Some(TxStatus::Landed { err: None, .. })) {
                self.confirm(i, sig).await?;
                return Ok(Next::Again);
            }
        }
        let at = all
            .iter()
            .position(|s| *s == cur.signature)
            .expect("listed");
        match st.value.get(at).cloned().flatten() {
            // Landed and refused by the program: the fee was paid, nothing moved, and
            // every earlier signature was dead before this one was signed.
            Some(TxStatus::Landed { err: Some(e), .. }) => {
                let reason = format!("the chain rejected the transfer: {e}");
                self.fail(i, &reason, None).await?;
                Ok(Next::Again)
            }
            Some(TxStatus::Pending) => Ok(Next::Wait),
            Some(TxStatus::Landed { err: None, .. }) => unreachable!("confirmed above"),
            None if tip.height <= cur.lvbh => self.send(i, cur).await,
            None if tip.height > cur.lvbh + EXPIRY_MARGIN_BLOCKS => {
                self.prove_dead(i, tip.slot, st.slot).await
            }
            // Past its height but within the margin: wait for certainty.
            None => Ok(Next::Wait),
        }
    }

    /// Sends the current signature's exact bytes again.
    async fn send(&self, i: &Intent, cur: &Sig) -> Result<Next, Step> {
        let Some(attempt) = self.count_send(&cur.signature).await? else {
            return Ok(Next::Again); // another driver moved the intent
        };
        let tx = SignedTx {
            bytes: cur.bytes.clone(),
            signature: cur.signature.clone(),
        };
        // Only a node that has seen the block the blockhash is from may judge it (a
        // node behind it would refuse it for what it has not seen yet).
        match self.chain.send(&tx, Some(cur.signed_slot)).await {
            Ok(_) => {
                self.mark_sent(&cur.signature).await?;
                Ok(Next::Wait)
            }
            Err(ChainError::Rejected(e)) => {
                let reason = format!("the chain rejected the transfer: {e}");
                if attempt == 1 {
                    // A preflight refusal of the first attempt: these bytes never
                    // left the node, and every earlier signature is dead.
                    self.fail(i, &reason, Some(1)).await?;
                    return Ok(Next::Again);
                }
                // An earlier attempt may have landed it (a node whose state has the
                // transfer but whose status view does not refuses the resend): the
                // refusal stands only once no signature can land any more.
                tracing::warn!(intent_id = %self.intent_id, signature = cur.signature, reason, "resend refused; the intent fails only once every signature is shown dead");
                self.note_rejection(&cur.signature, &reason).await?;
                Ok(Next::Wait)
            }
            Err(e @ ChainError::FeePayer(_)) => {
                observe_fee_payer(self.chain, self.cfg).await;
                Err(Step::Chain(e))
            }
            // A timeout may have landed it: the next look finds it.
            Err(e) => Err(Step::Chain(e)),
        }
    }

    /// Every signature is past its validity: only a fresh enough status answer and a
    /// complete memo search show that none landed; then re-sign (or fail, if the chain
    /// refused the charge).
    async fn prove_dead(&self, i: &Intent, tip_slot: u64, status_slot: u64) -> Result<Next, Step> {
        if status_slot < tip_slot {
            tracing::info!(intent_id = %self.intent_id, status_slot, tip_slot, "statuses from a node behind the height read: no proof of expiry; waiting");
            return Ok(Next::Wait);
        }
        let (Some(units), Some(back_to)) = (i.units(), i.sigs.iter().map(|s| s.signed_slot).min())
        else {
            return Ok(Next::Wait);
        };
        // Each signature's own source (the escrow it was signed against).
        let all: Vec<String> = i.sigs.iter().map(|s| s.signature.clone()).collect();
        let mut sources: Vec<&str> = i.sigs.iter().map(|s| s.source.as_str()).collect();
        sources.sort_unstable();
        sources.dedup();
        for source in sources {
            match find_charge(
                self.chain,
                &self.intent_id,
                source,
                units,
                &all,
                tip_slot,
                back_to,
            )
            .await
            .map_err(Step::Chain)?
            {
                MemoSearch::Found(sig) => {
                    tracing::warn!(intent_id = %self.intent_id, signature = sig, "charge found in the escrow's history");
                    self.confirm(i, &sig).await?;
                    return Ok(Next::Again);
                }
                MemoSearch::Incomplete(why) => {
                    // For an alert (an intent stuck here never re-signs on its own).
                    metrics::counter!(crate::telemetry::CHAIN_MEMO_SEARCH_INCOMPLETE).increment(1);
                    tracing::warn!(intent_id = %self.intent_id, why, "memo search incomplete: no proof of expiry; waiting");
                    return Ok(Next::Wait);
                }
                MemoSearch::NotFound => {}
            }
        }
        if let Some(reason) = &i.rejection {
            self.fail(i, reason, None).await?;
            return Ok(Next::Again);
        }
        // A delegate that cannot pay the fee would only expire the next one too (and
        // pile up signatures): wait for its SOL.
        if let Ok(lamports) = self.chain.fee_payer_lamports().await
            && lamports < MIN_FEE_LAMPORTS
        {
            observe_fee_payer(self.chain, self.cfg).await;
            return Err(Step::Chain(ChainError::FeePayer(format!(
                "the delegate has {lamports} lamports, less than one fee; not signing anew"
            ))));
        }
        tracing::warn!(intent_id = %self.intent_id, signatures = i.sigs.len(), "every transaction expired unseen; signing a new one");
        self.sign(i, Some(tip_slot)).await?;
        Ok(Next::Again)
    }

    /// Builds and signs the charge (a new blockhash, the same memo) and stores it
    /// beside every earlier signature. A charge that cannot be built (row 23) or that
    /// the chain refuses fails the intent instead.
    async fn sign(&self, i: &Intent, min_context_slot: Option<u64>) -> Result<(), Step> {
        let signed = match self.charge(i) {
            Ok(charge) => match self.chain.latest_blockhash(min_context_slot).await {
                Ok(bh) => self
                    .chain
                    .sign_charge(&charge, &bh)
                    .await
                    .map(|s| (s, bh, charge.source)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match signed {
            Ok((s, bh, source)) => self.store_signed(i, &s, &bh, &source).await,
            Err(e @ (ChainError::Invalid(_) | ChainError::Rejected(_))) => {
                self.fail(i, &e.to_string(), None).await
            }
            Err(e) => Err(Step::Chain(e)),
        }
    }

    /// Polls every signature until one lands or `confirm_timeout` passes.
    async fn poll(&self, i: &Intent) -> Result<Option<serde_json::Value>, Step> {
        let all: Vec<String> = i.sigs.iter().map(|s| s.signature.clone()).collect();
        let deadline = Instant::now() + self.cfg.chain.confirm_timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(self.cfg.chain.poll_interval).await;
            match self.chain.signature_statuses(&all).await {
                Ok(st) => {
                    // Any signature that landed well; a refusal that landed only if it
                    // is the current one's (an earlier one's moved nothing).
                    let current = i.current.as_deref();
                    let landed = all.iter().zip(&st.value).find_map(|(s, v)| match v {
                        Some(TxStatus::Landed { err: None, .. }) => Some((s, None)),
                        Some(TxStatus::Landed { err, .. }) if Some(s.as_str()) == current => {
                            Some((s, err.clone()))
                        }
                        _ => None,
                    });
                    match landed {
                        Some((sig, None)) => {
                            self.confirm(i, sig).await?;
                            return Box::pin(self.drive()).await;
                        }
                        // A refusal that landed: judged with everything else.
                        Some((_, Some(_))) => return Box::pin(self.drive()).await,
                        None => {}
                    }
                }
                Err(e) => tracing::debug!(error = %e, "status poll failed; polling on"),
            }
        }
        Ok(None)
    }

    fn charge(&self, i: &Intent) -> Result<Charge, ChainError> {
        let source = i
            .escrow_account
            .clone()
            .ok_or_else(|| ChainError::Invalid("the customer has no escrow account".into()))?;
        let units = i.units().ok_or_else(|| {
            ChainError::Invalid(format!("amount {} is not whole cents", i.amount))
        })?;
        let charge = Charge {
            source,
            amount: units,
            memo: memo_for(&self.intent_id),
        };
        crate::clients::chain::validate_charge(&charge, self.cfg.chain.max_charge_units())?;
        Ok(charge)
    }

    /// Stores a new signature, in place of the current one (which was shown dead) or
    /// as the first.
    async fn store_signed(
        &self,
        i: &Intent,
        signed: &SignedTx,
        bh: &Blockhash,
        source: &str,
    ) -> Result<(), Step> {
        let replacing = i.current.as_deref();
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query!(
            r#"UPDATE charge_intents SET state = 'signed', signature = $2, signed_tx = $3,
               last_valid_block_height = $4, attempts = attempts + 1, sends = 0,
               rejection = NULL, updated_at = now()
             WHERE intent_id = $1 AND ((state = 'created' AND $5::text IS NULL)
                                       OR (state IN ('signed', 'sent') AND signature = $5))"#,
            self.intent_id,
            &signed.signature,
            &signed.bytes,
            bh.last_valid_block_height as i64,
            replacing,
        )
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(()); // another driver got there first
        }
        sqlx::query!(
            r#"INSERT INTO charge_intent_signatures
               (intent_id, signature, signed_tx, last_valid_block_height, signed_slot, source)
             VALUES ($1, $2, $3, $4, $5, $6)"#,
            self.intent_id,
            &signed.signature,
            &signed.bytes,
            bh.last_valid_block_height as i64,
            bh.slot as i64,
            source,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(intent_id = %self.intent_id, signature = signed.signature, last_valid_block_height = bh.last_valid_block_height, signatures = i.sigs.len() + 1, "charge signed");
        Ok(())
    }

    /// Counts a send attempt of `sig` before it is made; `None` when the intent no
    /// longer carries it (another driver moved it). The count is on the intent's row:
    /// a concurrent `fail` on a first refusal and this count serialise on its lock.
    async fn count_send(&self, sig: &str) -> Result<Option<i32>, Step> {
        Ok(sqlx::query_scalar!(
            r#"WITH i AS (UPDATE charge_intents SET sends = sends + 1, updated_at = now()
                        WHERE intent_id = $1 AND state IN ('signed', 'sent') AND signature = $2
                        RETURNING sends),
                  s AS (UPDATE charge_intent_signatures SET sends = sends + 1
                        WHERE signature = $2 AND EXISTS (SELECT 1 FROM i))
             SELECT sends AS "sends!" FROM i"#,
            self.intent_id,
            sig,
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn touch(&self) -> Result<(), Step> {
        sqlx::query!(
            r#"UPDATE charge_intents SET updated_at = now()
             WHERE intent_id = $1 AND state IN ('signed', 'sent')"#,
            self.intent_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_sent(&self, sig: &str) -> Result<(), Step> {
        sqlx::query!(
            r#"UPDATE charge_intents SET state = 'sent', rejection = NULL, updated_at = now()
             WHERE intent_id = $1 AND state IN ('signed', 'sent') AND signature = $2"#,
            self.intent_id,
            sig,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn note_rejection(&self, sig: &str, reason: &str) -> Result<(), Step> {
        sqlx::query!(
            r#"UPDATE charge_intents SET rejection = $3, last_error = $3, updated_at = now()
             WHERE intent_id = $1 AND state IN ('signed', 'sent') AND signature = $2"#,
            self.intent_id,
            sig,
            reason,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The bookkeeping of a landed charge, once: only if the intent still carries the
    /// signature this driver judged by (two drivers cannot settle it differently).
    async fn confirm(&self, i: &Intent, sig: &str) -> Result<(), Step> {
        let mut tx = self.pool.begin().await?;
        let won = sqlx::query_scalar!(
            r#"UPDATE charge_intents SET state = 'confirmed', signature = $2, last_error = NULL,
               rejection = NULL, updated_at = now()
             WHERE intent_id = $1 AND state IN ('signed', 'sent') AND signature = $3
             RETURNING billing_month"#,
            self.intent_id,
            sig,
            i.current.as_deref(),
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(billing_month) = won else {
            return Ok(()); // another run confirmed, failed or re-signed it
        };
        let cents = (i.amount * Decimal::ONE_HUNDRED)
            .to_i64()
            .expect("whole cents");
        sqlx::query!(
            r#"UPDATE usage_records u SET charged_amount = coalesce(u.charged_amount, 0) + r.amount
             FROM charge_intent_records r
             WHERE r.intent_id = $1 AND NOT r.released AND u.record_id = r.record_id"#,
            self.intent_id,
        )
        .execute(&mut *tx)
        .await?;
        // The month it counts against: this month, or last month if it was created
        // before a monthly reset (older months are history only).
        sqlx::query!(
            r#"UPDATE customers SET current_balance_usd_cents = current_balance_usd_cents - $2,
               current_month_charged_usd_cents = current_month_charged_usd_cents
                 + CASE WHEN $3 = current_month_start THEN $2 ELSE 0 END,
               last_month_charged_usd_cents = last_month_charged_usd_cents
                 + CASE WHEN $3 = (current_month_start - interval '1 month')::date THEN $2 ELSE 0 END,
               updated_at = now()
             WHERE customer_id = $1"#,
            i.customer_id,
            cents,
            billing_month,
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            r#"INSERT INTO escrow_transactions (customer_id, tx_digest, tx_type, amount, asset_type)
             VALUES ($1, $2, 'charge', $3, 'USDC')"#,
            i.customer_id,
            sig,
            i.amount,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!(crate::telemetry::BILLING_CHARGES, "outcome" => "confirmed").increment(1);
        tracing::info!(intent_id = %self.intent_id, customer_id = i.customer_id, amount = %i.amount, signature = sig, "charge confirmed");
        observe_fee_payer(self.chain, self.cfg).await;
        Ok(())
    }

    /// A charge that cannot happen: release its usage, suspend the service. Only if
    /// the intent still carries the signature judged by and, with `max_sends`, that
    /// signature was sent no more often than that (a concurrent resend may be out).
    async fn fail(&self, i: &Intent, reason: &str, max_sends: Option<i32>) -> Result<(), Step> {
        let mut tx = self.pool.begin().await?;
        let won = sqlx::query!(
            r#"UPDATE charge_intents SET state = 'failed', last_error = $2, updated_at = now()
             WHERE intent_id = $1 AND state IN ('created', 'signed', 'sent')
               AND signature IS NOT DISTINCT FROM $3
               AND ($4::int IS NULL OR sends <= $4)"#,
            self.intent_id,
            reason,
            i.current.as_deref(),
            max_sends,
        )
        .execute(&mut *tx)
        .await?;
        if won.rows_affected() == 0 {
            return Ok(());
        }
        sqlx::query!(
            r#"WITH rel AS (UPDATE charge_intent_records SET released = true
                          WHERE intent_id = $1 AND NOT released RETURNING record_id, from_count)
             UPDATE usage_records u SET billed_count = rel.from_count FROM rel
             WHERE u.record_id = rel.record_id"#,
            self.intent_id,
        )
        .execute(&mut *tx)
        .await?;
        let details = json!({"intent_id": self.intent_id, "error": reason});
        sqlx::query!(
            r#"UPDATE service_instances SET state = 'suspended', suspend_reason = $3,
               suspend_details = $4, suspended_at = coalesce(suspended_at, now())
             WHERE customer_id = $1 AND service_type = $2"#,
            i.customer_id,
            &i.service_type,
            CHARGE_FAILED,
            &details,
        )
        .execute(&mut *tx)
        .await?;
        if !self.cfg.vault_path.is_empty() {
            request_regeneration(&mut tx, &self.cfg.vault_path, self.cfg.vault_coalesce)
                .await
                .map_err(|e| Step::Db(e.into_sqlx()))?;
        }
        tx.commit().await?;
        metrics::counter!(crate::telemetry::BILLING_CHARGES, "outcome" => "failed").increment(1);
        tracing::warn!(intent_id = %self.intent_id, customer_id = i.customer_id, service_type = i.service_type, reason, "charge failed; service suspended");
        Ok(())
    }
}

/// Reads the delegate's SOL into `longshore_chain_delegate_lamports` and warns below
/// `billing.chain.delegate_low_lamports`. Best effort: a failed read only logs.
pub async fn observe_fee_payer(chain: &dyn Chain, cfg: &BillingConfig) {
    match chain.fee_payer_lamports().await {
        Ok(u64::MAX) => {} // a chain without fees (the simulator)
        Ok(lamports) => {
            metrics::gauge!(crate::telemetry::CHAIN_DELEGATE_LAMPORTS).set(lamports as f64);
            if lamports < cfg.chain.delegate_low_lamports {
                tracing::warn!(
                    delegate = chain.delegate(),
                    lamports,
                    threshold = cfg.chain.delegate_low_lamports,
                    "the delegate is low on SOL: charges wait once it cannot pay fees; top it up"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "reading the delegate's balance failed"),
    }
}
