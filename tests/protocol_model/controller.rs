//! The controller: `control::ControlLoop` around the **real** `pgrs::engine::decide`.
//! A round observes (lease, then every reachable agent), builds the `EngineInput`, decides,
//! tracks former primaries and persists its state, then the actions run one step each, in
//! order, stopping at the first failure (`ControlLoop::act`).

use std::collections::BTreeSet;
use std::time::Duration;

use pgrs::engine::{
    self, Action, Decision, EngineInput, EngineSpec, InstanceObservation, LeaseView, Lsn, Memory,
    MonoTime, ObservedRole, PrimaryRecord, ReplicationMode, SwitchoverPlan, SyncSet,
};

use super::state::*;
use super::{ProtocolModel, Step, agent};

/// The controller must finish its round and its actions before time advances.
pub fn has_due_work(s: &State) -> bool {
    !s.ctl.ran || !s.ctl.pending.is_empty()
}

pub fn actions(m: &ProtocolModel, s: &State, out: &mut Vec<Step>) {
    if !s.ctl.ran && s.ctl.pending.is_empty() {
        out.push(Step::Round);
    }
    match s.ctl.pending.first() {
        Some(Pending::AwaitStop(i)) if !stop_answered(s, *i as usize) => out.push(Step::Abandon),
        Some(_) => out.push(Step::Act),
        None => {}
    }
    if s.switchovers_left > 0 && s.ctl.state.switchover.is_none() {
        for to in 0..N {
            if m.config.switchovers > 0 {
                out.push(Step::RequestSwitchover(to as u8));
            }
        }
    }
}

fn stop_answered(s: &State, i: usize) -> bool {
    s.inst[i].pg != Pg::Stopping && s.reachable(i)
}

pub fn apply(m: &ProtocolModel, s: &mut State, step: Step) -> bool {
    match step {
        Step::Round => round(m, s),
        Step::Act => act(m, s),
        Step::Abandon => {
            // `tokio::time::timeout(bound, ...)` in `actuate::execute`: the demotion failed.
            s.ctl.pending.clear();
            true
        }
        Step::RequestSwitchover(to) => {
            // The switchover API: `engine::plan_switchover` on the current observation.
            let input = observe(m, s);
            match engine::plan_switchover(&input, Some(NAMES[to as usize])) {
                Ok(plan) => {
                    s.ctl.state.switchover =
                        Some((index(&plan.from), index(&plan.to), secs(plan.requested_at)));
                    s.switchovers_left -= 1;
                    true
                }
                Err(_) => false,
            }
        }
        _ => false,
    }
}

fn index(name: &str) -> u8 {
    NAMES.iter().position(|n| *n == name).unwrap_or(0) as u8
}

fn secs(t: MonoTime) -> u8 {
    t.0.as_secs() as u8
}

fn at(tick: u8) -> MonoTime {
    MonoTime(Duration::from_secs(u64::from(tick)))
}

fn sync_set(s: Sync) -> SyncSet {
    SyncSet {
        k: u32::from(s.k),
        members: (0..N)
            .filter(|i| s.members & mask(*i) != 0)
            .map(|i| NAMES[i].to_string())
            .collect(),
    }
    .normalized()
}

fn from_sync_set(s: &SyncSet) -> Sync {
    Sync {
        k: s.k as u8,
        members: s.members.iter().fold(0, |m, n| m | mask(index(n) as usize)),
    }
}

pub fn spec(m: &ProtocolModel) -> EngineSpec {
    EngineSpec {
        mode: if m.config.sync_mode {
            ReplicationMode::Sync
        } else {
            ReplicationMode::Async
        },
        lease_duration: Duration::from_secs(u64::from(m.config.timing.lease)),
        // Reports are taken at the round (see `observe`): always fresh.
        report_stale_after: Duration::from_secs(u64::from(m.config.timing.lease)),
        ..EngineSpec::default()
    }
}

/// `agent::http::build_status` as read by `control::observe::engine_input`.
fn observation(s: &State, i: usize) -> InstanceObservation {
    let inst = &s.inst[i];
    let reachable = s.reachable(i);
    let running = reachable && inst.phase == Phase::Running;
    let postgres_up = running && matches!(inst.pg, Pg::Primary | Pg::Replica);
    let role = if !reachable {
        ObservedRole::Unknown
    } else {
        match inst.phase {
            Phase::Fenced => ObservedRole::Fenced,
            Phase::Stopped => ObservedRole::Stopped,
            Phase::Starting => ObservedRole::Starting,
            Phase::Running => match inst.pg {
                Pg::Primary => ObservedRole::Primary,
                Pg::Replica => ObservedRole::Replica,
                _ => ObservedRole::Starting,
            },
        }
    };
    let position = Some(Lsn(inst.wal.len() as u64));
    InstanceObservation {
        name: NAMES[i].to_string(),
        reachable,
        postgres_up,
        role,
        timeline: postgres_up.then(|| u32::from(s.timeline(i))),
        received_lsn: (role == ObservedRole::Replica)
            .then_some(position)
            .flatten(),
        replayed_lsn: (role == ObservedRole::Replica)
            .then_some(position)
            .flatten(),
        flush_lsn: (role == ObservedRole::Primary)
            .then_some(position)
            .flatten(),
        sync_state: None,
        upstream: if postgres_up {
            s.streaming(i).map(|p| NAMES[p].to_string())
        } else {
            None
        },
        applied_sync: if role == ObservedRole::Primary {
            s.ctl.state.applied_sync[i].map(sync_set)
        } else {
            None
        },
        last_report_at: reachable.then(|| at(s.now)),
        former_primary: s.ctl.state.former & mask(i) != 0,
        last_seen_serving_at: None,
    }
}

fn memory(p: &Persisted) -> Memory {
    Memory {
        last_primary: p.last_primary.map(|(i, tl, lsn)| PrimaryRecord {
            name: NAMES[i as usize].to_string(),
            timeline: Some(u32::from(tl)),
            flush_lsn: Lsn(u64::from(lsn)),
        }),
        recorded_sync: sync_set(p.recorded_sync),
        switchover: p.switchover.map(|(from, to, at_tick)| SwitchoverPlan {
            from: NAMES[from as usize].to_string(),
            to: NAMES[to as usize].to_string(),
            requested_at: at(at_tick),
        }),
        sync_record_lost: p.sync_record_lost,
    }
}

fn store_memory(p: &mut Persisted, mem: &Memory) {
    p.last_primary = mem.last_primary.as_ref().map(|r| {
        (
            index(&r.name),
            r.timeline.unwrap_or(1) as u8,
            r.flush_lsn.0 as u8,
        )
    });
    p.recorded_sync = from_sync_set(&mem.recorded_sync);
    p.switchover = mem
        .switchover
        .as_ref()
        .map(|plan| (index(&plan.from), index(&plan.to), secs(plan.requested_at)));
    p.sync_record_lost = mem.sync_record_lost;
}

/// `ControlLoop::observe` + `observe::engine_input`: the lease as timed by this observer (a
/// view first seen now unless holder and version are unchanged), and every agent's report.
/// Updates `lease_seen`.
fn observe_and_time(m: &ProtocolModel, s: &mut State) -> EngineInput {
    let since = match s.ctl.seen {
        Some((holder, true, since)) if holder == s.holder => since,
        _ => s.now,
    };
    s.ctl.seen = Some((s.holder, true, since));
    observe(m, s)
}

/// The engine's input from the current state and `lease_seen`.
pub fn observe(m: &ProtocolModel, s: &State) -> EngineInput {
    let since = match s.ctl.seen {
        Some((holder, true, since)) if holder == s.holder => since,
        _ => s.now,
    };
    EngineInput {
        now: at(s.now),
        instances: (0..N).map(|i| observation(s, i)).collect(),
        lease: LeaseView {
            holder: s.holder.map(|h| NAMES[h as usize].to_string()),
            version: "observed".to_string(),
            unchanged_since: at(since),
            duration: Duration::from_secs(u64::from(m.config.timing.lease)),
        },
        spec: spec(m),
        memory: memory(&s.ctl.state),
    }
}

/// Hole 3 as it was: before issue 12, `engine::decide`'s free-lease switchover handed the lease
/// to the target once it had received the last *observed* primary position, without the quorum
/// rule (`lease_free` in `src/engine/decide.rs` at `00ec8e7`). The engine carries the fix now;
/// the "before" rules replay the old rule by deciding that round with the quorum blinded.
fn old_switchover_takeover(input: &EngineInput, decision: Decision) -> Decision {
    let Some(plan) = input.memory.switchover.as_ref() else {
        return decision;
    };
    if input.lease.holder.is_some() {
        return decision;
    }
    let mut blind = input.clone();
    blind.memory.recorded_sync = engine::SyncSet::asynchronous();
    let mut old = engine::decide(&blind);
    let takes_over = old
        .actions
        .iter()
        .any(|a| matches!(a, Action::AcquireLease { holder, .. } if *holder == plan.to));
    if !takes_over {
        return decision;
    }
    old.memory.recorded_sync = input.memory.recorded_sync.clone();
    old
}

/// `ControlLoop::round` up to the actions: observe, decide (the real engine), track former
/// primaries, persist, queue the actions.
fn round(m: &ProtocolModel, s: &mut State) -> bool {
    let input = observe_and_time(m, s);
    let mut decision = engine::decide(&input);
    if !m
        .config
        .rules
        .switchover_quorum_and_release_after_clean_stop
    {
        decision = old_switchover_takeover(&input, decision);
    }
    let mut former: BTreeSet<String> = (0..N)
        .filter(|i| s.ctl.state.former & mask(*i) != 0)
        .map(|i| NAMES[i].to_string())
        .collect();
    let mut last_holder = s
        .ctl
        .state
        .last_holder
        .map(|h| NAMES[h as usize].to_string());
    engine::track_former_primaries(&mut former, &mut last_holder, &input);
    s.ctl.state.former = former
        .iter()
        .fold(0, |acc, n| acc | mask(index(n) as usize));
    s.ctl.state.last_holder = last_holder.as_deref().map(index);
    store_memory(&mut s.ctl.state, &decision.memory);
    s.ctl.pending = decision
        .actions
        .iter()
        .map(|a| match a {
            Action::AcquireLease { holder, .. } => Pending::Acquire {
                holder: index(holder),
                current: true,
            },
            Action::Promote { instance } => Pending::Promote(index(instance)),
            Action::Demote { instance } => Pending::Demote(index(instance)),
            Action::Fence { instance, .. } => Pending::Fence(index(instance)),
            Action::Follow { instance, primary } => {
                Pending::Follow(index(instance), index(primary))
            }
            Action::Rejoin { instance, primary } => {
                Pending::Rejoin(index(instance), index(primary))
            }
            Action::SetSynchronousStandbys { primary, sync } => {
                Pending::SetSync(index(primary), from_sync_set(sync))
            }
        })
        .collect();
    s.ctl.ran = true;
    true
}

/// `actuate::execute` for the first pending action; a failure drops the rest.
fn act(m: &ProtocolModel, s: &mut State) -> bool {
    if s.ctl.pending.is_empty() {
        return false;
    }
    let action = s.ctl.pending.remove(0);
    let ok = match action {
        Pending::Acquire { holder, current } => {
            // `LeaseStore::acquire` with the observed version as precondition.
            if current {
                s.holder = Some(holder);
                s.lease_written();
            }
            current
        }
        Pending::Fence(i) => {
            // `POST /v1/fence` → `SupervisorHandle::fence`.
            let ok = s.reachable(i as usize);
            if ok {
                agent::fence(s, i as usize);
            }
            ok
        }
        Pending::SetSync(i, sync) => {
            // `POST /v1/synchronous-standby-names` on its agent, then `applied_sync` recorded.
            let n = i as usize;
            let ok = s.reachable(n) && matches!(s.inst[n].pg, Pg::Primary | Pg::Replica);
            if ok {
                s.inst[n].sync = sync;
                s.ctl.state.applied_sync[n] = Some(sync);
            }
            ok
        }
        Pending::Promote(i) => background(s, i, Msg::Promote),
        Pending::Follow(i, p) => background(s, i, Msg::Follow(p)),
        Pending::Rejoin(i, p) => background(s, i, Msg::Rejoin(p)),
        Pending::Demote(i) => {
            // `actuate::demote`: `POST /v1/stop` (fast) → `Supervisor::action_stop`.
            let n = i as usize;
            let ok = s.reachable(n);
            if ok {
                let inst = &mut s.inst[n];
                if inst.phase != Phase::Fenced {
                    inst.phase = Phase::Stopped;
                }
                inst.starting_since = None;
                inst.stop_clean = None;
                inst.pg = match inst.pg {
                    Pg::Primary | Pg::Replica | Pg::Stopping => Pg::Stopping,
                    Pg::Down => Pg::Down,
                };
                if inst.pg == Pg::Down {
                    inst.stop_clean = Some(true);
                }
                s.ctl.pending.insert(0, Pending::AwaitStop(i));
            }
            ok
        }
        Pending::AwaitStop(i) => {
            // The stop answered: `actuate::demote` releases the lease (a `NotHolder` is fine).
            let n = i as usize;
            let release = !m
                .config
                .rules
                .switchover_quorum_and_release_after_clean_stop
                || s.inst[n].stop_clean == Some(true);
            if release && s.holder == Some(i) {
                s.holder = None;
                s.lease_written();
            }
            true
        }
    };
    if !ok {
        s.ctl.pending.clear();
    }
    true
}

/// `actuate::background`: one background action per instance at a time (`Shared::claim`).
fn background(s: &mut State, i: u8, msg: Msg) -> bool {
    let inst = &mut s.inst[i as usize];
    // A promotion's request returns only once `action_promote` is done.
    if inst.inbox.is_none() && inst.promo == Promo::Idle {
        inst.inbox = Some(msg);
    }
    true
}
