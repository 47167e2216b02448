//! Oracles for the property tests: the failover rules of `docs/failover.md` restated from first
//! principles on plain values. Nothing here calls the engine's own helpers (`is_fresh`,
//! `lease_duration`, `lease_expired`, `priority_of`, `promotable_replicas`, `quorum_position`,
//! `desired_sync`, …): a bug shared by a helper and its oracle would go unnoticed.
//!
//! Also the coverage counters: each property counts how many cases reached each interesting
//! assertion and fails when one was reached too rarely.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestError, TestRunner};

use super::super::*;

/// Milliseconds on the observer's clock.
pub fn ms(t: MonoTime) -> u64 {
    t.0.as_millis() as u64
}

/// `now - earlier` in milliseconds, 0 when `earlier` is not before `now`.
pub fn age_ms(now: MonoTime, earlier: MonoTime) -> u64 {
    let (now, earlier) = (ms(now), ms(earlier));
    now.saturating_sub(earlier)
}

/// A report may be decided from when the agent answered and the report is at most
/// `report_stale_after` old.
pub fn fresh(input: &EngineInput, i: &InstanceObservation) -> bool {
    let limit = input.spec.report_stale_after.as_millis() as u64;
    match (i.reachable, i.last_report_at) {
        (true, Some(at)) => age_ms(input.now, at) <= limit,
        _ => false,
    }
}

/// The longer of the spec's lease duration and the one written in the lease record.
pub fn effective_lease_ms(input: &EngineInput) -> u64 {
    let spec = input.spec.lease_duration.as_millis() as u64;
    let record = input.lease.duration.as_millis() as u64;
    if spec > record { spec } else { record }
}

/// The holder's lease counts as expired: unchanged for a full effective duration.
pub fn expired(input: &EngineInput) -> bool {
    input.lease.holder.is_some()
        && age_ms(input.now, input.lease.unchanged_since) >= effective_lease_ms(input)
}

pub fn priority(input: &EngineInput, name: &str) -> u32 {
    match input.spec.priorities.get(name) {
        Some(p) => *p,
        None => 1,
    }
}

pub fn writable(i: &InstanceObservation) -> bool {
    i.reachable && i.postgres_up && i.role == ObservedRole::Primary
}

/// Fresh writable primaries other than the lease holder: they must be fenced.
pub fn rogues(input: &EngineInput) -> Vec<&InstanceObservation> {
    input
        .instances
        .iter()
        .filter(|i| fresh(input, i) && writable(i))
        .filter(|i| input.lease.holder.as_deref() != Some(i.name.as_str()))
        .collect()
}

pub fn running_replica(input: &EngineInput, i: &InstanceObservation) -> bool {
    fresh(input, i) && i.postgres_up && i.role == ObservedRole::Replica
}

/// May be promoted at all, before the timeline rule.
pub fn eligible(input: &EngineInput, i: &InstanceObservation, excluded: Option<&str>) -> bool {
    Some(i.name.as_str()) != excluded
        && running_replica(input, i)
        && i.received_lsn.is_some()
        && priority(input, &i.name) > 0
        && !i.former_primary
}

/// Eligible replicas on the newest timeline any of them reports (replicas without a timeline
/// only count when none reports one).
pub fn candidates<'a>(
    input: &'a EngineInput,
    excluded: Option<&str>,
) -> Vec<&'a InstanceObservation> {
    let all: Vec<_> = input
        .instances
        .iter()
        .filter(|i| eligible(input, i, excluded))
        .collect();
    let mut newest: Option<u32> = None;
    for i in &all {
        if let Some(tl) = i.timeline
            && newest.is_none_or(|n| tl > n)
        {
            newest = Some(tl);
        }
    }
    match newest {
        None => all,
        Some(newest) => all
            .into_iter()
            .filter(|i| i.timeline == Some(newest))
            .collect(),
    }
}

/// The documented order: received, then replayed, then priority, then the smaller name.
pub fn best<'a>(
    input: &EngineInput,
    among: &[&'a InstanceObservation],
) -> Option<&'a InstanceObservation> {
    let mut sorted = among.to_vec();
    sorted.sort_by_key(|i| {
        Reverse((
            i.received_lsn,
            i.replayed_lsn,
            priority(input, &i.name),
            Reverse(i.name.clone()),
        ))
    });
    sorted.first().copied()
}

/// The reading quorum over the recorded synchronous set `ANY k (S)`: with W = k writers per
/// commit, any R = |S| - k + 1 members intersect every write quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    Async,
    Unreachable,
    /// The most advanced reporting member: every acknowledged commit is at or before it.
    Required(Lsn),
}

/// The old primary commits nothing after its lease was released (it stopped first) or expired
/// (it fenced itself first): positions reported before that may be short of its last commits.
pub fn commits_ended_ms(input: &EngineInput) -> u64 {
    let changed = ms(input.lease.unchanged_since);
    match input.lease.holder {
        None => changed,
        Some(_) => changed + effective_lease_ms(input),
    }
}

/// For a takeover (a failover, a switchover's takeover of the released lease) `takeover` is set:
/// only reports taken after [`commits_ended_ms`] count.
pub fn quorum(input: &EngineInput, excluded: Option<&str>, takeover: bool) -> Quorum {
    let set = &input.memory.recorded_sync;
    let members: BTreeSet<&str> = set.members.iter().map(String::as_str).collect();
    if set.k == 0 || members.is_empty() {
        return Quorum::Async;
    }
    let write_quorum = set.k as usize;
    let read_quorum = members.len() + 1 - write_quorum;
    let reporting: Vec<Lsn> = input
        .instances
        .iter()
        .filter(|i| members.contains(i.name.as_str()) && Some(i.name.as_str()) != excluded)
        .filter(|i| running_replica(input, i))
        .filter(|i| {
            !takeover
                || i.last_report_at
                    .is_some_and(|at| ms(at) > commits_ended_ms(input))
        })
        .filter_map(|i| i.received_lsn)
        .collect();
    match reporting.iter().max() {
        Some(max) if reporting.len() >= read_quorum => Quorum::Required(*max),
        _ => Quorum::Unreachable,
    }
}

/// Whom a failover away from `failed` promotes, and whether only `allowDataLoss` allowed it.
pub fn expected_failover(input: &EngineInput, failed: Option<&str>) -> Option<(String, bool)> {
    let candidates = candidates(input, failed);
    let fallback = best(input, &candidates)?;
    let allow = input.spec.allow_data_loss;
    let overridden = |i: &InstanceObservation| allow.then(|| (i.name.clone(), true));
    match quorum(input, failed, true) {
        Quorum::Unreachable => overridden(fallback),
        Quorum::Required(required) => {
            let safe: Vec<_> = candidates
                .iter()
                .copied()
                .filter(|i| i.received_lsn >= Some(required))
                .collect();
            match best(input, &safe) {
                Some(chosen) => Some((chosen.name.clone(), false)),
                None => overridden(fallback),
            }
        }
        Quorum::Async => {
            let Some(limit) = input.spec.max_failover_lag_bytes else {
                return Some((fallback.name.clone(), false));
            };
            let reference = input.memory.last_primary.as_ref().map(|p| p.flush_lsn.0);
            let received = fallback.received_lsn.map_or(0, |l| l.0);
            match reference {
                Some(r) if r.saturating_sub(received) <= limit => {
                    Some((fallback.name.clone(), false))
                }
                _ => overridden(fallback),
            }
        }
    }
}

/// `ANY k (S)` as a claim "every acknowledged commit is on k members of S"; async claims nothing.
pub fn claim(set: &SyncSet) -> Option<(u32, BTreeSet<String>)> {
    let members: BTreeSet<String> = set.members.iter().cloned().collect();
    (set.k > 0 && !members.is_empty()).then(|| (set.k.min(members.len() as u32), members))
}

/// Claim `weaker` follows from `stronger`: its members include the stronger's, its k is not more.
pub fn implied_by(weaker: &SyncSet, stronger: &SyncSet) -> bool {
    match (claim(weaker), claim(stronger)) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some((kw, sw)), Some((ks, ss))) => kw <= ks && ss.is_subset(&sw),
    }
}

pub fn acquired(decision: &Decision) -> Vec<&str> {
    decision
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::AcquireLease { holder, .. } => Some(holder.as_str()),
            _ => None,
        })
        .collect()
}

pub fn promoted(decision: &Decision) -> Vec<&str> {
    decision
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Promote { instance } => Some(instance.as_str()),
            _ => None,
        })
        .collect()
}

pub fn fenced(decision: &Decision) -> BTreeSet<&str> {
    decision
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Fence { instance, .. } => Some(instance.as_str()),
            _ => None,
        })
        .collect()
}

/// Counts of cases that reached each named assertion of one property.
pub struct Coverage {
    property: &'static str,
    cases: std::sync::atomic::AtomicU64,
    counters: Vec<(&'static str, f64, std::sync::atomic::AtomicU64)>,
}

impl Coverage {
    /// `goals`: each counter's name and the minimum share of cases that must reach it.
    pub fn new(property: &'static str, goals: &[(&'static str, f64)]) -> Coverage {
        Coverage {
            property,
            cases: Default::default(),
            counters: goals
                .iter()
                .map(|(name, share)| (*name, *share, Default::default()))
                .collect(),
        }
    }

    pub fn case(&self) {
        self.cases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn hit(&self, name: &str) {
        let counter = self
            .counters
            .iter()
            .find(|(n, _, _)| *n == name)
            .unwrap_or_else(|| panic!("{}: no coverage counter {name}", self.property));
        counter.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prints every share and fails when one is under its goal.
    pub fn check(&self) {
        let cases = self.cases.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let mut short = Vec::new();
        for (name, goal, count) in &self.counters {
            let count = count.load(std::sync::atomic::Ordering::Relaxed);
            let share = count as f64 / cases as f64;
            eprintln!(
                "coverage {}: {name}: {count} of {cases} cases ({:.1} %, goal {:.1} %)",
                self.property,
                share * 100.0,
                goal * 100.0
            );
            if share < *goal {
                short.push(format!(
                    "{name}: {:.2} % < {:.2} %",
                    share * 100.0,
                    goal * 100.0
                ));
            }
        }
        assert!(
            short.is_empty(),
            "{}: properties exercised too rarely: {short:?}",
            self.property
        );
    }
}

/// Runs `test` on `cases` generated values (the minimal failing one is shrunk and printed), then
/// checks the coverage.
pub fn run<S: Strategy>(
    cases: u32,
    strategy: S,
    coverage: &Coverage,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    match runner.run(&strategy, |value| {
        coverage.case();
        test(value)
    }) {
        Ok(()) => {}
        Err(TestError::Fail(reason, value)) => {
            panic!(
                "{}: {reason}\nminimal failing input: {value:#?}",
                coverage.property
            )
        }
        Err(TestError::Abort(reason)) => panic!("{}: aborted: {reason}", coverage.property),
    }
    coverage.check();
}

/// What `decide` must do about the lease this round: acquire it for exactly this instance, or
/// for nobody.
/// May `target` take the lease `from` released? Under the failover's own rules: a candidate,
/// and in sync mode at least as far as the quorum proves every commit to be.
pub fn provable_takeover(input: &EngineInput, from: &str, target: &InstanceObservation) -> bool {
    candidates(input, Some(from))
        .iter()
        .any(|c| c.name == target.name)
        && match quorum(input, Some(from), true) {
            Quorum::Async => true,
            Quorum::Required(required) => target.received_lsn >= Some(required),
            Quorum::Unreachable => false,
        }
}

pub fn expected_acquire(input: &EngineInput) -> Option<String> {
    let by_name = |name: &str| input.instances.iter().find(|i| i.name == name);
    let since_change = age_ms(input.now, input.lease.unchanged_since);
    if let Some(holder) = &input.lease.holder {
        if let Some(h) = by_name(holder).filter(|h| fresh(input, h)) {
            // Serving (no takeover) or being promoted (no takeover either).
            if writable(h) || (h.role == ObservedRole::Replica && h.postgres_up) {
                return None;
            }
        }
        if !expired(input) || !rogues(input).is_empty() || !input.spec.failover_enabled {
            return None;
        }
        return expected_failover(input, Some(holder)).map(|(name, _)| name);
    }
    let running: Vec<_> = input
        .instances
        .iter()
        .filter(|i| fresh(input, i) && writable(i))
        .collect();
    match running.as_slice() {
        // Adopted only on a report newer than the lease's last change.
        [only] => {
            return (only.last_report_at > Some(input.lease.unchanged_since))
                .then(|| only.name.clone());
        }
        [] => {}
        _ => return None,
    }
    if let Some(plan) = &input.memory.switchover {
        let reference = input
            .memory
            .last_primary
            .as_ref()
            .filter(|p| p.name == plan.from)
            .map(|p| p.flush_lsn);
        if let Some(target) = by_name(&plan.to).filter(|t| running_replica(input, t))
            && let Some(received) = target.received_lsn
            && reference.is_none_or(|r| received >= r)
            && provable_takeover(input, &plan.from, target)
        {
            return Some(target.name.clone());
        }
        if age_ms(input.now, plan.requested_at) < effective_lease_ms(input) {
            return None;
        }
    }
    let any_replica = input
        .instances
        .iter()
        .any(|i| fresh(input, i) && i.role == ObservedRole::Replica);
    let failed = input.memory.last_primary.as_ref().map(|p| p.name.as_str());
    if failed.is_none() && !any_replica {
        return None;
    }
    let choice = expected_failover(input, failed);
    if let (Some((name, _)), Some(last)) = (&choice, &input.memory.last_primary)
        && by_name(name).and_then(|c| c.received_lsn) < Some(last.flush_lsn)
        && since_change < effective_lease_ms(input)
    {
        // A released lease: the best replica gets a lease duration to receive the last WAL.
        return None;
    }
    if !input.spec.failover_enabled {
        return None;
    }
    choice.map(|(name, _)| name)
}
