//! Bootstrap of a data directory: initdb for a first primary, pg_basebackup for a replica (into
//! a staging directory renamed into place when complete), and preparing the upstream (its
//! system identifier and the replica's slot) for a clone or a rejoin.

use std::path::Path;

use crate::agent::config;
use crate::postgres::probe::{self, ProbeError};
use crate::postgres::process::{PgBinaries, ToolError, read_controldata, run_tool};
use crate::postgres::slots;
use crate::postgres::version::{VersionError, major_of_version_num};
use crate::protocol::api::Upstream;

use super::{
    AgentConfig, DataDirState, InstanceError, check_identity, create_private_dir, inspect_data_dir,
    io_error, read_marker, sibling, write_configuration, write_marker, write_private_file,
};

/// Bootstraps a first primary with initdb (data checksums on, so pg_rewind works), or checks
/// an existing data directory. Returns the system identifier.
pub async fn bootstrap_primary(config: &AgentConfig) -> Result<String, InstanceError> {
    let data_dir = &config.data_dir;
    match inspect_data_dir(data_dir)? {
        DataDirState::Initialized => {
            let id = check_identity(config, data_dir, None).await?;
            tracing::info!(data_dir = %data_dir.display(), system_identifier = %id, "using existing data directory");
            write_configuration(config, data_dir, None)?;
            return Ok(id);
        }
        DataDirState::NotPostgres => {
            return Err(InstanceError::NotADataDir {
                path: data_dir.clone(),
            });
        }
        DataDirState::Missing | DataDirState::Empty => {}
    }
    create_private_dir(&config.identity, data_dir)?;
    // initdb reads the superuser password from a file; it lives in the run dir only meanwhile.
    let pwfile = config.run_dir.join("initdb.pw");
    write_private_file(
        &config.identity,
        &pwfile,
        &format!("{}\n", config.superuser_password.current().expose()),
    )?;
    let mut command = config.identity.command(config.binaries.tool("initdb"));
    command
        .arg("-D")
        .arg(data_dir)
        .arg("-U")
        .arg(&config.superuser)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(crate::protocol::names::INITDB_OPTIONS);
    tracing::info!(data_dir = %data_dir.display(), "initializing a new cluster with initdb");
    let result = run_tool("initdb", command).await;
    let _ = std::fs::remove_file(&pwfile);
    result.map_err(InstanceError::Initdb)?;
    write_marker(config, data_dir)?;
    write_configuration(config, data_dir, None)?;
    let control = read_controldata(&config.binaries, &config.identity, data_dir).await?;
    Ok(control.system_identifier)
}

/// What [`prepare_upstream`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedUpstream {
    pub system_identifier: String,
    /// The primary's major version (checked to be this instance's).
    pub server_major: u32,
    /// The slot did not exist and was created now (drop it again if the clone fails).
    pub slot_created: bool,
}

/// Reads the primary's system identifier and major (refusing a primary of another major than
/// this instance's binaries) and ensures the replica's slot exists on it.
pub async fn prepare_upstream(
    config: &AgentConfig,
    upstream: &Upstream,
) -> Result<PreparedUpstream, InstanceError> {
    let target = config.replication_target(&upstream.host, upstream.port);
    let client = probe::connect(&target, config.primary_timeout)
        .await
        .map_err(|error| InstanceError::PrimaryUnreachable {
            host: upstream.host.clone(),
            port: upstream.port,
            cause: error.cause(),
        })?;
    prepare_upstream_with(&client, upstream, &config.binaries).await
}

/// [`prepare_upstream`] on an open session to the primary (as the replication role).
pub async fn prepare_upstream_with(
    client: &tokio_postgres::Client,
    upstream: &Upstream,
    binaries: &PgBinaries,
) -> Result<PreparedUpstream, InstanceError> {
    let probe_error = |source| InstanceError::Probe {
        host: upstream.host.clone(),
        port: upstream.port,
        source,
    };
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_setting('server_version_num')::int \
             FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|source| {
            probe_error(ProbeError::Query {
                what: "system identifier",
                source,
            })
        })?;
    let system_identifier: String = row.get(0);
    let server_major = major_of_version_num(row.get::<_, i32>(1).max(0) as u32);
    // pg_basebackup and pg_rewind of one major work on a primary of another only in part, and
    // postgres would then refuse the copied directory: refuse before anything is copied.
    if server_major != binaries.major() {
        return Err(VersionError::UpstreamMismatch {
            host: upstream.host.clone(),
            port: upstream.port,
            upstream_major: server_major,
            bin_dir: binaries.dir().to_path_buf(),
            binaries_major: binaries.major(),
        }
        .into());
    }
    let mut slot_created = false;
    if let Some(slot) = &upstream.slot {
        // Reserve WAL now, so nothing the new replica needs is recycled before it connects.
        slot_created = slots::create_physical_slot(client, slot)
            .await
            .map_err(|source| InstanceError::Slot {
                host: upstream.host.clone(),
                port: upstream.port,
                source,
            })?;
    }
    Ok(PreparedUpstream {
        system_identifier,
        server_major,
        slot_created,
    })
}

/// Drops a slot this agent created on `upstream` for a clone that then failed, so it does not
/// pin WAL on the primary forever. Best effort: the clone's error is what matters.
async fn drop_created_slot(config: &AgentConfig, upstream: &Upstream) {
    let Some(slot) = &upstream.slot else {
        return;
    };
    let target = config.replication_target(&upstream.host, upstream.port);
    let result = match probe::connect(&target, config.primary_timeout).await {
        Ok(client) => slots::drop_inactive_slot(&client, slot)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = result {
        tracing::warn!(%error, slot, "failed to drop the slot of a failed clone");
    }
}

/// Clones `upstream` into `target_dir` (created empty, 0700) with pg_basebackup `-X stream`,
/// then renders this instance's configuration and `standby.signal` into it.
pub async fn clone_from(
    config: &AgentConfig,
    upstream: &Upstream,
    target_dir: &Path,
) -> Result<(), InstanceError> {
    create_private_dir(&config.identity, target_dir)?;
    let conninfo = config::conninfo(
        &upstream.host,
        upstream.port,
        &config.replication_user,
        &config.passfile(),
        config.name(),
        None,
        config.settings.tls.as_ref(),
    );
    let mut command = config
        .identity
        .command(config.binaries.tool("pg_basebackup"));
    command.arg("-D").arg(target_dir).args([
        "-X",
        "stream",
        "-c",
        "fast",
        "--no-password",
        "-d",
        &conninfo,
    ]);
    if let Some(slot) = &upstream.slot {
        command.args(["-S", slot]);
    }
    tracing::info!(host = %upstream.host, port = upstream.port, target = %target_dir.display(), "cloning with pg_basebackup");
    run_tool("pg_basebackup", command)
        .await
        .map_err(|error| InstanceError::BaseBackup {
            host: upstream.host.clone(),
            port: upstream.port,
            cause: match &error {
                ToolError::Failed { stderr, .. } => stderr.clone(),
                other => other.to_string(),
            },
        })?;
    write_marker(config, target_dir)?;
    write_configuration(config, target_dir, Some(upstream))
}

/// Bootstraps a replica of `upstream` (pg_basebackup into a staging directory, renamed into
/// place only when complete), or checks and reconfigures an existing one. Returns the system
/// identifier.
pub async fn bootstrap_replica(
    config: &AgentConfig,
    upstream: &Upstream,
) -> Result<String, InstanceError> {
    let data_dir = &config.data_dir;
    let state = inspect_data_dir(data_dir)?;
    if state == DataDirState::NotPostgres {
        return Err(InstanceError::NotADataDir {
            path: data_dir.clone(),
        });
    }
    if state == DataDirState::Initialized {
        super::check_data_dir_major(config, data_dir)?;
        // An existing standby must start even when its primary is down (it may be the one to
        // promote); the system identifier is then checked against the cluster marker only.
        // A directory last run as a primary is rewound before it serves (the supervisor's
        // start): pg_rewind checks the system identifier and the rejoin ensures the slot, so
        // this handshake with the primary would be spent twice.
        // Only for a directory of this cluster: any other is checked against the primary, so
        // that the refusal names the primary's identifier.
        let last_primary = read_marker(data_dir).as_deref() == Some(config.cluster.as_str())
            && !data_dir.join("backup_label").exists()
            && read_controldata(&config.binaries, &config.identity, data_dir)
                .await
                .is_ok_and(|c| matches!(c.cluster_state.as_str(), "in production" | "shut down"));
        let primary_id = if last_primary {
            None
        } else {
            match prepare_upstream(config, upstream).await {
                Ok(prepared) => Some(prepared.system_identifier),
                Err(InstanceError::PrimaryUnreachable { cause, .. }) => {
                    tracing::warn!(%cause, "primary unreachable; starting the existing standby anyway");
                    None
                }
                Err(other) => return Err(other),
            }
        };
        let id = check_identity(config, data_dir, primary_id.as_deref()).await?;
        tracing::info!(data_dir = %data_dir.display(), system_identifier = %id, "using existing data directory as a standby");
        write_configuration(config, data_dir, Some(upstream))?;
        return Ok(id);
    }
    let prepared = prepare_upstream(config, upstream).await?;
    let staging = sibling(data_dir, "bootstrap");
    if staging.exists() {
        // Our own leftover from an interrupted bootstrap: never a user's directory.
        std::fs::remove_dir_all(&staging)
            .map_err(io_error("remove stale staging directory", &staging))?;
    }
    if let Err(error) = clone_from(config, upstream, &staging).await {
        let _ = std::fs::remove_dir_all(&staging);
        if prepared.slot_created {
            drop_created_slot(config, upstream).await;
        }
        return Err(error);
    }
    if state == DataDirState::Empty {
        std::fs::remove_dir(data_dir).map_err(io_error("replace empty directory", data_dir))?;
    }
    std::fs::rename(&staging, data_dir).map_err(io_error("move clone into", data_dir))?;
    Ok(prepared.system_identifier)
}
