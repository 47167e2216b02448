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
pub fn conninfo(
    upstream_host: &str,
    upstream_port: u16,
    user: &str,
    passfile: &std::path::Path,
    application_name: &str,
    dbname: Option<&str>,
) -> String {
    let mut text = format!(
        "host={} port={} user={} passfile={} application_name={} connect_timeout=5",
        conninfo_quote(upstream_host),
        upstream_port,
        conninfo_quote(user),
        conninfo_quote(&passfile.to_string_lossy()),
        conninfo_quote(application_name),
    );
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

/// Renders `pg_hba.conf`: SCRAM everywhere, replication only for the replication user.
pub fn render_pg_hba(replication_user: &str) -> String {
    let mut text = String::from("# Rendered by the pgrs agent: edits are lost.\n");
    text.push_str("local   all          all                       scram-sha-256\n");
    for network in ["0.0.0.0/0", "::/0"] {
        let _ = writeln!(
            text,
            "host    replication  {replication_user:<12} {network:<12} scram-sha-256"
        );
        let _ = writeln!(
            text,
            "host    all          all          {network:<12} scram-sha-256"
        );
    }
    text
}

/// A libpq passfile line matching any host, port and database for `user`.
pub fn passfile_line(user: &str, password: &str) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", escape(user), escape(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PostgresSettings {
        PostgresSettings {
            instance_name: "db-1".into(),
            port: 5433,
            listen_addresses: "127.0.0.1".into(),
            socket_dir: "/run/pgrs".into(),
            max_wal_senders: 10,
            max_replication_slots: 10,
            wal_keep_size_mb: 64,
            max_slot_wal_keep_size_mb: Some(1024),
            archive_command: None,
            synchronous_standby_names: None,
            parameters: BTreeMap::new(),
            parameters_include: None,
        }
    }

    #[test]
    fn primary_config_has_replication_settings_and_no_upstream() {
        let text = render_postgresql_conf(&settings(), None).unwrap();
        for expected in [
            "port = 5433\n",
            "wal_level = replica\n",
            "hot_standby = on\n",
            "max_wal_senders = 10\n",
            "wal_keep_size = '64MB'\n",
            "max_slot_wal_keep_size = '1024MB'\n",
            "archive_mode = off\n",
            "primary_conninfo = ''\n",
            "unix_socket_directories = '/run/pgrs'\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn standby_config_points_at_upstream_with_passfile_and_slot() {
        let standby = StandbySettings {
            upstream: Upstream {
                host: "10.0.0.1".into(),
                port: 5432,
                slot: Some("pgrs_db_1".into()),
            },
            replication_user: "replicator".into(),
            passfile: "/run/pgrs/pgpass".into(),
        };
        let text = render_postgresql_conf(&settings(), Some(&standby)).unwrap();
        assert!(
            text.contains(
                "primary_conninfo = 'host=''10.0.0.1'' port=5432 user=''replicator'' \
             passfile=''/run/pgrs/pgpass'' application_name=''db-1'' connect_timeout=5'\n"
            ),
            "{text}"
        );
        assert!(text.contains("primary_slot_name = 'pgrs_db_1'\n"), "{text}");
        assert!(!text.contains("password="), "{text}");
    }

    #[test]
    fn archive_and_sync_settings_are_rendered_when_asked() {
        let mut s = settings();
        s.archive_command = Some("cp %p /archive/%f".into());
        s.synchronous_standby_names = Some("ANY 1 (*)".into());
        s.max_slot_wal_keep_size_mb = None;
        let text = render_postgresql_conf(&s, None).unwrap();
        assert!(text.contains("archive_mode = on\n"));
        assert!(text.contains("archive_command = 'cp %p /archive/%f'\n"));
        assert!(text.contains("synchronous_standby_names = 'ANY 1 (*)'\n"));
        assert!(text.contains("max_slot_wal_keep_size = -1\n"));
    }

    #[test]
    fn user_parameters_are_quoted_and_agent_owned_ones_refused() {
        let parsed =
            parse_parameters(&["shared_buffers=16MB".into(), "log_line_prefix=it's".into()])
                .unwrap();
        let mut s = settings();
        s.parameters = parsed;
        let text = render_postgresql_conf(&s, None).unwrap();
        assert!(text.contains("shared_buffers = '16MB'\n"));
        assert!(text.contains("log_line_prefix = 'it''s'\n"));
        assert_eq!(
            parse_parameters(&["port=1".into()]),
            Err(ConfigError::AgentOwned("port".into()))
        );
        assert_eq!(
            parse_parameters(&["Primary_Conninfo=x".into()]),
            Err(ConfigError::AgentOwned("primary_conninfo".into()))
        );
        assert!(matches!(
            parse_parameters(&["bad name=1".into()]),
            Err(ConfigError::BadName(_))
        ));
        assert!(matches!(
            parse_parameters(&["novalue".into()]),
            Err(ConfigError::NotAnAssignment(_))
        ));
    }

    #[test]
    fn the_parameters_file_round_trips_the_operator_rendering() {
        let text = "# Managed by pgrs from spec.parameters of the PgReplicaSet.\n\
                    log_line_prefix = 'it''s %m \\\\ '\n\
                    work_mem = '4MB'\n\
                    \n\
                    Shared_Buffers=16MB   # a comment\n";
        let parsed = parse_parameters_file(text).unwrap();
        assert_eq!(
            parsed,
            BTreeMap::from([
                ("log_line_prefix".to_string(), "it's %m \\ ".to_string()),
                ("shared_buffers".to_string(), "16MB".to_string()),
                ("work_mem".to_string(), "4MB".to_string()),
            ])
        );
        let include = render_parameters_include(&parsed);
        assert_eq!(parse_parameters_file(&include).unwrap(), parsed);
    }

    #[test]
    fn the_parameters_file_refuses_directives_owned_names_and_garbage() {
        assert_eq!(
            parse_parameters_file("port = 1\n"),
            Err(ConfigError::AgentOwned("port".into()))
        );
        assert!(matches!(
            parse_parameters_file("include_if_exists = '/etc/x'\n"),
            Err(ConfigError::FileSyntax { line: 1, .. })
        ));
        assert!(matches!(
            parse_parameters_file("# c\nwork_mem = '4MB\n"),
            Err(ConfigError::FileSyntax { line: 2, .. })
        ));
        assert!(matches!(
            parse_parameters_file("work_mem = '4MB' x\n"),
            Err(ConfigError::FileSyntax { line: 1, .. })
        ));
    }

    #[test]
    fn the_include_is_rendered_last_and_the_hash_is_stable() {
        let mut s = settings();
        s.parameters_include = Some("/run/pgrs/parameters.conf".into());
        let text = render_postgresql_conf(&s, None).unwrap();
        assert!(
            text.trim_end()
                .ends_with("include_if_exists = '/run/pgrs/parameters.conf'"),
            "{text}"
        );
        let a = BTreeMap::from([("work_mem".to_string(), "4MB".to_string())]);
        let b = BTreeMap::from([("work_mem".to_string(), "8MB".to_string())]);
        assert_eq!(parameters_hash(&a), parameters_hash(&a.clone()));
        assert_ne!(parameters_hash(&a), parameters_hash(&b));
        assert_ne!(parameters_hash(&a), parameters_hash(&BTreeMap::new()));
        // Name/value boundaries count: {"ab": "c"} is not {"a": "bc"}.
        let ab = BTreeMap::from([("ab".to_string(), "c".to_string())]);
        let a_bc = BTreeMap::from([("a".to_string(), "bc".to_string())]);
        assert_ne!(parameters_hash(&ab), parameters_hash(&a_bc));
        assert_eq!(parameters_hash(&BTreeMap::new()).len(), 16);
    }

    #[test]
    fn parameters_removed_in_the_running_major_are_refused() {
        let parameters = parse_parameters(&["force_parallel_mode=on".into()]).unwrap();
        assert_eq!(check_parameters_for_major(15, &parameters), Ok(()));
        let error = check_parameters_for_major(16, &parameters).unwrap_err();
        assert!(
            error.to_string().contains("PostgreSQL 16")
                && error.to_string().contains("debug_parallel_query"),
            "{error}"
        );
        let fine = parse_parameters(&["work_mem=4MB".into()]).unwrap();
        for major in crate::postgres::version::SUPPORTED_MAJORS {
            assert_eq!(check_parameters_for_major(major, &fine), Ok(()));
        }
    }

    #[test]
    fn nothing_the_agent_renders_is_missing_from_a_supported_major() {
        // What the agent writes must start every supported major: no parameter removed in any
        // of them (promote_trigger_file, gone in 16, above all).
        let mut s = settings();
        s.archive_command = Some("true".into());
        s.synchronous_standby_names = Some("ANY 1 (*)".into());
        let standby = StandbySettings {
            upstream: Upstream {
                host: "h".into(),
                port: 1,
                slot: Some("s".into()),
            },
            replication_user: "r".into(),
            passfile: "/p".into(),
        };
        for text in [
            render_postgresql_conf(&s, None).unwrap(),
            render_postgresql_conf(&s, Some(&standby)).unwrap(),
        ] {
            assert!(!text.contains("promote_trigger_file"), "{text}");
            for line in text
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains(" = "))
            {
                let name = line.split(" = ").next().unwrap();
                for major in crate::postgres::version::SUPPORTED_MAJORS {
                    assert_eq!(
                        crate::postgres::version::removed_parameter(major, name),
                        None,
                        "{name} on {major}"
                    );
                }
            }
        }
    }

    #[test]
    fn hba_uses_scram_only() {
        let text = render_pg_hba("replicator");
        assert!(text.contains("host    replication  replicator"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.ends_with("scram-sha-256"), "{line}");
        }
    }

    #[test]
    fn passfile_escapes_separators() {
        assert_eq!(passfile_line("rep", "a:b\\c"), "*:*:*:rep:a\\:b\\\\c\n");
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(slot_name_for("Db-1.x"), "pgrs_db_1_x");
        assert!(slot_name_for(&"a".repeat(100)).len() <= 63);
    }
}
