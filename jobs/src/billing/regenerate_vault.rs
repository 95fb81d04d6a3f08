//! `regenerate_vault {path}`: the MA_VAULT CSV that HAProxy reads.
//!
//! Header `customer_id,encrypted_key,rate_limit,tier,service_type`; one row per active
//! API key of an enabled, active (not suspended) service, sorted by customer then key.
//! `encrypted_key` = base64(nonce ‖ AES-256-GCM ciphertext ‖ tag) of the key id, with
//! a fresh random 96-bit nonce per row and AAD = the customer id, so a ciphertext moved
//! to another customer's row does not decrypt.
//!
//! The file is replaced atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory): a reader sees the whole old file or the whole new one. One
//! writer at a time (an advisory lock in the job's transaction); stale temp files are
//! removed before writing; the write is skipped when the plaintext content is unchanged
//! (its hash is kept in `vault_versions`). Every field passes a strict allowlist; a row
//! that does not is left out and reported (by customer, never by key).
//!
//! The vault key (32 bytes, base64) comes from `billing.vault_key` or
//! `LONGSHORE_VAULT_KEY`, a secret that is never logged. Rate limits per tier come from
//! `billing.rate_limits`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, enqueue_on,
};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

use super::config::{BillingConfig, Tiers};

pub const HEADER: &str = "customer_id,encrypted_key,rate_limit,tier,service_type";
pub const KEY_ENV: &str = "LONGSHORE_VAULT_KEY";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{KEY_ENV} is not set")]
    NoKey,
    #[error("{KEY_ENV} must be 32 bytes, base64-encoded")]
    BadKey,
    #[error("encrypted_key does not decrypt for this customer")]
    Decrypt,
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// The vault key. `Debug` prints nothing of it.
pub struct VaultKey(SecretBox<[u8; 32]>);

impl VaultKey {
    pub fn from_base64(s: &str) -> Result<Self, VaultError> {
        let bytes = B64.decode(s.trim()).map_err(|_| VaultError::BadKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| VaultError::BadKey)?;
        Ok(VaultKey(SecretBox::new(Box::new(arr))))
    }

    pub fn from_env() -> Result<Self, VaultError> {
        Self::from_base64(&std::env::var(KEY_ENV).map_err(|_| VaultError::NoKey)?)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.expose_secret().into())
    }

    /// base64(nonce ‖ ciphertext ‖ tag) of `plaintext`, bound to `customer_id`.
    pub fn encrypt(&self, customer_id: i32, plaintext: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = customer_id.to_string();
        let ct = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    pub fn decrypt(&self, customer_id: i32, encrypted: &str) -> Result<String, VaultError> {
        let raw = B64.decode(encrypted).map_err(|_| VaultError::Decrypt)?;
        if raw.len() < 12 + 16 {
            return Err(VaultError::Decrypt);
        }
        let (nonce, ct) = raw.split_at(12);
        let aad = customer_id.to_string();
        let pt = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        String::from_utf8(pt).map_err(|_| VaultError::Decrypt)
    }
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey([REDACTED])")
    }
}

/// The strict allowlist: every field that reaches the CSV. Returns the reason a row
/// is refused (no commas, quotes, newlines, NUL, `#`, leading `= + - @`, bounded size).
pub fn check_fields(api_key_id: &str, tier: &str, service_type: &str) -> Result<(), &'static str> {
    let key_ok = (1..=100).contains(&api_key_id.len())
        && api_key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && !api_key_id.starts_with(['=', '+', '-', '@']);
    if !key_ok {
        return Err("api_key_id outside the allowlist");
    }
    if !matches!(tier, "starter" | "pro" | "enterprise") {
        return Err("unknown tier");
    }
    let svc_ok = (1..=20).contains(&service_type.len())
        && service_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !svc_ok {
        return Err("service_type outside the allowlist");
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegenerateVault {
    /// The vault file HAProxy reads.
    pub path: String,
}

impl JobArgs for RegenerateVault {
    const KIND: &'static str = "regenerate_vault";
}

/// Asks for a regeneration soon, coalescing a burst of changes into one write: every
/// request within `window` returns the same pending job. Call it in the transaction
/// that changes keys, tiers or suspensions.
pub async fn request_regeneration(
    conn: &mut PgConnection,
    path: &str,
    window: std::time::Duration,
) -> Result<i64, longshore_workers::EnqueueError> {
    let opts = EnqueueOptions::default()
        .delay(window)
        .key(format!("vault:{path}"))
        .ttl(window);
    Ok(
        enqueue_on(conn, &RegenerateVault { path: path.into() }, opts)
            .await?
            .id,
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaultReport {
    pub path: String,
    pub rows: usize,
    /// False when the content was unchanged and nothing was written.
    pub written: bool,
    pub sha256: String,
    /// Rows left out: `{customer_id, reason}` (never the key).
    pub rejected: Vec<serde_json::Value>,
    pub stale_temps_removed: usize,
}

pub struct RegenerateVaultHandler(pub Arc<BillingConfig>);

impl Handler for RegenerateVaultHandler {
    type Args = RegenerateVault;

    fn check(&self, a: &RegenerateVault) -> Result<(), String> {
        self.0.vault_dirs.check(&a.path).map(|_| ())
    }

    async fn handle(&self, a: RegenerateVault, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let key = self.0.vault_key().map_err(JobError::fail)?;
        let limits = &self.0.rate_limits;
        let path = self.0.vault_dirs.check(&a.path).map_err(JobError::fail)?;
        match regenerate_mode(ctx.tx().await?, &path, &key, limits, self.0.vault_mode).await {
            Ok(r) => Outcome::done_with(r),
            Err(VaultError::Db(e)) => Err(e.into()),
            Err(e) => {
                metrics::counter!(crate::telemetry::VAULT_WRITE_ERRORS).increment(1);
                tracing::error!(error = %e, "vault not written; the old file stands");
                Err(JobError::retry(e))
            }
        }
    }
}

/// Regenerates the vault at `path` from the database, in the caller's transaction.
pub async fn regenerate(
    tx: &mut PgConnection,
    path: &Path,
    key: &VaultKey,
    limits: &Tiers<u32>,
) -> Result<VaultReport, VaultError> {
    regenerate_mode(tx, path, key, limits, DEFAULT_MODE).await
}

/// The vault file's permissions unless `billing.vault_mode` says otherwise: the owner's
/// alone (it holds every API key, if encrypted). HAProxy usually reads it as a group:
/// `vault_mode = "0640"` with the file's directory owned by that group.
pub const DEFAULT_MODE: u32 = 0o600;

/// [`regenerate`], writing the file with `mode`.
pub async fn regenerate_mode(
    tx: &mut PgConnection,
    path: &Path,
    key: &VaultKey,
    limits: &Tiers<u32>,
    mode: u32,
) -> Result<VaultReport, VaultError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(crate::locks::VAULT)
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(
        r#"SELECT k.customer_id, k.api_key_id::text, s.tier, k.service_type::text
         FROM api_keys k JOIN service_instances s ON s.customer_id = k.customer_id AND s.service_type = k.service_type
         WHERE k.is_active AND k.revoked_at IS NULL AND s.is_enabled AND s.state = 'active'
         ORDER BY k.customer_id, k.api_key_id"#,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut plain = String::from(HEADER);
    plain.push('\n');
    let mut good: Vec<(i32, String, u32, String, String)> = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for r in rows {
        let (cid, kid, tier, svc): (i32, String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        match check_fields(&kid, &tier, &svc) {
            Ok(()) => {
                let rl = limits.get(&tier).expect("checked");
                plain.push_str(&format!("{cid},{kid},{rl},{tier},{svc}\n"));
                good.push((cid, kid, rl, tier, svc));
            }
            Err(reason) => {
                tracing::error!(
                    customer_id = cid,
                    reason,
                    "vault row refused by the allowlist"
                );
                rejected.push(json!({"customer_id": cid, "reason": reason}));
            }
        }
    }
    let sha = hex::encode(Sha256::digest(plain.as_bytes()));
    let path_s = path.to_string_lossy().to_string();
    let stale = remove_stale_temps(path).map_err(|e| io_err(path, e))?;
    let last: Option<String> = sqlx::query_scalar(
        "SELECT sha256 FROM vault_versions WHERE path = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(&path_s)
    .fetch_optional(&mut *tx)
    .await?;
    let mut report = VaultReport {
        path: path_s.clone(),
        rows: good.len(),
        written: false,
        sha256: sha.clone(),
        rejected,
        stale_temps_removed: stale,
    };
    if last.as_deref() == Some(sha.as_str()) && path.exists() {
        return Ok(report);
    }
    let mut csv = String::with_capacity(plain.len() * 2);
    csv.push_str(HEADER);
    csv.push('\n');
    for (cid, kid, rl, tier, svc) in &good {
        csv.push_str(&format!(
            "{cid},{},{rl},{tier},{svc}\n",
            key.encrypt(*cid, kid)
        ));
    }
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic(&p, csv.as_bytes(), mode))
        .await
        .map_err(|e| io_err(path, std::io::Error::other(e)))?
        .map_err(|e| io_err(path, e))?;
    sqlx::query("INSERT INTO vault_versions (path, sha256, rows) VALUES ($1, $2, $3)")
        .bind(&path_s)
        .bind(&sha)
        .bind(good.len() as i32)
        .execute(&mut *tx)
        .await?;
    report.written = true;
    Ok(report)
}

fn io_err(path: &Path, source: std::io::Error) -> VaultError {
    VaultError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn temp_prefix(path: &Path) -> String {
    format!(
        ".{}.tmp.",
        path.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    )
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temp files of an earlier writer that died (we hold the writer lock, so any is stale).
fn remove_stale_temps(path: &Path) -> std::io::Result<usize> {
    let prefix = temp_prefix(path);
    let mut n = 0;
    for e in std::fs::read_dir(dir_of(path))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Write to a temp file beside `path`, fsync, rename over `path`, fsync the directory.
/// On any error the temp file is removed and `path` is untouched.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = dir_of(path);
    let tmp = dir.join(format!(
        "{}{}.{}",
        temp_prefix(path),
        std::process::id(),
        rand::random::<u32>()
    ));
    let r = (|| {
        // Created with its mode (never world-readable for a moment).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> VaultKey {
        VaultKey::from_base64(&B64.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn round_trip_and_aad_binds_the_row() {
        let k = key();
        let c = k.encrypt(42, "sk_live_abc");
        assert_eq!(k.decrypt(42, &c).unwrap(), "sk_live_abc");
        // Row 35: the same ciphertext under another customer's row does not decrypt.
        assert!(matches!(k.decrypt(43, &c), Err(VaultError::Decrypt)));
        let other = VaultKey::from_base64(&B64.encode([8u8; 32])).unwrap();
        assert!(matches!(other.decrypt(42, &c), Err(VaultError::Decrypt)));
        assert!(matches!(k.decrypt(42, "!!"), Err(VaultError::Decrypt)));
    }

    #[test]
    fn row35_nonces_are_unique_over_100k_encryptions() {
        let k = key();
        let mut seen = std::collections::HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let raw = B64.decode(k.encrypt(1, "k")).unwrap();
            assert!(seen.insert(raw[..12].to_vec()), "nonce repeated");
        }
    }

    #[test]
    fn row26_hostile_values_are_refused() {
        assert!(check_fields("key_123-a.b:c", "pro", "seal").is_ok());
        for bad in [
            "a,b",
            "a\"b",
            "a\nb",
            "a#b",
            "=cmd",
            "+1",
            "-x",
            "@x",
            "a\0b",
            &"x".repeat(10_000),
            "",
            "é",
        ] {
            assert!(
                check_fields(bad, "pro", "seal").is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(check_fields("k", "gold", "seal").is_err());
        assert!(check_fields("k", "pro", "Seal").is_err());
        assert!(check_fields("k", "pro", "se,al").is_err());
    }

    #[test]
    fn bad_keys_are_refused_and_never_printed() {
        assert!(matches!(
            VaultKey::from_base64("c2hvcnQ="),
            Err(VaultError::BadKey)
        ));
        assert!(matches!(
            VaultKey::from_base64("not base64!"),
            Err(VaultError::BadKey)
        ));
        assert_eq!(format!("{:?}", key()), "VaultKey([REDACTED])");
    }
}
