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
    #[error("allow-list entry {0:?} lies in {1}, which is never allowed (cloud metadata, link-local, multicast)")]
    NeverAllowed(String, String),
    #[error("host {host} resolves only to addresses that are not allowed ({addrs})")]
    Resolved { host: String, addrs: String },
}

/// CIDR blocks; empty allows nothing.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    nets: Vec<(IpAddr, u8)>,
}

/// Blocks no allow-list opens, however wide: unspecified and "this network", link-local
/// (169.254.169.254 and fd00:ec2::254 are cloud metadata services), multicast and broadcast.
/// Addresses are judged after [`canonical`], so IPv4 written in IPv6 forms is caught too.
const NEVER: [(&str, u8); 8] = [
    ("0.0.0.0", 8),
    ("169.254.0.0", 16),
    ("224.0.0.0", 4),
    ("255.255.255.255", 32),
    ("::", 128),
    ("fe80::", 10),
    ("ff00::", 8),
    ("fd00:ec2::254", 128),
];

/// [`NEVER`] parsed once (every outbound connection is checked against it).
fn never() -> impl Iterator<Item = (IpAddr, u8)> {
    static PARSED: std::sync::LazyLock<Vec<(IpAddr, u8)>> = std::sync::LazyLock::new(|| {
        NEVER.iter().map(|(a, l)| (a.parse().expect("NEVER holds address literals"), *l)).collect()
    });
    PARSED.iter().copied()
}

fn in_net(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), len),
        (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), len),
        _ => false,
    }
}

/// The address a connection really reaches, as IPv4 where an IPv6 form carries one: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`) and
/// 6to4 (`2002:AABB:CCDD::/16`).
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let seg = v6.segments();
    let o = v6.octets();
    let last4 = || IpAddr::V4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    if seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
        return last4();
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1) {
        return last4();
    }
    if seg[0] == 0x2002 {
        return IpAddr::V4(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    ip
}

/// Whether `ip` lies in a block no allow-list opens.
pub fn never_allowed(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    never().any(|(n, l)| in_net(n, l, ip))
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
            // An entry that opens nothing but a never-allowed block is a mistake worth naming.
            if let Some((n, l)) = never().find(|(n, l)| len >= *l && in_net(*n, *l, addr)) {
                return Err(AllowError::NeverAllowed(e.clone(), format!("{n}/{l}")));
            }
            nets.push((addr, len));
        }
        Ok(AllowList { nets })
    }

    /// Whether the hub may connect to `ip`: never to a [`never_allowed`] block, else when an
    /// entry holds it. An IPv4 address in an IPv6 form is judged as the IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !never_allowed(ip) && self.nets.iter().any(|(net, len)| in_net(*net, *len, ip))
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
    fn cloud_metadata_link_local_and_multicast_stay_closed_whatever_the_allow_list_says() {
        let wide = AllowList::parse(&["0.0.0.0/0".into(), "::/0".into()]).unwrap();
        for never in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "fd00:ec2::254",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "0.0.0.0",
            "::",
            "255.255.255.255",
        ] {
            let ip: IpAddr = never.parse().unwrap();
            assert!(!wide.allows(ip), "{never} was allowed");
            assert!(matches!(
                check_url(&format!("http://{}/", if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() }), &wide),
                Err(AllowError::NotAllowed(_))
            ));
        }
        assert!(wide.allows("10.1.2.3".parse().unwrap()) && wide.allows("2001:db8::1".parse().unwrap()));
        // IPv4 in IPv6 forms is judged as the IPv4 address it reaches, for allowing too.
        let ten = AllowList::parse(&["10.0.0.0/8".into()]).unwrap();
        for reaches_ten in ["64:ff9b::a00:1", "::ffff:10.0.0.1", "2002:a00:1::"] {
            assert!(ten.allows(reaches_ten.parse().unwrap()), "{reaches_ten}");
        }
        assert!(!ten.allows("64:ff9b::b00:1".parse().unwrap()));
        // Entries that open only a never-allowed block are refused with the reason.
        for entry in ["169.254.169.254", "169.254.0.0/16", "fe80::/64", "fd00:ec2::254"] {
            assert!(matches!(AllowList::parse(&[entry.to_string()]), Err(AllowError::NeverAllowed(..))), "{entry}");
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
