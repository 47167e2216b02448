//! Network faults and control-plane outages on the test bed (issue 13).
//!
//! Every pod already has its own network namespace (see [`crate::network`]). This
//! module changes what that namespace lets through, from inside it, so nothing outside
//! the bed's own namespaces is ever touched:
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

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::control_plane::{ControlPlaneError, Restartable};
use crate::testbed::{IN_CLUSTER_API_PORT, TestBed};

const CUT_IN: &str = "PGRS-CUT-IN";
const CUT_OUT: &str = "PGRS-CUT-OUT";
const NETEM_IN: &str = "PGRS-NETEM-IN";
const NETEM_OUT: &str = "PGRS-NETEM-OUT";
/// The pod's interface on the bridge (see `network.rs`).
const POD_INTERFACE: &str = "eth0";

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
    /// The API server as pods reach it: TCP to `<gateway>:443` (the harness's proxy).
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

/// The network namespace of one pod, found through the fake kubelet's bookkeeping.
/// Cheap to clone; holds no resources (delay queues live in a registry of this module
/// until [`PodNet::clear_netem`] or [`PodNet::heal_all`]).
#[derive(Debug, Clone)]
pub struct PodNet {
    /// `namespace/name`, for messages.
    pod: String,
    netns: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
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
            netns: sandbox.interface.netns.clone(),
            ip: sandbox.interface.ip,
            gateway: self.gateway(),
            probe_source: self.kubelet().network().probe_source(),
        })
    }
}

impl PodNet {
    /// `namespace/name`.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// The pod IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The network namespace's name under `/run/netns` (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Where the fake kubelet's probes of the pod come from: not the gateway, so that
    /// cutting the host (`Peer::Ip(gateway)`, `Peer::HostPort`) leaves them alone.
    /// `Peer::Ip(probe_source)` cuts the probes.
    pub fn probe_source(&self) -> Ipv4Addr {
        self.probe_source
    }

    /// The address the pod dials for the API server (`KUBERNETES_SERVICE_HOST:PORT`).
    pub fn api_address(&self) -> SocketAddr {
        SocketAddr::from((self.gateway, IN_CLUSTER_API_PORT))
    }

    /// Drops the packets between this pod and `peer` in `direction`. Idempotent.
    pub fn cut(&self, peer: Peer, direction: Direction) -> Result<(), FaultError> {
        self.ensure_chains()?;
        for rule in self.cut_rules(peer, direction) {
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
        for rule in self.cut_rules(peer, direction) {
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
                workers().insert((self.netns.clone(), single), worker);
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
        drop(workers().remove(&(self.netns.clone(), direction)));
        Ok(())
    }

    /// Removes everything this module installed in the pod: all cuts, delay and loss,
    /// the chains and the jumps to them. The pod's network is as the kubelet made it.
    pub fn heal_all(&self) -> Result<(), FaultError> {
        self.clear_netem()?;
        for (hook, chain) in Self::hooks() {
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
        PathBuf::from("/run/netns").join(&self.netns)
    }

    fn hooks() -> [(&'static str, &'static str); 4] {
        // Cuts first: a packet a delay queue accepts skips the rest of the hook.
        [
            ("INPUT", CUT_IN),
            ("OUTPUT", CUT_OUT),
            ("INPUT", NETEM_IN),
            ("OUTPUT", NETEM_OUT),
        ]
    }

    /// Creates our chains and jumps (cuts before netem) unless they exist.
    fn ensure_chains(&self) -> Result<(), FaultError> {
        let mut position = HashMap::from([("INPUT", 1), ("OUTPUT", 1)]);
        for (hook, chain) in Self::hooks() {
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

    /// The rule specifications (chain first) of a cut.
    fn cut_rules(&self, peer: Peer, direction: Direction) -> Vec<Vec<String>> {
        let gateway = format!("{}/32", self.gateway);
        let api_port = IN_CLUSTER_API_PORT.to_string();
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
                match peer {
                    Peer::ApiServer => rule.extend([
                        addr_flag.to_owned(),
                        gateway.clone(),
                        "-p".to_owned(),
                        "tcp".to_owned(),
                        "-m".to_owned(),
                        "tcp".to_owned(),
                        port_flag.to_owned(),
                        api_port.clone(),
                    ]),
                    // The pod serves the port: its own side of the connection is the port.
                    Peer::HostPort(port) => rule.extend([
                        addr_flag.to_owned(),
                        gateway.clone(),
                        "-p".to_owned(),
                        "tcp".to_owned(),
                        "-m".to_owned(),
                        "tcp".to_owned(),
                        if inbound { "--dport" } else { "--sport" }.to_owned(),
                        port.to_string(),
                    ]),
                    Peer::Ip(ip) => rule.extend([addr_flag.to_owned(), format!("{ip}/32")]),
                    Peer::Everyone => rule.extend([if_flag.to_owned(), POD_INTERFACE.to_owned()]),
                }
                rule.extend(["-j".to_owned(), "DROP".to_owned()]);
                rule
            })
            .collect()
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
        let ip = find_command("ip", "iproute2")?;
        let iptables = find_command("iptables", "iptables")?;
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let command = format!(
            "ip netns exec {} iptables -w {}",
            self.netns,
            args.join(" ")
        );
        let out = Command::new(ip)
            .args(["netns", "exec", &self.netns])
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

/// `op` (`-A`, `-C`, `-D`) followed by a rule specification.
fn with_op(op: &str, rule: &[String]) -> Vec<String> {
    std::iter::once(op.to_owned())
        .chain(rule.iter().cloned())
        .collect()
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
