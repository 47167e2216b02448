//! A model of the whole failover protocol for the `stateright` model checker: see
//! `docs/model.md`. Modules: [`state`] (what is modelled), [`agent`] (agent, keeper, watchdog,
//! supervisor and postgres rules), [`controller`] (the control loop around the real
//! `pgrs::engine::decide`), [`adversary`] (faults), [`invariants`].

pub mod adversary;
pub mod agent;
pub mod controller;
pub mod invariants;
pub mod state;

use stateright::{Model, Property};

use state::*;

/// One flag per fix of issue 12; `false` is today's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Hole 1: arm the keeper (and watchdog) when `pg_promote` is signalled, not after the
    /// post-promotion work.
    pub fence_from_promote_signal: bool,
    /// Hole 2: a restarted controller reads its persisted memory back.
    pub persisted_memory: bool,
    /// Hole 3: agent and controller release the lease only after a *clean* stop, and the
    /// free-lease switchover applies the quorum rule.
    pub switchover_quorum_and_release_after_clean_stop: bool,
    /// Hole 4: the promote gate confirms the lease with a write, the keeper's deadline counts
    /// from that confirmation, and a renewal refused with no holder fences.
    pub deadline_from_confirmation: bool,
    /// Hole 5: a primary whose postgres does not come up within the start budget stops
    /// renewing (fences itself).
    pub start_budget: bool,
    /// Found by this model (not in issue 12): a primary whose postgres the watchdog killed
    /// restarts it as a writable primary (crash restart) before its keeper notices the passed
    /// deadline. Fix: restart as primary only while the lease is proven (`now < proven_at +
    /// renew_deadline`), else stay down fenced.
    pub restart_only_with_proof: bool,
    /// Issue 13, the failsafe: a primary whose store link is cut keeps serving while every
    /// other member confirms (a replica of it, agent up, reachable); a confirming member
    /// refuses promotion for a lease duration.
    pub failsafe: bool,
    /// The failsafe's promote-gate rule: a member with an unexpired confirmation refuses to
    /// promote. `false` shows the rule is needed.
    pub failsafe_gate: bool,
}

impl Rules {
    /// Today's code, as described in issue 12.
    pub fn as_before() -> Self {
        Rules {
            fence_from_promote_signal: false,
            persisted_memory: false,
            switchover_quorum_and_release_after_clean_stop: false,
            deadline_from_confirmation: false,
            start_budget: false,
            restart_only_with_proof: false,
            failsafe: false,
            failsafe_gate: false,
        }
    }

    /// The intended fixes, with the real engine deciding.
    pub fn fixed() -> Self {
        Rules {
            fence_from_promote_signal: true,
            persisted_memory: true,
            switchover_quorum_and_release_after_clean_stop: true,
            deadline_from_confirmation: true,
            start_budget: true,
            restart_only_with_proof: true,
            failsafe: false,
            failsafe_gate: false,
        }
    }

    /// The fixed rules with the failsafe on (issue 13).
    pub fn with_failsafe() -> Self {
        Rules {
            failsafe: true,
            failsafe_gate: true,
            ..Rules::fixed()
        }
    }

    /// All fixes but the one for `hole` (1..=6; 6 is `restart_only_with_proof`): isolates it.
    pub fn fixed_except(hole: u8) -> Self {
        let mut rules = Rules::fixed();
        match hole {
            1 => rules.fence_from_promote_signal = false,
            2 => rules.persisted_memory = false,
            3 => rules.switchover_quorum_and_release_after_clean_stop = false,
            4 => rules.deadline_from_confirmation = false,
            5 => rules.start_budget = false,
            _ => rules.restart_only_with_proof = false,
        }
        rules
    }
}

/// Which adversary moves are enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Moves {
    pub freeze: bool,
    pub crash_node: bool,
    pub crash_pg: bool,
    pub break_pg: bool,
    pub cut_ctl: bool,
    pub cut_store: bool,
    pub cut_repl: bool,
    pub drop: bool,
    pub promote_fail: bool,
    pub restart_ctl: bool,
}

impl Moves {
    pub fn all() -> Self {
        Moves {
            freeze: true,
            crash_node: true,
            crash_pg: true,
            break_pg: true,
            cut_ctl: true,
            cut_store: true,
            cut_repl: true,
            drop: true,
            promote_fail: true,
            restart_ctl: true,
        }
    }
}

/// Timing in ticks. Safety needs `renew_deadline + shutdown_budget < lease`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease: u8,
    pub renew_deadline: u8,
    pub shutdown_budget: u8,
    /// Hole-5 fix: how long a primary may be down and restarting before it fences itself.
    pub start_budget: u8,
}

impl Timing {
    /// The default profile (8 s / 5 s / 2 s), one tick a second.
    pub fn real() -> Self {
        Timing {
            lease: 8,
            renew_deadline: 5,
            shutdown_budget: 2,
            start_budget: 3,
        }
    }

    /// Scaled down for CI: 4 / 2 / 1.
    pub fn small() -> Self {
        Timing {
            lease: 4,
            renew_deadline: 2,
            shutdown_budget: 1,
            start_budget: 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub rules: Rules,
    pub moves: Moves,
    pub timing: Timing,
    /// Synchronous replication (`ANY 1` of the other instances) instead of asynchronous.
    pub sync_mode: bool,
    /// Time does not advance past this tick.
    pub horizon: u8,
    /// How many faults the adversary may inject.
    pub faults: u8,
    /// How many client writes (commits) happen at most.
    pub max_writes: u8,
    /// How many planned switchovers may be requested.
    pub switchovers: u8,
    /// Liveness: after this many ticks without a fault or heal, with a healthy majority, a
    /// primary must exist.
    pub liveness_after: u8,
}

impl Config {
    pub fn new(rules: Rules, moves: Moves) -> Self {
        let timing = Timing::small();
        Config {
            rules,
            moves,
            timing,
            sync_mode: false,
            horizon: 8,
            faults: 2,
            max_writes: 1,
            switchovers: 0,
            liveness_after: liveness_ticks(timing),
        }
    }
}

/// Ticks a failover may take after the last fault: renew deadline, start budget, lease expiry
/// (twice: a released lease's patience), and promotion.
pub fn liveness_ticks(t: Timing) -> u8 {
    t.start_budget + 2 * t.lease + 2
}

/// A step of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Tick,
    // Agent, keeper, watchdog, supervisor, postgres (`agent.rs`).
    KeeperRun(u8),
    Deliver(u8),
    PromoteSignal(u8),
    PromoteFinish(u8),
    CrashRestart(u8),
    StopEnd(u8),
    Stream(u8),
    Write(u8),
    WatchdogFire(u8),
    // Controller (`controller.rs`).
    Round,
    Act,
    Abandon,
    RequestSwitchover(u8),
    // Adversary (`adversary.rs`).
    Fault(adversary::Fault),
}

pub struct ProtocolModel {
    pub config: Config,
}

impl ProtocolModel {
    pub fn new(config: Config) -> Self {
        ProtocolModel { config }
    }

    /// Steady state: `a` primary and lease holder (renewed at 0), `b` and `c` stream from it.
    pub fn initial(&self) -> State {
        let sync = if self.config.sync_mode {
            Sync {
                k: 1,
                members: mask(1) | mask(2),
            }
        } else {
            Sync::default()
        };
        let replica = Inst {
            agent: Proc::Up,
            pg: Pg::Replica,
            phase: Phase::Running,
            intended: Intended::Replica,
            upstream: Some(0),
            wal: Vec::new(),
            sync: Sync::default(),
            keeper: Keeper::Idle,
            proven_at: 0,
            watchdog: None,
            broken: false,
            starting_since: None,
            promo: Promo::Idle,
            inbox: None,
            stop_clean: None,
            renewed: false,
            confirmed: None,
        };
        let primary = Inst {
            pg: Pg::Primary,
            intended: Intended::Primary,
            upstream: None,
            sync,
            keeper: Keeper::Active,
            watchdog: Some(self.config.timing.renew_deadline),
            ..replica.clone()
        };
        let mut applied_sync = [None; N];
        applied_sync[0] = Some(sync);
        State {
            now: 0,
            inst: [primary, replica.clone(), replica],
            holder: Some(0),
            ctl: Ctl {
                state: Persisted {
                    last_primary: Some((0, 1, 0)),
                    recorded_sync: sync,
                    switchover: None,
                    former: 0,
                    applied_sync,
                    last_holder: Some(0),
                    sync_record_lost: false,
                },
                seen: Some((Some(0), true, 0)),
                pending: Vec::new(),
                ran: false,
            },
            cut: 0,
            faults_left: self.config.faults,
            last_change: 0,
            writes: 0,
            acked: 0,
            next_tl: 2,
            switchovers_left: self.config.switchovers,
        }
    }

    /// Time may advance: every due obligation of a live process was met in this tick.
    fn may_tick(&self, s: &State) -> bool {
        if s.now >= self.config.horizon {
            return false;
        }
        let t = self.config.timing;
        for i in &s.inst {
            // The watchdog kills postgres within the shutdown budget after its deadline.
            if let Some(d) = i.watchdog
                && i.pg != Pg::Down
                && s.now >= d.saturating_add(t.shutdown_budget)
            {
                return false;
            }
            if i.agent == Proc::Up && agent::has_due_work(self, s, i) {
                return false;
            }
        }
        !controller::has_due_work(s)
    }

    fn tick(&self, s: &mut State) {
        s.now += 1;
        s.ctl.ran = false;
        for i in &mut s.inst {
            i.renewed = false;
        }
    }
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        let mut s = self.initial();
        self.settle(&mut s);
        vec![s]
    }

    fn actions(&self, s: &State, out: &mut Vec<Step>) {
        if self.may_tick(s) {
            out.push(Step::Tick);
        }
        agent::actions(self, s, out);
        controller::actions(self, s, out);
        adversary::actions(self, s, out);
    }

    fn next_state(&self, last: &State, step: Step) -> Option<State> {
        let mut s = last.clone();
        let changed = match step {
            Step::Tick => {
                self.tick(&mut s);
                true
            }
            Step::Round | Step::Act | Step::Abandon | Step::RequestSwitchover(_) => {
                controller::apply(self, &mut s, step)
            }
            Step::Fault(fault) => adversary::apply(self, &mut s, fault),
            _ => agent::apply(self, &mut s, step),
        };
        if !changed {
            return None;
        }
        self.settle(&mut s);
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        invariants::properties()
    }
}

impl ProtocolModel {
    /// What happens without a step of its own: the agents' monitors (polling every 20 ms) and
    /// the acknowledgement of commits.
    fn settle(&self, s: &mut State) {
        for i in 0..N {
            if s.inst[i].agent == Proc::Up {
                agent::monitor(self, s, i);
            }
        }
        agent::acknowledge(s);
    }
}
