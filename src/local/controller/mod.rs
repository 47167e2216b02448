//! The local controller (`pgrs local run-controller`): plays the operator's part on one machine.
//! It owns the cluster directory (flock), runs the agents as child processes ([`nodes`]),
//! serves the lease service and the status/switchover API on loopback ([`api`]), runs the write
//! endpoint, and drives the shared control loop ([`crate::control`]) with local mode as its
//! [`Platform`](crate::control::Platform) ([`platform`]).

mod api;
mod nodes;
mod platform;
mod secrets;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;

pub use api::{ApiError, SwitchoverBody};

use crate::control::{self, ControlLoop, ControlState, MonotonicClock, Reports};
use crate::coordination::{LeaseStore as _, MemoryLeaseStore, lease_router};
use crate::engine::{DataDurability, EngineSpec, FailoverChoice, ReplicationMode, SwitchoverPlan};
use crate::local::forwarder::Forwarder;
use crate::local::layout::{DirLock, Layout, LocalConfig, NodeConfig, io_error};
use crate::local::status::{EventRecord, LeaseStatus, LocalStatus, NodeStatus};
use crate::protocol::api::Role;
use crate::protocol::client::AgentClient;

struct NodeRuntime {
    child: Option<Child>,
    pid: Option<i32>,
}

/// The controller's state, shared by the round, the pollers and the HTTP API.
struct Shared {
    config: LocalConfig,
    layout: Layout,
    /// The node names, in configuration order.
    names: Vec<String>,
    store: Arc<MemoryLeaseStore>,
    /// Reports, the clock and background actions of the control loop.
    control: Arc<control::Shared>,
    /// The control loop's state as last persisted (the HTTP API and node starts read it).
    last_state: Mutex<ControlState>,
    /// A switchover accepted by the API, taken into the loop's state by the next round.
    pending_switchover: Mutex<Option<SwitchoverPlan>>,
    /// Made again when the token file changes (`secrets`).
    clients: Mutex<HashMap<String, Arc<AgentClient>>>,
    forwarder: Forwarder,
    nodes: Mutex<HashMap<String, NodeRuntime>>,
    status: Mutex<Option<LocalStatus>>,
    last_input: Mutex<Option<crate::engine::EngineInput>>,
    events: Mutex<Vec<EventRecord>>,
    last_failover: Mutex<Option<FailoverChoice>>,
    shutdown: tokio::sync::Notify,
    shutting_down: AtomicBool,
    /// A failover or switchover is under way.
    urgent: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
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

    /// The engine's view of the cluster's spec.
    fn spec(&self) -> EngineSpec {
        EngineSpec {
            mode: if self.config.sync {
                ReplicationMode::Sync
            } else {
                ReplicationMode::Async
            },
            sync_replicas: 1,
            durability: DataDurability::Required,
            lease_duration: self.config.timings.lease_duration,
            report_stale_after: report_stale_after(&self.config),
            failsafe: self.config.failsafe,
            ..EngineSpec::default()
        }
    }

    /// A node in transition (starting, rejoining, a replica not streaming) is polled faster.
    fn settled(&self, name: &str) -> bool {
        !lock(&self.last_state).former_primaries.contains(name)
            && self.control.reports().settled(name)
    }
}

/// The control state from `memory.json`; when it is missing for a cluster whose lease was ever
/// held, its synchronous quorum record counts as lost (not as empty).
fn load_state(
    layout: &Layout,
    lease: &crate::coordination::LeaseRecord,
) -> anyhow::Result<ControlState> {
    let path = layout.memory();
    match std::fs::read_to_string(&path) {
        Ok(text) => ControlState::from_json(&text)
            .map_err(|e| anyhow::anyhow!("failed to parse {}: {e}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut state = ControlState::default();
            state.memory.sync_record_lost = lease.holder.is_some() || lease.transitions > 0;
            Ok(state)
        }
        Err(error) => Err(anyhow::anyhow!(
            "failed to read {}: {error}",
            path.display()
        )),
    }
}

/// Generous: on a loaded 2-core machine a status answer can take a second. Safety does not
/// depend on it (the lease does); a frozen holder stops receiving writes after it.
fn report_stale_after(config: &LocalConfig) -> Duration {
    Duration::from_secs(3).max(Duration::from_millis(config.interval_ms * 8))
}

/// Polls one agent continuously; the round reads the latest answer and when it was asked.
async fn poll_node(shared: Arc<Shared>, name: String) {
    loop {
        shared
            .control
            .poll(shared.as_ref(), &name, Duration::from_secs(2))
            .await;
        // Poll fast while a failover or switchover is under way (the write endpoint switches as
        // soon as the new primary is seen out of recovery) and while this node is in transition.
        let pause = if shared.urgent.load(Ordering::Relaxed) {
            Duration::from_millis(20)
        } else if !shared.settled(&name) {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(shared.config.interval_ms)
        };
        tokio::time::sleep(pause).await;
    }
}

fn node_statuses(
    shared: &Shared,
    reports: &Reports,
    input: &crate::engine::EngineInput,
) -> Vec<NodeStatus> {
    let primary_status = shared
        .names
        .iter()
        .filter_map(|n| reports.latest(n))
        .map(|r| &r.status)
        .find(|s| s.role == Role::Primary);
    let stale_after = report_stale_after(&shared.config);
    let nodes = lock(&shared.nodes);
    shared
        .config
        .nodes
        .iter()
        .map(|node| {
            let status = reports
                .fresh(&node.name, input.now, stale_after)
                .map(|r| &r.status);
            let (lag_bytes, lag_seconds) = match (primary_status, status) {
                (Some(p), Some(s)) => control::standby_lag(p, s),
                _ => (None, None),
            };
            let lag_seconds = lag_seconds.filter(|_| {
                primary_status.is_some_and(|p| {
                    p.replication
                        .iter()
                        .any(|r| r.application_name == node.name)
                })
            });
            let sync_state = primary_status
                .map(|p| control::observe::sync_state_of(&[p], &node.name))
                .and_then(|s| s.map(|s| s.as_str().to_string()));
            NodeStatus {
                name: node.name.clone(),
                pg_port: node.pg_port,
                agent_port: node.agent_port,
                reachable: status.is_some(),
                role: status.map(|s| format!("{:?}", s.role).to_lowercase()),
                postgres_up: status.is_some_and(|s| s.postgres_up),
                timeline: status.and_then(|s| s.timeline),
                current_lsn: status.and_then(|s| s.current_lsn),
                receive_lsn: status.and_then(|s| s.receive_lsn),
                replay_lsn: status.and_then(|s| s.replay_lsn),
                lag_bytes,
                lag_seconds,
                sync_state,
                upstream: input.instance(&node.name).and_then(|o| o.upstream.clone()),
                agent_pid: nodes.get(&node.name).and_then(|n| n.pid),
                last_error: reports
                    .error(&node.name)
                    .map(str::to_string)
                    .or_else(|| status.and_then(|s| s.last_error.clone())),
            }
        })
        .collect()
}

/// One round of the shared loop plus local mode's status document. Returns whether anything
/// was done (then the next round runs at once).
async fn round(
    shared: &Arc<Shared>,
    control: &mut ControlLoop,
    last_phase: &mut Option<String>,
) -> bool {
    nodes::reap_children(shared);
    if let Some(plan) = lock(&shared.pending_switchover).take() {
        shared.record(
            "info",
            "SwitchoverRequested",
            format!("switchover from {} to {} requested", plan.from, plan.to),
        );
        control.state_mut().memory.switchover = Some(plan);
    }
    let (observation, decision, outcome) = match control
        .round(shared.as_ref(), &shared.names, shared.spec(), false)
        .await
    {
        Ok(done) => done,
        Err(error) => {
            tracing::error!(%error, "round failed");
            shared.record("warning", error.category(), error.to_string());
            return false;
        }
    };
    let phase_name = format!("{:?}", decision.status.phase);
    if last_phase.as_deref() != Some(phase_name.as_str()) {
        shared.record(
            "info",
            "Phase",
            format!("{phase_name}: {}", decision.status.message),
        );
        *last_phase = Some(phase_name);
    }
    let input = &observation.input;
    let lease = &observation.lease;
    let elapsed = input.now.saturating_since(input.lease.unchanged_since);
    let nodes = node_statuses(shared, &shared.control.reports(), input);
    let status = LocalStatus {
        cluster: shared.config.cluster.clone(),
        phase: decision.status.phase,
        message: decision.status.message.clone(),
        primary: decision.status.primary.clone(),
        lease: LeaseStatus {
            holder: lease.holder.clone(),
            version: lease.version.clone(),
            expires_in_ms: lease
                .holder
                .as_ref()
                .map(|_| input.lease_duration().saturating_sub(elapsed).as_millis() as u64),
            duration_ms: input.lease_duration().as_millis() as u64,
        },
        write_endpoint: format!("127.0.0.1:{}", shared.config.write_port),
        sync: shared.config.sync,
        nodes,
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
    *lock(&shared.last_input) = Some(observation.input);
    outcome.acted
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
    let state = load_state(&layout, &store.get().await?)?;
    let token =
        std::fs::read_to_string(layout.token()).map_err(io_error("read", &layout.token()))?;
    let clients = secrets::agent_clients(&config, token.trim(), None)?;
    let forwarder = Forwarder::bind(SocketAddr::from(([127, 0, 0, 1], config.write_port))).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.controller_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "failed to listen on 127.0.0.1:{} for the controller API: {e}",
                config.controller_port
            )
        })?;

    let mut control = ControlLoop::new(Arc::new(MonotonicClock::new()), state.clone());
    let shared = Arc::new(Shared {
        names: config.nodes.iter().map(|n| n.name.clone()).collect(),
        store: store.clone(),
        control: control.shared().clone(),
        last_state: Mutex::new(state),
        pending_switchover: Mutex::new(None),
        clients: Mutex::new(clients),
        forwarder,
        nodes: Mutex::new(HashMap::new()),
        status: Mutex::new(None),
        last_input: Mutex::new(None),
        events: Mutex::new(Vec::new()),
        last_failover: Mutex::new(None),
        shutdown: tokio::sync::Notify::new(),
        shutting_down: AtomicBool::new(false),
        urgent: AtomicBool::new(false),
        layout: layout.clone(),
        config: config.clone(),
    });
    // Rotation: the token is read again every 2 s.
    tokio::spawn(secrets::watch(
        shared.clone(),
        layout.clone(),
        token.trim().to_string(),
    ));
    // `/metrics`: counters fed by a sampler of each round's status, the round timer below and
    // the agents' lease renewals (counted where the lease service answers them).
    let metrics = Arc::new(crate::metrics::local::LocalMetrics::new(&config.cluster));
    let counted_store = Arc::new(crate::metrics::local::CountingLeaseStore::new(
        store.clone(),
        metrics.clone(),
    ));
    let api = api::router(shared.clone())
        .merge(lease_router(counted_store))
        .merge(axum::Router::new().route(
            "/metrics",
            axum::routing::get({
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
    let last_primary = control
        .state()
        .memory
        .last_primary
        .as_ref()
        .map(|p| p.name.clone());
    let first = lease
        .holder
        .clone()
        .or(last_primary)
        .unwrap_or_else(|| config.nodes[0].name.clone());
    if let Err(error) = nodes::start_node(&shared, &first, true).await {
        shared.record("warning", "NodeStartFailed", error);
    }
    // Replicas clone from the primary: start them once it serves.
    let starter = shared.clone();
    tokio::spawn(async move {
        let client = lock(&starter.clients)[&first].clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while tokio::time::Instant::now() < deadline {
            if let Ok(status) = client.status().await
                && status.postgres_up
                && status.role == Role::Primary
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for node in starter.config.nodes.iter().filter(|n| n.name != first) {
            if let Err(error) = nodes::start_node(&starter, &node.name, true).await {
                starter.record("warning", "NodeStartFailed", error);
            }
        }
    });
    for node in &config.nodes {
        tokio::spawn(poll_node(shared.clone(), node.name.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut last_phase = None;
    let interval = Duration::from_millis(config.interval_ms);
    let wake = control.shared().clone();
    loop {
        let round_started = tokio::time::Instant::now();
        let acted = round(&shared, &mut control, &mut last_phase).await;
        metrics.observe_round(round_started.elapsed());
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let pause = if acted || shared.urgent.load(Ordering::Relaxed) {
            Duration::from_millis(10)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wake.wake.notified() => {}
            _ = shared.shutdown.notified() => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    shared.record("info", "ControllerStopping", "stopping agents".to_string());
    shared.forwarder.target.send_replace(None);
    nodes::stop_agents(&shared, Duration::from_secs(20)).await;
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
    let wal_receivers = {
        let reports = shared.control.reports();
        shared
            .names
            .iter()
            .filter_map(|name| {
                let report = reports.latest(name)?;
                (report.status.role == Role::Replica).then(|| {
                    let streaming = report
                        .status
                        .wal_receiver
                        .as_ref()
                        .is_some_and(|w| w.status.is_streaming());
                    (name.clone(), streaming)
                })
            })
            .collect()
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        metrics.render(status.as_ref(), &wal_receivers),
    )
}
