//! Every advisory lock key the pipelines take, in one place (the runtime's are in
//! `longshore_workers::locks`; these start at `7_254_100`). A key is a constant, the
//! seed of `hashtextextended(name, SEED)`, or a text namespace hashed with its name
//! (`hashtext(NAMESPACE || name)`, 32-bit: kept as they are, since a running fleet and
//! the tests agree on these values).

/// `ingest_logs` holds it shared, `aggregate_usage` exclusively: an aggregation never
/// sees half of an ingest.
pub const INGEST: i64 = 7_254_100;
/// Seed, per partition name: creators of one `log_lines` partition serialise.
pub const LOG_PARTITION_SEED: i64 = 7_254_101;
/// One writer of the HAProxy vault file at a time.
pub const VAULT: i64 = 7_254_110;
/// Namespace, per watcher id: changes to one watcher serialise.
pub const WATCHER_NS: &str = "watcher:";
/// Namespace, per `symbol:timeframe`: "the first watcher" is decided once.
pub const WATCHERS_NS: &str = "watchers:";
/// Namespace, per symbol: one signal evaluator at a time.
pub const SIGNALS_NS: &str = "signals:";

#[cfg(test)]
mod tests {
    #[test]
    fn no_two_constant_keys_collide() {
        use longshore_workers::locks as rt;
        let keys = [
            rt::MIGRATE,
            rt::TEST_TEMPLATE,
            rt::SCHEDULE_FIRE_SEED,
            rt::IDEMPOTENCY_SEED,
            super::INGEST,
            super::LOG_PARTITION_SEED,
            super::VAULT,
        ];
        let distinct: std::collections::BTreeSet<i64> = keys.into_iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        let ns = [super::WATCHER_NS, super::WATCHERS_NS, super::SIGNALS_NS];
        let distinct: std::collections::BTreeSet<&str> = ns.into_iter().collect();
        assert_eq!(distinct.len(), ns.len());
    }
}
