//! The API-key vault file: format round trip, suspensions, skip when unchanged, stale
//! temp files, hostile values, two writers, a reader during 1,000 rewrites, and a full
//! disk (`ulimit -f`). Rows 24-27 and 35 of ../shared/RELIABILITY.md.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::{count, db, eventually};
use longshore_jobs::billing::config::{BillingConfig, Tiers};
use longshore_jobs::billing::regenerate_vault::{
    HEADER, KEY_ENV, RegenerateVault, VaultKey, regenerate,
};
use longshore_workers::testing::{count_done, count_enqueued, enqueued_args};
use longshore_workers::{EnqueueOptions, enqueue};
use sqlx::PgPool;

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn key() -> VaultKey {
    VaultKey::from_base64(KEY_B64).unwrap()
}

fn vault_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("longshore-vault-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Customers `from..=to`, each with an active `seal` service and two keys; the tier
/// cycles starter/pro/enterprise unless one is given.
async fn seed_range(pool: &PgPool, from: i32, to: i32, tier: Option<&str>) {
    for c in from..=to {
        let tier = tier.unwrap_or(["starter", "pro", "enterprise"][(c % 3) as usize]);
        sqlx::query("INSERT INTO customers (customer_id) VALUES ($1)")
            .bind(c)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            r#"INSERT INTO service_instances (instance_id, customer_id, service_type, tier)
             VALUES (gen_random_uuid(), $1, 'seal', $2)"#,
        )
        .bind(c)
        .bind(tier)
        .execute(pool)
        .await
        .unwrap();
        for k in ["a", "b"] {
            sqlx::query("INSERT INTO api_keys (api_key_id, customer_id, service_type) VALUES ($1, $2, 'seal')")
                .bind(format!("sk_{c}_{k}"))
                .bind(c)
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

async fn seed(pool: &PgPool, n: i32) {
    seed_range(pool, 1, n, None).await;
}

fn limits(vars: &[(&str, &str)]) -> Tiers<u32> {
    BillingConfig::from_config(&common::config(vars))
        .unwrap()
        .rate_limits
}

async fn regen(
    pool: &PgPool,
    path: &Path,
) -> longshore_jobs::billing::regenerate_vault::VaultReport {
    let mut tx = pool.begin().await.unwrap();
    let r = regenerate(&mut tx, path, &key(), &limits(&[]))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

/// Parses and decrypts a vault file: (customer, key, rate, tier, service) rows.
fn read_vault(path: &Path) -> Vec<(i32, String, u32, String, String)> {
    use std::os::unix::fs::PermissionsExt;
    // Issue 14: the vault holds every API key; it is the owner's alone by default.
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "vault file mode {mode:o}");
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(HEADER));
    assert!(text.ends_with('\n'), "whole file");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 5, "{l}");
            let c: i32 = f[0].parse().unwrap();
            (
                c,
                key().decrypt(c, f[1]).expect("decrypts with its row's AAD"),
                f[2].parse().unwrap(),
                f[3].into(),
                f[4].into(),
            )
        })
        .collect()
}

#[tokio::test]
async fn format_round_trip_suspension_and_skip_when_unchanged() {
    let t = db().await;
    seed(&t.pool, 3).await;
    let dir = vault_dir("fmt");
    let path = dir.join("ma_vault.csv");
    // A stale temp file from a writer that died (row 24) is removed first.
    std::fs::write(dir.join(".ma_vault.csv.tmp.999.1"), "half a file").unwrap();
    let r = regen(&t.pool, &path).await;
    assert!(r.written);
    assert_eq!((r.rows, r.stale_temps_removed), (6, 1));
    assert!(!dir.join(".ma_vault.csv.tmp.999.1").exists());
    let rows = read_vault(&path);
    assert_eq!(
        rows.iter()
            .map(|r| (r.0, r.1.as_str(), r.2, r.3.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (1, "sk_1_a", 1000, "pro"),
            (1, "sk_1_b", 1000, "pro"),
            (2, "sk_2_a", 10000, "enterprise"),
            (2, "sk_2_b", 10000, "enterprise"),
            (3, "sk_3_a", 100, "starter"),
            (3, "sk_3_b", 100, "starter"),
        ]
    );
    assert!(
        !std::fs::read_to_string(&path).unwrap().contains("sk_"),
        "keys only encrypted"
    );

    // Unchanged: nothing written, no new version.
    assert!(!regen(&t.pool, &path).await.written);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM vault_versions").await,
        1
    );

    // A suspension and a revocation remove keys from the next vault.
    sqlx::query("UPDATE service_instances SET state = 'suspended', suspend_reason = 'insufficient_balance' WHERE customer_id = 2")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE api_keys SET is_active = false, revoked_at = now() WHERE api_key_id = 'sk_1_b'",
    )
    .execute(&t.pool)
    .await
    .unwrap();
    assert!(regen(&t.pool, &path).await.written);
    let keys: Vec<String> = read_vault(&path).into_iter().map(|r| r.1).collect();
    assert_eq!(keys, ["sk_1_a", "sk_3_a", "sk_3_b"]);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM vault_versions").await,
        2
    );

    // Row 35 in the file: a ciphertext moved to another customer's row fails.
    let text = std::fs::read_to_string(&path).unwrap();
    let first = text
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .to_string();
    assert!(key().decrypt(3, &first).is_err());
}

#[tokio::test]
async fn rate_limits_come_from_the_config() {
    let t = db().await;
    seed(&t.pool, 3).await;
    let path = vault_dir("limits").join("ma_vault.csv");
    let lim = limits(&[
        ("LONGSHORE__BILLING__RATE_LIMITS__PRO", "1234"),
        ("LONGSHORE__BILLING__RATE_LIMITS__STARTER", "7"),
    ]);
    let mut tx = t.pool.begin().await.unwrap();
    regenerate(&mut tx, &path, &key(), &lim).await.unwrap();
    tx.commit().await.unwrap();
    let rates: Vec<(i32, u32)> = read_vault(&path).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        rates,
        [(1, 1234), (1, 1234), (2, 10000), (2, 10000), (3, 7), (3, 7)]
    );
    // A zero limit is refused at load, naming the key.
    let err = BillingConfig::from_config(&common::config(&[(
        "LONGSHORE__BILLING__RATE_LIMITS__PRO",
        "0",
    )]))
    .unwrap_err();
    assert!(err.to_string().contains("billing.rate_limits"), "{err}");
}

#[tokio::test]
async fn row26_hostile_key_ids_are_left_out_and_reported_without_the_key() {
    let t = db().await;
    seed(&t.pool, 1).await;
    for hostile in ["=HYPERLINK(\"x\")", "a,b", "a\nb", "#comment", "@cmd"] {
        sqlx::query(
            "INSERT INTO api_keys (api_key_id, customer_id, service_type) VALUES ($1, 1, 'seal')",
        )
        .bind(hostile)
        .execute(&t.pool)
        .await
        .unwrap();
    }
    let dir = vault_dir("hostile");
    let r = regen(&t.pool, &dir.join("v.csv")).await;
    assert_eq!(r.rows, 2);
    assert_eq!(r.rejected.len(), 5);
    let report = serde_json::to_string(&r).unwrap();
    assert!(
        !report.contains("HYPERLINK") && !report.contains("cmd"),
        "{report}"
    );
    assert_eq!(read_vault(&dir.join("v.csv")).len(), 2);
}

/// Row 27: two writers at once; the file is one consistent snapshot.
#[tokio::test]
async fn row27_two_writers_make_one_consistent_snapshot() {
    let t = db().await;
    seed(&t.pool, 20).await;
    let dir = vault_dir("two");
    let path = dir.join("v.csv");
    let (a, b) = tokio::join!(regen(&t.pool, &path), regen(&t.pool, &path));
    assert_eq!(
        [a.written, b.written].iter().filter(|w| **w).count(),
        1,
        "the second saw it unchanged"
    );
    assert_eq!(read_vault(&path).len(), 40);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM vault_versions").await,
        1
    );
    let leftovers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(leftovers, 1, "no temp files left");
}

/// Row 24: a reader polling the file during 1,000 rewrites never sees a partial file.
#[tokio::test]
async fn row24_a_reader_never_sees_a_partial_file_during_1000_rewrites() {
    let t = db().await;
    seed(&t.pool, 30).await;
    let dir = vault_dir("reader");
    let path = dir.join("v.csv");
    regen(&t.pool, &path).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let rows = read_vault(&path);
                assert!(
                    rows.len() == 60 || rows.len() == 59,
                    "partial or mixed file: {} rows",
                    rows.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 0..1000 {
        // Alternate one key on and off so every rewrite changes the content.
        sqlx::query("UPDATE api_keys SET is_active = $1 WHERE api_key_id = 'sk_1_a'")
            .bind(i % 2 == 1)
            .execute(&t.pool)
            .await
            .unwrap();
        assert!(regen(&t.pool, &path).await.written);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 100, "the reader really polled ({reads} reads)");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM vault_versions").await,
        1001
    );
}

/// Row 25: the disk is full (`ulimit -f`): the old file stays whole, the error is
/// logged, the job retries and succeeds once there is room.
#[tokio::test]
async fn row25_a_full_disk_leaves_the_old_file_and_retries() {
    let t = db().await;
    seed(&t.pool, 2).await;
    let dir = vault_dir("full");
    let path = dir.join("v.csv");
    regen(&t.pool, &path).await;
    let before = std::fs::read(&path).unwrap();
    seed_range(&t.pool, 3, 40, Some("pro")).await; // the new vault is several KiB
    enqueue(
        &t.pool,
        &RegenerateVault {
            path: path.to_string_lossy().into(),
        },
        EnqueueOptions::default(),
    )
    .await
    .unwrap();
    // A worker whose files may not exceed 1 KiB. Its stderr is a pipe (not a file, so
    // not subject to the limit), read into `log`.
    let mut w = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -f 1; exec {} worker --queues regenerate_vault",
                env!("CARGO_BIN_EXE_longshore")
            ),
        ])
        .env("DATABASE_URL", &t.url)
        .envs(common::test_env())
        .env(KEY_ENV, KEY_B64)
        .env("LONGSHORE__QUEUES__REGENERATE_VAULT__BACKOFF_BASE", "50ms")
        .env("LONGSHORE__QUEUES__REGENERATE_VAULT__BACKOFF_CAP", "200ms")
        .env("LONGSHORE__QUEUES__REGENERATE_VAULT__LEASE", "1s")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = w.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let l = log.clone();
    eventually(Duration::from_secs(15), "two failed writes logged", || {
        let l = l.clone();
        async move { (l.lock().unwrap().matches("vault not written").count() >= 2).then_some(()) }
    })
    .await;
    assert!(
        w.try_wait().unwrap().is_none(),
        "the worker survived the limit\n{}",
        log.lock().unwrap()
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old file is intact"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temp file left"
    );
    assert!(log.lock().unwrap().contains("File too large"));
    let _ = w.kill();
    let _ = w.wait();
    // With room again, the pending job completes.
    let _w = common::Proc::spawn(
        &t.url,
        &["worker", "--queues", "regenerate_vault"],
        &[(KEY_ENV, KEY_B64)],
    );
    let pool = t.pool.clone();
    eventually(
        Duration::from_secs(30),
        "vault written after the retry",
        || {
            let pool = pool.clone();
            async move {
                // (The seeding's own trigger-made job may run too; the second finds the
                // content unchanged.)
                (count_enqueued(&pool, "regenerate_vault").await == 0
                    && count_done(&pool, "regenerate_vault").await >= 1)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(read_vault(&path).len(), 2 * 40);
}

#[test]
fn the_key_env_var_is_validated() {
    let bad = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
    assert!(VaultKey::from_base64(&bad).is_err());
}

#[tokio::test]
async fn key_tier_and_suspension_changes_ask_for_one_regeneration() {
    let t = db().await;
    seed(&t.pool, 2).await;
    let path = vault_dir("trigger").join("ma_vault.csv");
    // Before any vault was written there is nothing to regenerate.
    assert_eq!(count_enqueued(&t.pool, "regenerate_vault").await, 0);
    regen(&t.pool, &path).await;
    for sql in [
        "INSERT INTO api_keys (api_key_id, customer_id, service_type) VALUES ('sk_new', 1, 'seal')",
        "UPDATE service_instances SET tier = 'pro' WHERE customer_id = 2",
        "UPDATE service_instances SET state = 'suspended', suspend_reason = 'operator' WHERE customer_id = 1",
        "UPDATE api_keys SET is_active = false WHERE api_key_id = 'sk_2_a'",
    ] {
        sqlx::query(sql).execute(&t.pool).await.unwrap();
    }
    // A burst of four changes: one waiting job, for this file.
    let jobs = enqueued_args(&t.pool, "regenerate_vault").await;
    assert_eq!(jobs, [serde_json::json!({"path": path.to_str().unwrap()})]);
    // Changes to columns the vault does not show ask for nothing.
    sqlx::query("SELECT pgmq.purge_queue('regenerate_vault')")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE service_instances SET config = '{\"x\": 1}'")
        .execute(&t.pool)
        .await
        .unwrap();
    assert_eq!(count_enqueued(&t.pool, "regenerate_vault").await, 0);
}
