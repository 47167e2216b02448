//! A holder whose agent does not answer this observer but keeps renewing its lease (the
//! observer is cut from the agent only): it stays the primary of the status and the write
//! route; its lease expiry alone decides a takeover.

use super::*;

/// `a` reported itself serving at 90 s; the lease (held by `a`) changed since.
fn unobserved_holder(unchanged_since_s: u64) -> EngineInput {
    let mut a = unreachable("a");
    a.last_seen_serving_at = Some(MonoTime::from_millis(90 * SECOND));
    cluster(
        vec![
            a,
            replica("b", "a", 1000, 1000),
            replica("c", "a", 990, 980),
        ],
        Some("a"),
        unchanged_since_s,
    )
}

#[test]
fn a_holder_that_keeps_renewing_stays_the_primary_while_unobserved() {
    let decision = decide(&unobserved_holder(99));
    assert_eq!(decision.status.primary.as_deref(), Some("a"));
    assert_eq!(decision.status.phase, Phase::Degraded);
    assert!(
        decision.status.message.contains("keeps renewing"),
        "{}",
        decision.status.message
    );
    assert_eq!(acquired(&decision), None);
    assert_eq!(promoted(&decision), None);
}

#[test]
fn a_holder_whose_lease_stopped_changing_is_unavailable_then_replaced() {
    // Unchanged for longer than the staleness window (5 s): no longer known to renew.
    let waiting = decide(&unobserved_holder(93));
    assert_eq!(waiting.status.primary, None);
    assert_eq!(waiting.status.phase, Phase::PrimaryUnavailable);
    // Unchanged for a lease duration: expired, failed over as before.
    let expired = decide(&unobserved_holder(91));
    assert_eq!(acquired(&expired), Some("b"));
}

#[test]
fn a_lease_unchanged_since_the_last_report_proves_nothing() {
    // The last version was seen before the last report: no renewal since.
    let mut input = unobserved_holder(89);
    input.now = MonoTime::from_millis(92 * SECOND);
    let decision = decide(&input);
    assert_eq!(decision.status.primary, None);
}
