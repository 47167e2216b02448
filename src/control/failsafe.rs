//! The controller's part of the lease-store-outage failsafe: every agent is told whether the
//! failsafe is on and who the members are (name, agent URL, postgres address), whenever what it
//! reports differs. The primary's agent writes the names into the lease and asks exactly those
//! members while the store is unreachable (`coordination::failsafe`).

use std::time::Duration;

use crate::protocol::failsafe::{FailsafeMember, FailsafeMembersRequest};

use super::observe::Addresses;
use super::platform::Platform;
use super::reports::Reports;

/// How long telling one agent may take: off the failover path, far below a lease duration.
pub const MEMBERS_CALL_BOUND: Duration = Duration::from_millis(800);

/// The member list the cluster's agents should hold: every instance with a known agent and
/// postgres address. Pure.
pub fn members_request(
    enabled: bool,
    instances: &[String],
    addresses: &Addresses,
    agent_url: impl Fn(&str) -> Option<String>,
) -> FailsafeMembersRequest {
    let members = instances
        .iter()
        .filter_map(|name| {
            let (host, port) = addresses.get(name)?;
            Some(FailsafeMember {
                name: name.clone(),
                agent_url: agent_url(name)?,
                postgres_host: host.clone(),
                postgres_port: *port,
            })
        })
        .collect();
    FailsafeMembersRequest { enabled, members }
}

/// The instances whose latest report shows another member list or switch than `request`.
/// Agents without lease fencing (no `failsafe` in their status) are left alone.
pub fn out_of_date(reports: &Reports, instances: &[String], digest: &str) -> Vec<String> {
    instances
        .iter()
        .filter(|name| {
            reports
                .latest(name)
                .and_then(|r| r.status.failsafe.as_ref())
                .is_some_and(|f| f.digest != digest)
        })
        .cloned()
        .collect()
}

/// Tells every out-of-date agent, in parallel, each within [`MEMBERS_CALL_BOUND`]. Failures
/// are logged; the next round tries again.
pub async fn tell_agents<P: Platform + ?Sized>(
    platform: &P,
    targets: &[String],
    request: &FailsafeMembersRequest,
) {
    let calls = targets.iter().map(|name| async move {
        let Some(agent) = platform.agent(name) else {
            return;
        };
        match tokio::time::timeout(MEMBERS_CALL_BOUND, agent.failsafe_members(request)).await {
            Ok(Ok(_)) => {
                tracing::info!(instance = %name, enabled = request.enabled, members = request.members.len(), "failsafe members sent")
            }
            Ok(Err(error)) => {
                tracing::warn!(instance = %name, %error, "failed to send the failsafe members")
            }
            Err(_) => {
                tracing::warn!(instance = %name, bound_ms = MEMBERS_CALL_BOUND.as_millis() as u64, "sending the failsafe members timed out")
            }
        }
    });
    futures::future::join_all(calls).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses() -> Addresses {
        [("a", 5432), ("b", 5433)]
            .into_iter()
            .map(|(n, p)| (n.to_string(), ("10.0.0.1".to_string(), p)))
            .collect()
    }

    #[test]
    fn members_without_an_address_are_left_out() {
        let instances = ["a", "b", "c"].map(String::from);
        let request = members_request(true, &instances, &addresses(), |name| {
            (name != "b").then(|| format!("http://{name}:8008"))
        });
        let names: Vec<_> = request.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a"], "b has no agent URL, c no postgres address");
        assert_eq!(request.members[0].postgres_port, 5432);
    }

    #[test]
    fn the_digest_changes_with_the_switch_and_the_members() {
        let instances = ["a", "b"].map(String::from);
        let url = |name: &str| Some(format!("http://{name}:8008"));
        let on = members_request(true, &instances, &addresses(), url);
        let off = members_request(false, &instances, &addresses(), url);
        let fewer = members_request(true, &instances[..1], &addresses(), url);
        assert_ne!(on.digest(), off.digest());
        assert_ne!(on.digest(), fewer.digest());
        let mut reordered = on.clone();
        reordered.members.reverse();
        assert_eq!(on.digest(), reordered.digest(), "order does not matter");
    }
}
