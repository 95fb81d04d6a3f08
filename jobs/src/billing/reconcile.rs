//! `longshore billing reconcile`: the ledger against the chain.
//!
//! Three views of the same money must agree: confirmed charge intents, the
//! `escrow_transactions` charges, and the charge transfers into the treasury on chain
//! (found by their memo `longshore:charge:<intent_id>`). Every disagreement is listed
//! with what it means; an empty list is the only clean result.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::clients::chain::{Chain, ChainError, UNITS_PER_CENT, intent_of_memo};

#[derive(Debug, Serialize)]
pub struct Totals {
    pub count: usize,
    pub cents: i64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// Money moved twice for one intent: a double charge to refund.
    DoubleCharge {
        intent_id: Uuid,
        signatures: Vec<String>,
    },
    /// Money moved but the intent is not confirmed: booked nowhere.
    UnbookedTransfer {
        intent_id: Uuid,
        signature: String,
        state: Option<String>,
    },
    /// A confirmed intent whose transfer is not in the treasury's history.
    ConfirmedNotOnChain {
        intent_id: Uuid,
        signature: Option<String>,
    },
    /// The chain moved a different amount than the intent says.
    AmountMismatch {
        intent_id: Uuid,
        booked_cents: i64,
        chain_units: u64,
    },
    /// A confirmed intent without its ledger row, or a ledger row that matches no
    /// confirmed intent, or with another amount.
    LedgerMismatch {
        signature: String,
        intent_cents: Option<i64>,
        ledger_cents: Option<i64>,
    },
}

#[derive(Debug, Serialize)]
pub struct Reconciliation {
    pub chain: String,
    pub confirmed_intents: Totals,
    pub ledger_charges: Totals,
    pub chain_transfers: Totals,
    /// Transfers into the treasury that carry a charge memo but that our delegate did
    /// not sign: not charges (anyone can send one), listed for information only.
    pub foreign_transfers: usize,
    pub differences: Vec<Difference>,
}

impl Reconciliation {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    // Not `#[from]`: that would make the chain error a `source` too, and reports that
    // print the chain of causes would say it twice.
    #[error("chain: {0}")]
    Chain(ChainError),
}

impl From<ChainError> for ReconcileError {
    fn from(e: ChainError) -> Self {
        ReconcileError::Chain(e)
    }
}

fn cents(amount: Decimal) -> i64 {
    (amount * Decimal::ONE_HUNDRED)
        .round()
        .to_i64()
        .unwrap_or(i64::MAX)
}

/// Compares everything: the intents and ledger in the database, and up to `limit`
/// transactions of the treasury's history on chain.
pub async fn reconcile(
    pool: &PgPool,
    chain: &dyn Chain,
    limit: usize,
) -> Result<Reconciliation, ReconcileError> {
    let intents: Vec<(Uuid, String, Decimal, Option<String>)> =
        sqlx::query_as("SELECT intent_id, state, amount, signature::text FROM charge_intents")
            .fetch_all(pool)
            .await?;
    let ledger: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT tx_digest::text, amount FROM escrow_transactions WHERE tx_type = 'charge'",
    )
    .fetch_all(pool)
    .await?;
    // Anyone can send the treasury a token with a charge memo: only transfers our
    // delegate signed are charges (the same rule charge_escrow's memo search applies).
    let delegate = chain.delegate();
    let (transfers, foreign): (Vec<_>, Vec<_>) = chain
        .charge_transfers(limit)
        .await?
        .into_iter()
        .partition(|t| t.authority == delegate);
    for t in &foreign {
        tracing::info!(
            signature = t.signature,
            source = t.source,
            authority = t.authority,
            "a transfer with a charge memo not signed by the delegate: not a charge, ignored"
        );
    }

    let mut d = Vec::new();
    let by_id: HashMap<Uuid, &(Uuid, String, Decimal, Option<String>)> =
        intents.iter().map(|i| (i.0, i)).collect();
    let confirmed: Vec<_> = intents.iter().filter(|i| i.1 == "confirmed").collect();

    // Chain ↔ intents.
    let mut on_chain: BTreeMap<Uuid, Vec<(String, u64)>> = BTreeMap::new();
    for t in &transfers {
        if let Some(id) = intent_of_memo(&t.memo) {
            on_chain
                .entry(id)
                .or_default()
                .push((t.signature.clone(), t.amount));
        }
    }
    for (id, ts) in &on_chain {
        if ts.len() > 1 {
            d.push(Difference::DoubleCharge {
                intent_id: *id,
                signatures: ts.iter().map(|t| t.0.clone()).collect(),
            });
        }
        let i = by_id.get(id);
        match i {
            Some(i) if i.1 == "confirmed" => {
                let units: u64 = ts.iter().map(|t| t.1).sum();
                if units != cents(i.2) as u64 * UNITS_PER_CENT {
                    d.push(Difference::AmountMismatch {
                        intent_id: *id,
                        booked_cents: cents(i.2),
                        chain_units: units,
                    });
                }
            }
            _ => d.push(Difference::UnbookedTransfer {
                intent_id: *id,
                signature: ts[0].0.clone(),
                state: i.map(|i| i.1.clone()),
            }),
        }
    }
    for i in &confirmed {
        if !on_chain.contains_key(&i.0) {
            d.push(Difference::ConfirmedNotOnChain {
                intent_id: i.0,
                signature: i.3.clone(),
            });
        }
    }

    // Intents ↔ ledger, by signature.
    let ledger_by_sig: HashMap<&str, i64> = ledger
        .iter()
        .map(|(s, a)| (s.as_str(), cents(*a)))
        .collect();
    let intent_by_sig: HashMap<&str, i64> = confirmed
        .iter()
        .filter_map(|i| i.3.as_deref().map(|s| (s, cents(i.2))))
        .collect();
    let mut sigs: Vec<&str> = ledger_by_sig
        .keys()
        .chain(intent_by_sig.keys())
        .copied()
        .collect();
    sigs.sort_unstable();
    sigs.dedup();
    for s in sigs {
        let (a, b) = (intent_by_sig.get(s).copied(), ledger_by_sig.get(s).copied());
        if a != b {
            d.push(Difference::LedgerMismatch {
                signature: s.to_string(),
                intent_cents: a,
                ledger_cents: b,
            });
        }
    }

    Ok(Reconciliation {
        chain: chain.describe(),
        confirmed_intents: Totals {
            count: confirmed.len(),
            cents: confirmed.iter().map(|i| cents(i.2)).sum(),
        },
        ledger_charges: Totals {
            count: ledger.len(),
            cents: ledger.iter().map(|l| cents(l.1)).sum(),
        },
        chain_transfers: Totals {
            count: transfers.len(),
            cents: (transfers.iter().map(|t| t.amount).sum::<u64>() / UNITS_PER_CENT) as i64,
        },
        foreign_transfers: foreign.len(),
        differences: d,
    })
}
