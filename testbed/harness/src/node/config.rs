//! The node's files: containerd's config.toml, the CNI network, the KubeletConfiguration.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::NodeBinaries;

/// Everything lives under the node's directory: nothing in /var/lib, /etc or /opt.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub logs: PathBuf,
    pub containerd_root: PathBuf,
    pub containerd_state: PathBuf,
    pub containerd_config: PathBuf,
    pub containerd_socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_ipam_dir: PathBuf,
    pub kubelet_root: PathBuf,
    pub kubelet_config: PathBuf,
    pub pod_logs: PathBuf,
    dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Self {
            logs: dir.join("logs"),
            containerd_root: dir.join("containerd/root"),
            containerd_state: dir.join("containerd/state"),
            containerd_config: dir.join("containerd/config.toml"),
            // Short: a unix socket path has at most 107 bytes.
            containerd_socket: dir.join("containerd.sock"),
            cni_conf_dir: dir.join("cni/net.d"),
            cni_ipam_dir: dir.join("cni/ipam"),
            kubelet_root: dir.join("kubelet"),
            kubelet_config: dir.join("kubelet.yaml"),
            pod_logs: dir.join("pod-logs"),
            dir: dir.to_owned(),
        }
    }

    pub fn dirs(&self) -> Vec<PathBuf> {
        vec![
            self.logs.clone(),
            self.containerd_root.clone(),
            self.containerd_state.clone(),
            self.dir.join("containerd/tmp"),
            self.dir.join("containerd/opt"),
            self.cni_conf_dir.clone(),
            self.cni_ipam_dir.clone(),
            self.kubelet_root.clone(),
            self.dir.join("kubelet-volume-plugins"),
            self.pod_logs.clone(),
        ]
    }
}

/// containerd (config version 3, containerd 2.x): its own root, state and socket; runc with
/// cgroupfs and its state under the node's directory; our CNI plugins and network; the
/// locally built sandbox image; no NRI, no AppArmor (the host has none), network namespaces
/// under its state dir. `restrict_oom_score_adj`: this machine's root lacks
/// CAP_SYS_RESOURCE, so the sandbox's oom_score_adj -998 fails in runc ("failed to update
/// /proc/self/oom_score_adj: Permission denied", reported by the kubelet as "can't get final
/// child's PID from pipe: EOF"); restricted, no container goes below containerd's own.
pub(super) fn containerd(paths: &Paths, binaries: &NodeBinaries, sandbox_image: &str) -> String {
    let socket = paths.containerd_socket.display();
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"
temp = "{dir}/containerd/tmp"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{dir}/containerd/opt"

[plugins.'io.containerd.nri.v1.nri']
  disable = true
  socket_path = "{dir}/containerd/nri.sock"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{sandbox_image}"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{dir}/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        root = paths.containerd_root.display(),
        runc = super::binaries::runc().display(),
        state = paths.containerd_state.display(),
        dir = paths.dir.display(),
        cni_bin = binaries.cni_dir().display(),
        cni_conf = paths.cni_conf_dir.display(),
    )
}

/// One bridge per node, its .1 the pods' gateway; no masquerading (nothing is routed past
/// the host), IPAM state under the node's directory.
pub(super) fn cni(paths: &Paths, bridge: &str, subnet: Ipv4Addr) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": bridge,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": paths.cni_ipam_dir,
                "ranges": [[{"subnet": format!("{subnet}/24")}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }, {
            "type": "portmap",
            "capabilities": {"portMappings": true}
        }]
    }))
    .unwrap_or_default()
}

/// The kubelet on this host: cgroup v1 (hybrid layout) allowed, cgroupfs driver, no QoS
/// cgroups and no node-allocatable enforcement (the harness does not own the host's
/// cgroups), swap tolerated, image GC off (imported images cannot be pulled again), eviction
/// only near exhaustion. Its API (logs, exec, port-forward) accepts anyone: the API server
/// has no kubelet client certificate.
pub(super) fn kubelet(paths: &Paths, subnet: Ipv4Addr, port: u16, healthz_port: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
podLogsDir: {pod_logs}
volumePluginDir: {dir}/kubelet-volume-plugins
address: 0.0.0.0
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
podCIDR: {subnet}/24
registerNode: true
clusterDomain: cluster.local
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
"#,
        socket = paths.containerd_socket.display(),
        pod_logs = paths.pod_logs.display(),
        dir = paths.dir.display(),
    )
}
