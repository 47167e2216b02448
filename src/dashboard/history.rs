//! What the dashboard remembers between observations, in memory only: lag samples in a bounded
//! ring, the last failovers, and when each node last answered. Pure: the caller passes the time
//! and the observation; nothing here reads a clock or does IO.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::dashboard::api::{FailoverView, LagPoint, LagSeries};

/// A bounded FIFO: pushing onto a full ring drops the oldest item.
#[derive(Debug, Clone, PartialEq)]
pub struct Ring<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> Ring<T> {
    /// A ring holding at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Ring {
            items: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// Drops items from the front while `stale` says so (oldest first).
    pub fn drop_while(&mut self, stale: impl Fn(&T) -> bool) {
        while self.items.front().is_some_and(&stale) {
            self.items.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn last(&self) -> Option<&T> {
        self.items.back()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.items.iter()
    }
}

/// One observation of one node's lag (both `None` when unknown: a gap in the chart, not 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeLag {
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
struct LagSample {
    at: DateTime<Utc>,
    nodes: BTreeMap<String, NodeLag>,
}

/// Lag of every node over the last `window`, sampled whenever the server observes the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct LagHistory {
    samples: Ring<LagSample>,
    window: chrono::Duration,
    min_spacing: chrono::Duration,
}

impl LagHistory {
    /// Keeps at most `capacity` samples, none older than `window` before the newest.
    pub fn new(capacity: usize, window: chrono::Duration) -> Self {
        LagHistory {
            samples: Ring::new(capacity),
            window,
            min_spacing: chrono::Duration::zero(),
        }
    }

    /// Ignores observations closer than `spacing` to the last sample, so that a fast observer
    /// does not shorten the window the capacity covers.
    pub fn with_min_spacing(mut self, spacing: chrono::Duration) -> Self {
        self.min_spacing = spacing;
        self
    }

    /// Records one observation. A sample not newer than the last one (the same status seen
    /// twice is one observation) or within the minimum spacing is ignored.
    pub fn record(&mut self, at: DateTime<Utc>, nodes: BTreeMap<String, NodeLag>) {
        if self
            .samples
            .last()
            .is_some_and(|last| at <= last.at || at - last.at < self.min_spacing)
        {
            return;
        }
        self.samples.push(LagSample { at, nodes });
        let oldest = at - self.window;
        self.samples.drop_while(|s| s.at < oldest);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn window_seconds(&self) -> u64 {
        self.window.num_seconds().max(0) as u64
    }

    /// One series per node that appears in any sample, sorted by node name; a node missing
    /// from a sample gets an unknown point there (it was not observed).
    pub fn series(&self) -> Vec<LagSeries> {
        let mut names: Vec<&String> = self.samples.iter().flat_map(|s| s.nodes.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| LagSeries {
                node: name.clone(),
                points: self
                    .samples
                    .iter()
                    .map(|sample| {
                        let lag = sample.nodes.get(name);
                        LagPoint {
                            at: sample.at,
                            bytes: lag.and_then(|l| l.bytes),
                            seconds: lag.and_then(|l| l.seconds),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

/// When each node was last seen answering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastSeen {
    seen: BTreeMap<String, DateTime<Utc>>,
}

impl LastSeen {
    pub fn mark(&mut self, node: &str, at: DateTime<Utc>) {
        let entry = self.seen.entry(node.to_string()).or_insert(at);
        if *entry < at {
            *entry = at;
        }
    }

    pub fn get(&self, node: &str) -> Option<DateTime<Utc>> {
        self.seen.get(node).copied()
    }
}

/// An event as the failover tracker needs it: when, and the reason (an engine event reason
/// such as `FailoverStarted`, or a controller reason such as `SwitchoverRequested`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimedEvent {
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// Reasons that mark the start of a change of primary.
const START_REASONS: &[&str] = &[
    "SwitchoverRequested",
    "SwitchoverStarted",
    "FailoverStarted",
    "WaitingForLeaseExpiry",
];
const SWITCHOVER_REASONS: &[&str] = &[
    "SwitchoverRequested",
    "SwitchoverStarted",
    "SwitchoverCompleted",
];

/// Builds failover records from a sequence of observations (local mode): a change of the
/// serving primary from A to B is one failover; its timings come from the events recorded in
/// between, and from the observations themselves when the events are gone.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverTracker {
    /// The last serving primary.
    serving: Option<String>,
    /// Events before this instant belong to an earlier change (or to before we started).
    since: Option<DateTime<Utc>>,
    /// The first observation without a serving primary since `serving` was last seen serving.
    lost_at: Option<DateTime<Utc>>,
    records: Ring<FailoverView>,
}

impl FailoverTracker {
    /// Keeps the last `capacity` failovers.
    pub fn new(capacity: usize) -> Self {
        FailoverTracker {
            serving: None,
            since: None,
            lost_at: None,
            records: Ring::new(capacity),
        }
    }

    /// One observation at `at`: the serving primary (if any), the recent events (any order,
    /// possibly overlapping earlier calls), and the WAL gap of the engine's last choice when it
    /// chose `primary`.
    pub fn observe(
        &mut self,
        at: DateTime<Utc>,
        primary: Option<&str>,
        events: &[TimedEvent],
        lsn_gap_bytes: Option<u64>,
    ) {
        let since = *self.since.get_or_insert(at);
        match (self.serving.as_deref(), primary) {
            (_, None) => {
                self.lost_at.get_or_insert(at);
            }
            (None, Some(first)) => {
                // The first primary we see (or the first after a start): not a failover.
                self.serving = Some(first.to_string());
                self.since = Some(at);
                self.lost_at = None;
            }
            (Some(old), Some(new)) if old == new => self.lost_at = None,
            (Some(old), Some(new)) => {
                let window: Vec<&TimedEvent> = events
                    .iter()
                    .filter(|e| e.at > since && e.at <= at)
                    .collect();
                let first = |reasons: &[&str]| {
                    window
                        .iter()
                        .filter(|e| reasons.contains(&e.reason.as_str()))
                        .map(|e| e.at)
                        .min()
                };
                let switchover = first(SWITCHOVER_REASONS).is_some();
                // The earliest sign: a start event, or the first round without a serving
                // primary (a hard-killed primary is lost long before the takeover starts).
                let detected_at = [first(START_REASONS), self.lost_at]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(at);
                let completed_at = first(&["SwitchoverCompleted"])
                    .unwrap_or(at)
                    .max(detected_at);
                self.records.push(FailoverView {
                    reason: if switchover { "Switchover" } else { "Failover" }.to_string(),
                    from: Some(old.to_string()),
                    to: new.to_string(),
                    detected_at: Some(detected_at),
                    fenced_at: first(&["Fencing"]),
                    promoted_at: first(&["Promoting"]),
                    completed_at: Some(completed_at),
                    duration_ms: Some(
                        (completed_at - detected_at).num_milliseconds().max(0) as u64,
                    ),
                    lsn_gap_bytes,
                });
                self.serving = Some(new.to_string());
                self.since = Some(at);
                self.lost_at = None;
            }
        }
    }

    /// Adds a record made elsewhere (the operator's `status.lastFailover`) unless it is the
    /// last one already.
    pub fn remember(&mut self, record: FailoverView) {
        if self.records.last() != Some(&record) {
            self.records.push(record);
        }
    }

    /// Newest first.
    pub fn records(&self) -> Vec<FailoverView> {
        self.records.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
    }

    fn lag(bytes: Option<u64>, seconds: Option<f64>) -> NodeLag {
        NodeLag { bytes, seconds }
    }

    fn event(ms: i64, reason: &str) -> TimedEvent {
        TimedEvent {
            at: t(ms),
            reason: reason.to_string(),
        }
    }

    #[test]
    fn ring_keeps_the_newest_items_in_order() {
        let mut ring = Ring::new(3);
        assert!(ring.is_empty());
        for i in 0..5 {
            ring.push(i);
        }
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(ring.last(), Some(&4));
        ring.drop_while(|i| *i < 4);
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(Ring::<u8>::new(0).capacity(), 1);
    }

    #[test]
    fn lag_history_drops_samples_outside_the_window_and_ignores_repeats() {
        let mut history = LagHistory::new(100, chrono::Duration::seconds(10));
        for second in 0..15 {
            let nodes = BTreeMap::from([("node1".to_string(), lag(Some(second), Some(0.5)))]);
            history.record(t(second as i64 * 1000), nodes.clone());
            // The same observation again (or an older one) is not a new sample.
            history.record(t(second as i64 * 1000), nodes);
        }
        assert_eq!(history.len(), 11, "samples from t=4 s to t=14 s");
        let series = history.series();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].points.first().and_then(|p| p.bytes), Some(4));
        assert_eq!(series[0].points.last().and_then(|p| p.bytes), Some(14));
        assert_eq!(history.window_seconds(), 10);
    }

    #[test]
    fn lag_history_min_spacing_thins_fast_observations() {
        let mut history = LagHistory::new(100, chrono::Duration::hours(1))
            .with_min_spacing(chrono::Duration::seconds(1));
        for i in 0..10 {
            history.record(t(i * 250), BTreeMap::new());
        }
        assert_eq!(history.len(), 3, "t=0, 1 s, 2 s");
    }

    #[test]
    fn lag_history_capacity_bounds_memory() {
        let mut history = LagHistory::new(5, chrono::Duration::hours(1));
        for i in 0..50 {
            history.record(t(i), BTreeMap::new());
        }
        assert_eq!(history.len(), 5);
    }

    #[test]
    fn unknown_and_missing_lag_are_gaps_not_zero() {
        let mut history = LagHistory::new(10, chrono::Duration::minutes(5));
        history.record(
            t(0),
            BTreeMap::from([
                ("node1".to_string(), lag(Some(0), Some(0.0))),
                ("node2".to_string(), lag(None, None)),
            ]),
        );
        history.record(
            t(1000),
            BTreeMap::from([("node1".to_string(), lag(Some(8192), None))]),
        );
        let series = history.series();
        let names: Vec<&str> = series.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, vec!["node1", "node2"]);
        assert_eq!(series[0].points[0].bytes, Some(0));
        assert_eq!(series[0].points[0].seconds, Some(0.0));
        assert_eq!(series[0].points[1].bytes, Some(8192));
        assert_eq!(series[0].points[1].seconds, None);
        assert_eq!(series[1].points.len(), 2);
        assert!(
            series[1]
                .points
                .iter()
                .all(|p| p.bytes.is_none() && p.seconds.is_none())
        );
    }

    #[test]
    fn last_seen_only_moves_forward() {
        let mut seen = LastSeen::default();
        assert_eq!(seen.get("node0"), None);
        seen.mark("node0", t(2000));
        seen.mark("node0", t(1000));
        assert_eq!(seen.get("node0"), Some(t(2000)));
        seen.mark("node0", t(3000));
        assert_eq!(seen.get("node0"), Some(t(3000)));
    }

    #[test]
    fn a_switchover_is_timed_from_its_events() {
        let mut tracker = FailoverTracker::new(5);
        let old_events = vec![event(-5000, "SwitchoverRequested")];
        tracker.observe(t(0), Some("node0"), &old_events, None);
        tracker.observe(t(1000), Some("node0"), &old_events, None);
        assert!(
            tracker.records().is_empty(),
            "a first primary is no failover"
        );
        let events = vec![
            event(-5000, "SwitchoverRequested"),
            event(1200, "SwitchoverRequested"),
            event(1300, "SwitchoverStarted"),
            event(1350, "Promoting"),
            event(1500, "SwitchoverCompleted"),
        ];
        tracker.observe(t(1400), None, &events, None);
        tracker.observe(t(1600), Some("node1"), &events, Some(0));
        let records = tracker.records();
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.reason, "Switchover");
        assert_eq!(record.from.as_deref(), Some("node0"));
        assert_eq!(record.to, "node1");
        assert_eq!(
            record.detected_at,
            Some(t(1200)),
            "the old request is ignored"
        );
        assert_eq!(record.promoted_at, Some(t(1350)));
        assert_eq!(record.completed_at, Some(t(1500)));
        assert_eq!(record.duration_ms, Some(300));
        assert_eq!(record.lsn_gap_bytes, Some(0));
        assert_eq!(record.fenced_at, None);
    }

    #[test]
    fn a_failover_without_events_is_timed_from_the_observations() {
        let mut tracker = FailoverTracker::new(5);
        tracker.observe(t(0), Some("node0"), &[], None);
        tracker.observe(t(1000), None, &[], None);
        tracker.observe(t(2000), None, &[], None);
        tracker.observe(t(9000), Some("node2"), &[], None);
        // Stays: the same primary again is no new failover.
        tracker.observe(t(10_000), Some("node2"), &[], None);
        let records = tracker.records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].reason, "Failover");
        assert_eq!(records[0].detected_at, Some(t(1000)));
        assert_eq!(records[0].completed_at, Some(t(9000)));
        assert_eq!(records[0].duration_ms, Some(8000));
        assert_eq!(records[0].lsn_gap_bytes, None);
    }

    #[test]
    fn a_failover_is_detected_when_the_primary_is_lost_not_when_the_takeover_starts() {
        let mut tracker = FailoverTracker::new(5);
        tracker.observe(t(0), Some("node0"), &[], None);
        tracker.observe(t(1000), None, &[], None);
        let events = vec![event(9000, "FailoverStarted"), event(9100, "Promoting")];
        tracker.observe(t(9500), Some("node1"), &events, Some(64));
        let records = tracker.records();
        assert_eq!(records[0].detected_at, Some(t(1000)));
        assert_eq!(records[0].promoted_at, Some(t(9100)));
        assert_eq!(records[0].duration_ms, Some(8500));
        assert_eq!(records[0].lsn_gap_bytes, Some(64));
    }

    #[test]
    fn failovers_are_kept_newest_first_and_bounded() {
        let mut tracker = FailoverTracker::new(2);
        let primaries = ["node0", "node1", "node2", "node0"];
        for (i, primary) in primaries.iter().enumerate() {
            let events = vec![event(i as i64 * 1000 - 100, "FailoverStarted")];
            tracker.observe(t(i as i64 * 1000), Some(primary), &events, None);
        }
        let records = tracker.records();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].to, "node0");
        assert_eq!(records[0].from.as_deref(), Some("node2"));
        assert_eq!(records[1].to, "node2");
        assert_eq!(records[0].duration_ms, Some(100));
    }

    #[test]
    fn remembered_records_are_not_repeated() {
        let mut tracker = FailoverTracker::new(5);
        let record = FailoverView {
            reason: "PrimaryUnreachable".to_string(),
            from: Some("pg-0".to_string()),
            to: "pg-1".to_string(),
            detected_at: Some(t(0)),
            fenced_at: None,
            promoted_at: None,
            completed_at: None,
            duration_ms: None,
            lsn_gap_bytes: None,
        };
        tracker.remember(record.clone());
        tracker.remember(record.clone());
        assert_eq!(tracker.records(), vec![record]);
    }
}
