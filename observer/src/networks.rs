//! Where an address lies relative to the cluster: decisions shared by the correlation
//! core (records) and the agent (metrics), so both say the same thing.
use std::net::IpAddr;

use ipnet::IpNet;

/// The node's own addresses and a node-local cache's.
#[inline]
fn node_local(server: IpAddr) -> bool {
    match server {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    }
}

/// The cluster networks as one lookup: per address family, the networks' address ranges
/// sorted and merged, searched by bisection. Asks what checking every network would ask
/// (an IPv4 address is in an IPv4 network, an IPv6 address in an IPv6 one), at a cost that
/// hardly grows with the list: the correlation core asks it for every connect, and a
/// cluster's networks can be a pod CIDR per node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNetworks {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl ClusterNetworks {
    pub fn new(networks: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in networks {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merged(v4),
            v6: merged(v6),
        }
    }

    /// `ip` lies in one of the networks.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => in_ranges(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => in_ranges(&self.v6, u128::from(v6)),
        }
    }

    /// A DNS server outside the cluster networks, other than the node's own (loopback) and
    /// a node-local cache (link-local, e.g. 169.254.20.10): a pod that asks it bypasses
    /// cluster DNS and its policies.
    #[inline]
    pub fn dns_server_outside(&self, server: IpAddr) -> bool {
        !node_local(server) && !self.contains(server)
    }
}

/// Inclusive ranges sorted by start, overlapping ones (a network inside another) joined,
/// so that at most one range can hold an address.
fn merged<T: Ord + Copy>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // The last range starting at or below `x` is the only one that can hold it.
    let after = ranges.partition_point(|&(start, _)| start <= x);
    after > 0 && x <= ranges[after - 1].1
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn dns_from_outside_the_cluster_networks_but_not_from_the_node() {
        let cluster: Vec<IpNet> = vec!["198.18.0.0/15".parse().unwrap()];
        let lookup = ClusterNetworks::new(&cluster);
        for (server, outside) in [
            ("203.0.113.53", true),
            ("8.8.8.8", true),
            ("198.18.0.53", false),
            ("127.0.0.53", false),
            ("169.254.20.10", false),
            ("::1", false),
            ("fe80::1", false),
            ("2001:db8:e::53", true),
        ] {
            let server = server.parse().unwrap();
            assert_eq!(lookup.dns_server_outside(server), outside, "{server}");
        }
    }

    /// A small xorshift: the same addresses on every run.
    struct Addresses(u64);

    impl Addresses {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The lookup answers as checking every network does, for lists that overlap, nest,
    /// touch, repeat, span the whole family or hold a single address, and for addresses at
    /// and around every range's ends.
    #[test]
    fn the_lookup_agrees_with_checking_every_network() {
        let lists: Vec<Vec<&str>> = vec![
            vec![],
            vec!["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
            vec!["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"],
            vec![
                "198.18.0.0/24",
                "198.18.1.0/24",
                "198.18.3.0/24",
                "198.18.3.0/24",
            ],
            vec!["0.0.0.0/0", "::/0"],
            vec![
                "255.255.255.255/32",
                "0.0.0.0/32",
                "::/128",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
            ],
            vec![
                "2001:db8::/32",
                "2001:db8:1::/48",
                "::ffff:0:0/96",
                "fe80::/10",
            ],
        ];
        let mut random = Addresses(0x9e37_79b9_7f4a_7c15);
        // A pod CIDR per node, in no order.
        let mut nodes: Vec<String> = (0..500)
            .map(|_| {
                let n = random.next();
                format!("10.{}.{}.0/24", (n >> 8) as u8, n as u8)
            })
            .collect();
        nodes.push("10.244.0.0/16".into());
        let lists: Vec<Vec<IpNet>> = lists
            .into_iter()
            .map(|l| l.iter().map(|n| n.parse().unwrap()).collect())
            .chain(std::iter::once(
                nodes.iter().map(|n| n.parse().unwrap()).collect(),
            ))
            .collect();
        for networks in &lists {
            let lookup = ClusterNetworks::new(networks);
            let mut probes: Vec<IpAddr> = Vec::new();
            for net in networks {
                for edge in [net.network(), net.broadcast()] {
                    probes.push(edge);
                    match edge {
                        IpAddr::V4(a) => {
                            let a = u32::from(a);
                            probes.push(Ipv4Addr::from(a.wrapping_sub(1)).into());
                            probes.push(Ipv4Addr::from(a.wrapping_add(1)).into());
                            probes.push(IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped()));
                        }
                        IpAddr::V6(a) => {
                            let a = u128::from(a);
                            probes.push(Ipv6Addr::from(a.wrapping_sub(1)).into());
                            probes.push(Ipv6Addr::from(a.wrapping_add(1)).into());
                        }
                    }
                }
            }
            for _ in 0..2000 {
                let n = random.next();
                probes.push(IpAddr::V4((n as u32).into()));
                probes.push(IpAddr::V4(
                    u32::from_be_bytes([10, (n >> 40) as u8, (n >> 48) as u8, 7]).into(),
                ));
                probes.push(IpAddr::V6(
                    (u128::from(n) << 64 | u128::from(random.next())).into(),
                ));
            }
            for ip in probes {
                assert_eq!(
                    lookup.contains(ip),
                    networks.iter().any(|net| net.contains(&ip)),
                    "{ip} in {networks:?}"
                );
            }
        }
    }

    #[test]
    fn nested_networks_merge() {
        let nets: Vec<IpNet> = [
            "198.18.3.0/24",
            "198.18.0.0/23",
            "198.18.0.128/25",
            "198.18.1.0/24",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let lookup = ClusterNetworks::new(&nets);
        let range = |a: &str, b: &str| {
            (
                u32::from(a.parse::<Ipv4Addr>().unwrap()),
                u32::from(b.parse::<Ipv4Addr>().unwrap()),
            )
        };
        assert_eq!(
            lookup.v4,
            vec![
                range("198.18.0.0", "198.18.1.255"),
                range("198.18.3.0", "198.18.3.255")
            ]
        );
    }
}
