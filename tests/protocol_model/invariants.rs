//! The invariants: (a) never two writable primaries; (b) in sync mode every acknowledged commit
//! is on every writable primary; (c) after a quiet period with a healthy majority and a live
//! controller, a primary holds the lease and serves.

use stateright::Property;

use super::ProtocolModel;
use super::state::*;

pub const ONE_WRITER: &str = "(a) at most one instance accepts writes";
pub const COMMITS_SURVIVE: &str = "(b) acknowledged commits survive";
pub const PRIMARY_AGAIN: &str = "(c) a primary again after a quiet period";

pub fn properties() -> Vec<Property<ProtocolModel>> {
    vec![
        Property::always(ONE_WRITER, |_, s| one_writer(s)),
        Property::always(COMMITS_SURVIVE, commits_survive),
        Property::always(PRIMARY_AGAIN, primary_again),
    ]
}

/// Writable: postgres out of recovery and not yet down (fenced or stopping is not writable).
pub fn one_writer(s: &State) -> bool {
    s.writable().count() <= 1
}

pub fn commits_survive(m: &ProtocolModel, s: &State) -> bool {
    if !m.config.sync_mode {
        return true;
    }
    s.writable().all(|p| {
        (1..=s.writes).filter(|n| s.acked & (1 << n) != 0).all(|n| {
            s.inst[p]
                .wal
                .iter()
                .any(|r| *r < PROMOTED && write_no(*r) == n)
        })
    })
}

fn healthy(s: &State, i: usize) -> bool {
    let inst = &s.inst[i];
    inst.agent == Proc::Up && !inst.broken && s.up(link_ctl(i)) && s.up(link_store(i))
}

/// At the horizon, if nothing failed or healed for `liveness_after` ticks and a majority is
/// healthy (with replication between them), the lease holder serves as primary.
pub fn primary_again(m: &ProtocolModel, s: &State) -> bool {
    if s.now < m.config.horizon || s.now - s.last_change < m.config.liveness_after {
        return true;
    }
    let ok: Vec<usize> = (0..N).filter(|i| healthy(s, *i)).collect();
    let connected = ok
        .iter()
        .all(|i| ok.iter().all(|j| i == j || s.up(link_repl(*i, *j))));
    if ok.len() < 2 || !connected {
        return true;
    }
    s.holder.is_some_and(|h| {
        let p = &s.inst[h as usize];
        p.pg == Pg::Primary && p.intended == Intended::Primary
    })
}
