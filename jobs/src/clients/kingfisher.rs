//! KingFisher liquidation clusters: an HTTP source configured by URL that answers
//! `[{price, volume, side}]` for a symbol. Optional: without a URL the step is skipped
//! and signals note it.
//!
//! The URL may hold `{pair}` (`BTC-USDT`) and `{base}` (`BTC`) placeholders; without
//! either, `?symbol=BTC-USDT` is appended. The URL may carry a key, so it is never
//! logged whole: [`KingFisher::describe`] shows scheme and host only.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use super::market::{ClusterSource, SourceError, parse_clusters};
use crate::market::types::{Cluster, Symbol};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KingFisherConfig {
    /// Empty or unset: no cluster source.
    #[serde(default)]
    pub url: Option<SecretString>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

pub struct KingFisher {
    http: reqwest::Client,
    url: SecretString,
    shown: String,
}

impl KingFisher {
    /// `None` when no URL is configured.
    pub fn new(cfg: &KingFisherConfig) -> Result<Option<Self>, String> {
        let Some(url) = cfg
            .url
            .clone()
            .filter(|u| !u.expose_secret().trim().is_empty())
        else {
            return Ok(None);
        };
        let u = url.expose_secret();
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err("url is not an http(s) URL".into());
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Some(KingFisher {
            http,
            shown: super::url_origin(u).unwrap_or_else(|| "<kingfisher url>".into()),
            url,
        }))
    }

    fn url_for(&self, symbol: &Symbol) -> String {
        let u = self.url.expose_secret();
        if u.contains("{pair}") || u.contains("{base}") {
            u.replace("{pair}", &symbol.pair())
                .replace("{base}", symbol.base())
        } else {
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}symbol={}", symbol.pair())
        }
    }
}

#[async_trait]
impl ClusterSource for KingFisher {
    fn describe(&self) -> String {
        format!("kingfisher at {}", self.shown)
    }
    async fn clusters(&self, symbol: &Symbol) -> Result<Vec<Cluster>, SourceError> {
        let resp = self
            .http
            .get(self.url_for(symbol))
            .send()
            .await
            .map_err(|e| SourceError::transient(format!("kingfisher: {}", e.without_url())))?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(SourceError::transient(format!("kingfisher: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(SourceError::rejected(format!("kingfisher: HTTP {status}")));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|_| SourceError::rejected("kingfisher: malformed JSON in the response"))?;
        parse_clusters(&body).map_err(|e| SourceError::rejected(format!("kingfisher: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let kf = |u: &str| {
            KingFisher::new(&KingFisherConfig {
                url: Some(SecretString::from(u.to_string())),
                timeout: Duration::from_secs(1),
            })
            .unwrap()
            .unwrap()
        };
        let s: Symbol = "BTC/USDT".parse().unwrap();
        assert_eq!(
            kf("http://h/c/{base}?k=1").url_for(&s),
            "http://h/c/BTC?k=1"
        );
        assert_eq!(
            kf("http://h/c?k=1").url_for(&s),
            "http://h/c?k=1&symbol=BTC-USDT"
        );
        assert_eq!(kf("http://h/c").url_for(&s), "http://h/c?symbol=BTC-USDT");
        assert_eq!(
            kf("http://h/c?key=secret").describe(),
            "kingfisher at http://h"
        );
        let none = KingFisherConfig {
            url: Some(SecretString::from(" ".to_string())),
            timeout: Duration::from_secs(1),
        };
        assert!(KingFisher::new(&none).unwrap().is_none());
    }
}
