//! Pod networking: one Linux bridge per control plane with a /24 from 10.213.0.0/16,
//! and per pod a network namespace joined to it by a veth pair.
//!
//! The bridge's address (10.213.X.1) is the pods' gateway; the host reaches every pod
//! IP through the bridge, and pods reach each other and the gateway. Nothing is routed
//! further: only our own namespaces are ever dialled. A second bridge address,
//! 10.213.X.254, is never a pod's: the fake kubelet's probes come from it, so that a
//! network fault can tell them from the host's other processes (see
//! [`PodNetwork::probe_source`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Directory of the lock files that hand out the /24s between concurrent test beds.
const LOCK_DIR: &str = "/run/pgrs-testbed";
/// Host part of [`PodNetwork::probe_source`]; never handed to a pod.
const PROBE_HOST_PART: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "failed to find the `ip` command (install iproute2): the fake kubelet needs it for pod network namespaces"
    )]
    NoIpCommand,
    #[error("the fake kubelet must run as root to create network namespaces (euid is {euid})")]
    NotRoot { euid: u32 },
    #[error("failed to prepare the lock directory {path}")]
    LockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to find a free pod subnet: all of 10.213.0.0/24 .. 10.213.255.0/24 are in use")]
    NoSubnet,
    #[error("failed to run `ip {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("failed to allocate a pod IP: all 252 pod addresses of {subnet}/24 are in use")]
    NoAddress { subnet: Ipv4Addr },
}

/// The network pods of one test bed live in.
#[derive(Debug)]
pub struct PodNetwork {
    index: u8,
    bridge: String,
    free_hosts: Mutex<BTreeSet<u8>>,
    _lock: File,
}

/// A pod's network namespace and address.
#[derive(Debug, Clone)]
pub struct PodInterface {
    /// Name under /run/netns.
    pub netns: String,
    pub ip: Ipv4Addr,
    host_part: u8,
}

impl PodInterface {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

impl PodNetwork {
    /// Claims a free 10.213.X.0/24 (a flock per X, released when the process dies, so
    /// concurrent test binaries never share one), removes what a crashed previous owner
    /// left behind, and creates the bridge.
    pub fn create() -> Result<Self, NetworkError> {
        if which_ip().is_none() {
            return Err(NetworkError::NoIpCommand);
        }
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            return Err(NetworkError::NotRoot { euid });
        }
        std::fs::create_dir_all(LOCK_DIR).map_err(|source| NetworkError::LockDir {
            path: LOCK_DIR.into(),
            source,
        })?;
        let start = std::process::id() % 256;
        for offset in 0..256u32 {
            let index = u8::try_from((start + offset) % 256).unwrap_or(0);
            let path = Path::new(LOCK_DIR).join(format!("net-{index}.lock"));
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| NetworkError::LockDir {
                    path: path.clone(),
                    source,
                })?;
            // SAFETY: flock on an fd we own.
            let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked != 0 {
                continue;
            }
            let network = Self {
                index,
                bridge: format!("pgrsbr{index}"),
                free_hosts: Mutex::new((2..PROBE_HOST_PART).collect()),
                _lock: lock,
            };
            network.remove_leftovers();
            let gateway = format!("{}/24", network.gateway());
            ip(&["link", "add", &network.bridge, "type", "bridge"])?;
            ip(&["addr", "add", &gateway, "dev", &network.bridge])?;
            // /32: no route of its own; the subnet's route keeps the gateway as source.
            let probe_source = format!("{}/32", network.probe_source());
            ip(&["addr", "add", &probe_source, "dev", &network.bridge])?;
            ip(&["link", "set", &network.bridge, "up"])?;
            tracing::info!(bridge = %network.bridge, %gateway, "pod network ready");
            return Ok(network);
        }
        Err(NetworkError::NoSubnet)
    }

    /// The bridge address: the pods' default gateway, reachable from every pod.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 1)
    }

    /// The source address of the fake kubelet's probes (10.213.X.254, on the bridge too).
    /// Every other host process — the API proxy, an operator or a test on the host —
    /// reaches pods from the gateway, as in a real cluster where the kubelet probes from
    /// the node and controllers run elsewhere; so a fault on the gateway's traffic to a
    /// pod port leaves the probes of that port alone. It lies in the pods' /24, so they
    /// answer it directly over the bridge.
    pub fn probe_source(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, PROBE_HOST_PART)
    }

    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 0)
    }

    /// A new network namespace with its own IP on the bridge.
    pub fn add_pod(&self) -> Result<PodInterface, NetworkError> {
        let host_part = self
            .free_hosts
            .lock()
            .map_err(|_| NetworkError::NoAddress {
                subnet: self.subnet(),
            })?
            .pop_first()
            .ok_or(NetworkError::NoAddress {
                subnet: self.subnet(),
            })?;
        let iface = PodInterface {
            netns: format!("pgrs-{}-{}", self.index, host_part),
            ip: Ipv4Addr::new(10, 213, self.index, host_part),
            host_part,
        };
        if let Err(e) = self.configure(&iface) {
            self.remove_pod(&iface);
            return Err(e);
        }
        Ok(iface)
    }

    fn configure(&self, iface: &PodInterface) -> Result<(), NetworkError> {
        let ns = iface.netns.as_str();
        let host_end = format!("pgrs{}v{}", self.index, iface.host_part);
        let pod_end = format!("pgrs{}p{}", self.index, iface.host_part);
        let address = format!("{}/24", iface.ip);
        let gateway = self.gateway().to_string();
        // A namespace left by an earlier pod with the same address would make `add` fail.
        let _ = ip(&["netns", "del", ns]);
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &pod_end,
        ])?;
        ip(&["link", "set", &pod_end, "netns", ns])?;
        ip(&["link", "set", &host_end, "master", &self.bridge, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", &pod_end, "name", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
        Ok(())
    }

    /// Deletes the namespace (which deletes its veth pair) and frees the address.
    pub fn remove_pod(&self, iface: &PodInterface) {
        if let Err(e) = ip(&["netns", "del", &iface.netns]) {
            tracing::warn!(netns = %iface.netns, error = %e, "failed to delete pod network namespace");
        }
        if let Ok(mut free) = self.free_hosts.lock() {
            free.insert(iface.host_part);
        }
    }

    /// Removes every pod namespace of this subnet and the bridge.
    pub fn destroy(&self) {
        self.remove_leftovers();
    }

    fn remove_leftovers(&self) {
        let prefix = format!("pgrs-{}-", self.index);
        if let Ok(list) = ip_output(&["netns", "list"]) {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if name.starts_with(&prefix) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn which_ip() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("ip"))
        .find(|p| p.is_file())
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    ip_output(args).map(|_| ())
}

fn ip_output(args: &[&str]) -> Result<String, NetworkError> {
    let program = which_ip().ok_or(NetworkError::NoIpCommand)?;
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetworkError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(NetworkError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
