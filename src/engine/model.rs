//! The engine's inputs: what the observer saw, the lease as observed, the spec, and the small
//! memory the controller carries from one round to the next. All plain values: no IO, no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Lsn;
pub use crate::postgres::states::SyncState;

/// A point in time on the observer's own monotonic clock, as a value (time since the observer's
/// clock origin). Never compared with another process's clock.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct MonoTime(pub Duration);

impl MonoTime {
    pub fn from_millis(millis: u64) -> Self {
        MonoTime(Duration::from_millis(millis))
    }

    /// Time elapsed from `earlier` to `self`; zero when `earlier` is not before `self`.
    pub fn saturating_since(self, earlier: MonoTime) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn plus(self, duration: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(duration))
    }
}

/// The role an instance reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedRole {
    Primary,
    Replica,
    Starting,
    Fenced,
    Stopped,
    Unknown,
}

/// One instance as observed in this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceObservation {
    pub name: String,
    /// The agent answered in this round.
    pub reachable: bool,
    /// Postgres accepts connections.
    pub postgres_up: bool,
    pub role: ObservedRole,
    pub timeline: Option<u32>,
    /// Replica: WAL received and flushed by the WAL receiver (`pg_last_wal_receive_lsn`).
    pub received_lsn: Option<Lsn>,
    /// Replica: WAL replayed (`pg_last_wal_replay_lsn`).
    pub replayed_lsn: Option<Lsn>,
    /// Primary: WAL flushed locally (`pg_current_wal_flush_lsn`); every acknowledged commit is
    /// at or before it.
    pub flush_lsn: Option<Lsn>,
    /// As reported by the primary's `pg_stat_replication` for this standby.
    pub sync_state: Option<SyncState>,
    /// The instance this replica streams from, when its WAL receiver is streaming.
    pub upstream: Option<String>,
    /// The `synchronous_standby_names` a primary currently applies (parsed), if reported.
    pub applied_sync: Option<SyncSet>,
    /// When the last successful report from this instance arrived (observer's clock).
    pub last_report_at: Option<MonoTime>,
    /// The observer saw this instance run as a primary since it last rejoined: its WAL may have
    /// diverged from the holder's, so following is not enough (rewind or re-clone).
    #[serde(default)]
    pub former_primary: bool,
    /// When this instance last reported itself a serving primary, however long ago (the
    /// observer's clock): with a lease that its holder kept renewing since, an agent that does
    /// not answer this observer still serves (a holder renews only while it serves).
    #[serde(default)]
    pub last_seen_serving_at: Option<MonoTime>,
}

impl InstanceObservation {
    /// Reachable, postgres up, and reporting itself as a writable primary.
    pub fn is_writable_primary(&self) -> bool {
        self.reachable && self.postgres_up && self.role == ObservedRole::Primary
    }

    /// The furthest WAL position this instance is known to hold durably.
    pub fn durable_position(&self) -> Option<Lsn> {
        match self.role {
            ObservedRole::Primary => self.flush_lsn,
            _ => self.received_lsn.or(self.flush_lsn),
        }
    }
}

/// The lease as seen by the observer. `version` is opaque (a Kubernetes `resourceVersion`, or
/// the local lease service's counter): it changes on every write, renewals included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub version: String,
    /// When the observer first saw this exact (holder, version): the lease has been unchanged
    /// since then, on the observer's own monotonic clock.
    pub unchanged_since: MonoTime,
    /// The duration written in the lease record; the engine uses the larger of it and the spec's.
    pub duration: Duration,
}

/// A quorum of synchronous standbys: `ANY k (members)`. `k == 0` means asynchronous.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncSet {
    pub k: u32,
    pub members: Vec<String>,
}

impl SyncSet {
    pub fn asynchronous() -> Self {
        SyncSet::default()
    }

    pub fn is_synchronous(&self) -> bool {
        self.k > 0 && !self.members.is_empty()
    }

    /// The value for `synchronous_standby_names`; empty for asynchronous replication.
    pub fn to_standby_names(&self) -> String {
        if !self.is_synchronous() {
            return String::new();
        }
        let quoted: Vec<String> = self.members.iter().map(|m| format!("\"{m}\"")).collect();
        format!("ANY {} ({})", self.k, quoted.join(", "))
    }

    /// Normalised: members sorted and deduplicated, k bounded by the member count.
    pub fn normalized(mut self) -> Self {
        self.members.sort();
        self.members.dedup();
        self.k = self.k.min(self.members.len() as u32);
        if self.k == 0 {
            self.members.clear();
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    #[default]
    Async,
    Sync,
}

/// What happens when fewer healthy standbys than `sync_replicas` exist in sync mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataDurability {
    /// Keep requiring `sync_replicas` acknowledgements: writes block rather than lose safety.
    #[default]
    Required,
    /// Lower the quorum to the standbys that are healthy (down to asynchronous).
    Preferred,
}

/// The desired behaviour (the `PgReplicaSet` spec's failover/replication parts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub failover_enabled: bool,
    pub mode: ReplicationMode,
    pub sync_replicas: u32,
    pub durability: DataDurability,
    /// Refuse a failover whose candidate is further behind the last known primary position.
    /// `None`: no limit.
    pub max_failover_lag_bytes: Option<u64>,
    /// A planned switchover waits until the target has received at least the old primary's last
    /// flushed position; the target must be within this lag to be accepted at all.
    pub max_switchover_lag_bytes: u64,
    /// Higher is preferred; 0 means never promote this instance. Missing names get 1.
    pub priorities: BTreeMap<String, u32>,
    /// Promote even when that may lose acknowledged writes (said loudly in a critical event).
    pub allow_data_loss: bool,
    pub lease_duration: Duration,
    /// A report older than this is not used for decisions.
    pub report_stale_after: Duration,
    /// The lease-store-outage failsafe (`spec.failover.failsafe`): the controller gives the
    /// agents the member list and switch (`control::round`).
    pub failsafe: bool,
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            failover_enabled: true,
            mode: ReplicationMode::Async,
            sync_replicas: 1,
            durability: DataDurability::Required,
            max_failover_lag_bytes: None,
            max_switchover_lag_bytes: 16 * 1024 * 1024,
            priorities: BTreeMap::new(),
            allow_data_loss: false,
            lease_duration: Duration::from_secs(8),
            report_stale_after: Duration::from_secs(5),
            failsafe: true,
        }
    }
}

impl EngineSpec {
    pub fn priority_of(&self, name: &str) -> u32 {
        self.priorities.get(name).copied().unwrap_or(1)
    }
}

/// The last primary position seen while it was healthy: the reference for "how much would a
/// promotion lose".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRecord {
    pub name: String,
    pub timeline: Option<u32>,
    pub flush_lsn: Lsn,
}

/// A requested planned switchover, kept until it completes or is abandoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverPlan {
    pub from: String,
    pub to: String,
    pub requested_at: MonoTime,
}

/// What the controller remembers between rounds (and persists): the engine returns the next one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    pub last_primary: Option<PrimaryRecord>,
    /// The synchronous quorum that every acknowledged commit is guaranteed to satisfy: a superset
    /// of the members (and at most the `k`) of what the primary applies. Used at failover time.
    pub recorded_sync: SyncSet,
    pub switchover: Option<SwitchoverPlan>,
    /// The recorded quorum is not known to be right: the controller's persisted state was
    /// missing for a cluster that has run before. In sync mode no failover may rely on it until
    /// a serving primary confirms a synchronous setting again.
    #[serde(default)]
    pub sync_record_lost: bool,
}

/// Everything the engine decides from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInput {
    pub now: MonoTime,
    pub instances: Vec<InstanceObservation>,
    pub lease: LeaseView,
    pub spec: EngineSpec,
    pub memory: Memory,
}

impl EngineInput {
    pub fn instance(&self, name: &str) -> Option<&InstanceObservation> {
        self.instances.iter().find(|i| i.name == name)
    }

    /// The effective lease duration: the longer of the spec's and the lease record's.
    pub fn lease_duration(&self) -> Duration {
        self.spec.lease_duration.max(self.lease.duration)
    }

    /// After this instant the lease's last holder can no longer have committed anything: the
    /// lease's release (only a stopped primary releases it), or its expiry (a holder fences
    /// itself within `renewDeadline + shutdownBudget < leaseDuration` of its last renewal).
    pub fn commits_ended_at(&self) -> MonoTime {
        match self.lease.holder {
            None => self.lease.unchanged_since,
            Some(_) => MonoTime(self.lease.unchanged_since.0 + self.lease_duration()),
        }
    }

    /// The lease has a holder that has not changed it for a full lease duration on our clock.
    pub fn lease_expired(&self) -> bool {
        self.lease.holder.is_some()
            && self.now.saturating_since(self.lease.unchanged_since) >= self.lease_duration()
    }

    /// Reachable and with a report recent enough to decide from.
    pub fn is_fresh(&self, instance: &InstanceObservation) -> bool {
        instance.reachable
            && instance
                .last_report_at
                .is_some_and(|at| self.now.saturating_since(at) <= self.spec.report_stale_after)
    }
}
