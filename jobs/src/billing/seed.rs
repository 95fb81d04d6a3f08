//! Demo data for `longshore dev` and `longshore billing seed`: a few customers, their
//! `seal` services and API keys, and a generator of HAProxy `option httplog` lines for
//! them. Seeding is idempotent (existing rows are left as they are).

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgPool;

/// (customer_id, tier, balance in cents, monthly cap in cents). 1004's balance cannot
/// pay its first base fee, so the dev pipeline shows a suspension too.
pub const DEMO_CUSTOMERS: [(i32, &str, i64, i64); 4] = [
    (1001, "starter", 10_000, 20_000),
    (1002, "pro", 50_000, 100_000),
    (1003, "enterprise", 200_000, 500_000),
    (1004, "starter", 100, 20_000),
];

/// A demo escrow token account: a valid base58 address derived from the id.
pub fn demo_escrow(customer_id: i32) -> String {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&customer_id.to_be_bytes());
    b[31] = 1;
    bs58::encode(b).into_string()
}

/// Inserts the demo customers, services and two keys each; returns how many customers
/// were new.
pub async fn seed_demo(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut new = 0;
    for (id, tier, balance, cap) in DEMO_CUSTOMERS {
        let r = sqlx::query(
            r#"INSERT INTO customers (customer_id, wallet_address, escrow_account,
               current_balance_usd_cents, max_monthly_usd_cents)
             VALUES ($1, $2, $2, $3, $4) ON CONFLICT DO NOTHING"#,
        )
        .bind(id)
        .bind(demo_escrow(id))
        .bind(balance)
        .bind(cap)
        .execute(&mut *tx)
        .await?;
        new += r.rows_affected();
        sqlx::query(
            r#"INSERT INTO service_instances (instance_id, customer_id, service_type, tier, enabled_at)
             VALUES (gen_random_uuid(), $1, 'seal', $2, now()) ON CONFLICT DO NOTHING"#,
        )
        .bind(id)
        .bind(tier)
        .execute(&mut *tx)
        .await?;
        for k in 1..=2 {
            sqlx::query(
                r#"INSERT INTO api_keys (api_key_id, customer_id, service_type)
                 VALUES ($1, $2, 'seal') ON CONFLICT DO NOTHING"#,
            )
            .bind(format!("demo_{id}_{k}"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(new)
}

/// `n` HAProxy lines at `at` for the demo customers: mostly 200s, some 404s and 500s
/// (not billable), and the occasional line HAProxy wrote without captures (reported as
/// malformed by the ingest, as a real one would be).
pub fn demo_lines(n: usize, at: DateTime<Utc>, rng: &mut impl Rng) -> String {
    let mut out = String::with_capacity(n * 220);
    let stamp = at.format("%d/%b/%Y:%H:%M:%S%.3f");
    let syslog = at.format("%b %d %H:%M:%S");
    for _ in 0..n {
        let c = DEMO_CUSTOMERS[rng.random_range(0..DEMO_CUSTOMERS.len())].0;
        let status = match rng.random_range(0..100) {
            0..=84 => 200,
            85..=92 => 404,
            93..=96 => 429,
            _ => 500,
        };
        let bytes = rng.random_range(100..5000);
        let port = rng.random_range(1024..65535);
        let capture = if rng.random_range(0..1000) == 0 {
            String::new()
        } else {
            format!("{c}|seal")
        };
        out.push_str(&format!(
            "{syslog} lb1 haproxy[3098]: 10.0.0.{}:{port} [{stamp}] fe_api~ be_seal/s1 0/0/1/{}/{} {status} {bytes} - - ---- 1/1/0/0/0 0/0 {{{capture}}} {{}} \"POST /v1/seal HTTP/1.1\"\n",
            c % 250,
            rng.random_range(1..40),
            rng.random_range(2..50),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::haproxy::parse_line;
    use rand::SeedableRng;

    /// The dev overlay names 1004's escrow by address: it must be the seeded one.
    #[test]
    fn the_dev_overlay_underfunds_customer_1004s_escrow() {
        let dev = include_str!("../../../config/dev.toml");
        assert!(
            dev.contains(&format!("{} = \"1.00\"", demo_escrow(1004))),
            "config/dev.toml's simulator_escrows must name demo_escrow(1004)"
        );
    }

    #[test]
    fn demo_lines_parse_except_the_uncaptured_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let text = demo_lines(5000, Utc::now(), &mut rng);
        let (mut ok, mut bad) = (0, 0);
        for l in text.lines() {
            match parse_line(l.as_bytes()) {
                Ok(_) => ok += 1,
                Err(_) => bad += 1,
            }
        }
        assert_eq!(ok + bad, 5000);
        assert!(bad < 25, "{bad} malformed");
        assert!(ok > 4900);
        crate::clients::chain::validate_address("escrow", &demo_escrow(1001)).unwrap();
    }
}
