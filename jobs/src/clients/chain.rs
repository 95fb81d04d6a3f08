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

/// A recent blockhash and the last block height at which a transaction using it can
/// still be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blockhash {
    pub hash: String,
    pub last_valid_block_height: u64,
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
    Landed { err: Option<String> },
    /// Seen but not yet at the configured commitment.
    Pending,
}

/// A transaction that touched an address, with its memo if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSignature {
    pub signature: String,
    pub memo: Option<String>,
    pub err: Option<String>,
}

/// A charge transfer found on chain: a successful transaction into the treasury that
/// carries a charge memo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChargeTransfer {
    pub signature: String,
    /// The memo as written (`longshore:charge:<intent_id>`).
    pub memo: String,
    pub source: String,
    pub amount: u64,
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
}

/// The chain, as `charge_escrow` uses it.
#[async_trait]
pub trait Chain: Send + Sync + 'static {
    /// A name for logs ("solana-rpc https://…", "simulator").
    fn describe(&self) -> String;
    async fn latest_blockhash(&self) -> Result<Blockhash, ChainError>;
    async fn block_height(&self) -> Result<u64, ChainError>;
    /// Builds and signs the transfer + memo as the delegate. Validates first.
    async fn sign_charge(
        &self,
        charge: &Charge,
        blockhash: &Blockhash,
    ) -> Result<SignedTx, ChainError>;
    /// Sends the bytes; returns the signature.
    async fn send(&self, tx: &SignedTx) -> Result<String, ChainError>;
    /// Statuses, searching the whole history; `None` = not known to the chain.
    async fn signature_statuses(
        &self,
        signatures: &[String],
    ) -> Result<Vec<Option<TxStatus>>, ChainError>;
    /// Recent transactions touching `address`, newest first, with their memos.
    async fn signatures_for_address(
        &self,
        address: &str,
        limit: usize,
    ) -> Result<Vec<AddressSignature>, ChainError>;
    async fn token_account(&self, address: &str) -> Result<Option<TokenAccount>, ChainError>;
    /// The charge transfers into the treasury, newest first, up to `limit`
    /// transactions of its history (for reconciliation).
    async fn charge_transfers(&self, limit: usize) -> Result<Vec<ChargeTransfer>, ChainError>;
}

/// The intent a charge memo names.
pub fn intent_of_memo(memo: &str) -> Option<uuid::Uuid> {
    memo.trim().strip_prefix("longshore:charge:")?.parse().ok()
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
