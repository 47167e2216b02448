//! Faults on the real containers of a real node (issue 14, "What to build" 3), found through
//! the node's containerd and never through the API server (so they also work while a pod is
//! cut from it):
//!
//! - [`RealNode::kill_container`] SIGKILLs the main process (PID 1) of a pod's container, as
//!   seen from the host: the kernel then kills everything else in the container's PID
//!   namespace, and the kubelet restarts the container by the pod's `restartPolicy`.
//! - [`RealNode::pod_net`] gives the pod's network namespace (that of its sandbox, the pause
//!   process, which the CNI plugins configured) as a [`PodNet`]: the same cuts, heals and
//!   netem as on the fake kubelet's pods, from the same rules (`crate::faults`), entered with
//!   `nsenter --net=/proc/<pause pid>/ns/net`.
//!
//! containerd's CRI plugin labels its containers with the pod's name and namespace, the
//! container's name and `io.cri-containerd.kind` (`sandbox` or `container`); `ctr containers
//! ls <filter>` finds them and `ctr tasks ls` gives their host PIDs and states. A restarted
//! container is a new containerd container (the exited one stays until the kubelet removes
//! it), so only a `RUNNING` task counts.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::RealNode;
use crate::faults::{Addresses, FaultError, Netns, PodNet};
use crate::testbed::{IN_CLUSTER_API_PORT, KUBERNETES_SERVICE_IP};

const KIND_LABEL: &str = "io.cri-containerd.kind";
const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// The `ctr containers ls` filter for a pod's sandbox (`container: None`) or one of its
/// containers.
fn filter(namespace: &str, name: &str, container: Option<&str>) -> String {
    let mut terms = vec![
        format!("labels.\"{POD_NAMESPACE_LABEL}\"==\"{namespace}\""),
        format!("labels.\"{POD_NAME_LABEL}\"==\"{name}\""),
    ];
    match container {
        None => terms.push(format!("labels.\"{KIND_LABEL}\"==\"sandbox\"")),
        Some(container) => {
            terms.push(format!("labels.\"{KIND_LABEL}\"==\"container\""));
            terms.push(format!(
                "labels.\"{CONTAINER_NAME_LABEL}\"==\"{container}\""
            ));
        }
    }
    terms.join(",")
}

/// `ctr tasks ls` (`TASK PID STATUS` and a header): the PID of every running task by id.
fn running_tasks(listing: &str) -> BTreeMap<String, i32> {
    listing
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (id, pid, status) = (fields.next()?, fields.next()?, fields.next()?);
            (status == "RUNNING").then_some((id.to_owned(), pid.parse().ok()?))
        })
        .filter(|(_, pid)| *pid > 0)
        .collect()
}

/// The IPv4 address of `eth0` in `ip -4 -o addr show dev eth0` output.
fn interface_ip(listing: &str) -> Option<Ipv4Addr> {
    let mut fields = listing.split_whitespace();
    fields.find(|f| *f == "inet")?;
    fields.next()?.split('/').next()?.parse().ok()
}

impl RealNode {
    /// The host PID of the main process (PID 1 in its PID namespace) of container
    /// `container` of pod `namespace/name` on this node.
    pub fn container_pid(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<i32, FaultError> {
        self.running_task(namespace, name, Some(container))
    }

    /// SIGKILLs the main process of container `container` of pod `namespace/name` (its
    /// PID 1: the kernel kills the rest of the container with it). Returns the host PID
    /// killed. The kubelet notices the exit and restarts the container (`restartPolicy:
    /// Always`), after its crash-loop back-off once it has restarted it before.
    pub fn kill_container(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<i32, FaultError> {
        let pid = self.container_pid(namespace, name, container)?;
        let what = format!("container {container}'s PID 1");
        kill(Pid::from_raw(pid), Signal::SIGKILL).map_err(|source| FaultError::Signal {
            pod: format!("{namespace}/{name}"),
            what: what.clone(),
            pid,
            source,
        })?;
        tracing::info!(pod = %format!("{namespace}/{name}"), container, pid, "container killed (SIGKILL)");
        Ok(pid)
    }

    /// The network namespace of pod `namespace/name` on this node: that of its sandbox's
    /// process. The pod reaches the API server at the `kubernetes` Service (10.96.0.1:443),
    /// the host (and the kubelet's probes) through the node's bridge address, its gateway.
    /// Valid as long as the pod's sandbox lives (container restarts keep it; a deleted and
    /// re-created pod has a new one).
    pub fn pod_net(&self, namespace: &str, name: &str) -> Result<PodNet, FaultError> {
        let pid = self.running_task(namespace, name, None)?;
        let pod = format!("{namespace}/{name}");
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let mut show = Command::new("nsenter");
        show.arg(format!("--net={}", path.display()))
            .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        let listing = output(&pod, show)?;
        let ip = interface_ip(&listing).ok_or_else(|| FaultError::NoContainer {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            what: format!("IPv4 address on eth0 (`ip addr` said: {})", listing.trim()),
            node: self.name.clone(),
        })?;
        let gateway = Ipv4Addr::new(10, 214, self.index, 1);
        Ok(PodNet::new(
            pod,
            Netns::Path(path),
            ip,
            Addresses {
                gateway,
                api: SocketAddrV4::new(KUBERNETES_SERVICE_IP, IN_CLUSTER_API_PORT),
            },
            gateway,
        ))
    }

    /// The host PID of the running task of the pod's sandbox or of one of its containers.
    fn running_task(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
    ) -> Result<i32, FaultError> {
        let pod = format!("{namespace}/{name}");
        let mut list = self.ctr();
        list.args(["containers", "ls", "--quiet"])
            .arg(filter(namespace, name, container));
        let ids = output(&pod, list)?;
        let mut tasks = self.ctr();
        tasks.args(["tasks", "ls"]);
        let running = running_tasks(&output(&pod, tasks)?);
        ids.lines()
            .find_map(|id| running.get(id.trim()).copied())
            .ok_or_else(|| FaultError::NoContainer {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                what: container.map_or("sandbox".to_owned(), |c| format!("container {c}")),
                node: self.name.clone(),
            })
    }
}

/// Runs `command`; its stdout, or an error naming the pod.
fn output(pod: &str, mut command: Command) -> Result<String, FaultError> {
    let text = format!("{command:?}");
    let out = command.output().map_err(|source| FaultError::Spawn {
        pod: pod.to_owned(),
        command: text.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FaultError::Command {
            pod: pod.to_owned(),
            command: text,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_tasks_with_a_pid_count() {
        let listing = "TASK      PID     STATUS    \n\
                       abc       4242    RUNNING   \n\
                       def       0       STOPPED   \n\
                       ghi       4343    STOPPED   \n";
        assert_eq!(
            running_tasks(listing),
            BTreeMap::from([("abc".to_owned(), 4242)])
        );
    }

    #[test]
    fn the_filter_names_the_pod_and_the_kind() {
        assert_eq!(
            filter("db", "pg-0", Some("postgres")),
            "labels.\"io.kubernetes.pod.namespace\"==\"db\",labels.\"io.kubernetes.pod.name\"==\"pg-0\",\
             labels.\"io.cri-containerd.kind\"==\"container\",labels.\"io.kubernetes.container.name\"==\"postgres\""
        );
        assert!(
            filter("db", "pg-0", None).ends_with("labels.\"io.cri-containerd.kind\"==\"sandbox\"")
        );
    }

    #[test]
    fn the_pod_ip_from_ip_addr() {
        let listing = "2: eth0    inet 10.214.7.5/24 brd 10.214.7.255 scope global eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(interface_ip(listing), Some(Ipv4Addr::new(10, 214, 7, 5)));
        assert_eq!(interface_ip(""), None);
    }
}
