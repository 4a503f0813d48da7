//! Where an address lies relative to the cluster: decisions shared by the correlation
//! core (records) and the agent (metrics), so both say the same thing.
use std::net::IpAddr;

use ipnet::IpNet;

/// A DNS server outside the cluster networks, other than the node's own (loopback) and a
/// node-local cache (link-local, e.g. 169.254.20.10): a pod that asks it bypasses cluster
/// DNS and its policies.
pub fn dns_server_outside(server: IpAddr, cluster_networks: &[IpNet]) -> bool {
    let node_local = match server {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    };
    !node_local && !cluster_networks.iter().any(|net| net.contains(&server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_from_outside_the_cluster_networks_but_not_from_the_node() {
        let cluster: Vec<IpNet> = vec!["198.18.0.0/15".parse().unwrap()];
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
            assert_eq!(
                dns_server_outside(server.parse().unwrap(), &cluster),
                outside,
                "{server}"
            );
        }
    }
}
