//! The dev chain simulator (`billing.chain.backend = "simulator"`, the `longshore dev`
//! default): an in-memory ledger behind the [`Chain`] trait. It moves no real money
//! and says so in the log.
//!
//! Blocks every 400 ms; a blockhash is valid for 150 blocks; a sent transaction lands
//! one block later. Every escrow account it has not seen starts with
//! `dev_escrow_units` of balance and the same allowance for the delegate. Allowance and
//! balance are enforced like the SPL Token program does: a transfer past either is
//! rejected and moves nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use super::chain::{
    AddressSignature, Blockhash, Chain, ChainError, Charge, ChargeTransfer, SignedTx, Statuses,
    Tip, TokenAccount, TxStatus, validate_charge,
};

/// The simulator's delegate: it signs every simulated charge.
const DELEGATE: &str = "simulated-delegate";

const SLOT: Duration = Duration::from_millis(400);
const VALID_BLOCKS: u64 = 150;

#[derive(Serialize, Deserialize)]
struct SimTx {
    charge: Charge,
    blockhash: String,
    valid_until: u64,
}

struct Landed {
    at: u64,
    source: String,
    memo: String,
    amount: u64,
    err: Option<String>,
}

struct Account {
    amount: u64,
    delegated: u64,
}

struct State {
    accounts: HashMap<String, Account>,
    txs: HashMap<String, Landed>,
    order: Vec<String>,
}

pub struct SimulatedChain {
    start: Instant,
    treasury: String,
    initial_units: u64,
    max_units: u64,
    state: Mutex<State>,
}

impl SimulatedChain {
    pub fn new(treasury: String, initial_units: u64, max_units: u64) -> Self {
        tracing::warn!(
            "billing chain: SIMULATOR (dev only; no real money moves, escrow accounts start with {} USDC)",
            initial_units / 1_000_000
        );
        SimulatedChain {
            start: Instant::now(),
            treasury,
            initial_units,
            max_units,
            state: Mutex::new(State {
                accounts: HashMap::new(),
                txs: HashMap::new(),
                order: Vec::new(),
            }),
        }
    }

    /// Escrow accounts that start with other amounts than `initial_units` (the dev
    /// demo's customer who cannot pay).
    pub fn with_escrows(self, escrows: impl IntoIterator<Item = (String, u64)>) -> Self {
        {
            let mut st = self.state.lock().expect("simulator lock");
            for (address, units) in escrows {
                st.accounts.insert(
                    address,
                    Account {
                        amount: units,
                        delegated: units,
                    },
                );
            }
        }
        self
    }

    fn height(&self) -> u64 {
        (self.start.elapsed().as_millis() / SLOT.as_millis()) as u64 + 1
    }

    fn signature_of(bytes: &[u8]) -> String {
        bs58::encode(Sha512::digest(bytes)).into_string()
    }
}

#[async_trait]
impl Chain for SimulatedChain {
    fn describe(&self) -> String {
        "simulator".into()
    }

    fn delegate(&self) -> String {
        DELEGATE.into()
    }

    fn treasury(&self) -> String {
        self.treasury.clone()
    }

    async fn latest_blockhash(&self, _min: Option<u64>) -> Result<Blockhash, ChainError> {
        let h = self.height();
        Ok(Blockhash {
            hash: bs58::encode(Sha512::digest(h.to_le_bytes())[..32].to_vec()).into_string(),
            last_valid_block_height: h + VALID_BLOCKS,
            slot: h,
        })
    }

    async fn tip(&self) -> Result<Tip, ChainError> {
        // One node, no skipped slots: the slot is the height.
        let h = self.height();
        Ok(Tip { height: h, slot: h })
    }

    async fn sign_charge(
        &self,
        charge: &Charge,
        blockhash: &Blockhash,
    ) -> Result<SignedTx, ChainError> {
        validate_charge(charge, self.max_units)?;
        let bytes = serde_json::to_vec(&SimTx {
            charge: charge.clone(),
            blockhash: blockhash.hash.clone(),
            valid_until: blockhash.last_valid_block_height,
        })
        .expect("serialisable");
        let signature = Self::signature_of(&bytes);
        Ok(SignedTx { bytes, signature })
    }

    async fn send(&self, tx: &SignedTx, _min: Option<u64>) -> Result<String, ChainError> {
        let sim: SimTx = serde_json::from_slice(&tx.bytes)
            .map_err(|_| ChainError::Rejected("malformed transaction".into()))?;
        let sig = Self::signature_of(&tx.bytes);
        let h = self.height();
        let mut st = self.state.lock().expect("simulator lock");
        if st.txs.contains_key(&sig) {
            return Ok(sig); // already processed: same bytes, same transaction
        }
        if h > sim.valid_until {
            return Err(ChainError::Unavailable("blockhash not found".into()));
        }
        let initial = self.initial_units;
        let acct = st
            .accounts
            .entry(sim.charge.source.clone())
            .or_insert(Account {
                amount: initial,
                delegated: initial,
            });
        if acct.delegated < sim.charge.amount {
            return Err(ChainError::Rejected(
                "custom program error: 0x1 (insufficient delegated allowance)".into(),
            ));
        }
        if acct.amount < sim.charge.amount {
            return Err(ChainError::Rejected(
                "custom program error: 0x1 (insufficient funds)".into(),
            ));
        }
        acct.amount -= sim.charge.amount;
        acct.delegated -= sim.charge.amount;
        let amount = sim.charge.amount;
        st.accounts
            .entry(self.treasury.clone())
            .or_insert(Account {
                amount: 0,
                delegated: 0,
            })
            .amount += amount;
        st.txs.insert(
            sig.clone(),
            Landed {
                at: h + 1,
                source: sim.charge.source,
                memo: sim.charge.memo,
                amount,
                err: None,
            },
        );
        st.order.push(sig.clone());
        Ok(sig)
    }

    async fn signature_statuses(&self, signatures: &[String]) -> Result<Statuses, ChainError> {
        let h = self.height();
        let st = self.state.lock().expect("simulator lock");
        let value = signatures
            .iter()
            .map(|s| {
                st.txs.get(s).map(|l| {
                    if h >= l.at {
                        TxStatus::Landed {
                            err: l.err.clone(),
                            slot: l.at,
                        }
                    } else {
                        TxStatus::Pending
                    }
                })
            })
            .collect();
        Ok(Statuses { slot: h, value })
    }

    async fn signatures_for_address(
        &self,
        address: &str,
        before: Option<&str>,
        limit: usize,
        _min_context_slot: Option<u64>,
    ) -> Result<Vec<AddressSignature>, ChainError> {
        let st = self.state.lock().expect("simulator lock");
        // An escrow account's history starts with its opening (the customer's
        // approval), before any charge: a search can tell it reached the start.
        let opening = (address != self.treasury).then(|| AddressSignature {
            signature: format!("opened-{address}"),
            slot: 0,
            memo: None,
            err: None,
        });
        Ok(st
            .order
            .iter()
            .rev()
            .filter_map(|s| {
                let l = &st.txs[s];
                (l.source == address || address == self.treasury).then(|| AddressSignature {
                    signature: s.clone(),
                    slot: l.at,
                    memo: Some(l.memo.clone()),
                    err: l.err.clone(),
                })
            })
            .chain(opening)
            .skip_while(|s| before.is_some_and(|b| s.signature != b))
            .skip(usize::from(before.is_some()))
            .take(limit)
            .collect())
    }

    async fn charge_in(&self, signature: &str) -> Result<Option<ChargeTransfer>, ChainError> {
        let st = self.state.lock().expect("simulator lock");
        Ok(st
            .txs
            .get(signature)
            .filter(|l| l.err.is_none())
            .map(|l| ChargeTransfer {
                signature: signature.to_string(),
                memo: l.memo.clone(),
                source: l.source.clone(),
                authority: DELEGATE.into(),
                amount: l.amount,
            }))
    }

    async fn fee_payer_lamports(&self) -> Result<u64, ChainError> {
        // The simulator charges no fees.
        Ok(u64::MAX)
    }

    async fn token_account(&self, address: &str) -> Result<Option<TokenAccount>, ChainError> {
        let st = self.state.lock().expect("simulator lock");
        // Every escrow account exists with the initial units until a charge moves them
        // (as the first transfer's `or_insert` does); the treasury starts empty.
        let (amount, delegated) = match st.accounts.get(address) {
            Some(a) => (a.amount, a.delegated),
            None if address == self.treasury => (0, 0),
            None => (self.initial_units, self.initial_units),
        };
        Ok(Some(TokenAccount {
            mint: "simulated-usdc".into(),
            owner: "simulated".into(),
            amount,
            delegate: Some(DELEGATE.into()),
            delegated_amount: delegated,
        }))
    }
}
