//! Property tests of `decide`, checked against the oracles of `oracle.rs` (the rules restated
//! from first principles), with coverage goals: each property counts how many generated cases
//! reached each interesting assertion and fails when one was reached too rarely.
//! `cargo test --lib engine -- --nocapture` prints the shares.

use proptest::prelude::*;

use super::super::*;
use super::generators::*;
use super::oracle::*;

const CASES: u32 = 4000;

/// Never two holders and never a second writable primary: at most one lease write and one
/// promotion per round, never both; a promotion only of the holder, only while no other fresh
/// instance reports itself a writable primary; every such other primary is fenced, the holder
/// never; and the lease goes to exactly whom the rules name (or nobody).
#[test]
fn never_two_holders_or_writable_primaries() {
    let coverage = Coverage::new(
        "never_two_holders_or_writable_primaries",
        &[
            ("promotion of the holder", 0.02),
            ("promotion withheld for a rogue primary", 0.01),
            ("rogue fenced", 0.10),
            ("lease acquired", 0.05),
            ("lone primary adopted", 0.01),
            ("several lease-less primaries fenced", 0.01),
            ("a former primary among the instances", 0.20),
        ],
    );
    run(CASES, arb_world(), &coverage, |input| {
        let decision = decide(&input);
        let acquires = acquired(&decision);
        let promotes = promoted(&decision);
        let fences = fenced(&decision);
        let rogue_names: Vec<&str> = rogues(&input).iter().map(|i| i.name.as_str()).collect();
        if input.instances.iter().any(|i| i.former_primary) {
            coverage.hit("a former primary among the instances");
        }
        prop_assert!(acquires.len() <= 1, "{:?}", decision.actions);
        prop_assert!(promotes.len() <= 1, "{:?}", decision.actions);
        prop_assert!(acquires.is_empty() || promotes.is_empty());
        let holder = input.lease.holder.as_deref();
        if let Some(instance) = promotes.first() {
            coverage.hit("promotion of the holder");
            prop_assert_eq!(Some(*instance), holder);
            prop_assert!(rogue_names.is_empty(), "promoted beside {:?}", rogue_names);
        }
        let holder_is_promotable = holder
            .and_then(|h| input.instances.iter().find(|i| i.name == h))
            .is_some_and(|h| fresh(&input, h) && h.role == ObservedRole::Replica && h.postgres_up);
        if holder_is_promotable && !rogue_names.is_empty() {
            coverage.hit("promotion withheld for a rogue primary");
        }
        if let Some(holder) = holder {
            prop_assert!(!fences.contains(holder), "the holder is fenced");
            for rogue in &rogue_names {
                coverage.hit("rogue fenced");
                prop_assert!(fences.contains(rogue), "{} not fenced", rogue);
            }
        } else if rogue_names.len() > 1 {
            coverage.hit("several lease-less primaries fenced");
            for rogue in &rogue_names {
                prop_assert!(fences.contains(rogue), "{} not fenced", rogue);
            }
        }
        // Nothing but a fresh writable primary is ever fenced.
        for name in &fences {
            prop_assert!(rogue_names.contains(name), "{} fenced", name);
        }
        let expected = expected_acquire(&input);
        prop_assert_eq!(acquires.first().copied(), expected.as_deref());
        if let Some(chosen) = expected {
            coverage.hit("lease acquired");
            if holder.is_none() && rogue_names == [chosen.as_str()] {
                coverage.hit("lone primary adopted");
                prop_assert!(!fences.contains(chosen.as_str()));
            }
        }
        Ok(())
    });
}

/// A held lease is taken over only once it has been unchanged for the longer of the spec's and
/// the record's durations on the observer's clock, always with the observed version as
/// precondition; and at that point it is taken over whenever the rules name a candidate.
#[test]
fn a_held_lease_is_taken_over_only_after_the_effective_duration() {
    let coverage = Coverage::new(
        "a_held_lease_is_taken_over_only_after_the_effective_duration",
        &[
            ("held lease taken over", 0.05),
            ("held lease kept between the two durations", 0.05),
            ("record longer than spec", 0.25),
            ("spec longer than record", 0.15),
            ("taken over within 1.5 s of expiry", 0.02),
        ],
    );
    let worlds = prop_oneof![arb_world(), arb_failover_world()];
    run(CASES, worlds, &coverage, |input| {
        let decision = decide(&input);
        let spec = input.spec.lease_duration.as_millis() as u64;
        let record = input.lease.duration.as_millis() as u64;
        if record > spec {
            coverage.hit("record longer than spec");
        }
        if spec > record {
            coverage.hit("spec longer than record");
        }
        let age = age_ms(input.now, input.lease.unchanged_since);
        let shorter = spec.min(record);
        let longer = spec.max(record);
        for action in &decision.actions {
            let Action::AcquireLease {
                holder,
                expected_version,
            } = action
            else {
                continue;
            };
            prop_assert_eq!(expected_version, &input.lease.version);
            if let Some(old) = &input.lease.holder {
                coverage.hit("held lease taken over");
                prop_assert_ne!(old, holder);
                prop_assert!(
                    age >= longer,
                    "taken over after {} ms of {} ms",
                    age,
                    longer
                );
                if age < longer + 1500 {
                    coverage.hit("taken over within 1.5 s of expiry");
                }
            }
        }
        if input.lease.holder.is_some() && age >= shorter && age < longer {
            coverage.hit("held lease kept between the two durations");
            prop_assert!(acquired(&decision).is_empty());
        }
        let expected = expected_acquire(&input);
        prop_assert_eq!(acquired(&decision).first().copied(), expected.as_deref());
        Ok(())
    });
}

/// A failover promotes exactly the candidate the documented rules name: eligible (fresh,
/// running replica, known position, priority > 0, not a former primary, not the failed one), on
/// the newest timeline, holding every acknowledged commit the recorded quorum proves, within
/// the lag limit; best by received, replayed, priority, name; `allowDataLoss` overrides a
/// refusal and says so.
#[test]
fn a_failover_promotes_exactly_the_best_candidate() {
    let coverage = Coverage::new(
        "a_failover_promotes_exactly_the_best_candidate",
        &[
            ("two or more comparable candidates", 0.20),
            ("tie on received broken by replay", 0.02),
            (
                "tie on received and replay broken by priority or name",
                0.015,
            ),
            ("a former primary would have won", 0.02),
            ("a replica on an older timeline would have won", 0.01),
            ("the failed instance is a running replica", 0.01),
            ("refused", 0.05),
            ("quorum rule decided", 0.05),
            ("lag limit decided", 0.03),
            ("override said so", 0.02),
            ("released lease: waiting for the last WAL", 0.01),
        ],
    );
    run(CASES, arb_failover_world(), &coverage, |input| {
        let decision = decide(&input);
        let failed = match &input.lease.holder {
            Some(h) => Some(h.clone()),
            None => input.memory.last_primary.as_ref().map(|p| p.name.clone()),
        };
        let candidates = candidates(&input, failed.as_deref());
        if candidates.len() >= 2 {
            coverage.hit("two or more comparable candidates");
        }
        let winner = best(&input, &candidates);
        if let Some(w) = winner {
            let same_received: Vec<_> = candidates
                .iter()
                .filter(|c| c.name != w.name && c.received_lsn == w.received_lsn)
                .collect();
            if same_received
                .iter()
                .any(|c| c.replayed_lsn != w.replayed_lsn)
            {
                coverage.hit("tie on received broken by replay");
            }
            if same_received
                .iter()
                .any(|c| c.replayed_lsn == w.replayed_lsn)
            {
                coverage.hit("tie on received and replay broken by priority or name");
            }
            let ahead = |i: &InstanceObservation| i.received_lsn > w.received_lsn;
            let others = || {
                input
                    .instances
                    .iter()
                    .filter(|i| Some(&i.name) != failed.as_ref())
            };
            if others().any(|i| i.former_primary && running_replica(&input, i) && ahead(i)) {
                coverage.hit("a former primary would have won");
            }
            if others().any(|i| {
                eligible(&input, i, failed.as_deref()) && i.timeline < w.timeline && ahead(i)
            }) {
                coverage.hit("a replica on an older timeline would have won");
            }
        }
        if let Some(f) = input
            .instances
            .iter()
            .find(|i| Some(&i.name) == failed.as_ref())
            && running_replica(&input, f)
        {
            coverage.hit("the failed instance is a running replica");
        }
        let expected = expected_acquire(&input);
        let got = acquired(&decision);
        prop_assert_eq!(
            got.first().copied(),
            expected.as_deref(),
            "{:?}",
            decision.status
        );
        let failover_due = match &input.lease.holder {
            Some(_) => expired(&input),
            None => true,
        } && input.spec.failover_enabled;
        if failover_due && winner.is_some() {
            let choice = expected_failover(&input, failed.as_deref());
            match quorum(&input, failed.as_deref(), true) {
                Quorum::Async if input.spec.max_failover_lag_bytes.is_some() => {
                    coverage.hit("lag limit decided")
                }
                Quorum::Async => {}
                _ => coverage.hit("quorum rule decided"),
            }
            match &choice {
                None => {
                    coverage.hit("refused");
                    prop_assert_eq!(decision.status.phase, Phase::FailoverBlocked);
                }
                Some((name, overridden)) if got.first() == Some(&name.as_str()) => {
                    let said = decision.events.iter().any(|e| {
                        e.severity == Severity::Critical && e.reason == EventReason::DataLossAllowed
                    });
                    prop_assert_eq!(said, *overridden);
                    if *overridden {
                        coverage.hit("override said so");
                    }
                }
                Some(_) => coverage.hit("released lease: waiting for the last WAL"),
            }
        }
        Ok(())
    });
}

/// Sync mode: with `ANY k (S)` recorded and an acknowledged commit at `ack` really on k members
/// of S, a promoted replica (without allowDataLoss) has it — whatever the observer can see,
/// however far ahead asynchronous non-members or former primaries are. And the lease goes to
/// exactly whom the quorum rule names.
#[test]
fn sync_mode_never_promotes_a_replica_missing_an_acknowledged_commit() {
    let coverage = Coverage::new(
        "sync_mode_never_promotes_a_replica_missing_an_acknowledged_commit",
        &[
            ("promoted a member", 0.10),
            ("promoted a non-member at least as far", 0.02),
            ("refused: too few members reporting", 0.10),
            ("refused: no candidate as far as the quorum", 0.02),
            (
                "a non-member or former primary ahead of the promoted one",
                0.01,
            ),
            ("k below the member count", 0.30),
        ],
    );
    let world = (
        2usize..=6,
        1u32..=3,
        100u64..1000,
        prop::collection::vec(0u64..1200, 7),
        prop::collection::vec(any::<bool>(), 7),
        prop::collection::vec(prop::bool::weighted(0.75), 7),
        prop::collection::vec(prop_oneof![1 => Just(0u32), 4 => Just(1), 2 => Just(2)], 7),
        prop::collection::vec(prop::bool::weighted(0.15), 7),
        prop::collection::vec(prop::bool::weighted(0.8), 7),
    );
    run(
        CASES,
        world,
        &coverage,
        |(n, k, ack, positions, has, visible, priorities, former, member)| {
            // r1..rn: members of S where `member` says so (at least one), the rest asynchronous.
            let names: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
            let mut members: Vec<String> = names
                .iter()
                .zip(&member)
                .filter(|(_, m)| **m)
                .map(|(name, _)| name.clone())
                .collect();
            if members.is_empty() {
                members.push(names[0].clone());
            }
            let k = k.min(members.len() as u32);
            if (k as usize) < members.len() {
                coverage.hit("k below the member count");
            }
            // Truth: k members hold `ack` (those `has` names, topped up in order).
            let mut holds: Vec<bool> = names
                .iter()
                .zip(&has)
                .map(|(name, h)| *h && members.contains(name))
                .collect();
            for (i, name) in names.iter().enumerate() {
                if holds.iter().filter(|h| **h).count() >= k as usize {
                    break;
                }
                if members.contains(name) {
                    holds[i] = true;
                }
            }
            let mut instances = vec![super::unreachable("p")];
            for (i, name) in names.iter().enumerate() {
                let received = if holds[i] {
                    ack.max(positions[i])
                } else if members.contains(name) {
                    positions[i].min(ack - 1)
                } else {
                    positions[i] // an asynchronous standby: anywhere
                };
                let mut r = super::replica(name, "p", received, received);
                r.former_primary = former[i];
                if !visible[i] {
                    r = super::unreachable(name);
                }
                instances.push(r);
            }
            let mut input = super::cluster(instances, Some("p"), 0);
            input.spec.mode = ReplicationMode::Sync;
            input.spec.priorities = names.iter().cloned().zip(priorities).collect();
            input.memory.recorded_sync = SyncSet {
                k,
                members: members.clone(),
            };
            let decision = decide(&input);
            let got = acquired(&decision);
            let expected = expected_acquire(&input);
            prop_assert_eq!(got.first().copied(), expected.as_deref());
            match got.first() {
                Some(chosen) => {
                    let chosen = input.instance(chosen).expect("chosen exists");
                    prop_assert!(
                        chosen.received_lsn >= Some(Lsn(ack)),
                        "{} at {:?} misses {}",
                        chosen.name,
                        chosen.received_lsn,
                        ack
                    );
                    if members.contains(&chosen.name) {
                        coverage.hit("promoted a member");
                    } else {
                        coverage.hit("promoted a non-member at least as far");
                    }
                    if input.instances.iter().any(|i| {
                        fresh(&input, i)
                            && i.received_lsn > chosen.received_lsn
                            && (i.former_primary || !members.contains(&i.name))
                    }) {
                        coverage.hit("a non-member or former primary ahead of the promoted one");
                    }
                }
                None => match quorum(&input, Some("p"), true) {
                    Quorum::Unreachable => coverage.hit("refused: too few members reporting"),
                    Quorum::Required(_) => {
                        coverage.hit("refused: no candidate as far as the quorum")
                    }
                    Quorum::Async => {}
                },
            }
            Ok(())
        },
    );
}
