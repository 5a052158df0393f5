//! Droplet endpoints are checked before they are trusted: their shape at registration, and
//! the addresses their host resolves to at each delivery. The orchestrator POSTs with its
//! own credentials to whatever a droplet registers, so an endpoint must not turn it into a
//! client of the database port, the cloud's metadata service or its own loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use url::Url;

use crate::config::Config;
use crate::services::http_client::{build_client, ClientBuildError};

/// Which addresses deliveries may go to.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    /// Loopback is allowed in development, so the tour and the simulator work.
    allow_loopback: bool,
    /// When set, deliveries go only into these networks (`ENDPOINT_ALLOWED_NETWORKS`): the
    /// list narrows the checks, it never lifts them, except for a network that lies wholly
    /// inside loopback or link-local, which opts in to exactly that network.
    allowed: Vec<IpNet>,
}

impl EndpointPolicy {
    pub fn from_config(config: &Config) -> EndpointPolicy {
        EndpointPolicy {
            allow_loopback: !config.is_production(),
            allowed: config.endpoint_allowed_networks.clone(),
        }
    }

    /// Whether a delivery may go to this address. Unspecified, multicast and broadcast
    /// addresses never. With `ENDPOINT_ALLOWED_NETWORKS` set, only addresses inside one of
    /// its networks. Link-local (cloud metadata) and, in production, loopback only inside a
    /// listed network that lies wholly inside loopback or link-local (`127.0.0.1/32`, not
    /// `0.0.0.0/0`): a broad network does not re-open them.
    ///
    /// An IPv6 address that carries an IPv4 one (NAT64 `64:ff9b::/96`, 6to4 `2002::/16`,
    /// IPv4-compatible `::a.b.c.d`; IPv4-mapped is that IPv4 address) is judged as both: a
    /// gateway or the host's own stack may deliver it to the IPv4 address inside.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if !self.allowed.is_empty() && !self.allowed.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allows_kind(ip, ip)
            && embedded_v4(ip).is_none_or(|v4| self.allows_kind(ip, IpAddr::V4(v4)))
    }

    /// The kind checks on `ip` (the address itself or the IPv4 inside it); an opt-in is a
    /// listed network holding `listed`, the address as written.
    fn allows_kind(&self, listed: IpAddr, ip: IpAddr) -> bool {
        if ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
            return false;
        }
        if is_link_local(ip) || ip.is_loopback() {
            let opted_in = self
                .allowed
                .iter()
                .any(|net| net.contains(&listed) && is_loopback_or_link_local_only(net));
            return opted_in || (ip.is_loopback() && self.allow_loopback);
        }
        true
    }
}

/// The IPv4 address an IPv6 one carries: NAT64's well-known prefix (`64:ff9b::/96`, the last
/// 32 bits), 6to4 (`2002:AABB:CCDD::/48`, bits 16 to 48) or IPv4-compatible (`::a.b.c.d`,
/// deprecated; not `::` nor `::1`, which are IPv6's own).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) != (0, 0) && (hi, lo) != (0, 1) => Some(v4(hi, lo)),
        _ => None,
    }
}

/// Whether every address of the network is loopback (127.0.0.0/8, ::1) or link-local
/// (169.254.0.0/16, fe80::/10): listing such a network is an explicit opt-in to it.
fn is_loopback_or_link_local_only(net: &IpNet) -> bool {
    const SPECIAL: [IpNet; 4] = [
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
        IpNet::new_assert(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    ];
    SPECIAL.iter().any(|special| special.contains(net))
        || METADATA
            .iter()
            .any(|m| net.prefix_len() == net.max_prefix_len() && net.addr() == *m)
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

fn is_link_local(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    link_local || METADATA.contains(&ip)
}

/// Cloud metadata services outside link-local, refused as link-local is: AWS's over IPv6
/// (`fd00:ec2::254`, a private address otherwise allowed) and Alibaba Cloud's
/// (`100.100.100.200`, in the shared address space).
const METADATA: [IpAddr; 2] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

/// What is wrong with an endpoint's shape, in words for a 422.
pub fn check_shape(raw: &str) -> Result<Url, &'static str> {
    let url = Url::parse(raw).map_err(|_| "Input should be a valid http(s) URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("Input should be a valid http(s) URL");
    }
    if url.host().is_none() {
        return Err("The URL should name a host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("The URL should carry no credentials");
    }
    if url.query().is_some() || url.fragment().is_some() || raw.contains(['?', '#']) {
        return Err(
            "The URL should have no query or fragment (deliveries go to {endpoint}/message)",
        );
    }
    Ok(url)
}

/// The shape check, and for a literal IP address the policy too (a registration that could
/// never be delivered to is refused up front; host names are checked at each delivery).
pub fn check_registration(raw: &str, policy: &EndpointPolicy) -> Result<(), &'static str> {
    let url = check_shape(raw)?;
    match url.host() {
        Some(url::Host::Ipv4(ip)) if !policy.allows(IpAddr::V4(ip)) => {
            Err("The endpoint's address is not one the orchestrator delivers to")
        }
        Some(url::Host::Ipv6(ip)) if !policy.allows(IpAddr::V6(ip)) => {
            Err("The endpoint's address is not one the orchestrator delivers to")
        }
        _ => Ok(()),
    }
}

/// Why a delivery may not go to this endpoint at all, checked before it is sent: its shape,
/// or a literal address the policy refuses (resolved names are filtered by [`PolicyResolver`]).
pub fn check_delivery(raw: &str, policy: &EndpointPolicy) -> Result<Url, &'static str> {
    let url = check_shape(raw)?;
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if literal.is_some_and(|ip| !policy.allows(ip)) {
        return Err("endpoint address not allowed");
    }
    Ok(url)
}

/// The DNS resolver of the delivery client: resolves as the system does, then keeps only the
/// addresses the policy allows, at each connection (so a name that later resolves to the
/// metadata service or to loopback is refused then too).
pub struct PolicyResolver {
    policy: EndpointPolicy,
}

impl PolicyResolver {
    pub fn new(policy: EndpointPolicy) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver { policy })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no allowed address")]
pub struct NoAllowedAddress;

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(Box::new(NoAllowedAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client deliveries go out with: the policy's resolver, no redirects (a redirect would
/// carry the orchestrator's token elsewhere), the dispatch timeouts.
pub fn delivery_client(config: &Config) -> Result<reqwest::Client, ClientBuildError> {
    let timeout = std::time::Duration::from_secs(config.dispatch_timeout_seconds);
    build_client(
        "deliveries to droplets",
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            .pool_max_idle_per_host(16)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(PolicyResolver::new(EndpointPolicy::from_config(config))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(production: bool, allowed: &[&str]) -> EndpointPolicy {
        EndpointPolicy {
            allow_loopback: !production,
            allowed: allowed.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn production_refuses_loopback_metadata_and_the_like() {
        let p = policy(true, &[]);
        for ip in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
        ] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.5",
            "192.168.1.2",
            "172.16.0.1",
            "8.8.8.8",
            "fd00::1",
        ] {
            assert!(p.allows(ip.parse().unwrap()), "{ip}");
        }
    }

    /// Finding 5 of issue 24: the IPv4 inside NAT64, 6to4 and IPv4-compatible addresses.
    #[test]
    fn an_embedded_ipv4_is_judged_like_the_plain_one() {
        for production in [true, false] {
            let p = policy(production, &[]);
            for ip in [
                "64:ff9b::a9fe:a9fe",
                "64:ff9b::6464:64c8",
                "2002:a9fe:a9fe::1",
                "::169.254.169.254",
                "64:ff9b::",
                "2002::",
                "::224.0.0.1",
            ] {
                assert!(!p.allows(ip.parse().unwrap()), "{ip} ({production})");
            }
            for ip in ["64:ff9b::a00:5", "2002:808:808::1", "::10.0.0.5"] {
                assert!(p.allows(ip.parse().unwrap()), "{ip} ({production})");
            }
        }
        let p = policy(true, &[]);
        for ip in ["64:ff9b::7f00:1", "2002:7f00:1::", "::127.0.0.1"] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip}");
        }
        // Development lets loopback through, in any spelling.
        assert!(policy(false, &[]).allows("::127.0.0.1".parse().unwrap()));
        // A broad network does not re-open it.
        let p = policy(true, &["::/0"]);
        assert!(!p.allows("64:ff9b::7f00:1".parse().unwrap()));
        assert!(p.allows("64:ff9b::a00:5".parse().unwrap()));
    }

    #[test]
    fn development_allows_loopback_only() {
        let p = policy(false, &[]);
        assert!(p.allows("127.0.0.1".parse().unwrap()));
        assert!(!p.allows("169.254.169.254".parse().unwrap()));
    }

    #[test]
    fn allowed_networks_tighten() {
        let p = policy(true, &["10.0.0.0/8"]);
        assert!(p.allows("10.1.2.3".parse().unwrap()));
        assert!(!p.allows("192.168.1.2".parse().unwrap()));
    }

    #[test]
    fn a_network_covering_everything_does_not_reopen_loopback_or_metadata() {
        let p = policy(true, &["0.0.0.0/0", "::/0"]);
        for ip in [
            "169.254.169.254",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip}");
        }
        assert!(p.allows("10.1.2.3".parse().unwrap()));
        assert!(p.allows("fd00::1".parse().unwrap()));
    }

    #[test]
    fn metadata_services_outside_link_local_are_refused_like_it() {
        for production in [true, false] {
            let p = policy(production, &[]);
            assert!(!p.allows("fd00:ec2::254".parse().unwrap()));
            assert!(!p.allows("100.100.100.200".parse().unwrap()));
            assert!(p.allows("fd00:ec2::253".parse().unwrap()));
            assert!(p.allows("100.100.100.199".parse().unwrap()));
        }
        let p = policy(true, &["fd00::/8", "100.64.0.0/10"]);
        assert!(!p.allows("fd00:ec2::254".parse().unwrap()));
        assert!(!p.allows("100.100.100.200".parse().unwrap()));
        let p = policy(true, &["fd00:ec2::254/128"]);
        assert!(
            p.allows("fd00:ec2::254".parse().unwrap()),
            "an explicit opt-in"
        );
    }

    #[test]
    fn a_listed_loopback_network_is_an_explicit_opt_in_to_it_alone() {
        let p = policy(true, &["127.0.0.1/32"]);
        assert!(p.allows("127.0.0.1".parse().unwrap()));
        assert!(!p.allows("127.0.0.2".parse().unwrap()));
        assert!(!p.allows("10.1.2.3".parse().unwrap()));
        assert!(!p.allows("169.254.169.254".parse().unwrap()));
        let p = policy(true, &["169.254.169.0/24", "10.0.0.0/8"]);
        assert!(p.allows("169.254.169.254".parse().unwrap()));
        assert!(p.allows("10.1.2.3".parse().unwrap()));
        assert!(!p.allows("127.0.0.1".parse().unwrap()));
        // Unspecified and multicast never, whatever is listed.
        let p = policy(true, &["0.0.0.0/32", "224.0.0.0/4"]);
        assert!(!p.allows("0.0.0.0".parse().unwrap()));
        assert!(!p.allows("224.0.0.1".parse().unwrap()));
    }

    #[test]
    fn shapes() {
        assert!(check_shape("http://droplet-8:8000").is_ok());
        assert!(check_shape("https://a.example/api").is_ok());
        for bad in [
            "ftp://a",
            "http://user:pw@a",
            "http://a/?x=1",
            "http://a/#frag",
            "http://a?",
            "not a url",
        ] {
            assert!(check_shape(bad).is_err(), "{bad}");
        }
        let prod = policy(true, &[]);
        assert!(check_registration("http://127.0.0.1:5432", &prod).is_err());
        assert!(check_registration("http://[::1]:80", &prod).is_err());
        assert!(check_registration("http://169.254.169.254/latest", &prod).is_err());
        assert!(check_registration("http://droplet.internal:80", &prod).is_ok());
    }
}
