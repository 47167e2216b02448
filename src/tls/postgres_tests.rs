//! A real PostgreSQL (ssl=on, SCRAM) behind a certificate from [`super::Authority`], reached
//! through [`super::postgres_connector`] with verify-full semantics and `channel_binding=require`.
//! Skipped when the PostgreSQL 15 binaries are absent. As root, PostgreSQL runs as the
//! `postgres` OS user (it refuses root).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio_postgres::config::{ChannelBinding, SslMode};

use super::{Authority, CertifiedKey, client_config, postgres_connector};

const BIN: &str = "/usr/lib/postgresql/15/bin";
const PASSWORD: &str = "s3cret-for-tls-test";
const DAY: Duration = Duration::from_secs(86_400);

/// A PostgreSQL instance stopped (immediate) on drop.
struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = run_pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a PostgreSQL program (as `postgres` when we are root), panicking with its output on
/// failure.
fn run_pg(program: &str, args: &[&str]) -> std::process::Output {
    let path = Path::new(BIN).join(program);
    let mut command = if as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(&path);
        command
    } else {
        Command::new(&path)
    };
    let output = command.args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn give_to_postgres(path: &Path) {
    if as_root() {
        let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    }
}

fn write_owned(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    give_to_postgres(path);
}

fn start(server: &CertifiedKey) -> Postgres {
    let dir = tempfile::tempdir().unwrap();
    give_to_postgres(dir.path());
    let data = dir.path().join("data");
    let pwfile = dir.path().join("pw");
    write_owned(&pwfile, PASSWORD, 0o600);
    let data_text = data.to_string_lossy().into_owned();
    run_pg(
        "initdb",
        &[
            "-D",
            &data_text,
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "--pwfile",
            &pwfile.to_string_lossy(),
        ],
    );
    write_owned(&data.join("server.crt"), &server.cert_pem, 0o644);
    write_owned(&data.join("server.key"), &server.key_pem, 0o600);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on",
        dir.path().display()
    );
    let log = dir.path().join("log").to_string_lossy().into_owned();
    run_pg(
        "pg_ctl",
        &["-D", &data_text, "-l", &log, "-o", &options, "-w", "start"],
    );
    Postgres {
        _dir: dir,
        data,
        port,
    }
}

async fn connect(ca_pem: &str, host: &str, port: u16) -> Result<bool, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(port)
        .user("postgres")
        .password(PASSWORD)
        .dbname("postgres")
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Require)
        .connect_timeout(Duration::from_secs(5));
    let tls = postgres_connector(client_config(ca_pem, None).unwrap());
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn postgres_accepts_the_pinned_connector_with_channel_binding() {
    if !Path::new(BIN).join("postgres").is_file() {
        eprintln!("skipped: no PostgreSQL binaries in {BIN}");
        return;
    }
    let ca = Authority::generate("test CA", DAY).unwrap();
    let server = ca
        .issue_server("db-0", &["db-0.example".to_string()], &[], DAY)
        .unwrap();
    let postgres = tokio::task::spawn_blocking(move || start(&server))
        .await
        .unwrap();

    let ssl = connect(ca.cert_pem(), "db-0.example", postgres.port).await;
    assert!(ssl.unwrap(), "the session is not encrypted");

    // verify-full: a name the certificate lacks, or another CA, is refused.
    let error = connect(ca.cert_pem(), "db-1.example", postgres.port)
        .await
        .unwrap_err();
    assert!(
        format!("{error:?}").contains("NotValidForName"),
        "{error:?}"
    );
    let other = Authority::generate("other CA", DAY).unwrap();
    let error = connect(other.cert_pem(), "db-0.example", postgres.port)
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
}
