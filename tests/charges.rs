//! Billing cycles and charges against a real PostgreSQL: the threshold, both rejection
//! rules with their exact details, suspension → vault, resume, monthly reset and base
//! fees, late rows, a cycle run twice, racing cycles (row 20), and `charge_escrow`'s
//! bookkeeping on the dev chain simulator (confirmed, rejected, invalid: row 23).

mod common;
#[path = "common/ledger.rs"]
mod ledger;

use std::sync::Arc;

use chrono::{Datelike, Months, NaiveDate, Utc};
use common::{count, db};
use longshore_jobs::billing::bill_usage::{BillReport, run_cycle};
use longshore_jobs::billing::charge_escrow::Driver;
use longshore_jobs::billing::config::BillingConfig;
use longshore_jobs::clients::chain::Chain;
use longshore_jobs::clients::chain_sim::SimulatedChain;
use longshore_workers::testing::{count_done, count_enqueued, enqueued_args, ever_enqueued};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;

fn cfg(vars: &[(&str, &str)]) -> BillingConfig {
    BillingConfig::from_config(&common::config(vars)).unwrap()
}

fn escrow(c: i32) -> String {
    bs58::encode([c as u8; 32]).into_string()
}

/// A customer with a `seal` service (enterprise: no base fee unless a test wants one)
/// and one API key; escrow account `escrow(c)`.
async fn customer(pool: &PgPool, c: i32, balance_cents: i64, max_cents: i64, tier: &str) {
    ledger::customer(pool, c, &escrow(c), balance_cents, max_cents, tier).await
}

use ledger::usage;

async fn cycle(pool: &PgPool, cfg: &BillingConfig) -> BillReport {
    run_cycle(pool, cfg, None, Utc::now()).await.unwrap()
}

async fn service(pool: &PgPool, c: i32) -> (String, Option<String>, Option<Value>) {
    sqlx::query_as(
        "SELECT state, suspend_reason, suspend_details FROM service_instances WHERE customer_id = $1",
    )
    .bind(c)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Customer `c`'s service is suspended for `reason`, with exactly these details.
async fn assert_suspended(pool: &PgPool, c: i32, reason: &str, details: Value) {
    let (state, got, d) = service(pool, c).await;
    assert_eq!(
        (state.as_str(), got.as_deref()),
        ("suspended", Some(reason))
    );
    assert_eq!(d, Some(details));
}

async fn intents(pool: &PgPool, c: i32) -> Vec<(String, Decimal, String)> {
    sqlx::query_as(
        "SELECT intent_id::text, amount, state FROM charge_intents WHERE customer_id = $1 ORDER BY created_at",
    )
    .bind(c)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn drive(pool: &PgPool, cfg: &BillingConfig, chain: &dyn Chain, intent: &str) -> Value {
    Driver {
        pool: pool.clone(),
        chain,
        cfg,
        intent_id: intent.parse().unwrap(),
    }
    .drive()
    .await
    .unwrap()
    .expect("settled within confirm_timeout")
}

fn sim(units: u64) -> Arc<SimulatedChain> {
    Arc::new(SimulatedChain::new(escrow(250), units, 10_000_000_000))
}

fn fast() -> Vec<(&'static str, &'static str)> {
    vec![
        ("LONGSHORE__BILLING__CHAIN__POLL_INTERVAL", "50ms"),
        ("LONGSHORE__BILLING__CHAIN__CONFIRM_TIMEOUT", "5s"),
    ]
}

#[tokio::test]
async fn below_the_threshold_waits_at_it_one_intent_covers_exactly_those_records() {
    let t = db().await;
    let cfg = cfg(&[]);
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 3, 20_000).await; // $2.00
    usage(&t.pool, 1, 2, 29_999).await; // $2.9999: $4.9999 in all, under $5.00
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty(), "{r:?}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM charge_intents").await,
        0
    );

    usage(&t.pool, 1, 1, 1).await; // $5.0000 exactly
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(r.intents.len(), 1, "{r:?}");
    assert_eq!(r.intents[0]["amount_usd"], "5.00");
    let i = intents(&t.pool, 1).await;
    assert_eq!(i.len(), 1);
    assert_eq!((i[0].1, i[0].2.as_str()), (Decimal::new(500, 2), "created"));
    // Exactly the three records, each slice from 0 to its billable count.
    let slices: Vec<(i64, i64, Decimal)> = sqlx::query_as(
        "SELECT from_count, to_count, amount FROM charge_intent_records ORDER BY record_id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        slices,
        [
            (0, 20_000, Decimal::new(2, 0)),
            (0, 29_999, Decimal::new(29_999, 4)),
            (0, 1, Decimal::new(1, 4))
        ]
    );
    // charge_escrow {intent_id} is enqueued in the same transaction.
    assert_eq!(
        enqueued_args(&t.pool, "charge_escrow").await,
        [json!({"intent_id": i[0].0})]
    );
}

#[tokio::test]
async fn amounts_round_up_to_the_cent() {
    let t = db().await;
    let cfg = cfg(&[]);
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 50_001).await; // $5.0001 → $5.01
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(r.intents[0]["amount_usd"], "5.01");
    assert_eq!(r.intents[0]["usage_usd"], "5.0001");
}

#[tokio::test]
async fn insufficient_balance_suspends_with_details_the_vault_drops_the_keys_a_deposit_resumes() {
    let t = db().await;
    let dir = std::env::temp_dir().join(format!("longshore-charges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vault = dir.join("ma_vault.csv");
    let cfg = cfg(&[("LONGSHORE__BILLING__VAULT_PATH", vault.to_str().unwrap())]);
    customer(&t.pool, 1, 300, 20_000, "enterprise").await; // $3.00 of balance
    customer(&t.pool, 2, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 60_000).await; // $6.00
    let r = cycle(&t.pool, &cfg).await;
    // The $3.00 there is charged (issue 15 item 6); the rest waits, suspended.
    assert_eq!(r.intents.len(), 1, "{r:?}");
    assert_eq!(r.intents[0]["amount_usd"], "3.00");
    assert_eq!(r.suspended.len(), 1);
    assert_suspended(&t.pool, 1, "insufficient_balance", json!({"current_balance_usd": "0.00", "estimated_cost_usd": "3.00", "required_deposit_usd": "3.00"})).await;
    // A coalesced vault regeneration is requested in the same transaction...
    assert_eq!(
        enqueued_args(&t.pool, "regenerate_vault").await,
        [json!({"path": vault.to_str().unwrap()})]
    );
    // ...and the file it writes has only customer 2's key.
    let key = longshore_jobs::billing::regenerate_vault::VaultKey::from_base64(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    )
    .unwrap();
    let mut tx = t.pool.begin().await.unwrap();
    longshore_jobs::billing::regenerate_vault::regenerate(&mut tx, &vault, &key, &cfg.rate_limits)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let text = std::fs::read_to_string(&vault).unwrap();
    let customers: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(customers, ["2"]);

    // Still short: stays suspended, no intent; the details follow the numbers.
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty() && r.resumed.is_empty());
    // A deposit: the next cycle resumes the service; the rest is charged once the
    // first $3.00 (still in flight) settles.
    sqlx::query("UPDATE customers SET current_balance_usd_cents = 1000 WHERE customer_id = 1")
        .execute(&t.pool)
        .await
        .unwrap();
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!((r.resumed.len(), r.intents.len()), (1, 0), "{r:?}");
    assert_eq!(service(&t.pool, 1).await.0, "active");
}

#[tokio::test]
async fn monthly_limit_exceeded_then_the_monthly_reset_resumes() {
    let t = db().await;
    let cfg = cfg(&[]);
    // Cap $200.00, $195.00 charged this month, plenty of balance.
    customer(&t.pool, 1, 1_000_000, 20_000, "enterprise").await;
    sqlx::query(
        "UPDATE customers SET current_month_charged_usd_cents = 19500 WHERE customer_id = 1",
    )
    .execute(&t.pool)
    .await
    .unwrap();
    usage(&t.pool, 1, 1, 50_100).await; // $5.01
    let r = cycle(&t.pool, &cfg).await;
    // The $5.00 the cap leaves is charged; the last cent waits, suspended.
    assert_eq!(r.intents.len(), 1, "{r:?}");
    assert_eq!(r.intents[0]["amount_usd"], "5.00");
    assert_suspended(
        &t.pool,
        1,
        "monthly_limit_exceeded",
        json!({"max_monthly_usd": "200.00", "current_month_charged_usd": "200.00",
               "estimated_cost_usd": "0.01", "remaining_authorization_usd": "0.00"}),
    )
    .await;

    // The 1st of the month (UTC): pretend this month's counters began last month.
    let this_month = Utc::now().date_naive().with_day(1).unwrap();
    let last_month = this_month.checked_sub_months(Months::new(1)).unwrap();
    sqlx::query("UPDATE customers SET current_month_start = $1 WHERE customer_id = 1")
        .bind(last_month)
        .execute(&t.pool)
        .await
        .unwrap();
    // Resumed; the last cent follows the $5.00 still in flight.
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(
        (r.resets, r.resumed.len(), r.intents.len()),
        (1, 1, 0),
        "{r:?}"
    );
    let (last, current, start): (i64, i64, NaiveDate) = sqlx::query_as(
        "SELECT last_month_charged_usd_cents, current_month_charged_usd_cents, current_month_start FROM customers",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!((last, current, start), (19_500, 0, this_month));
    assert_eq!(service(&t.pool, 1).await.0, "active");
    // A second cycle resets nothing more.
    assert_eq!(cycle(&t.pool, &cfg).await.resets, 0);
}

/// Issue 15 item 6: a backlog larger than the cap is billed up to it, the oldest usage
/// first and down to the request; the rest stays unbilled (suspended with the rule) and
/// is billed after the reset. Before, the whole $300 was refused every cycle, forever.
/// Checked on the chain: $200, then $100, left the escrow account.
#[tokio::test]
async fn a_backlog_past_the_cap_is_billed_up_to_it_and_the_rest_after_the_reset() {
    let t = db().await;
    let vars = fast();
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = sim(1_000_000_000); // $1,000 in escrow
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await; // cap $200
    usage(&t.pool, 1, 3, 1_500_000).await; // $150
    usage(&t.pool, 1, 2, 1_500_000).await; // $150: $300 in all
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(r.intents.len(), 1, "{r:?}");
    assert_eq!(r.intents[0]["amount_usd"], "200.00");
    let slices: Vec<(i64, i64)> =
        sqlx::query_as("SELECT from_count, to_count FROM charge_intent_records ORDER BY record_id")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(
        slices,
        [(0, 1_500_000), (0, 500_000)],
        "oldest first, cut to the request"
    );
    assert_suspended(
        &t.pool,
        1,
        "monthly_limit_exceeded",
        json!({"max_monthly_usd": "200.00", "current_month_charged_usd": "200.00",
               "estimated_cost_usd": "100.00", "remaining_authorization_usd": "0.00"}),
    )
    .await;
    // In flight: no second intent, still judged (and still suspended).
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty() && r.resumed.is_empty(), "{r:?}");
    let i = intents(&t.pool, 1).await;
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), &i[0].0).await["state"],
        "confirmed"
    );
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty(), "the cap is spent: {r:?}");
    assert_eq!(
        service(&t.pool, 1).await.1.as_deref(),
        Some("monthly_limit_exceeded")
    );
    let moved = |a: u64| 1_000_000_000 - a;
    let left = chain
        .token_account(&escrow(1))
        .await
        .unwrap()
        .unwrap()
        .amount;
    assert_eq!(moved(left), 200_000_000, "$200 on chain");

    // The reset: the rest is billed and the service resumes.
    let this_month = Utc::now().date_naive().with_day(1).unwrap();
    sqlx::query("UPDATE customers SET current_month_start = $1 WHERE customer_id = 1")
        .bind(this_month.checked_sub_months(Months::new(1)).unwrap())
        .execute(&t.pool)
        .await
        .unwrap();
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(
        (r.resets, r.resumed.len(), r.intents.len()),
        (1, 1, 1),
        "{r:?}"
    );
    assert_eq!(r.intents[0]["amount_usd"], "100.00");
    let i = intents(&t.pool, 1).await;
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), &i[1].0).await["state"],
        "confirmed"
    );
    let left = chain
        .token_account(&escrow(1))
        .await
        .unwrap()
        .unwrap()
        .amount;
    assert_eq!(moved(left), 300_000_000, "$300 on chain, each request once");
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM usage_records WHERE billed_count < billable_count"
        )
        .await,
        0
    );
    let charged: Decimal = sqlx::query_scalar("SELECT sum(charged_amount) FROM usage_records")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(charged, Decimal::from(300));
}

/// Issue 15 item 6: an amount over `chain.max_charge_usd` is charged in intents of at
/// most that, one after another, without suspending anyone; a service with one in
/// flight that runs past its balance is suspended at once, not when it settles.
#[tokio::test]
async fn charges_are_cut_to_the_chains_limit_and_usage_in_flight_is_still_judged() {
    let t = db().await;
    let mut vars = fast();
    vars.push(("LONGSHORE__BILLING__CHAIN__MAX_CHARGE_USD", "50"));
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = sim(1_000_000_000);
    customer(&t.pool, 1, 100_000, 1_000_000, "enterprise").await; // $1,000, cap $10,000
    usage(&t.pool, 1, 3, 1_200_000).await; // $120
    let mut amounts = Vec::new();
    for _ in 0..4 {
        let r = cycle(&t.pool, &cfg).await;
        assert!(
            r.suspended.is_empty(),
            "the chain's limit suspends nobody: {r:?}"
        );
        if let Some(i) = r.intents.first() {
            amounts.push(i["amount_usd"].as_str().unwrap().to_string());
            let id = i["intent_id"].as_str().unwrap();
            // In flight: the next cycle makes no second intent.
            assert!(cycle(&t.pool, &cfg).await.intents.is_empty());
            assert_eq!(
                drive(&t.pool, &cfg, chain.as_ref(), id).await["state"],
                "confirmed"
            );
        }
    }
    assert_eq!(amounts, ["50.00", "50.00", "20.00"]);
    let left = chain
        .token_account(&escrow(1))
        .await
        .unwrap()
        .unwrap()
        .amount;
    assert_eq!(1_000_000_000 - left, 120_000_000);

    // Balance now $880. An intent in flight, then usage past what is left.
    usage(&t.pool, 1, 2, 500_000).await; // $50
    assert_eq!(cycle(&t.pool, &cfg).await.intents.len(), 1);
    usage(&t.pool, 1, 1, 9_000_000).await; // $900 more, $880 - $50 left
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty(), "{r:?}");
    let (state, reason, _) = service(&t.pool, 1).await;
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("suspended", Some("insufficient_balance")),
        "judged while the first is in flight"
    );
}

#[tokio::test]
async fn ended_months_are_charged_below_the_threshold_and_base_fees_once_a_month() {
    let t = db().await;
    let cfg = cfg(&[]);
    customer(&t.pool, 1, 1_000_000, 20_000, "enterprise").await;
    customer(&t.pool, 2, 1_000_000, 20_000, "pro").await;
    // $0.0001 of usage in last month: charged at the $0.01 minimum even though it is
    // under the threshold, because its month has ended.
    let hours_into_month = {
        let now = Utc::now();
        (now.day0() * 24 + now.hour()) as i32
    };
    usage(&t.pool, 1, hours_into_month + 2, 1).await;
    let r = cycle(&t.pool, &cfg).await;
    let mut amounts: Vec<(i64, String)> = r
        .intents
        .iter()
        .map(|i| {
            (
                i["customer_id"].as_i64().unwrap(),
                i["amount_usd"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    amounts.sort();
    // Customer 2 (pro) owes its $40.00 base fee for this month; no usage needed.
    assert_eq!(amounts, [(1, "0.01".to_string()), (2, "40.00".to_string())]);
    let fee_month: NaiveDate =
        sqlx::query_scalar("SELECT base_fee_month FROM charge_intents WHERE customer_id = 2")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(fee_month, Utc::now().date_naive().with_day(1).unwrap());
    // Settle customer 2's intent; the base fee is not charged again this month.
    let i = intents(&t.pool, 2).await;
    let chain = sim(1_000_000_000);
    let vars = fast();
    let fast_cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    assert_eq!(
        drive(&t.pool, &fast_cfg, chain.as_ref(), &i[0].0).await["state"],
        "confirmed"
    );
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.iter().all(|i| i["customer_id"] != 2), "{r:?}");
}

use chrono::Timelike;

#[tokio::test]
async fn a_cycle_run_twice_gives_the_same_result() {
    let t = db().await;
    let cfg = cfg(&[]);
    for c in 1..=5 {
        customer(
            &t.pool,
            c,
            if c == 3 { 10 } else { 100_000 },
            20_000,
            "starter",
        )
        .await;
        usage(&t.pool, c, 1, 60_000 + i64::from(c)).await;
    }
    let first = cycle(&t.pool, &cfg).await;
    assert_eq!((first.intents.len(), first.suspended.len()), (4, 1));
    let tables = |pool: PgPool| async move {
        sqlx::query_scalar::<_, Value>(
            r#"SELECT json_build_array(
               (SELECT json_agg(x ORDER BY customer_id, service_type) FROM (SELECT customer_id, service_type, amount, state, base_fee_month FROM charge_intents) x),
               (SELECT json_agg(x ORDER BY record_id) FROM (SELECT record_id, billed_count FROM usage_records) x),
               (SELECT json_agg(x ORDER BY customer_id) FROM (SELECT customer_id, state, suspend_reason, suspend_details FROM service_instances) x),
               (SELECT json_agg(x ORDER BY customer_id) FROM (SELECT customer_id, current_balance_usd_cents, current_month_charged_usd_cents FROM customers) x))"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let snapshot = |pool: PgPool| async move {
        let charges = count_enqueued(&pool, "charge_escrow").await;
        (tables(pool).await, charges)
    };
    let before = snapshot(t.pool.clone()).await;
    let second = cycle(&t.pool, &cfg).await;
    assert!(second.intents.is_empty() && second.suspended.is_empty() && second.resumed.is_empty());
    assert_eq!(snapshot(t.pool.clone()).await, before);
}

#[tokio::test]
async fn row20_racing_cycles_make_one_intent_and_a_request_cannot_be_billed_twice() {
    let t = db().await;
    let cfg = Arc::new(cfg(&[]));
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 70_000).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (pool, cfg) = (t.pool.clone(), cfg.clone());
        set.spawn(async move { run_cycle(&pool, &cfg, None, Utc::now()).await.unwrap() });
    }
    let mut made = 0;
    while let Some(r) = set.join_next().await {
        made += r.unwrap().intents.len();
    }
    assert_eq!(made, 1);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM charge_intents").await,
        1
    );
    assert_eq!(count_enqueued(&t.pool, "charge_escrow").await, 1);
    // The constraint itself: the same slice in a second intent is refused.
    let err = sqlx::query(
        r#"WITH i AS (INSERT INTO charge_intents (intent_id, customer_id, service_type, amount, billing_month, state)
                    VALUES (gen_random_uuid(), 1, 'seal', 7, current_date, 'confirmed') RETURNING intent_id)
         INSERT INTO charge_intent_records (intent_id, record_id, from_count, to_count, amount)
         SELECT i.intent_id, r.record_id, 0, 70000, 7 FROM i, usage_records r"#,
    )
    .execute(&t.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("charge_intent_records_once"),
        "{err}"
    );
}

#[tokio::test]
async fn a_confirmed_charge_is_booked_once_and_late_rows_bill_only_the_delta() {
    let t = db().await;
    let vars = fast();
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = sim(1_000_000_000); // $1,000 in escrow
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 60_000).await; // $6.00
    cycle(&t.pool, &cfg).await;
    let i = intents(&t.pool, 1).await;
    let done = drive(&t.pool, &cfg, chain.as_ref(), &i[0].0).await;
    assert_eq!(done["state"], "confirmed");
    let sig = done["signature"].as_str().unwrap().to_string();
    // Driving it again changes nothing.
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), &i[0].0).await["state"],
        "confirmed"
    );
    let (balance, month): (i64, i64) = sqlx::query_as(
        "SELECT current_balance_usd_cents, current_month_charged_usd_cents FROM customers",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!((balance, month), (100_000 - 600, 600));
    let ledger: Vec<(String, String, Decimal)> =
        sqlx::query_as("SELECT tx_digest::text, tx_type, amount FROM escrow_transactions")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(
        ledger,
        [(sig.clone(), "charge".to_string(), Decimal::new(600, 2))]
    );
    let charged: Decimal = sqlx::query_scalar("SELECT charged_amount FROM usage_records")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(charged, Decimal::new(6, 0));
    // On chain: exactly $6.00 left the escrow account.
    let acct = chain.token_account(&escrow(1)).await.unwrap().unwrap();
    assert_eq!(acct.amount, 1_000_000_000 - 6_000_000);
    // And the reconciliation agrees: intents = ledger = chain.
    let r = longshore_jobs::billing::reconcile::reconcile(&t.pool, chain.as_ref(), 1000)
        .await
        .unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        (
            r.confirmed_intents.cents,
            r.ledger_charges.cents,
            r.chain_transfers.cents
        ),
        (600, 600, 600)
    );

    // Late lines land in the same, already charged hour: only the delta is billed.
    usage(&t.pool, 1, 1, 50_000).await; // +$5.00
    let r = cycle(&t.pool, &cfg).await;
    assert_eq!(r.intents.len(), 1);
    assert_eq!(r.intents[0]["amount_usd"], "5.00");
    let slice: (i64, i64) = sqlx::query_as(
        "SELECT from_count, to_count FROM charge_intent_records r JOIN charge_intents i USING (intent_id) WHERE i.state = 'created'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(slice, (60_000, 110_000));
    let i = intents(&t.pool, 1).await;
    drive(&t.pool, &cfg, chain.as_ref(), &i[1].0).await;
    let charged: Decimal = sqlx::query_scalar("SELECT charged_amount FROM usage_records")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(charged, Decimal::new(11, 0));
    // Reconciliation: Σ confirmed intents = Σ ledger charges = tokens moved.
    let (intents_sum, ledger_sum): (Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT sum(amount) FROM charge_intents WHERE state = 'confirmed'), (SELECT sum(amount) FROM escrow_transactions WHERE tx_type = 'charge')",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    let moved = 1_000_000_000
        - chain
            .token_account(&escrow(1))
            .await
            .unwrap()
            .unwrap()
            .amount;
    assert_eq!(intents_sum, ledger_sum);
    assert_eq!(intents_sum * Decimal::from(1_000_000), Decimal::from(moved));
}

#[tokio::test]
async fn a_rejected_transfer_fails_releases_the_usage_and_suspends() {
    let t = db().await;
    let vars = fast();
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = sim(1_000_000); // only $1.00 of allowance on chain
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 60_000).await;
    cycle(&t.pool, &cfg).await;
    let i = intents(&t.pool, 1).await;
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), &i[0].0).await["state"],
        "failed"
    );
    let (state, reason, details) = service(&t.pool, 1).await;
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("suspended", Some("charge_failed"))
    );
    assert!(
        details.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("allowance")
    );
    // Nothing charged, nothing booked, the requests are billable again.
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM escrow_transactions").await,
        0
    );
    assert_eq!(
        count(&t.pool, "SELECT billed_count FROM usage_records").await,
        0
    );
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM usage_records WHERE charged_amount IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        chain
            .token_account(&escrow(1))
            .await
            .unwrap()
            .unwrap()
            .amount,
        1_000_000
    );
    // A chain rejection is for a person: the cycle neither resumes nor re-charges it.
    let r = cycle(&t.pool, &cfg).await;
    assert!(r.intents.is_empty() && r.resumed.is_empty(), "{r:?}");
}

#[tokio::test]
async fn row23_bad_addresses_and_amounts_never_reach_the_chain() {
    let t = db().await;
    let vars = fast();
    let cfg = BillingConfig::from_config(&common::config(&vars)).unwrap();
    let chain = sim(1_000_000_000);
    for (c, acct) in [(1, Some("not-a-wallet")), (2, None), (3, Some("1,2"))] {
        customer(&t.pool, c, 100_000, 20_000, "enterprise").await;
        sqlx::query("UPDATE customers SET escrow_account = $2 WHERE customer_id = $1")
            .bind(c)
            .bind(acct)
            .execute(&t.pool)
            .await
            .unwrap();
        usage(&t.pool, c, 1, 60_000).await;
    }
    // And one over the per-charge ceiling: the cycle cuts it to $10,000, and an
    // intent above it anyway (a tampered row) is refused before signing.
    customer(&t.pool, 4, 10_000_000, 10_000_000, "enterprise").await;
    usage(&t.pool, 4, 1, 10_000 * 20_000).await; // $20,000 > max_charge_usd $10,000
    cycle(&t.pool, &cfg).await;
    assert_eq!(intents(&t.pool, 4).await[0].1, Decimal::from(10_000));
    sqlx::query("UPDATE charge_intents SET amount = 20000 WHERE customer_id = 4")
        .execute(&t.pool)
        .await
        .unwrap();
    for c in 1..=4 {
        let i = intents(&t.pool, c).await;
        assert_eq!(
            drive(&t.pool, &cfg, chain.as_ref(), &i[0].0).await["state"],
            "failed",
            "customer {c}"
        );
        let err: String =
            sqlx::query_scalar("SELECT last_error FROM charge_intents WHERE customer_id = $1")
                .bind(c)
                .fetch_one(&t.pool)
                .await
                .unwrap();
        assert!(err.starts_with("invalid:"), "{err}");
    }
    // Nothing was signed or sent.
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM charge_intents WHERE signature IS NOT NULL"
        )
        .await,
        0
    );
    assert!(
        chain
            .signatures_for_address(&escrow(250), None, 10, None)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_sweep_re_drives_stuck_intents_once_per_window() {
    let t = db().await;
    let cfg = cfg(&[]);
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    usage(&t.pool, 1, 1, 60_000).await;
    cycle(&t.pool, &cfg).await;
    // The intent's job is lost (say, dead-lettered); the intent sits in `created`.
    sqlx::query("SELECT pgmq.purge_queue('charge_escrow')")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE charge_intents SET updated_at = now() - interval '10 minutes'")
        .execute(&t.pool)
        .await
        .unwrap();
    let sweep = longshore_jobs::billing::sweep_charge_intents::SweepChargeIntents {
        older_than: std::time::Duration::from_secs(120),
    };
    for _ in 0..2 {
        longshore_workers::enqueue(
            &t.pool,
            &sweep,
            longshore_workers::EnqueueOptions::default(),
        )
        .await
        .unwrap();
    }
    let _w = common::Proc::spawn(&t.url, &["worker"], &[]);
    let pool = t.pool.clone();
    common::eventually(
        std::time::Duration::from_secs(15),
        "two sweeps done",
        || {
            let pool = pool.clone();
            async move { (count_done(&pool, "sweep_charge_intents").await == 2).then_some(()) }
        },
    )
    .await;
    // One charge_escrow job for the intent (the chain is "none" here, so it waits).
    let jobs: Vec<Value> = ever_enqueued(&t.pool, "charge_escrow").await;
    let i = intents(&t.pool, 1).await;
    assert_eq!(jobs, [json!({"intent_id": i[0].0})]);
    assert_eq!(i[0].2, "created", "no chain configured: nothing moved");
}

fn at(s: &str) -> chrono::DateTime<Utc> {
    s.parse().unwrap()
}

/// Usage of customer `c` in the hour starting at `window` (UTC).
async fn usage_at(pool: &PgPool, c: i32, window: &str, billable: i64) {
    sqlx::query(
        r#"INSERT INTO usage_records (customer_id, service_type, window_start, window_end, request_count, billable_count, bytes_transferred)
         VALUES ($1, 'seal', $2::timestamptz, $2::timestamptz + interval '1 hour', $3, $3, 0)"#,
    )
    .bind(c)
    .bind(window)
    .bind(billable)
    .execute(pool)
    .await
    .unwrap();
}

async fn months(pool: &PgPool, c: i32) -> (i64, i64, NaiveDate) {
    sqlx::query_as(
        "SELECT last_month_charged_usd_cents, current_month_charged_usd_cents, current_month_start FROM customers WHERE customer_id = $1",
    )
    .bind(c)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Issue 15 item 8, on a fixed clock at a month boundary: an intent of January that
/// confirms after the reset counts for January; a cycle whose clock still says
/// January 31st but reaches a customer already reset to February bills February
/// against February's counter (before: January's month against February's counter).
#[tokio::test]
async fn each_month_is_billed_against_its_own_counter_across_the_boundary() {
    let t = db().await;
    let cfg = BillingConfig::from_config(&common::config(&fast())).unwrap();
    let chain = sim(1_000_000_000);
    customer(&t.pool, 1, 100_000, 20_000, "enterprise").await;
    let jan = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let feb = NaiveDate::from_ymd_opt(2026, 2, 1).unwrap();
    sqlx::query("UPDATE customers SET current_month_start = $1")
        .bind(jan)
        .execute(&t.pool)
        .await
        .unwrap();
    usage_at(&t.pool, 1, "2026-01-31T23:00:00Z", 60_000).await; // $6.00
    let r = run_cycle(&t.pool, &cfg, None, at("2026-01-31T23:58:00Z"))
        .await
        .unwrap();
    assert_eq!(r.intents.len(), 1, "{r:?}");
    let january = r.intents[0]["intent_id"].as_str().unwrap().to_string();
    // Past midnight: a cycle resets the row while January's intent is in flight.
    let r = run_cycle(&t.pool, &cfg, None, at("2026-02-01T00:01:00Z"))
        .await
        .unwrap();
    assert_eq!((r.resets, r.intents.len()), (1, 0), "{r:?}");
    assert_eq!(months(&t.pool, 1).await, (0, 0, feb));
    // January's charge confirms after the reset: last month's, not this month's.
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), &january).await["state"],
        "confirmed"
    );
    assert_eq!(months(&t.pool, 1).await, (600, 0, feb));
    // A late cycle whose clock is still on January 31st reaches the reset row.
    usage_at(&t.pool, 1, "2026-02-01T00:00:00Z", 70_000).await; // $7.00
    let r = run_cycle(&t.pool, &cfg, None, at("2026-01-31T23:59:00Z"))
        .await
        .unwrap();
    assert_eq!((r.resets, r.intents.len()), (0, 1), "{r:?}");
    let (month, amount): (NaiveDate, Decimal) =
        sqlx::query_as("SELECT billing_month, amount FROM charge_intents WHERE state = 'created'")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!((month, amount), (feb, Decimal::new(700, 2)));
    let id = r.intents[0]["intent_id"].as_str().unwrap();
    assert_eq!(
        drive(&t.pool, &cfg, chain.as_ref(), id).await["state"],
        "confirmed"
    );
    assert_eq!(months(&t.pool, 1).await, (600, 700, feb));
    let left = chain
        .token_account(&escrow(1))
        .await
        .unwrap()
        .unwrap()
        .amount;
    assert_eq!(1_000_000_000 - left, 13_000_000, "$13.00 on chain");
}

/// Issue 15 item 8: a month's base fee whose intent the chain refused is owed when
/// the service resumes (oldest month first, one a charge), not forgotten once the
/// month has passed.
#[tokio::test]
async fn a_base_fee_the_chain_refused_is_owed_when_the_service_resumes() {
    let t = db().await;
    let cfg = BillingConfig::from_config(&common::config(&fast())).unwrap();
    customer(&t.pool, 1, 100_000, 20_000, "starter").await; // $20.00 a month
    sqlx::query("UPDATE customers SET current_month_start = '2026-01-01'")
        .execute(&t.pool)
        .await
        .unwrap();
    let r = run_cycle(&t.pool, &cfg, None, at("2026-01-15T12:00:00Z"))
        .await
        .unwrap();
    assert_eq!(r.intents.len(), 1, "{r:?}");
    assert_eq!(r.intents[0]["base_fee_usd"], "20");
    // The escrow holds $1: the chain refuses, the service is suspended for a person.
    let poor = sim(1_000_000);
    let id = r.intents[0]["intent_id"].as_str().unwrap();
    assert_eq!(
        drive(&t.pool, &cfg, poor.as_ref(), id).await["state"],
        "failed"
    );
    assert_eq!(service(&t.pool, 1).await.0, "suspended");
    // February: the operator resumes it after a top-up.
    sqlx::query("UPDATE service_instances SET state = 'active', suspend_reason = NULL, suspend_details = NULL")
        .execute(&t.pool)
        .await
        .unwrap();
    let chain = sim(1_000_000_000);
    let mut fee_months = Vec::new();
    for day in [
        "2026-02-02T00:00:00Z",
        "2026-02-02T00:05:00Z",
        "2026-02-02T00:10:00Z",
    ] {
        let r = run_cycle(&t.pool, &cfg, None, at(day)).await.unwrap();
        for i in &r.intents {
            let id = i["intent_id"].as_str().unwrap();
            assert_eq!(
                drive(&t.pool, &cfg, chain.as_ref(), id).await["state"],
                "confirmed"
            );
            let m: NaiveDate = sqlx::query_scalar(
                "SELECT base_fee_month FROM charge_intents WHERE intent_id = $1::uuid",
            )
            .bind(id)
            .fetch_one(&t.pool)
            .await
            .unwrap();
            fee_months.push(m);
        }
    }
    assert_eq!(
        fee_months,
        [
            NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            NaiveDate::from_ymd_opt(2026, 2, 1).unwrap()
        ],
        "January's refused fee, then February's, each once"
    );
    let left = chain
        .token_account(&escrow(1))
        .await
        .unwrap()
        .unwrap()
        .amount;
    assert_eq!(1_000_000_000 - left, 40_000_000, "$40.00 on chain");
}
