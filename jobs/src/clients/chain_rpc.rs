//! Solana over JSON-RPC (`billing.chain.backend = "rpc"`): the production [`Chain`].
//!
//! A charge is one legacy transaction, fee paid and signed by the delegate key:
//! SPL Token `transfer_checked` (escrow token account → treasury token account, as the
//! escrow's approved delegate, mint and decimals checked by the program) plus an SPL
//! Memo `longshore:charge:<intent_id>` that makes the charge findable on chain.
//!
//! How RPC answers map onto [`ChainError`]:
//! - a preflight failure whose error is about the transaction's content (an
//!   instruction error, insufficient funds for the fee, a wrong account) → `Rejected`:
//!   the same bytes can never succeed;
//! - `InsufficientFundsForFee`, or `AccountNotFound` (the fee payer's account is gone)
//!   → `FeePayer`: the delegate is out of SOL, which is the operator's to fix; the
//!   charge waits;
//! - `AlreadyProcessed` → the send succeeded earlier: `Ok`;
//! - `BlockhashNotFound` (a lagging node, or an expired hash) → `Unavailable`: only
//!   the expiry rule of `charge_escrow` decides that a transaction is dead;
//! - transport errors, timeouts, 429/5xx, node unhealthy → `Unavailable`.
//!
//! The delegate's secret key never leaves [`Delegate`]: not in `Debug`, logs or errors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use solana_address::Address;
use solana_commitment_config::CommitmentConfig;
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_message::Message;
use solana_rpc_client::nonblocking::rpc_client::RpcClient;
use solana_rpc_client_api::client_error::{Error as ClientError, ErrorKind};
use solana_rpc_client_api::request::{RpcError, RpcRequest, RpcResponseErrorData};
use solana_signature::Signature;
use solana_signer::Signer;
use solana_transaction::Transaction;
use solana_transaction_error::TransactionError;

use super::chain::{
    AddressSignature, Blockhash, Chain, ChainError, Charge, ChargeTransfer, SignedTx, Statuses,
    Tip, TokenAccount, TxStatus, USDC_DECIMALS, validate_charge,
};

/// The delegate key that signs charges (and pays their fees). Holds the secret; shows
/// only the public key.
pub struct Delegate(Keypair);

impl Delegate {
    /// A `solana-keygen` JSON array of 64 numbers, or the base58 of those 64 bytes.
    /// The error never repeats the input.
    pub fn parse(secret: &str) -> Result<Self, String> {
        let s = secret.trim();
        let kp = if s.starts_with('[') {
            solana_keypair::read_keypair(&mut s.as_bytes())
                .map_err(|_| "not a keypair: expected a JSON array of 64 bytes".to_string())?
        } else {
            Keypair::try_from_base58_string(s)
                .map_err(|_| "not a keypair: expected base58 of 64 bytes".to_string())?
        };
        Ok(Delegate(kp))
    }

    pub fn address(&self) -> Address {
        self.0.pubkey()
    }
}

impl fmt::Debug for Delegate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Delegate({})", self.0.pubkey())
    }
}

/// What the RPC chain needs to know. `Debug` shows the URL's host only.
pub struct RpcChainConfig {
    pub url: String,
    pub commitment: CommitmentConfig,
    pub timeout: Duration,
    pub mint: Address,
    pub treasury: Address,
    pub delegate: Delegate,
    pub max_units: u64,
}

impl fmt::Debug for RpcChainConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcChainConfig")
            .field("url", &redact_url(&self.url))
            .field("commitment", &self.commitment.commitment)
            .field("timeout", &self.timeout)
            .field("mint", &self.mint)
            .field("treasury", &self.treasury)
            .field("delegate", &self.delegate)
            .field("max_units", &self.max_units)
            .finish()
    }
}

pub struct RpcChain {
    client: RpcClient,
    describe: String,
    commitment: CommitmentConfig,
    mint: Address,
    treasury: Address,
    delegate: Delegate,
    max_units: u64,
}

impl RpcChain {
    pub fn new(c: RpcChainConfig) -> Self {
        let describe = format!(
            "solana-rpc {} ({:?}, delegate {})",
            redact_url(&c.url),
            c.commitment.commitment,
            c.delegate.address()
        );
        RpcChain {
            client: RpcClient::new_with_timeout_and_commitment(c.url, c.timeout, c.commitment),
            describe,
            commitment: c.commitment,
            mint: c.mint,
            treasury: c.treasury,
            delegate: c.delegate,
            max_units: c.max_units,
        }
    }

    /// The transaction for a charge, signed, before any network use.
    pub fn build(&self, charge: &Charge, blockhash: &Hash) -> Result<Transaction, ChainError> {
        validate_charge(charge, self.max_units)?;
        let source = parse_address("escrow account", &charge.source)?;
        let authority = self.delegate.address();
        let transfer = spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &source,
            &self.mint,
            &self.treasury,
            &authority,
            &[],
            charge.amount,
            USDC_DECIMALS,
        )
        .map_err(|e| ChainError::Invalid(format!("transfer_checked: {e}")))?;
        let memo = spl_memo_interface::instruction::build_memo(
            &spl_memo_interface::v3::id(),
            charge.memo.as_bytes(),
            &[&authority],
        );
        let message = Message::new_with_blockhash(&[transfer, memo], Some(&authority), blockhash);
        let mut tx = Transaction::new_unsigned(message);
        tx.try_sign(&[&self.delegate.0], *blockhash)
            .map_err(|e| ChainError::Invalid(format!("signing: {e}")))?;
        Ok(tx)
    }
}

/// The URL without its path and query, where RPC providers put API keys.
pub fn redact_url(url: &str) -> String {
    match super::url_origin(url) {
        Some(origin) => format!("{origin}/…"),
        None => "<rpc url>".into(),
    }
}

fn parse_address(what: &str, s: &str) -> Result<Address, ChainError> {
    Address::from_str(s).map_err(|_| ChainError::Invalid(format!("{what} is not a Solana address")))
}

fn parse_signature(s: &str) -> Result<Signature, ChainError> {
    Signature::from_str(s).map_err(|_| ChainError::Invalid("not a transaction signature".into()))
}

/// What a preflight refusal means. `Ok`: the transaction was processed before.
/// Only the transfer's own instruction (the first) failing is the customer's
/// (allowance, balance, account); fee errors are the operator's (the delegate's SOL);
/// anything else (a lagging node's BlockhashNotFound, the memo instruction, a runtime
/// limit) proves nothing about the charge and is retried.
pub fn classify_refusal(err: TransactionError, delegate: &str) -> Result<(), ChainError> {
    match err {
        TransactionError::AlreadyProcessed => Ok(()),
        TransactionError::InstructionError(0, e) => Err(ChainError::Rejected(
            TransactionError::InstructionError(0, e).to_string(),
        )),
        e @ (TransactionError::InsufficientFundsForFee
        | TransactionError::AccountNotFound
        | TransactionError::InvalidAccountForFee
        | TransactionError::InsufficientFundsForRent { .. }) => {
            Err(ChainError::FeePayer(format!("{e} (delegate {delegate})")))
        }
        e => Err(ChainError::Unavailable(format!(
            "refused in preflight: {e}"
        ))),
    }
}

/// A failure of any RPC call: the outcome is unknown unless the node says otherwise.
fn unavailable(e: ClientError) -> ChainError {
    // Display of a client error names the method and the node's message; the URL (and
    // any key in it) is not part of it.
    ChainError::Unavailable(redact_reqwest(&e))
}

fn redact_reqwest(e: &ClientError) -> String {
    match e.kind() {
        // reqwest's Display includes the URL; keep only what went wrong.
        ErrorKind::Reqwest(r) => {
            let what = if r.is_timeout() {
                "timed out"
            } else if r.is_connect() {
                "connection failed"
            } else if r.is_decode() {
                "undecodable answer"
            } else {
                "http error"
            };
            match r.status() {
                Some(s) => format!("rpc: {what} (HTTP {s})"),
                None => format!("rpc: {what}"),
            }
        }
        _ => format!("rpc: {e}"),
    }
}

/// The transaction error a send was refused with, if the node simulated it.
fn preflight_error(e: &ClientError) -> Option<TransactionError> {
    if let ErrorKind::RpcError(RpcError::RpcResponseError {
        data: RpcResponseErrorData::SendTransactionPreflightFailure(sim),
        ..
    }) = e.kind()
    {
        return sim.err.clone().map(TransactionError::from);
    }
    e.get_transaction_error()
}

#[async_trait]
impl Chain for RpcChain {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn delegate(&self) -> String {
        self.delegate.address().to_string()
    }

    fn treasury(&self) -> String {
        self.treasury.to_string()
    }

    async fn latest_blockhash(
        &self,
        min_context_slot: Option<u64>,
    ) -> Result<Blockhash, ChainError> {
        use solana_rpc_client_api::response::{Response, RpcBlockhash};
        let mut config = serde_json::json!({"commitment": self.commitment.commitment});
        if let Some(m) = min_context_slot {
            config["minContextSlot"] = m.into();
        }
        let r: Response<RpcBlockhash> = self
            .client
            .send(RpcRequest::GetLatestBlockhash, serde_json::json!([config]))
            .await
            .map_err(unavailable)?;
        Ok(Blockhash {
            hash: r.value.blockhash,
            last_valid_block_height: r.value.last_valid_block_height,
            slot: r.context.slot,
        })
    }

    async fn tip(&self) -> Result<Tip, ChainError> {
        // getEpochInfo answers the height and the slot from one bank.
        let e = self
            .client
            .get_epoch_info_with_commitment(self.commitment)
            .await
            .map_err(unavailable)?;
        Ok(Tip {
            height: e.block_height,
            slot: e.absolute_slot,
        })
    }

    async fn sign_charge(
        &self,
        charge: &Charge,
        blockhash: &Blockhash,
    ) -> Result<SignedTx, ChainError> {
        let hash = Hash::from_str(&blockhash.hash)
            .map_err(|_| ChainError::Invalid("not a blockhash".into()))?;
        let tx = self.build(charge, &hash)?;
        let bytes = wincode::serialize(&tx)
            .map_err(|e| ChainError::Invalid(format!("serializing: {e}")))?;
        Ok(SignedTx {
            bytes,
            signature: tx.signatures[0].to_string(),
        })
    }

    async fn send(
        &self,
        tx: &SignedTx,
        min_context_slot: Option<u64>,
    ) -> Result<String, ChainError> {
        use solana_rpc_client_api::config::RpcSendTransactionConfig;
        use solana_transaction_status_client_types::UiTransactionEncoding;
        // The exact stored bytes, so a resend is the same transaction. The node does
        // not retry on its own (max_retries 0): charge_escrow owns resending.
        let config = RpcSendTransactionConfig {
            skip_preflight: false,
            preflight_commitment: Some(self.commitment.commitment),
            encoding: Some(UiTransactionEncoding::Base64),
            max_retries: Some(0),
            min_context_slot,
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(&tx.bytes);
        let sent: Result<String, ClientError> = self
            .client
            .send(
                RpcRequest::SendTransaction,
                serde_json::json!([encoded, config]),
            )
            .await;
        match sent {
            Ok(sig) if sig == tx.signature => Ok(sig),
            Ok(other) => Err(ChainError::Unavailable(format!(
                "rpc answered with signature {other}, expected {}",
                tx.signature
            ))),
            Err(e) => match preflight_error(&e) {
                Some(err) => classify_refusal(err, &self.delegate.address().to_string())
                    .map(|()| tx.signature.clone()),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn signature_statuses(&self, signatures: &[String]) -> Result<Statuses, ChainError> {
        let sigs = signatures
            .iter()
            .map(|s| parse_signature(s))
            .collect::<Result<Vec<_>, _>>()?;
        // A node takes at most 256 signatures per request; the slot that counts is the
        // lowest any answer came from.
        let mut slot = u64::MAX;
        let mut value = Vec::with_capacity(sigs.len());
        for chunk in sigs.chunks(256) {
            let r = self
                .client
                .get_signature_statuses_with_history(chunk)
                .await
                .map_err(unavailable)?;
            slot = slot.min(r.context.slot);
            value.extend(r.value.into_iter().map(|s| {
                s.map(|s| {
                    if !s.satisfies_commitment(self.commitment) {
                        TxStatus::Pending
                    } else {
                        TxStatus::Landed {
                            err: s.err.map(|e| e.to_string()),
                            slot: s.slot,
                        }
                    }
                })
            }));
        }
        Ok(Statuses {
            slot: if value.is_empty() { 0 } else { slot },
            value,
        })
    }

    async fn signatures_for_address(
        &self,
        address: &str,
        before: Option<&str>,
        limit: usize,
        min_context_slot: Option<u64>,
    ) -> Result<Vec<AddressSignature>, ChainError> {
        use solana_rpc_client_api::config::RpcSignaturesForAddressConfig;
        use solana_rpc_client_api::response::RpcConfirmedTransactionStatusWithSignature;
        let addr = parse_address("address", address)?;
        if let Some(b) = before {
            parse_signature(b)?;
        }
        let config = RpcSignaturesForAddressConfig {
            before: before.map(str::to_string),
            until: None,
            limit: Some(limit.min(super::chain::PAGE)),
            // Address history is not served below `confirmed`.
            commitment: Some(if self.commitment.is_finalized() {
                self.commitment
            } else {
                CommitmentConfig::confirmed()
            }),
            min_context_slot,
        };
        let r: Vec<RpcConfirmedTransactionStatusWithSignature> = self
            .client
            .send(
                RpcRequest::GetSignaturesForAddress,
                serde_json::json!([addr.to_string(), config]),
            )
            .await
            .map_err(unavailable)?;
        Ok(r.into_iter()
            .map(|s| AddressSignature {
                signature: s.signature,
                slot: s.slot,
                memo: s.memo,
                err: s.err.map(|e| e.to_string()),
            })
            .collect())
    }

    async fn charge_in(&self, signature: &str) -> Result<Option<ChargeTransfer>, ChainError> {
        self.decode_charge(signature).await
    }

    async fn fee_payer_lamports(&self) -> Result<u64, ChainError> {
        self.client
            .get_balance_with_commitment(&self.delegate.address(), self.commitment)
            .await
            .map(|r| r.value)
            .map_err(unavailable)
    }

    async fn token_account(&self, address: &str) -> Result<Option<TokenAccount>, ChainError> {
        self.token_account_at(address, None).await
    }

    async fn token_account_at(
        &self,
        address: &str,
        min_context_slot: Option<u64>,
    ) -> Result<Option<TokenAccount>, ChainError> {
        use solana_program_pack::Pack as _;
        use solana_rpc_client_api::config::RpcAccountInfoConfig;
        let addr = parse_address("token account", address)?;
        // Built from its wire form: the encoding's type lives in a crate we need for
        // nothing else.
        let config: RpcAccountInfoConfig = serde_json::from_value(serde_json::json!({
            "encoding": "base64+zstd",
            "commitment": self.commitment.commitment,
            "minContextSlot": min_context_slot,
        }))
        .map_err(|e| ChainError::Unavailable(format!("account config: {e}")))?;
        let r = self
            .client
            .get_ui_account_with_config(&addr, config)
            .await
            .map_err(unavailable)?;
        let Some(acc) = r.value.and_then(|a| a.to_account()) else {
            return Ok(None);
        };
        if acc.owner != spl_token_interface::id() {
            return Err(ChainError::Invalid(format!(
                "{address} is not an SPL Token account"
            )));
        }
        let t = spl_token_interface::state::Account::unpack(&acc.data)
            .map_err(|e| ChainError::Invalid(format!("{address}: {e}")))?;
        Ok(Some(TokenAccount {
            mint: t.mint.to_string(),
            owner: t.owner.to_string(),
            amount: t.amount,
            delegate: Option::<Address>::from(t.delegate).map(|d| d.to_string()),
            delegated_amount: t.delegated_amount,
        }))
    }
}

impl RpcChain {
    /// The charge transfer in a landed transaction, if it is one: a `transfer_checked`
    /// into the treasury plus a charge memo.
    async fn decode_charge(&self, signature: &str) -> Result<Option<ChargeTransfer>, ChainError> {
        use solana_rpc_client_api::config::RpcTransactionConfig;
        use solana_transaction_status_client_types::UiTransactionEncoding;
        use spl_token_interface::instruction::TokenInstruction;
        let r = self
            .client
            .get_transaction_with_config(
                &parse_signature(signature)?,
                RpcTransactionConfig {
                    encoding: Some(UiTransactionEncoding::Base64),
                    commitment: Some(self.commitment),
                    max_supported_transaction_version: Some(0),
                },
            )
            .await
            .map_err(unavailable)?;
        // A transaction that failed moved nothing, whatever it holds.
        if r.transaction.meta.as_ref().is_some_and(|m| m.err.is_some()) {
            return Ok(None);
        }
        let Some(tx) = r.transaction.transaction.decode() else {
            return Ok(None);
        };
        let keys = tx.message.static_account_keys();
        let key = |i: u8| keys.get(i as usize).copied();
        let mut memo = None;
        let mut transfer = None;
        for ix in tx.message.instructions() {
            let program = key(ix.program_id_index);
            if program == Some(spl_memo_interface::v3::id())
                || program == Some(spl_memo_interface::v1::id())
            {
                memo = Some(String::from_utf8_lossy(&ix.data).into_owned());
            } else if program == Some(spl_token_interface::id())
                && let Ok(TokenInstruction::TransferChecked { amount, .. }) =
                    TokenInstruction::unpack(&ix.data)
            {
                // transfer_checked accounts: source, mint, destination, authority.
                let source = ix.accounts.first().and_then(|&i| key(i));
                let mint = ix.accounts.get(1).and_then(|&i| key(i));
                let dest = ix.accounts.get(2).and_then(|&i| key(i));
                let authority = ix.accounts.get(3).and_then(|&i| key(i));
                if dest == Some(self.treasury) && mint == Some(self.mint) {
                    transfer = source.zip(authority).map(|(s, a)| (s, a, amount));
                }
            }
        }
        Ok(match (memo, transfer) {
            (Some(memo), Some((source, authority, amount)))
                if memo.starts_with("longshore:charge:") =>
            {
                Some(ChargeTransfer {
                    signature: signature.to_string(),
                    memo,
                    source: source.to_string(),
                    authority: authority.to_string(),
                    amount,
                })
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_never_shows() {
        let kp = Keypair::new();
        let json = format!("{:?}", kp.to_bytes().to_vec());
        let d = Delegate::parse(&json).unwrap();
        assert_eq!(d.address(), kp.pubkey());
        let shown = format!("{d:?}");
        assert!(shown.contains(&kp.pubkey().to_string()));
        assert!(!shown.contains(&kp.to_base58_string()));
        let b58 = Delegate::parse(&kp.to_base58_string()).unwrap();
        assert_eq!(b58.address(), kp.pubkey());
        let bad = Delegate::parse("[1, 2, 3]").unwrap_err();
        assert!(!bad.contains("1, 2"));
        assert!(Delegate::parse("not-a-key").is_err());
    }

    #[test]
    fn only_the_transfers_own_failure_is_the_customers() {
        use solana_transaction_error::TransactionError as E;
        let d = "delegate";
        let ix = |i: u8| -> E {
            serde_json::from_value(serde_json::json!({"InstructionError": [i, {"Custom": 1}]}))
                .unwrap()
        };
        assert!(matches!(
            classify_refusal(ix(0), d),
            Err(ChainError::Rejected(_))
        ));
        assert!(
            matches!(classify_refusal(ix(1), d), Err(ChainError::Unavailable(_))),
            "the memo"
        );
        assert!(classify_refusal(E::AlreadyProcessed, d).is_ok());
        for fee in [
            E::InsufficientFundsForFee,
            E::AccountNotFound,
            E::InvalidAccountForFee,
        ] {
            assert!(matches!(
                classify_refusal(fee, d),
                Err(ChainError::FeePayer(_))
            ));
        }
        for unknown in [E::BlockhashNotFound, E::WouldExceedMaxBlockCostLimit] {
            assert!(matches!(
                classify_refusal(unknown, d),
                Err(ChainError::Unavailable(_))
            ));
        }
    }

    #[test]
    fn urls_lose_their_keys() {
        assert_eq!(
            redact_url("https://mainnet.helius-rpc.com/?api-key=SECRET"),
            "https://mainnet.helius-rpc.com/…"
        );
        assert_eq!(
            redact_url("https://user:pw@rpc.example.com/v1/SECRET"),
            "https://rpc.example.com/…"
        );
        assert_eq!(redact_url("junk"), "<rpc url>");
    }
}
