//! `longshore credits grant USER AMOUNT` and `longshore credits balance USER`: the chat
//! credits ledger for operators.

use anyhow::anyhow;
use longshore_jobs::chat::credits::{CreditsConfig, balance, grant};

use super::app::{self, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Adds credits to a user (a `grant` ledger row); opens the account, with its
    /// signup bonus, if it is new. Prints the balance after.
    Grant {
        /// The user's id (uuid).
        user: String,
        /// Whole credits, positive.
        amount: i64,
    },
    /// Prints a user's balance (Σ of the ledger).
    Balance {
        user: String,
        #[arg(long)]
        json: bool,
    },
}

fn user_id(s: &str) -> Result<uuid::Uuid, CliError> {
    s.parse()
        .map_err(|_| CliError::usage(anyhow!("user {s:?} is not a uuid")))
}

pub async fn run(args: Args) -> CliResult {
    let cfg = app::config()?;
    let credits = CreditsConfig::from_config(&cfg).map_err(CliError::usage)?;
    match args.action {
        Action::Grant { user, amount } => {
            let user = user_id(&user)?;
            if amount <= 0 || amount > i32::MAX as i64 {
                return Err(CliError::usage(anyhow!(
                    "amount must be a positive whole number of credits (at most {})",
                    i32::MAX
                )));
            }
            let pool = app::pool(&cfg, "longshore-cli").await?;
            let mut tx = pool.begin().await.map_err(anyhow::Error::from)?;
            let after = grant(&mut tx, &credits, user, amount)
                .await
                .map_err(anyhow::Error::from)?;
            tx.commit().await.map_err(anyhow::Error::from)?;
            println!("granted {amount} credits to {user}; balance {after}");
        }
        Action::Balance { user, json } => {
            let user = user_id(&user)?;
            let pool = app::pool(&cfg, "longshore-cli").await?;
            let mut conn = pool.acquire().await.map_err(anyhow::Error::from)?;
            let b = balance(&mut conn, user)
                .await
                .map_err(anyhow::Error::from)?;
            if json {
                println!("{}", serde_json::json!({"user_id": user, "balance": b}));
            } else {
                println!("{b}");
            }
        }
    }
    Ok(())
}
