//! The Cryptometer REST client (https://api.cryptometer.io).
//!
//! Wire format: `GET {base}/{endpoint}/?…&api_key=KEY`, answered with the envelope
//! `{"success":"true","error":"false","data":[…]}` (the flags are strings; booleans are
//! accepted too). `"success":"false"` is an error carrying the `error` text.
//!
//! - The key is a query parameter, so it is in every URL: URLs are never logged and
//!   every error is built from the path alone (reqwest's errors are stripped of their
//!   URL).
//! - A client-side rate limit spaces requests (`request_interval`, 1 s by default) per
//!   process.
//! - 429, 5xx, timeouts and connection errors are retried in-process with exponential
//!   backoff (backon, bounded by `max_retries`), honouring `Retry-After` up to
//!   `max_retry_after`; past that, the error is [`SourceError::Transient`] with the
//!   hint, and the job is snoozed for it. A refusal naming a quota or a limit
//!   (`"success":"false"` with `"Rate plan exceeded"`, or a 4xx saying so) is
//!   [`SourceError::Transient`] without in-process retries: the job retries on its
//!   backoff. Anything else is [`SourceError::Rejected`].
//! - Candles may come newest first or oldest first; they are returned oldest first.
//!   A series that is neither (shuffled, duplicated) is refused whole, as are NaN,
//!   negative or zero prices.

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, TimeZone, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use super::market::{Liquidations, MarketSource, SourceError, number};
use crate::market::types::{Candle, Symbol, Timeframe, validate_candles};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptometerConfig {
    /// `https://api.cryptometer.io`; tests point it at a local server.
    pub base_url: String,
    /// The API key (`LONGSHORE__MARKET__CRYPTOMETER__API_KEY`). Never logged.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Spot exchange for `ohlcv/` (`e=`).
    pub exchange: String,
    /// Futures exchange for `ls-ratio/`.
    pub futures_exchange: String,
    /// Smallest gap between two requests of one process.
    #[serde(with = "humantime_serde")]
    pub request_interval: Duration,
    /// Per request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// In-process retries of a retryable failure.
    pub max_retries: usize,
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// A `Retry-After` longer than this is not slept on in-process: the job is snoozed.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

pub struct Cryptometer {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    exchange: String,
    futures_exchange: String,
    limiter: DefaultDirectRateLimiter,
    backoff: ExponentialBuilder,
    max_retry_after: Duration,
}

impl std::fmt::Debug for Cryptometer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cryptometer")
            .field("base", &self.base)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// One failed attempt, before the retry policy decides.
#[derive(Debug)]
struct Attempt {
    error: SourceError,
    retryable: bool,
}

impl Attempt {
    fn retry(message: String, retry_after: Option<Duration>) -> Self {
        Attempt {
            error: SourceError::Transient {
                message,
                retry_after,
            },
            retryable: true,
        }
    }
    fn reject(message: String) -> Self {
        Attempt {
            error: SourceError::Rejected(message),
            retryable: false,
        }
    }
    /// A refusal that names a quota or a limit (`"Rate plan exceeded"`): the request
    /// was right and will be answered once the plan allows, so the job is retried on
    /// its backoff; but not in-process, where a few seconds change nothing.
    fn refused(message: String) -> Self {
        if is_quota(&message) {
            Attempt {
                error: SourceError::Transient {
                    message,
                    retry_after: None,
                },
                retryable: false,
            }
        } else {
            Self::reject(message)
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match &self.error {
            SourceError::Transient { retry_after, .. } => *retry_after,
            SourceError::Rejected(_) => None,
        }
    }
}

impl Cryptometer {
    pub fn new(cfg: &CryptometerConfig) -> Result<Self, String> {
        let key = cfg
            .api_key
            .clone()
            .filter(|k| !k.expose_secret().is_empty())
            .ok_or("api_key is required for source = \"cryptometer\"")?;
        let base = cfg.base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("base_url {base:?} is not an http(s) URL"));
        }
        let interval = cfg.request_interval.max(Duration::from_millis(1));
        let quota = Quota::with_period(interval)
            .ok_or("request_interval must be positive")?
            .allow_burst(NonZeroU32::MIN);
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .user_agent(concat!("longshore/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Cryptometer {
            http,
            base,
            key,
            exchange: cfg.exchange.clone(),
            futures_exchange: cfg.futures_exchange.clone(),
            limiter: RateLimiter::direct(quota),
            backoff: ExponentialBuilder::default()
                .with_min_delay(cfg.retry_min_delay)
                .with_max_delay(cfg.retry_max_delay)
                .with_max_times(cfg.max_retries)
                .with_jitter(),
            max_retry_after: cfg.max_retry_after,
        })
    }

    /// `GET {base}/{endpoint}?params&api_key=…` → the envelope's `data` as a list.
    pub async fn get(
        &self,
        endpoint: &str,
        params: &[(&str, String)],
    ) -> Result<Vec<Value>, SourceError> {
        let once = || async {
            self.limiter.until_ready().await;
            self.attempt(endpoint, params).await
        };
        once.retry(self.backoff)
            .when(|a: &Attempt| a.retryable)
            .adjust(|a: &Attempt, next| match (next, a.retry_after()) {
                (None, _) => None,
                (Some(_), Some(hint)) if hint > self.max_retry_after => None,
                (Some(d), hint) => Some(hint.map_or(d, |h| h.max(d))),
            })
            .notify(|a: &Attempt, after| {
                tracing::warn!(endpoint, error = %a.error, retry_in = ?after, "cryptometer: retrying");
            })
            .await
            .map_err(|a| a.error)
    }

    async fn attempt(
        &self,
        endpoint: &str,
        params: &[(&str, String)],
    ) -> Result<Vec<Value>, Attempt> {
        let url = format!("{}/{}/", self.base, endpoint.trim_matches('/'));
        let mut query: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        query.push(("api_key", self.key.expose_secret()));
        let what = format!("cryptometer {endpoint}/");
        let resp = self
            .http
            .get(&url)
            .query(&query)
            .send()
            .await
            .map_err(|e| Attempt::retry(format!("{what}: {}", e.without_url()), None))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.map_err(|e| {
            Attempt::retry(
                format!("{what}: reading the body: {}", e.without_url()),
                None,
            )
        })?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Attempt::retry(
                format!("{what}: 429 rate limited"),
                retry_after,
            ));
        }
        if status.is_server_error() {
            return Err(Attempt::retry(
                format!("{what}: HTTP {status}"),
                retry_after,
            ));
        }
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let msg = json
                .as_ref()
                .and_then(|j| j.get("error").or_else(|| j.get("message")))
                .and_then(Value::as_str)
                .map(|m| format!(": {}", m.chars().take(200).collect::<String>()))
                .unwrap_or_default();
            return Err(Attempt::refused(format!("{what}: HTTP {status}{msg}")));
        }
        let json =
            json.ok_or_else(|| Attempt::reject(format!("{what}: malformed JSON in the response")))?;
        envelope(&json).map_err(|m| Attempt::refused(format!("{what}: {m}")))
    }
}

/// Whether a refusal's text names a quota or a rate limit rather than a bad request.
fn is_quota(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "rate plan",
        "rate limit",
        "quota",
        "limit exceeded",
        "limit reached",
        "too many requests",
        "credits",
    ]
    .iter()
    .any(|p| m.contains(p))
}

fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The `data` of a `{"success","error","data"}` envelope.
fn envelope(json: &Value) -> Result<Vec<Value>, String> {
    match flag(json.get("success")) {
        Some(true) => {}
        Some(false) => {
            let msg = match json.get("error") {
                Some(Value::String(s)) if s != "true" && s != "false" => s.clone(),
                _ => json
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("no message")
                    .to_string(),
            };
            return Err(format!(
                "success is false: {}",
                msg.chars().take(200).collect::<String>()
            ));
        }
        None => return Err("malformed response: no success flag".into()),
    }
    match json.get("data") {
        Some(Value::Array(a)) => Ok(a.clone()),
        Some(Value::Object(_)) => Ok(vec![json["data"].clone()]),
        _ => Err("malformed response: data is not a list".into()),
    }
}

fn time_of(v: &Value) -> Option<DateTime<Utc>> {
    if let Some(s) = v.as_str()
        && let Ok(t) = s.parse::<DateTime<Utc>>()
    {
        return Some(t);
    }
    let n = number(v)?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    // Milliseconds or seconds since the epoch (a second count above 1e11 would be
    // the year 5138).
    let ms = if n > 1e11 { n } else { n * 1000.0 };
    Utc.timestamp_millis_opt(ms as i64).single()
}

/// Candles from `ohlcv/` data: each item's time (`timestamp`, `time`, `open_time` or
/// `date`; epoch seconds or milliseconds, or RFC 3339), open, high, low, close and
/// volume (numbers or numeric strings). Returned oldest first and validated.
pub fn parse_candles(data: &[Value], tf: Timeframe) -> Result<Vec<Candle>, SourceError> {
    let mut out = Vec::with_capacity(data.len());
    for (i, item) in data.iter().enumerate() {
        let field = |name: &str| -> Result<f64, SourceError> {
            // A missing field is malformed; a present one is checked by validation
            // (NaN, negative).
            match item.get(name) {
                Some(Value::String(s)) if s.eq_ignore_ascii_case("nan") => Ok(f64::NAN),
                Some(v) => number(v).ok_or_else(|| {
                    SourceError::rejected(format!("ohlcv: candle {i}: {name} is not a number"))
                }),
                None => Err(SourceError::rejected(format!(
                    "ohlcv: candle {i}: no {name}"
                ))),
            }
        };
        let open_time = ["timestamp", "time", "open_time", "date"]
            .iter()
            .find_map(|k| item.get(*k))
            .and_then(time_of)
            .ok_or_else(|| {
                SourceError::rejected(format!("ohlcv: candle {i}: no valid timestamp"))
            })?;
        out.push(Candle {
            open_time,
            open: field("open")?,
            high: field("high")?,
            low: field("low")?,
            close: field("close")?,
            volume: field("volume")?,
        });
    }
    if out.len() > 1 && out[0].open_time > out[out.len() - 1].open_time {
        out.reverse();
    }
    validate_candles(&out, tf).map_err(|e| SourceError::rejected(format!("ohlcv: {e}")))?;
    Ok(out)
}

/// The newest L/S ratio in `ls-ratio/` data: longs over shorts (above 1: more accounts
/// long). The newest item is the one with the latest time (`timestamp`, `time`,
/// `date`) whichever order the list comes in; a list without times is read oldest
/// first, as Cryptometer sends it. Fields: a ratio (`ratio`, `ls_ratio`,
/// `long_short_ratio`, Binance's `longShortRatio`), else longs over shorts as counts or
/// shares (`longs`/`shorts`, `long_ratio`/`short_ratio`, `long_pct`/`short_pct`,
/// Binance's `longAccount`/`shortAccount`).
pub fn parse_ls_ratio(data: &[Value]) -> Result<Option<f64>, SourceError> {
    let timed = |v: &Value| {
        ["timestamp", "time", "date"]
            .iter()
            .find_map(|k| v.get(*k))
            .and_then(time_of)
    };
    let item = if data.iter().all(|v| timed(v).is_some()) {
        data.iter().max_by_key(|v| timed(v))
    } else {
        data.last()
    };
    let Some(item) = item else {
        return Ok(None);
    };
    let direct = ["ratio", "ls_ratio", "long_short_ratio", "longShortRatio"]
        .iter()
        .find_map(|k| item.get(*k).and_then(number));
    let r = direct.or_else(|| {
        [
            ("longs", "shorts"),
            ("long_ratio", "short_ratio"),
            ("long_pct", "short_pct"),
            ("longAccount", "shortAccount"),
        ]
        .iter()
        .find_map(|(l, s)| {
            let (l, s) = (
                item.get(*l).and_then(number)?,
                item.get(*s).and_then(number)?,
            );
            (s > 0.0).then(|| l / s)
        })
    });
    match r {
        Some(r) if r.is_finite() && r >= 0.0 => Ok(Some(r)),
        Some(r) => Err(SourceError::rejected(format!(
            "ls-ratio: {r} is not a ratio"
        ))),
        None => Err(SourceError::rejected(
            "ls-ratio: no ratio, or longs and shorts, in the data",
        )),
    }
}

/// `liquidation-data-v2/` data: `[{venue: {longs, shorts}, …}]`, summed over venues.
pub fn parse_liquidations(data: &[Value]) -> Result<Option<Liquidations>, SourceError> {
    let mut total = Liquidations {
        longs: 0.0,
        shorts: 0.0,
    };
    let mut seen = false;
    for row in data {
        let Some(venues) = row.as_object() else {
            return Err(SourceError::rejected(
                "liquidation-data-v2: an item is not an object",
            ));
        };
        for venue in venues.values().filter_map(Value::as_object) {
            let l = venue.get("longs").and_then(number).unwrap_or(0.0);
            let s = venue.get("shorts").and_then(number).unwrap_or(0.0);
            if !(l.is_finite() && s.is_finite() && l >= 0.0 && s >= 0.0) {
                return Err(SourceError::rejected(
                    "liquidation-data-v2: a negative or non-finite amount",
                ));
            }
            total.longs += l;
            total.shorts += s;
            seen = true;
        }
    }
    Ok(seen.then_some(total))
}

#[async_trait]
impl MarketSource for Cryptometer {
    fn describe(&self) -> String {
        // The base URL carries no key (the key is a query parameter added per request).
        format!("cryptometer at {}", self.base)
    }
    fn simulated(&self) -> bool {
        false
    }
    async fn candles(
        &self,
        symbol: &Symbol,
        tf: Timeframe,
        limit: usize,
    ) -> Result<Vec<Candle>, SourceError> {
        let data = self
            .get(
                "ohlcv",
                &[
                    ("e", self.exchange.clone()),
                    ("pair", symbol.pair()),
                    ("timeframe", tf.to_string()),
                    ("limit", limit.to_string()),
                ],
            )
            .await?;
        parse_candles(&data, tf)
    }
    async fn ls_ratio(&self, symbol: &Symbol, tf: Timeframe) -> Result<Option<f64>, SourceError> {
        let data = self
            .get(
                "ls-ratio",
                &[
                    ("e", self.futures_exchange.clone()),
                    ("pair", symbol.pair()),
                    ("timeframe", tf.to_string()),
                ],
            )
            .await?;
        parse_ls_ratio(&data)
    }
    async fn liquidations(&self, symbol: &Symbol) -> Result<Option<Liquidations>, SourceError> {
        let data = self
            .get(
                "liquidation-data-v2",
                &[("symbol", symbol.base().to_ascii_lowercase())],
            )
            .await?;
        parse_liquidations(&data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quota_refusals_are_told_from_bad_requests() {
        for m in [
            "success is false: Rate plan exceeded",
            "HTTP 403: API quota reached",
            "success is false: Daily limit exceeded",
        ] {
            assert!(is_quota(m), "{m}");
            assert!(matches!(
                Attempt::refused(m.into()).error,
                SourceError::Transient { .. }
            ));
        }
        for m in [
            "success is false: Invalid API key",
            "success is false: No Data",
            "HTTP 404",
        ] {
            assert!(!is_quota(m), "{m}");
            assert!(matches!(
                Attempt::refused(m.into()).error,
                SourceError::Rejected(_)
            ));
        }
    }

    #[test]
    fn envelopes() {
        let ok = json!({"success": "true", "error": "false", "data": [{"a": 1}]});
        assert_eq!(envelope(&ok).unwrap(), vec![json!({"a": 1})]);
        let ok = json!({"success": true, "data": {"a": 1}});
        assert_eq!(envelope(&ok).unwrap(), vec![json!({"a": 1})]);
        let bad = json!({"success": "false", "error": "Invalid API key", "data": []});
        assert_eq!(
            envelope(&bad).unwrap_err(),
            "success is false: Invalid API key"
        );
        let bad = json!({"success": "false", "error": "true", "message": "No Data"});
        assert_eq!(envelope(&bad).unwrap_err(), "success is false: No Data");
        assert!(
            envelope(&json!({"data": []}))
                .unwrap_err()
                .contains("no success flag")
        );
        assert!(
            envelope(&json!({"success": "true", "data": 3}))
                .unwrap_err()
                .contains("not a list")
        );
    }

    #[test]
    fn candles_in_either_order_and_in_either_time_unit() {
        let data = vec![
            json!({"timestamp": 1_763_560_800_000i64, "open": "10", "high": 11, "low": 9, "close": 10.5, "volume": "3"}),
            json!({"timestamp": 1_763_557_200, "open": 9.5, "high": 10.2, "low": 9.4, "close": 10, "volume": 2}),
        ];
        let c = parse_candles(&data, Timeframe::H1).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c[0].open_time < c[1].open_time);
        assert_eq!(c[1].close, 10.5);
        assert_eq!(c[1].open_time.to_rfc3339(), "2025-11-19T14:00:00+00:00");
    }

    #[test]
    fn ratios_and_liquidations() {
        assert_eq!(
            parse_ls_ratio(&[json!({"ratio": "1.3"})]).unwrap(),
            Some(1.3)
        );
        assert_eq!(
            parse_ls_ratio(&[json!({"longs": 60, "shorts": 40})]).unwrap(),
            Some(1.5)
        );
        assert_eq!(parse_ls_ratio(&[]).unwrap(), None);
        // Newest first or oldest first: the latest time wins either way.
        let old = json!({"timestamp": 1_763_557_200_000i64, "ratio": 0.7});
        let new = json!({"timestamp": 1_763_560_800_000i64, "ratio": 1.4});
        assert_eq!(
            parse_ls_ratio(&[old.clone(), new.clone()]).unwrap(),
            Some(1.4)
        );
        assert_eq!(parse_ls_ratio(&[new, old]).unwrap(), Some(1.4));
        // Binance's shape (what binance_futures serves): 64.42% of accounts long is a
        // ratio of 1.8105, crowded long (above ls_crowded_long 1.25, a bearish vote).
        let binance = json!({"symbol": "BTCUSDT", "longAccount": "0.6442", "shortAccount": "0.3558",
                             "timestamp": "1583139600000"});
        let no_ratio = binance.as_object().unwrap().clone();
        let r = parse_ls_ratio(&[Value::Object(no_ratio)]).unwrap().unwrap();
        assert!((r - 1.8105).abs() < 1e-3, "{r}");
        assert_eq!(
            parse_ls_ratio(&[json!({"long_pct": 45.0, "short_pct": 55.0})]).unwrap(),
            Some(45.0 / 55.0)
        );
        assert!(parse_ls_ratio(&[json!({"x": 1})]).is_err());
        let l = parse_liquidations(&[
            json!({"binance": {"longs": 10, "shorts": "5"}, "bybit": {"longs": 1, "shorts": 2}}),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.longs, l.shorts), (11.0, 7.0));
        assert!(parse_liquidations(&[json!({"x": {"longs": -1}})]).is_err());
    }
}
