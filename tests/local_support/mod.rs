//! Shared helpers of the `pgrs local` end-to-end tests: a real local cluster (the `pgrs` binary,
//! real PostgreSQL 15) in a temporary directory on free loopback ports, torn down on drop.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// A free block of ports for `nodes` (at most 5) nodes, all below 32768: outside Linux's default
/// ephemeral range, so no outgoing connection of another process can take one meanwhile.
pub fn free_port_base(nodes: usize) -> u16 {
    use rand::Rng;
    assert!(nodes <= 5, "a block of 20 ports holds at most 5 nodes");
    loop {
        let base = rand::rng().random_range(1000..1637u16) * 20;
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
        let port_base = free_port_base(replicas + 1);
        let temp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let dir = temp.path().join("cluster");
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

    /// The cluster's agent token (`secrets/token`): the agents' status and actions need it.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.layout().token())
            .expect("token")
            .trim()
            .to_string()
    }

    /// A client of `node`'s agent, with the cluster's token.
    pub fn agent_client(&self, node: &str) -> pgrs::protocol::client::AgentClient {
        let config = self.layout().read_config().expect("config");
        let node = config.node(node).expect("node");
        pgrs::protocol::client::AgentClient::new(config.agent_url(node), Some(self.token()))
            .expect("agent client")
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

/// A kept session to one postgres, reconnected after any failure (for watchers that must not pay
/// a SCRAM handshake per query).
pub struct Session {
    conninfo: String,
    client: Option<tokio_postgres::Client>,
}

impl Session {
    pub fn new(conninfo: String) -> Session {
        Session {
            conninfo,
            client: None,
        }
    }

    /// Runs `sql` within a second (connecting first if needed); `None`, and the session dropped,
    /// on any failure.
    pub async fn rows(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Option<Vec<tokio_postgres::Row>> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let connect = tokio::time::timeout(
                Duration::from_secs(1),
                tokio_postgres::connect(&self.conninfo, tokio_postgres::NoTls),
            )
            .await;
            if let Ok(Ok((client, connection))) = connect {
                tokio::spawn(connection);
                self.client = Some(client);
            }
        }
        let client = self.client.as_ref()?;
        match tokio::time::timeout(Duration::from_secs(1), client.query(sql, params)).await {
            Ok(Ok(rows)) => Some(rows),
            _ => {
                self.client = None;
                None
            }
        }
    }
}

impl Cluster {
    /// Waits until `count` standbys are quorum members of the primary's synchronous set.
    pub async fn wait_quorum(&self, count: usize, timeout: Duration) {
        if let Err(error) = self.try_wait_quorum(count, timeout).await {
            panic!("{error}\n{}", self.controller_log_tail());
        }
    }

    /// [`Cluster::wait_quorum`], answering `Err` with the last status instead of panicking.
    pub async fn try_wait_quorum(&self, count: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await;
            let quorum = (status.nodes.iter())
                .filter(|n| n.sync_state.as_deref() == Some("quorum"))
                .count();
            if status.primary.is_some() && quorum == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{count} quorum standbys not reached within {} s: {:?}",
                    timeout.as_secs(),
                    status.nodes
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The events from `since_ms` (wall clock, ms) on, one a line, with their offset from it.
    pub fn events_since(&self, since_ms: i64) -> String {
        let events = self.events();
        let lines: Vec<String> = (events.iter())
            .filter(|e| wall_ms(&e["at"]) >= since_ms - 50)
            .map(|e| {
                let text = |key: &str| e[key].as_str().unwrap_or_default().to_string();
                let at = wall_ms(&e["at"]) - since_ms;
                format!("  +{at} ms {} {}", text("reason"), text("message"))
            })
            .collect();
        lines.join("\n")
    }

    /// Copies the controller's log, the event log and every agent's log (postgres logs to its
    /// agent's) to `target/test-output/<name>/`, for a failure to be examined after the
    /// temporary directory is gone; returns that directory.
    pub fn keep_logs(&self, name: &str) -> PathBuf {
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/test-output")
            .join(name);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("create the test output directory");
        for file in [
            "controller.log",
            "events.jsonl",
            "memory.json",
            "lease.json",
        ] {
            let _ = std::fs::copy(self.dir.join(file), out.join(file));
        }
        if let Ok(config) = self.layout().read_config() {
            for node in &config.nodes {
                let log = self.layout().agent_log(&node.name);
                let _ = std::fs::copy(log, out.join(format!("{}-agent.log", node.name)));
            }
        }
        out
    }
}

/// Watches for two writable primaries on the SQL level, whatever the controller reports: asks
/// every node `pg_is_in_recovery()` every 50 ms on kept sessions; two nodes answering `false`
/// (the first asked again after the second, still `false`) is a violation.
pub struct PrimaryWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl PrimaryWatch {
    pub fn start(cluster: &Cluster, nodes: &[String]) -> PrimaryWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let mut sessions: Vec<(String, Session)> = nodes
            .iter()
            .map(|n| (n.clone(), Session::new(cluster.node_conninfo(n))))
            .collect();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = 0usize;
            let mut violations = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let mut writable = Vec::new();
                for (i, (name, session)) in sessions.iter_mut().enumerate() {
                    if let Some(rows) = session.rows("SELECT pg_is_in_recovery()", &[]).await
                        && rows.first().is_some_and(|r| !r.get::<_, bool>(0))
                    {
                        writable.push((i, name.clone()));
                    }
                }
                samples += 1;
                if writable.len() >= 2 {
                    let (first, _) = writable[0];
                    let still = sessions[first]
                        .1
                        .rows("SELECT pg_is_in_recovery()", &[])
                        .await
                        .is_some_and(|rows| rows.first().is_some_and(|r| !r.get::<_, bool>(0)));
                    if still {
                        let names: Vec<String> = writable.into_iter().map(|(_, n)| n).collect();
                        violations.push(format!("{} ms: {names:?} accept writes", now_ms()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, violations)
        });
        PrimaryWatch { stop, task }
    }

    pub async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("primary watch task")
    }
}

const LSN_INSERT: &str =
    "INSERT INTO pgrs_chaos (id) VALUES ($1) RETURNING pg_current_wal_insert_lsn()::text";

/// An insert as its client saw it, with the primary's WAL insert position after the row.
#[derive(Debug, Clone)]
pub struct Write {
    pub record: pgrs::local::chaos::WriteRecord,
    pub lsn: Option<String>,
}

/// `clients` clients inserting into `pgrs_chaos` (ids from `1 + i * 1e9` for client `i`), one
/// row at a time, reconnecting after any error: `chaos::WriteLoad` plus the primary's WAL
/// position of each acknowledged row, to place a lost row against the positions the
/// controller saw.
pub struct LsnWriteLoad {
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Vec<Write>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LsnWriteLoad {
    pub fn start(conninfo: String, clients: i64) -> LsnWriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, writes, conninfo) = (stop.clone(), writes.clone(), conninfo.clone());
                tokio::spawn(async move {
                    let mut id = 1 + i * 1_000_000_000;
                    while !stop.load(Ordering::SeqCst) {
                        let connect = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls);
                        let Ok(Ok((client, connection))) =
                            tokio::time::timeout(Duration::from_secs(3), connect).await
                        else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        tokio::spawn(connection);
                        while !stop.load(Ordering::SeqCst) {
                            let started = Instant::now();
                            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                            let insert = client.query_one(LSN_INSERT, &params);
                            let timed = tokio::time::timeout(Duration::from_secs(5), insert);
                            let lsn = timed.await.ok().and_then(Result::ok).map(|r| r.get(0));
                            let acknowledged = lsn.is_some();
                            let finished = Instant::now();
                            let record = pgrs::local::chaos::WriteRecord {
                                id,
                                started,
                                finished,
                                acknowledged,
                            };
                            writes.lock().expect("writes").push(Write { record, lsn });
                            id += 1;
                            if !acknowledged {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                })
            })
            .collect();
        LsnWriteLoad {
            stop,
            writes,
            tasks,
        }
    }

    pub fn acknowledged_since(&self, since: Instant) -> usize {
        let writes = self.writes.lock().expect("writes");
        writes
            .iter()
            .filter(|w| w.record.acknowledged && w.record.started >= since)
            .count()
    }

    pub async fn stop(self) -> Vec<Write> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.writes.lock().expect("writes").clone()
    }
}
