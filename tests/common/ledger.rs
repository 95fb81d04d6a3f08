//! Billing fixtures shared by the charge tests: a customer with an escrow account and
//! a service, and usage as the aggregation writes it.
//! Include with `#[path = "common/ledger.rs"] mod ledger;`.
#![allow(dead_code)]

use sqlx::PgPool;

/// A customer with a `seal` service of `tier` and one API key.
pub async fn customer(
    pool: &PgPool,
    c: i32,
    escrow: &str,
    balance_cents: i64,
    max_cents: i64,
    tier: &str,
) {
    sqlx::query(
        r#"INSERT INTO customers (customer_id, wallet_address, escrow_account, current_balance_usd_cents, max_monthly_usd_cents)
         VALUES ($1, $2, $2, $3, $4)"#,
    )
    .bind(c)
    .bind(escrow)
    .bind(balance_cents)
    .bind(max_cents)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO service_instances (instance_id, customer_id, service_type, tier) VALUES (gen_random_uuid(), $1, 'seal', $2)",
    )
    .bind(c)
    .bind(tier)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO api_keys (api_key_id, customer_id, service_type) VALUES ($1, $2, 'seal')",
    )
    .bind(format!("sk_{c}"))
    .bind(c)
    .execute(pool)
    .await
    .unwrap();
}

/// Adds `billable` requests to customer `c`'s usage in the hour `hours_ago` back, as
/// the aggregation does.
pub async fn usage(pool: &PgPool, c: i32, hours_ago: i32, billable: i64) {
    sqlx::query(
        r#"INSERT INTO usage_records (customer_id, service_type, window_start, window_end, request_count, billable_count, bytes_transferred)
         SELECT $1, 'seal', w, w + interval '1 hour', $3, $3, 0 FROM (SELECT date_trunc('hour', now()) - make_interval(hours => $2) AS w) x
         ON CONFLICT (customer_id, service_type, window_start) DO UPDATE SET
           request_count = usage_records.request_count + excluded.request_count,
           billable_count = usage_records.billable_count + excluded.billable_count"#,
    )
    .bind(c)
    .bind(hours_ago)
    .bind(billable)
    .execute(pool)
    .await
    .unwrap();
}
