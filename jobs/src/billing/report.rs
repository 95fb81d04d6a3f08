//! `longshore billing report`: per customer and service for one month, usage (requests,
//! billable requests, bytes), what was charged and what is not billed yet, with the
//! customer's balance, monthly limit and month-to-date charges, and the service's state.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ReportRow {
    pub customer_id: i32,
    pub service_type: String,
    pub tier: Option<String>,
    pub state: Option<String>,
    pub suspend_reason: Option<String>,
    pub requests: i64,
    pub billable: i64,
    pub bytes: i64,
    pub unbilled_billable: i64,
    /// USD, as stored (`numeric`), rendered as text to keep it exact.
    pub charged_usd: String,
    pub balance_usd_cents: i64,
    pub max_monthly_usd_cents: i64,
    pub month_charged_usd_cents: i64,
}

/// The first day of `YYYY-MM`.
pub fn parse_month(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
        .map_err(|_| format!("month {s:?} is not YYYY-MM"))
}

pub async fn report(
    pool: &PgPool,
    customer: Option<i32>,
    month: NaiveDate,
) -> Result<Vec<ReportRow>, sqlx::Error> {
    let from: DateTime<Utc> = month.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let next = if month.month() == 12 {
        NaiveDate::from_ymd_opt(month.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(month.year(), month.month() + 1, 1)
    }
    .expect("valid month");
    let to: DateTime<Utc> = next.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    sqlx::query_as(
        r#"SELECT c.customer_id, u.service_type::text, s.tier, s.state, s.suspend_reason,
           coalesce(sum(u.request_count), 0)::bigint AS requests,
           coalesce(sum(u.billable_count), 0)::bigint AS billable,
           coalesce(sum(u.bytes_transferred), 0)::bigint AS bytes,
           coalesce(sum(u.billable_count - u.billed_count), 0)::bigint AS unbilled_billable,
           coalesce(sum(u.charged_amount), 0)::text AS charged_usd,
           c.current_balance_usd_cents AS balance_usd_cents, c.max_monthly_usd_cents,
           c.current_month_charged_usd_cents AS month_charged_usd_cents
         FROM customers c
         JOIN usage_records u ON u.customer_id = c.customer_id AND u.window_start >= $2 AND u.window_start < $3
         LEFT JOIN service_instances s ON s.customer_id = c.customer_id AND s.service_type = u.service_type
         WHERE $1::int IS NULL OR c.customer_id = $1
         GROUP BY c.customer_id, u.service_type, s.tier, s.state, s.suspend_reason
         ORDER BY c.customer_id, u.service_type"#,
    )
    .bind(customer)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}
