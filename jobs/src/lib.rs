//! # longshore-jobs: every job kind
//!
//! One file per kind: an args type with a stable `KIND` (its queue name) and a handler.
//! [`registry`] lists every kind once; the binary hands it to the runtime.
//! Pipelines get a folder each (`market/`, `billing/`, `chat/`), outside services
//! `clients/`.

pub mod billing;
pub mod probe;

use longshore_workers::Registry;

/// Every job kind this build knows.
pub fn registry() -> Registry {
    Registry::new()
        .register(probe::ProbeHandler)
        .register(billing::ingest_logs::IngestLogsHandler)
        .register(billing::scan_log_spool::ScanLogSpoolHandler)
        .register(billing::aggregate_usage::AggregateUsageHandler)
        .register(billing::vault::RegenerateVaultHandler)
        .register(billing::prune_raw_logs::PruneRawLogsHandler)
        .register(longshore_workers::maintenance::MaintenanceHandler)
}
