//! Shared helpers of the `pgrs local` end-to-end tests: a real local cluster (the `pgrs` binary,
//! real PostgreSQL 15) in a temporary directory on free loopback ports, torn down on drop.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgrs::local::layout::Layout;
use pgrs::local::status::LocalStatus;

pub const PGRS: &str = env!("CARGO_BIN_EXE_pgrs");

pub struct Cluster {
    pub dir: PathBuf,
    pub port_base: u16,
    _temp: tempfile::TempDir,
}

fn ports_free(base: u16, nodes: usize) -> bool {
    let mut ports = vec![base, base + 1];
    for i in 0..nodes as u16 {
        ports.push(base + 10 + 2 * i);
        ports.push(base + 11 + 2 * i);
    }
    ports
        .iter()
        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

/// A free block of ports for `nodes` nodes.
pub fn free_port_base(nodes: usize) -> u16 {
    use rand::Rng;
    loop {
        let base = rand::rng().random_range(1000..2400u16) * 20;
        if ports_free(base, nodes) {
            return base;
        }
    }
}

pub fn pgrs(args: &[&str]) -> std::process::Output {
    Command::new(PGRS)
        .args(args)
        .env("PGRS_LOG", "info")
        .output()
        .expect("run pgrs")
}

impl Cluster {
    /// `pgrs local up` with `replicas` replicas (and `extra` arguments); panics with the
    /// controller log if it does not come up healthy.
    pub fn up(replicas: usize, extra: &[&str]) -> Cluster {
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let dir = temp.path().join("cluster");
        let port_base = free_port_base(replicas + 1);
        let replicas_text = replicas.to_string();
        let base_text = port_base.to_string();
        let dir_text = dir.display().to_string();
        let mut args = vec![
            "local",
            "up",
            "--dir",
            &dir_text,
            "--replicas",
            &replicas_text,
            "--port-base",
            &base_text,
        ];
        args.extend_from_slice(extra);
        let output = pgrs(&args);
        let cluster = Cluster {
            dir,
            port_base,
            _temp: temp,
        };
        assert!(
            output.status.success(),
            "pgrs local up failed: {}\n{}\ncontroller log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            cluster.controller_log_tail()
        );
        cluster
    }

    pub fn dir_text(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.dir)
    }

    pub fn controller_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub async fn status(&self) -> LocalStatus {
        pgrs::local::cli::cluster_status(&self.dir)
            .await
            .expect("cluster status")
    }

    pub fn superuser_password(&self) -> String {
        std::fs::read_to_string(self.layout().superuser_password())
            .expect("password")
            .trim()
            .to_string()
    }

    pub fn write_conninfo(&self) -> String {
        pgrs::local::chaos::connection_string(
            self.port_base,
            "postgres",
            &self.superuser_password(),
        )
    }

    pub fn node_conninfo(&self, node: &str) -> String {
        let config = self.layout().read_config().expect("config");
        let port = config.node(node).expect("node").pg_port;
        pgrs::local::chaos::connection_string(port, "postgres", &self.superuser_password())
    }

    pub fn node_port(&self, node: &str) -> u16 {
        self.layout()
            .read_config()
            .expect("config")
            .node(node)
            .expect("node")
            .pg_port
    }

    pub async fn wait_healthy(&self, timeout: Duration) -> LocalStatus {
        match pgrs::local::chaos::wait_healthy(&self.dir, timeout).await {
            Ok(status) => status,
            Err(error) => panic!("{error}\n{}", self.controller_log_tail()),
        }
    }

    pub async fn wait_new_primary(&self, old: &str, timeout: Duration) -> String {
        match pgrs::local::chaos::wait_new_primary(&self.dir, old, timeout).await {
            Ok(primary) => primary,
            Err(error) => panic!("{error}\n{}", self.controller_log_tail()),
        }
    }

    /// Restarts `node` and waits until it streams from the primary.
    pub async fn restart(&self, node: &str) -> Duration {
        match pgrs::local::chaos::restart_and_rejoin(&self.dir, node, Duration::from_secs(120))
            .await
        {
            Ok(took) => took,
            Err(error) => panic!("{error}\n{}", self.controller_log_tail()),
        }
    }

    /// Asserts that no status snapshot shows two serving primaries.
    pub async fn assert_single_primary(&self) {
        let status = self.status().await;
        let primaries: Vec<&str> = status
            .nodes
            .iter()
            .filter(|n| n.role.as_deref() == Some("primary") && n.postgres_up)
            .map(|n| n.name.as_str())
            .collect();
        assert!(
            primaries.len() <= 1,
            "two writable primaries: {primaries:?}"
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pgrs(&["local", "down", "--dir", &self.dir_text()]);
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

pub fn wall_ms(at: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(at.as_str().expect("timestamp"))
        .expect("rfc3339")
        .timestamp_millis()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn elapsed_since(start: Instant) -> String {
    format!("{} ms", start.elapsed().as_millis())
}

pub fn path_text(path: &Path) -> String {
    path.display().to_string()
}
