//! `longshore billing report [--customer ID] [--month YYYY-MM] [--json]`.

use anyhow::anyhow;
use chrono::{Datelike, Utc};
use longshore_jobs::billing::report::{parse_month, report};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Usage, charges, limits and service state per customer and service for a month.
    Report {
        #[arg(long)]
        customer: Option<i32>,
        /// YYYY-MM; default: the current month (UTC).
        #[arg(long)]
        month: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let Action::Report {
        customer,
        month,
        json,
    } = args.action;
    let month = match month {
        Some(m) => parse_month(&m).map_err(|e| CliError::usage(anyhow!(e)))?,
        None => {
            let now = Utc::now().date_naive();
            now.with_day(1).expect("day 1 exists")
        }
    };
    let pool = app::pool(&cfg, "longshore-cli").await?;
    let rows = report(&pool, customer, month).await?;
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("billing report for {}", month.format("%Y-%m"));
    println!(
        "{:>10} {:<12} {:<10} {:<10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "CUSTOMER",
        "SERVICE",
        "TIER",
        "STATE",
        "REQUESTS",
        "BILLABLE",
        "UNBILLED",
        "CHARGED_USD",
        "BALANCE",
        "MONTH",
        "LIMIT"
    );
    let cents = |c: i64| format!("{}.{:02}", c / 100, (c % 100).abs());
    for r in &rows {
        println!(
            "{:>10} {:<12} {:<10} {:<10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
            r.customer_id,
            r.service_type,
            r.tier.as_deref().unwrap_or("-"),
            r.state.as_deref().unwrap_or("-"),
            r.requests,
            r.billable,
            r.unbilled_billable,
            r.charged_usd,
            cents(r.balance_usd_cents),
            cents(r.month_charged_usd_cents),
            cents(r.max_monthly_usd_cents)
        );
        if let Some(reason) = &r.suspend_reason {
            println!("{:>10} suspended: {reason}", "");
        }
    }
    Ok(())
}
