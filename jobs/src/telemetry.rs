//! The name of every metric the pipelines export, in one place (the runtime's are in
//! `longshore_workers::telemetry`). docs/operations.md lists them with their labels.

/// Escrow balances that could not be read (the bill waits).
pub const BILLING_BALANCE_UNREAD: &str = "longshore_billing_balance_unread_total";
/// Escrow charges by `outcome` (`confirmed`, `failed`).
pub const BILLING_CHARGES: &str = "longshore_billing_charges_total";
/// Charge intents written.
pub const BILLING_INTENTS: &str = "longshore_billing_intents_total";
/// Services suspended, by `reason`.
pub const BILLING_SUSPENSIONS: &str = "longshore_billing_suspensions_total";
/// The fee payer's balance, in lamports.
pub const CHAIN_DELEGATE_LAMPORTS: &str = "longshore_chain_delegate_lamports";
/// Memo searches that could not cover the whole window.
pub const CHAIN_MEMO_SEARCH_INCOMPLETE: &str = "longshore_chain_memo_search_incomplete_total";
/// LLM provider attempts, by `provider` and `status`.
pub const LLM_ATTEMPTS: &str = "longshore_llm_attempts_total";
/// Duration of one LLM provider attempt.
pub const LLM_ATTEMPT_SECONDS: &str = "longshore_llm_attempt_seconds";
/// Chat credits charged, by `provider`.
pub const LLM_CREDITS_CHARGED: &str = "longshore_llm_credits_charged_total";
/// HAProxy log lines seen before (dropped).
pub const LOG_LINES_DUPLICATE: &str = "longshore_log_lines_duplicate_total";
/// HAProxy log lines stored.
pub const LOG_LINES_INGESTED: &str = "longshore_log_lines_ingested_total";
/// HAProxy log lines that did not parse.
pub const LOG_LINES_MALFORMED: &str = "longshore_log_lines_malformed_total";
/// Failed writes of the HAProxy vault file.
pub const VAULT_WRITE_ERRORS: &str = "longshore_vault_write_errors_total";

#[cfg(test)]
mod tests {
    #[test]
    fn every_series_is_documented() {
        let doc = include_str!("../../docs/operations.md");
        for name in [
            super::BILLING_BALANCE_UNREAD,
            super::BILLING_CHARGES,
            super::BILLING_INTENTS,
            super::BILLING_SUSPENSIONS,
            super::CHAIN_DELEGATE_LAMPORTS,
            super::CHAIN_MEMO_SEARCH_INCOMPLETE,
            super::LLM_ATTEMPTS,
            super::LLM_ATTEMPT_SECONDS,
            super::LLM_CREDITS_CHARGED,
            super::LOG_LINES_DUPLICATE,
            super::LOG_LINES_INGESTED,
            super::LOG_LINES_MALFORMED,
            super::VAULT_WRITE_ERRORS,
        ] {
            assert!(
                doc.contains(&format!("`{name}")),
                "{name} is not in docs/operations.md"
            );
        }
    }
}
