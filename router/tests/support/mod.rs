//! Test fixture: a real PostgreSQL 15 primary and a streaming hot standby on free loopback
//! ports in a temp dir, run as the `postgres` user (postgres refuses root), stopped on drop.
//!
//! Both serve TLS (`ssl = on`) with a certificate for `localhost` and `127.0.0.1` from a CA of
//! their own ([`Cluster::ca_pem`]); plain connections stay accepted.
//!
//! Shared by the integration tests and the bench (`#[path]`), so it only uses std, anyhow,
//! nix, tempfile and `pgrs::tls`.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The `postgres` OS user the server processes run as.
#[derive(Debug, Clone, Copy)]
struct PgUser {
    uid: u32,
    gid: u32,
}

impl PgUser {
    fn lookup() -> Result<Self> {
        let user = nix::unistd::User::from_name("postgres")
            .context("failed to look up the postgres user")?
            .context("failed to find the postgres user: install postgresql-15")?;
        Ok(Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }

    fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut command = Command::new(Path::new(BIN).join(program));
        command.current_dir(cwd);
        if nix::unistd::geteuid().is_root() {
            command.uid(self.uid).gid(self.gid);
        }
        command
    }

    fn own(&self, path: &Path) -> Result<()> {
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .with_context(|| format!("failed to chown {}", path.display()))?;
        }
        Ok(())
    }
}

/// One postgres instance of the fixture.
#[derive(Debug)]
pub struct PgNode {
    pub name: &'static str,
    pub port: u16,
    pub data_dir: PathBuf,
    log: PathBuf,
    running: bool,
}

impl PgNode {
    /// A libpq key/value connection string for the router.
    pub fn conn_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn is_running(&self) -> bool {
        self.running
    }
}

/// A primary and one streaming replica.
pub struct Cluster {
    user: PgUser,
    root: tempfile::TempDir,
    pub primary: PgNode,
    pub replica: PgNode,
    /// The CA of the nodes' certificate (PEM).
    pub ca_pem: String,
}

/// A free loopback port below the kernel's ephemeral range (32768–60999), where outgoing
/// connections cannot grab it between this check and the server's bind. Ports are handed out in
/// order from a per-process starting point, so parallel tests never get the same one.
fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 1_000) as u16 * 10,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2_000 {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if port >= 32_000 {
            20_000 + port % 12_000
        } else {
            port
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between 20000 and 32000")
}

fn run(mut command: Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("failed to spawn {what}"))?;
    if !output.status.success() {
        bail!(
            "failed to {what}: {}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("failed to append to {}", path.display()))
}

impl Cluster {
    /// initdb a primary, start it, pg_basebackup a replica from it and start that too.
    pub fn start() -> Result<Cluster> {
        let user = PgUser::lookup()?;
        let root = tempfile::Builder::new()
            .prefix("pgrs-router-test-")
            .tempdir()
            .context("failed to create the fixture temp dir")?;
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        let sockets = root.path().join("sockets");
        let logs = root.path().join("logs");
        for dir in [&sockets, &logs] {
            fs::create_dir(dir)?;
            user.own(dir)?;
        }
        let primary = PgNode {
            name: "primary",
            port: free_port()?,
            data_dir: root.path().join("primary"),
            log: logs.join("primary.log"),
            running: false,
        };
        let replica = PgNode {
            name: "replica",
            port: free_port()?,
            data_dir: root.path().join("replica"),
            log: logs.join("replica.log"),
            running: false,
        };
        let authority =
            pgrs::tls::Authority::generate("router test CA", Duration::from_secs(86_400))?;
        let server = authority.issue_server(
            "router test",
            &["localhost".to_string()],
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            Duration::from_secs(86_400),
        )?;
        let mut cluster = Cluster {
            user,
            root,
            primary,
            replica,
            ca_pem: authority.cert_pem().to_string(),
        };

        let mut initdb = user.command("initdb", cluster.root.path());
        initdb.arg("-D").arg(&cluster.primary.data_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        fs::create_dir(&cluster.primary.data_dir)?;
        user.own(&cluster.primary.data_dir)?;
        run(initdb, "initdb the primary")?;
        // The certificate and key in the data directory (pg_basebackup copies them).
        for (file, text) in [
            ("server.crt", &server.cert_pem),
            ("server.key", &server.key_pem),
        ] {
            let path = cluster.primary.data_dir.join(file);
            fs::write(&path, text)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            user.own(&path)?;
        }
        append(
            &cluster.primary.data_dir.join("postgresql.conf"),
            &format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
                 wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '128MB'\n\
                 hot_standby = on\nfsync = off\nshared_buffers = '16MB'\nmax_connections = 80\n\
                 ssl = on\n",
                cluster.primary.port,
                sockets.display()
            ),
        )?;
        cluster.start_node(Which::Primary)?;

        fs::create_dir(&cluster.replica.data_dir)?;
        user.own(&cluster.replica.data_dir)?;
        fs::set_permissions(&cluster.replica.data_dir, fs::Permissions::from_mode(0o700))?;
        let mut basebackup = user.command("pg_basebackup", cluster.root.path());
        basebackup
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ])
            .args(["-p", &cluster.primary.port.to_string()])
            .arg("-D")
            .arg(&cluster.replica.data_dir);
        run(basebackup, "pg_basebackup the replica")?;
        append(
            &cluster.replica.data_dir.join("postgresql.conf"),
            &format!("\nport = {}\n", cluster.replica.port),
        )?;
        cluster.start_node(Which::Replica)?;
        Ok(cluster)
    }

    fn node(&mut self, which: Which) -> &mut PgNode {
        match which {
            Which::Primary => &mut self.primary,
            Which::Replica => &mut self.replica,
        }
    }

    fn start_node(&mut self, which: Which) -> Result<()> {
        let user = self.user;
        let cwd = self.root.path().to_path_buf();
        let node = self.node(which);
        let mut pg_ctl = user.command("pg_ctl", &cwd);
        pg_ctl
            .args(["start", "-w", "-t", "120", "-D"])
            .arg(&node.data_dir)
            .arg("-l")
            .arg(&node.log);
        run(pg_ctl, &format!("start the {}", node.name))?;
        node.running = true;
        Ok(())
    }

    fn stop_node(&mut self, which: Which, mode: &str) -> Result<()> {
        let user = self.user;
        let cwd = self.root.path().to_path_buf();
        let node = self.node(which);
        let mut pg_ctl = user.command("pg_ctl", &cwd);
        pg_ctl
            .args(["stop", "-w", "-t", "60", "-m", mode, "-D"])
            .arg(&node.data_dir);
        run(pg_ctl, &format!("stop the {}", node.name))?;
        node.running = false;
        Ok(())
    }

    pub fn stop_primary(&mut self) -> Result<()> {
        self.stop_node(Which::Primary, "fast")
    }

    pub fn start_primary(&mut self) -> Result<()> {
        self.start_node(Which::Primary)
    }

    pub fn stop_replica(&mut self) -> Result<()> {
        self.stop_node(Which::Replica, "fast")
    }

    pub fn start_replica(&mut self) -> Result<()> {
        self.start_node(Which::Replica)
    }

    /// `pg_ctl promote` the replica (waits until it accepts writes).
    pub fn promote_replica(&mut self) -> Result<()> {
        let mut pg_ctl = self.user.command("pg_ctl", self.root.path());
        pg_ctl
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(&self.replica.data_dir);
        run(pg_ctl, "promote the replica")
    }

    /// Set `recovery_min_apply_delay` on the replica and reload it. The caller should wait
    /// until `SHOW recovery_min_apply_delay` reports the new value.
    pub fn set_replica_apply_delay(&mut self, delay: Duration) -> Result<()> {
        append(
            &self.replica.data_dir.join("postgresql.conf"),
            &format!("\nrecovery_min_apply_delay = '{}ms'\n", delay.as_millis()),
        )?;
        let mut pg_ctl = self.user.command("pg_ctl", self.root.path());
        pg_ctl.args(["reload", "-D"]).arg(&self.replica.data_dir);
        run(pg_ctl, "reload the replica")
    }

    /// The server log of a node, for failure messages.
    pub fn log(&self, node: &PgNode) -> String {
        fs::read_to_string(&node.log).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Primary,
    Replica,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for which in [Which::Replica, Which::Primary] {
            if self.node(which).running {
                // Immediate: the data is thrown away with the temp dir.
                let _ = self.stop_node(which, "immediate");
            }
        }
    }
}
