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

/// A configured token. Who it is (`principal`), what it may enqueue, its rights.
pub(super) struct Token {
    pub name: String,
    /// `token:<name>`: recorded with every job it enqueues, and the namespace of its
    /// idempotency keys.
    pub principal: String,
    all_queues: bool,
    queues: Vec<String>,
    scopes: Vec<String>,
    pub customers: Option<Vec<i64>>,
    revoked: bool,
    limiter: DefaultDirectRateLimiter,
}

impl Token {
    /// May enqueue to `queue` (a public kind: the caller checks that first).
    pub fn may_use(&self, queue: &str) -> bool {
        self.all_queues || self.queues.iter().any(|q| q == queue)
    }

    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// 403 unless it may use `queue`.
    pub fn permit(&self, queue: &str) -> Result<(), ApiError> {
        if self.may_use(queue) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "queue_forbidden",
            format!("this token may not use queue {queue:?}"),
        ))
    }

    /// 403 unless it holds `scope`.
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.has(scope) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "scope_forbidden",
            format!("this token lacks the {scope:?} scope"),
        ))
    }
}

pub(super) struct Tokens(HashMap<String, Token>);

/// A token bucket per client address for requests no token vouches for. An IPv6
/// client is its /64 (one host gets a whole /64, so a /128 key would be free to
/// rotate).
pub(super) struct Anonymous {
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    pruned: std::sync::Mutex<std::time::Instant>,
}

/// The key a client address is counted under.
pub(super) fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

impl Anonymous {
    pub fn new(rate: u32, burst: u32) -> Anonymous {
        let rate = NonZeroU32::new(rate).expect("validated: positive");
        let burst = NonZeroU32::new(burst).expect("validated: positive");
        Anonymous {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            pruned: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// 429 when `peer` is over its budget (no peer: a request from inside the process).
    pub fn check(&self, peer: Option<std::net::IpAddr>) -> Result<(), ApiError> {
        let Some(ip) = peer else { return Ok(()) };
        // Addresses not seen for a while are forgotten, so rotating ones cannot grow
        // this; at most once a second, so a large table is not scanned per request.
        if self.limiter.len() > 10_000
            && let Ok(mut last) = self.pruned.try_lock()
            && last.elapsed() >= Duration::from_secs(1)
        {
            *last = std::time::Instant::now();
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client_key(ip))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many unauthenticated requests from this address; retry later",
                )
                .retry_after(wait.as_secs_f64().ceil() as u64)
            })
    }
}

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
                        principal: format!("token:{}", t.name),
                        all_queues: t.queues.iter().any(|q| q == "*"),
                        queues: t.queues.clone(),
                        scopes: t.scopes.clone(),
                        customers: t.customers.clone(),
                        revoked: t.revoked,
                        limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                    },
                )
            })
            .collect();
        Tokens(map)
    }

    /// The token whose hash is `sha256` (a console session keeps the hash, never the
    /// token), if it is configured and not revoked, within its rate limit.
    pub(super) fn by_hash(&self, sha256: &str) -> Result<&Token, ApiError> {
        let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let Some(t) = self.0.get(sha256) else {
            return Err(unauthorized("invalid_token", "the token is not valid"));
        };
        if t.revoked {
            return Err(unauthorized("token_revoked", "the token has been revoked"));
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
        Ok(t)
    }

    /// Checks the bearer token and its rate limit: who is calling. (What it may do is
    /// checked after, against the route: [`Token::permit`], [`Token::require`].)
    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Result<&Token, ApiError> {
        let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing_token",
                "an Authorization: Bearer token is required",
            ));
        };
        // The scheme is case-insensitive (RFC 7235); one space, then the token.
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized(
                    "invalid_token",
                    "the Authorization header is not a Bearer token",
                )
            })?;
        // Looked up by hash: the map never holds a token, and the lookup's timing
        // depends only on the hash.
        self.by_hash(&hash_token(presented))
    }
}

/// Verifies a webhook delivery: the HMAC-SHA256 of the signed message against the
/// hex signature header, in constant time, and the timestamp's freshness. The message
/// is the raw body, prefixed by `"{timestamp}."` when the source has a timestamp
/// header, and by `"{delivery id}."` when it signs its delivery ids (the Standard
/// Webhooks form `"{id}.{timestamp}.{body}"`). Returns what identifies the delivery,
/// which a replay cannot change: the signed delivery id when it is signed (a sender's
/// retry with a fresh timestamp is the same delivery), else the whole signed message.
pub(super) fn verify_hook(
    hook: &HookConfig,
    headers: &HeaderMap,
    delivery_id: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, ApiError> {
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
    let mut signed = Vec::with_capacity(body.len() + 16);
    let signed_id = match (hook.sign_delivery_id, delivery_id) {
        (true, Some(id)) => {
            signed.extend_from_slice(id.as_bytes());
            signed.push(b'.');
            Some(id)
        }
        (true, None) => {
            return Err(unauthorized(
                "invalid_signature",
                "the delivery id is signed but missing".into(),
            ));
        }
        (false, _) => None,
    };
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
        signed.extend_from_slice(ts.to_string().as_bytes());
        signed.push(b'.');
    }
    signed.extend_from_slice(body);
    mac.update(&signed);
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).map_err(|_| {
        unauthorized(
            "invalid_signature",
            "the signature does not match the body".into(),
        )
    })?;
    Ok(match signed_id {
        Some(id) => format!("id:{id}").into_bytes(),
        None => signed,
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
            allow_replay: !ts,
            delivery_header: None,
            sign_delivery_id: false,
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
        assert!(verify_hook(&hook(false), &h, None, body).is_ok());
        // Same JSON, re-serialised: a different body, a different signature.
        assert_eq!(
            verify_hook(&hook(false), &h, None, br#"{"a":1}"#)
                .unwrap_err()
                .code,
            "invalid_signature"
        );
        h.insert(
            "x-sig",
            HeaderValue::from_str(&format!("sha256={}", sign(body))).unwrap(),
        );
        assert!(verify_hook(&hook(false), &h, None, body).is_ok());
        assert_eq!(
            verify_hook(&hook(false), &HeaderMap::new(), None, body)
                .unwrap_err()
                .code,
            "missing_signature"
        );
        h.insert("x-sig", HeaderValue::from_static("zz"));
        assert_eq!(
            verify_hook(&hook(false), &h, None, body).unwrap_err().code,
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
        assert!(verify_hook(&hook(true), &h, None, body).is_ok());
        let old = now - 301;
        h.insert("x-ts", HeaderValue::from(old));
        h.insert(
            "x-sig",
            HeaderValue::from_str(&sign(format!("{old}.{{}}").as_bytes())).unwrap(),
        );
        assert_eq!(
            verify_hook(&hook(true), &h, None, body).unwrap_err().code,
            "stale_timestamp"
        );
        // A fresh timestamp on an old signature does not verify.
        h.insert("x-ts", HeaderValue::from(now));
        assert_eq!(
            verify_hook(&hook(true), &h, None, body).unwrap_err().code,
            "invalid_signature"
        );
    }

    #[test]
    fn a_signed_delivery_id_identifies_the_delivery_across_retries() {
        let mut hook = hook(true);
        hook.delivery_header = Some("x-id".into());
        hook.sign_delivery_id = true;
        let body = b"{}";
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let at = |ts: u64, id: &str, signed_id: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-ts", HeaderValue::from(ts));
            let msg = format!("{signed_id}.{ts}.{{}}");
            h.insert(
                "x-sig",
                HeaderValue::from_str(&sign(msg.as_bytes())).unwrap(),
            );
            verify_hook(&hook, &h, Some(id), body)
        };
        // The sender's retry: a fresh timestamp, the same id → the same delivery.
        let first = at(now, "msg_1", "msg_1").unwrap();
        assert_eq!(at(now - 5, "msg_1", "msg_1").unwrap(), first);
        assert_ne!(at(now, "msg_2", "msg_2").unwrap(), first);
        // An id that was not signed: refused.
        assert_eq!(
            at(now, "msg_forged", "msg_1").unwrap_err().code,
            "invalid_signature"
        );
        let mut h = HeaderMap::new();
        h.insert("x-ts", HeaderValue::from(now));
        h.insert("x-sig", HeaderValue::from_static("00"));
        assert_eq!(
            verify_hook(&hook, &h, None, body).unwrap_err().code,
            "invalid_signature"
        );
    }

    #[test]
    fn tokens_are_hashed_scoped_revocable_and_limited() {
        let token = |name: &str, tok: &str, queues: &[&str], burst, revoked| TokenConfig {
            name: name.into(),
            sha256: hash_token(tok),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            scopes: vec![],
            customers: None,
            rate_per_second: 1,
            burst,
            revoked,
        };
        let cfg = vec![
            token("a", "tok-a", &["probe"], 2, false),
            token("r", "tok-r", &["*"], 1, true),
        ];
        let tokens = Tokens::from_config(&cfg);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        let code = |h: HeaderMap| tokens.authenticate(&h).err().map(|e| e.code);
        assert_eq!(code(HeaderMap::new()), Some("missing_token"));
        assert_eq!(code(with("Bearer nope")), Some("invalid_token"));
        assert_eq!(code(with("Basic dG9rLWE=")), Some("invalid_token"));
        assert_eq!(code(with("Bearer tok-r")), Some("token_revoked"));
        // The scheme is case-insensitive.
        let a = tokens.authenticate(&with("bearer tok-a")).unwrap();
        assert_eq!((a.name.as_str(), a.principal.as_str()), ("a", "token:a"));
        assert_eq!(a.permit("other").unwrap_err().code, "queue_forbidden");
        assert!(a.permit("probe").is_ok());
        assert_eq!(a.require("logs").unwrap_err().code, "scope_forbidden");
        assert!(tokens.authenticate(&with("BEARER tok-a")).is_ok());
        let Err(e) = tokens.authenticate(&with("Bearer tok-a")) else {
            panic!("the burst of 2 is spent");
        };
        assert_eq!((e.code, e.status.as_u16()), ("rate_limited", 429));
        assert!(e.retry_after.unwrap() >= 1);
    }
}
