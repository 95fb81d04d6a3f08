//! Every advisory lock key the runtime takes, in one place, so no two uses collide
//! (`7254…` is Longshore's prefix; the pipelines keep theirs in `longshore_jobs::locks`,
//! from `7_254_100` up). A key is either a constant (`pg_advisory_lock(KEY)`) or the
//! seed of `hashtextextended(name, SEED)`, one lock per name in that namespace.

/// Held (session-level) across a whole migration run: concurrent `migrate`s serialise.
pub const MIGRATE: i64 = 7_254_001;
/// Held while a test process builds or checks the shared template database.
pub const TEST_TEMPLATE: i64 = 7_254_002;
/// Seed, per schedule name: one fire of a schedule is decided at a time.
pub const SCHEDULE_FIRE_SEED: i64 = 7_254_003;
/// Seed, per (queue, idempotency key): one enqueue of a key is decided at a time.
pub const IDEMPOTENCY_SEED: i64 = 7_254;
