//! The local controller (`pgrs local run-controller`): plays the operator's part on one machine.
//! It owns the cluster directory (flock), runs the agents as child processes, serves the lease
//! service and the status/switchover API on loopback, runs the write endpoint, and loops:
//! observe agents → engine → act.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio::time::Instant;

use crate::agent::api::{
    AgentStatus, FenceRequest, FollowRequest, PromoteRequest, RejoinRequest, Role, StopMode,
    StopRequest,
};
use crate::agent::client::AgentClient;
use crate::coordination::{
    LeaseArgs, LeaseError, LeaseRecord, LeaseStore, MemoryLeaseStore, lease_router,
};
use crate::engine::{
    Action, DataDurability, EngineInput, EngineSpec, Event, InstanceObservation, LeaseView, Memory,
    MonoTime, ObservedRole, ReplicationMode, Severity, SyncSet, SyncState, decide, plan_switchover,
};
use crate::local::forwarder::Forwarder;
use crate::local::layout::{DirLock, Layout, LocalConfig, NodeConfig, io_error};
use crate::local::status::{EventRecord, LeaseStatus, LocalStatus, NodeStatus};

/// What the controller persists besides the lease (`memory.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerState {
    pub memory: Memory,
    /// Nodes seen running as primary while not holding the lease since their last rejoin.
    pub former_primaries: BTreeSet<String>,
    /// `synchronous_standby_names` last applied per node.
    pub applied_sync: BTreeMap<String, SyncSet>,
    /// The last lease holder seen.
    pub last_holder: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchoverBody {
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

struct Observed {
    /// The last successful report and when it arrived.
    ok: Option<(Instant, AgentStatus)>,
    /// The last failure, if it is more recent than `ok`.
    error: Option<String>,
    /// The agent refused the connection: it is gone, not merely slow.
    gone: bool,
}

struct NodeRuntime {
    child: Option<Child>,
    pid: Option<i32>,
    busy: bool,
}

struct Shared {
    config: LocalConfig,
    layout: Layout,
    origin: Instant,
    store: Arc<MemoryLeaseStore>,
    state: Mutex<ControllerState>,
    observed: Mutex<HashMap<String, Observed>>,
    nodes: Mutex<HashMap<String, NodeRuntime>>,
    status: Mutex<Option<LocalStatus>>,
    last_input: Mutex<Option<EngineInput>>,
    events: Mutex<Vec<EventRecord>>,
    last_failover: Mutex<Option<crate::engine::FailoverChoice>>,
    /// Last message per event reason, to log repeated decisions once.
    last_messages: Mutex<HashMap<String, String>>,
    shutdown: tokio::sync::Notify,
    shutting_down: std::sync::atomic::AtomicBool,
    /// A failover or switchover is under way.
    urgent: std::sync::atomic::AtomicBool,
    /// An agent's report changed (role, postgres up, upstream): run a round now.
    wake: tokio::sync::Notify,
    /// Superuser sessions to the nodes' postgres, kept between uses: a (SCRAM) handshake per
    /// statement would sit on the switchover path.
    sessions: Mutex<HashMap<String, Arc<tokio_postgres::Client>>>,
    /// Nodes whose session is being opened ahead of need.
    warming: Mutex<BTreeSet<String>>,
    clients: HashMap<String, AgentClient>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn mono(&self, at: Instant) -> MonoTime {
        MonoTime(at.saturating_duration_since(self.origin))
    }

    fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.config.nodes.iter().find(|n| n.name == name)
    }

    fn record(&self, severity: &str, reason: &str, message: String) {
        let record = EventRecord {
            at: chrono::Utc::now(),
            severity: severity.to_string(),
            reason: reason.to_string(),
            message,
        };
        tracing::info!(severity, reason, message = %record.message, "event");
        if let Ok(line) = serde_json::to_string(&record) {
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.layout.events())
            {
                let _ = writeln!(file, "{line}");
            }
        }
        let mut events = lock(&self.events);
        events.push(record);
        let excess = events.len().saturating_sub(50);
        events.drain(..excess);
    }

    fn persist_state(&self) {
        let state = lock(&self.state).clone();
        if let Ok(bytes) = serde_json::to_vec_pretty(&state) {
            let path = self.layout.memory();
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
}

fn load_state(layout: &Layout) -> ControllerState {
    std::fs::read(layout.memory())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// This program, for the agents: after a rebuild the running binary's path reads
/// `<path> (deleted)`; the new binary at the same path is what should run.
fn pgrs_executable() -> std::io::Result<std::path::PathBuf> {
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
        .arg(format!("--superuser={}", config.superuser))
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
async fn start_node(shared: &Arc<Shared>, name: &str, fresh: bool) -> Result<String, String> {
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
    let last_primary = lock(&shared.state)
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
            busy: false,
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

/// What a round acts on in a report: when it changes, the round runs at once.
fn report_key(status: &AgentStatus) -> (Role, bool, Option<i32>, Option<u32>, bool) {
    let receiver = status.wal_receiver.as_ref();
    (
        status.role,
        status.postgres_up,
        receiver.and_then(|w| w.sender_port),
        status.timeline,
        receiver.is_some_and(|w| w.status == "streaming"),
    )
}

/// Stores a successful report asked for at `asked_at`, unless a newer one is already stored
/// (an action's answer may arrive before a poll sent earlier); wakes the round when it changes
/// what the engine sees.
fn note_report(shared: &Shared, name: &str, asked_at: Instant, status: AgentStatus) {
    let mut observed = lock(&shared.observed);
    let entry = observed.entry(name.to_string()).or_insert(Observed {
        ok: None,
        error: None,
        gone: false,
    });
    if entry.ok.as_ref().is_some_and(|(at, _)| *at > asked_at) {
        return;
    }
    let changed = entry.gone
        || entry
            .ok
            .as_ref()
            .is_none_or(|(_, last)| report_key(last) != report_key(&status));
    entry.ok = Some((asked_at, status));
    entry.error = None;
    entry.gone = false;
    drop(observed);
    if changed {
        shared.wake.notify_one();
    }
}

/// A node in transition (starting, rejoining, a replica not streaming): polled faster, so that a
/// rejoin proceeds without waiting a full controller interval at each step.
fn settled(shared: &Shared, name: &str) -> bool {
    if lock(&shared.state).former_primaries.contains(name) {
        return false;
    }
    let observed = lock(&shared.observed);
    let Some(entry) = observed.get(name) else {
        return false;
    };
    if entry.gone {
        // No agent: nothing to follow closely until `pgrs local start`.
        return true;
    }
    entry.ok.as_ref().is_some_and(|(_, status)| {
        status.postgres_up
            && match status.role {
                Role::Primary => true,
                Role::Replica => status
                    .wal_receiver
                    .as_ref()
                    .is_some_and(|w| w.status == "streaming"),
                _ => false,
            }
    })
}

/// Polls one agent continuously; the engine reads the latest answer and its arrival time.
async fn observe_node(shared: Arc<Shared>, name: String) {
    let client = shared.clients[&name].clone();
    loop {
        // The report's time is when the request was sent: what it says is at least that recent.
        let asked_at = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(2), client.status()).await;
        let keep_last = {
            let mut observed = lock(&shared.observed);
            let entry = observed.entry(name.clone()).or_insert(Observed {
                ok: None,
                error: None,
                gone: false,
            });
            match &result {
                // A running postgres that could not be probed says nothing new about its role.
                Ok(Ok(status))
                    if status.role == Role::Starting
                        && status.probe_error.is_some()
                        && entry
                            .ok
                            .as_ref()
                            .is_some_and(|(_, last)| last.role == Role::Primary) =>
                {
                    entry.error = status.probe_error.clone();
                    true
                }
                Ok(Ok(_)) => false,
                Ok(Err(error)) => {
                    // A refused connection means no agent listens; a slow answer keeps the last
                    // report, which the engine ages out by its own freshness rule.
                    let gone = matches!(error, crate::agent::client::ClientError::Transport { source, .. } if source.is_connect());
                    if gone && !entry.gone {
                        shared.wake.notify_one();
                    }
                    entry.gone = gone;
                    entry.error = Some(error.to_string());
                    true
                }
                Err(_) => {
                    entry.error = Some("status request timed out".to_string());
                    true
                }
            }
        };
        if !keep_last && let Ok(Ok(status)) = result {
            if shared.config.sync && status.postgres_up && status.role == Role::Replica {
                warm_session(&shared, &name);
            }
            note_report(&shared, &name, asked_at, status);
        }
        // Poll fast while a failover or switchover is under way (the write endpoint switches as
        // soon as the new primary is seen out of recovery) and while this node is in transition.
        // A poll is cheap: the agent probes on a kept session.
        let pause = if shared.urgent.load(std::sync::atomic::Ordering::Relaxed) {
            Duration::from_millis(20)
        } else if !settled(&shared, &name) {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(shared.config.interval_ms)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Reaps exited agents (a killed agent is not restarted automatically: `pgrs local start`).
fn reap_children(shared: &Shared) {
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

fn observed_role(role: Role) -> ObservedRole {
    match role {
        Role::Primary => ObservedRole::Primary,
        Role::Replica => ObservedRole::Replica,
        Role::Starting => ObservedRole::Starting,
        Role::Fenced => ObservedRole::Fenced,
        Role::Stopped => ObservedRole::Stopped,
    }
}

fn sync_state(text: &str) -> Option<SyncState> {
    match text {
        "async" => Some(SyncState::Async),
        "potential" => Some(SyncState::Potential),
        "sync" => Some(SyncState::Sync),
        "quorum" => Some(SyncState::Quorum),
        _ => None,
    }
}

/// Generous: on a loaded 2-core machine a status answer can take a second. Safety does not
/// depend on it (the lease does); a frozen holder stops receiving writes after it.
fn report_stale_after(config: &LocalConfig) -> Duration {
    Duration::from_secs(3).max(Duration::from_millis(config.interval_ms * 8))
}

struct Round {
    input: EngineInput,
    statuses: HashMap<String, (bool, Option<AgentStatus>, Option<String>)>,
}

fn build_input(
    shared: &Shared,
    lease: &LeaseRecord,
    lease_seen: &mut (Option<String>, String, Instant),
) -> Round {
    let now = Instant::now();
    if (lease.holder.clone(), lease.version.clone()) != (lease_seen.0.clone(), lease_seen.1.clone())
    {
        *lease_seen = (lease.holder.clone(), lease.version.clone(), now);
    }
    let state = lock(&shared.state).clone();
    let observed = lock(&shared.observed);
    let stale_after = report_stale_after(&shared.config);
    let port_to_node: HashMap<u16, String> = shared
        .config
        .nodes
        .iter()
        .map(|n| (n.pg_port, n.name.clone()))
        .collect();
    let mut statuses = HashMap::new();
    let mut instances = Vec::new();
    // The primary's view of each standby (sync state).
    let mut peer_sync: HashMap<String, String> = HashMap::new();
    for o in observed.values() {
        if let Some((_, status)) = &o.ok
            && !o.gone
            && status.role == Role::Primary
        {
            for peer in &status.replication {
                peer_sync.insert(peer.application_name.clone(), peer.sync_state.clone());
            }
        }
    }
    for node in &shared.config.nodes {
        let entry = observed.get(&node.name);
        let (reachable, status, error, at) = match entry {
            // A report older than the staleness bound says nothing about now: unreachable.
            Some(Observed {
                ok: Some((at, status)),
                error,
                gone: false,
            }) if now.saturating_duration_since(*at) <= stale_after => {
                (true, Some(status.clone()), error.clone(), Some(*at))
            }
            Some(Observed { error, .. }) => (false, None, error.clone(), None),
            None => (false, None, None, None),
        };
        let role = status
            .as_ref()
            .map_or(ObservedRole::Unknown, |s| observed_role(s.role));
        let streaming_from = status
            .as_ref()
            .and_then(|s| s.wal_receiver.as_ref())
            .and_then(|w| {
                (w.status == "streaming")
                    .then(|| {
                        w.sender_port
                            .and_then(|p| port_to_node.get(&(p as u16)).cloned())
                    })
                    .flatten()
            });
        instances.push(InstanceObservation {
            name: node.name.clone(),
            reachable,
            postgres_up: status.as_ref().is_some_and(|s| s.postgres_up),
            role,
            timeline: status.as_ref().and_then(|s| s.timeline),
            received_lsn: status.as_ref().and_then(|s| s.receive_lsn),
            replayed_lsn: status.as_ref().and_then(|s| s.replay_lsn),
            flush_lsn: status.as_ref().and_then(|s| s.current_lsn),
            sync_state: peer_sync.get(&node.name).and_then(|s| sync_state(s)),
            upstream: streaming_from,
            applied_sync: (role == ObservedRole::Primary)
                .then(|| state.applied_sync.get(&node.name).cloned())
                .flatten(),
            last_report_at: if reachable {
                at.map(|a| shared.mono(a))
            } else {
                None
            },
            former_primary: state.former_primaries.contains(&node.name),
        });
        statuses.insert(node.name.clone(), (reachable, status, error));
    }
    let spec = EngineSpec {
        mode: if shared.config.sync {
            ReplicationMode::Sync
        } else {
            ReplicationMode::Async
        },
        sync_replicas: 1,
        durability: DataDurability::Required,
        lease_duration: shared.config.timings.lease_duration,
        report_stale_after: stale_after,
        ..EngineSpec::default()
    };
    let input = EngineInput {
        now: shared.mono(now),
        instances,
        lease: LeaseView {
            holder: lease.holder.clone(),
            version: lease.version.clone(),
            unchanged_since: shared.mono(lease_seen.2),
            duration: lease.duration,
        },
        spec,
        memory: state.memory.clone(),
    };
    Round { input, statuses }
}

fn node_statuses(shared: &Shared, round: &Round) -> Vec<NodeStatus> {
    let primary_status = round
        .statuses
        .values()
        .filter_map(|(_, s, _)| s.as_ref())
        .find(|s| s.role == Role::Primary);
    let nodes = lock(&shared.nodes);
    shared
        .config
        .nodes
        .iter()
        .map(|node| {
            let (reachable, status, error) = round
                .statuses
                .get(&node.name)
                .cloned()
                .unwrap_or((false, None, None));
            let observation = round.input.instance(&node.name);
            let peer = primary_status.and_then(|p| {
                p.replication
                    .iter()
                    .find(|r| r.application_name == node.name)
            });
            let lag_bytes = match (
                primary_status.and_then(|p| p.current_lsn),
                status.as_ref().and_then(|s| s.replay_lsn),
            ) {
                (Some(current), Some(replay)) => Some(current.bytes_since(replay)),
                _ => None,
            };
            let lag_seconds = peer.and_then(|p| match p.replay_lag_seconds {
                Some(seconds) => Some(seconds),
                // NULL lag with the standby replayed up to what was sent: caught up (idle primary).
                None if p.replay_lsn.is_some() && p.replay_lsn == p.sent_lsn => Some(0.0),
                None => None,
            });
            NodeStatus {
                name: node.name.clone(),
                pg_port: node.pg_port,
                agent_port: node.agent_port,
                reachable,
                role: status
                    .as_ref()
                    .map(|s| format!("{:?}", s.role).to_lowercase()),
                postgres_up: status.as_ref().is_some_and(|s| s.postgres_up),
                timeline: status.as_ref().and_then(|s| s.timeline),
                current_lsn: status.as_ref().and_then(|s| s.current_lsn),
                receive_lsn: status.as_ref().and_then(|s| s.receive_lsn),
                replay_lsn: status.as_ref().and_then(|s| s.replay_lsn),
                lag_bytes,
                lag_seconds,
                sync_state: peer.map(|p| p.sync_state.clone()),
                upstream: observation.and_then(|o| o.upstream.clone()),
                agent_pid: nodes.get(&node.name).and_then(|n| n.pid),
                last_error: error.or_else(|| status.and_then(|s| s.last_error)),
            }
        })
        .collect()
}

/// Superuser connection to `name`'s postgres.
async fn connect_node(shared: &Shared, name: &str) -> Result<tokio_postgres::Client, String> {
    let node = shared.node(name).ok_or("unknown node")?;
    let password =
        std::fs::read_to_string(shared.layout.superuser_password()).map_err(|e| e.to_string())?;
    let target = crate::postgres::probe::ConnectTarget {
        host: "127.0.0.1".to_string(),
        port: node.pg_port,
        user: shared.config.superuser.clone(),
        password: password.trim().to_string(),
        dbname: "postgres".to_string(),
    };
    crate::postgres::probe::connect(&target, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())
}

/// An error of the statement (severity ERROR), not of the session (FATAL, closed, I/O).
fn statement_error(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| db.severity() == "ERROR")
}

/// Runs `statements` one by one on the kept session to `name`'s postgres; a kept session that
/// fails (postgres restarted since) is dropped and the statements retried once on a new one.
async fn execute_on_node(shared: &Shared, name: &str, statements: &[String]) -> Result<(), String> {
    let kept = lock(&shared.sessions)
        .get(name)
        .filter(|c| !c.is_closed())
        .cloned();
    let run = |client: Arc<tokio_postgres::Client>| async move {
        for statement in statements {
            client.batch_execute(statement).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    let describe = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_string())
    };
    if let Some(client) = kept {
        match run(client).await {
            Ok(()) => return Ok(()),
            // A statement's own error would only repeat on a new session.
            Err(error) if statement_error(&error) => return Err(describe(error)),
            Err(error) => {
                tracing::debug!(node = name, %error, "kept session failed; reconnecting");
                lock(&shared.sessions).remove(name);
            }
        }
    }
    let client = Arc::new(connect_node(shared, name).await?);
    lock(&shared.sessions).insert(name.to_string(), client.clone());
    run(client).await.map_err(|error| {
        if !statement_error(&error) {
            lock(&shared.sessions).remove(name);
        }
        describe(error)
    })
}

/// In sync mode a candidate gets its `synchronous_standby_names` right before its promotion:
/// open the session for that ahead of time, off the failover path.
fn warm_session(shared: &Arc<Shared>, name: &str) {
    if lock(&shared.sessions)
        .get(name)
        .is_some_and(|c| !c.is_closed())
        || !lock(&shared.warming).insert(name.to_string())
    {
        return;
    }
    let shared = shared.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        match connect_node(&shared, &name).await {
            Ok(client) => {
                let mut sessions = lock(&shared.sessions);
                // A session opened meanwhile by an action wins.
                if sessions.get(&name).is_none_or(|kept| kept.is_closed()) {
                    sessions.insert(name.clone(), Arc::new(client));
                }
            }
            Err(error) => tracing::debug!(node = %name, %error, "could not open a session ahead"),
        }
        lock(&shared.warming).remove(&name);
    });
}

/// CHECKPOINT on a primary about to be demoted; bounded, and a failure only costs time.
async fn checkpoint_before_demote(shared: &Shared, instance: &str) {
    let started = Instant::now();
    let statements = ["CHECKPOINT".to_string()];
    let attempt = execute_on_node(shared, instance, &statements);
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => tracing::info!(
            instance,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint before demotion"
        ),
        Ok(Err(error)) => tracing::warn!(instance, %error, "checkpoint before demotion failed"),
        Err(_) => tracing::warn!(instance, "checkpoint before demotion timed out"),
    }
}

async fn apply_sync(shared: &Shared, primary: &str, sync: &SyncSet) -> Result<(), String> {
    let names = sync.to_standby_names().replace('\'', "''");
    // Separate statements: ALTER SYSTEM refuses to run inside an (implicit) transaction block.
    let statements = [
        format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"),
        "SELECT pg_reload_conf()".to_string(),
    ];
    execute_on_node(shared, primary, &statements)
        .await
        .map_err(|detail| {
            format!("failed to set synchronous_standby_names on {primary}: {detail}")
        })?;
    lock(&shared.state)
        .applied_sync
        .insert(primary.to_string(), sync.clone());
    Ok(())
}

/// One background action at a time per node; false when one is already running.
fn claim(shared: &Shared, instance: &str) -> bool {
    let mut nodes = lock(&shared.nodes);
    match nodes.get_mut(instance) {
        Some(runtime) if !runtime.busy => {
            runtime.busy = true;
            true
        }
        _ => false,
    }
}

fn release_claim(shared: &Shared, instance: &str) {
    if let Some(runtime) = lock(&shared.nodes).get_mut(instance) {
        runtime.busy = false;
    }
}

fn upstream_of(shared: &Shared, primary: &str) -> Result<(String, u16), String> {
    let node = shared
        .node(primary)
        .ok_or_else(|| format!("unknown node {primary}"))?;
    Ok(("127.0.0.1".to_string(), node.pg_port))
}

/// Carries out one action. Follow and rejoin run in the background (one at a time per node), so
/// that a slow rewind never delays a failover decision.
async fn execute(shared: &Arc<Shared>, action: &Action) -> Result<(), String> {
    match action {
        Action::AcquireLease {
            holder,
            expected_version,
        } => shared
            .store
            .acquire(holder, expected_version)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Action::Promote { instance } => {
            // In the background: the write endpoint switches as soon as the observer sees the
            // instance out of recovery, not after the agent's post-promotion checkpoint.
            if !claim(shared, instance) {
                return Ok(());
            }
            shared.record("info", "Action", format!("{action:?}"));
            let shared = shared.clone();
            let instance = instance.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = shared.clients[&instance]
                    .promote(&PromoteRequest {
                        wait_seconds: Some(30),
                    })
                    .await;
                match result {
                    Ok(response) => {
                        note_report(&shared, &instance, started, response.status);
                        shared.record(
                            "info",
                            "promote",
                            format!(
                                "{instance}: promoted in {} ms",
                                started.elapsed().as_millis()
                            ),
                        )
                    }
                    Err(error) => {
                        shared.record("warning", "promote", format!("{instance}: {error}"))
                    }
                }
                release_claim(&shared, &instance);
            });
            Ok(())
        }
        Action::Demote { instance } => {
            // A CHECKPOINT while it still serves leaves the shutdown checkpoint, which runs inside
            // the write-unavailability window, little to write.
            checkpoint_before_demote(shared, instance).await;
            let client = &shared.clients[instance];
            let asked_at = Instant::now();
            let response = client
                .stop(&StopRequest {
                    mode: StopMode::Fast,
                })
                .await
                .map_err(|e| e.to_string())?;
            // The answer is the freshest report: the engine sees the old primary down without
            // waiting for the next poll.
            note_report(shared, instance, asked_at, response.status);
            // postgres is down: give the lease up at once (the agent would too, a bit later).
            match shared.store.release(instance).await {
                Ok(_) | Err(LeaseError::NotHolder { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        Action::Fence { instance, reason } => {
            let client = &shared.clients[instance];
            client
                .fence(&FenceRequest {
                    reason: Some(reason.clone()),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Action::SetSynchronousStandbys { primary, sync } => apply_sync(shared, primary, sync).await,
        Action::Follow { instance, primary } | Action::Rejoin { instance, primary } => {
            if !claim(shared, instance) {
                return Ok(());
            }
            let (host, port) = upstream_of(shared, primary)?;
            let shared = shared.clone();
            let action = action.clone();
            let instance = instance.clone();
            tokio::spawn(async move {
                let client = &shared.clients[&instance];
                let started = Instant::now();
                let result = match &action {
                    Action::Rejoin { .. } => client
                        .rejoin(&RejoinRequest {
                            host,
                            port,
                            slot: None,
                        })
                        .await
                        .map(|r| r.message),
                    _ => client
                        .follow(&FollowRequest {
                            host,
                            port,
                            slot: None,
                        })
                        .await
                        .map(|r| r.message),
                };
                match result {
                    Ok(message) => {
                        if matches!(action, Action::Rejoin { .. }) {
                            lock(&shared.state).former_primaries.remove(&instance);
                            shared.persist_state();
                        }
                        shared.record(
                            "info",
                            action.kind(),
                            format!(
                                "{instance}: {message} in {} ms",
                                started.elapsed().as_millis()
                            ),
                        );
                    }
                    Err(error) => {
                        shared.record("warning", action.kind(), format!("{instance}: {error}"))
                    }
                }
                release_claim(&shared, &instance);
            });
            Ok(())
        }
    }
}

fn record_events(shared: &Shared, events: &[Event]) {
    for event in events {
        // Waiting is said by the status; do not flood the log with it every round.
        if matches!(event.reason, crate::engine::EventReason::SwitchoverWaiting) {
            continue;
        }
        let severity = match event.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        };
        let reason = format!("{:?}", event.reason);
        let repeated = lock(&shared.last_messages).insert(reason.clone(), event.message.clone())
            == Some(event.message.clone());
        if !repeated {
            shared.record(severity, &reason, event.message.clone());
        }
    }
}

/// A former primary that its agent rewound against the holder when it started (the agent does
/// that for a data directory last run as a primary) and that now streams from the holder on the
/// holder's timeline has rejoined: no second rejoin. Nodes with an action under way are left to
/// that action.
fn clear_rewound_former_primaries(shared: &Shared, lease: &LeaseRecord) {
    let Some(holder) = lease.holder.as_deref().and_then(|h| shared.node(h)) else {
        return;
    };
    let formers: Vec<String> = lock(&shared.state)
        .former_primaries
        .iter()
        .filter(|name| **name != holder.name)
        .cloned()
        .collect();
    if formers.is_empty() {
        return;
    }
    let mut rejoined = Vec::new();
    {
        let observed = lock(&shared.observed);
        let nodes = lock(&shared.nodes);
        let report = |name: &str| {
            observed
                .get(name)
                .filter(|o| !o.gone)
                .and_then(|o| o.ok.as_ref())
                .map(|(_, status)| status)
        };
        let holder_timeline = report(&holder.name)
            .filter(|s| s.role == Role::Primary && s.postgres_up)
            .and_then(|s| s.timeline);
        for name in formers {
            if nodes.get(&name).is_some_and(|n| n.busy) {
                continue;
            }
            let Some(status) = report(&name) else {
                continue;
            };
            let Some(rejoin) = status
                .last_rejoin
                .as_ref()
                .filter(|r| r.upstream.port == holder.pg_port)
            else {
                continue;
            };
            let streaming = status.role == Role::Replica
                && status.wal_receiver.as_ref().is_some_and(|w| {
                    w.status == "streaming"
                        && w.sender_port == Some(i32::from(holder.pg_port))
                        && w.received_tli.is_some()
                        && w.received_tli == holder_timeline
                });
            if streaming {
                rejoined.push((name, rejoin.path));
            }
        }
    }
    if rejoined.is_empty() {
        return;
    }
    {
        let mut state = lock(&shared.state);
        for (name, _) in &rejoined {
            state.former_primaries.remove(name);
        }
    }
    shared.persist_state();
    for (name, path) in rejoined {
        shared.record(
            "info",
            "rejoin",
            format!(
                "{name}: rejoined 127.0.0.1:{} by {} when its agent started",
                holder.pg_port,
                match path {
                    crate::agent::api::RejoinPath::Rewind => "pg_rewind",
                    crate::agent::api::RejoinPath::Reclone => "re-clone",
                }
            ),
        );
    }
}

/// One observe → decide → act round. Returns whether anything was done (then the next round
/// runs at once).
async fn round(
    shared: &Arc<Shared>,
    lease_seen: &mut (Option<String>, String, Instant),
    forwarder: &Forwarder,
    last_phase: &mut Option<String>,
) -> bool {
    reap_children(shared);
    let lease = match shared.store.get().await {
        Ok(lease) => lease,
        Err(error) => {
            tracing::error!(%error, "failed to read the lease");
            return false;
        }
    };
    clear_rewound_former_primaries(shared, &lease);
    let round = build_input(shared, &lease, lease_seen);
    let decision = decide(&round.input);

    // Former primaries: a holder that lost the lease, or a node running as primary while
    // another one holds it. They rejoin (rewind) rather than merely follow.
    {
        let mut state = lock(&shared.state);
        let state = &mut *state;
        crate::engine::track_former_primaries(
            &mut state.former_primaries,
            &mut state.last_holder,
            &round.input,
        );
        if state.memory != decision.memory {
            state.memory = decision.memory.clone();
        }
    }

    // Also urgent while nobody holds the lease (right after a release, the engine waits for a
    // fresh report before granting it) and while a switchover plan is open.
    let urgent = matches!(
        decision.status.phase,
        crate::engine::Phase::FailingOver
            | crate::engine::Phase::SwitchingOver
            | crate::engine::Phase::PrimaryUnavailable
    ) || decision.memory.switchover.is_some()
        || round.input.lease.holder.is_none();
    shared
        .urgent
        .store(urgent, std::sync::atomic::Ordering::Relaxed);
    // During a handover the write endpoint holds new connections for the next primary.
    forwarder.hold.send_if_modified(|hold| {
        let modified = *hold != urgent;
        *hold = urgent;
        modified
    });

    // The write endpoint follows the serving holder only.
    let serving = decision
        .status
        .primary
        .as_ref()
        .and_then(|p| shared.node(p))
        .map(|n| SocketAddr::from(([127, 0, 0, 1], n.pg_port)));
    forwarder.target.send_if_modified(|target| {
        if *target != serving {
            *target = serving;
            true
        } else {
            false
        }
    });

    record_events(shared, &decision.events);
    let phase_name = format!("{:?}", decision.status.phase);
    if last_phase.as_deref() != Some(phase_name.as_str()) {
        shared.record(
            "info",
            "Phase",
            format!("{phase_name}: {}", decision.status.message),
        );
        *last_phase = Some(phase_name);
    }

    let mut acted = false;
    for action in &decision.actions {
        let background = matches!(
            action,
            Action::Follow { .. } | Action::Rejoin { .. } | Action::Promote { .. }
        );
        if !background {
            shared.record("info", "Action", format!("{action:?}"));
        }
        // Inline actions are bounded: a frozen agent must not stall the failover loop.
        let bound = match action {
            Action::Demote { .. } => Duration::from_secs(15),
            _ => Duration::from_secs(3),
        };
        let result = tokio::time::timeout(bound, execute(shared, action))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", bound.as_secs())));
        match result {
            Ok(()) => {
                if !background {
                    acted = true;
                }
            }
            Err(error) => {
                shared.record(
                    "warning",
                    "ActionFailed",
                    format!("{}: {error}", action.kind()),
                );
                break;
            }
        }
    }
    shared.persist_state();

    let elapsed = round
        .input
        .now
        .saturating_since(round.input.lease.unchanged_since);
    let status = LocalStatus {
        cluster: shared.config.cluster.clone(),
        phase: decision.status.phase,
        message: decision.status.message.clone(),
        primary: decision.status.primary.clone(),
        lease: LeaseStatus {
            holder: lease.holder.clone(),
            version: lease.version.clone(),
            expires_in_ms: lease.holder.as_ref().map(|_| {
                round
                    .input
                    .lease_duration()
                    .saturating_sub(elapsed)
                    .as_millis() as u64
            }),
            duration_ms: round.input.lease_duration().as_millis() as u64,
        },
        write_endpoint: format!("127.0.0.1:{}", shared.config.write_port),
        sync: shared.config.sync,
        nodes: node_statuses(shared, &round),
        events: lock(&shared.events).clone(),
        last_failover: {
            let mut last = lock(&shared.last_failover);
            if let Some(choice) = &decision.status.failover {
                *last = Some(choice.clone());
            }
            last.clone()
        },
        updated_at: chrono::Utc::now(),
    };
    *lock(&shared.status) = Some(status);
    *lock(&shared.last_input) = Some(round.input);
    acted
}

// ---------------------------------------------------------------------------------------------
// HTTP API

type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ApiError>)>;

fn api_error(status: StatusCode, error: impl Into<String>) -> (StatusCode, Json<ApiError>) {
    (
        status,
        Json(ApiError {
            error: error.into(),
        }),
    )
}

async fn get_cluster(State(shared): State<Arc<Shared>>) -> ApiResult<LocalStatus> {
    lock(&shared.status).clone().map(Json).ok_or_else(|| {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has not completed a round yet",
        )
    })
}

/// Asks every agent for its status now and updates `input` with the answers (an agent that does
/// not answer within a second counts as unreachable).
async fn refresh_for_switchover(shared: &Shared, input: &mut EngineInput) {
    let asks = input.instances.iter().map(|i| {
        let client = shared.clients[&i.name].clone();
        async move { tokio::time::timeout(Duration::from_secs(3), client.status()).await }
    });
    let answers = futures::future::join_all(asks).await;
    let now = shared.mono(Instant::now());
    for (instance, answer) in input.instances.iter_mut().zip(answers) {
        match answer {
            Ok(Ok(status)) => {
                instance.reachable = true;
                instance.postgres_up = status.postgres_up;
                instance.role = observed_role(status.role);
                instance.received_lsn = status.receive_lsn;
                instance.replayed_lsn = status.replay_lsn;
                instance.flush_lsn = status.current_lsn;
                instance.last_report_at = Some(now);
            }
            _ => instance.reachable = false,
        }
    }
    input.now = now;
}

async fn post_switchover(
    State(shared): State<Arc<Shared>>,
    Json(body): Json<SwitchoverBody>,
) -> ApiResult<crate::engine::SwitchoverPlan> {
    let input = lock(&shared.last_input).clone();
    let Some(mut input) = input else {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has not completed a round yet",
        ));
    };
    if let Some(to) = &body.to
        && shared.node(to).is_none()
    {
        let known: Vec<&str> = shared
            .config
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("unknown node {to:?}; the nodes are: {}", known.join(", ")),
        ));
    }
    // Fresh positions before deciding: the last round's reports may be a few hundred ms old,
    // long enough to miss a node that just died or a replica that fell behind.
    refresh_for_switchover(&shared, &mut input).await;
    let mut state = lock(&shared.state);
    input.memory = state.memory.clone();
    let plan = plan_switchover(&input, body.to.as_deref())
        .map_err(|e| api_error(StatusCode::CONFLICT, format!("switchover refused: {e}")))?;
    state.memory.switchover = Some(plan.clone());
    drop(state);
    shared.record(
        "info",
        "SwitchoverRequested",
        format!("switchover from {} to {} requested", plan.from, plan.to),
    );
    Ok(Json(plan))
}

async fn post_start(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    if shared.node(&name).is_none() {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("unknown node {name:?}"),
        ));
    }
    start_node(&shared, &name, false)
        .await
        .map(|role| Json(serde_json::json!({ "node": name, "startedAs": role })))
        .map_err(|e| api_error(StatusCode::CONFLICT, e))
}

async fn post_shutdown(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    shared
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    shared.shutdown.notify_waiters();
    shared.shutdown.notify_one();
    Json(serde_json::json!({ "shuttingDown": true }))
}

/// Stops every agent gracefully (SIGTERM; replicas first, then the holder, so that no failover
/// is needed), escalating to SIGKILL after `grace`.
async fn stop_agents(shared: &Arc<Shared>, grace: Duration) {
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

/// `pgrs local run-controller --dir D`.
pub async fn run_controller(dir: &Path) -> anyhow::Result<()> {
    let layout = Layout::new(dir);
    let _lock = DirLock::acquire(&layout)?;
    let pid_path = layout.pid();
    std::fs::write(&pid_path, std::process::id().to_string())
        .map_err(io_error("write", &pid_path))?;
    let config = layout.read_config()?;
    let store = Arc::new(MemoryLeaseStore::persistent(
        &layout.lease(),
        config.timings.lease_duration,
    )?);
    let state = load_state(&layout);
    let token =
        std::fs::read_to_string(layout.token()).map_err(io_error("read", &layout.token()))?;
    let clients = config
        .nodes
        .iter()
        .map(|n| {
            let client = AgentClient::new(config.agent_url(n), Some(token.trim().to_string()))?
                .with_action_timeout(Duration::from_secs(300));
            Ok((n.name.clone(), client))
        })
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let forwarder = Forwarder::bind(SocketAddr::from(([127, 0, 0, 1], config.write_port))).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.controller_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "failed to listen on 127.0.0.1:{} for the controller API: {e}",
                config.controller_port
            )
        })?;

    let shared = Arc::new(Shared {
        origin: Instant::now(),
        store: store.clone(),
        state: Mutex::new(state),
        observed: Mutex::new(HashMap::new()),
        nodes: Mutex::new(HashMap::new()),
        status: Mutex::new(None),
        last_input: Mutex::new(None),
        events: Mutex::new(Vec::new()),
        last_failover: Mutex::new(None),
        last_messages: Mutex::new(HashMap::new()),
        shutdown: tokio::sync::Notify::new(),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        urgent: std::sync::atomic::AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
        sessions: Mutex::new(HashMap::new()),
        warming: Mutex::new(BTreeSet::new()),
        clients,
        layout: layout.clone(),
        config: config.clone(),
    });
    // `/metrics`: counters fed by a sampler of each round's status, the round timer below and
    // the agents' lease renewals (counted where the lease service answers them).
    let metrics = Arc::new(crate::metrics::local::LocalMetrics::new(&config.cluster));
    let counted_store = Arc::new(crate::metrics::local::CountingLeaseStore::new(
        store.clone(),
        metrics.clone(),
    ));
    let api = Router::new()
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/switchover", post(post_switchover))
        .route("/v1/nodes/{name}/start", post(post_start))
        .route("/v1/shutdown", post(post_shutdown))
        .with_state(shared.clone())
        .merge(lease_router(counted_store))
        .merge(Router::new().route(
            "/metrics",
            get({
                let shared = shared.clone();
                let metrics = metrics.clone();
                move || std::future::ready(render_metrics(&shared, &metrics))
            }),
        ))
        // The dashboard (`/`, `/api/clusters`) samples the latest round's status.
        .merge(crate::dashboard::local_router({
            let shared = shared.clone();
            move || lock(&shared.status).clone()
        }));
    // Failovers are counted from status snapshots: sample each round's (it is replaced every
    // 10 ms while a failover runs; 25 ms bounds the error of the measured duration).
    let sampler = {
        let shared = shared.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                let status = lock(&shared.status).clone();
                if let Some(status) = status {
                    metrics.observe_status(&status);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, api).await;
    });
    shared.record(
        "info",
        "ControllerStarted",
        format!(
            "controller pid {} for {}",
            std::process::id(),
            layout.dir.display()
        ),
    );

    // Start every agent: the primary first (a replica clones from it).
    let lease = store.get().await?;
    let last_primary = lock(&shared.state)
        .memory
        .last_primary
        .as_ref()
        .map(|p| p.name.clone());
    let first = lease
        .holder
        .clone()
        .or(last_primary)
        .unwrap_or_else(|| config.nodes[0].name.clone());
    if let Err(error) = start_node(&shared, &first, true).await {
        shared.record("warning", "NodeStartFailed", error);
    }
    // Replicas clone from the primary: start them once it serves.
    let starter = shared.clone();
    tokio::spawn(async move {
        let client = starter.clients[&first].clone();
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Ok(status) = client.status().await
                && status.postgres_up
                && status.role == Role::Primary
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for node in starter.config.nodes.iter().filter(|n| n.name != first) {
            if let Err(error) = start_node(&starter, &node.name, true).await {
                starter.record("warning", "NodeStartFailed", error);
            }
        }
    });
    for node in &config.nodes {
        tokio::spawn(observe_node(shared.clone(), node.name.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut lease_seen = (None, String::new(), Instant::now());
    let mut last_phase = None;
    let interval = Duration::from_millis(config.interval_ms);
    loop {
        let round_started = Instant::now();
        let acted = round(&shared, &mut lease_seen, &forwarder, &mut last_phase).await;
        metrics.observe_round(round_started.elapsed());
        if shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            break;
        }
        let pause = if acted || shared.urgent.load(std::sync::atomic::Ordering::Relaxed) {
            Duration::from_millis(10)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shared.wake.notified() => {}
            _ = shared.shutdown.notified() => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    shared.record("info", "ControllerStopping", "stopping agents".to_string());
    forwarder.target.send_replace(None);
    stop_agents(&shared, Duration::from_secs(20)).await;
    shared.persist_state();
    sampler.abort();
    http.abort();
    let _ = std::fs::remove_file(&pid_path);
    Ok(())
}

/// `GET /metrics`: the Prometheus exposition of the local cluster.
fn render_metrics(
    shared: &Shared,
    metrics: &crate::metrics::local::LocalMetrics,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let status = lock(&shared.status).clone();
    if let Some(status) = &status {
        metrics.observe_status(status);
    }
    let wal_receivers = lock(&shared.observed)
        .iter()
        .filter_map(|(name, observed)| {
            let (_, report) = observed.ok.as_ref()?;
            (report.role == Role::Replica).then(|| {
                let streaming = report
                    .wal_receiver
                    .as_ref()
                    .is_some_and(|w| w.status == "streaming");
                (name.clone(), streaming)
            })
        })
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        metrics.render(status.as_ref(), &wal_receivers),
    )
}
