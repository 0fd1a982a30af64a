//! Where an HTTP request comes from, as far as the console can know: the client
//! address behind trusted reverse proxies (`console.trusted_proxies`), and
//! whether a `Host` header names this machine's loopback (the anonymous
//! console's defence against DNS rebinding: a web page whose name was
//! re-pointed at 127.0.0.1 sends its own name as `Host`).

use std::net::IpAddr;

/// An address or a CIDR range (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    net: IpAddr,
    prefix: u8,
}

impl IpRange {
    pub fn parse(s: &str) -> Result<IpRange, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a CIDR range (like 10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(IpRange { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// One `X-Forwarded-For` hop as an address: `1.2.3.4`, `1.2.3.4:5678`,
/// `2001:db8::1`, `[2001:db8::1]:5678`.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    hop.rsplit_once(':').and_then(|(h, _port)| h.parse().ok())
}

/// The key a client is limited and logged by: its address, with IPv6
/// taken per /64 (one host usually holds a whole /64, and would get a
/// limit per address of it otherwise).
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(|| ip.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    }
}

/// Who the client is, as a key: the peer's address, unless the peer is a
/// trusted proxy; then the right-most `X-Forwarded-For` hop that is not a
/// trusted proxy (hops left of it were written by the client and prove
/// nothing). A hop that is not an address is the key as it is written
/// (`forwarded:…`): never skipped, and never turned into the proxy's own
/// address, which every client behind it shares.
pub fn client_key(peer: Option<IpAddr>, forwarded_for: &[&str], trusted: &[IpRange]) -> String {
    let Some(peer) = peer else {
        return "unknown".into();
    };
    let is_trusted = |ip: IpAddr| trusted.iter().any(|r| r.contains(ip));
    if !is_trusted(peer) {
        return address_key(peer);
    }
    let hops: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    for hop in hops.into_iter().rev() {
        match hop_address(hop) {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return address_key(ip),
            None => return format!("forwarded:{}", hop.chars().take(64).collect::<String>()),
        }
    }
    address_key(peer)
}

/// Whether `host` (a `Host` header: name or address, maybe a port) names
/// a loopback address or `localhost`.
pub fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn ranges_parse_and_match() {
        let r = IpRange::parse("10.0.0.0/8").expect("range");
        assert!(r.contains(ip("10.1.2.3")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.9.9.9")), "v4-mapped");
        let one = IpRange::parse("127.0.0.1").expect("address");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert!(IpRange::parse("fd00::/8").expect("v6").contains(ip("fd12::1")));
        assert!(IpRange::parse("0.0.0.0/0").expect("all").contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", ""] {
            assert!(IpRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let proxies = [IpRange::parse("10.0.0.0/8").expect("range")];
        let key = |peer: &str, xff: &[&str], trusted: &[IpRange]| client_key(Some(ip(peer)), xff, trusted);
        // From a proxy: the right-most untrusted hop.
        assert_eq!(
            key("10.0.0.5", &["6.6.6.6, 203.0.113.9, 10.0.0.7"], &proxies),
            "203.0.113.9"
        );
        // Several headers read as one list, in order.
        assert_eq!(key("10.0.0.5", &["6.6.6.6", "203.0.113.9"], &proxies), "203.0.113.9");
        // Hops with ports, IPv6 with brackets; IPv6 per /64.
        assert_eq!(key("10.0.0.5", &["203.0.113.9:5123"], &proxies), "203.0.113.9");
        assert_eq!(
            key("10.0.0.5", &["[2001:db8:1:2::7]:443"], &proxies),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            key("10.0.0.5", &["2001:db8:1:2:ffff::9"], &proxies),
            "2001:db8:1:2::/64"
        );
        // From anyone else: the header is the client's own words.
        assert_eq!(key("198.51.100.1", &["203.0.113.9"], &proxies), "198.51.100.1");
        assert_eq!(key("10.0.0.5", &["203.0.113.9"], &[]), "10.0.0.5");
        // A hop that is not an address is its own key: never skipped to a
        // client-written hop on its left, never the proxy's address.
        assert_eq!(
            key("10.0.0.5", &["198.51.100.7, garbage"], &proxies),
            "forwarded:garbage"
        );
        // No hop at all: the proxy itself.
        assert_eq!(key("10.0.0.5", &[], &proxies), "10.0.0.5");
        assert_eq!(client_key(None, &[], &proxies), "unknown");
    }

    #[test]
    fn loopback_hosts() {
        for ok in ["127.0.0.1:9465", "localhost", "LOCALHOST:1", "[::1]:9465", "127.1.2.3"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9465",
            "10.0.0.1:9465",
            "localhost.evil.example",
            "",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
