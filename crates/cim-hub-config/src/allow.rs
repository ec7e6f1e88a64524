//! The outbound allow-list: the only addresses the hub's HTTP client may connect to (CIDR
//! blocks), and the check of a target URL against it. The hub resolves every host name and
//! checks the addresses with [`AllowList::allows`] before connecting.

use std::net::IpAddr;

/// Why an address or URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowError {
    #[error("invalid allow-list entry {0:?} (expected an address or a CIDR block)")]
    Entry(String),
    #[error("invalid url {0:?}")]
    Url(String),
    #[error("url {0:?} must use http (this build has no TLS client)")]
    Scheme(String),
    #[error("address {0} is not allowed")]
    NotAllowed(IpAddr),
    #[error("host {host} resolves only to addresses that are not allowed ({addrs})")]
    Resolved { host: String, addrs: String },
}

/// CIDR blocks; empty allows nothing.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    nets: Vec<(IpAddr, u8)>,
}

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<AllowList, AllowError> {
        let mut nets = Vec::new();
        for e in entries {
            let bad = || AllowError::Entry(e.clone());
            let (addr, len) = match e.split_once('/') {
                Some((a, l)) => (a.parse::<IpAddr>().map_err(|_| bad())?, l.parse::<u8>().map_err(|_| bad())?),
                None => {
                    let a = e.parse::<IpAddr>().map_err(|_| bad())?;
                    (a, if a.is_ipv4() { 32 } else { 128 })
                }
            };
            if len > if addr.is_ipv4() { 32 } else { 128 } {
                return Err(bad());
            }
            nets.push((addr, len));
        }
        Ok(AllowList { nets })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 address written as IPv6 (::ffff:a.b.c.d) is judged as the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.nets.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
            _ => false,
        })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (full, rest) = ((len / 8) as usize, len % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

/// Checks a target URL: http, and an IP literal host must be allowed (a name is checked when
/// it is resolved). Returns the URL as given.
pub fn check_url(url: &str, allow: &AllowList) -> Result<String, AllowError> {
    let parsed = url::Url::parse(url).map_err(|_| AllowError::Url(url.to_string()))?;
    check_parsed(&parsed, allow)?;
    Ok(url.to_string())
}

/// [`check_url`] of a parsed URL (the hub checks every redirect with it).
pub fn check_parsed(url: &url::Url, allow: &AllowList) -> Result<(), AllowError> {
    if url.scheme() != "http" {
        return Err(AllowError::Scheme(url.to_string()));
    }
    let host = url.host_str().ok_or_else(|| AllowError::Url(url.to_string()))?;
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) if !allow.allows(ip) => Err(AllowError::NotAllowed(ip)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_and_mapped_addresses() {
        let a = AllowList::parse(&["10.0.0.0/8".into(), "192.168.1.7".into(), "fd00::/8".into()]).unwrap();
        assert!(a.allows("10.200.0.1".parse().unwrap()));
        assert!(!a.allows("11.0.0.1".parse().unwrap()));
        assert!(a.allows("192.168.1.7".parse().unwrap()));
        assert!(!a.allows("192.168.1.8".parse().unwrap()));
        assert!(a.allows("fd12::1".parse().unwrap()));
        assert!(a.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!a.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!AllowList::default().allows("127.0.0.1".parse().unwrap()));
        let odd = AllowList::parse(&["172.16.0.0/12".into()]).unwrap();
        assert!(odd.allows("172.31.255.255".parse().unwrap()));
        assert!(!odd.allows("172.32.0.0".parse().unwrap()));
        for bad in ["10.0.0.0/33", "example.com", "::1/129", ""] {
            assert!(AllowList::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls() {
        let a = AllowList::parse(&["127.0.0.1".into()]).unwrap();
        assert!(check_url("http://127.0.0.1:9/x", &a).is_ok());
        assert!(check_url("http://localhost:9/x", &a).is_ok(), "names are checked when resolved");
        assert_eq!(check_url("http://127.0.0.2/", &a), Err(AllowError::NotAllowed("127.0.0.2".parse().unwrap())));
        assert!(matches!(check_url("https://127.0.0.1/", &a), Err(AllowError::Scheme(_))));
        assert!(matches!(check_url("not a url", &a), Err(AllowError::Url(_))));
        assert!(check_url("http://[::1]/", &a).is_err());
    }
}
