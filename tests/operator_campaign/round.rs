//! One round of the campaign: apply the drawn fault to the current primary (or the control
//! plane), watch the cluster while it lasts, heal it, wait until the cluster is settled —
//! Healthy, 3/3 ready, the Lease holder the named primary, every other pod a ready replica that
//! is in recovery (so every former primary rejoined), a synchronous standby — and until writes
//! flow again; then the round's figures.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase, SyncState};
use pgrs::chaos::{WriteOutcome, WriteRecord};
use std::sync::atomic::Ordering;

use crate::Campaign;
use crate::faults::{Fault, FaultGuard};

/// Between two looks at the cluster.
const LOOK_PERIOD: Duration = Duration::from_millis(500);
/// A look's API request without an answer by then counts as no answer (etcd down: the API
/// server holds requests for long).
const LOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a healed cluster may take to settle: generous, the machine is shared.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Settled means writes flow again: the primary acknowledged this many writes since.
const FLOWING_WRITES: usize = 10;
const FLOWING_TIMEOUT: Duration = Duration::from_secs(60);

/// What one round did, on the writers' clock (`Duration` since their start).
#[derive(Debug, Clone)]
pub struct RoundResult {
    pub index: usize,
    pub fault: Fault,
    pub primary_before: String,
    pub primary_after: String,
    /// Every primary named by `status.currentPrimary` or holding the Lease during the round.
    pub primaries_seen: BTreeSet<String>,
    /// Every `status.phase` seen during the round.
    pub phases_seen: BTreeSet<String>,
    /// Looks at the cluster that got no answer (API unreachable).
    pub unanswered_looks: usize,
    pub applied: Duration,
    /// The heal began (`applied + hold`, give or take a look).
    pub healed: Duration,
    /// The heal was done (for fault 5: the API server serves again).
    pub heal_done: Duration,
    pub settled: Duration,
    pub flowing: Duration,
    /// The longest time without any acknowledged write (any pod) from the last
    /// acknowledgement before the fault to the writes flowing again, and where it started.
    pub window: Duration,
    pub window_from: Duration,
    /// Writes answered during the round (`applied` to `flowing`).
    pub acknowledged: usize,
    pub indeterminate: usize,
    /// Times the operator exited and was started again during the round.
    pub operator_restarts: usize,
    pub wall: Duration,
}

impl RoundResult {
    pub fn failover(&self) -> bool {
        self.primary_after != self.primary_before
            || self
                .primaries_seen
                .iter()
                .any(|p| *p != self.primary_before)
    }

    /// `before → after`, or `before` alone.
    pub fn primaries(&self) -> String {
        let seen: Vec<&str> = self
            .primaries_seen
            .iter()
            .filter(|p| **p != self.primary_before && **p != self.primary_after)
            .map(String::as_str)
            .collect();
        match (self.primary_after == self.primary_before, seen.is_empty()) {
            (true, true) => self.primary_before.clone(),
            (_, true) => format!("{} → {}", self.primary_before, self.primary_after),
            (_, false) => format!(
                "{} → {} → {}",
                self.primary_before,
                seen.join(", "),
                self.primary_after
            ),
        }
    }
}

/// One look at the cluster; `None` where the API did not answer in time.
struct Look {
    status: Option<PgReplicaSetStatus>,
    holder: Option<Option<String>>,
}

async fn look(c: &Campaign) -> Look {
    c.keep_operator_running();
    let status = tokio::time::timeout(LOOK_TIMEOUT, c.status()).await;
    let holder = tokio::time::timeout(LOOK_TIMEOUT, c.lease_holder()).await;
    Look {
        status: status.ok().and_then(Result::ok),
        holder: holder.ok().and_then(Result::ok),
    }
}

/// What the looks of a round saw.
#[derive(Default)]
struct Seen {
    primaries: BTreeSet<String>,
    phases: BTreeSet<String>,
    unanswered: usize,
}

impl Seen {
    fn record(&mut self, look: &Look) {
        if let Some(status) = &look.status {
            self.primaries.extend(status.current_primary.clone());
            self.phases.extend(status.phase.map(|p| format!("{p:?}")));
        }
        if let Some(Some(holder)) = &look.holder {
            self.primaries.insert(holder.clone());
        }
        if look.status.is_none() || look.holder.is_none() {
            self.unanswered += 1;
        }
    }
}

/// Whether the cluster is settled (see the module documentation), as observed by the
/// operator after `healed` (wall clock); the primary if so.
async fn settled(c: &Campaign, look: &Look, healed: Timestamp) -> Result<String, String> {
    let status = look.status.as_ref().ok_or("no status (API unreachable?)")?;
    // A status written before the heal (e.g. by an operator that exited since) says nothing.
    let stale: Vec<&str> = status
        .instances
        .iter()
        .filter(|i| {
            i.last_seen
                .as_ref()
                .is_none_or(|t| t.0.as_second() < healed.as_second())
        })
        .map(|i| i.name.as_str())
        .collect();
    if !stale.is_empty() {
        return Err(format!("not seen since the heal: {stale:?}"));
    }
    let primary = match (
        &status.phase,
        status.ready.as_deref(),
        &status.current_primary,
    ) {
        (Some(Phase::Healthy), Some("3/3"), Some(primary)) => primary.clone(),
        _ => {
            return Err(format!(
                "{:?} {:?} primary {:?}: {:?}",
                status.phase, status.ready, status.current_primary, status.instances
            ));
        }
    };
    let holder = look.holder.as_ref().ok_or("the Lease unreadable")?;
    if holder.as_deref() != Some(primary.as_str()) {
        return Err(format!("Lease holder {holder:?}, primary {primary}"));
    }
    for pod in c.ips.keys() {
        let instance = status
            .instances
            .iter()
            .find(|i| i.name == *pod)
            .ok_or(format!("{pod} is not listed"))?;
        let want = if *pod == primary {
            InstanceRole::Primary
        } else {
            InstanceRole::Replica
        };
        if instance.role != want || !instance.ready {
            return Err(format!("{pod} not a ready {want:?}: {instance:?}"));
        }
    }
    if !status
        .instances
        .iter()
        .any(|i| matches!(i.sync_state, Some(SyncState::Sync | SyncState::Quorum)))
    {
        return Err(format!("no synchronous standby: {:?}", status.instances));
    }
    // The database itself: the primary writable, every other pod (a former primary too) in
    // recovery.
    for pod in c.ips.keys() {
        let in_recovery = c.in_recovery(pod).await?;
        if in_recovery == (*pod == primary) {
            return Err(format!("{pod}: pg_is_in_recovery() = {in_recovery}"));
        }
    }
    Ok(primary)
}

/// Sleeps until `deadline` or `LOOK_PERIOD`, whichever comes first.
async fn pause_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(left.min(LOOK_PERIOD)).await;
}

/// Runs round `index` with `fault` on a settled cluster whose primary is `primary`. An error
/// names what never happened (the cluster did not settle, writes did not resume); the fault
/// is healed in any case.
pub async fn run(
    c: &Campaign,
    index: usize,
    fault: Fault,
    primary: &str,
) -> Result<RoundResult, String> {
    let wall_start = Instant::now();
    let restarts_before = c.operator_restarts.load(Ordering::Relaxed);
    let primary_net = c
        .bed
        .pod_net(&c.ns, primary)
        .map_err(|e| format!("the primary's network namespace: {e}"))?;
    let mut replica_ips: Vec<Ipv4Addr> = Vec::new();
    for (pod, ip) in &c.ips {
        let net = c
            .bed
            .pod_net(&c.ns, pod)
            .map_err(|e| format!("{pod}'s network namespace: {e}"))?;
        if net.ip().to_string() != *ip {
            return Err(format!(
                "{pod} has a new IP {} (was {ip}): the writers' addresses are stale",
                net.ip()
            ));
        }
        if pod != primary {
            replica_ips.push(net.ip());
        }
    }

    let mut seen = Seen::default();
    let applied = c.now();
    eprintln!(
        "round {index}: {} on {primary} for {:.1} s at {:.1} s",
        fault.label(),
        fault.hold.as_secs_f64(),
        applied.as_secs_f64()
    );
    let guard = FaultGuard::apply(c.bed, &fault, primary_net, &replica_ips).await;
    // The hold counts from the fault being in place (stopping a component takes ≈1 s).
    let heal_at = Instant::now() + fault.hold;
    while Instant::now() < heal_at {
        // A look cut short by the heal time is dropped: the hold is kept.
        let deadline = tokio::time::Instant::from_std(heal_at);
        if let Ok(look) = tokio::time::timeout_at(deadline, look(c)).await {
            seen.record(&look);
        }
        pause_until(heal_at).await;
    }
    let healed = c.now();
    guard.heal().await;
    let heal_done = c.now();
    let heal_wall = Timestamp::now();

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let primary_after = loop {
        let look = look(c).await;
        seen.record(&look);
        match settled(c, &look, heal_wall).await {
            Ok(primary) => break primary,
            Err(why) if Instant::now() > deadline => {
                return Err(format!(
                    "round {index} ({}): not settled {} s after the heal: {why}",
                    fault.label(),
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
            Err(_) => pause_until(deadline).await,
        }
    };
    let settled_at = c.now();
    let before = c.writers().acknowledged_by(&primary_after);
    let deadline = Instant::now() + FLOWING_TIMEOUT;
    while c.writers().acknowledged_by(&primary_after) < before + FLOWING_WRITES {
        if Instant::now() > deadline {
            return Err(format!(
                "round {index} ({}): {primary_after} acknowledged fewer than {FLOWING_WRITES} \
                 writes in {} s after the cluster settled",
                fault.label(),
                FLOWING_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flowing = c.now();

    let writes = c.writers().records();
    let (window, window_from) = longest_window(&writes, applied, flowing);
    let answered = |outcome: WriteOutcome| {
        writes
            .iter()
            .filter(|w| w.outcome == outcome && w.answered >= applied && w.answered <= flowing)
            .count()
    };
    Ok(RoundResult {
        index,
        fault,
        primary_before: primary.to_string(),
        primary_after,
        primaries_seen: seen.primaries,
        phases_seen: seen.phases,
        unanswered_looks: seen.unanswered,
        applied,
        healed,
        heal_done,
        settled: settled_at,
        flowing,
        window,
        window_from,
        acknowledged: answered(WriteOutcome::Acknowledged),
        indeterminate: answered(WriteOutcome::Indeterminate),
        operator_restarts: c.operator_restarts.load(Ordering::Relaxed) - restarts_before,
        wall: wall_start.elapsed(),
    })
}

/// The longest time without an acknowledged write (any pod) from the last acknowledgement at
/// or before `from` (else `from`) to `to`, and where it began.
pub fn longest_window(
    writes: &[WriteRecord],
    from: Duration,
    to: Duration,
) -> (Duration, Duration) {
    let mut acks: Vec<Duration> = writes
        .iter()
        .filter_map(WriteRecord::acknowledged_at)
        .filter(|at| *at <= to)
        .collect();
    acks.sort();
    let mut previous = acks
        .iter()
        .rev()
        .find(|at| **at <= from)
        .copied()
        .unwrap_or(from);
    let (mut longest, mut longest_from) = (Duration::ZERO, previous);
    for at in acks.into_iter().filter(|at| *at > from).chain([to]) {
        if at.saturating_sub(previous) > longest {
            (longest, longest_from) = (at - previous, previous);
        }
        previous = previous.max(at);
    }
    (longest, longest_from)
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The header of the rounds table (Markdown).
pub const TABLE_HEADER: &str = "| round | fault | hold | failover | primary | longest window \
     without an acknowledged write | settled after the heal | round took |\n| --- | --- | --- | \
     --- | --- | --- | --- | --- |";

/// One row of the rounds table.
pub fn table_row(r: &RoundResult) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} (from {:.1} s) | {} | {} |",
        r.index,
        r.fault.label(),
        seconds(r.fault.hold),
        if r.failover() { "yes" } else { "no" },
        r.primaries(),
        seconds(r.window),
        r.window_from.as_secs_f64(),
        seconds(r.settled.saturating_sub(r.heal_done)),
        seconds(r.wall),
    )
}

/// A line of detail per round (for the log and the report).
pub fn detail(r: &RoundResult) -> String {
    format!(
        "round {}: applied {:.1} s, heal began {:.1} s, done {:.1} s, settled {:.1} s, writes \
         flowing {:.1} s; {} acknowledged, {} indeterminate; phases {:?}; {} unanswered looks; \
         operator restarted {} times",
        r.index,
        r.applied.as_secs_f64(),
        r.healed.as_secs_f64(),
        r.heal_done.as_secs_f64(),
        r.settled.as_secs_f64(),
        r.flowing.as_secs_f64(),
        r.acknowledged,
        r.indeterminate,
        r.phases_seen,
        r.unanswered_looks,
        r.operator_restarts
    )
}
