//! Tests of the write checker (`check.rs`): hand-built histories, then properties over
//! generated clean histories with and without one injected late write on an old primary.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use super::check::*;

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn record(id: i64, node: &str, at_ms: u64, outcome: WriteOutcome) -> WriteRecord {
    WriteRecord {
        id,
        node: node.to_string(),
        sent: ms(at_ms.saturating_sub(1)),
        answered: ms(at_ms),
        outcome,
    }
}

fn ack(id: i64, node: &str, at_ms: u64) -> WriteRecord {
    record(id, node, at_ms, WriteOutcome::Acknowledged)
}

fn refused(id: i64, node: &str, at_ms: u64) -> WriteRecord {
    record(id, node, at_ms, WriteOutcome::Refused)
}

fn unknown(id: i64, node: &str, at_ms: u64) -> WriteRecord {
    record(id, node, at_ms, WriteOutcome::Indeterminate)
}

/// The final state holding every acknowledged id of `writes` but `except`.
fn holding_acks(primary: &str, writes: &[WriteRecord], except: &[i64]) -> FinalState {
    FinalState {
        primary: primary.to_string(),
        ids: writes
            .iter()
            .filter(|w| w.outcome == WriteOutcome::Acknowledged && !except.contains(&w.id))
            .map(|w| w.id)
            .collect(),
    }
}

fn promotion(node: &str, at_ms: u64) -> Promotion {
    Promotion {
        node: node.to_string(),
        at: ms(at_ms),
    }
}

fn nodes(report: &CheckReport) -> Vec<&str> {
    report.succession.iter().map(|t| t.node.as_str()).collect()
}

fn split_ids(report: &CheckReport) -> Vec<i64> {
    report.split_brain.iter().map(|w| w.id).collect()
}

#[test]
fn no_faults_is_clean() {
    let writes: Vec<_> = (0..10).map(|i| ack(i, "a", 10 * i as u64)).collect();
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a"]);
    assert_eq!(report.succession[0].acknowledged, 10);
    assert_eq!(report.acknowledged, 10);
    assert!(report.lost.is_empty());
    assert_eq!(report.first_ack, Some(ms(0)));
    assert_eq!(report.last_ack, Some(ms(90)));
    assert_eq!(
        report.longest_gap,
        Some(Gap {
            from: ms(0),
            to: ms(10)
        }),
        "the earliest of equally long gaps"
    );
}

#[test]
fn clean_failover_with_a_refused_old_primary() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "a", 100),
        unknown(3, "a", 110),
        ack(4, "b", 2000),
        refused(5, "a", 2500),
        ack(6, "b", 2600),
    ];
    let report = check(&writes, &holding_acks("b", &writes, &[]), &[]);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a", "b"]);
    assert_eq!(
        (report.refused, report.indeterminate, report.writes),
        (1, 1, 6)
    );
    let gap = report.longest_gap.expect("a gap");
    assert_eq!(
        (gap.from, gap.to, gap.length()),
        (ms(100), ms(2000), ms(1900))
    );
}

#[test]
fn a_late_write_on_the_old_primary_is_split_brain() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "a", 100),
        ack(3, "b", 1000),
        ack(4, "a", 1010),
        ack(5, "b", 1020),
        refused(6, "a", 1030),
    ];
    // The old primary's late write was rewound away.
    let report = check(&writes, &holding_acks("b", &writes, &[4]), &[]);
    assert_eq!(nodes(&report), ["a", "b"]);
    assert_eq!(
        report.split_brain,
        vec![SplitBrainWrite {
            id: 4,
            node: "a".to_string(),
            acknowledged: ms(1010),
            superseded_by: "b".to_string(),
            superseded_at: ms(1000),
            on_final_primary: false,
        }]
    );
    assert_eq!(report.lost, [4]);
    assert_eq!(report.violations(false).len(), 1, "split brain in any mode");
    assert_eq!(report.violations(true).len(), 2);
}

#[test]
fn an_acknowledgement_at_the_new_primary_s_first_instant_is_not_late() {
    let writes = vec![ack(1, "a", 0), ack(2, "b", 1000), ack(3, "a", 1000)];
    let report = check(&writes, &holding_acks("b", &writes, &[]), &[]);
    assert!(report.split_brain.is_empty(), "{report:?}");
}

#[test]
fn lost_writes_count_in_async_and_fail_sync() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "a", 10),
        ack(3, "a", 20),
        ack(4, "b", 9000),
        refused(5, "a", 9500),
    ];
    let report = check(&writes, &holding_acks("b", &writes, &[3, 2]), &[]);
    assert_eq!(report.lost, [2, 3]);
    assert!(report.split_brain.is_empty());
    assert!(report.violations(false).is_empty(), "async: reported only");
    assert_eq!(report.violations(true).len(), 1);
    assert!(report.to_markdown().contains("| 2 of 4 |"));
}

#[test]
fn two_failovers_are_clean() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "a", 10),
        ack(3, "b", 8000),
        refused(4, "a", 8100),
        ack(5, "b", 8200),
        unknown(6, "b", 8300),
        ack(7, "c", 17000),
        refused(8, "b", 17050),
        ack(9, "c", 17100),
    ];
    let report = check(&writes, &holding_acks("c", &writes, &[]), &[]);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a", "b", "c"]);
    assert_eq!(
        report.longest_gap.map(|g| (g.from, g.to)),
        Some((ms(8200), ms(17000)))
    );
}

#[test]
fn failback_is_clean_when_the_old_primary_refused_in_between() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "b", 1000),
        refused(3, "a", 1500),
        ack(4, "b", 1600),
        refused(5, "b", 3000),
        ack(6, "a", 3100),
    ];
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a", "b", "a"]);
}

#[test]
fn failback_needs_refusals_or_promotions() {
    // Only acknowledgements (a write endpoint): a's two stretches are one term, the second
    // looks late. The documented limit.
    let writes = vec![ack(1, "a", 0), ack(2, "b", 1000), ack(3, "a", 3100)];
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert_eq!(split_ids(&report), [3]);
    // With the promotions the second stretch is a term of its own.
    let promotions = [promotion("b", 900), promotion("a", 3000)];
    let report = check(&writes, &holding_acks("a", &writes, &[]), &promotions);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a", "b", "a"]);
    assert!(report.succession[1].promoted && !report.succession[0].promoted);
    assert_eq!(report.succession[1].start, ms(900));
}

#[test]
fn writes_refused_by_replicas_are_clean() {
    let mut writes = Vec::new();
    for i in 0..20_i64 {
        let at = 10 * i as u64;
        writes.push(ack(3 * i, "a", at));
        writes.push(refused(3 * i + 1, "b", at + 1));
        writes.push(refused(3 * i + 2, "c", at + 2));
    }
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert!(report.violations(true).is_empty(), "{report:?}");
    assert_eq!(nodes(&report), ["a"]);
    assert_eq!((report.acknowledged, report.refused), (20, 40));
}

#[test]
fn a_refused_write_present_on_the_final_primary_is_a_violation() {
    let writes = vec![ack(1, "a", 0), refused(2, "b", 5)];
    let mut final_state = holding_acks("a", &writes, &[]);
    final_state.ids.insert(2);
    let report = check(&writes, &final_state, &[]);
    assert_eq!(report.refused_present, [2]);
    assert_eq!(report.violations(false).len(), 1);
}

#[test]
fn indeterminate_writes_are_counted_and_do_not_end_a_term() {
    let writes = vec![
        ack(1, "a", 0),
        unknown(2, "a", 500),
        ack(3, "b", 1000),
        ack(4, "a", 1200),
        unknown(5, "b", 1300),
    ];
    let mut final_state = holding_acks("b", &writes, &[4]);
    final_state.ids.insert(2);
    let report = check(&writes, &final_state, &[]);
    assert_eq!(
        split_ids(&report),
        [4],
        "the timeout proves nothing about a"
    );
    assert_eq!((report.indeterminate, report.indeterminate_present), (2, 1));
}

#[test]
fn overlapping_acknowledgement_windows_order_by_acknowledgement() {
    // a's long commit was sent before b's first write but acknowledged after it.
    let slow = WriteRecord {
        id: 3,
        node: "a".to_string(),
        sent: ms(900),
        answered: ms(1005),
        outcome: WriteOutcome::Acknowledged,
    };
    // a's other write overlaps b's first one in flight but was acknowledged before it.
    let early = WriteRecord {
        id: 4,
        node: "a".to_string(),
        sent: ms(960),
        answered: ms(990),
        outcome: WriteOutcome::Acknowledged,
    };
    let first_on_b = WriteRecord {
        id: 2,
        node: "b".to_string(),
        sent: ms(950),
        answered: ms(1000),
        outcome: WriteOutcome::Acknowledged,
    };
    let writes = vec![ack(1, "a", 0), slow, early, first_on_b, ack(5, "b", 1100)];
    let report = check(&writes, &holding_acks("b", &writes, &[]), &[]);
    assert_eq!(split_ids(&report), [3]);
    assert!(report.split_brain[0].on_final_primary);
    assert_eq!(
        report.longest_gap.map(|g| g.length()),
        Some(ms(990)),
        "acknowledgement instants, not send instants"
    );
}

#[test]
fn a_known_promotion_supersedes_before_the_new_primary_acknowledges() {
    let writes = vec![ack(1, "a", 0), ack(2, "a", 1100), ack(3, "b", 1200)];
    let report = check(&writes, &holding_acks("b", &writes, &[]), &[]);
    assert!(report.split_brain.is_empty(), "before b's first ack");
    let report = check(
        &writes,
        &holding_acks("b", &writes, &[]),
        &[promotion("b", 1000)],
    );
    assert_eq!(split_ids(&report), [2]);
    assert_eq!(report.split_brain[0].superseded_at, ms(1000));
}

#[test]
fn a_promotion_recorded_late_still_counts_from_the_first_ack() {
    let writes = vec![ack(1, "a", 0), ack(2, "b", 1000), ack(3, "a", 1200)];
    let report = check(
        &writes,
        &holding_acks("b", &writes, &[]),
        &[promotion("b", 1500)],
    );
    assert_eq!(split_ids(&report), [3]);
    assert_eq!(report.split_brain[0].superseded_at, ms(1000));
    assert_eq!(nodes(&report), ["a", "b", "b"]);
}

#[test]
fn duplicate_ids_invalidate_the_history() {
    let writes = vec![ack(1, "a", 0), ack(1, "a", 10), ack(2, "a", 20)];
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert_eq!(report.duplicate_ids, [1]);
    assert_eq!(report.violations(false).len(), 1);
    assert!(report.to_markdown().contains("Ids used more than once: 1."));
}

#[test]
fn empty_and_single_write_histories() {
    let report = check(&[], &FinalState::default(), &[]);
    assert!(report.violations(true).is_empty());
    assert_eq!((report.longest_gap, report.first_ack), (None, None));
    assert!(report.succession.is_empty());
    let writes = [ack(1, "a", 5)];
    let report = check(&writes, &holding_acks("a", &writes, &[]), &[]);
    assert_eq!(report.longest_gap, None);
    assert_eq!(report.first_ack, Some(ms(5)));
}

#[test]
fn markdown_names_every_figure() {
    let writes = vec![
        ack(1, "a", 0),
        ack(2, "b", 1000),
        ack(3, "a", 1010),
        refused(4, "a", 1020),
    ];
    let text = check(&writes, &holding_acks("b", &writes, &[3]), &[]).to_markdown();
    for expected in [
        "### Write check",
        "Final primary `b`; 4 writes sent: 3 acknowledged, 1 refused, 0 indeterminate.",
        "| (a) writes acknowledged by a superseded primary (split brain) | 1 | 0 |",
        "| (b) acknowledged writes missing from the final primary | 1 of 3 | 0 in sync mode |",
        "| (c) longest window without an acknowledged write | 1000 ms (from 0.000 s to 1.000 s) | — |",
        "| `a` | 0.000 s | first ack | 0.000 s | 1.010 s | 2 |",
        "| 3 | `a` | 1.010 s | `b` | 1.000 s | no |",
        "Lost acknowledged ids: 3.",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let many: Vec<_> = (0..30).map(|i| ack(i, "a", i as u64)).collect();
    let text = check(&many, &FinalState::default(), &[]).to_markdown();
    assert!(text.contains("19, … (10 more)."), "{text}");
}

/// One term of a generated history: who (as a step from the previous primary), how many
/// writes it acknowledged, the step between them, the gap before the next term, and bits
/// that place replica refusals and indeterminate writes.
#[derive(Debug, Clone)]
struct GenTerm {
    step: usize,
    acks: u64,
    every_ms: u64,
    gap_ms: u64,
    noise: u64,
}

fn arb_terms() -> impl Strategy<Value = Vec<GenTerm>> {
    prop::collection::vec(
        (0usize..2, 1u64..15, 1u64..40, 2u64..3000, any::<u64>()).prop_map(
            |(step, acks, every_ms, gap_ms, noise)| GenTerm {
                step,
                acks,
                every_ms,
                gap_ms,
                noise,
            },
        ),
        1..7,
    )
}

const NODES: [&str; 3] = ["n0", "n1", "n2"];

/// A clean history: one primary at a time, replicas refusing, the old primary refusing (and
/// one write of it indeterminate) before the next term. Returns the writes, the promotions
/// (one per term after the first, between the previous primary's last write and the new
/// one's first ack), the primaries in order and each term's first and last ack.
struct Generated {
    writes: Vec<WriteRecord>,
    promotions: Vec<Promotion>,
    primaries: Vec<&'static str>,
    spans: Vec<(Duration, Duration)>,
}

fn generate(terms: &[GenTerm]) -> Generated {
    let mut generated = Generated {
        writes: Vec::new(),
        promotions: Vec::new(),
        primaries: Vec::new(),
        spans: Vec::new(),
    };
    let mut id = 0_i64;
    let mut next_id = || {
        id += 1;
        id
    };
    let mut now = ms(0);
    let mut primary = 0_usize;
    for (index, term) in terms.iter().enumerate() {
        if index > 0 {
            primary = (primary + 1 + term.step) % NODES.len();
            // Promoted somewhere in the gap, at the latest at the first ack.
            let gap_us = terms[index - 1].gap_ms * 1000;
            let before = Duration::from_micros(term.noise % (gap_us - 1000));
            generated.promotions.push(Promotion {
                node: NODES[primary].to_string(),
                at: now.saturating_sub(before),
            });
        }
        let node = NODES[primary];
        generated.primaries.push(node);
        let first = now;
        for k in 0..term.acks {
            let at = now;
            generated.writes.push(WriteRecord {
                id: next_id(),
                node: node.to_string(),
                sent: at.saturating_sub(Duration::from_micros(300)),
                answered: at,
                outcome: WriteOutcome::Acknowledged,
            });
            // The replicas' writers are refused now and then.
            for (offset, replica) in NODES.iter().enumerate() {
                if *replica != node && (term.noise >> (k + offset as u64)) & 1 == 1 {
                    generated.writes.push(WriteRecord {
                        id: next_id(),
                        node: replica.to_string(),
                        sent: at,
                        answered: at + Duration::from_micros(100 * offset as u64 + 100),
                        outcome: WriteOutcome::Refused,
                    });
                }
            }
            if k + 1 < term.acks {
                now += ms(term.every_ms);
            }
        }
        generated.spans.push((first, now));
        // The old primary's last write is in flight when it fails, then it refuses.
        generated.writes.push(WriteRecord {
            id: next_id(),
            node: node.to_string(),
            sent: now + Duration::from_micros(200),
            answered: now + Duration::from_micros(400),
            outcome: WriteOutcome::Indeterminate,
        });
        generated.writes.push(WriteRecord {
            id: next_id(),
            node: node.to_string(),
            sent: now + Duration::from_micros(500),
            answered: now + Duration::from_micros(600),
            outcome: WriteOutcome::Refused,
        });
        now += ms(term.gap_ms);
    }
    generated
}

/// Present on the final primary: every acknowledged write, and indeterminate ones by parity.
fn final_of(writes: &[WriteRecord], primary: &str) -> FinalState {
    let ids: BTreeSet<i64> = writes
        .iter()
        .filter(|w| match w.outcome {
            WriteOutcome::Acknowledged => true,
            WriteOutcome::Indeterminate => w.id % 2 == 0,
            WriteOutcome::Refused => false,
        })
        .map(|w| w.id)
        .collect();
    FinalState {
        primary: primary.to_string(),
        ids,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn clean_histories_give_clean_reports(terms in arb_terms(), with_promotions in any::<bool>()) {
        let generated = generate(&terms);
        let last = generated.primaries.last().copied().unwrap_or("n0");
        let promotions = if with_promotions { generated.promotions.clone() } else { Vec::new() };
        let report = check(&generated.writes, &final_of(&generated.writes, last), &promotions);
        prop_assert!(report.violations(true).is_empty(), "{:?}", report.violations(true));
        prop_assert!(report.lost.is_empty());
        prop_assert_eq!(nodes(&report), generated.primaries.clone());
        let mut acks: Vec<Duration> =
            generated.writes.iter().filter_map(WriteRecord::acknowledged_at).collect();
        acks.sort();
        let widest = acks.windows(2).map(|p| p[1] - p[0]).max();
        prop_assert_eq!(report.longest_gap.map(|g| g.length()), widest);
        prop_assert_eq!(report.acknowledged, acks.len());
    }

    #[test]
    fn one_late_write_on_an_old_primary_is_found(
        terms in arb_terms().prop_filter("a failover", |t| t.len() >= 2),
        pick in any::<prop::sample::Index>(),
        offset_us in 1u64..1000,
        with_promotions in any::<bool>(),
    ) {
        let mut generated = generate(&terms);
        // Term `i` (not the first) gets a late write from the previous primary, which did not
        // refuse in between (it never noticed it was superseded) and is fenced right after.
        let i = 1 + pick.index(terms.len() - 1);
        let old = generated.primaries[i - 1];
        let old_last = generated.spans[i - 1].1;
        let late_at = generated.spans[i].0 + Duration::from_micros(offset_us);
        generated.writes.retain(|w| {
            !(w.node == old
                && w.outcome == WriteOutcome::Refused
                && w.answered > old_last
                && w.answered <= late_at)
        });
        let late_id = 1_000_000;
        generated.writes.push(WriteRecord {
            id: late_id,
            node: old.to_string(),
            sent: late_at.saturating_sub(Duration::from_micros(1)),
            answered: late_at,
            outcome: WriteOutcome::Acknowledged,
        });
        generated.writes.push(WriteRecord {
            id: late_id + 1,
            node: old.to_string(),
            sent: late_at,
            answered: late_at + Duration::from_micros(1),
            outcome: WriteOutcome::Refused,
        });
        let last = generated.primaries.last().copied().unwrap_or("n0");
        let mut final_state = final_of(&generated.writes, last);
        final_state.ids.remove(&late_id);
        let promotions = if with_promotions { generated.promotions.clone() } else { Vec::new() };
        let report = check(&generated.writes, &final_state, &promotions);
        prop_assert_eq!(split_ids(&report), vec![late_id]);
        prop_assert_eq!(report.split_brain[0].superseded_by.as_str(), generated.primaries[i]);
        prop_assert_eq!(report.lost.clone(), vec![late_id]);
        prop_assert_eq!(report.violations(false).len(), 1);
    }
}
