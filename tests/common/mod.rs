//! Shared support for tests that run real PostgreSQL 15 processes through `pgrs agent`.
//!
//! - [`TestEnv`]: a private temp directory (0755 so the `postgres` user can traverse it when the
//!   tests run as root) with the secret files every agent of a test cluster shares.
//! - [`free_port`]: a currently free loopback port.
//! - [`AgentSpec`] / [`AgentProcess`]: a `pgrs agent` child process (the binary under test,
//!   `CARGO_BIN_EXE_pgrs`), its log file, its HTTP client, waiting on its status.
//!
//! Test-only PostgreSQL settings: `shared_buffers=16MB` and `fsync=off`. `fsync=off` is safe
//! here because the tests kill processes, never the machine: the OS page cache survives.
#![allow(dead_code)] // Each test binary uses a different subset of these helpers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pgrs::protocol::api::{AgentStatus, Role};
use pgrs::protocol::client::AgentClient;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER_PASSWORD: &str = "test-superuser-pw";
pub const REPLICATION_PASSWORD: &str = "test-replication-pw";
pub const TOKEN: &str = "test-token";

/// A free TCP port on 127.0.0.1 (bound, read, released).
/// A free loopback port below the kernel's ephemeral range (32768–60999): a port taken from
/// that range can be grabbed as the source port of any outgoing connection (the tests make many)
/// between this check and the server's bind. Never the same port twice in one test process.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = rand::rng().random_range(20_000..32_000u16);
        let mut taken = handed_out.lock().expect("port registry");
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}

/// uid/gid of the `postgres` OS user when running as root.
pub fn postgres_ids() -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("look up the postgres user")
        .expect("the postgres OS user exists");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// Recursively gives `path` to the postgres user (no-op unless root).
pub fn chown_to_postgres(path: &Path) {
    let Some((uid, gid)) = postgres_ids() else {
        return;
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).expect("read dir") {
            chown_to_postgres(&entry.expect("dir entry").path());
        }
    }
}

/// A `Command` for a PostgreSQL program run as the postgres user (when root).
pub fn pg_command(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(Path::new(PG_BIN).join(program));
    command.env("LC_ALL", "C.UTF-8");
    if let Some((uid, gid)) = postgres_ids() {
        command.uid(uid).gid(gid);
    }
    command
}

/// Runs a command and returns stdout, panicking with stderr on failure.
pub fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("spawn command");
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A temp directory for one test, with the shared secret files.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub superuser_password_file: PathBuf,
    pub replication_password_file: PathBuf,
    pub token_file: PathBuf,
    pub cluster: String,
}

impl TestEnv {
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgrs-{prefix}-"))
            .tempdir_in("/tmp")
            .expect("create temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let write = |name: &str, value: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{value}\n")).expect("write secret");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod secret");
            path
        };
        TestEnv {
            superuser_password_file: write("superuser.pw", SUPERUSER_PASSWORD),
            replication_password_file: write("replication.pw", REPLICATION_PASSWORD),
            token_file: write("token", TOKEN),
            cluster: prefix.to_string(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a secret file (e.g. a wrong password) and returns its path.
    pub fn secret_file(&self, name: &str, value: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("{value}\n")).expect("write secret");
        path
    }

    /// An agent named `name` with its data dir `<tmp>/<name>` and fresh ports, as primary.
    pub fn agent(&self, name: &str) -> AgentSpec {
        AgentSpec {
            name: name.to_string(),
            cluster: self.cluster.clone(),
            data_dir: self.path(name),
            log_file: self.path(&format!("{name}.log")),
            role: "primary".into(),
            primary: None,
            pg_port: free_port(),
            http_port: free_port(),
            pg_bin: PathBuf::from(PG_BIN),
            superuser_password_file: self.superuser_password_file.clone(),
            replication_password_file: self.replication_password_file.clone(),
            token_file: self.token_file.clone(),
            extra_args: Vec::new(),
        }
    }
}

/// How to start one `pgrs agent`.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub cluster: String,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    pub role: String,
    pub primary: Option<(String, u16)>,
    pub pg_port: u16,
    pub http_port: u16,
    pub pg_bin: PathBuf,
    pub superuser_password_file: PathBuf,
    pub replication_password_file: PathBuf,
    pub token_file: PathBuf,
    pub extra_args: Vec<String>,
}

impl AgentSpec {
    pub fn replica_of(mut self, primary: &AgentProcess) -> Self {
        self.role = "replica".into();
        self.primary = Some(("127.0.0.1".into(), primary.spec.pg_port));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgrs"));
        command
            .arg("agent")
            .args(["--cluster", &self.cluster, "--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--pg-bin")
            .arg(&self.pg_bin)
            .args(["--role", &self.role])
            .args(["--port", &self.pg_port.to_string()])
            .args(["--listen-addresses", "127.0.0.1"])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--superuser-password-file")
            .arg(&self.superuser_password_file)
            .arg("--replication-password-file")
            .arg(&self.replication_password_file)
            .args(["--parameter", "shared_buffers=16MB"])
            .args(["--parameter", "fsync=off"])
            .args(["--parameter", "max_connections=40"])
            .args(["--primary-timeout-secs", "3"])
            .args(["--verify-timeout-secs", "20"])
            .args(&self.extra_args)
            .env("PGRS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if let Some((host, port)) = &self.primary {
            command
                .args(["--primary-host", host])
                .args(["--primary-port", &port.to_string()]);
        }
        command
    }

    /// Starts the agent in the background, its output going to `log_file`.
    pub fn spawn(self) -> AgentProcess {
        let log = std::fs::File::create(&self.log_file).expect("create agent log");
        let child = self
            .command()
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn pgrs agent");
        let client = AgentClient::new(
            format!("http://127.0.0.1:{}", self.http_port),
            Some(TOKEN.to_string()),
        )
        .expect("agent client");
        AgentProcess {
            child,
            spec: self,
            client,
        }
    }

    /// Runs an agent that is expected to fail: returns its exit status and output.
    pub fn run_expecting_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let mut agent = self.spawn();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = agent.child.try_wait().expect("wait agent") {
                return (status, agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not exit within {timeout:?}; log:\n{}",
                agent.spec.name,
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A running `pgrs agent`; killed (SIGKILL, taking postgres down with it) when dropped.
pub struct AgentProcess {
    pub child: Child,
    pub spec: AgentSpec,
    pub client: AgentClient,
}

impl AgentProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log_file).unwrap_or_default()
    }

    /// Polls the status until `accept` holds; panics with the last status and log on timeout
    /// or if the agent exits.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                panic!(
                    "agent {} exited ({status}) while waiting for {what}; log:\n{}",
                    self.spec.name,
                    self.log()
                );
            }
            match self.client.status().await {
                Ok(status) if accept(&status) => return status,
                Ok(status) => last = format!("{status:#?}"),
                Err(error) => last = error.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent {}: timed out after {timeout:?} waiting for {what}; last status: {}\nlog:\n{}",
                    self.spec.name,
                    last,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_role(&mut self, role: Role, timeout: Duration) -> AgentStatus {
        self.wait_for(&format!("role {role:?}"), timeout, |s| {
            s.role == role && s.postgres_up == (matches!(role, Role::Primary | Role::Replica))
        })
        .await
    }

    /// Waits until this replica streams (its WAL receiver says `streaming`).
    pub async fn wait_streaming(&mut self, timeout: Duration) -> AgentStatus {
        self.wait_for("streaming", timeout, |s| {
            s.role == Role::Replica
                && s.wal_receiver
                    .as_ref()
                    .is_some_and(|r| r.status.is_streaming())
        })
        .await
    }

    /// A superuser SQL connection over TCP.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.spec.pg_port)
            .user("postgres")
            .password(SUPERUSER_PASSWORD)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.spec.name));
        tokio::spawn(connection);
        client
    }

    /// Polls a query on this instance until it returns `expected` (replicas apply WAL
    /// asynchronously).
    pub async fn wait_query(&self, query: &str, expected: i64, timeout: Duration) {
        let client = self.sql().await;
        let deadline = Instant::now() + timeout;
        loop {
            let value: i64 = client
                .query_one(query, &[])
                .await
                .map(|row| row.get(0))
                .unwrap_or(-1);
            if value == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {query} returned {value}, expected {expected}",
                self.spec.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until no process has `data_dir` open as its postmaster (pdeathsig takes it down
/// shortly after its agent is killed).
pub fn wait_postmaster_gone(data_dir: &Path, timeout: Duration) {
    let pid_file = data_dir.join("postmaster.pid");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let alive = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| {
                text.lines()
                    .next()
                    .and_then(|l| l.trim().parse::<i32>().ok())
            })
            .is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("postmaster of {} still running", data_dir.display());
}
