//! The `kubernetes` Service from a real node's pods. The kubelet gives every pod
//! `KUBERNETES_SERVICE_HOST=10.96.0.1` and `_PORT=443` (the Service's ClusterIP); nothing routes
//! a ClusterIP here (no kube-proxy), so one iptables rule per node DNATs 10.96.0.1:443 arriving
//! from the node's bridge to the bed's API proxy on the fake kubelet's gateway (10.213.X.1:443,
//! which forwards to the API server's loopback port). The serving certificate has 10.96.0.1
//! (`crate::testbed::KUBERNETES_SERVICE_IP`), so in-cluster clients verify it as usual.

use std::net::Ipv4Addr;
use std::process::Command;

use super::{NodeError, run};

/// The rule's arguments after `iptables -t nat -A|-D`.
fn rule(bridge: &str, service: (Ipv4Addr, u16), proxy: (Ipv4Addr, u16)) -> Vec<String> {
    vec![
        "PREROUTING".to_owned(),
        "--in-interface".to_owned(),
        bridge.to_owned(),
        "--destination".to_owned(),
        format!("{}/32", service.0),
        "--protocol".to_owned(),
        "tcp".to_owned(),
        "--dport".to_owned(),
        service.1.to_string(),
        "--match".to_owned(),
        "comment".to_owned(),
        "--comment".to_owned(),
        format!("pgrs-testbed {bridge}: the kubernetes Service"),
        "--jump".to_owned(),
        "DNAT".to_owned(),
        "--to-destination".to_owned(),
        format!("{}:{}", proxy.0, proxy.1),
    ]
}

/// A DNAT rule, removed by [`ServiceRoute::remove`].
#[derive(Debug)]
pub struct ServiceRoute {
    args: Vec<String>,
}

impl ServiceRoute {
    /// Adds the rule (after deleting copies a crashed run left for the same bridge).
    pub fn add(
        bridge: &str,
        service: (Ipv4Addr, u16),
        proxy: (Ipv4Addr, u16),
    ) -> Result<Self, NodeError> {
        let route = Self {
            args: rule(bridge, service, proxy),
        };
        route.remove();
        let mut add = Command::new("iptables");
        add.args(["-t", "nat", "-A"]).args(&route.args);
        run(add)?;
        Ok(route)
    }

    /// Deletes every copy of the rule. Idempotent.
    pub fn remove(&self) {
        for _ in 0..8 {
            let deleted = Command::new("iptables")
                .args(["-t", "nat", "-D"])
                .args(&self.args)
                .output()
                .is_ok_and(|o| o.status.success());
            if !deleted {
                break;
            }
        }
    }
}
