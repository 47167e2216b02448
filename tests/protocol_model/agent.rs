//! Agent-side rules: the lease keeper and its monitor, the watchdog, the supervisor's actions
//! and crash restarts, and postgres itself (writes, streaming, acknowledgements). Each rule
//! names the function it mirrors.

use super::state::*;
use super::{ProtocolModel, Step};

/// Work a live agent must do before time advances (fairness: the loops run every tick).
pub fn has_due_work(m: &ProtocolModel, s: &State, i: &Inst) -> bool {
    let _ = m;
    let _ = s;
    (i.keeper == Keeper::Active && !i.renewed)
        || i.inbox.is_some()
        || i.promo != Promo::Idle
        || i.pg == Pg::Stopping
        || restart_due(i)
}

fn restart_due(i: &Inst) -> bool {
    i.phase == Phase::Starting && i.pg == Pg::Down && !i.broken
}

pub fn actions(m: &ProtocolModel, s: &State, out: &mut Vec<Step>) {
    for (n, i) in s.inst.iter().enumerate() {
        let x = n as u8;
        if let Some(d) = i.watchdog
            && s.now >= d
            && i.pg != Pg::Down
        {
            out.push(Step::WatchdogFire(x));
        }
        if i.pg == Pg::Stopping {
            out.push(Step::StopEnd(x));
        }
        if s.streaming(n)
            .is_some_and(|p| s.inst[p].wal.len() > i.wal.len())
        {
            out.push(Step::Stream(x));
        }
        if i.pg == Pg::Primary && s.writes < m.config.max_writes {
            out.push(Step::Write(x));
        }
        if i.agent != Proc::Up {
            continue;
        }
        if i.keeper == Keeper::Active && !i.renewed {
            out.push(Step::KeeperRun(x));
        }
        if i.inbox.is_some() {
            out.push(Step::Deliver(x));
        }
        match i.promo {
            Promo::Queued { .. } => out.push(Step::PromoteSignal(x)),
            Promo::Finishing => out.push(Step::PromoteFinish(x)),
            Promo::Idle => {}
        }
        if restart_due(i) {
            out.push(Step::CrashRestart(x));
        }
    }
}

pub fn apply(m: &ProtocolModel, s: &mut State, step: Step) -> bool {
    match step {
        Step::KeeperRun(i) => return keeper_run(m, s, i as usize),
        Step::Deliver(i) => return deliver(m, s, i as usize),
        Step::PromoteSignal(i) => return promote_signal(m, s, i as usize),
        Step::PromoteFinish(i) => {
            // `Supervisor::action_promote`, after CHECKPOINT, config rewrite, reload and role.
            let inst = &mut s.inst[i as usize];
            inst.promo = Promo::Idle;
            inst.intended = Intended::Primary;
            inst.upstream = None;
        }
        Step::CrashRestart(i) => {
            // `Supervisor::run`, `Event::RestartDue` → `start_postgres` in the intended role.
            let t = m.config.timing;
            let inst = &s.inst[i as usize];
            if m.config.rules.restart_only_with_proof
                && inst.intended == Intended::Primary
                && s.now >= inst.proven_at + t.renew_deadline
            {
                // Fix of the sixth hole: no writable restart without a current lease proof.
                s.inst[i as usize].keeper = Keeper::Fenced;
                fence(s, i as usize);
                return true;
            }
            let inst = &mut s.inst[i as usize];
            inst.pg = match inst.intended {
                Intended::Primary => Pg::Primary,
                Intended::Replica => Pg::Replica,
            };
            inst.phase = Phase::Running;
            inst.starting_since = None;
        }
        Step::StopEnd(i) => {
            // `Supervisor::stop_postgres`: the fast stop ends; it was clean when every
            // connected standby had received all WAL (walsenders wait for that), otherwise
            // it escalated to an immediate stop.
            let n = i as usize;
            let clean = (0..N)
                .all(|j| s.streaming(j) != Some(n) || s.inst[j].wal.len() == s.inst[n].wal.len());
            let inst = &mut s.inst[n];
            inst.pg = Pg::Down;
            inst.stop_clean = Some(clean);
        }
        Step::Stream(j) => {
            // The WAL receiver (postgres): catch up with the upstream.
            let j = j as usize;
            if let Some(p) = s.streaming(j) {
                s.inst[j].wal = s.inst[p].wal.clone();
            }
        }
        Step::Write(p) => {
            // A client commit on a writable primary.
            s.writes += 1;
            let id = record(s.writes, p);
            s.inst[p as usize].wal.push(id);
        }
        Step::WatchdogFire(i) => {
            // `watchdog::run_watchdog`: deadline passed without a new `arm` → SIGQUIT.
            let inst = &mut s.inst[i as usize];
            inst.watchdog = None;
            inst.pg = Pg::Down;
            if inst.phase == Phase::Running {
                // `Supervisor::on_unexpected_exit`: seen as a crash, restarted after backoff.
                inst.phase = Phase::Starting;
                inst.starting_since = Some(s.now);
            }
        }
        _ => return false,
    }
    true
}

/// `SupervisorHandle::fence` + `Supervisor::action_fence`: phase `Fenced`, SIGQUIT at once.
pub fn fence(s: &mut State, i: usize) {
    let inst = &mut s.inst[i];
    inst.phase = Phase::Fenced;
    inst.pg = Pg::Down;
    inst.promo = Promo::Idle;
    inst.starting_since = None;
}

/// `LeaseKeeper::fence`: mode `Fenced`, then the fence callback.
fn keeper_fence(s: &mut State, i: usize) {
    s.inst[i].keeper = Keeper::Fenced;
    fence(s, i);
}

/// `LeaseKeeper::run`, one iteration while `Active`.
fn keeper_run(m: &ProtocolModel, s: &mut State, i: usize) -> bool {
    let t = m.config.timing;
    s.inst[i].renewed = true;
    if s.now >= s.inst[i].proven_at + t.renew_deadline {
        keeper_fence(s, i);
        return true;
    }
    if !s.up(link_store(i)) {
        // `Err(_)`: renewal failed or timed out; the deadline still runs.
        if m.config.rules.failsafe {
            failsafe_round(m, s, i);
        }
        return true;
    }
    match s.holder {
        Some(h) if h as usize == i => {
            // `store.renew` succeeded: a write (new version); proven from the request start.
            s.lease_written();
            s.inst[i].proven_at = s.now;
            s.inst[i].watchdog = Some(s.now + t.renew_deadline);
        }
        Some(_) => keeper_fence(s, i),
        None => {
            // `NotHolder` with no holder: today treated as transient (`Ok(Err(error))`).
            if m.config.rules.deadline_from_confirmation {
                keeper_fence(s, i);
            }
        }
    }
    true
}

/// `LeaseKeeper::failsafe_round` → `Failsafe::ask_members`: every other member must answer
/// (agent up, link up) that it follows `i` (`agent::http::follows`: a replica of `i`, no
/// promotion passed the gate); then the round's start proves the lease like a renewal, and
/// each member refuses promotion for a lease duration (`Failsafe::confirm`).
fn failsafe_round(m: &ProtocolModel, s: &mut State, i: usize) {
    let t = m.config.timing;
    let confirms = |j: usize| {
        let r = &s.inst[j];
        r.agent == Proc::Up
            && s.up(link_repl(i, j))
            && r.intended == Intended::Replica
            && r.upstream == Some(i as u8)
            && r.promo == Promo::Idle
    };
    if !(0..N).filter(|j| *j != i).all(confirms) {
        return;
    }
    for j in (0..N).filter(|j| *j != i) {
        s.inst[j].confirmed = Some((i as u8, s.now + t.lease));
    }
    s.inst[i].proven_at = s.now;
    s.inst[i].watchdog = Some(s.now + t.renew_deadline);
}

/// `LeaseKeeper::activate` (the monitor's `Serving` + `Idle`): renew from now on, arm the
/// watchdog. Today the deadline counts from activation; with the hole-4 fix from the last
/// confirmation of the lease (`proven_at` as left by the last renewal or the promote gate).
fn activate(m: &ProtocolModel, s: &mut State, i: usize) {
    let t = m.config.timing;
    let inst = &mut s.inst[i];
    if inst.keeper == Keeper::Active {
        return;
    }
    inst.keeper = Keeper::Active;
    if !m.config.rules.deadline_from_confirmation {
        inst.proven_at = s.now;
    }
    inst.watchdog = Some(inst.proven_at + t.renew_deadline);
}

/// `LeaseKeeper::deactivate`: stop renewing, disarm the watchdog.
fn deactivate(s: &mut State, i: usize) {
    s.inst[i].keeper = Keeper::Idle;
    s.inst[i].watchdog = None;
}

/// `LeaseKeeper::release` (+ `store.release`): deactivate, give the lease up if still held.
fn release(s: &mut State, i: usize) {
    deactivate(s, i);
    if s.up(link_store(i)) && s.holder == Some(i as u8) {
        s.holder = None;
        s.lease_written();
    }
}

/// The monitor task of `AgentFencing::start_with_store`, on the state of `agent::cli`'s
/// `start_fencing` closure ((phase, intended role) → `LocalPrimaryState`). It polls every
/// 20 ms, so the model applies it after every step.
pub fn monitor(m: &ProtocolModel, s: &mut State, i: usize) {
    let rules = m.config.rules;
    let t = m.config.timing;
    let inst = s.inst[i].clone();
    // Hole-1 fix: a signalled promotion counts as serving.
    let serving = (inst.phase == Phase::Running && inst.intended == Intended::Primary)
        || (rules.fence_from_promote_signal && inst.promo == Promo::Finishing);
    let restarting = inst.phase == Phase::Starting && inst.intended == Intended::Primary;
    let stopped = inst.phase == Phase::Stopped;
    match inst.keeper {
        Keeper::Idle | Keeper::Fenced if serving => activate(m, s, i),
        Keeper::Active if restarting => {
            // Hole-5 fix: a primary that did not come up within the start budget stops
            // renewing and stays down (fenced) until the controller rejoins it.
            if rules.start_budget
                && s.inst[i]
                    .starting_since
                    .is_some_and(|since| s.now >= since + t.start_budget)
            {
                keeper_fence(s, i);
            }
        }
        Keeper::Active if stopped => {
            if !rules.switchover_quorum_and_release_after_clean_stop {
                // Today: released as soon as the stop *begins*.
                release(s, i);
            } else if inst.pg == Pg::Down {
                if inst.stop_clean == Some(true) {
                    release(s, i);
                } else {
                    deactivate(s, i);
                }
            }
        }
        Keeper::Active if !serving && !restarting => deactivate(s, i),
        _ => {}
    }
}

/// An HTTP request from the controller reaches the agent.
fn deliver(m: &ProtocolModel, s: &mut State, i: usize) -> bool {
    let Some(msg) = s.inst[i].inbox.take() else {
        return false;
    };
    match msg {
        Msg::Promote => {
            // `agent_side::promote_gate`: only the lease holder may promote.
            if !s.up(link_store(i)) || s.holder != Some(i as u8) {
                return true;
            }
            let confirmed_at = s.now;
            if m.config.rules.deadline_from_confirmation {
                // Hole-4 fix: the gate confirms with a renewal (a write), so the deadline can
                // count from it.
                s.lease_written();
            }
            // `Failsafe::admit_promotion` (after the gate's renewal): not while a confirmation
            // is unexpired.
            if m.config.rules.failsafe_gate
                && s.inst[i].confirmed.is_some_and(|(_, until)| s.now < until)
            {
                return true;
            }
            if m.config.rules.deadline_from_confirmation {
                s.inst[i].proven_at = s.now;
            }
            s.inst[i].promo = Promo::Queued { confirmed_at };
        }
        Msg::Follow(p) => follow(s, i, p),
        Msg::Rejoin(p) => rejoin(s, i, p),
    }
    true
}

/// `Supervisor::action_promote` up to "promoted: out of recovery".
fn promote_signal(m: &ProtocolModel, s: &mut State, i: usize) -> bool {
    let Promo::Queued { confirmed_at } = s.inst[i].promo else {
        return false;
    };
    let rules = m.config.rules;
    let inst = &mut s.inst[i];
    if inst.phase != Phase::Running || inst.pg != Pg::Replica {
        inst.promo = Promo::Idle;
        return true;
    }
    if rules.deadline_from_confirmation && s.now >= confirmed_at + m.config.timing.renew_deadline {
        // Hole-4 fix: the confirmation is too old to promote on.
        s.inst[i].promo = Promo::Idle;
        return true;
    }
    let tl = s.next_tl;
    s.next_tl += 1;
    let inst = &mut s.inst[i];
    inst.wal.push(PROMOTED + tl);
    inst.pg = Pg::Primary;
    inst.promo = Promo::Finishing;
    true
}

/// `Supervisor::action_follow`.
fn follow(s: &mut State, i: usize, p: u8) {
    let inst = &mut s.inst[i];
    if inst.pg == Pg::Primary {
        return; // "cannot follow: this instance is a running primary; use rejoin"
    }
    inst.intended = Intended::Replica;
    inst.upstream = Some(p);
    if inst.pg == Pg::Replica {
        return; // reload
    }
    start_replica(s, i);
}

/// `Supervisor::action_rejoin`: stop, pg_rewind (or re-clone) from `p`, start as its standby.
fn rejoin(s: &mut State, i: usize, p: u8) {
    let pu = p as usize;
    if !s.up(link_repl(i, pu)) || !matches!(s.inst[pu].pg, Pg::Primary | Pg::Replica) {
        return; // rewind and re-clone both need the primary
    }
    let source = s.inst[pu].wal.clone();
    let inst = &mut s.inst[i];
    let common = inst
        .wal
        .iter()
        .zip(&source)
        .take_while(|(a, b)| a == b)
        .count();
    inst.wal.truncate(common);
    inst.pg = Pg::Down;
    inst.intended = Intended::Replica;
    inst.upstream = Some(p);
    start_replica(s, i);
    // The controller's background task reports success: `ControlLoop::observe` forgets the
    // former primary.
    if s.inst[i].pg == Pg::Replica {
        s.ctl.state.former &= !mask(i);
    }
}

fn start_replica(s: &mut State, i: usize) {
    let inst = &mut s.inst[i];
    inst.phase = Phase::Starting;
    inst.starting_since = None;
    if !inst.broken {
        inst.pg = Pg::Replica;
        inst.phase = Phase::Running;
    }
}

/// A commit waits for `k` members of the applied `synchronous_standby_names` to flush it
/// (asynchronous: acknowledged at local flush). Acknowledged as early as possible.
pub fn acknowledge(s: &mut State) {
    for p in 0..N {
        if s.inst[p].pg != Pg::Primary {
            continue;
        }
        let sync = s.inst[p].sync;
        for &r in &s.inst[p].wal {
            // Only the primary that wrote a commit acknowledges it.
            if r >= PROMOTED || writer(r) != p || s.acked & (1 << write_no(r)) != 0 {
                continue;
            }
            let have = (0..N)
                .filter(|j| sync.members & mask(*j) != 0 && s.inst[*j].wal.contains(&r))
                .count();
            if have >= sync.k as usize {
                s.acked |= 1 << write_no(r);
            }
        }
    }
}
