//! The directory of a local cluster: its configuration, secrets, node directories, and the lock
//! that makes one controller the only owner.
//!
//! ```text
//! <dir>/cluster.json          LocalConfig
//! <dir>/controller.lock       flock'ed by the running controller
//! <dir>/controller.pid        its pid;  controller.log: its log
//! <dir>/lease.json            the persisted lease;  memory.json: the engine memory
//! <dir>/events.jsonl          engine events and actions, with wall-clock times
//! <dir>/secrets/              token, superuser.pw, replication.pw (0600)
//! <dir>/nodes/<name>/data     PGDATA;  agent.log, agent.pid
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::coordination::LeaseTimings;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{path} is in use by a running controller (pid {pid}); run `pgrs local down --dir {dir}` first"
    )]
    InUse {
        path: String,
        dir: String,
        pid: String,
    },
    #[error("{0} does not hold a local cluster (no cluster.json); run `pgrs local up` first")]
    NotACluster(String),
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown node {name:?}; the nodes are: {known}")]
    UnknownNode { name: String, known: String },
}

pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError {
    let path = path.display().to_string();
    move |source| LayoutError::Io { what, path, source }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    pub name: String,
    pub pg_port: u16,
    pub agent_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    pub cluster: String,
    pub nodes: Vec<NodeConfig>,
    /// The stable write endpoint: forwards to the lease holder's postgres.
    pub write_port: u16,
    /// The controller's HTTP server: status, lease service, switchover.
    pub controller_port: u16,
    pub sync: bool,
    pub timings: LeaseTimings,
    pub pg_bin: PathBuf,
    pub superuser: String,
    /// Controller round interval.
    pub interval_ms: u64,
    /// The lease-service-outage failsafe: the primary keeps serving while the controller (the
    /// lease service) is down, as long as every other node confirms it follows it.
    #[serde(default = "default_failsafe")]
    pub failsafe: bool,
}

fn default_failsafe() -> bool {
    true
}

impl LocalConfig {
    /// `replicas + 1` nodes; ports from `port_base`: write endpoint, controller, then each
    /// node's postgres and agent.
    pub fn new(
        replicas: usize,
        port_base: u16,
        sync: bool,
        timings: LeaseTimings,
        pg_bin: PathBuf,
    ) -> Self {
        let nodes = (0..=replicas)
            .map(|i| NodeConfig {
                name: format!("node{i}"),
                pg_port: port_base + 10 + 2 * i as u16,
                agent_port: port_base + 11 + 2 * i as u16,
            })
            .collect();
        LocalConfig {
            cluster: "local".to_string(),
            nodes,
            write_port: port_base,
            controller_port: port_base + 1,
            sync,
            timings,
            pg_bin,
            superuser: "postgres".to_string(),
            interval_ms: 250,
            failsafe: true,
        }
    }

    pub fn node(&self, name: &str) -> Result<&NodeConfig, LayoutError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LayoutError::UnknownNode {
                name: name.to_string(),
                known: self
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn controller_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.controller_port)
    }

    pub fn agent_url(&self, node: &NodeConfig) -> String {
        format!("http://127.0.0.1:{}", node.agent_port)
    }
}

/// Paths inside a cluster directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        // Absolute, so that children started elsewhere and messages name the same place.
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Layout { dir }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("controller.lock")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("controller.pid")
    }
    pub fn controller_log(&self) -> PathBuf {
        self.dir.join("controller.log")
    }
    pub fn lease(&self) -> PathBuf {
        self.dir.join("lease.json")
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory.json")
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }
    pub fn secrets(&self) -> PathBuf {
        self.dir.join("secrets")
    }
    pub fn token(&self) -> PathBuf {
        self.secrets().join("token")
    }
    pub fn superuser_password(&self) -> PathBuf {
        self.secrets().join("superuser.pw")
    }
    pub fn replication_password(&self) -> PathBuf {
        self.secrets().join("replication.pw")
    }
    /// Password of the application role [`APP_OWNER`].
    pub fn app_password(&self) -> PathBuf {
        self.secrets().join("app.pw")
    }
    /// The application's libpq URI, through the write endpoint.
    pub fn app_uri(&self) -> PathBuf {
        self.secrets().join("app.uri")
    }
    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.join("nodes").join(name)
    }
    /// Refuses, before anything starts, binaries that lack a program the agents need or are of
    /// an unsupported major, and nodes whose data directory is of another major than the
    /// binaries (every agent would exit with that error while `up` waited for a healthy
    /// cluster).
    pub fn check_binaries(&self, config: &LocalConfig) -> anyhow::Result<()> {
        use crate::postgres::version;
        let binaries = crate::postgres::process::PgBinaries::locate(&config.pg_bin)?;
        for node in &config.nodes {
            let data_dir = self.data_dir(&node.name);
            if let Some(data_major) = version::read_data_dir_major(&data_dir)? {
                let (bin_dir, major) = (binaries.dir(), binaries.major());
                version::check_data_dir_major(&data_dir, data_major, bin_dir, major)?;
            }
        }
        Ok(())
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.node_dir(name).join("data")
    }
    pub fn agent_log(&self, name: &str) -> PathBuf {
        self.node_dir(name).join("agent.log")
    }
    pub fn agent_pid(&self, name: &str) -> PathBuf {
        self.node_dir(name).join("agent.pid")
    }

    pub fn read_config(&self) -> Result<LocalConfig, LayoutError> {
        let path = self.config();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::NotACluster(self.dir.display().to_string()));
            }
            Err(e) => return Err(io_error("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn write_config(&self, config: &LocalConfig) -> Result<(), LayoutError> {
        let path = self.config();
        let bytes = serde_json::to_vec_pretty(config).map_err(|source| LayoutError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(&path, bytes).map_err(io_error("write", &path))
    }

    /// Creates the directory tree: traversable by the postgres user (0755), secrets 0700.
    pub fn create_dirs(&self, config: &LocalConfig) -> Result<(), LayoutError> {
        for dir in [self.dir.clone(), self.dir.join("nodes")] {
            std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_error("chmod", &dir))?;
        }
        for node in &config.nodes {
            let dir = self.node_dir(&node.name);
            std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_error("chmod", &dir))?;
        }
        let secrets = self.secrets();
        std::fs::create_dir_all(&secrets).map_err(io_error("create", &secrets))?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", &secrets))?;
        for path in [
            self.token(),
            self.superuser_password(),
            self.replication_password(),
            self.app_password(),
        ] {
            if !path.exists() {
                write_secret(&path, &random_secret())?;
            }
        }
        let password = std::fs::read_to_string(self.app_password())
            .map_err(io_error("read", &self.app_password()))?;
        write_secret(
            &self.app_uri(),
            &app_uri(password.trim_end(), config.write_port),
        )?;
        Ok(())
    }

    /// The pid in `controller.pid`, if the file exists.
    pub fn controller_pid(&self) -> Option<i32> {
        read_pid(&self.pid())
    }
}

pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn random_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| {
            let chars = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
            chars[rng.random_range(0..chars.len())] as char
        })
        .collect()
}

/// Role and database of the application in local mode (the Kubernetes default).
pub const APP_OWNER: &str = "app";
pub const APP_DATABASE: &str = "app";

/// `postgresql://app:<password>@127.0.0.1:<write port>/app`: the write endpoint follows the
/// primary. The password is alphanumeric (generated).
pub fn app_uri(password: &str, write_port: u16) -> String {
    format!("postgresql://{APP_OWNER}:{password}@127.0.0.1:{write_port}/{APP_DATABASE}\n")
}

fn write_secret(path: &Path, value: &str) -> Result<(), LayoutError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(value.as_bytes())
        .map_err(io_error("write", path))
}

/// An exclusive, non-blocking `flock` on `controller.lock`, held for the controller's life
/// (released by the kernel when the process dies, even by SIGKILL).
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(layout: &Layout) -> Result<DirLock, LayoutError> {
        let path = layout.lock();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LayoutError::InUse {
                    path: path.display().to_string(),
                    dir: layout.dir.display().to_string(),
                    pid: layout
                        .controller_pid()
                        .map_or("unknown".to_string(), |p| p.to_string()),
                });
            }
            return Err(io_error("lock", &path)(error));
        }
        Ok(DirLock { _file: file })
    }

    /// Whether some process holds the lock right now (without keeping it).
    pub fn is_held(layout: &Layout) -> bool {
        matches!(DirLock::acquire(layout), Err(LayoutError::InUse { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_uri_goes_through_the_write_endpoint() {
        assert_eq!(
            app_uri("pw", 5400),
            "postgresql://app:pw@127.0.0.1:5400/app\n"
        );
    }

    #[test]
    fn ports_are_laid_out_from_the_base() {
        let config = LocalConfig::new(
            2,
            20000,
            false,
            LeaseTimings::default(),
            PathBuf::from("/bin"),
        );
        assert_eq!(config.write_port, 20000);
        assert_eq!(config.controller_port, 20001);
        let ports: Vec<(u16, u16)> = config
            .nodes
            .iter()
            .map(|n| (n.pg_port, n.agent_port))
            .collect();
        assert_eq!(ports, vec![(20010, 20011), (20012, 20013), (20014, 20015)]);
        let err = config.node("node9").expect_err("unknown");
        assert!(err.to_string().contains("node0, node1, node2"), "{err}");
    }

    #[test]
    fn a_locked_directory_is_refused_with_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path());
        std::fs::write(layout.pid(), "4242").expect("pid");
        let held = DirLock::acquire(&layout).expect("first lock");
        let err = DirLock::acquire(&layout)
            .err()
            .expect("second lock refused");
        assert!(err.to_string().contains("4242"), "{err}");
        assert!(DirLock::is_held(&layout));
        drop(held);
        assert!(!DirLock::is_held(&layout));
    }
}
