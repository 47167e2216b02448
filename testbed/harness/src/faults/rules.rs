//! The iptables rules of the network faults, as data: no IO here. Both kinds of pods use
//! them — the fake kubelet's (`TestBed::pod_net`) and real containers on a real node
//! (`RealNode::pod_net`) — only the addresses differ ([`Addresses`]) and how `iptables` gets
//! into the namespace (`super::Netns`).

use std::net::SocketAddrV4;

use super::{Direction, Peer};

pub(super) const CUT_IN: &str = "PGRS-CUT-IN";
pub(super) const CUT_OUT: &str = "PGRS-CUT-OUT";
pub(super) const NETEM_IN: &str = "PGRS-NETEM-IN";
pub(super) const NETEM_OUT: &str = "PGRS-NETEM-OUT";
/// The pod's interface on its bridge (the fake kubelet's veth and the CNI bridge plugin's
/// both use this name).
pub(super) const POD_INTERFACE: &str = "eth0";

/// What a pod's cuts are about, as seen from inside the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The host as the pod sees it: its default gateway (the bridge's address). The host's
    /// connections to the pod come from it.
    pub gateway: std::net::Ipv4Addr,
    /// Where the pod dials the API server: the fake kubelet's `<gateway>:443` proxy, or on a
    /// real node the `kubernetes` Service's ClusterIP `10.96.0.1:443` (DNATed on the host,
    /// so inside the pod both directions carry this address).
    pub api: SocketAddrV4,
}

/// Our chains and the hook each is jumped to from, in order: cuts first, since a packet a
/// delay queue accepts skips the rest of the hook.
pub(super) fn hooks() -> [(&'static str, &'static str); 4] {
    [
        ("INPUT", CUT_IN),
        ("OUTPUT", CUT_OUT),
        ("INPUT", NETEM_IN),
        ("OUTPUT", NETEM_OUT),
    ]
}

/// The rule specifications (chain first) of a cut of the pod from `peer` in `direction`.
pub(super) fn cut_rules(
    addresses: &Addresses,
    peer: Peer,
    direction: Direction,
) -> Vec<Vec<String>> {
    let gateway = format!("{}/32", addresses.gateway);
    let api = format!("{}/32", addresses.api.ip());
    let api_port = addresses.api.port().to_string();
    direction
        .single()
        .iter()
        .map(|single| {
            let inbound = *single == Direction::Inbound;
            let (chain, addr_flag, port_flag, if_flag) = if inbound {
                (CUT_IN, "-s", "--sport", "-i")
            } else {
                (CUT_OUT, "-d", "--dport", "-o")
            };
            let mut rule = vec![chain.to_owned()];
            let tcp = |address: &str, port_flag: &str, port: String| {
                [
                    addr_flag.to_owned(),
                    address.to_owned(),
                    "-p".to_owned(),
                    "tcp".to_owned(),
                    "-m".to_owned(),
                    "tcp".to_owned(),
                    port_flag.to_owned(),
                    port,
                ]
            };
            match peer {
                Peer::ApiServer => rule.extend(tcp(&api, port_flag, api_port.clone())),
                // The pod serves the port: its own side of the connection is the port.
                Peer::HostPort(port) => rule.extend(tcp(
                    &gateway,
                    if inbound { "--dport" } else { "--sport" },
                    port.to_string(),
                )),
                Peer::Ip(ip) => rule.extend([addr_flag.to_owned(), format!("{ip}/32")]),
                Peer::Everyone => rule.extend([if_flag.to_owned(), POD_INTERFACE.to_owned()]),
            }
            rule.extend(["-j".to_owned(), "DROP".to_owned()]);
            rule
        })
        .collect()
}

/// `op` (`-A`, `-C`, `-D`) followed by a rule specification.
pub(super) fn with_op(op: &str, rule: &[String]) -> Vec<String> {
    std::iter::once(op.to_owned())
        .chain(rule.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn real_node() -> Addresses {
        Addresses {
            gateway: Ipv4Addr::new(10, 214, 7, 1),
            api: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443),
        }
    }

    fn joined(rules: Vec<Vec<String>>) -> Vec<String> {
        rules.into_iter().map(|r| r.join(" ")).collect()
    }

    #[test]
    fn the_api_server_cut_names_the_address_the_pod_dials() {
        assert_eq!(
            joined(cut_rules(&real_node(), Peer::ApiServer, Direction::Both)),
            [
                "PGRS-CUT-IN -s 10.96.0.1/32 -p tcp -m tcp --sport 443 -j DROP",
                "PGRS-CUT-OUT -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j DROP",
            ]
        );
    }

    #[test]
    fn a_host_port_cut_is_the_pods_own_port_from_the_gateway() {
        assert_eq!(
            joined(cut_rules(
                &real_node(),
                Peer::HostPort(8008),
                Direction::Outbound
            )),
            ["PGRS-CUT-OUT -d 10.214.7.1/32 -p tcp -m tcp --sport 8008 -j DROP"]
        );
    }

    #[test]
    fn everyone_and_one_ip() {
        assert_eq!(
            joined(cut_rules(&real_node(), Peer::Everyone, Direction::Both)),
            [
                "PGRS-CUT-IN -i eth0 -j DROP",
                "PGRS-CUT-OUT -o eth0 -j DROP"
            ]
        );
        assert_eq!(
            joined(cut_rules(
                &real_node(),
                Peer::Ip(Ipv4Addr::new(10, 214, 7, 9)),
                Direction::Inbound
            )),
            ["PGRS-CUT-IN -s 10.214.7.9/32 -j DROP"]
        );
    }
}
