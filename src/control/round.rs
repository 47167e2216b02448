//! The round: observe → decide → persist → act. One implementation for both platforms; the
//! platform adapters call [`ControlLoop::observe`], may restrict the input or the decision
//! (the operator's fencing annotation, planned switchovers), and hand the decision to
//! [`ControlLoop::act`], which records it durably before carrying it out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::coordination::{LeaseError, LeaseRecord, LeaseStore};
use crate::engine::{self, Action, Decision, EngineInput, EngineSpec, LeaseView, MonoTime, Phase};

use super::actuate::{self, ActError, Bounds, Completed, Ran, Shared};
use super::failsafe;
use super::observe::{self, Addresses};
use super::platform::{Clock, ControlEvent, PersistError, Platform};
use super::state::ControlState;

/// How long reading the lease may take.
pub const LEASE_READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("failed to read the lease: {0}")]
    Lease(#[source] LeaseError),
    #[error("failed to read the lease: no answer within {0:?}")]
    LeaseTimedOut(Duration),
    #[error("refusing to act on a decision that was not recorded: {0}")]
    Persist(#[source] PersistError),
}

impl RoundError {
    /// Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            RoundError::Lease(_) | RoundError::LeaseTimedOut(_) => "LeaseFailed",
            RoundError::Persist(_) => "StatePersistFailed",
        }
    }
}

/// One round's view, before the decision.
#[derive(Debug, Clone)]
pub struct Observation {
    pub input: EngineInput,
    pub lease: LeaseRecord,
    pub addresses: Addresses,
}

/// What acting on a decision did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// An inline action ran (the next round should come at once).
    pub acted: bool,
    /// A failover or switchover is under way: poll and decide fast.
    pub urgent: bool,
    /// The first action that failed; the actions after it were not tried.
    pub error: Option<ActError>,
    /// Background actions that finished since the last round.
    pub completed: Vec<Completed>,
}

/// A failover or switchover is under way, or nobody holds the lease: the next round comes fast.
pub fn is_urgent(input: &EngineInput, decision: &Decision) -> bool {
    matches!(
        decision.status.phase,
        Phase::FailingOver | Phase::SwitchingOver | Phase::PrimaryUnavailable
    ) || decision.memory.switchover.is_some()
        || input.lease.holder.is_none()
}

/// The loop's state for one cluster.
pub struct ControlLoop {
    shared: Arc<Shared>,
    state: ControlState,
    /// The state as last persisted.
    persisted: Option<ControlState>,
    /// (holder, version) of the lease and when this observer first saw it.
    lease_seen: Option<(Option<String>, String, MonoTime)>,
    /// When the last round observed: a longer gap than a lease duration means this loop was
    /// stalled (a frozen process), and what it saw before says nothing about the time between.
    last_observed: Option<MonoTime>,
    completed_tx: UnboundedSender<Completed>,
    completed_rx: UnboundedReceiver<Completed>,
    /// Completions drained by `observe`, handed out by the next `act`.
    completed: Vec<Completed>,
    /// Last message per engine event reason, to say a repeated decision once.
    last_messages: HashMap<String, String>,
}

impl ControlLoop {
    /// A loop starting from `state` (as loaded from where the platform persists it).
    pub fn new(clock: Arc<dyn Clock>, state: ControlState) -> Self {
        let (completed_tx, completed_rx) = tokio::sync::mpsc::unbounded_channel();
        ControlLoop {
            shared: Arc::new(Shared::new(clock)),
            persisted: Some(state.clone()),
            state,
            lease_seen: None,
            last_observed: None,
            completed_tx,
            completed_rx,
            completed: Vec::new(),
            last_messages: HashMap::new(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn state(&self) -> &ControlState {
        &self.state
    }

    /// Changes the state between rounds (a switchover requested through an API); persisted
    /// with the next decision.
    pub fn state_mut(&mut self) -> &mut ControlState {
        &mut self.state
    }

    /// When the current (holder, version) of the lease was first seen.
    pub fn lease_unchanged_since(&self) -> Option<MonoTime> {
        self.lease_seen.as_ref().map(|(_, _, at)| *at)
    }

    /// The lease could not be read: its expiry is timed anew from the next successful read.
    /// While the store is unreachable for this observer it may be for the holder too, and the
    /// holder may be serving on its members' confirmations (the failsafe): a lease is expired
    /// only after a full lease duration of reads that saw it unchanged.
    fn lease_unreadable(&mut self) {
        if self.lease_seen.take().is_some() {
            tracing::info!(
                "the lease could not be read: its expiry is timed anew from the next read"
            );
        }
    }

    /// Reads the lease, bounded. A round reads it before anything else: what the pods and
    /// agents show afterwards is at least as recent as the lease. A failed read times the
    /// lease anew ([`ControlLoop::lease_unreadable`]).
    pub async fn read_lease(&mut self, lease: &dyn LeaseStore) -> Result<LeaseRecord, RoundError> {
        let result = tokio::time::timeout(LEASE_READ_TIMEOUT, lease.get())
            .await
            .map_err(|_| RoundError::LeaseTimedOut(LEASE_READ_TIMEOUT))
            .and_then(|read| read.map_err(RoundError::Lease));
        if result.is_err() {
            self.lease_unreadable();
        }
        result
    }

    /// Times the lease, polls the agents when `poll` (in parallel, each within the platform's
    /// bound; local mode polls continuously instead), takes in finished background actions and
    /// former primaries already rewound, and builds the engine's input.
    pub async fn observe<P: Platform + ?Sized>(
        &mut self,
        platform: &P,
        lease: LeaseRecord,
        instances: &[String],
        spec: EngineSpec,
        poll: bool,
    ) -> Result<Observation, RoundError> {
        let now = self.shared.now();
        if let Some(last) = self.last_observed.replace(now)
            && now.saturating_since(last) > lease.duration
        {
            // The reports are as old as the stall: a holder that renewed meanwhile would be
            // taken for expired. Time the lease anew, as after an unreadable store.
            tracing::warn!(
                stalled_ms = now.saturating_since(last).as_millis() as u64,
                "the control loop did not run for longer than a lease duration"
            );
            self.lease_unreadable();
        }
        let seen = match &self.lease_seen {
            Some((holder, version, at)) if *holder == lease.holder && *version == lease.version => {
                *at
            }
            _ => now,
        };
        self.lease_seen = Some((lease.holder.clone(), lease.version.clone(), seen));
        if poll {
            let shared = &self.shared;
            futures::future::join_all(
                instances
                    .iter()
                    .map(|instance| shared.poll(platform, instance, platform.poll_bound(instance))),
            )
            .await;
        }
        self.shared.reports().retain(instances);
        self.state.retain(instances);
        while let Ok(done) = self.completed_rx.try_recv() {
            if done.kind == "rejoin" && done.result.is_ok() {
                self.state.former_primaries.remove(&done.instance);
            }
            platform.emit(ControlEvent::Completed(&done));
            self.completed.push(done);
        }
        let addresses: Addresses = instances
            .iter()
            .filter_map(|name| Some((name.clone(), platform.postgres_address(name)?)))
            .collect();
        if let Some(holder) = lease.holder.as_deref() {
            let rewound = {
                let reports = self.shared.reports();
                let shared = &self.shared;
                observe::rewound_former_primaries(
                    &self.state,
                    holder,
                    &addresses,
                    &reports,
                    &|name| shared.is_busy(name),
                )
            };
            if let Some((host, port)) = addresses.get(holder) {
                for (instance, path) in &rewound {
                    self.state.former_primaries.remove(instance);
                    platform.emit(ControlEvent::Rejoined {
                        instance,
                        path: *path,
                        upstream: (host, *port),
                    });
                }
            }
        }
        let input = {
            let reports = self.shared.reports();
            observe::engine_input(
                self.shared.now(),
                instances,
                &addresses,
                &reports,
                LeaseView {
                    holder: lease.holder.clone(),
                    version: lease.version.clone(),
                    unchanged_since: seen,
                    duration: lease.duration,
                },
                spec,
                &self.state,
            )
        };
        Ok(Observation {
            input,
            lease,
            addresses,
        })
    }

    /// Records the decision's memory (and former primaries), persists it when it changed —
    /// before any action that depends on it — then carries out the actions in order, stopping
    /// at the first failure.
    pub async fn act<P: Platform + ?Sized>(
        &mut self,
        platform: &P,
        observation: &Observation,
        decision: &Decision,
    ) -> Result<Outcome, RoundError> {
        let input = &observation.input;
        engine::track_former_primaries(
            &mut self.state.former_primaries,
            &mut self.state.last_holder,
            input,
        );
        self.state.memory = decision.memory.clone();
        self.persist(platform).await?;
        self.emit_engine_events(platform, &decision.events);
        let urgent = is_urgent(input, decision);
        platform.decided(input, decision, urgent);

        let bounds = Bounds::for_lease(input.lease_duration());
        let mut outcome = Outcome {
            urgent,
            completed: std::mem::take(&mut self.completed),
            ..Outcome::default()
        };
        for action in &decision.actions {
            tracing::info!(action = ?action, "action");
            match actuate::execute(&self.shared, platform, &self.completed_tx, &bounds, action)
                .await
            {
                Ok(ran) => {
                    outcome.acted |= ran == Ran::Inline;
                    if let Action::SetSynchronousStandbys { primary, sync } = action {
                        self.state
                            .applied_sync
                            .insert(primary.clone(), sync.clone());
                    }
                }
                Err(error) => {
                    tracing::warn!(action = action.kind(), %error, "action failed");
                    platform.emit(ControlEvent::ActionFailed {
                        action,
                        error: &error,
                    });
                    outcome.error = Some(error);
                    break;
                }
            }
        }
        // What the actions learnt (the applied sync setting) is kept for the next round.
        self.persist(platform).await?;
        self.update_failsafe(platform, observation).await;
        Ok(outcome)
    }

    /// Observe, decide with the engine, act: the whole round for a platform that adds nothing
    /// between the steps.
    pub async fn round<P: Platform + ?Sized>(
        &mut self,
        platform: &P,
        instances: &[String],
        spec: EngineSpec,
        poll: bool,
    ) -> Result<(Observation, Decision, Outcome), RoundError> {
        let lease = self.read_lease(platform.lease()).await?;
        let observation = self.observe(platform, lease, instances, spec, poll).await?;
        let decision = engine::decide(&observation.input);
        let outcome = self.act(platform, &observation, &decision).await?;
        Ok((observation, decision, outcome))
    }

    /// Tells the agents whose report shows another failsafe switch or member list than the
    /// spec and the instances' addresses give (bounded, off the failover path: after acting).
    async fn update_failsafe<P: Platform + ?Sized>(&self, platform: &P, observation: &Observation) {
        let input = &observation.input;
        let instances: Vec<String> = input.instances.iter().map(|i| i.name.clone()).collect();
        let request = failsafe::members_request(
            input.spec.failsafe,
            &instances,
            &observation.addresses,
            |name| platform.agent_url(name),
        );
        let targets = {
            let reports = self.shared.reports();
            failsafe::out_of_date(&reports, &instances, &request.digest())
        };
        if !targets.is_empty() {
            failsafe::tell_agents(platform, &targets, &request).await;
        }
    }

    async fn persist<P: Platform + ?Sized>(&mut self, platform: &P) -> Result<(), RoundError> {
        if self.persisted.as_ref() == Some(&self.state) {
            return Ok(());
        }
        platform
            .persist(&self.state)
            .await
            .map_err(RoundError::Persist)?;
        self.persisted = Some(self.state.clone());
        Ok(())
    }

    /// Engine events, without repeating the same message for the same reason.
    fn emit_engine_events<P: Platform + ?Sized>(&mut self, platform: &P, events: &[engine::Event]) {
        for event in events {
            // Waiting is said by the status; do not flood the log with it every round.
            if event.reason == engine::EventReason::SwitchoverWaiting {
                continue;
            }
            let reason = format!("{:?}", event.reason);
            if self.last_messages.get(&reason) == Some(&event.message) {
                continue;
            }
            self.last_messages.insert(reason, event.message.clone());
            platform.emit(ControlEvent::Engine(event));
        }
    }
}
