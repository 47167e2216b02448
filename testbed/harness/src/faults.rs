//! Network faults and control-plane outages on the test bed (issue 13).
//!
//! Every pod already has its own network namespace (see [`crate::network`]; on a real
//! node, the one the CNI plugins set up for the pod's sandbox: `RealNode::pod_net`). This
//! module changes what that namespace lets through, from inside it, so nothing outside
//! the bed's own namespaces is ever touched. The rules themselves are pure data
//! (`faults/rules.rs`), the same for both kinds of pods:
//!
//! - [`PodNet::cut`] drops packets between the pod and a [`Peer`] (the API server as
//!   pods reach it, the host's connections to one pod port, one IP, or everyone) in a
//!   [`Direction`]; [`PodNet::heal`] removes exactly that cut, [`PodNet::heal_all`]
//!   everything this module installed in the pod.
//!   Rules live in dedicated iptables chains (`PGRS-CUT-IN`/`-OUT`, `PGRS-NETEM-IN`/`-OUT`)
//!   jumped to from `INPUT`/`OUTPUT` of the pod's namespace, so healing never touches
//!   another rule. Packets are dropped (not rejected): peers see timeouts, as in a real
//!   partition, and established connections stall rather than close.
//! - [`PodNet::netem`] adds delay and loss per direction; [`PodNet::clear_netem`] removes
//!   it. This machine's kernel has no `sch_netem`, so loss is an iptables `statistic`
//!   rule and delay an `NFQUEUE` rule whose packets a harness thread holds for the delay
//!   before accepting them (`faults/nfqueue.rs`).
//! - [`TestBed::stop_component`] / [`TestBed::start_component`] stop and start etcd or
//!   kube-apiserver while pods keep running; the restart uses the same command line
//!   (address, certificates), so clients reconnect.
//!
//! Needs root and `iptables` (`scripts/setup-debian` installs it). The methods of
//! [`PodNet`] block for a few milliseconds per `iptables` call.

mod nfqueue;
mod outage;
mod rules;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::control_plane::{ControlPlaneError, Restartable};
use crate::testbed::{IN_CLUSTER_API_PORT, TestBed};

pub use rules::Addresses;
use rules::{NETEM_IN, NETEM_OUT, POD_INTERFACE, cut_rules, hooks, with_op};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(
        "pod {namespace}/{name} has no network namespace on the fake kubelet (not started yet, or already removed)"
    )]
    NoSandbox { namespace: String, name: String },
    #[error("`{command}` is missing: install the {package} package (scripts/setup-debian does)")]
    NoCommand {
        command: &'static str,
        package: &'static str,
    },
    #[error(
        "pod {namespace}/{name} has no running {what} on real node {node} (not started yet, or already removed)"
    )]
    NoContainer {
        namespace: String,
        name: String,
        what: String,
        node: String,
    },
    #[error("pod {pod}: failed to signal {what} (host pid {pid})")]
    Signal {
        pod: String,
        what: String,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("pod {pod}: failed to run `{command}`")]
    Spawn {
        pod: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: `{command}` failed ({status}): {stderr}")]
    Command {
        pod: String,
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("pod {pod}: failed to enter network namespace {netns}")]
    Netns {
        pod: String,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: the delay queue ({direction}) failed to {step}")]
    Queue {
        pod: String,
        direction: Direction,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: loss must be a fraction in [0, 1], not {loss}")]
    BadLoss { pod: String, loss: f64 },
    #[error("failed to {action} {component}")]
    ControlPlane {
        action: &'static str,
        component: Restartable,
        #[source]
        source: ControlPlaneError,
    },
    #[error(
        "{component} did not become ready within {timeout:?} after its restart: {last_error}\n{logs}"
    )]
    NotReady {
        component: Restartable,
        timeout: Duration,
        last_error: String,
        logs: String,
    },
    #[error("{component} exited right after its restart\n{logs}")]
    Exited {
        component: Restartable,
        logs: String,
    },
    #[error("the test bed is shut down")]
    ShutDown,
    #[error("the test bed's task to {action} failed: {message}")]
    Join {
        action: &'static str,
        message: String,
    },
}

/// Who a cut separates the pod from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The API server as pods reach it: TCP to `<gateway>:443` (the harness's proxy) on
    /// the fake kubelet, to the `kubernetes` Service `10.96.0.1:443` on a real node.
    /// The kubelet's probes still pass.
    ApiServer,
    /// The host's processes that dial this port of the pod: TCP between the gateway and
    /// the pod's port (e.g. an operator on the host reaching an agent). The kubelet's
    /// probes of the same port still pass: they come from [`PodNet::probe_source`].
    HostPort(u16),
    /// One address: another pod's IP, or the gateway (= the host: the API proxy and any
    /// process on the host, but not the kubelet's probes, which come from
    /// [`PodNet::probe_source`]).
    Ip(Ipv4Addr),
    /// Every packet on the pod's `eth0` (the pod's own loopback keeps working).
    Everyone,
}

/// Which packets of the pod a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets arriving at the pod.
    Inbound,
    /// Packets the pod sends.
    Outbound,
    /// Both.
    Both,
}

impl Direction {
    fn single(self) -> &'static [Direction] {
        match self {
            Direction::Inbound => &[Direction::Inbound],
            Direction::Outbound => &[Direction::Outbound],
            Direction::Both => &[Direction::Inbound, Direction::Outbound],
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Both => "both directions",
        })
    }
}

/// Delay and loss for [`PodNet::netem`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Netem {
    /// Added to every packet in the direction (one way).
    pub delay: Duration,
    /// Fraction of packets dropped at random, in `[0, 1]`.
    pub loss: f64,
}

/// How to reach a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// A name under `/run/netns` (the fake kubelet's pods): `ip netns exec <name>`.
    Named(String),
    /// A namespace file, e.g. `/proc/<pid>/ns/net` of a real pod's sandbox (pause)
    /// process: `nsenter --net=<path>`.
    Path(PathBuf),
}

impl Netns {
    fn path(&self) -> PathBuf {
        match self {
            Netns::Named(name) => PathBuf::from("/run/netns").join(name),
            Netns::Path(path) => path.clone(),
        }
    }

    /// A registry key (for the delay queues).
    fn key(&self) -> String {
        self.path().display().to_string()
    }
}

/// The network namespace of one pod: a fake-kubelet pod ([`TestBed::pod_net`]) or a real
/// container's pod on a real node (`RealNode::pod_net`). Cheap to clone; holds no resources
/// (delay queues live in a registry of this module until [`PodNet::clear_netem`] or
/// [`PodNet::heal_all`]).
#[derive(Debug, Clone)]
pub struct PodNet {
    /// `namespace/name`, for messages.
    pod: String,
    netns: Netns,
    ip: Ipv4Addr,
    addresses: Addresses,
    probe_source: Ipv4Addr,
}

impl TestBed {
    /// The network namespace of pod `namespace/name` (running on this bed's kubelet).
    /// Needs no API call, so it also works during an API-server outage.
    pub fn pod_net(&self, namespace: &str, name: &str) -> Result<PodNet, FaultError> {
        let sandbox =
            self.kubelet()
                .pod_sandbox(namespace, name)
                .ok_or_else(|| FaultError::NoSandbox {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })?;
        Ok(PodNet {
            pod: format!("{namespace}/{name}"),
            netns: Netns::Named(sandbox.interface.netns.clone()),
            ip: sandbox.interface.ip,
            addresses: Addresses {
                gateway: self.gateway(),
                api: SocketAddrV4::new(self.gateway(), IN_CLUSTER_API_PORT),
            },
            probe_source: self.kubelet().network().probe_source(),
        })
    }
}

impl PodNet {
    /// A pod's namespace from its parts (`RealNode::pod_net` uses it; the fake kubelet's
    /// pods come from [`TestBed::pod_net`]). `probe_source`: where the kubelet's probes of
    /// the pod come from.
    pub fn new(
        pod: String,
        netns: Netns,
        ip: Ipv4Addr,
        addresses: Addresses,
        probe_source: Ipv4Addr,
    ) -> PodNet {
        PodNet {
            pod,
            netns,
            ip,
            addresses,
            probe_source,
        }
    }

    /// `namespace/name`.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// The pod IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The network namespace's name under `/run/netns` (for `ip netns exec`) on the fake
    /// kubelet; on a real node, the path of the namespace file (for `nsenter --net=`).
    pub fn netns(&self) -> &str {
        match &self.netns {
            Netns::Named(name) => name,
            Netns::Path(path) => path.to_str().unwrap_or_default(),
        }
    }

    /// Where the kubelet's probes of the pod come from. The fake kubelet's: not the
    /// gateway, so that cutting the host (`Peer::Ip(gateway)`, `Peer::HostPort`) leaves
    /// them alone. A real node's kubelet probes from the node's IP, which is the gateway:
    /// there a cut of the host cuts the probes too. `Peer::Ip(probe_source)` cuts the probes.
    pub fn probe_source(&self) -> Ipv4Addr {
        self.probe_source
    }

    /// The address the pod dials for the API server (`KUBERNETES_SERVICE_HOST:PORT`).
    pub fn api_address(&self) -> SocketAddr {
        SocketAddr::V4(self.addresses.api)
    }

    /// Drops the packets between this pod and `peer` in `direction`. Idempotent.
    pub fn cut(&self, peer: Peer, direction: Direction) -> Result<(), FaultError> {
        self.ensure_chains()?;
        for rule in cut_rules(&self.addresses, peer, direction) {
            if !self.rule_exists(&rule)? {
                self.iptables(&with_op("-A", &rule))?;
            }
        }
        tracing::info!(pod = %self.pod, ?peer, %direction, "network cut");
        Ok(())
    }

    /// Removes exactly the rules `cut(peer, direction)` installs. Healing a cut that is
    /// not there is not an error (so `Both` heals a one-direction cut too).
    pub fn heal(&self, peer: Peer, direction: Direction) -> Result<(), FaultError> {
        for rule in cut_rules(&self.addresses, peer, direction) {
            if self.rule_exists(&rule)? {
                self.iptables(&with_op("-D", &rule))?;
            }
        }
        tracing::info!(pod = %self.pod, ?peer, %direction, "network cut healed");
        Ok(())
    }

    /// Delay and loss in `direction` (replacing any earlier setting there). A zero
    /// `Netem` is the same as [`PodNet::clear_netem`] for that direction.
    pub fn netem(&self, direction: Direction, netem: Netem) -> Result<(), FaultError> {
        if !(0.0..=1.0).contains(&netem.loss) {
            return Err(FaultError::BadLoss {
                pod: self.pod.clone(),
                loss: netem.loss,
            });
        }
        self.ensure_chains()?;
        for &single in direction.single() {
            self.clear_netem_one(single)?;
            let (chain, interface_flag, queue) = match single {
                Direction::Inbound => (NETEM_IN, "-i", nfqueue::QUEUE_INBOUND),
                _ => (NETEM_OUT, "-o", nfqueue::QUEUE_OUTBOUND),
            };
            if netem.loss > 0.0 {
                let probability = format!("{:.6}", netem.loss);
                self.iptables(&[
                    "-A",
                    chain,
                    interface_flag,
                    POD_INTERFACE,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ])?;
            }
            if !netem.delay.is_zero() {
                // The queue must be bound before packets go to it, or they are dropped.
                let worker = nfqueue::DelayWorker::start(
                    &self.pod,
                    &self.netns_path(),
                    single,
                    queue,
                    netem.delay,
                )?;
                workers().insert((self.netns.key(), single), worker);
                let queue = queue.to_string();
                self.iptables(&[
                    "-A",
                    chain,
                    interface_flag,
                    POD_INTERFACE,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue,
                ])?;
            }
        }
        tracing::info!(pod = %self.pod, %direction, ?netem, "netem set");
        Ok(())
    }

    /// Removes delay and loss in both directions.
    pub fn clear_netem(&self) -> Result<(), FaultError> {
        self.clear_netem_one(Direction::Inbound)?;
        self.clear_netem_one(Direction::Outbound)
    }

    fn clear_netem_one(&self, direction: Direction) -> Result<(), FaultError> {
        let chain = match direction {
            Direction::Inbound => NETEM_IN,
            _ => NETEM_OUT,
        };
        if self.chain_exists(chain)? {
            self.iptables(&["-F", chain])?;
        }
        // After the rule is gone no packet enters the queue; then release it.
        drop(workers().remove(&(self.netns.key(), direction)));
        Ok(())
    }

    /// Removes everything this module installed in the pod: all cuts, delay and loss,
    /// the chains and the jumps to them. The pod's network is as the kubelet made it.
    pub fn heal_all(&self) -> Result<(), FaultError> {
        self.clear_netem()?;
        for (hook, chain) in hooks() {
            if self.iptables_ok(&["-C", hook, "-j", chain])? {
                self.iptables(&["-D", hook, "-j", chain])?;
            }
            if self.chain_exists(chain)? {
                self.iptables(&["-F", chain])?;
                self.iptables(&["-X", chain])?;
            }
        }
        tracing::info!(pod = %self.pod, "all network faults healed");
        Ok(())
    }

    /// Runs `f` on a fresh thread inside the pod's network namespace: sockets it
    /// creates belong to the pod's network (they keep working after `f` returns and
    /// may be moved anywhere).
    pub fn run_inside<T, F>(&self, f: F) -> Result<T, FaultError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = self.netns_path();
        let netns_error = |source| FaultError::Netns {
            pod: self.pod.clone(),
            netns: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(netns_error)?;
        let thread = std::thread::spawn(move || -> std::io::Result<T> {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an fd we own; it affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        thread
            .join()
            .map_err(|_| netns_error(std::io::Error::other("the thread panicked")))?
            .map_err(netns_error)
    }

    /// A TCP connect from inside the pod to `address`: the time it took, or the error
    /// (a timeout when a cut drops the packets). For tests proving a fault.
    pub fn tcp_connect(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<std::io::Result<Duration>, FaultError> {
        self.run_inside(move || {
            let started = Instant::now();
            TcpStream::connect_timeout(&address, timeout).map(|_| started.elapsed())
        })
    }

    fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// Creates our chains and jumps (cuts before netem) unless they exist.
    fn ensure_chains(&self) -> Result<(), FaultError> {
        let mut position = HashMap::from([("INPUT", 1), ("OUTPUT", 1)]);
        for (hook, chain) in hooks() {
            if !self.chain_exists(chain)? {
                self.iptables(&["-N", chain])?;
            }
            let at = position.entry(hook).or_insert(1);
            if !self.iptables_ok(&["-C", hook, "-j", chain])? {
                self.iptables(&["-I", hook, &at.to_string(), "-j", chain])?;
            }
            *at += 1;
        }
        Ok(())
    }

    fn rule_exists(&self, rule: &[String]) -> Result<bool, FaultError> {
        let args = with_op("-C", rule);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.iptables_ok(&args)
    }

    fn chain_exists(&self, chain: &str) -> Result<bool, FaultError> {
        self.iptables_ok(&["-S", chain])
    }

    /// `iptables args` in the pod's namespace; an error when it fails.
    fn iptables<S: AsRef<str>>(&self, args: &[S]) -> Result<(), FaultError> {
        let (command, out) = self.run_iptables(args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FaultError::Command {
                pod: self.pod.clone(),
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// `iptables args` in the pod's namespace; whether it succeeded (for `-C`/`-S`).
    fn iptables_ok(&self, args: &[&str]) -> Result<bool, FaultError> {
        Ok(self.run_iptables(args)?.1.status.success())
    }

    fn run_iptables<S: AsRef<str>>(
        &self,
        args: &[S],
    ) -> Result<(String, std::process::Output), FaultError> {
        let iptables = find_command("iptables", "iptables")?;
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let (mut enter, prefix) = match &self.netns {
            Netns::Named(name) => {
                let mut enter = Command::new(find_command("ip", "iproute2")?);
                enter.args(["netns", "exec", name]);
                (enter, format!("ip netns exec {name}"))
            }
            Netns::Path(path) => {
                let mut enter = Command::new(find_command("nsenter", "util-linux")?);
                enter.arg(format!("--net={}", path.display()));
                (enter, format!("nsenter --net={}", path.display()))
            }
        };
        let command = format!("{prefix} iptables -w {}", args.join(" "));
        let out = enter
            .arg(iptables)
            .arg("-w")
            .args(&args)
            .output()
            .map_err(|source| FaultError::Spawn {
                pod: self.pod.clone(),
                command: command.clone(),
                source,
            })?;
        Ok((command, out))
    }
}

/// Delay queues by (network namespace, single direction).
fn workers() -> std::sync::MutexGuard<'static, HashMap<(String, Direction), nfqueue::DelayWorker>> {
    static WORKERS: OnceLock<Mutex<HashMap<(String, Direction), nfqueue::DelayWorker>>> =
        OnceLock::new();
    let workers = WORKERS.get_or_init(Default::default);
    // A poisoned registry still holds valid workers.
    workers.lock().unwrap_or_else(|e| e.into_inner())
}

fn find_command(command: &'static str, package: &'static str) -> Result<PathBuf, FaultError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
        .ok_or(FaultError::NoCommand { command, package })
}

impl TestBed {
    /// Stops etcd or kube-apiserver (SIGTERM, up to 1 s, SIGKILL) while everything else
    /// — pods, the kubelet, the other components — keeps running. Idempotent. While
    /// kube-apiserver is down, connections to its loopback port are refused; pods'
    /// connections to `<gateway>:443` are accepted by the harness's proxy and closed at
    /// once.
    pub async fn stop_component(&self, component: Restartable) -> Result<(), FaultError> {
        outage::stop(self, component).await
    }

    /// Starts a stopped etcd or kube-apiserver again with its original command line
    /// (same address, data, certificates), and waits until it serves: etcd's `/health`,
    /// then kube-apiserver's `/readyz`.
    pub async fn start_component(&self, component: Restartable) -> Result<(), FaultError> {
        outage::start(self, component).await
    }
}
