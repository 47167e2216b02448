//! The adversary: crash, freeze and resume processes, break postgres, cut and heal links,
//! drop messages, fail a post-promotion step, restart the controller. Each fault costs one of
//! `Config::faults`; resuming and healing are free. Both set `last_change` (liveness counts
//! quiet time from there).

use super::state::*;
use super::{ProtocolModel, Step};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// SIGSTOP of the agent (keeper, supervisor, HTTP); postgres and the watchdog keep running.
    Freeze(u8),
    Resume(u8),
    /// The agent dies; postgres dies with it (`PR_SET_PDEATHSIG`).
    CrashNode(u8),
    /// The platform restarts the agent: it starts postgres as a replica of nobody.
    RestartNode(u8),
    /// Postgres exits unexpectedly.
    CrashPg(u8),
    /// Postgres exits and can no longer start (crash loop).
    BreakPg(u8),
    Cut(u16),
    Heal(u16),
    /// A request in flight to an agent is lost.
    Drop(u8),
    /// A post-promotion step (checkpoint, config, reload, role) fails.
    PromoteFail(u8),
    /// The controller process restarts.
    RestartCtl,
}

fn links(m: &ProtocolModel) -> Vec<u16> {
    let mv = m.config.moves;
    let mut out = Vec::new();
    for i in 0..N {
        if mv.cut_ctl {
            out.push(link_ctl(i));
        }
        if mv.cut_store {
            out.push(link_store(i));
        }
    }
    if mv.cut_repl {
        out.extend([link_repl(0, 1), link_repl(0, 2), link_repl(1, 2)]);
    }
    out
}

pub fn actions(m: &ProtocolModel, s: &State, out: &mut Vec<Step>) {
    let mv = m.config.moves;
    let fault = s.faults_left > 0;
    for (n, i) in s.inst.iter().enumerate() {
        let x = n as u8;
        let mut push = |f: Fault| out.push(Step::Fault(f));
        match i.agent {
            Proc::Up if fault && mv.freeze => push(Fault::Freeze(x)),
            Proc::Frozen => push(Fault::Resume(x)),
            Proc::Crashed => push(Fault::RestartNode(x)),
            _ => {}
        }
        if fault && mv.crash_node && i.agent != Proc::Crashed {
            push(Fault::CrashNode(x));
        }
        if fault && mv.crash_pg && matches!(i.pg, Pg::Primary | Pg::Replica) {
            push(Fault::CrashPg(x));
        }
        if fault && mv.break_pg && !i.broken && matches!(i.pg, Pg::Primary | Pg::Replica) {
            push(Fault::BreakPg(x));
        }
        if fault && mv.drop && i.inbox.is_some() {
            push(Fault::Drop(x));
        }
        if fault && mv.promote_fail && i.promo == Promo::Finishing {
            push(Fault::PromoteFail(x));
        }
    }
    for link in links(m) {
        if s.cut & link != 0 {
            out.push(Step::Fault(Fault::Heal(link)));
        } else if fault {
            out.push(Step::Fault(Fault::Cut(link)));
        }
    }
    if fault && mv.restart_ctl {
        out.push(Step::Fault(Fault::RestartCtl));
    }
}

/// `Supervisor::on_unexpected_exit`.
fn pg_exit(s: &mut State, i: usize) {
    let now = s.now;
    let inst = &mut s.inst[i];
    inst.pg = Pg::Down;
    if inst.phase == Phase::Running {
        inst.phase = Phase::Starting;
        inst.starting_since = Some(now);
    }
}

pub fn apply(m: &ProtocolModel, s: &mut State, fault: Fault) -> bool {
    let costs = !matches!(
        fault,
        Fault::Resume(_) | Fault::Heal(_) | Fault::RestartNode(_)
    );
    if costs {
        s.faults_left -= 1;
    }
    s.last_change = s.now;
    match fault {
        Fault::Freeze(i) => s.inst[i as usize].agent = Proc::Frozen,
        Fault::Resume(i) => s.inst[i as usize].agent = Proc::Up,
        Fault::CrashNode(i) => {
            let inst = &mut s.inst[i as usize];
            inst.agent = Proc::Crashed;
            inst.pg = Pg::Down;
            inst.phase = Phase::Stopped;
            inst.keeper = Keeper::Idle;
            inst.inbox = None;
            inst.promo = Promo::Idle;
            inst.starting_since = None;
        }
        Fault::RestartNode(i) => {
            let now = s.now;
            let inst = &mut s.inst[i as usize];
            inst.agent = Proc::Up;
            inst.intended = Intended::Replica;
            inst.upstream = None;
            inst.keeper = Keeper::Idle;
            inst.proven_at = now;
            inst.watchdog = None;
            inst.renewed = false;
            inst.phase = Phase::Starting;
            if !inst.broken {
                inst.pg = Pg::Replica;
                inst.phase = Phase::Running;
            }
        }
        Fault::CrashPg(i) => pg_exit(s, i as usize),
        Fault::BreakPg(i) => {
            s.inst[i as usize].broken = true;
            pg_exit(s, i as usize);
        }
        Fault::Cut(link) => s.cut |= link,
        Fault::Heal(link) => s.cut &= !link,
        Fault::Drop(i) => s.inst[i as usize].inbox = None,
        Fault::PromoteFail(i) => s.inst[i as usize].promo = Promo::Idle,
        Fault::RestartCtl => {
            let ctl = &mut s.ctl;
            ctl.pending.clear();
            ctl.seen = None;
            ctl.ran = false;
            if !m.config.rules.persisted_memory {
                ctl.state = Persisted::default();
            }
        }
    }
    true
}
