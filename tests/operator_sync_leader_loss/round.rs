//! One round of the test: the faults, the watch for a new primary, the figures.

use super::*;

/// The synchronous quorum the operator recorded in the control ConfigMap.
pub(super) async fn recorded_quorum(client: &kube::Client, ns: &str) -> Result<String, String> {
    let name = names::control_state(CLUSTER);
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&name)
        .await
        .map_err(|e| format!("ConfigMap {name}: {e}"))?;
    let text = config_map
        .data
        .and_then(|d| d.get(names::CONTROL_STATE_KEY).cloned())
        .ok_or(format!("ConfigMap {name} has no state"))?;
    let state = ControlState::from_json(&text).map_err(|e| e.to_string())?;
    let quorum = state.memory.recorded_sync;
    quorum
        .is_synchronous()
        .then(|| quorum.to_standby_names())
        .ok_or(format!("no synchronous quorum recorded yet: {text}"))
}

/// `at - since` in milliseconds, negative before `since`.
pub(super) fn signed_millis(at: Instant, since: Instant) -> i128 {
    if at >= since {
        at.duration_since(since).as_millis() as i128
    } else {
        -(since.duration_since(at).as_millis() as i128)
    }
}

/// How the failover ended.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// A standby was promoted.
    FailedOver { to: String },
    /// The failover was refused: the status message and the Event.
    Refused { message: String, event: String },
}

/// When the leading operator dies in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaderKill {
    /// At the same instant as the primary.
    SameInstant,
    /// Once the status shows it noticed the primary's loss.
    MidFailover,
}

/// What one round measured (from its fault: the primary's kill).
#[derive(Debug, Clone)]
pub(super) struct Round {
    pub(super) kind: LeaderKill,
    pub(super) old_primary: String,
    pub(super) old_leader: String,
    pub(super) new_leader: String,
    pub(super) final_primary: String,
    pub(super) outcome: Outcome,
    /// When the old leader was killed.
    pub(super) leader_killed: Duration,
    pub(super) took_over: Option<Duration>,
    pub(super) detected: Option<Duration>,
    pub(super) decided: Duration,
    pub(super) writable: Option<Duration>,
    pub(super) switched: Option<Duration>,
    pub(super) first_write: Option<Duration>,
    pub(super) unavailable: Option<Duration>,
    pub(super) healthy_again: Duration,
    pub(super) kills: usize,
    pub(super) record: Option<pgrs::api::FailoverRecord>,
    pub(super) fault: Instant,
    pub(super) fault_wall: k8s_openapi::jiff::Timestamp,
}

/// Says what blocks a failover that never came: the database Lease, the phase and conditions,
/// the Events.
pub(super) fn no_failover(
    bed: &TestBed,
    ns: &str,
    last_status: Option<&pgrs::api::PgReplicaSetStatus>,
) -> String {
    let holder = kubectl(
        bed,
        &[
            "get",
            "lease",
            &names::lease(CLUSTER),
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.holderIdentity} renewed {.spec.renewTime}",
        ],
    );
    let events: Vec<String> = event_lines(bed, ns)
        .lines()
        .filter(|l| !l.starts_with("Successful") && !l.starts_with("FailedUpdate"))
        .map(str::to_string)
        .collect();
    format!(
        "neither a new primary nor a refusal {} s after the fault (the cluster has had no primary since): the Lease {} is held by {holder}; phase {:?}, conditions {:?}; Events: {events:#?}",
        FAILOVER_LIMIT.as_secs(),
        names::lease(CLUSTER),
        last_status.and_then(|s| s.phase),
        last_status.map(|s| s
            .conditions
            .iter()
            .map(|c| format!("{}={}: {}", c.type_, c.status, c.message))
            .collect::<Vec<_>>())
    )
}

/// How long a round may take from the fault to a failover or a refusal: the election Lease,
/// then the database Lease on the new leader's clock, with room for a loaded machine.
pub(super) const FAILOVER_LIMIT: Duration = Duration::from_secs(75);

/// One round: kills `primary`'s processes and the leading operator `old_leader` (as `kind`
/// says), waits for `new_leader` to lead and for the failover or its refusal, keeping the
/// killed pod down meanwhile, then for Healthy 3/3 with one primary.
#[allow(clippy::too_many_arguments)]
pub(super) async fn round(
    bed: &TestBed,
    client: &kube::Client,
    ns: &str,
    operators: &mut Evidence<'_>,
    writer: &WriteLoad,
    ips: &BTreeMap<String, String>,
    primary: &str,
    (old_leader, new_leader, new_port): (&str, &str, u16),
    kind: LeaderKill,
) -> Round {
    let processes = pod_processes(ns, primary);
    assert!(
        processes.len() >= 5,
        "the agent, its watchdog, the postmaster and its children of {primary}: {processes:?}"
    );
    assert_eq!(
        metric(new_port, "pgrs_operator_reconciles_total")
            .await
            .expect("standby metrics"),
        0.0,
        "the standby operator {new_leader} must not reconcile while {old_leader} leads"
    );
    let old_key = old_leader.trim_start_matches("operator-").to_string();
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let fault = Instant::now();
    let mut leader_killed = None;
    if kind == LeaderKill::SameInstant {
        operators.operator(&old_key).kill();
        leader_killed = Some(fault.elapsed());
    }
    let killed = hard_kill(ns, primary);
    eprintln!(
        "sync leader loss, {kind:?}: SIGKILLed {killed} processes of {primary}{}",
        if kind == LeaderKill::SameInstant {
            format!(
                " and {old_leader} within {} µs",
                fault.elapsed().as_micros()
            )
        } else {
            String::new()
        }
    );

    // Watch: the election, the failover (or its refusal); keep the killed pod down meanwhile.
    let mut took_over = None;
    let mut detected = None;
    let mut kills = 1;
    let mut last_status: Option<pgrs::api::PgReplicaSetStatus> = None;
    let outcome = loop {
        if fault.elapsed() > FAILOVER_LIMIT {
            panic!("{}", no_failover(bed, ns, last_status.as_ref()));
        }
        if leader_killed.is_some()
            && took_over.is_none()
            && operator_leader(client, ns).await.as_deref() == Ok(new_leader)
        {
            took_over = Some(fault.elapsed());
        }
        let status = cluster_status(client, ns, CLUSTER)
            .await
            .unwrap_or_default();
        if detected.is_none() && status.phase.is_some() && status.phase != Some(Phase::Healthy) {
            detected = Some(fault.elapsed());
        }
        // Mid-failover: the leader has noticed the primary's loss (it waits for the Lease to
        // expire, or already fails over); it dies then.
        let noticed = matches!(
            status.phase,
            Some(Phase::PrimaryUnavailable | Phase::FailingOver | Phase::FailoverBlocked)
        );
        if leader_killed.is_none() && noticed {
            operators.operator(&old_key).kill();
            leader_killed = Some(fault.elapsed());
            eprintln!(
                "sync leader loss, {kind:?}: SIGKILLed {old_leader} {} ms after the primary, its status phase {:?}: {:?}",
                fault.elapsed().as_millis(),
                status.phase,
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == condition::READY)
                    .map(|c| c.message.clone())
            );
        }
        if let Some(current) = &status.current_primary
            && current != primary
        {
            break Outcome::FailedOver {
                to: current.clone(),
            };
        }
        if status.phase == Some(Phase::FailoverBlocked) {
            let message = status
                .conditions
                .iter()
                .find(|c| c.type_ == condition::FAILOVER_BLOCKED && c.status == "True")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            let events = event_lines(bed, ns);
            let event = events
                .lines()
                .find(|l| l.starts_with("FailoverRefused:"))
                .unwrap_or_default()
                .to_string();
            break Outcome::Refused { message, event };
        }
        let chosen = status
            .last_failover
            .as_ref()
            .is_some_and(|r| r.from.as_deref() == Some(primary) && r.to != primary);
        if !chosen && hard_kill(ns, primary) > 0 {
            kills += 1;
        }
        last_status = Some(status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let decided = fault.elapsed();
    let leader_killed = leader_killed.expect("the leader was killed before the failover");
    let took_over = took_over.or_else(|| Some(fault.elapsed()));
    assert_eq!(
        operator_leader(client, ns).await.as_deref(),
        Ok(new_leader),
        "the standby operator leads"
    );
    assert_eq!(
        metric(new_port, "pgrs_operator_leader")
            .await
            .expect("metrics"),
        1.0
    );

    let (final_primary, switched) = match &outcome {
        Outcome::FailedOver { to } => {
            eprintln!(
                "sync leader loss, {kind:?}: {new_leader} led after {} ms, failed over {primary} -> {to} after {} ms",
                took_over.unwrap_or_default().as_millis(),
                decided.as_millis()
            );
            let switched = wait_service_selects_only(
                client,
                ns,
                &format!("{CLUSTER}-rw"),
                &ips[to],
                "-rw moves to the new primary",
                Duration::from_secs(30),
                fault,
            )
            .await;
            (to.clone(), Some(switched))
        }
        Outcome::Refused { message, event } => {
            // Refusing is allowed, silently refusing is not.
            eprintln!(
                "sync leader loss, {kind:?}: failover refused after {} ms: condition {message:?}, event {event:?}",
                decided.as_millis()
            );
            assert!(
                !message.is_empty(),
                "FailoverBlocked without a FailoverBlocked condition saying why"
            );
            assert!(
                event.contains("refused"),
                "FailoverBlocked without a FailoverRefused Event: {}",
                event_lines(bed, ns)
            );
            // The way out the refusal names: the old primary comes back (no more kills).
            (primary.to_string(), None)
        }
    };

    // The killed pod restarts; the cluster is Healthy again with one primary and it a replica
    // (or, after a refusal, it the primary again).
    let status = eventually(
        "Healthy again, 3/3 ready",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(client, ns, CLUSTER).await?;
            let old = listed_instance(&status, primary)?;
            let wanted_role = if final_primary == primary {
                InstanceRole::Primary
            } else {
                InstanceRole::Replica
            };
            let primaries = status
                .instances
                .iter()
                .filter(|i| i.role == InstanceRole::Primary)
                .count();
            match (&status.phase, status.ready.as_deref(), old.role) {
                (Some(Phase::Healthy), Some("3/3"), role)
                    if role == wanted_role
                        && primaries == 1
                        && status.current_primary.as_deref() == Some(final_primary.as_str()) =>
                {
                    Ok(status.clone())
                }
                _ => Err(format!(
                    "{:?} {:?} {:?}: {:?}",
                    status.phase, status.ready, status.current_primary, status.instances
                )),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let healthy_again = fault.elapsed();
    writer.wait_writes_resume_on(&ips[&final_primary]).await;
    let acked = writer.acked().await;
    let first_write = acked
        .iter()
        .filter(|(_, host, at)| *host == ips[&final_primary] && *at > fault)
        .map(|(_, _, at)| at.duration_since(fault))
        .min();
    let instants: Vec<Instant> = acked.iter().map(|(_, _, at)| *at).collect();
    Round {
        kind,
        old_primary: primary.to_string(),
        old_leader: old_leader.to_string(),
        new_leader: new_leader.to_string(),
        final_primary,
        outcome,
        leader_killed,
        took_over,
        detected,
        decided,
        writable: None,
        switched,
        first_write,
        unavailable: longest_gap(&instants, fault),
        healthy_again,
        kills,
        record: status.last_failover.clone(),
        fault,
        fault_wall,
    }
}
