//! One engine round (`engine::decide`) for 3 and 16 instances: a steady cluster (nothing to do
//! but check), a synchronous one (quorum bookkeeping), and a failover (the primary gone, its
//! lease expired: candidate choice over every replica). Issue 17's "engine round" figure:
//! `cargo bench --bench engine_round`; results in docs/scale.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pgrs::engine::{
    EngineInput, EngineSpec, InstanceObservation, LeaseView, Lsn, Memory, MonoTime, ObservedRole,
    ReplicationMode, SyncState, decide,
};

const NOW_MS: u64 = 100_000;

fn instance(i: usize, primary: bool, reachable: bool) -> InstanceObservation {
    let at = Some(MonoTime::from_millis(NOW_MS - 200));
    InstanceObservation {
        name: format!("pg-{i}"),
        reachable,
        postgres_up: reachable,
        role: if primary {
            ObservedRole::Primary
        } else {
            ObservedRole::Replica
        },
        timeline: Some(1),
        received_lsn: (!primary).then_some(Lsn(10_000 - i as u64)),
        replayed_lsn: (!primary).then_some(Lsn(10_000 - i as u64)),
        flush_lsn: primary.then_some(Lsn(10_000)),
        sync_state: (!primary).then_some(SyncState::Async),
        upstream: (!primary).then(|| "pg-0".to_string()),
        applied_sync: None,
        last_report_at: reachable.then_some(at).flatten(),
        former_primary: false,
        last_seen_serving_at: primary.then_some(at).flatten(),
    }
}

fn input(n: usize, mode: ReplicationMode, failover: bool) -> EngineInput {
    let lease_duration = Duration::from_secs(8);
    EngineInput {
        now: MonoTime::from_millis(NOW_MS),
        instances: (0..n)
            .map(|i| instance(i, i == 0, !(failover && i == 0)))
            .collect(),
        lease: LeaseView {
            holder: Some("pg-0".to_string()),
            version: "42".to_string(),
            // A failover: unchanged for longer than a lease duration.
            unchanged_since: MonoTime::from_millis(if failover {
                NOW_MS - 9_000
            } else {
                NOW_MS - 500
            }),
            duration: lease_duration,
        },
        spec: EngineSpec {
            mode,
            sync_replicas: 1,
            lease_duration,
            ..EngineSpec::default()
        },
        memory: Memory::default(),
    }
}

fn rounds(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_round");
    for n in [3usize, 16] {
        for (case, mode, failover) in [
            ("steady_async", ReplicationMode::Async, false),
            ("steady_sync", ReplicationMode::Sync, false),
            ("failover", ReplicationMode::Async, true),
        ] {
            let input = input(n, mode, failover);
            // The rounds measured do what they say: a failover takes the lease over, a
            // steady cluster keeps pg-0 as its primary.
            let decision = decide(&input);
            if failover {
                assert!(!decision.actions.is_empty(), "{case}/{n}: no action");
            } else {
                assert_eq!(
                    decision.status.primary.as_deref(),
                    Some("pg-0"),
                    "{case}/{n}"
                );
            }
            group.bench_with_input(BenchmarkId::new(case, n), &input, |b, input| {
                b.iter(|| decide(black_box(input)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, rounds);
criterion_main!(benches);
