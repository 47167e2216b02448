//! What `spec.parameters` may not contain, in one table: the CRD's CEL rules (admission) and the
//! operator's own validation are both built from it, so the API server and the operator refuse
//! the same parameters with the same words. Pure.
//!
//! The classes follow what CloudNativePG keeps from its users (settings an operator must own
//! for replication, failover and security to hold), written for what pgrs does: shell
//! commands, TLS, crash safety, crash restarts, recovery targets, code loading, file paths
//! and include directives. The agent's own list ([`AGENT_OWNED_PARAMETERS`]) is the first
//! class.

use std::collections::BTreeMap;

use schemars::Schema;
use serde_json::{Value, json};

use crate::protocol::names::AGENT_OWNED_PARAMETERS;

/// At most this many parameters (bounds the CEL cost estimate of the rules below).
pub const MAX_PARAMETERS: u64 = 256;

/// Longest parameter name (PostgreSQL's own are under 45 characters; `NAMEDATALEN - 1`).
pub const MAX_NAME_LEN: usize = 63;

/// Longest parameter value, in characters.
pub const MAX_VALUE_LEN: usize = 4096;

/// Libraries a preload list may name: contrib modules that every PostgreSQL package of the
/// image ships, and that are safe to load into every server process.
pub const PRELOAD_ALLOW_LIST: &[&str] = &["pg_stat_statements", "auto_explain", "pg_prewarm"];

/// Preload lists accepted when each of their comma-separated entries is in
/// [`PRELOAD_ALLOW_LIST`] (a blank value is an empty list). `local_preload_libraries` is refused
/// outright: it loads from `$libdir/plugins/`, where the image installs no library, so every
/// new connection would fail.
pub const ALLOW_LISTED_PRELOADS: &[&str] =
    &["shared_preload_libraries", "session_preload_libraries"];

/// Why a preloaded library must be allow-listed.
const PRELOAD_WHY: &str = "a library postgres cannot load keeps it from starting, and a preloaded one runs inside every server process";

/// A set of refused parameters and the reason shared by all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedClass {
    /// Refused names.
    pub names: &'static [&'static str],
    /// Every name starting with one of these is refused too.
    pub prefixes: &'static [&'static str],
    /// Why, as the message says it after "cannot be set: ".
    pub why: &'static str,
}

/// The refused parameters. A name belongs to the first class that covers it (the agent's
/// `recovery_target_timeline` is the agent's, not a recovery target).
pub const REFUSED: &[RefusedClass] = &[
    RefusedClass {
        names: AGENT_OWNED_PARAMETERS,
        prefixes: &[],
        why: "the agent sets it itself (ports, paths, replication, archiving, logging)",
    },
    RefusedClass {
        names: &["archive_cleanup_command", "recovery_end_command"],
        prefixes: &[],
        why: "it runs a shell command as the postgres user, and WAL archiving and recovery are the agent's",
    },
    RefusedClass {
        names: &[
            "ssl",
            "ssl_ca_file",
            "ssl_cert_file",
            "ssl_ciphers",
            "ssl_crl_dir",
            "ssl_crl_file",
            "ssl_dh_params_file",
            "ssl_ecdh_curve",
            "ssl_groups",
            "ssl_key_file",
            "ssl_max_protocol_version",
            "ssl_min_protocol_version",
            "ssl_passphrase_command",
            "ssl_passphrase_command_supports_reload",
            "ssl_prefer_server_ciphers",
            "ssl_tls13_ciphers",
        ],
        prefixes: &["ssl_"],
        why: "TLS settings (certificates, ciphers, protocol versions, passphrase command) are reserved for pgrs",
    },
    RefusedClass {
        names: &["full_page_writes", "data_sync_retry"],
        prefixes: &[],
        why: "crash safety: without full-page writes a crash can leave torn pages (and pg_rewind needs them), and data_sync_retry could carry on after a failed fsync",
    },
    RefusedClass {
        names: &["restart_after_crash"],
        prefixes: &[],
        why: "the agent restarts a crashed postgres itself, under its fencing checks",
    },
    RefusedClass {
        // recovery_target_timeline: the agent's (first class).
        names: &[
            "recovery_target",
            "recovery_target_action",
            "recovery_target_inclusive",
            "recovery_target_lsn",
            "recovery_target_name",
            "recovery_target_time",
            "recovery_target_xid",
        ],
        prefixes: &["recovery_target"],
        why: "a recovery target would stop or promote a standby; pgrs runs no point-in-time recovery",
    },
    RefusedClass {
        names: &[
            "dynamic_library_path",
            "extension_control_path",
            "local_preload_libraries",
            "jit_provider",
            "archive_library",
        ],
        prefixes: &[],
        why: "it loads server code from a path or library pgrs does not control",
    },
    RefusedClass {
        // data_directory, config_file, hba_file, ident_file, unix_socket_directories: the
        // agent's (first class).
        names: &[
            "external_pid_file",
            "log_directory",
            "stats_temp_directory",
            "unix_socket_group",
            "unix_socket_permissions",
        ],
        prefixes: &["unix_socket_"],
        why: "it names a file, directory or socket of the server, which pgrs lays out (logs go to stderr)",
    },
    RefusedClass {
        names: &["include", "include_dir", "include_if_exists"],
        prefixes: &["include"],
        why: "include directives would read other files into postgresql.conf",
    },
];

/// A parameter set that admission (and so the operator) refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    #[error("{}", refused_message(names, why))]
    Refused { names: String, why: &'static str },
    #[error("{} (not allowed: {entries})", preload_message(parameter))]
    LibraryNotAllowed {
        parameter: &'static str,
        entries: String,
    },
    #[error("spec.parameters.{name}: {}", name_too_long_why())]
    NameTooLong { name: String },
    #[error("spec.parameters.{name}: {len} characters; values have at most {MAX_VALUE_LEN}")]
    ValueTooLong { name: String, len: usize },
    #[error("spec.parameters.{name}: {VALUE_LINE_WHY}")]
    ValueNotOneLine { name: String },
}

fn refused_message(names: &str, why: &str) -> String {
    format!("spec.parameters: {names} cannot be set: {why}")
}

fn preload_message(parameter: &str) -> String {
    format!(
        "spec.parameters.{parameter}: every comma-separated entry must be one of {}: {PRELOAD_WHY}",
        PRELOAD_ALLOW_LIST.join(", ")
    )
}

fn name_too_long_why() -> String {
    format!("parameter names have at most {MAX_NAME_LEN} characters")
}

/// Why a value must be one line without NUL.
const VALUE_LINE_WHY: &str =
    "values must be one line without NUL characters (postgresql.conf holds one parameter per line)";

/// The class `name` belongs to, if it is refused: the class listing it, else the class with a
/// prefix of it.
pub fn refusal(name: &str) -> Option<&'static RefusedClass> {
    REFUSED
        .iter()
        .find(|class| class.names.contains(&name))
        .or_else(|| {
            REFUSED
                .iter()
                .find(|class| class.prefixes.iter().any(|p| name.starts_with(p)))
        })
}

/// Whether any class lists `name` itself.
fn listed(name: &str) -> bool {
    REFUSED.iter().any(|class| class.names.contains(&name))
}

fn not_one_line(value: &str) -> bool {
    value.contains(['\n', '\r', '\0'])
}

/// The entries of a preload list that are not allow-listed, joined (empty: all allowed).
fn disallowed_entries(value: &str) -> String {
    if value.trim().is_empty() {
        return String::new();
    }
    let bad: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|entry| !PRELOAD_ALLOW_LIST.contains(entry))
        .collect();
    bad.join(", ")
}

/// The operator's check of `spec.parameters`: the same rules as [`parameters_rules`], in the
/// same order, with the same messages (the first failure).
pub fn check(parameters: &BTreeMap<String, String>) -> Result<(), ParameterError> {
    for (name, value) in parameters {
        if name.chars().count() > MAX_NAME_LEN {
            return Err(ParameterError::NameTooLong { name: name.clone() });
        }
        let len = value.chars().count();
        if len > MAX_VALUE_LEN {
            return Err(ParameterError::ValueTooLong {
                name: name.clone(),
                len,
            });
        }
        if not_one_line(value) {
            return Err(ParameterError::ValueNotOneLine { name: name.clone() });
        }
    }
    for class in REFUSED {
        // Listed names in the order of the list, as the CEL message names them.
        let listed_here: Vec<&str> = class
            .names
            .iter()
            .copied()
            .filter(|name| parameters.contains_key(*name))
            .collect();
        let by_prefix: Vec<&str> = parameters
            .keys()
            .map(String::as_str)
            .filter(|name| !listed(name) && class.prefixes.iter().any(|p| name.starts_with(p)))
            .collect();
        for names in [listed_here, by_prefix] {
            if !names.is_empty() {
                return Err(ParameterError::Refused {
                    names: names.join(", "),
                    why: class.why,
                });
            }
        }
    }
    for parameter in ALLOW_LISTED_PRELOADS {
        if let Some(value) = parameters.get(*parameter) {
            let entries = disallowed_entries(value);
            if !entries.is_empty() {
                return Err(ParameterError::LibraryNotAllowed { parameter, entries });
            }
        }
    }
    Ok(())
}

/// A CEL string literal.
fn cel_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn cel_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(cel_string).collect();
    format!("[{}]", items.join(", "))
}

/// Listed names per CEL rule.
const NAMES_PER_RULE: usize = 6;

/// A CEL expression naming the first of `names` present in the map: a chain of conditionals
/// on literals (joining a filtered list costs far more in the API server's estimate).
fn first_present(names: &[&str]) -> String {
    match names.split_first() {
        None => "''".to_string(),
        Some((name, [])) => cel_string(name),
        Some((name, rest)) => {
            let name = cel_string(name);
            format!("({name} in self ? {name} : {})", first_present(rest))
        }
    }
}

/// The CEL rules on `spec.parameters` itself (the map). Map keys have no length bound the API
/// server's cost estimate could use, so the listed names are looked up in the map (`n in self`,
/// and the message names the first one found) rather than compared key by key; only the
/// prefix catch-alls iterate the keys, with a static message.
fn map_rules() -> Vec<Value> {
    let mut rules = vec![
        json!({
            "rule": "self.all(name, name.matches('^[a-z][a-z0-9_.]*$'))",
            "message": "spec.parameters: names must be lowercase PostgreSQL parameter names (letters, digits, '_' and '.')"
        }),
        json!({
            "rule": format!("self.all(name, size(name) <= {MAX_NAME_LEN})"),
            "message": format!("spec.parameters: {}", name_too_long_why())
        }),
    ];
    let every_listed: Vec<&str> = REFUSED
        .iter()
        .flat_map(|class| class.names.iter().copied())
        .collect();
    for class in REFUSED {
        // In chunks: the message's chain of conditionals nests once per name, and deep
        // nesting overflows the stack of CEL parsers (kube-cel's in the tests).
        for chunk in class.names.chunks(NAMES_PER_RULE) {
            let names = cel_list(chunk.iter().copied());
            rules.push(json!({
                "rule": format!("{names}.all(n, !(n in self))"),
                "message": refused_message(&chunk.join(", "), class.why),
                "messageExpression": format!(
                    "{} + {} + {}",
                    cel_string("spec.parameters: "),
                    first_present(chunk),
                    cel_string(&format!(" cannot be set: {}", class.why)),
                ),
            }));
        }
        if !class.prefixes.is_empty() {
            let starts: Vec<String> = class
                .prefixes
                .iter()
                .map(|p| format!("name.startsWith({})", cel_string(p)))
                .collect();
            let exempt: Vec<&str> = every_listed
                .iter()
                .copied()
                .filter(|name| class.prefixes.iter().any(|p| name.starts_with(p)))
                .collect();
            let patterns: Vec<String> = class.prefixes.iter().map(|p| format!("{p}*")).collect();
            rules.push(json!({
                "rule": format!(
                    "self.all(name, !({}) || name in {})",
                    starts.join(" || "),
                    cel_list(exempt)
                ),
                "message": refused_message(&patterns.join(", "), class.why),
            }));
        }
    }
    let allowed = cel_list(PRELOAD_ALLOW_LIST.iter().copied());
    for parameter in ALLOW_LISTED_PRELOADS {
        let value = format!("self[{}]", cel_string(parameter));
        rules.push(json!({
            "rule": format!(
                "!({} in self) || {value}.trim() == '' || {value}.split(',').all(entry, entry.trim() in {allowed})",
                cel_string(parameter)
            ),
            "message": preload_message(parameter),
        }));
    }
    rules
}

/// `#[schemars(transform)]` of `spec.parameters`: bounded names and values, no refused
/// parameter, allow-listed preload lists.
pub fn parameters_rules(schema: &mut Schema) {
    schema.insert("maxProperties".into(), json!(MAX_PARAMETERS));
    schema.insert(
        "additionalProperties".into(),
        json!({
            "type": "string",
            "maxLength": MAX_VALUE_LEN,
            "x-kubernetes-validations": [{
                "rule": "!self.contains('\\n') && !self.contains('\\r') && !self.contains('\\u0000')",
                "message": VALUE_LINE_WHY,
            }],
        }),
    );
    schema.insert("x-kubernetes-validations".into(), Value::Array(map_rules()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn refused(pairs: &[(&str, &str)]) -> String {
        match check(&params(pairs)) {
            Ok(()) => panic!("{pairs:?} accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn ordinary_parameters_pass() {
        let ok = params(&[
            ("work_mem", "16MB"),
            ("shared_buffers", "256MB"),
            ("log_min_duration_statement", "250ms"),
            ("pg_stat_statements.track", "all"),
            ("auto_explain.log_min_duration", "10s"),
            ("fsync", "on"),
        ]);
        assert_eq!(check(&ok), Ok(()));
    }

    #[test]
    fn every_class_is_refused_with_the_name_and_why() {
        for (name, phrase) in [
            ("port", "the agent sets it itself"),
            ("archive_command", "the agent sets it itself"),
            ("restore_command", "the agent sets it itself"),
            ("archive_cleanup_command", "shell command"),
            ("recovery_end_command", "shell command"),
            ("ssl", "TLS settings"),
            ("ssl_ciphers", "TLS settings"),
            ("ssl_passphrase_command", "TLS settings"),
            ("full_page_writes", "crash safety"),
            ("data_sync_retry", "crash safety"),
            ("restart_after_crash", "restarts a crashed postgres"),
            ("recovery_target", "recovery target"),
            ("recovery_target_time", "recovery target"),
            ("recovery_target_action", "recovery target"),
            ("dynamic_library_path", "loads server code"),
            ("local_preload_libraries", "loads server code"),
            ("jit_provider", "loads server code"),
            ("external_pid_file", "file, directory or socket"),
            ("log_directory", "file, directory or socket"),
            ("unix_socket_permissions", "file, directory or socket"),
            ("unix_socket_group", "file, directory or socket"),
            ("include", "include directives"),
            ("include_dir", "include directives"),
            ("include_if_exists", "include directives"),
        ] {
            let message = refused(&[(name, "x")]);
            assert!(
                message.contains(&format!("spec.parameters: {name} cannot be set: "))
                    && message.contains(phrase),
                "{name}: {message}"
            );
        }
    }

    #[test]
    fn a_listed_name_belongs_to_the_class_listing_it() {
        // recovery_target_timeline and unix_socket_directories are the agent's.
        for name in ["recovery_target_timeline", "unix_socket_directories"] {
            assert_eq!(refusal(name), Some(&REFUSED[0]), "{name}");
        }
        // No name is listed twice.
        let mut seen = std::collections::BTreeSet::new();
        for class in REFUSED {
            for name in class.names {
                assert!(seen.insert(*name), "{name} listed twice");
            }
        }
    }

    #[test]
    fn several_refused_names_of_one_class_are_named_together() {
        let message = refused(&[("ssl", "on"), ("ssl_ciphers", "HIGH"), ("work_mem", "1MB")]);
        assert_eq!(
            message,
            format!(
                "spec.parameters: ssl, ssl_ciphers cannot be set: {}",
                REFUSED[2].why
            )
        );
    }

    #[test]
    fn preload_lists_take_allow_listed_libraries_only() {
        for value in [
            "pg_stat_statements",
            "pg_stat_statements, auto_explain",
            " auto_explain,pg_prewarm ",
            "",
        ] {
            for parameter in ALLOW_LISTED_PRELOADS {
                assert_eq!(check(&params(&[(parameter, value)])), Ok(()), "{value:?}");
            }
        }
        let message = refused(&[("shared_preload_libraries", "pg_stat_statements, evil")]);
        assert!(
            message.starts_with("spec.parameters.shared_preload_libraries: every comma-separated entry must be one of pg_stat_statements"),
            "{message}"
        );
        assert!(message.contains("not allowed: evil"), "{message}");
        let message = refused(&[("session_preload_libraries", "/tmp/x.so")]);
        assert!(message.contains("not allowed: /tmp/x.so"), "{message}");
        // Empty entries load nothing and hide mistakes.
        assert!(check(&params(&[("shared_preload_libraries", "auto_explain,,")])).is_err());
    }

    #[test]
    fn values_are_one_bounded_line() {
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            refused(&[("work_mem", &long)]),
            format!(
                "spec.parameters.work_mem: 4097 characters; values have at most {MAX_VALUE_LEN}"
            )
        );
        let longest = "x".repeat(MAX_VALUE_LEN);
        assert_eq!(check(&params(&[("application_name", &longest)])), Ok(()));
        for value in ["1MB\nport = 5433", "a\rb", "a\0b"] {
            let message = refused(&[("work_mem", value)]);
            assert!(
                message.starts_with("spec.parameters.work_mem: values must be one line"),
                "{message}"
            );
        }
        let name = "a".repeat(MAX_NAME_LEN + 1);
        assert!(refused(&[(&name, "1")]).contains("at most 63 characters"));
    }

    #[test]
    fn names_a_list_misses_are_caught_by_their_prefix() {
        assert_eq!(
            refused(&[("ssl_some_future_setting", "x")]),
            format!(
                "spec.parameters: ssl_some_future_setting cannot be set: {}",
                REFUSED[2].why
            )
        );
        // No name matches the prefixes of two classes.
        for class in REFUSED {
            for prefix in class.prefixes {
                let owners = REFUSED
                    .iter()
                    .filter(|other| other.prefixes.iter().any(|p| prefix.starts_with(p)))
                    .count();
                assert_eq!(owners, 1, "{prefix}");
            }
        }
    }

    #[test]
    fn the_prefix_rules_exempt_the_listed_names() {
        let rules = map_rules();
        let recovery = rules
            .iter()
            .find(|rule| rule["message"] == "spec.parameters: recovery_target* cannot be set: a recovery target would stop or promote a standby; pgrs runs no point-in-time recovery")
            .expect("the recovery_target prefix rule");
        let rule = recovery["rule"].as_str().expect("rule text");
        assert!(rule.starts_with("self.all(name, !(name.startsWith('recovery_target')) || name in ['recovery_target_timeline', 'recovery_target', "), "{rule}");
        assert_eq!(cel_string("it's"), "'it\\'s'");
    }
}
