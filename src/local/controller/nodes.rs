//! The agents of a local cluster as child processes: their command lines, starting one (as
//! primary when it holds the lease, else as a replica of the holder), reaping exited ones, and
//! stopping them all.

use std::sync::Arc;
use std::time::Duration;

use crate::coordination::LeaseStore as _;
use crate::local::layout::{NodeConfig, io_error};

use super::{NodeRuntime, Shared, lock};
use crate::coordination::LeaseArgs;

/// This program, for the agents: after a rebuild the running binary's path reads
/// `<path> (deleted)`; the new binary at the same path is what should run.
pub(super) fn pgrs_executable() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => std::path::PathBuf::from(path),
        None => exe,
    })
}

/// Agent command line for `node`, starting as primary or as a replica of `primary`.
fn agent_command(
    shared: &Shared,
    node: &NodeConfig,
    primary: Option<&NodeConfig>,
) -> anyhow::Result<tokio::process::Command> {
    let config = &shared.config;
    let layout = &shared.layout;
    let exe = pgrs_executable()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("agent")
        .arg(format!("--cluster={}", config.cluster))
        .arg(format!("--name={}", node.name))
        .arg("--data-dir")
        .arg(layout.data_dir(&node.name))
        .arg("--pg-bin")
        .arg(&config.pg_bin)
        .arg(format!("--port={}", node.pg_port))
        .arg("--listen-addresses=127.0.0.1")
        .arg(format!("--http-listen=127.0.0.1:{}", node.agent_port))
        .arg("--token-file")
        .arg(layout.token())
        .arg("--superuser-password-file")
        .arg(layout.superuser_password())
        .arg("--replication-password-file")
        .arg(layout.replication_password())
        .arg(format!("--app-owner={}", crate::local::layout::APP_OWNER))
        .arg(format!(
            "--app-database={}",
            crate::local::layout::APP_DATABASE
        ))
        .arg("--app-password-file")
        .arg(layout.app_password())
        .arg(format!("--superuser={}", config.superuser))
        .arg("--tls-dir")
        .arg(crate::local::tls::tls_dir(&layout.dir))
        .arg(format!(
            "--tls-server-name={}",
            crate::local::tls::SERVER_NAME
        ))
        // A rejoined former primary falls back to re-clone if it does not stream quickly.
        .arg("--verify-timeout-secs=20")
        .args(LeaseArgs::to_args(
            &config.timings,
            &config.controller_url(),
        ));
    match primary {
        None => {
            command.arg("--role=primary");
        }
        Some(primary) => {
            command
                .arg("--role=replica")
                .arg("--primary-host=127.0.0.1")
                .arg(format!("--primary-port={}", primary.pg_port));
        }
    }
    let log_path = layout.agent_log(&node.name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_error("open", &log_path))?;
    let log_err = log.try_clone().map_err(io_error("open", &log_path))?;
    command
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .env(
            "PGRS_LOG",
            std::env::var("PGRS_LOG").unwrap_or_else(|_| "info".to_string()),
        )
        // Own process group: a Ctrl-C in the user's terminal must not reach the agents.
        .process_group(0)
        .kill_on_drop(false);
    Ok(command)
}

/// Starts `node`'s agent: as primary when it holds the lease (or when nobody does and it was the
/// last primary / the first node of a fresh cluster), else as a replica of the holder.
pub(super) async fn start_node(
    shared: &Arc<Shared>,
    name: &str,
    fresh: bool,
) -> Result<String, String> {
    let node = shared
        .node(name)
        .ok_or_else(|| format!("unknown node {name}"))?
        .clone();
    {
        let nodes = lock(&shared.nodes);
        if nodes.get(name).is_some_and(|n| n.child.is_some()) {
            return Err(format!("{name} is already running"));
        }
    }
    // Right after a hard kill the old postmaster may still be exiting; starting now would fail on
    // its lock file.
    if let Some(pid) = crate::local::cli::previous_postmaster(&shared.layout, name) {
        return Err(format!(
            "{name}'s previous postgres (pid {pid}) is still exiting; retry in a moment"
        ));
    }
    let lease = shared.store.get().await.map_err(|e| e.to_string())?;
    let last_primary = lock(&shared.last_state)
        .memory
        .last_primary
        .as_ref()
        .map(|p| p.name.clone());
    let primary: Option<NodeConfig> = match lease.holder.as_deref() {
        Some(holder) if holder == name => None,
        Some(holder) => Some(
            shared
                .node(holder)
                .cloned()
                .ok_or_else(|| format!("unknown holder {holder}"))?,
        ),
        None => {
            let first = last_primary.unwrap_or_else(|| shared.config.nodes[0].name.clone());
            if first == name {
                None
            } else if fresh {
                Some(
                    shared
                        .node(&first)
                        .cloned()
                        .ok_or_else(|| format!("unknown node {first}"))?,
                )
            } else {
                return Err(format!(
                    "no instance holds the lease right now: {name} has no primary to follow; retry once a primary is elected"
                ));
            }
        }
    };
    let mut command = agent_command(shared, &node, primary.as_ref()).map_err(|e| e.to_string())?;
    let child = command
        .spawn()
        .map_err(|e| format!("failed to start the agent of {name}: {e}"))?;
    let pid = child.id().map(|p| p as i32);
    if let Some(pid) = pid {
        let _ = std::fs::write(shared.layout.agent_pid(name), pid.to_string());
    }
    lock(&shared.nodes).insert(
        name.to_string(),
        NodeRuntime {
            child: Some(child),
            pid,
        },
    );
    let role = match &primary {
        None => "primary".to_string(),
        Some(p) => format!("replica of {}", p.name),
    };
    shared.record(
        "info",
        "NodeStarted",
        format!("started the agent of {name} (pid {pid:?}) as {role}"),
    );
    Ok(role)
}

/// Reaps exited agents (a killed agent is not restarted automatically: `pgrs local start`).
pub(super) fn reap_children(shared: &Shared) {
    let mut exited = Vec::new();
    {
        let mut nodes = lock(&shared.nodes);
        for (name, runtime) in nodes.iter_mut() {
            if let Some(child) = runtime.child.as_mut()
                && let Ok(Some(exit)) = child.try_wait()
            {
                runtime.child = None;
                runtime.pid = None;
                let _ = std::fs::remove_file(shared.layout.agent_pid(name));
                exited.push(format!("the agent of {name} exited ({exit})"));
            }
        }
    }
    for message in exited {
        shared.record("warning", "NodeExited", message);
    }
}

/// Stops every agent gracefully (SIGTERM; replicas first, then the holder, so that no failover
/// is needed), escalating to SIGKILL after `grace`.
pub(super) async fn stop_agents(shared: &Arc<Shared>, grace: Duration) {
    let holder = shared.store.get().await.ok().and_then(|l| l.holder);
    let mut order: Vec<String> = shared.config.nodes.iter().map(|n| n.name.clone()).collect();
    order.sort_by_key(|n| Some(n) == holder.as_ref());
    for name in order {
        let child = lock(&shared.nodes)
            .get_mut(&name)
            .and_then(|n| n.child.take());
        let Some(mut child) = child else { continue };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(shared.layout.agent_pid(&name));
    }
}
