//! The model's state: three instances (agent, keeper, watchdog, supervisor, postgres), the lease
//! store, the controller with its persisted memory, messages in flight, links and time.
//!
//! Everything is small and `Hash`: instances are indices 0..3 (`a`, `b`, `c`), WAL is a short
//! list of record ids, time is a tick count. The lease version is not a number: what the protocol
//! compares is "unchanged since I saw it", so each observer keeps whether its view is still the
//! current one and every write to the store clears that (see `State::lease_written`).

pub const N: usize = 3;
pub const NAMES: [&str; N] = ["a", "b", "c"];

/// A WAL record: a write is `record(n, writer)`; a promotion appends `PROMOTED + timeline`.
pub const PROMOTED: u8 = 100;

/// Postgres itself (the postmaster), as opposed to what the agent believes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pg {
    Down,
    /// Running in recovery.
    Replica,
    /// Running out of recovery: accepts writes.
    Primary,
    /// A fast shutdown in progress: no new writes, walsenders still send.
    Stopping,
}

/// `agent::supervisor::Phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Starting,
    Running,
    Stopped,
    Fenced,
}

/// `SupervisorState::intended_role`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Intended {
    Primary,
    Replica,
}

/// An agent process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proc {
    Up,
    Frozen,
    Crashed,
}

/// `coordination::keeper::KeeperMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Keeper {
    Idle,
    Active,
    Fenced,
}

/// Where a promotion stands on the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Promo {
    Idle,
    /// Passed the promote gate (which confirmed the lease at `confirmed_at`), queued for the
    /// supervisor.
    Queued {
        confirmed_at: u8,
    },
    /// `pg_promote` signalled and out of recovery; the post-promotion work (checkpoint, config,
    /// reload, role) has not finished, so `intended_role` is still `Replica`.
    Finishing,
}

/// A background request from the controller to an agent, in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Msg {
    Promote,
    Follow(u8),
    Rejoin(u8),
}

/// `synchronous_standby_names = ANY k (members)`; members as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Sync {
    pub k: u8,
    pub members: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Inst {
    pub agent: Proc,
    pub pg: Pg,
    pub phase: Phase,
    pub intended: Intended,
    pub upstream: Option<u8>,
    /// WAL on disk (received and flushed).
    pub wal: Vec<u8>,
    /// The `synchronous_standby_names` postgres applies.
    pub sync: Sync,
    pub keeper: Keeper,
    /// `keeper::Inner::proven_at`.
    pub proven_at: u8,
    /// The watchdog's deadline (`arm`), `None` when disarmed.
    pub watchdog: Option<u8>,
    /// Postgres cannot start (crash loop).
    pub broken: bool,
    /// Since when a meant-to-be primary is down and restarting (for the start budget).
    pub starting_since: Option<u8>,
    pub promo: Promo,
    pub inbox: Option<Msg>,
    /// How the last stop ended: `Some(true)` clean (every connected standby got all WAL).
    pub stop_clean: Option<bool>,
    /// The keeper renewed (or tried) in this tick.
    pub renewed: bool,
    /// The failsafe: (primary, tick until which this member refuses promotion).
    pub confirmed: Option<(u8, u8)>,
}

/// What the controller persists (`control::ControlState`), in model form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Persisted {
    /// `Memory::last_primary`: (instance, timeline, flush position).
    pub last_primary: Option<(u8, u8, u8)>,
    /// `Memory::recorded_sync`.
    pub recorded_sync: Sync,
    /// `Memory::switchover`: (from, to, requested_at).
    pub switchover: Option<(u8, u8, u8)>,
    /// `ControlState::former_primaries` (mask).
    pub former: u8,
    /// `ControlState::applied_sync`.
    pub applied_sync: [Option<Sync>; N],
    /// `ControlState::last_holder`.
    pub last_holder: Option<u8>,
    /// `Memory::sync_record_lost`: set by the platforms' loaders when the state is missing
    /// for a cluster that has run (`control` loaders in `local` and `operator`).
    pub sync_record_lost: bool,
}

/// A decided action waiting to be carried out (`control::actuate::execute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pending {
    /// `expected_version` still current.
    Acquire {
        holder: u8,
        current: bool,
    },
    Promote(u8),
    Demote(u8),
    /// The second half of `actuate::demote`: waiting for the agent's stop answer, then release.
    AwaitStop(u8),
    Fence(u8),
    Follow(u8, u8),
    Rejoin(u8, u8),
    SetSync(u8, Sync),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ctl {
    pub state: Persisted,
    /// `ControlLoop::lease_seen`: (holder, still the current version, first seen at).
    pub seen: Option<(Option<u8>, bool, u8)>,
    pub pending: Vec<Pending>,
    /// Ran its round in this tick.
    pub ran: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub now: u8,
    pub inst: [Inst; N],
    /// The lease store's holder.
    pub holder: Option<u8>,
    pub ctl: Ctl,
    /// Cut links, as bits: see `link_*`.
    pub cut: u16,
    pub faults_left: u8,
    /// Tick of the last fault or heal (for the liveness invariant).
    pub last_change: u8,
    pub writes: u8,
    /// Acknowledged commits (record ids as bits).
    pub acked: u8,
    pub next_tl: u8,
    pub switchovers_left: u8,
}

/// Controller ↔ agent `i` (status, actions, SQL).
pub fn link_ctl(i: usize) -> u16 {
    1 << i
}
/// Agent `i` ↔ lease store.
pub fn link_store(i: usize) -> u16 {
    1 << (3 + i)
}
/// Replication between `i` and `j`.
pub fn link_repl(i: usize, j: usize) -> u16 {
    let (x, y) = if i < j { (i, j) } else { (j, i) };
    1 << (6 + x + y - 1)
}

impl State {
    pub fn up(&self, cut: u16) -> bool {
        self.cut & cut == 0
    }

    /// Every write to the lease store changes its version: no observer's view or pending
    /// expected version is current any more.
    pub fn lease_written(&mut self) {
        if let Some(seen) = &mut self.ctl.seen {
            seen.1 = false;
        }
        for p in &mut self.ctl.pending {
            if let Pending::Acquire { current, .. } = p {
                *current = false;
            }
        }
    }

    /// The controller can talk to agent `i` (the agent answers).
    pub fn reachable(&self, i: usize) -> bool {
        self.inst[i].agent == Proc::Up && self.up(link_ctl(i))
    }

    /// Replica `j` streams from its upstream: link up, upstream running as primary (or
    /// stopping, sending its last WAL), and `j`'s WAL a prefix of the upstream's.
    pub fn streaming(&self, j: usize) -> Option<usize> {
        let r = &self.inst[j];
        let p = r.upstream? as usize;
        let up = &self.inst[p];
        (r.pg == Pg::Replica
            && p != j
            && self.up(link_repl(j, p))
            && matches!(up.pg, Pg::Primary | Pg::Stopping)
            && up.wal.starts_with(&r.wal))
        .then_some(p)
    }

    /// The timeline: 1, or the newest promotion record in the WAL.
    pub fn timeline(&self, i: usize) -> u8 {
        self.inst[i]
            .wal
            .iter()
            .filter(|r| **r > PROMOTED)
            .map(|r| r - PROMOTED)
            .max()
            .unwrap_or(1)
    }

    pub fn writable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..N).filter(|i| self.inst[*i].pg == Pg::Primary)
    }
}

/// The WAL record of the `n`-th write, on primary `writer`.
pub fn record(n: u8, writer: u8) -> u8 {
    (n << 2) | writer
}
pub fn write_no(record: u8) -> u8 {
    record >> 2
}
pub fn writer(record: u8) -> usize {
    (record & 3) as usize
}

pub fn mask(i: usize) -> u8 {
    1 << i
}
