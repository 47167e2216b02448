//! The control loop without processes: scripted agents (their statement actions logged too),
//! an in-memory lease store, a manual clock and tokio's paused timer (a frozen agent's call never answers; the
//! loop's bounds end it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;
use crate::coordination::{LeaseStore, MemoryLeaseStore};
use crate::engine::{self, Action, EngineSpec, Lsn, MonoTime, Phase, ReplicationMode, SyncSet};
use crate::postgres::probe::WalReceiver;
use crate::postgres::states::WalReceiverState;
use crate::protocol::api::{
    ActionResponse, AgentStatus, DataDirHealth, FenceRequest, FollowRequest, PromoteRequest,
    RejoinRequest, Role, StopRequest,
};
use crate::protocol::statements::{StatementResponse, SynchronousStandbyNamesRequest};

const LEASE: Duration = Duration::from_secs(8);

/// Everything the fake platform saw, in order: agent calls, SQL, persisted states.
type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, line: String) {
    log.lock().expect("log").push(line);
}

fn port_of(name: &str) -> u16 {
    5000 + u16::from(name.as_bytes()[0])
}

fn status(name: &str, role: Role, lsn: u64, upstream: Option<&str>) -> AgentStatus {
    AgentStatus {
        name: name.to_string(),
        cluster: "test".to_string(),
        role,
        intended_role: role,
        postgres_up: matches!(role, Role::Primary | Role::Replica),
        postgres_pid: None,
        postgres_port: port_of(name),
        system_identifier: Some("1".to_string()),
        timeline: Some(1),
        in_recovery: Some(role == Role::Replica),
        current_lsn: (role == Role::Primary).then_some(Lsn(lsn)),
        receive_lsn: (role == Role::Replica).then_some(Lsn(lsn)),
        replay_lsn: (role == Role::Replica).then_some(Lsn(lsn)),
        last_replay_timestamp: None,
        replication: Vec::new(),
        wal_receiver: upstream.map(|up| WalReceiver {
            status: WalReceiverState::Streaming,
            sender_host: Some("127.0.0.1".to_string()),
            sender_port: Some(i32::from(port_of(up))),
            slot_name: None,
            received_tli: Some(1),
            flushed_lsn: Some(Lsn(lsn)),
            latest_end_lsn: Some(Lsn(lsn)),
            last_msg_receipt_time: None,
        }),
        upstream: None,
        data_dir: DataDirHealth {
            path: "/data".to_string(),
            exists: true,
            initialized: true,
            pg_version: Some("15".to_string()),
            standby_signal: role == Role::Replica,
            free_bytes: None,
        },
        crash_restarts: 0,
        last_rejoin: None,
        fence_reason: None,
        last_error: None,
        probe_error: None,
        observed_at: chrono::Utc::now(),
        parameters_hash: None,
        pending_restart: None,
        pending_restart_running: None,
        failsafe: None,
        postgres_major: None,
        major_upgrade: None,
    }
}

/// A scripted agent: it answers from its current status and changes it the way the real
/// agent's actions do. A frozen agent never answers; a dead one refuses connections.
struct FakeAgent {
    status: Mutex<AgentStatus>,
    frozen: AtomicBool,
    dead: AtomicBool,
    log: Log,
}

impl FakeAgent {
    fn answer<'a>(
        &'a self,
        call: &'static str,
        change: impl FnOnce(&mut AgentStatus) + Send + 'a,
    ) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        Box::pin(async move {
            let name = self.status.lock().expect("status").name.clone();
            push(&self.log, format!("{call} {name}"));
            if self.frozen.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.dead.load(Ordering::SeqCst) {
                return Err(CallError::Gone("connection refused".to_string()));
            }
            let mut status = self.status.lock().expect("status");
            change(&mut status);
            Ok(ActionResponse {
                message: format!("{call} done"),
                rejoin: None,
                status: status.clone(),
            })
        })
    }
}

impl FakeAgent {
    /// A statement action: logged as `call name detail`, answered like the other calls.
    fn statement<'a>(
        &'a self,
        call: &'static str,
        detail: String,
    ) -> BoxFuture<'a, Result<StatementResponse, CallError>> {
        Box::pin(async move {
            let name = self.status.lock().expect("status").name.clone();
            push(
                &self.log,
                format!("{call} {name} {detail}").trim_end().to_string(),
            );
            if self.frozen.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.dead.load(Ordering::SeqCst) {
                return Err(CallError::Gone("connection refused".to_string()));
            }
            Ok(StatementResponse {
                message: format!("{call} done"),
                elapsed_ms: 0,
            })
        })
    }
}

impl AgentApi for FakeAgent {
    fn checkpoint(&self, _: Duration) -> BoxFuture<'_, Result<StatementResponse, CallError>> {
        self.statement("checkpoint", String::new())
    }

    fn synchronous_standby_names<'a>(
        &'a self,
        request: &'a SynchronousStandbyNamesRequest,
        _: Duration,
    ) -> BoxFuture<'a, Result<StatementResponse, CallError>> {
        self.statement("sync", request.value())
    }

    fn status(&self) -> BoxFuture<'_, Result<AgentStatus, CallError>> {
        Box::pin(async move {
            if self.frozen.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.dead.load(Ordering::SeqCst) {
                return Err(CallError::Gone("connection refused".to_string()));
            }
            Ok(self.status.lock().expect("status").clone())
        })
    }

    fn promote<'a>(
        &'a self,
        _: &'a PromoteRequest,
    ) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        self.answer("promote", |s| {
            s.role = Role::Primary;
            s.intended_role = Role::Primary;
            s.current_lsn = s.receive_lsn;
            s.receive_lsn = None;
            s.replay_lsn = None;
            s.wal_receiver = None;
            s.timeline = s.timeline.map(|t| t + 1);
        })
    }

    fn stop<'a>(&'a self, _: &'a StopRequest) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        self.answer("stop", |s| {
            s.role = Role::Stopped;
            s.postgres_up = false;
        })
    }

    fn fence<'a>(
        &'a self,
        _: &'a FenceRequest,
    ) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        self.answer("fence", |s| {
            s.role = Role::Fenced;
            s.postgres_up = false;
        })
    }

    fn follow<'a>(
        &'a self,
        _: &'a FollowRequest,
    ) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        self.answer("follow", |s| s.role = Role::Replica)
    }

    fn rejoin<'a>(
        &'a self,
        _: &'a RejoinRequest,
    ) -> BoxFuture<'a, Result<ActionResponse, CallError>> {
        self.answer("rejoin", |s| {
            s.role = Role::Replica;
            s.postgres_up = true;
        })
    }
}

struct ManualClock(Mutex<MonoTime>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().expect("clock");
        *now = now.plus(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> MonoTime {
        *self.0.lock().expect("clock")
    }
}

struct FakePlatform {
    lease: MemoryLeaseStore,
    agents: HashMap<String, Arc<FakeAgent>>,
    log: Log,
    persisted: Mutex<Vec<ControlState>>,
}

impl Platform for FakePlatform {
    fn lease(&self) -> &dyn LeaseStore {
        &self.lease
    }

    fn agent(&self, instance: &str) -> Option<Arc<dyn AgentApi>> {
        self.agents
            .get(instance)
            .map(|a| a.clone() as Arc<dyn AgentApi>)
    }

    fn agent_url(&self, instance: &str) -> Option<String> {
        self.agents
            .contains_key(instance)
            .then(|| format!("http://127.0.0.1:{}", port_of(instance) + 1))
    }

    fn postgres_address(&self, instance: &str) -> Option<(String, u16)> {
        self.agents
            .contains_key(instance)
            .then(|| ("127.0.0.1".to_string(), port_of(instance)))
    }

    fn emit(&self, event: ControlEvent<'_>) {
        if let ControlEvent::Completed(done) = event {
            push(
                &self.log,
                format!("completed {} {}", done.kind, done.instance),
            );
        }
    }

    fn persist<'a>(&'a self, state: &'a ControlState) -> BoxFuture<'a, Result<(), PersistError>> {
        push(
            &self.log,
            format!(
                "persist switchover={} sync={}",
                state.memory.switchover.is_some(),
                state.memory.recorded_sync.to_standby_names()
            ),
        );
        self.persisted
            .lock()
            .expect("persisted")
            .push(state.clone());
        Box::pin(async { Ok(()) })
    }
}

struct Cluster {
    platform: FakePlatform,
    clock: Arc<ManualClock>,
    control: ControlLoop,
    names: Vec<String>,
    spec: EngineSpec,
}

impl Cluster {
    /// `a` primary (holding the lease), `b` and `c` streaming from it; `b` the most advanced.
    async fn new(mode: ReplicationMode) -> Cluster {
        let log: Log = Arc::default();
        let agent = |name: &str, role: Role, lsn: u64, upstream: Option<&str>| {
            (
                name.to_string(),
                Arc::new(FakeAgent {
                    status: Mutex::new(status(name, role, lsn, upstream)),
                    frozen: AtomicBool::new(false),
                    dead: AtomicBool::new(false),
                    log: log.clone(),
                }),
            )
        };
        let agents = HashMap::from([
            agent("a", Role::Primary, 300, None),
            agent("b", Role::Replica, 300, Some("a")),
            agent("c", Role::Replica, 200, Some("a")),
        ]);
        let lease = MemoryLeaseStore::new(LEASE);
        let version = lease.get().await.expect("lease").version;
        lease.acquire("a", &version).await.expect("acquire");
        let clock = Arc::new(ManualClock(Mutex::new(MonoTime::from_millis(1_000))));
        Cluster {
            platform: FakePlatform {
                lease,
                agents,
                log,
                persisted: Mutex::new(Vec::new()),
            },
            control: ControlLoop::new(clock.clone(), ControlState::default()),
            clock,
            names: vec!["a".to_string(), "b".to_string(), "c".to_string()],
            spec: EngineSpec {
                mode,
                lease_duration: LEASE,
                ..EngineSpec::default()
            },
        }
    }

    async fn round(&mut self) -> (engine::Decision, Outcome) {
        let (_, decision, outcome) = self
            .control
            .round(&self.platform, &self.names, self.spec.clone(), true)
            .await
            .expect("round");
        // Let background actions finish (they are answered at once unless frozen).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        (decision, outcome)
    }

    async fn observe(&mut self) -> Observation {
        let lease = self
            .control
            .read_lease(&self.platform.lease)
            .await
            .expect("lease");
        self.control
            .observe(&self.platform, lease, &self.names, self.spec.clone(), true)
            .await
            .expect("observe")
    }

    fn log(&self) -> Vec<String> {
        self.platform.log.lock().expect("log").clone()
    }

    async fn holder(&self) -> Option<String> {
        self.platform.lease.get().await.expect("lease").holder
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_primary_is_replaced_by_the_most_advanced_replica_after_the_lease_expires() {
    let mut cluster = Cluster::new(ReplicationMode::Async).await;
    // The first round applies the (empty) synchronous setting the primary had not reported.
    cluster.round().await;
    let (decision, _) = cluster.round().await;
    assert_eq!(decision.status.phase, Phase::Healthy);
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);

    cluster.platform.agents["a"]
        .dead
        .store(true, Ordering::SeqCst);
    let (decision, _) = cluster.round().await;
    assert_eq!(decision.status.phase, Phase::PrimaryUnavailable);
    assert!(
        decision.actions.is_empty(),
        "no takeover before the lease expired"
    );

    // The loop keeps running while the lease ages (a gap longer than a lease duration
    // between rounds is a stall: `a_stalled_loop_times_the_lease_anew`).
    cluster.clock.advance(LEASE / 2);
    cluster.round().await;
    cluster.clock.advance(LEASE / 2 + Duration::from_millis(1));
    let (decision, outcome) = cluster.round().await;
    assert!(outcome.urgent);
    assert!(
        decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::AcquireLease { holder, .. } if holder == "b")),
        "{:?}",
        decision.actions
    );
    assert_eq!(cluster.holder().await.as_deref(), Some("b"));
    // The holder is promoted (in the background), then serves.
    let mut serving = None;
    for _ in 0..4 {
        let (decision, _) = cluster.round().await;
        serving = decision.status.primary;
    }
    assert!(cluster.log().contains(&"promote b".to_string()));
    assert!(cluster.log().contains(&"completed promote b".to_string()));
    assert_eq!(serving.as_deref(), Some("b"));
    assert!(
        cluster.control.state().former_primaries.contains("a"),
        "the old primary must rejoin, not merely follow"
    );
}

#[tokio::test(start_paused = true)]
async fn a_switchover_checkpoints_stops_and_hands_over_and_uses_the_stop_answer_as_a_report() {
    let mut cluster = Cluster::new(ReplicationMode::Async).await;
    cluster.round().await;
    let (observation, _, _) = cluster
        .control
        .round(
            &cluster.platform,
            &cluster.names,
            cluster.spec.clone(),
            true,
        )
        .await
        .expect("round");
    let plan = engine::plan_switchover(&observation.input, Some("b")).expect("plan");
    cluster.control.state_mut().memory.switchover = Some(plan);

    // The demotion: the stop's answer is stored as a's report at once.
    let observation = cluster.observe().await;
    let decision = engine::decide(&observation.input);
    assert!(
        matches!(decision.actions.first(), Some(Action::Demote { instance }) if instance == "a"),
        "{:?}",
        decision.actions
    );
    cluster
        .control
        .act(&cluster.platform, &observation, &decision)
        .await
        .expect("act");
    let reported = cluster
        .control
        .shared()
        .reports()
        .latest("a")
        .map(|r| r.status.role);
    assert_eq!(
        reported,
        Some(Role::Stopped),
        "the stop's answer is the freshest report"
    );
    assert_eq!(
        cluster.holder().await,
        None,
        "the lease is released after the stop"
    );
    let log = cluster.log();
    let position = |line: &str| log.iter().position(|l| l == line);
    let persisted_plan = log
        .iter()
        .position(|l| l.starts_with("persist switchover=true"))
        .expect("plan persisted");
    assert!(persisted_plan < position("checkpoint a").expect("checkpoint"));
    assert!(position("checkpoint a") < position("stop a"));

    for _ in 0..4 {
        cluster.round().await;
    }
    assert_eq!(cluster.holder().await.as_deref(), Some("b"));
    assert!(cluster.log().contains(&"promote b".to_string()));
}

#[tokio::test(start_paused = true)]
async fn a_frozen_agent_cannot_hold_the_round_beyond_its_bounds() {
    let mut cluster = Cluster::new(ReplicationMode::Async).await;
    cluster.round().await;
    let observation = cluster.observe().await;
    let plan = engine::plan_switchover(&observation.input, Some("b")).expect("plan");
    cluster.control.state_mut().memory.switchover = Some(plan);
    cluster.platform.agents["a"]
        .frozen
        .store(true, Ordering::SeqCst);

    let started = tokio::time::Instant::now();
    let (decision, outcome) = cluster.round().await;
    let took = started.elapsed();
    let bounds = Bounds::for_lease(LEASE);
    assert!(matches!(
        decision.actions.first(),
        Some(Action::Demote { .. })
    ));
    assert!(
        matches!(
            outcome.error,
            Some(ActError::Agent {
                action: "demote",
                source: CallError::TimedOut(_),
                ..
            })
        ),
        "{:?}",
        outcome.error
    );
    // Polling the frozen agent (2 s) plus the demotion's bound, nothing more.
    assert!(
        took <= Duration::from_secs(2) + bounds.checkpoint + bounds.demote + Duration::from_secs(1),
        "the round took {took:?}"
    );
    assert!(took < LEASE * 2, "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn the_sync_quorum_is_persisted_before_it_is_applied() {
    let mut cluster = Cluster::new(ReplicationMode::Sync).await;
    for _ in 0..3 {
        cluster.round().await;
    }
    let log = cluster.log();
    let applied = log
        .iter()
        .position(|l| l.starts_with("sync a ANY 1"))
        .expect("synchronous_standby_names applied");
    // The decision that applies the quorum was recorded before it was carried out.
    let recorded = log
        .iter()
        .position(|l| l.starts_with("persist"))
        .expect("state persisted");
    assert!(recorded < applied, "{log:#?}");
    // Once the primary confirmed the setting, the recorded quorum narrows to it, persisted.
    let last = log
        .iter()
        .rev()
        .find(|l| l.starts_with("persist"))
        .expect("persisted");
    assert!(last.contains("ANY 1 (\"b\", \"c\")"), "{log:#?}");
    let state = cluster.control.state();
    assert_eq!(
        state.memory.recorded_sync,
        SyncSet {
            k: 1,
            members: vec!["b".to_string(), "c".to_string()],
        }
    );
    assert_eq!(
        state.applied_sync.get("a").map(SyncSet::to_standby_names),
        Some("ANY 1 (\"b\", \"c\")".to_string())
    );
}

/// The loop itself did not run for longer than a lease duration (a frozen controller): what it
/// saw before says nothing about the time between, so the lease is timed anew rather than
/// taken from a holder that may have renewed it meanwhile.
#[tokio::test(start_paused = true)]
async fn a_stalled_loop_times_the_lease_anew() {
    let mut cluster = Cluster::new(ReplicationMode::Async).await;
    cluster.round().await;
    cluster.round().await;
    cluster.platform.agents["a"]
        .dead
        .store(true, Ordering::SeqCst);
    cluster.clock.advance(LEASE * 2);
    let (decision, _) = cluster.round().await;
    assert!(
        !decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::AcquireLease { .. })),
        "taken over right after a stall: {:?}",
        decision.actions
    );
    assert_eq!(cluster.holder().await.as_deref(), Some("a"));
    // Observed unchanged for a lease duration after the stall: expired.
    cluster.clock.advance(LEASE / 2);
    cluster.round().await;
    cluster.clock.advance(LEASE / 2 + Duration::from_millis(1));
    cluster.round().await;
    assert_eq!(cluster.holder().await.as_deref(), Some("b"));
}
