//! Usage billing (../shared/SPEC-BILLING.md): HAProxy logs → usage records.
//!
//! - [`haproxy`]: the `option httplog` line parser.
//! - [`ingest_logs`]: a log file (or a batch of lines) into `haproxy_logs`, once.
//! - [`scan_log_spool`]: a scheduled tick that enqueues one `ingest_logs` per file.
//! - [`aggregate_usage`]: watermark-based hourly aggregation into `usage_records`.
//! - [`bill_usage`]: prices unbilled usage into charge intents (suspends, resumes).
//! - [`charge_escrow`]: an intent onto the chain exactly once;
//!   [`sweep_charge_intents`] re-drives the stuck ones.
//! - [`reconcile`]: the ledger against the chain (`longshore billing reconcile`).
//! - [`regenerate_vault`]: the API-key vault file HAProxy reads.
//! - [`prune_raw_logs`]: raw-log retention (drops day partitions).

pub mod aggregate_usage;
pub mod bill_usage;
pub mod charge_escrow;
pub mod config;
pub mod haproxy;
pub mod ingest_logs;
pub mod prune_raw_logs;
pub mod reconcile;
pub mod regenerate_vault;
pub mod report;
pub mod scan_log_spool;
pub mod seed;
pub mod sweep_charge_intents;
pub mod traffic;
