//! Where `testbed/node/build.sh` put the node's binaries, and which versions they are.

use std::path::{Path, PathBuf};

use crate::bins::pinned_version;

const KUBELET_GO_MOD: &str = include_str!("../../../node/kubelet/go.mod");
const CONTAINERD_GO_MOD: &str = include_str!("../../../node/containerd/go.mod");
const CNI_GO_MOD: &str = include_str!("../../../node/cni/go.mod");

/// `REV` of `testbed/node/build.sh`: part of the cache directory's name and of the pause
/// image's tag.
pub const BUILD_REV: u32 = 1;

/// Files the build produces, relative to its directory.
pub const FILES: [&str; 10] = [
    "bin/kubelet",
    "bin/containerd",
    "bin/containerd-shim-runc-v2",
    "bin/ctr",
    "bin/pause",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
    "images/pause.tar",
];

/// The container runtime's OCI runtime: Debian's runc (crun refuses hybrid cgroups).
pub const RUNC: &str = "/usr/sbin/runc";

/// [`RUNC`], or `PGRS_TESTBED_RUNC` (e.g. a wrapper that logs runc's arguments and bundles).
pub fn runc() -> PathBuf {
    std::env::var_os("PGRS_TESTBED_RUNC").map_or_else(|| PathBuf::from(RUNC), PathBuf::from)
}

#[derive(Debug, thiserror::Error)]
pub enum NodeBinariesError {
    #[error(transparent)]
    Version(#[from] crate::bins::BinariesError),
    #[error(
        "the real node's binaries are not built: {stamp} does not exist \
         (run testbed/node/build.sh, or point PGRS_TESTBED_NODE_DIR at a directory it built)"
    )]
    NotBuilt { stamp: PathBuf },
    #[error("the real node's binaries are incomplete: {missing} not found in {dir}")]
    Missing { missing: String, dir: PathBuf },
    #[error("runc is not installed at {RUNC} (apt-get install runc)")]
    NoRunc,
    #[error("failed to find the home directory: neither PGRS_TESTBED_CACHE nor HOME is set")]
    NoHome,
}

/// The versions pinned in `testbed/node/{kubelet,containerd,cni}/go.mod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeVersions {
    pub kubelet: String,
    pub containerd: String,
    pub cni: String,
}

impl NodeVersions {
    pub fn pinned() -> Result<Self, NodeBinariesError> {
        Ok(Self {
            kubelet: pinned_version(KUBELET_GO_MOD, "k8s.io/kubernetes")?,
            containerd: pinned_version(CONTAINERD_GO_MOD, "github.com/containerd/containerd/v2")?,
            cni: pinned_version(CNI_GO_MOD, "github.com/containernetworking/plugins")?,
        })
    }

    /// Name of the directory `testbed/node/build.sh` builds into.
    pub fn cache_key(&self) -> String {
        format!(
            "node-{}-containerd-{}-cni-{}-r{BUILD_REV}",
            self.kubelet, self.containerd, self.cni
        )
    }
}

/// A complete output directory of `testbed/node/build.sh`.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    dir: PathBuf,
}

impl NodeBinaries {
    /// `PGRS_TESTBED_NODE_DIR` if set, otherwise
    /// `${PGRS_TESTBED_CACHE:-$HOME/.cache/pgrs-testbed}/node-<versions>-r<rev>`, which must
    /// hold the build's `complete` stamp.
    pub fn locate() -> Result<Self, NodeBinariesError> {
        let dir = match std::env::var_os("PGRS_TESTBED_NODE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let root = match std::env::var_os("PGRS_TESTBED_CACHE") {
                    Some(root) => PathBuf::from(root),
                    None => {
                        PathBuf::from(std::env::var_os("HOME").ok_or(NodeBinariesError::NoHome)?)
                            .join(".cache/pgrs-testbed")
                    }
                };
                let dir = root.join(NodeVersions::pinned()?.cache_key());
                let stamp = dir.join("complete");
                if !stamp.exists() {
                    return Err(NodeBinariesError::NotBuilt { stamp });
                }
                dir
            }
        };
        Self::in_dir(dir)
    }

    /// The build in `dir`; fails naming the missing files.
    pub fn in_dir(dir: PathBuf) -> Result<Self, NodeBinariesError> {
        let missing: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(NodeBinariesError::Missing {
                missing: missing.join(", "),
                dir,
            });
        }
        if !runc().is_file() {
            return Err(NodeBinariesError::NoRunc);
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    pub fn kubelet(&self) -> PathBuf {
        self.dir.join("bin/kubelet")
    }

    pub fn containerd(&self) -> PathBuf {
        self.dir.join("bin/containerd")
    }

    pub fn ctr(&self) -> PathBuf {
        self.dir.join("bin/ctr")
    }

    /// Directory of the CNI plugins.
    pub fn cni_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }

    /// The sandbox image as a docker-archive (`ctr images import`).
    pub fn pause_archive(&self) -> PathBuf {
        self.dir.join("images/pause.tar")
    }

    /// The sandbox image's name inside that archive.
    pub fn pause_image() -> String {
        format!("localhost/pgrs-testbed/pause:{BUILD_REV}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILD_SH: &str = include_str!("../../../node/build.sh");

    #[test]
    fn the_cache_directory_and_pause_tag_match_build_sh() {
        assert!(
            BUILD_SH.contains(&format!("\nREV={BUILD_REV}\n")),
            "BUILD_REV differs from testbed/node/build.sh's REV"
        );
        assert!(BUILD_SH.contains(
            "dir=\"$cache_root/node-$k8s_version-containerd-$containerd_version-cni-$cni_version-r$REV\""
        ));
        assert!(BUILD_SH.contains("pause_image=localhost/pgrs-testbed/pause:$REV"));
        let versions = NodeVersions::pinned().unwrap();
        assert_eq!(
            versions.kubelet,
            crate::bins::Versions::pinned().unwrap().kubernetes,
            "testbed/node/kubelet/go.mod and testbed/k8s/go.mod pin different Kubernetes versions"
        );
        assert_eq!(
            versions.cache_key(),
            format!(
                "node-{}-containerd-{}-cni-{}-r{BUILD_REV}",
                versions.kubelet, versions.containerd, versions.cni
            )
        );
    }
}
