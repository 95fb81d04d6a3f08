#![cfg(feature = "litesvm-tests")]
//! Exactly-once escrow charges over real Solana JSON-RPC: the production client
//! (`RpcChain`) against a local endpoint backed by LiteSVM, where the SPL Token and
//! Memo programs execute every transfer. Rows 16–20 and 23 of RELIABILITY.md: each
//! test counts the transfers that landed (token balances, memos on chain) and the
//! bookkeeping rows. "NDC" (no double charge) is asserted everywhere.

mod common;
#[path = "common/ledger.rs"]
mod ledger;
#[path = "common/solana.rs"]
mod solana;

use std::time::Duration;

use chrono::Utc;
use common::{Proc, count, db, eventually};
use longshore_jobs::billing::bill_usage::{run_cycle, run_cycle_on};
use longshore_jobs::billing::charge_escrow::{Driver, EXPIRY_MARGIN_BLOCKS, Step};
use longshore_jobs::billing::config::BillingConfig;
use longshore_jobs::clients::chain::{Chain, ChainError};
use longshore_jobs::clients::chain_rpc::RpcChain;
use longshore_workers::testing::{TestDb, count_enqueued};
use serde_json::Value;
use solana::{FakeSolana, Node, VALID_BLOCKS, until};
use sqlx::PgPool;

const USDC: u64 = 1_000_000;
const API_KEY: &str = "sekrit-api-key";

fn env(fake: &FakeSolana) -> Vec<(String, String)> {
    [
        ("LONGSHORE__BILLING__CHAIN__BACKEND", "rpc".to_string()),
        // Providers put API keys in the URL: it must never be shown.
        (
            "LONGSHORE__BILLING__CHAIN__RPC_URL",
            format!("{}/?api-key={API_KEY}", fake.url),
        ),
        (
            "LONGSHORE__BILLING__CHAIN__USDC_MINT",
            fake.mint.to_string(),
        ),
        (
            "LONGSHORE__BILLING__CHAIN__TREASURY_TOKEN_ACCOUNT",
            fake.treasury.to_string(),
        ),
        (
            "LONGSHORE__BILLING__CHAIN__DELEGATE_KEYPAIR",
            fake.delegate_json.clone(),
        ),
        ("LONGSHORE__BILLING__CHAIN__RPC_TIMEOUT", "1s".to_string()),
        (
            "LONGSHORE__BILLING__CHAIN__POLL_INTERVAL",
            "50ms".to_string(),
        ),
        (
            "LONGSHORE__BILLING__CHAIN__CONFIRM_TIMEOUT",
            "300ms".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn cfg(fake: &FakeSolana) -> BillingConfig {
    let vars = env(fake);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    BillingConfig::from_config(&common::config(&vars)).unwrap()
}

/// A database, an endpoint, the worker's config for it, and the production client.
async fn setup() -> (TestDb, FakeSolana, BillingConfig, RpcChain) {
    let t = db().await;
    let fake = FakeSolana::start().await;
    let cfg = cfg(&fake);
    let chain = chain(&cfg);
    (t, fake, cfg, chain)
}

fn chain(cfg: &BillingConfig) -> RpcChain {
    RpcChain::new(cfg.chain.rpc_config().unwrap())
}

/// Customer `c` with an escrow holding `balance` and approving `allowance` (units),
/// and `billable` requests of usage ($1.00 per 10,000); returns the intent the billing
/// cycle creates and the escrow address.
async fn intent(
    pool: &PgPool,
    cfg: &BillingConfig,
    fake: &FakeSolana,
    c: i32,
    balance: u64,
    allowance: u64,
    billable: i64,
) -> (String, String) {
    let escrow = fake.open_escrow(balance, allowance);
    (billed(pool, cfg, c, &escrow, billable).await, escrow)
}

/// Customer `c` paying from `escrow`, with `billable` requests of usage: the one
/// intent a billing cycle creates.
async fn billed(pool: &PgPool, cfg: &BillingConfig, c: i32, escrow: &str, billable: i64) -> String {
    ledger::customer(pool, c, escrow, 1_000_000, 1_000_000, "enterprise").await;
    ledger::usage(pool, c, 2, billable).await;
    let r = run_cycle(pool, cfg, Some(c), Utc::now()).await.unwrap();
    assert_eq!(r.intents.len(), 1, "{r:?}");
    sqlx::query_scalar("SELECT intent_id::text FROM charge_intents WHERE customer_id = $1")
        .bind(c)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Drives intent `id` once while the endpoint drops the send: it is `sent`, not
/// landed. Returns its signature.
async fn sent_but_dropped(
    pool: &PgPool,
    cfg: &BillingConfig,
    fake: &FakeSolana,
    chain: &RpcChain,
    id: &str,
) -> Option<String> {
    fake.script(|s| s.drop_sends = 1);
    assert!(
        drive(pool, cfg, chain, id).await.unwrap().is_none(),
        "sent, not landed"
    );
    let (st, sig) = state(pool, id).await;
    assert_eq!(st, "sent");
    sig
}

async fn drive(
    pool: &PgPool,
    cfg: &BillingConfig,
    chain: &dyn Chain,
    id: &str,
) -> Result<Option<Value>, Step> {
    Driver {
        pool: pool.clone(),
        chain,
        cfg,
        intent_id: id.parse().unwrap(),
    }
    .drive()
    .await
}

/// Drives intent `id` until it is settled, producing a block after each pass (a
/// transaction is `confirmed` one block after it lands).
async fn settle(
    pool: &PgPool,
    cfg: &BillingConfig,
    fake: &FakeSolana,
    chain: &dyn Chain,
    id: &str,
) -> Value {
    for _ in 0..8 {
        if let Some(done) = drive(pool, cfg, chain, id).await.unwrap() {
            return done;
        }
        fake.advance(1);
    }
    panic!("intent {id} did not settle: {:?}", state(pool, id).await);
}

async fn last_valid_height(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT last_valid_block_height FROM charge_intents WHERE intent_id = $1::uuid",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn state(pool: &PgPool, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, signature FROM charge_intents WHERE intent_id = $1::uuid")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// No double charge: exactly `n` charge transfers on chain, the treasury holds exactly
/// what the ledger says, one `escrow_transactions` row per confirmed intent, and each
/// confirmed intent's signature is the one on chain.
async fn assert_ndc(pool: &PgPool, fake: &FakeSolana, n: usize) {
    let landed = fake.charges_landed();
    assert_eq!(landed.len(), n, "charge transfers on chain: {landed:?}");
    let mut memos = landed.clone();
    memos.sort();
    memos.dedup();
    assert_eq!(
        memos.len(),
        n,
        "two transfers carry one intent's memo: {landed:?}"
    );
    let confirmed_cents: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount * 100), 0)::bigint FROM charge_intents WHERE state = 'confirmed'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let ledger_cents: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount * 100), 0)::bigint FROM escrow_transactions WHERE tx_type = 'charge'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        confirmed_cents, ledger_cents,
        "Σ confirmed intents = Σ ledger"
    );
    assert_eq!(
        fake.balance(&fake.treasury.to_string()),
        confirmed_cents as u64 * 10_000,
        "tokens moved = Σ ledger"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM charge_intents WHERE state = 'confirmed'"
        )
        .await as usize,
        n
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM escrow_transactions e JOIN charge_intents i ON i.signature = e.tx_digest WHERE i.state = 'confirmed'"
        )
        .await as usize,
        n,
        "each confirmed intent's ledger row carries its signature"
    );
}

#[tokio::test]
async fn a_charge_moves_the_tokens_once_and_books_them() {
    let (t, fake, cfg, chain) = setup().await;
    let (id, escrow) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 50 * USDC, 60_000).await;
    let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
    assert_eq!(done["state"], "confirmed");
    assert_eq!(fake.balance(&escrow), 94 * USDC);
    let acct = fake.token(&escrow).unwrap();
    assert_eq!(
        acct.delegated_amount,
        44 * USDC,
        "the allowance shrinks by the charge"
    );
    assert_eq!(
        fake.charges_landed(),
        vec![format!("longshore:charge:{id}")]
    );
    // The token account as the client reads it.
    let seen = chain.token_account(&escrow).await.unwrap().unwrap();
    assert_eq!((seen.amount, seen.delegated_amount), (94 * USDC, 44 * USDC));
    assert_eq!(
        seen.delegate.as_deref(),
        Some(fake.delegate.to_string().as_str())
    );
    // Re-driving a confirmed intent changes nothing.
    drive(&t.pool, &cfg, &chain, &id).await.unwrap();
    assert_eq!(fake.sends(), 1);
    assert_ndc(&t.pool, &fake, 1).await;
    let balance: i64 =
        sqlx::query_scalar("SELECT current_balance_usd_cents FROM customers WHERE customer_id = 1")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(balance, 1_000_000 - 600);
}

/// Row 16: the send times out but the transaction landed → no re-sign, confirmed, one
/// transfer. A node answering 503 on the way changes nothing either.
#[tokio::test]
async fn row16_a_send_that_times_out_after_landing_is_not_signed_again() {
    let (t, fake, cfg, chain) = setup().await;
    let (id, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    fake.script(|s| s.hang_sends_after = 1);
    let e = drive(&t.pool, &cfg, &chain, &id).await.unwrap_err();
    assert!(
        matches!(e, Step::Chain(ChainError::Unavailable(_))),
        "{e:?}"
    );
    let (st, sig) = state(&t.pool, &id).await;
    assert_eq!(st, "signed", "stored before the send, not marked sent");
    fake.script(|s| s.unavailable = 1);
    assert!(drive(&t.pool, &cfg, &chain, &id).await.is_err(), "503");
    let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
    assert_eq!(done["state"], "confirmed");
    assert_eq!(
        done["signature"].as_str(),
        sig.as_deref(),
        "the first signature"
    );
    assert_eq!(fake.sends(), 1, "looked up, never resent");
    assert_ndc(&t.pool, &fake, 1).await;
}

/// Row 17: a dropped transaction → the same bytes are resent while they can land;
/// once expiry is proven (past its own last valid height by the margin), one new
/// transaction. One transfer either way.
#[tokio::test]
async fn row17_a_dropped_transaction_is_resent_then_replaced_only_after_expiry() {
    let (t, fake, cfg, chain) = setup().await;

    // Dropped once: the resend of the same bytes lands.
    let (a, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let first = sent_but_dropped(&t.pool, &cfg, &fake, &chain, &a).await;
    fake.advance(10);
    let done = settle(&t.pool, &cfg, &fake, &chain, &a).await;
    assert_eq!(
        done["signature"].as_str(),
        first.as_deref(),
        "the same transaction"
    );
    assert_ndc(&t.pool, &fake, 1).await;

    // Dropped every time: resent until it expires, then replaced once.
    let (b, _) = intent(&t.pool, &cfg, &fake, 2, 100 * USDC, 100 * USDC, 70_000).await;
    fake.script(|s| s.drop_sends = 1_000);
    assert!(drive(&t.pool, &cfg, &chain, &b).await.unwrap().is_none());
    let (_, old) = state(&t.pool, &b).await;
    let sends = fake.sends();
    fake.advance(VALID_BLOCKS - 5);
    assert!(drive(&t.pool, &cfg, &chain, &b).await.unwrap().is_none());
    assert!(
        fake.sends() > sends,
        "the same bytes were resent while valid"
    );
    assert_eq!(state(&t.pool, &b).await.1, old);
    // Past its last valid height, but not by the margin: still no new transaction.
    fake.advance(5 + EXPIRY_MARGIN_BLOCKS / 2);
    assert!(drive(&t.pool, &cfg, &chain, &b).await.unwrap().is_none());
    assert_eq!(
        state(&t.pool, &b).await.1,
        old,
        "no re-sign within the margin"
    );
    fake.advance(EXPIRY_MARGIN_BLOCKS);
    fake.script(|s| s.drop_sends = 0);
    let done = settle(&t.pool, &cfg, &fake, &chain, &b).await;
    assert_eq!(done["state"], "confirmed");
    assert_ne!(
        done["signature"].as_str(),
        old.as_deref(),
        "a new transaction"
    );
    assert_ndc(&t.pool, &fake, 2).await;
}

/// Row 19: a lagging node. A stale block height never makes the driver re-sign (the
/// transaction looks still valid; its resends are refused as BlockhashNotFound, which
/// proves nothing). A node whose view lags: a transaction that landed at its last
/// valid height is found, not replaced.
#[tokio::test]
async fn row19_a_lagging_node_causes_no_false_expiry() {
    let (t, fake, cfg, chain) = setup().await;

    // Stale height: the only node is far behind the tip (behind even the block the
    // transaction's blockhash is from).
    fake.advance(10);
    let (a, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let old = sent_but_dropped(&t.pool, &cfg, &fake, &chain, &a).await;
    fake.advance(VALID_BLOCKS + 2 * EXPIRY_MARGIN_BLOCKS);
    fake.set_nodes(vec![Node {
        lag: 2 * (VALID_BLOCKS + 2 * EXPIRY_MARGIN_BLOCKS),
        ..Node::default()
    }]);
    for _ in 0..2 {
        assert!(
            drive(&t.pool, &cfg, &chain, &a).await.is_err(),
            "BlockhashNotFound: unknown"
        );
    }
    assert_eq!(state(&t.pool, &a).await, ("sent".into(), old.clone()));
    fake.set_nodes(vec![Node::default()]);
    let done = settle(&t.pool, &cfg, &fake, &chain, &a).await;
    assert_ne!(done["signature"].as_str(), old.as_deref());
    assert_ndc(&t.pool, &fake, 1).await;

    // Lagging view: the transaction lands at its last valid height; the only node
    // is 60 slots behind (more than the margin's 37 blocks, about 46 slots). Height and statuses come from that node, so the
    // expiry is judged against its own (old) height: never replaced.
    let (b, _) = intent(&t.pool, &cfg, &fake, 2, 100 * USDC, 100 * USDC, 70_000).await;
    fake.script(|s| s.hold_sends = 1);
    assert!(drive(&t.pool, &cfg, &chain, &b).await.unwrap().is_none());
    let sig = state(&t.pool, &b).await.1;
    let lvbh = last_valid_height(&t.pool, &b).await;
    fake.advance(lvbh as u64 - fake.height());
    assert_eq!(fake.land_held(), 1, "landed at its last valid height");
    fake.set_nodes(vec![Node {
        lag: 60,
        ..Node::default()
    }]);
    fake.advance(EXPIRY_MARGIN_BLOCKS + 5);
    for _ in 0..3 {
        assert!(drive(&t.pool, &cfg, &chain, &b).await.unwrap().is_none());
        assert_eq!(state(&t.pool, &b).await.1, sig, "not replaced");
    }
    fake.set_nodes(vec![Node::default()]);
    let done = settle(&t.pool, &cfg, &fake, &chain, &b).await;
    assert_eq!(done["state"], "confirmed");
    assert_eq!(done["signature"].as_str(), sig.as_deref());
    assert_ndc(&t.pool, &fake, 2).await;
}

/// Issue 15 item 1: height from one node, statuses from another 45 slots behind, the
/// memo search from a third: the transaction landed at its last valid height, and
/// the lag is more than the expiry margin. Answers from behind the slot the expiry
/// rests on prove nothing; one transfer on chain.
#[tokio::test]
async fn a_load_balanced_cluster_causes_no_false_expiry() {
    let (t, fake, cfg, chain) = setup().await;
    let behind = Node {
        lag: 45,
        ..Node::default()
    };
    fake.set_nodes(vec![Node::default(), behind, behind]);
    let (id, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    fake.script(|s| {
        s.hold_sends = 1;
        s.route("getLatestBlockhash", 0);
        s.route("sendTransaction", 0);
    });
    assert!(drive(&t.pool, &cfg, &chain, &id).await.unwrap().is_none());
    let sig = state(&t.pool, &id).await.1;
    let lvbh = last_valid_height(&t.pool, &id).await;
    fake.advance(lvbh as u64 - fake.height());
    assert_eq!(fake.land_held(), 1, "landed at its last valid height");
    fake.advance(EXPIRY_MARGIN_BLOCKS + 2);
    for _ in 0..4 {
        fake.script(|s| {
            for m in ["getEpochInfo", "getBlockHeight", "getLatestBlockhash"] {
                s.route(m, 0);
            }
            for _ in 0..20 {
                s.route("getSignatureStatuses", 1);
                s.route("getSignaturesForAddress", 2);
                s.route("sendTransaction", 0);
            }
        });
        let r = drive(&t.pool, &cfg, &chain, &id).await;
        assert!(matches!(r, Ok(None)), "{r:?}");
        assert_eq!(state(&t.pool, &id).await.1, sig, "never re-signed");
    }
    fake.script(|s| s.route.clear());
    let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
    assert_eq!(done["signature"].as_str(), sig.as_deref());
    assert_ndc(&t.pool, &fake, 1).await;
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM charge_intent_signatures").await,
        1
    );
}

/// Issue 15 item 3: the first send landed but its answer was lost; the resend goes to
/// a node whose status view has not caught up but whose accounts have (the allowance
/// is spent), and is refused. That refusal is no proof: the intent is confirmed with
/// the first signature, never failed.
#[tokio::test]
async fn a_refused_resend_is_not_proof_the_first_never_landed() {
    let (t, fake, cfg, chain) = setup().await;
    // Node 1 serves no history: it has not caught up with the status of anything.
    fake.set_nodes(vec![Node::default(), Node { lag: 0, history: 0 }]);
    let (id, escrow) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 6 * USDC, 60_000).await;
    fake.script(|s| {
        s.hang_sends_after = 1;
        s.route("sendTransaction", 0);
    });
    assert!(
        drive(&t.pool, &cfg, &chain, &id).await.is_err(),
        "timed out"
    );
    assert_eq!(fake.balance(&escrow), 94 * USDC, "the first send landed");
    fake.advance(2);
    fake.script(|s| {
        for m in ["getEpochInfo", "getSignatureStatuses", "sendTransaction"] {
            s.route(m, 1);
        }
        for _ in 0..20 {
            s.route("getSignatureStatuses", 1);
        }
    });
    let r = drive(&t.pool, &cfg, &chain, &id).await;
    assert!(matches!(r, Ok(None)), "{r:?}");
    let (st, _) = state(&t.pool, &id).await;
    assert_ne!(
        st, "failed",
        "a refused resend failed an intent whose money moved"
    );
    fake.script(|s| s.route.clear());
    fake.set_nodes(vec![Node::default()]);
    let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
    assert_eq!(done["state"], "confirmed");
    let suspended: Option<String> =
        sqlx::query_scalar("SELECT suspend_reason FROM service_instances WHERE customer_id = 1")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(suspended, None);
    assert_ndc(&t.pool, &fake, 1).await;
}

/// Issue 15 item 2: the delegate runs out of SOL. That is the operator's to fix:
/// intents wait (no failure, no suspension, nothing released); topped up, each is
/// charged once.
#[tokio::test]
async fn a_delegate_out_of_sol_makes_charges_wait_not_fail() {
    let (t, fake, cfg, chain) = setup().await;
    let (a, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let (b, _) = intent(&t.pool, &cfg, &fake, 2, 100 * USDC, 100 * USDC, 70_000).await;
    for (lamports, id) in [(0, &a), (solana::FEE - 1, &b)] {
        fake.set_delegate_lamports(lamports);
        for _ in 0..3 {
            let e = drive(&t.pool, &cfg, &chain, id).await.unwrap_err();
            assert!(matches!(e, Step::Chain(ChainError::FeePayer(_))), "{e:?}");
        }
        assert_eq!(
            chain.fee_payer_lamports().await.unwrap(),
            lamports,
            "the balance the gauge shows"
        );
    }
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM charge_intents WHERE state IN ('signed', 'sent')"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM service_instances WHERE state = 'suspended'"
        )
        .await,
        0
    );
    assert_eq!(fake.charges_landed().len(), 0);
    // Hours of it: each transaction expires unsent, and none is signed anew while the
    // delegate cannot pay (they would only pile up).
    for _ in 0..3 {
        fake.advance(VALID_BLOCKS + EXPIRY_MARGIN_BLOCKS + 2);
        for id in [&a, &b] {
            let e = drive(&t.pool, &cfg, &chain, id).await.unwrap_err();
            assert!(matches!(e, Step::Chain(ChainError::FeePayer(_))), "{e:?}");
        }
    }
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM charge_intent_signatures").await,
        2,
        "one signature each"
    );
    fake.set_delegate_lamports(1_000_000_000);
    for id in [&a, &b] {
        assert_eq!(
            settle(&t.pool, &cfg, &fake, &chain, id).await["state"],
            "confirmed"
        );
    }
    assert_ndc(&t.pool, &fake, 2).await;
}

/// Issue 15 item 4: anyone can send tokens with an intent's memo, into the escrow or
/// the treasury. Neither is taken for the charge (the intent is charged for real,
/// once), and reconciliation does not report a double charge for them.
#[tokio::test]
async fn memos_not_signed_by_the_delegate_are_ignored() {
    let (t, fake, cfg, chain) = setup().await;
    let (id, escrow) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let first = sent_but_dropped(&t.pool, &cfg, &fake, &chain, &id).await;
    fake.script(|s| s.drop_sends = 1_000);
    // A stranger's transfer to the treasury, for the amount, with the intent's memo,
    // in the escrow's history too, while the real one is dropped.
    fake.send_foreign_charge(&id, 6 * USDC, Some(&escrow));
    fake.advance(VALID_BLOCKS + EXPIRY_MARGIN_BLOCKS + 2);
    fake.script(|s| s.drop_sends = 0);
    let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
    assert_eq!(done["state"], "confirmed");
    assert_ne!(
        done["signature"].as_str(),
        first.as_deref(),
        "signed anew, not confirmed by the stranger's transfer"
    );
    assert_eq!(fake.balance(&escrow), 94 * USDC, "charged for real");
    assert_eq!(fake.charges_landed().len(), 1, "one charge by the delegate");
    // And one more into the treasury alone: reconcile ignores both.
    fake.send_foreign_charge(&id, 1, None);
    fake.advance(2);
    let r = longshore_jobs::billing::reconcile::reconcile(&t.pool, &chain, 10_000)
        .await
        .unwrap();
    assert!(r.is_clean(), "{:?}", r.differences);
    assert_eq!(r.foreign_transfers, 2);
    assert_eq!(r.chain_transfers.count, 1);
}

/// Row 20 on the chain side: four drivers race for one intent → one transfer.
#[tokio::test]
async fn row20_racing_drivers_move_the_tokens_once() {
    let t = db().await;
    let fake = FakeSolana::start().await;
    fake.produce_blocks(Duration::from_millis(40));
    let cfg = cfg(&fake);
    let (id, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = t.pool.clone();
        let cfg = cfg.clone();
        let id = id.clone();
        let chain = chain(&cfg);
        tasks.push(tokio::spawn(async move {
            // A racer may lose a compare-and-set and see the winner's work next loop.
            for _ in 0..20 {
                if let Ok(Some(_)) = drive(&pool, &cfg, &chain, &id).await {
                    return;
                }
            }
            panic!("never settled");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_ndc(&t.pool, &fake, 1).await;
}

/// Issue 15 item 7: the balance rule judges what the escrow account lets the delegate
/// take on chain, not the row's figure (which nothing ever credited): the smaller of
/// the tokens and the allowance, nothing for another delegate or another mint. Each
/// customer is charged what is there (cut to it) and suspended for the rest; a
/// deposit the row never heard of is charged. Checked on the chain's balances.
#[tokio::test]
async fn the_balance_rule_judges_the_escrow_on_chain() {
    let (t, fake, cfg, chain) = setup().await;
    let stranger = solana_address::Address::new_unique();
    let cases = [
        // (escrow, the row's balance, what the chain holds for us, what is charged:
        // cents)
        (fake.open_escrow(3 * USDC, 1000 * USDC), 1_000_000, 300, 300),
        (fake.open_escrow(100 * USDC, 2 * USDC), 1_000_000, 200, 200),
        (
            fake.raw_escrow(None, 100 * USDC, Some((stranger, 100 * USDC))),
            1_000_000,
            0,
            0,
        ),
        (
            fake.raw_escrow(
                Some(fake.other_mint()),
                100 * USDC,
                Some((fake.delegate, 100 * USDC)),
            ),
            1_000_000,
            0,
            0,
        ),
        (fake.open_escrow(100 * USDC, 100 * USDC), 0, 10_000, 600),
        // Not an address at all: nothing to charge, so suspended, not skipped forever.
        ("not,an address".to_string(), 1_000_000, 0, 0),
    ];
    for (c, (escrow, row, _, _)) in cases.iter().enumerate() {
        let c = c as i32 + 1;
        ledger::customer(&t.pool, c, escrow, *row, 1_000_000, "enterprise").await;
        ledger::usage(&t.pool, c, 2, 60_000).await; // $6.00 each
    }
    let before: Vec<u64> = cases
        .iter()
        .take(5)
        .map(|(e, _, _, _)| fake.balance(e))
        .collect();
    let r = run_cycle_on(&t.pool, &cfg, Some(&chain), None, Utc::now())
        .await
        .unwrap();
    assert!(r.unread.is_empty(), "{r:?}");
    for (c, (_, _, held, take)) in cases.iter().enumerate() {
        let c = c as i32 + 1;
        let (balance, state): (i64, String) = sqlx::query_as(
            "SELECT c.current_balance_usd_cents, s.state FROM customers c JOIN service_instances s USING (customer_id) WHERE customer_id = $1",
        )
        .bind(c)
        .fetch_one(&t.pool)
        .await
        .unwrap();
        assert_eq!(
            balance, *held,
            "customer {c}: the balance read from the chain"
        );
        let want = if *take == 600 { "active" } else { "suspended" };
        assert_eq!(state, want, "customer {c}");
    }
    let ids: Vec<(i32, String)> = sqlx::query_as(
        "SELECT customer_id, intent_id::text FROM charge_intents ORDER BY customer_id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        ids.iter().map(|i| i.0).collect::<Vec<_>>(),
        [1, 2, 5],
        "nothing is sent from an account that holds nothing for us"
    );
    for (_, id) in &ids {
        let done = settle(&t.pool, &cfg, &fake, &chain, id).await;
        assert_eq!(done["state"], "confirmed");
    }
    for (i, (escrow, _, _, take)) in cases.iter().enumerate().take(5) {
        let moved = before[i] - fake.balance(escrow);
        assert_eq!(moved, *take as u64 * 10_000, "customer {}: on chain", i + 1);
    }
    // An RPC that cannot answer: the customer waits, neither charged nor suspended.
    ledger::usage(&t.pool, 5, 1, 60_000).await;
    fake.script(|s| s.unavailable = 1_000);
    let r = run_cycle_on(&t.pool, &cfg, Some(&chain), Some(5), Utc::now())
        .await
        .unwrap();
    assert_eq!(
        (r.unread.as_slice(), r.intents.len()),
        (&[5][..], 0),
        "{r:?}"
    );
    fake.script(|s| s.unavailable = 0);
}

/// Issue 15 item 7 (review): a transfer that landed on chain while its intent is still
/// `sent` in the database has already left the balance read from the chain; it is not
/// subtracted a second time (which suspended the customer until the confirm).
#[tokio::test]
async fn a_landed_charge_is_not_subtracted_twice() {
    let (t, fake, cfg, chain) = setup().await;
    let escrow = fake.open_escrow(12 * USDC, 100 * USDC);
    ledger::customer(&t.pool, 1, &escrow, 0, 1_000_000, "enterprise").await;
    ledger::usage(&t.pool, 1, 2, 60_000).await; // $6.00
    let r = run_cycle_on(&t.pool, &cfg, Some(&chain), None, Utc::now())
        .await
        .unwrap();
    assert_eq!(r.intents.len(), 1, "{r:?}");
    let id = r.intents[0]["intent_id"].as_str().unwrap();
    // Sent and landed, not yet confirmed by the driver.
    assert!(drive(&t.pool, &cfg, &chain, id).await.unwrap().is_none());
    fake.advance(2);
    assert_eq!(fake.balance(&escrow), 6 * USDC, "the transfer is on chain");
    assert_eq!(state(&t.pool, id).await.0, "sent");
    ledger::usage(&t.pool, 1, 1, 60_000).await; // $6.00: exactly what is left
    let r = run_cycle_on(&t.pool, &cfg, Some(&chain), None, Utc::now())
        .await
        .unwrap();
    assert!(r.suspended.is_empty() && r.unread.is_empty(), "{r:?}");
    assert_eq!(r.customers, 1, "judged, not skipped: {r:?}");
    let balance: i64 =
        sqlx::query_scalar("SELECT current_balance_usd_cents FROM customers WHERE customer_id = 1")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(balance, 600, "the balance read after the transfer landed");
    let (st, reason): (String, Option<String>) =
        sqlx::query_as("SELECT state, suspend_reason FROM service_instances WHERE customer_id = 1")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!((st.as_str(), reason), ("active", None));
    assert_eq!(
        settle(&t.pool, &cfg, &fake, &chain, id).await["state"],
        "confirmed"
    );
    let r = run_cycle_on(&t.pool, &cfg, Some(&chain), None, Utc::now())
        .await
        .unwrap();
    assert_eq!(r.intents.len(), 1, "the second $6.00 follows: {r:?}");
    let id = r.intents[0]["intent_id"].as_str().unwrap();
    assert_eq!(
        settle(&t.pool, &cfg, &fake, &chain, id).await["state"],
        "confirmed"
    );
    assert_eq!(fake.balance(&escrow), 0, "$12.00 moved, each charge once");
}

/// The SPL Token program refuses: an allowance too small, a balance too small, an
/// escrow approved for someone else, an account of another mint, no account at all.
/// Each → failed with the reason, usage billable again, the service suspended,
/// nothing moved.
#[tokio::test]
async fn rejections_by_the_token_program_fail_the_intent_and_move_nothing() {
    let (t, fake, cfg, chain) = setup().await;
    let stranger = solana_address::Address::new_unique();
    let cases: Vec<(&str, String)> = vec![
        ("allowance", fake.open_escrow(100 * USDC, USDC)),
        ("balance", fake.open_escrow(2 * USDC, 100 * USDC)),
        (
            "approved for another delegate",
            fake.raw_escrow(None, 100 * USDC, Some((stranger, 100 * USDC))),
        ),
        (
            "another mint",
            fake.raw_escrow(
                Some(fake.other_mint()),
                100 * USDC,
                Some((fake.delegate, 100 * USDC)),
            ),
        ),
        (
            "no account",
            solana_address::Address::new_unique().to_string(),
        ),
    ];
    for (i, (why, escrow)) in cases.iter().enumerate() {
        let c = i as i32 + 1;
        let id = billed(&t.pool, &cfg, c, escrow, 60_000).await;
        let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
        assert_eq!(done["state"], "failed", "{why}");
        let (state, reason): (String, Option<String>) = sqlx::query_as(
            "SELECT state, suspend_reason FROM service_instances WHERE customer_id = $1",
        )
        .bind(c)
        .fetch_one(&t.pool)
        .await
        .unwrap();
        assert_eq!(
            (state.as_str(), reason.as_deref()),
            ("suspended", Some("charge_failed")),
            "{why}"
        );
        let err: String =
            sqlx::query_scalar("SELECT last_error FROM charge_intents WHERE intent_id = $1::uuid")
                .bind(&id)
                .fetch_one(&t.pool)
                .await
                .unwrap();
        assert!(err.contains("rejected"), "{why}: {err}");
    }
    assert_eq!(fake.balance(&cases[0].1), 100 * USDC);
    assert_eq!(fake.balance(&cases[1].1), 2 * USDC);
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM charge_intent_records WHERE NOT released"
        )
        .await,
        0,
        "every slice released: the usage is billable again"
    );
    assert_ndc(&t.pool, &fake, 0).await;
}

/// A worker's RPC settings are checked at start, naming the key, never the secret.
#[tokio::test]
async fn rpc_settings_are_checked_at_start() {
    let fake = FakeSolana::start().await;
    let vars = env(&fake);
    let with = |key: &str, value: &str| {
        let mut v: Vec<(&str, &str)> = vars
            .iter()
            .filter(|(k, _)| k != key)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if !value.is_empty() {
            v.push((key, value));
        }
        BillingConfig::from_config(&common::config(&v))
            .unwrap_err()
            .to_string()
    };
    let e = with(
        "LONGSHORE__BILLING__CHAIN__DELEGATE_KEYPAIR",
        "[1, 2, 3, 99]",
    );
    assert!(
        e.contains("billing.chain.delegate_keypair") && !e.contains("99"),
        "{e}"
    );
    let e = with("LONGSHORE__BILLING__CHAIN__COMMITMENT", "processed");
    assert!(
        e.contains("billing.chain.commitment") && e.contains("fork"),
        "{e}"
    );
    let e = with("LONGSHORE__BILLING__CHAIN__USDC_MINT", "not-a-mint");
    assert!(e.contains("billing.chain.usdc_mint"), "{e}");
    let e = with("LONGSHORE__BILLING__CHAIN__RPC_URL", "");
    assert!(e.contains("billing.chain.rpc_url"), "{e}");
    let e = with(
        "LONGSHORE__BILLING__CHAIN__RPC_URL",
        "ftp://x/?api-key=SECRET",
    );
    assert!(
        e.contains("billing.chain.rpc_url") && !e.contains("SECRET"),
        "{e}"
    );
    let cfg = cfg(&fake);
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains(&fake.delegate_json) && !shown.contains(API_KEY),
        "{shown}"
    );
    let rpc = cfg.chain.rpc_config().unwrap();
    let shown = format!("{rpc:?}");
    assert!(
        !shown.contains(&fake.delegate_json) && !shown.contains(API_KEY),
        "{shown}"
    );
    assert!(shown.contains(&fake.delegate.to_string()), "{shown}");
    assert!(!chain(&cfg).describe().contains(API_KEY));
}

// ---- Row 18: kill -9 of a real worker process at each step, then a real resume. ----

fn worker(t_url: &str, fake: &FakeSolana) -> Proc {
    let vars = env(fake);
    let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend([
        ("LONGSHORE__WORKER__POLL_INTERVAL", "100ms"),
        ("LONGSHORE__QUEUES__CHARGE_ESCROW__LEASE", "1s"),
        ("LONGSHORE__QUEUES__CHARGE_ESCROW__BACKOFF_BASE", "50ms"),
        ("LONGSHORE__QUEUES__CHARGE_ESCROW__BACKOFF_CAP", "200ms"),
    ]);
    Proc::spawn(t_url, &["worker"], &env)
}

/// Waits until the charge queue is empty (the job acked), then stops the worker.
async fn stop_when_done(pool: &PgPool, w: &mut Proc) {
    let pool = pool.clone();
    eventually(Duration::from_secs(10), "the job is done", || {
        let pool = pool.clone();
        async move { (count_enqueued(&pool, "charge_escrow").await == 0).then_some(()) }
    })
    .await;
    w.signal("TERM");
    w.wait_exit(Duration::from_secs(10)).await;
}

/// Kills the worker while the endpoint holds the request `hold` scripts, resumes with a
/// new worker, and checks one transfer and one booking.
async fn kill_and_resume(hold: impl FnOnce(&mut solana::Script), at: &str) {
    let t = db().await;
    let fake = FakeSolana::start().await;
    fake.produce_blocks(Duration::from_millis(50));
    let cfg = cfg(&fake);
    fake.script(hold);
    let (id, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let mut w = worker(&t.url, &fake);
    until(
        &format!("the worker held {at}"),
        Duration::from_secs(30),
        || fake.hung() == 1,
    )
    .await;
    w.kill9();
    let mut w2 = worker(&t.url, &fake);
    let pool = t.pool.clone();
    let idc = id.clone();
    eventually(
        Duration::from_secs(30),
        "confirmed after the resume",
        || {
            let pool = pool.clone();
            let id = idc.clone();
            async move { (state(&pool, &id).await.0 == "confirmed").then_some(()) }
        },
    )
    .await;
    stop_when_done(&t.pool, &mut w2).await;
    assert_ndc(&t.pool, &fake, 1).await;
    for logs in [w.logs(), w2.logs()] {
        assert!(
            logs.contains("solana-rpc http://127.0.0.1"),
            "the chain is named in the log"
        );
        assert!(
            !logs.contains(API_KEY) && !logs.contains(&fake.delegate_json),
            "a secret in the log:\n{logs}"
        );
    }
    println!("{at}: resumed, {} sends", fake.sends());
}

#[tokio::test]
async fn row18_kill9_before_signing() {
    kill_and_resume(|s| s.hang_blockhash = 1, "before signing").await;
}

#[tokio::test]
async fn row18_kill9_after_persisting_the_signed_bytes() {
    kill_and_resume(
        |s| s.hang_sends_before = 1,
        "after persist, before the send",
    )
    .await;
}

#[tokio::test]
async fn row18_kill9_after_the_send() {
    kill_and_resume(|s| s.hang_sends_after = 1, "after the send landed").await;
}

#[tokio::test]
async fn row18_kill9_after_the_chain_confirmed_before_booking() {
    kill_and_resume(|s| s.hang_statuses = 1, "after landing, before booking").await;
}

/// Killed right after the booking committed (before or after the job's ack): the
/// resumed worker finds the intent confirmed and books nothing again.
#[tokio::test]
async fn row18_kill9_after_booking() {
    let t = db().await;
    let fake = FakeSolana::start().await;
    fake.produce_blocks(Duration::from_millis(50));
    let cfg = cfg(&fake);
    let (id, _) = intent(&t.pool, &cfg, &fake, 1, 100 * USDC, 100 * USDC, 60_000).await;
    let mut w = worker(&t.url, &fake);
    let pool = t.pool.clone();
    eventually(Duration::from_secs(30), "booked", || {
        let pool = pool.clone();
        async move {
            (count(&pool, "SELECT count(*) FROM escrow_transactions").await == 1).then_some(())
        }
    })
    .await;
    w.kill9();
    let mut w2 = worker(&t.url, &fake);
    stop_when_done(&t.pool, &mut w2).await;
    assert_eq!(state(&t.pool, &id).await.0, "confirmed");
    assert_ndc(&t.pool, &fake, 1).await;
}

/// `longshore billing reconcile` (the real binary, over RPC): clean after real charges;
/// then each kind of damage to the ledger is reported and the exit code is 1.
#[tokio::test]
async fn reconcile_compares_the_ledger_with_the_chain() {
    let (t, fake, cfg, chain) = setup().await;
    let mut ids = Vec::new();
    for c in 1..=3 {
        let (id, _) = intent(
            &t.pool,
            &cfg,
            &fake,
            c,
            100 * USDC,
            100 * USDC,
            50_000 + c as i64 * 10_000,
        )
        .await;
        settle(&t.pool, &cfg, &fake, &chain, &id).await;
        ids.push(id);
    }
    // The CLI blocks; the endpoint runs on this runtime, so run it off the runtime.
    let run = || {
        let vars = env(&fake);
        let url = t.url.clone();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            common::run_cli(&url, &["billing", "reconcile", "--json"], &env)
        })
    };
    let (code, out, err) = run().await.unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["differences"], serde_json::json!([]));
    assert_eq!(r["confirmed_intents"]["cents"], 2100);
    assert_eq!(r["ledger_charges"]["cents"], 2100);
    assert_eq!(r["chain_transfers"]["cents"], 2100);
    assert_eq!(r["chain_transfers"]["count"], 3);

    // Damage: an intent no longer confirmed (money moved, booked nowhere), and a
    // ledger row with another amount.
    sqlx::query("UPDATE charge_intents SET state = 'failed' WHERE intent_id = $1::uuid")
        .bind(&ids[0])
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE escrow_transactions SET amount = amount + 1 WHERE tx_digest = (SELECT signature FROM charge_intents WHERE intent_id = $1::uuid)")
        .bind(&ids[1])
        .execute(&t.pool)
        .await
        .unwrap();
    let (code, out, err) = run().await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    let kinds: Vec<&str> = r["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"unbooked_transfer"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "ledger_mismatch").count(),
        2,
        "{out}"
    );
    assert!(
        err.contains("difference(s) between the ledger and the chain"),
        "{err}"
    );
}

/// Row 23 over RPC: an escrow that is not an address, or an amount over the ceiling,
/// fails the intent before anything is built: the endpoint never sees a transaction.
#[tokio::test]
async fn row23_bad_addresses_and_amounts_never_reach_the_endpoint() {
    let t = db().await;
    let fake = FakeSolana::start().await;
    let mut vars = env(&fake);
    vars.push((
        "LONGSHORE__BILLING__CHAIN__MAX_CHARGE_USD".into(),
        "50.00".into(),
    ));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = chain(&cfg);
    let good = fake.open_escrow(100 * USDC, 100 * USDC);
    for (c, escrow, billable) in [(1, "not,an address", 60_000), (2, good.as_str(), 100_000)] {
        let id = billed(&t.pool, &cfg, c, escrow, billable).await;
        if c == 2 {
            // The cycle never makes an intent over the ceiling (it cuts); one that is
            // anyway (a row tampered with) is refused before it is built.
            sqlx::query("UPDATE charge_intents SET amount = 51.00 WHERE intent_id = $1::uuid")
                .bind(&id)
                .execute(&t.pool)
                .await
                .unwrap();
        }
        let done = settle(&t.pool, &cfg, &fake, &chain, &id).await;
        assert_eq!(done["state"], "failed", "customer {c}");
    }
    assert_eq!(fake.sends(), 0, "nothing was sent");
    assert_eq!(fake.balance(&good), 100 * USDC);
    assert_ndc(&t.pool, &fake, 0).await;
}
