//! `longshore billing report [--customer ID] [--month YYYY-MM] [--json]`, `billing seed`,
//! `billing cycle [--customer ID]`, `billing reconcile [--limit N] [--json]`.

use anyhow::anyhow;
use chrono::{Datelike, Utc};
use longshore_jobs::billing::bill_usage::{run_cycle_on, usd};
use longshore_jobs::billing::config::{BillingConfig, ChainBackend};
use longshore_jobs::billing::reconcile::reconcile;
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
    /// Demo customers, services and API keys (what `longshore dev` starts with).
    Seed,
    /// One billing cycle now (as the scheduled `bill_usage` job does), printing what
    /// it did.
    Cycle {
        #[arg(long)]
        customer: Option<i32>,
    },
    /// Compares confirmed charge intents, the ledger (`escrow_transactions`) and the
    /// charge transfers into the treasury on chain; exits 1 on any difference.
    Reconcile {
        /// How many of the treasury's most recent transactions to read.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let (customer, month, json) = match args.action {
        Action::Report {
            customer,
            month,
            json,
        } => (customer, month, json),
        Action::Seed => {
            let pool = app::pool(&cfg, "longshore-cli").await?;
            let new = longshore_jobs::billing::seed::seed_demo(&pool).await?;
            println!("seeded {new} new demo customers (ids 1001-1004, service seal)");
            return Ok(());
        }
        Action::Reconcile { limit, json } => {
            let billing = BillingConfig::from_config(&cfg).map_err(CliError::usage)?;
            if billing.chain.backend == ChainBackend::Simulator {
                return Err(CliError::usage(anyhow!(
                    "billing.chain.backend is \"simulator\": its ledger lives inside the running dev process, so a separate command cannot read it; reconcile needs backend \"rpc\""
                )));
            }
            let Some(chain) = billing.chain.build().map_err(CliError::usage)? else {
                return Err(CliError::usage(anyhow!(
                    "billing.chain.backend is \"none\": there is no chain to reconcile with"
                )));
            };
            let pool = app::pool(&cfg, "longshore-cli").await?;
            // The chain's history is read in pages of RPC calls: a spinner on a terminal.
            let pb = app::progress(None, "reading the chain's charges and the ledger");
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            let r = reconcile(&pool, chain.as_ref(), limit).await;
            pb.finish_and_clear();
            let r = r?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("reconciling with {}", r.chain);
                for (what, t) in [
                    ("confirmed intents", &r.confirmed_intents),
                    ("ledger charges", &r.ledger_charges),
                    ("chain transfers", &r.chain_transfers),
                ] {
                    println!("{what:>18}: {:>6} totalling {}", t.count, usd(t.cents));
                }
                if r.foreign_transfers > 0 {
                    println!(
                        "{:>18}: {:>6} (a charge memo, not signed by the delegate: not charges)",
                        "ignored transfers", r.foreign_transfers
                    );
                }
                for d in &r.differences {
                    println!("DIFFERENCE {}", serde_json::to_string(d)?);
                }
                if r.is_clean() {
                    println!("clean: the ledger matches the chain");
                }
            }
            if !r.is_clean() {
                return Err(anyhow!(
                    "{} difference(s) between the ledger and the chain",
                    r.differences.len()
                )
                .into());
            }
            return Ok(());
        }
        Action::Cycle { customer } => {
            let billing = BillingConfig::from_config(&cfg).map_err(CliError::usage)?;
            let pool = app::pool(&cfg, "longshore-cli").await?;
            // Balances are read from the chain as the job does; the simulator's live
            // inside the dev process, so with it the database's balance is judged.
            let chain = match billing.chain.backend {
                ChainBackend::Simulator => None,
                _ => billing.chain_client(),
            };
            let r = run_cycle_on(&pool, &billing, chain.as_deref(), customer, Utc::now()).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
    };
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
    let cents = usd;
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
