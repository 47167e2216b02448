//! Where the Go-built binaries live, and which versions they are.
//!
//! The versions are read from the go.mod files that `testbed/build.sh` builds from
//! (embedded at compile time), so the harness and the build script agree on the
//! cache directory without a second list of versions.

use std::path::{Path, PathBuf};

const K8S_GO_MOD: &str = include_str!("../../k8s/go.mod");
const ETCD_GO_MOD: &str = include_str!("../../etcd/go.mod");
const HELM_GO_MOD: &str = include_str!("../../helm/go.mod");

/// Names of the executables `testbed/build.sh` produces.
pub const EXECUTABLES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "helm",
];

/// The pinned versions of the test bed's components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    /// e.g. `v1.36.3`
    pub kubernetes: String,
    /// e.g. `v3.6.8`
    pub etcd: String,
    /// e.g. `v3.21.4`
    pub helm: String,
}

impl Versions {
    /// The versions pinned in `testbed/{k8s,etcd,helm}/go.mod`.
    pub fn pinned() -> Result<Self, BinariesError> {
        Ok(Self {
            kubernetes: pinned_version(K8S_GO_MOD, "k8s.io/kubernetes")?,
            etcd: pinned_version(ETCD_GO_MOD, "go.etcd.io/etcd/server/v3")?,
            helm: pinned_version(HELM_GO_MOD, "helm.sh/helm/v3")?,
        })
    }

    /// Name of the cache directory `testbed/build.sh` builds into.
    pub fn cache_key(&self) -> String {
        format!("{}-{}-{}", self.kubernetes, self.etcd, self.helm)
    }
}

/// Why the binaries cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error("failed to find the version of {module} in the embedded go.mod")]
    VersionNotPinned { module: &'static str },
    #[error(
        "the test bed binaries are missing: {missing} not found in {dir} \
         (run testbed/build.sh, or point PGRS_TESTBED_BIN at a directory holding {all})"
    )]
    Missing {
        missing: String,
        dir: PathBuf,
        all: String,
    },
    #[error(
        "the test bed binaries are not built: {stamp} does not exist \
         (run testbed/build.sh; it builds them into {dir})"
    )]
    NotBuilt { stamp: PathBuf, dir: PathBuf },
    #[error("failed to find the home directory: neither PGRS_TESTBED_CACHE nor HOME is set")]
    NoHome,
}

/// Version of `module` in a go.mod text (`\tmodule vX.Y.Z` or `require module vX.Y.Z`).
pub fn pinned_version(go_mod: &str, module: &'static str) -> Result<String, BinariesError> {
    go_mod
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let (name, version) = if first == "require" {
                (words.next()?, words.next()?)
            } else {
                (first, words.next()?)
            };
            (name == module && version.starts_with('v')).then(|| version.to_owned())
        })
        .next()
        .ok_or(BinariesError::VersionNotPinned { module })
}

/// A directory holding every executable of [`EXECUTABLES`].
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// `PGRS_TESTBED_BIN` if set, otherwise the cache directory of `testbed/build.sh`
    /// (`${PGRS_TESTBED_CACHE:-$HOME/.cache/pgrs-testbed}/<k8s>-<etcd>-<helm>/bin`).
    pub fn locate() -> Result<Self, BinariesError> {
        if let Some(dir) = std::env::var_os("PGRS_TESTBED_BIN") {
            return Self::in_dir(PathBuf::from(dir));
        }
        let root = match std::env::var_os("PGRS_TESTBED_CACHE") {
            Some(root) => PathBuf::from(root),
            None => PathBuf::from(std::env::var_os("HOME").ok_or(BinariesError::NoHome)?)
                .join(".cache/pgrs-testbed"),
        };
        let versioned = root.join(Versions::pinned()?.cache_key());
        let stamp = versioned.join("complete");
        if !stamp.exists() {
            return Err(BinariesError::NotBuilt {
                stamp,
                dir: versioned.join("bin"),
            });
        }
        Self::in_dir(versioned.join("bin"))
    }

    /// Binaries in `dir`; fails naming the first missing one.
    pub fn in_dir(dir: PathBuf) -> Result<Self, BinariesError> {
        let missing: Vec<&str> = EXECUTABLES
            .iter()
            .copied()
            .filter(|name| !dir.join(name).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(BinariesError::Missing {
                missing: missing.join(", "),
                dir,
                all: EXECUTABLES.join(", "),
            });
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }

    /// Built by `testbed/build.sh` since the real node (issue 14); not in [`EXECUTABLES`]:
    /// only a bed with real nodes needs it, so older caches still serve the fake kubelet.
    pub fn kube_scheduler(&self) -> PathBuf {
        self.dir.join("kube-scheduler")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.dir.join("kubectl")
    }

    pub fn helm(&self) -> PathBuf {
        self.dir.join("helm")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_versions_come_from_the_go_mod_files() {
        let versions = Versions::pinned().expect("versions pinned");
        assert!(versions.kubernetes.starts_with("v1.3"), "{versions:?}");
        assert!(versions.etcd.starts_with("v3.6."), "{versions:?}");
        assert!(versions.helm.starts_with("v3."), "{versions:?}");
    }

    #[test]
    fn pinned_version_reads_block_and_single_line_requires() {
        let go_mod =
            "module x\n\nrequire a.b/c v1.2.3\n\nrequire (\n\td.e/f v0.1.0 // indirect\n)\n";
        assert_eq!(pinned_version(go_mod, "a.b/c").unwrap(), "v1.2.3");
        assert_eq!(pinned_version(go_mod, "d.e/f").unwrap(), "v0.1.0");
        assert!(pinned_version(go_mod, "g.h/i").is_err());
    }

    #[test]
    fn a_directory_without_the_binaries_names_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let err = Binaries::in_dir(dir.path().to_path_buf()).unwrap_err();
        assert!(err.to_string().contains("run testbed/build.sh"), "{err}");
    }
}
