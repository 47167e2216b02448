//! Unit tests of `pgrs local chaos`: the figures and the verdict, without a cluster.

use super::*;

#[test]
fn unavailability_is_the_widest_gap_between_acknowledged_writes() {
    let t0 = Instant::now();
    let at = |ms: u64, ok: bool| WriteRecord {
        id: ms as i64,
        started: t0 + Duration::from_millis(ms),
        finished: t0 + Duration::from_millis(ms),
        acknowledged: ok,
    };
    let records = vec![
        at(0, true),
        at(10, true),
        at(20, false),
        at(900, false),
        at(1500, true),
        at(1510, true),
    ];
    let window = unavailability(
        &records,
        t0 + Duration::from_millis(15),
        t0 + Duration::from_millis(2000),
    );
    assert_eq!(window, Some(Duration::from_millis(1490)));
    assert_eq!(
        percentile(
            &[
                Duration::from_millis(5),
                Duration::from_millis(1),
                Duration::from_millis(9)
            ],
            0.5
        ),
        Some(Duration::from_millis(5))
    );
}

fn write(id: i64, node: &str, at_ms: u64, outcome: WriteOutcome) -> crate::chaos::WriteRecord {
    crate::chaos::WriteRecord {
        id,
        node: node.to_string(),
        sent: Duration::from_millis(at_ms),
        answered: Duration::from_millis(at_ms + 1),
        outcome,
    }
}

#[test]
fn the_verdict_names_split_brain_writes_and_sync_losses_only() {
    use WriteOutcome::{Acknowledged, Refused};
    // node0 primary, node1 promoted at 100 ms, node0 still acknowledges at 150 ms.
    let writes = vec![
        write(1, "node0", 0, Acknowledged),
        write(2, "node1", 10, Refused),
        write(3, "node1", 120, Acknowledged),
        write(4, "node0", 150, Acknowledged),
    ];
    let final_state = FinalState {
        primary: "node1".to_string(),
        ids: [1, 3].into_iter().collect(),
    };
    let promotions = [Promotion {
        node: "node1".to_string(),
        at: Duration::from_millis(100),
    }];
    let report = check(&writes, &final_state, &promotions);
    let path = Path::new("r.md");
    let error = verdict(&report, false, path).expect_err("split brain");
    let text = error.to_string();
    assert!(text.contains("split brain"), "{text}");
    assert!(
        text.contains("asynchronous") && text.contains("r.md"),
        "{text}"
    );

    // A lost acknowledged write alone: a violation in sync mode only.
    let writes = vec![
        write(1, "node0", 0, Acknowledged),
        write(2, "node0", 10, Acknowledged),
    ];
    let final_state = FinalState {
        primary: "node1".to_string(),
        ids: [1].into_iter().collect(),
    };
    let report = check(&writes, &final_state, &[]);
    assert!(verdict(&report, false, path).is_ok());
    let text = verdict(&report, true, path)
        .expect_err("lost in sync mode")
        .to_string();
    assert!(text.contains("missing from the final primary"), "{text}");
}

#[test]
fn per_kind_counts_take_every_writer_by_sent_instant() {
    use writers::Via;
    let attempt = |via, id, at_ms| Attempt {
        via,
        write: write(id, "node0", at_ms, WriteOutcome::Acknowledged),
    };
    let attempts = vec![
        attempt(Via::Endpoint, 1, 5),
        attempt(Via::Direct, 2, 15),
        attempt(Via::Endpoint, 3, 25),
        attempt(Via::Direct, 4, 40),
    ];
    let ranges = [
        (
            FailureKind::HardKill,
            Duration::from_millis(0),
            Duration::from_millis(20),
        ),
        (
            FailureKind::Switchover,
            Duration::from_millis(20),
            Duration::from_millis(30),
        ),
    ];
    let mut results = BTreeMap::new();
    count_per_kind(&mut results, &ranges, &attempts, &[2].into_iter().collect());
    assert_eq!(results[&FailureKind::HardKill].acknowledged, 2);
    assert_eq!(results[&FailureKind::HardKill].lost, 1);
    assert_eq!(results[&FailureKind::Switchover].acknowledged, 1);
    assert_eq!(results[&FailureKind::Switchover].lost, 0);
}
