//! The timeline report and the safety checks over the samples.

use super::*;

/// When the agent's keeper (or its watchdog) logged the fence, from the agent's log (wall clock).
pub(super) fn fenced_at_ms(cluster: &Cluster, node: &str) -> Option<i64> {
    std::fs::read_to_string(cluster.layout().agent_log(node))
        .ok()?
        .lines()
        .find(|l| l.contains("fencing: stopping postgres immediately"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.timestamp_millis())
}

/// Prints the observed timeline, relative to the switchover request.
pub(super) fn report(
    name: &str,
    cluster: &Cluster,
    target: &str,
    ticks: &[Tick],
    marks: &Marks,
    final_lease: &Lease,
    final_agent: &Option<AgentView>,
) {
    let mut lines: Vec<(i64, String)> = vec![
        (marks.requested, "switchover requested".to_string()),
        (
            marks.held,
            format!("{target}'s promotion signalled, still in recovery (agent status)"),
        ),
        (marks.killed, "controller SIGKILLed".to_string()),
    ];
    if let Some(released) = marks.released {
        lines.push((released, "conflicting transaction committed".to_string()));
    }
    if let Some(at) = final_lease.renewed_at_ms {
        lines.push((
            at,
            format!(
                "last lease write (holder {:?}, version {})",
                final_lease.holder, final_lease.version
            ),
        ));
        lines.push((
            at + RENEW_DEADLINE_PLUS_SHUTDOWN_MS,
            "deadline: last lease write + renew deadline + shutdown budget".to_string(),
        ));
        if let Some(fenced) = fenced_at_ms(cluster, target) {
            lines.push((
                fenced,
                format!(
                    "{target}'s keeper fences (agent log), {} ms after the last lease write",
                    fenced - at
                ),
            ));
        }
    }
    // State changes per node, of the target's agent and of the lease.
    let mut last: std::collections::BTreeMap<String, NodeState> = Default::default();
    let mut last_agent: Option<AgentView> = None;
    let mut last_lease: Option<(Option<String>, String)> = None;
    let mut renewals = 0;
    for tick in ticks {
        for (node, state) in &tick.states {
            if last.get(node) != Some(state) {
                lines.push((tick.at_ms, format!("{node}: {state:?}")));
                last.insert(node.clone(), *state);
            }
        }
        if let Some(agent) = &tick.target_agent
            && last_agent.as_ref() != Some(agent)
        {
            lines.push((
                tick.at_ms,
                format!(
                    "{target}'s agent: role {:?}, intended {:?}, in recovery {:?}{}",
                    agent.role,
                    agent.intended_role,
                    agent.in_recovery,
                    agent
                        .fence_reason
                        .as_ref()
                        .map(|r| format!(", fenced: {r}"))
                        .unwrap_or_default()
                ),
            ));
            last_agent = Some(agent.clone());
        }
        if let Some(lease) = &tick.lease_after {
            let key = (lease.holder.clone(), lease.version.clone());
            if last_lease.as_ref() != Some(&key) {
                if last_lease.as_ref().is_some_and(|(h, _)| *h == lease.holder) {
                    renewals += 1;
                } else {
                    lines.push((
                        tick.at_ms,
                        format!(
                            "lease holder {:?} (version {})",
                            lease.holder, lease.version
                        ),
                    ));
                }
                last_lease = Some(key);
            }
        }
    }
    lines.sort_by_key(|(at, _)| *at);
    eprintln!("[{name}] timeline (0 = switchover requested; sampled every ~100 ms):");
    for (at, line) in &lines {
        eprintln!(
            "[{name}]   {:+6.2} s  {line}",
            (at - marks.requested) as f64 / 1000.0
        );
    }
    let rel = |ms: i64| format!("{:+.2} s", (ms - marks.requested) as f64 / 1000.0);
    for node in ticks
        .first()
        .into_iter()
        .flat_map(|t| t.states.iter().map(|(n, _)| n))
    {
        let mine: Vec<i64> = ticks
            .iter()
            .filter(|t| {
                t.states
                    .iter()
                    .any(|(n, s)| n == node && *s == NodeState::Writable)
            })
            .map(|t| t.at_ms)
            .collect();
        if let (Some(first), Some(last)) = (mine.first(), mine.last()) {
            eprintln!(
                "[{name}]   {node} writable in {} samples, from {} to {}",
                mine.len(),
                rel(*first),
                rel(*last)
            );
        }
    }
    eprintln!(
        "[{name}]   {} ticks (largest gap {} ms), {renewals} lease renewals seen by the sampler; {target}'s agent at the end: {final_agent:?}",
        ticks.len(),
        max_gap_ms(ticks)
    );
    for line in fencing_log_lines(cluster, target) {
        eprintln!("[{name}]   {target} log: {line}");
    }
}

pub(super) fn max_gap_ms(ticks: &[Tick]) -> i64 {
    ticks
        .windows(2)
        .map(|w| w[1].at_ms - w[0].at_ms)
        .max()
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check(
    name: &str,
    cluster: &Cluster,
    conflict: Conflict,
    target: &str,
    ticks: &[Tick],
    marks: &Marks,
    final_lease: &Lease,
    final_agent: &Option<AgentView>,
) {
    let context = || cluster.controller_log_tail();
    // Samples every ~100 ms; a sample may take longer on a loaded machine (fresh SCRAM
    // connections to three nodes), but never so long that a writable window could hide.
    let max_gap = max_gap_ms(ticks);
    assert!(
        ticks.len() >= 40 && max_gap <= 2000,
        "[{name}] too few samples: {} ticks, largest gap {max_gap} ms",
        ticks.len()
    );
    // Nothing writes the lease once the controller (the lease service) is dead.
    let last_write = final_lease
        .renewed_at_ms
        .expect("the lease was written at least once");
    assert!(
        last_write <= marks.killed,
        "[{name}] the lease was written after the controller was killed"
    );
    assert_eq!(final_lease.holder.as_deref(), Some(target));
    let down_by = last_write + RENEW_DEADLINE_PLUS_SHUTDOWN_MS;
    for tick in ticks {
        let writable: Vec<&str> = tick
            .states
            .iter()
            .filter(|(_, s)| *s == NodeState::Writable)
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(
            writable.len() <= 1,
            "[{name}] two writable primaries at {} ms after the request: {writable:?}\n{}",
            tick.at_ms - marks.requested,
            context()
        );
        for node in writable {
            let holder_before = tick.lease_before.as_ref().and_then(|l| l.holder.as_deref());
            let holder_after = tick.lease_after.as_ref().and_then(|l| l.holder.as_deref());
            assert!(
                holder_before == Some(node) || holder_after == Some(node),
                "[{name}] {node} accepted a write at +{} ms without holding the lease (holder {holder_before:?} / {holder_after:?})",
                tick.at_ms - marks.requested
            );
            assert!(
                tick.at_ms <= down_by,
                "[{name}] unfenced writable primary: {node} accepted a write issued at +{} ms, {} ms after the last lease write (renew deadline + shutdown budget: {RENEW_DEADLINE_PLUS_SHUTDOWN_MS} ms)\n{}",
                tick.at_ms - marks.requested,
                tick.at_ms - last_write,
                context()
            );
        }
        // The target is a primary for fencing from the signal on: after the deadline it must not
        // even answer (in recovery or not).
        if tick.at_ms > down_by {
            let state = tick
                .states
                .iter()
                .find(|(n, _)| n == target)
                .map(|(_, s)| *s);
            assert_eq!(
                state,
                Some(NodeState::Down),
                "[{name}] {target} still answered at +{} ms, {} ms after the last lease write\n{}",
                tick.at_ms - marks.requested,
                tick.at_ms - last_write,
                context()
            );
        }
    }
    // The keeper renewed while the promotion was held back (an active keeper, not a stale grant).
    let versions: std::collections::BTreeSet<&str> = ticks
        .iter()
        .filter(|t| t.at_ms >= marks.held && t.at_ms < marks.killed)
        .filter_map(|t| t.lease_after.as_ref())
        .filter(|l| l.holder.as_deref() == Some(target))
        .map(|l| l.version.as_str())
        .collect();
    assert!(
        versions.len() >= 2,
        "[{name}] the target's keeper did not renew while its promotion was held back: versions {versions:?}"
    );
    let target_writable: Vec<i64> = ticks
        .iter()
        .filter(|t| {
            t.states
                .iter()
                .any(|(n, s)| n == target && *s == NodeState::Writable)
        })
        .map(|t| t.at_ms)
        .collect();
    match conflict {
        Conflict::ReleasedAfterTheKill => {
            // The scenario needs the promotion to complete while no lease can be renewed: after
            // the controller (and its lease service) died. A tick's time is when its samples
            // were issued, so the first writable tick may predate the release mark by the
            // sampling time; it must not predate the kill.
            assert!(
                marks.released.is_some()
                    && target_writable
                        .first()
                        .is_some_and(|first| *first > marks.killed),
                "[{name}] {target} never became writable after the controller was killed: the scenario did not happen\n{}",
                context()
            );
        }
        Conflict::KeptUntilFenced => {
            assert!(
                target_writable.is_empty(),
                "[{name}] {target} became writable although replay was held back"
            );
        }
    }
    assert!(
        final_agent
            .as_ref()
            .is_some_and(|a| a.role == Role::Fenced && a.fence_reason.is_some()),
        "[{name}] {target}'s agent does not report itself fenced: {final_agent:?}"
    );
}
