//! The chain seam for escrow charges: what `charge_escrow` needs from Solana, and
//! nothing more. Implementations: the dev simulator ([`super::chain_sim`]) and, for
//! production, the Solana RPC client.
//!
//! Money on chain is USDC in base units (6 decimals): one cent is 10,000 units.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// USDC base units per US cent (USDC has 6 decimals).
pub const UNITS_PER_CENT: u64 = 10_000;
pub const USDC_DECIMALS: u8 = 6;

/// The memo that marks a charge's transaction; the intent is findable on chain by it.
pub fn memo_for(intent_id: &uuid::Uuid) -> String {
    format!("longshore:charge:{intent_id}")
}

/// A transfer to make: `amount` base units from the customer's escrow token account,
/// as its approved delegate, to the treasury, with the memo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub source: String,
    pub amount: u64,
    pub memo: String,
}

/// A recent blockhash, the last block height at which a transaction using it can
/// still be processed, and the slot of the answer (no transaction using the hash can
/// land before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blockhash {
    pub hash: String,
    pub last_valid_block_height: u64,
    pub slot: u64,
}

/// The chain's block height and slot, read together from one node's answer: an expiry
/// decision rests on both, and a later answer from a node behind `slot` is no proof
/// of anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    pub height: u64,
    pub slot: u64,
}

/// Signature statuses as one node saw them at `slot` (its answer's `context.slot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statuses {
    pub slot: u64,
    pub value: Vec<Option<TxStatus>>,
}

/// A signed transaction: the exact bytes to (re)send and its signature (its id).
#[derive(Clone, PartialEq, Eq)]
pub struct SignedTx {
    pub bytes: Vec<u8>,
    pub signature: String,
}

impl fmt::Debug for SignedTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedTx")
            .field("signature", &self.signature)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What the chain knows of a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStatus {
    /// Processed at the configured commitment (or better); `err` when the program
    /// rejected it (the fee was paid, nothing moved).
    Landed {
        err: Option<String>,
        /// The slot it landed in: an account read from a node at or past it sees
        /// what it moved.
        slot: u64,
    },
    /// Seen but not yet at the configured commitment.
    Pending,
}

/// A transaction that touched an address, with its memo if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSignature {
    pub signature: String,
    pub slot: u64,
    pub memo: Option<String>,
    pub err: Option<String>,
}

/// A charge transfer found on chain: a successful transaction into the treasury that
/// carries a charge memo. Anyone can send the treasury a token with such a memo: only
/// [`ChargeTransfer::is_charge_of`] says whether it is really ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChargeTransfer {
    pub signature: String,
    /// The memo as written (`longshore:charge:<intent_id>`).
    pub memo: String,
    pub source: String,
    /// Who signed the transfer as the source's owner or delegate.
    pub authority: String,
    pub amount: u64,
}

impl ChargeTransfer {
    /// Whether this is the charge of `intent`: from its escrow account, signed by our
    /// delegate, for its amount, with exactly its memo.
    pub fn is_charge_of(
        &self,
        intent: &uuid::Uuid,
        escrow: &str,
        delegate: &str,
        amount: u64,
    ) -> bool {
        self.memo.trim() == memo_for(intent)
            && self.source == escrow
            && self.authority == delegate
            && self.amount == amount
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAccount {
    pub mint: String,
    pub owner: String,
    pub amount: u64,
    pub delegate: Option<String>,
    pub delegated_amount: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The cluster refused the transaction for good (simulation or program error:
    /// insufficient funds or allowance, wrong owner, bad account). Resending the same
    /// bytes cannot succeed.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The input cannot make a valid transaction (row 23): nothing was built or sent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Timeouts, connection errors, 5xx, rate limits: the outcome is unknown.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The delegate cannot pay the fee (no SOL, or its account is gone). The
    /// operator's problem, never the customer's: the charge waits and is retried.
    #[error("fee payer: {0}")]
    FeePayer(String),
}

/// The chain, as `charge_escrow` uses it.
#[async_trait]
pub trait Chain: Send + Sync + 'static {
    /// A name for logs ("solana-rpc https://…", "simulator").
    fn describe(&self) -> String;
    /// The delegate's address: it signs every charge and pays its fee.
    fn delegate(&self) -> String;
    /// The treasury token account charges go to.
    fn treasury(&self) -> String;
    /// From a node at or past `min_context_slot`, when given.
    async fn latest_blockhash(
        &self,
        min_context_slot: Option<u64>,
    ) -> Result<Blockhash, ChainError>;
    /// Height and slot from one answer.
    async fn tip(&self) -> Result<Tip, ChainError>;
    /// Builds and signs the transfer + memo as the delegate. Validates first.
    async fn sign_charge(
        &self,
        charge: &Charge,
        blockhash: &Blockhash,
    ) -> Result<SignedTx, ChainError>;
    /// Sends the bytes, to a node at or past `min_context_slot` when given (a node
    /// behind it answers "not reached": unknown); returns the signature.
    async fn send(
        &self,
        tx: &SignedTx,
        min_context_slot: Option<u64>,
    ) -> Result<String, ChainError>;
    /// Statuses, searching the node's whole history; `None` = not known to it.
    async fn signature_statuses(&self, signatures: &[String]) -> Result<Statuses, ChainError>;
    /// One page of the transactions touching `address`, newest first, older than
    /// `before`, from a node that has reached `min_context_slot`.
    async fn signatures_for_address(
        &self,
        address: &str,
        before: Option<&str>,
        limit: usize,
        min_context_slot: Option<u64>,
    ) -> Result<Vec<AddressSignature>, ChainError>;
    /// The charge transfer a landed transaction holds, if it is one: a transfer into
    /// the treasury plus a charge memo (whoever sent it).
    async fn charge_in(&self, signature: &str) -> Result<Option<ChargeTransfer>, ChainError>;
    async fn token_account(&self, address: &str) -> Result<Option<TokenAccount>, ChainError>;
    /// [`Chain::token_account`] from a node at or past `min_context_slot` (a node
    /// behind it answers `Unavailable`), so a balance is not older than a status.
    async fn token_account_at(
        &self,
        address: &str,
        min_context_slot: Option<u64>,
    ) -> Result<Option<TokenAccount>, ChainError> {
        let _ = min_context_slot; // one node, always current
        self.token_account(address).await
    }
    /// The delegate's SOL, in lamports (what pays the fees).
    async fn fee_payer_lamports(&self) -> Result<u64, ChainError>;

    /// The charge transfers into the treasury, newest first, up to `limit`
    /// transactions of its history (for reconciliation), page by page.
    async fn charge_transfers(&self, limit: usize) -> Result<Vec<ChargeTransfer>, ChainError> {
        let treasury = self.treasury();
        let mut out = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut before: Option<String> = None;
        let mut seen = 0;
        while seen < limit {
            let asked = (limit - seen).min(PAGE);
            let page = self
                .signatures_for_address(&treasury, before.as_deref(), asked, None)
                .await?;
            let Some(last) = page.last() else { break };
            before = Some(last.signature.clone());
            seen += page.len();
            for s in &page {
                // A node that ignores `before` would hand the same page again.
                if !listed.insert(s.signature.clone()) {
                    continue;
                }
                if s.err.is_none()
                    && s.memo.as_deref().is_some_and(|m| m.contains(MEMO_PREFIX))
                    && let Some(t) = self.charge_in(&s.signature).await?
                {
                    out.push(t);
                }
            }
            if page.len() < asked {
                break; // the start of the history
            }
        }
        Ok(out)
    }
}

/// The most signatures one `getSignaturesForAddress` answer may hold.
pub const PAGE: usize = 1000;
const MEMO_PREFIX: &str = "longshore:charge:";

/// What a search of an escrow account's history for an intent's charge found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoSearch {
    /// Our charge for the intent landed: this transaction (its signature).
    Found(String),
    /// The history, from a node at or past the slot asked for, reaches back to the
    /// signing slot, and holds no charge of the intent.
    NotFound,
    /// The history could not be shown complete (the node's history is shorter, or
    /// the account is busier than the search may page): no proof either way.
    Incomplete(String),
}

/// Searches `escrow`'s history for the charge of `intent` (see
/// [`ChargeTransfer::is_charge_of`]), from nodes at or past `min_context_slot`, back
/// to a transaction at or before `back_to_slot` (no signature of the intent can land
/// at or before it). Transactions carrying the memo that are not our
/// charge are logged and ignored.
///
/// A transaction that is one of `ours` (the intent's own signatures, each stored
/// before it was sent) is the charge whatever today's configuration says (a rotated
/// delegate or treasury); any other must pass the rule.
#[allow(clippy::too_many_arguments)]
pub async fn find_charge(
    chain: &dyn Chain,
    intent: &uuid::Uuid,
    escrow: &str,
    amount: u64,
    ours: &[String],
    min_context_slot: u64,
    back_to_slot: u64,
) -> Result<MemoSearch, ChainError> {
    const MAX_PAGES: usize = 50;
    let memo = memo_for(intent);
    let delegate = chain.delegate();
    let mut before: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = chain
            .signatures_for_address(escrow, before.as_deref(), PAGE, Some(min_context_slot))
            .await?;
        for s in &page {
            if s.err.is_none() && ours.contains(&s.signature) {
                // Landed without an error: these bytes are the charge.
                return Ok(MemoSearch::Found(s.signature.clone()));
            } else if s.err.is_none() && s.memo.as_deref().is_some_and(|m| m.contains(&memo)) {
                match chain.charge_in(&s.signature).await? {
                    Some(t) if t.is_charge_of(intent, escrow, &delegate, amount) => {
                        return Ok(MemoSearch::Found(t.signature));
                    }
                    other => tracing::warn!(
                        intent_id = %intent,
                        signature = s.signature,
                        found = ?other,
                        "a transaction carries this intent's memo but is not its charge; ignored"
                    ),
                }
            }
            if s.slot <= back_to_slot {
                return Ok(MemoSearch::NotFound);
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => before = Some(last.signature.clone()),
            _ => {
                return Ok(MemoSearch::Incomplete(format!(
                    "the node's history of {escrow} ends before slot {back_to_slot}"
                )));
            }
        }
    }
    Ok(MemoSearch::Incomplete(format!(
        "{escrow} has more than {} transactions since slot {back_to_slot}",
        MAX_PAGES * PAGE
    )))
}

/// The intent a charge memo names.
pub fn intent_of_memo(memo: &str) -> Option<uuid::Uuid> {
    memo.trim().strip_prefix(MEMO_PREFIX)?.parse().ok()
}

/// A Solana address: base58 of exactly 32 bytes.
pub fn validate_address(what: &str, s: &str) -> Result<(), ChainError> {
    match bs58::decode(s).into_vec() {
        Ok(b) if b.len() == 32 => Ok(()),
        _ => Err(ChainError::Invalid(format!(
            "{what} is not a Solana address (base58 of 32 bytes)"
        ))),
    }
}

/// Checks a charge before anything is built (row 23): a real address, a positive
/// amount within `max_units`, the expected memo shape.
pub fn validate_charge(c: &Charge, max_units: u64) -> Result<(), ChainError> {
    validate_address("escrow account", &c.source)?;
    if c.amount == 0 {
        return Err(ChainError::Invalid("amount must be positive".into()));
    }
    if c.amount > max_units {
        return Err(ChainError::Invalid(format!(
            "amount {} exceeds the limit of {max_units} units",
            c.amount
        )));
    }
    if !c.memo.starts_with("longshore:charge:") || c.memo.len() > 80 {
        return Err(ChainError::Invalid("memo is not a charge memo".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_amounts_are_checked() {
        let ok = bs58::encode([7u8; 32]).into_string();
        let c = |source: &str, amount| Charge {
            source: source.into(),
            amount,
            memo: memo_for(&uuid::Uuid::nil()),
        };
        assert!(validate_charge(&c(&ok, 10_000), 1_000_000).is_ok());
        for bad in [
            "",
            "0OIl",
            "abc",
            &bs58::encode([7u8; 31]).into_string(),
            "x,y",
        ] {
            assert!(matches!(
                validate_charge(&c(bad, 10_000), 1_000_000),
                Err(ChainError::Invalid(_))
            ));
        }
        assert!(matches!(
            validate_charge(&c(&ok, 0), 1_000_000),
            Err(ChainError::Invalid(_))
        ));
        assert!(matches!(
            validate_charge(&c(&ok, 1_000_001), 1_000_000),
            Err(ChainError::Invalid(_))
        ));
    }
}
