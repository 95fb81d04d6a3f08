//! Outside services, each behind a trait with a production client and a dev simulator.

pub mod chain;
#[cfg(feature = "solana-rpc")]
pub mod chain_rpc;
pub mod chain_sim;
pub mod cryptometer;
pub mod kingfisher;
pub mod llm;
pub mod llm_echo;
pub mod market;
pub mod market_sim;

/// `scheme://host[:port]` of a URL, without user info, path or query (where services
/// put API keys), for logs and `Debug`. `None` when it is not `scheme://…`.
pub fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    // user:password@host → host
    let host = host.rsplit('@').next()?;
    Some(format!("{scheme}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::url_origin;

    #[test]
    fn url_origin_drops_credentials_path_and_query() {
        assert_eq!(
            url_origin("https://u:p@kf.example:8443/x?key=s").as_deref(),
            Some("https://kf.example:8443")
        );
        assert_eq!(
            url_origin("http://127.0.0.1:9/v1").as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(url_origin("junk"), None);
    }
}
