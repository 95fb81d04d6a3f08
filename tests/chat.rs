//! Chat credits against a real PostgreSQL: the exactly-once charge under concurrency
//! (row 21 of RELIABILITY.md), retries of the same request, and the operator CLI.

mod common;

use std::time::Duration;

use common::{config, count, db, run_cli};
use longshore_jobs::chat::credits::{Charge, CreditsConfig, balance, charge, grant};
use serde_json::json;
use uuid::Uuid;

fn credits() -> CreditsConfig {
    CreditsConfig::from_config(&config(&[])).unwrap()
}

/// One charge in its own committed transaction.
async fn committed_charge(
    pool: &sqlx::PgPool,
    cfg: &CreditsConfig,
    user: Uuid,
    request: Uuid,
    credits: i64,
    provider: &str,
) -> Charge {
    let mut tx = pool.begin().await.unwrap();
    let units = json!({"input_tokens": 1, "output_tokens": 1});
    let r = charge(&mut tx, cfg, user, request, credits, provider, units)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

#[tokio::test]
async fn row21_a_thousand_concurrent_charges_against_a_balance_for_a_hundred() {
    let t = db().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(40)
        .acquire_timeout(Duration::from_secs(120))
        .connect(&t.url)
        .await
        .unwrap();
    let cfg = credits();
    assert_eq!(cfg.signup_bonus, 100);
    let user = Uuid::new_v4();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (pool, cfg) = (pool.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            committed_charge(&pool, &cfg, user, Uuid::new_v4(), 1, "grok").await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Charge::Charged { .. } => ok += 1,
            Charge::Insufficient {
                balance: 0,
                credits: 1,
            } => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, refused), (100, 900));
    let mut c = pool.acquire().await.unwrap();
    assert_eq!(balance(&mut c, user).await.unwrap(), 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM credits_ledger WHERE reason = 'charge'"
        )
        .await,
        100
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM credits_ledger WHERE reason = 'signup_bonus'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_request_is_charged_once_however_often_it_is_retried_or_raced() {
    let t = db().await;
    let cfg = credits();
    let (user, req) = (Uuid::new_v4(), Uuid::new_v4());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (pool, cfg) = (t.pool.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            committed_charge(&pool, &cfg, user, req, 27, "gpt").await
        }));
    }
    let mut charged = 0;
    for t in tasks {
        match t.await.unwrap() {
            Charge::Charged {
                credits: 27,
                balance: 73,
            } => charged += 1,
            Charge::AlreadyCharged { credits: 27 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(charged, 1);
    let mut c = t.pool.acquire().await.unwrap();
    assert_eq!(balance(&mut c, user).await.unwrap(), 73);
    // A charge rolled back with its transaction leaves nothing behind.
    let other = Uuid::new_v4();
    let mut tx = t.pool.begin().await.unwrap();
    assert!(matches!(
        charge(&mut tx, &cfg, user, other, 5, "grok", json!({}))
            .await
            .unwrap(),
        Charge::Charged { .. }
    ));
    tx.rollback().await.unwrap();
    assert_eq!(balance(&mut c, user).await.unwrap(), 73);
    // Grants add; the ledger refuses a charge row without a request or with a positive delta.
    let mut tx = t.pool.begin().await.unwrap();
    assert_eq!(grant(&mut tx, &cfg, user, 50).await.unwrap(), 123);
    tx.commit().await.unwrap();
    let bad = sqlx::query(
        "INSERT INTO credits_ledger (user_id, delta, reason) VALUES ($1, -5, 'charge')",
    )
    .bind(user)
    .execute(&t.pool)
    .await;
    assert!(bad.is_err());
}

#[tokio::test]
async fn operators_grant_and_read_balances_from_the_cli() {
    let t = db().await;
    let url = t.url.clone();
    let user = Uuid::new_v4().to_string();
    let u = user.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run_cli(&url, &["credits", "grant", &u, "250"], &[]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("granted 250 credits to {user}; balance 350"),
        "the signup bonus and the grant"
    );
    let url = t.url.clone();
    let u = user.clone();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        run_cli(&url, &["credits", "balance", &u, "--json"], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v, json!({"user_id": user, "balance": 350}));
    // Bad input: a clear message and exit 2, nothing written.
    let url = t.url.clone();
    let u = user.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || run_cli(&url, &["credits", "grant", &u, "-5"], &[]))
            .await
            .unwrap();
    assert_eq!(code, 2, "{err}");
    let url = t.url.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(&url, &["credits", "balance", "not-a-user"], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("is not a uuid"), "{err}");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM credits_ledger").await,
        2
    );
}
