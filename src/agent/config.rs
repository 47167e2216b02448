//! Rendering `postgresql.conf`, `pg_hba.conf` and the libpq passfile from typed settings.
//! Pure: no IO, so every rule is unit-tested.
//!
//! The agent owns the whole configuration: it rewrites `postgresql.conf` and `pg_hba.conf` and
//! empties `postgresql.auto.conf` (all but `synchronous_standby_names`, which the controller sets
//! with ALTER SYSTEM) at every start, promote, follow and rejoin (pg_rewind and pg_basebackup
//! copy the source's files, whose node-specific settings would be wrong here).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::protocol::api::Upstream;
pub use crate::protocol::names::{AGENT_OWNED_PARAMETERS, parameters_hash, slot_name_for};

/// Typed settings of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresSettings {
    /// Instance name: `cluster_name` and the `application_name` it streams with.
    pub instance_name: String,
    pub port: u16,
    /// `listen_addresses` (e.g. `*` in a pod, `127.0.0.1` locally).
    pub listen_addresses: String,
    /// Directory of the Unix socket (the agent's run directory).
    pub socket_dir: PathBuf,
    pub max_wal_senders: u32,
    pub max_replication_slots: u32,
    pub wal_keep_size_mb: u64,
    /// `None` = unlimited (`-1`): a dead replica's slot may fill the disk.
    pub max_slot_wal_keep_size_mb: Option<u64>,
    /// When set, `archive_mode = on` with this `archive_command`.
    pub archive_command: Option<String>,
    /// `synchronous_standby_names`, empty for asynchronous replication.
    pub synchronous_standby_names: Option<String>,
    /// User parameters, rendered last; names in [`AGENT_OWNED_PARAMETERS`] are refused.
    pub parameters: BTreeMap<String, String>,
    /// A file of user parameters the agent rewrites while postgres runs (from
    /// `--parameters-file`, or pushed by the operator), included after everything else so that
    /// its values win; `include_if_exists`, so a missing file is no error.
    pub parameters_include: Option<PathBuf>,
    /// TLS (`ssl = on`, `hostssl` rules, verified peers); `None` = plain TCP as before.
    pub tls: Option<TlsSettings>,
}

/// TLS of one instance: the files postgres serves (copies the agent owns, mode 0600) and the
/// name its peers' certificates are verified against.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The cluster's CA: the only root a peer's certificate may chain to.
    pub ca_file: PathBuf,
    /// The name every instance's certificate carries (one certificate per cluster). A peer
    /// reached by IP is connected with `hostaddr` and verified against this name (`host`):
    /// `sslmode=verify-full` although pod IPs are in no certificate.
    pub server_name: String,
}

/// How a standby reaches its primary.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbySettings {
    pub upstream: Upstream,
    pub replication_user: String,
    /// libpq passfile holding the replication password (never the password itself).
    pub passfile: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to accept parameter {0:?}: the agent owns it (see `pgrs agent --help`)")]
    AgentOwned(String),
    #[error("failed to accept parameter {0:?}: names are lowercase letters, digits, `_` and `.`")]
    BadName(String),
    #[error("failed to parse parameter {0:?}: expected NAME=VALUE")]
    NotAnAssignment(String),
    #[error("failed to parse line {line} of the parameters file: {reason}")]
    FileSyntax { line: usize, reason: String },
    #[error("failed to accept parameter {name:?} on PostgreSQL {major}: {why}")]
    NotInMajor {
        name: String,
        major: u32,
        why: String,
    },
}

/// Refuses parameters that PostgreSQL `major` no longer has (postgres would not start, or not
/// reload, with them), naming the replacement.
pub fn check_parameters_for_major(
    major: u32,
    parameters: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for name in parameters.keys() {
        if let Some(why) = crate::postgres::version::removed_parameter(major, name) {
            return Err(ConfigError::NotInMajor {
                name: name.clone(),
                major,
                why,
            });
        }
    }
    Ok(())
}

/// Parses `NAME=VALUE` user parameters, refusing agent-owned names.
pub fn parse_parameters(items: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut parameters = BTreeMap::new();
    for item in items {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::NotAnAssignment(item.clone()))?;
        let name = name.trim().to_ascii_lowercase();
        validate_parameter_name(&name)?;
        parameters.insert(name, value.trim().to_string());
    }
    Ok(parameters)
}

fn validate_parameter_name(name: &str) -> Result<(), ConfigError> {
    let well_formed = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !well_formed {
        return Err(ConfigError::BadName(name.to_string()));
    }
    if AGENT_OWNED_PARAMETERS.contains(&name) {
        return Err(ConfigError::AgentOwned(name.to_string()));
    }
    Ok(())
}

/// A postgresql.conf string literal.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq conninfo value.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The libpq connection string a standby (or pg_basebackup / pg_rewind) uses to reach `upstream`.
/// With `tls`: `sslmode=verify-full` against the cluster CA and SCRAM with
/// `channel_binding=require`; an upstream given by IP is reached through `hostaddr` and verified
/// as [`TlsSettings::server_name`].
pub fn conninfo(
    upstream_host: &str,
    upstream_port: u16,
    user: &str,
    passfile: &std::path::Path,
    application_name: &str,
    dbname: Option<&str>,
    tls: Option<&TlsSettings>,
) -> String {
    let host = match tls {
        Some(tls) if upstream_host.parse::<std::net::IpAddr>().is_ok() => format!(
            "host={} hostaddr={}",
            conninfo_quote(&tls.server_name),
            conninfo_quote(upstream_host)
        ),
        _ => format!("host={}", conninfo_quote(upstream_host)),
    };
    let mut text = format!(
        "{host} port={} user={} passfile={} application_name={} connect_timeout=5",
        upstream_port,
        conninfo_quote(user),
        conninfo_quote(&passfile.to_string_lossy()),
        conninfo_quote(application_name),
    );
    if let Some(tls) = tls {
        // No client certificate (SCRAM authenticates): name one that is never written, or
        // libpq reads `~/.postgresql/postgresql.crt` of whatever HOME the agent inherited.
        let no_client_cert = tls.ca_file.with_file_name("client.crt");
        let _ = write!(
            text,
            " sslmode=verify-full sslrootcert={} sslcert={} channel_binding=require",
            conninfo_quote(&tls.ca_file.to_string_lossy()),
            conninfo_quote(&no_client_cert.to_string_lossy())
        );
    }
    if let Some(dbname) = dbname {
        let _ = write!(text, " dbname={}", conninfo_quote(dbname));
    }
    text
}

/// Renders `postgresql.conf`. `standby` is `Some` for a replica: the recovery settings are then
/// set (postgres also needs `standby.signal`, which the caller writes).
pub fn render_postgresql_conf(
    settings: &PostgresSettings,
    standby: Option<&StandbySettings>,
) -> Result<String, ConfigError> {
    for name in settings.parameters.keys() {
        validate_parameter_name(name)?;
    }
    let mut lines: Vec<(String, String)> = vec![
        (
            "listen_addresses".into(),
            conf_quote(&settings.listen_addresses),
        ),
        ("port".into(), settings.port.to_string()),
        (
            "unix_socket_directories".into(),
            conf_quote(&settings.socket_dir.to_string_lossy()),
        ),
        ("cluster_name".into(), conf_quote(&settings.instance_name)),
        ("wal_level".into(), "replica".into()),
        ("wal_log_hints".into(), "on".into()),
        ("hot_standby".into(), "on".into()),
        (
            "max_wal_senders".into(),
            settings.max_wal_senders.to_string(),
        ),
        (
            "max_replication_slots".into(),
            settings.max_replication_slots.to_string(),
        ),
        (
            "wal_keep_size".into(),
            format!("'{}MB'", settings.wal_keep_size_mb),
        ),
        (
            "max_slot_wal_keep_size".into(),
            match settings.max_slot_wal_keep_size_mb {
                Some(mb) => format!("'{mb}MB'"),
                None => "-1".into(),
            },
        ),
        ("password_encryption".into(), "'scram-sha-256'".into()),
        // The agent captures stderr and forwards it to its own log.
        ("logging_collector".into(), "off".into()),
        ("log_destination".into(), "'stderr'".into()),
        ("log_line_prefix".into(), "'%m [%p] '".into()),
        ("recovery_target_timeline".into(), "'latest'".into()),
    ];
    match &settings.tls {
        Some(tls) => {
            lines.push(("ssl".into(), "on".into()));
            lines.push((
                "ssl_cert_file".into(),
                conf_quote(&tls.cert_file.to_string_lossy()),
            ));
            lines.push((
                "ssl_key_file".into(),
                conf_quote(&tls.key_file.to_string_lossy()),
            ));
            lines.push((
                "ssl_ca_file".into(),
                conf_quote(&tls.ca_file.to_string_lossy()),
            ));
            lines.push(("ssl_min_protocol_version".into(), "'TLSv1.2'".into()));
        }
        None => lines.push(("ssl".into(), "off".into())),
    }
    match &settings.archive_command {
        Some(command) => {
            lines.push(("archive_mode".into(), "on".into()));
            lines.push(("archive_command".into(), conf_quote(command)));
        }
        None => lines.push(("archive_mode".into(), "off".into())),
    }
    lines.push((
        "synchronous_standby_names".into(),
        conf_quote(settings.synchronous_standby_names.as_deref().unwrap_or("")),
    ));
    match standby {
        Some(standby) => {
            let info = conninfo(
                &standby.upstream.host,
                standby.upstream.port,
                &standby.replication_user,
                &standby.passfile,
                &settings.instance_name,
                None,
                settings.tls.as_ref(),
            );
            lines.push(("primary_conninfo".into(), conf_quote(&info)));
            lines.push((
                "primary_slot_name".into(),
                conf_quote(standby.upstream.slot.as_deref().unwrap_or("")),
            ));
        }
        None => {
            lines.push(("primary_conninfo".into(), "''".into()));
            lines.push(("primary_slot_name".into(), "''".into()));
        }
    }
    let mut text = String::from(
        "# Rendered by the pgrs agent at every start and role change: edits are lost.\n\
         # Set parameters with `pgrs agent --parameter NAME=VALUE`.\n",
    );
    for (name, value) in lines {
        let _ = writeln!(text, "{name} = {value}");
    }
    if !settings.parameters.is_empty() {
        text.push_str("\n# User parameters\n");
        for (name, value) in &settings.parameters {
            let _ = writeln!(text, "{name} = {}", conf_quote(value));
        }
    }
    if let Some(include) = &settings.parameters_include {
        text.push_str("\n# User parameters applied while running (reload or restart)\n");
        let _ = writeln!(
            text,
            "include_if_exists = {}",
            conf_quote(&include.to_string_lossy())
        );
    }
    Ok(text)
}

/// Parses a parameters file in `postgresql.conf` syntax, as the operator renders
/// `spec.parameters` into its ConfigMap: `name = 'value'` (or an unquoted value) per line,
/// `#` comments, blank lines. Directives (`include ...`) and agent-owned names are refused, so
/// the file can never change what the agent manages.
pub fn parse_parameters_file(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut parameters = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let syntax = |reason: &str| ConfigError::FileSyntax {
            line,
            reason: reason.to_string(),
        };
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let name_end = trimmed
            .find(|c: char| c == '=' || c.is_whitespace())
            .ok_or_else(|| syntax("expected name = value"))?;
        let name = trimmed[..name_end].to_ascii_lowercase();
        validate_parameter_name(&name)?;
        if name.starts_with("include") {
            return Err(syntax("include directives are not accepted"));
        }
        let rest = trimmed[name_end..].trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        let (value, tail) = match rest.strip_prefix('\'') {
            Some(quoted) => unquote(quoted).ok_or_else(|| syntax("unterminated quoted value"))?,
            None => {
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '#')
                    .unwrap_or(rest.len());
                (rest[..end].to_string(), &rest[end..])
            }
        };
        let tail = tail.trim_start();
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err(syntax("unexpected text after the value"));
        }
        parameters.insert(name, value);
    }
    Ok(parameters)
}

/// The inside of a `'...'` literal (after the opening quote): `''` is a quote, a backslash
/// escapes the next character. Returns the value and what follows the closing quote.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((index, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?.1),
            '\'' if chars.peek().is_some_and(|(_, next)| *next == '\'') => {
                chars.next();
                value.push('\'');
            }
            '\'' => return Some((value, &text[index + 1..])),
            other => value.push(other),
        }
    }
    None
}

/// The include file of user parameters, rendered from parsed parameters (never copied
/// verbatim from the source file).
pub fn render_parameters_include(parameters: &BTreeMap<String, String>) -> String {
    let mut text = String::from(
        "# Written by the pgrs agent from its parameters file (or the operator): edits are lost.\n",
    );
    for (name, value) in parameters {
        let _ = writeln!(text, "{name} = {}", conf_quote(value));
    }
    text
}

/// Renders `pg_hba.conf`: SCRAM everywhere, replication only for the replication user. With
/// `tls`, remote connections must use TLS (`hostssl`; `hostnossl ... reject`); loopback ones
/// (the agent's own tools, `kubectl port-forward`, local mode's clients) never leave the host
/// and may be plain. With `refused_superuser` (the default: no `--superuser-access`), that
/// role may log in over the socket and loopback only: every other address is rejected before
/// the SCRAM rules (`spec.enableSuperuserAccess: false`).
pub fn render_pg_hba(replication_user: &str, tls: bool, refused_superuser: Option<&str>) -> String {
    let mut text = String::from("# Rendered by the pgrs agent: edits are lost.\n");
    text.push_str("local   all          all                       scram-sha-256\n");
    let superuser = refused_superuser.unwrap_or_default();
    let refuse = refused_superuser.is_some();
    let remote = if tls { "hostssl" } else { "host" };
    // (type, database, user, networks, method), in order: the first matching line decides.
    // Loopback first: what never leaves the host may be plain, and the superuser may use it.
    let mut rules: Vec<(&str, &str, &str, &[&str], &str)> = Vec::new();
    if tls || refuse {
        rules.push((
            "host",
            "replication",
            replication_user,
            LOOPBACK,
            "scram-sha-256",
        ));
        rules.push(("host", "all", "all", LOOPBACK, "scram-sha-256"));
    }
    if refuse {
        rules.push((remote, "all", superuser, ANYWHERE, "reject"));
    }
    rules.extend(if tls {
        vec![
            (
                "hostssl",
                "replication",
                replication_user,
                ANYWHERE,
                "scram-sha-256",
            ),
            ("hostssl", "all", "all", ANYWHERE, "scram-sha-256"),
            ("hostnossl", "replication", "all", ANYWHERE, "reject"),
            ("hostnossl", "all", "all", ANYWHERE, "reject"),
        ]
    } else {
        vec![
            (
                "host",
                "replication",
                replication_user,
                ANYWHERE,
                "scram-sha-256",
            ),
            ("host", "all", "all", ANYWHERE, "scram-sha-256"),
        ]
    });
    for (kind, database, user, networks, method) in rules {
        for network in networks {
            let _ = writeln!(
                text,
                "{kind:<9} {database:<12} {user:<12} {network:<12} {method}"
            );
        }
    }
    text
}

const LOOPBACK: &[&str] = &["127.0.0.1/32", "::1/128"];
const ANYWHERE: &[&str] = &["0.0.0.0/0", "::/0"];

/// A libpq passfile line matching any host, port and database for `user`.
pub fn passfile_line(user: &str, password: &str) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", escape(user), escape(password))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
