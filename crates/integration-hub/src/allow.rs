//! The hub's outbound HTTP client: it connects only to addresses on the allow-list
//! (`cim_hub_config::allow`). Every host is resolved and checked *before* connecting (the
//! client connects to the checked address, so a DNS answer cannot change between check and
//! use), IP literals are checked directly, and every redirect is checked again.

use std::{net::SocketAddr, sync::Arc};

use cim_hub_config::allow::{AllowError, AllowList, check_parsed};

/// Resolves names and keeps only allowed addresses; none left is an error.
struct Resolver(Arc<AllowList>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| allow.allows(a.ip())).collect();
            if allowed.is_empty() {
                let addrs = all.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                return Err(Box::new(AllowError::Resolved { host, addrs }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The hub's HTTP client: connects only to allowed addresses, follows at most 5 redirects and
/// only to allowed addresses, ignores proxy settings.
pub fn client(allow: AllowList) -> reqwest::Result<reqwest::Client> {
    let allow = Arc::new(allow);
    let for_redirects = allow.clone();
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(Resolver(allow)))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("too many redirects");
            }
            match check_parsed(attempt.url(), &for_redirects) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(format!("redirect refused: {e}")),
            }
        }))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_resolving_to_disallowed_addresses_are_refused_before_connecting() {
        use reqwest::dns::Resolve;
        let r = Resolver(Arc::new(AllowList::parse(&["10.0.0.0/8".into()]).unwrap()));
        let e = r.resolve("localhost".parse().unwrap()).await.err().unwrap().to_string();
        assert!(e.contains("resolves only to addresses that are not allowed"), "{e}");
        let ok = Resolver(Arc::new(AllowList::parse(&["127.0.0.1".into(), "::1".into()]).unwrap()));
        let addrs: Vec<SocketAddr> = ok.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
