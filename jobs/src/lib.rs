//! # longshore-jobs: every job kind
//!
//! One file per kind: an args type with a stable `KIND` (its queue name) and a handler.
//! [`registry`] lists every kind once; the binary hands it to the runtime.
//! Pipelines get a folder each (`market/`, `billing/`, `chat/`), outside services
//! `clients/`.

pub mod probe;

use longshore_workers::Registry;

/// Every job kind this build knows.
pub fn registry() -> Registry {
    Registry::new()
        .register(probe::ProbeHandler)
        .register(longshore_workers::maintenance::MaintenanceHandler)
}
