//! Who may do what: bearer tokens (stored as SHA-256 hashes, each with its queues and a
//! token bucket) and webhook signatures (HMAC-SHA256, constant-time comparison).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, header};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::config::{HookConfig, TokenConfig};

/// Hex SHA-256 of a token, as configured in `ingress.tokens[].sha256`.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

struct Token {
    name: String,
    all_queues: bool,
    queues: Vec<String>,
    revoked: bool,
    limiter: DefaultDirectRateLimiter,
}

pub(super) struct Tokens(HashMap<String, Token>);

impl Tokens {
    pub(super) fn from_config(cfg: &[TokenConfig]) -> Self {
        let map = cfg
            .iter()
            .map(|t| {
                let rate = NonZeroU32::new(t.rate_per_second).expect("validated: positive");
                let burst = NonZeroU32::new(t.burst).expect("validated: positive");
                (
                    t.sha256.to_ascii_lowercase(),
                    Token {
                        name: t.name.clone(),
                        all_queues: t.queues.iter().any(|q| q == "*"),
                        queues: t.queues.clone(),
                        revoked: t.revoked,
                        limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                    },
                )
            })
            .collect();
        Tokens(map)
    }

    /// Checks the bearer token, its right to `queue`, and its rate limit. Returns the
    /// token's name (for logs; the token itself is never logged).
    pub(super) fn authorize(&self, headers: &HeaderMap, queue: &str) -> Result<&str, ApiError> {
        let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing_token",
                "an Authorization: Bearer token is required",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    "invalid_token",
                    "the Authorization header is not a Bearer token",
                )
            })?;
        // Looked up by hash: the map never holds a token, and the lookup's timing
        // depends only on the hash.
        let Some(t) = self.0.get(&hash_token(presented)) else {
            return Err(unauthorized("invalid_token", "the token is not valid"));
        };
        if t.revoked {
            return Err(unauthorized("token_revoked", "the token has been revoked"));
        }
        if !t.all_queues && !t.queues.iter().any(|q| q == queue) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "queue_forbidden",
                format!("this token may not use queue {queue:?}"),
            ));
        }
        if let Err(not_until) = t.limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this token; retry later",
            )
            .retry_after(wait.as_secs_f64().ceil() as u64));
        }
        Ok(&t.name)
    }
}

/// Verifies a webhook delivery: the HMAC-SHA256 of the raw body (or of
/// `"{timestamp}.{body}"` when the source has a timestamp header) against the hex
/// signature header, in constant time, and the timestamp's freshness.
pub(super) fn verify_hook(
    hook: &HookConfig,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let unauthorized = |code, msg: String| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
    let sig_hex = headers
        .get(hook.signature_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_start_matches("sha256="))
        .ok_or_else(|| {
            unauthorized(
                "missing_signature",
                format!("header {} is required", hook.signature_header),
            )
        })?;
    let sig = hex::decode(sig_hex)
        .map_err(|_| unauthorized("invalid_signature", "the signature is not hex".into()))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(hook.secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    if let Some(ts_header) = &hook.timestamp_header {
        let ts = headers
            .get(ts_header.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                unauthorized(
                    "missing_timestamp",
                    format!("header {ts_header} must be a Unix timestamp"),
                )
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs() as i64;
        // checked: a timestamp near i64::MIN must be stale, not an overflow.
        if now
            .checked_sub(ts)
            .is_none_or(|d| d.unsigned_abs() > hook.tolerance.as_secs())
        {
            return Err(unauthorized(
                "stale_timestamp",
                format!(
                    "the timestamp is more than {}s from now",
                    hook.tolerance.as_secs()
                ),
            ));
        }
        mac.update(ts.to_string().as_bytes());
        mac.update(b".");
    }
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).map_err(|_| {
        unauthorized(
            "invalid_signature",
            "the signature does not match the body".into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn hook(ts: bool) -> HookConfig {
        HookConfig {
            secret: "s3cret-s3cret-s3cret".to_string().into(),
            queue: "probe".into(),
            signature_header: "x-sig".into(),
            timestamp_header: ts.then(|| "x-ts".into()),
            delivery_header: None,
            tolerance: Duration::from_secs(300),
        }
    }

    fn sign(msg: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(b"s3cret-s3cret-s3cret").unwrap();
        m.update(msg);
        hex::encode(m.finalize().into_bytes())
    }

    #[test]
    fn signature_over_the_raw_body() {
        let body = br#"{"a": 1}"#;
        let mut h = HeaderMap::new();
        h.insert("x-sig", HeaderValue::from_str(&sign(body)).unwrap());
        assert!(verify_hook(&hook(false), &h, body).is_ok());
        // Same JSON, re-serialised: a different body, a different signature.
        assert_eq!(
            verify_hook(&hook(false), &h, br#"{"a":1}"#)
                .unwrap_err()
                .code,
            "invalid_signature"
        );
        h.insert(
            "x-sig",
            HeaderValue::from_str(&format!("sha256={}", sign(body))).unwrap(),
        );
        assert!(verify_hook(&hook(false), &h, body).is_ok());
        assert_eq!(
            verify_hook(&hook(false), &HeaderMap::new(), body)
                .unwrap_err()
                .code,
            "missing_signature"
        );
        h.insert("x-sig", HeaderValue::from_static("zz"));
        assert_eq!(
            verify_hook(&hook(false), &h, body).unwrap_err().code,
            "invalid_signature"
        );
    }

    #[test]
    fn timestamps_are_signed_and_fresh() {
        let body = b"{}";
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = HeaderMap::new();
        h.insert("x-ts", HeaderValue::from(now));
        h.insert(
            "x-sig",
            HeaderValue::from_str(&sign(format!("{now}.{{}}").as_bytes())).unwrap(),
        );
        assert!(verify_hook(&hook(true), &h, body).is_ok());
        let old = now - 301;
        h.insert("x-ts", HeaderValue::from(old));
        h.insert(
            "x-sig",
            HeaderValue::from_str(&sign(format!("{old}.{{}}").as_bytes())).unwrap(),
        );
        assert_eq!(
            verify_hook(&hook(true), &h, body).unwrap_err().code,
            "stale_timestamp"
        );
        // A fresh timestamp on an old signature does not verify.
        h.insert("x-ts", HeaderValue::from(now));
        assert_eq!(
            verify_hook(&hook(true), &h, body).unwrap_err().code,
            "invalid_signature"
        );
    }

    #[test]
    fn tokens_are_hashed_scoped_revocable_and_limited() {
        let cfg = vec![
            TokenConfig {
                name: "a".into(),
                sha256: hash_token("tok-a"),
                queues: vec!["probe".into()],
                rate_per_second: 1,
                burst: 2,
                revoked: false,
            },
            TokenConfig {
                name: "r".into(),
                sha256: hash_token("tok-r"),
                queues: vec!["*".into()],
                rate_per_second: 1,
                burst: 1,
                revoked: true,
            },
        ];
        let tokens = Tokens::from_config(&cfg);
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
            h
        };
        assert_eq!(
            tokens
                .authorize(&HeaderMap::new(), "probe")
                .unwrap_err()
                .code,
            "missing_token"
        );
        assert_eq!(
            tokens.authorize(&bearer("nope"), "probe").unwrap_err().code,
            "invalid_token"
        );
        assert_eq!(
            tokens
                .authorize(&bearer("tok-r"), "probe")
                .unwrap_err()
                .code,
            "token_revoked"
        );
        assert_eq!(
            tokens
                .authorize(&bearer("tok-a"), "other")
                .unwrap_err()
                .code,
            "queue_forbidden"
        );
        assert_eq!(tokens.authorize(&bearer("tok-a"), "probe").unwrap(), "a");
        assert!(tokens.authorize(&bearer("tok-a"), "probe").is_ok());
        let e = tokens.authorize(&bearer("tok-a"), "probe").unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), ("rate_limited", 429));
        assert!(e.retry_after.unwrap() >= 1);
    }
}
