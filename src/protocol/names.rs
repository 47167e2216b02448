//! Names that the agent, the controllers and the CRD validation share: the parameters the
//! agent owns, the digest of a parameter set, the replication slot of an instance.

use std::collections::BTreeMap;

/// File in the data directory naming the pgrs cluster it belongs to (copied to replicas by
/// pg_basebackup and pg_rewind along with everything else; written by `pgrs local upgrade` into
/// the upgraded data directory).
pub const CLUSTER_MARKER: &str = "pgrs.cluster";

/// The options of every `initdb` pgrs runs (besides `-D`, `-U` and `--pwfile`): the agent's
/// first primary and `pgrs local upgrade`'s new data directory, which pg_upgrade requires to
/// match the old one (checksums, encoding).
pub const INITDB_OPTIONS: [&str; 5] = [
    "--data-checksums",
    "--auth-local=scram-sha-256",
    "--auth-host=scram-sha-256",
    "--encoding=UTF8",
    "--no-instructions",
];

/// Parameters the agent sets itself; users cannot override them through `--parameter`.
pub const AGENT_OWNED_PARAMETERS: &[&str] = &[
    "archive_command",
    "archive_mode",
    "cluster_name",
    "config_file",
    "data_directory",
    "hba_file",
    "hot_standby",
    "ident_file",
    "listen_addresses",
    "logging_collector",
    "max_replication_slots",
    "max_slot_wal_keep_size",
    "max_wal_senders",
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_target_timeline",
    "restore_command",
    "synchronous_standby_names",
    "unix_socket_directories",
    "wal_keep_size",
    "wal_level",
    "wal_log_hints",
];

/// A stable digest of a parameter set (FNV-1a, 64 bits, hex), so the operator can tell which
/// parameters an agent has applied without comparing whole maps. Not a security measure.
pub fn parameters_hash(parameters: &BTreeMap<String, String>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, value) in parameters {
        for byte in name
            .bytes()
            .chain(std::iter::once(0))
            .chain(value.bytes())
            .chain(std::iter::once(0))
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// The physical slot a replica named `instance` uses on its primary.
pub fn slot_name_for(instance: &str) -> String {
    let cleaned: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("pgrs_{cleaned}");
    name.truncate(63);
    name
}
