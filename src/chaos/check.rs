//! A Jepsen-style checker of a write history: pure, no IO, no clock.
//!
//! # Input
//!
//! * Every write attempt as a [`WriteRecord`]: a unique id, the node (or address) it was sent
//!   to, when it was sent and when its answer arrived — both as a [`Duration`] since one start
//!   instant on **one monotonic clock** (the test driver's) — and its [`WriteOutcome`].
//!   Writers are best connected straight to every node, not only through the write endpoint:
//!   then a superseded primary that still acknowledges writes is seen, and a node's
//!   refusals (as a replica, while fenced) mark where its terms as primary end.
//! * The [`FinalState`]: the final primary's name and every id present there once the run is
//!   over.
//! * Optionally the known promotion instants ([`Promotion`]) on the same clock.
//!
//! # Terms and the succession of primaries
//!
//! A **term** is a stretch during which one node acted as primary, derived from the history:
//!
//! 1. Each node's events are ordered by instant: its acknowledged writes (at their answer),
//!    its refused writes (at their answer) and its known promotions. At one instant, refusals
//!    and promotions come before acknowledgements.
//! 2. A refusal ends the node's current term (a node that answered "no" to a write was not
//!    acting as a primary then). An indeterminate answer (timeout, lost connection) ends
//!    nothing: it proves nothing about the node.
//! 3. A known promotion of a node ends its current term and opens a new one that **starts at
//!    the promotion instant** (even before, or without, any acknowledgement in it).
//! 4. Otherwise an acknowledgement outside any term opens a new term that **starts at that
//!    acknowledgement**.
//!
//! The succession is the list of terms ordered by start (ties by node name). A term `T` is
//! **superseded** at the start of the first term `T'` of *another* node with
//! `T.start < T'.start`.
//!
//! # Figures
//!
//! * (a) **Split-brain writes**: writes acknowledged by node X in a term `T` strictly after the
//!   start of a term `T'` of another node that started strictly after `T` — X had stopped
//!   being primary (another node had acknowledged a write, or was promoted) and still
//!   acknowledged. Must be 0.
//! * (b) **Lost writes**: acknowledged ids missing from the final primary. 0 in synchronous
//!   mode; counted and reported in asynchronous mode. Also reported: refused writes present on
//!   the final primary (must be 0: a refusal means "not written") and indeterminate writes
//!   present (either is correct).
//! * (c) **Write unavailability**: the longest window between two consecutive acknowledged
//!   writes (any node), with its start, end and length.
//!
//! # Limits
//!
//! Without refusals or promotions a node that becomes primary a second time (A → B → A) has
//! all its acknowledgements in one term, so the second stretch looks like split-brain writes.
//! A node that acknowledges again after a refusal opens a new term: if that happens while
//! another node's term runs, the *other* node's later acknowledgements count as the split-brain
//! writes. The count is non-zero either way; the blame goes to the earlier term.
//!
//! Histories through a write endpoint alone (only acknowledgements, one address) should pass
//! the promotion instants, or use writers straight to every node, which see the refusals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

/// How a write attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The commit returned success: the client was told the write is durable.
    Acknowledged,
    /// The node answered and did not take the write (read-only transaction on a replica,
    /// shutting down, not accepting connections, connection refused): definitely not written.
    Refused,
    /// No definite answer (timeout, connection lost during the commit): it may or may not
    /// have been written.
    Indeterminate,
}

/// One write attempt, as its writer saw it. Instants are since one start on one monotonic
/// clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// Unique over the run.
    pub id: i64,
    /// The node (or address) the write was sent to.
    pub node: String,
    /// When the write was sent.
    pub sent: Duration,
    /// When its answer arrived (acknowledgement, refusal, or the writer gave up).
    pub answered: Duration,
    pub outcome: WriteOutcome,
}

impl WriteRecord {
    /// The acknowledgement instant, for an acknowledged write.
    pub fn acknowledged_at(&self) -> Option<Duration> {
        (self.outcome == WriteOutcome::Acknowledged).then_some(self.answered)
    }
}

/// What the final primary holds once the run is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    pub primary: String,
    /// Every id present on the final primary.
    pub ids: BTreeSet<i64>,
}

/// A known promotion: `node` became primary at `at` (same clock as the writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub node: String,
    pub at: Duration,
}

/// One term of the succession (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub node: String,
    /// The promotion instant for a term opened by a known promotion, else its first
    /// acknowledgement.
    pub start: Duration,
    /// Whether a known promotion opened it.
    pub promoted: bool,
    pub first_ack: Option<Duration>,
    pub last_ack: Option<Duration>,
    /// Writes acknowledged in the term.
    pub acknowledged: usize,
}

/// A write acknowledged by a superseded primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainWrite {
    pub id: i64,
    /// The old primary that acknowledged it.
    pub node: String,
    pub acknowledged: Duration,
    /// The node whose term had started (strictly before the acknowledgement), and when.
    pub superseded_by: String,
    pub superseded_at: Duration,
    /// Whether the write survived on the final primary.
    pub on_final_primary: bool,
}

/// A window without any acknowledged write: from one acknowledgement to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: Duration,
    pub to: Duration,
}

impl Gap {
    pub fn length(&self) -> Duration {
        self.to.saturating_sub(self.from)
    }
}

/// The checker's findings (see the module documentation for each figure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub final_primary: String,
    /// Write attempts, and how many ended each way.
    pub writes: usize,
    pub acknowledged: usize,
    pub refused: usize,
    pub indeterminate: usize,
    /// The terms, ordered by start.
    pub succession: Vec<Term>,
    /// (a) Writes acknowledged by a superseded primary, in acknowledgement order.
    pub split_brain: Vec<SplitBrainWrite>,
    /// (b) Acknowledged ids missing from the final primary, ascending.
    pub lost: Vec<i64>,
    /// Refused ids present on the final primary, ascending (must be empty).
    pub refused_present: Vec<i64>,
    /// Indeterminate writes present on the final primary (either way is correct).
    pub indeterminate_present: usize,
    /// Ids used by more than one record, ascending: the history breaks the checker's contract
    /// and its figures are unreliable.
    pub duplicate_ids: Vec<i64>,
    pub first_ack: Option<Duration>,
    pub last_ack: Option<Duration>,
    /// (c) The longest window without an acknowledged write (`None` with fewer than two
    /// acknowledgements); the earliest of equally long ones.
    pub longest_gap: Option<Gap>,
}

/// One event of a node, for deriving its terms.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// A refusal, or a known promotion (`promotion: true`).
    Break { at: Duration, promotion: bool },
    /// An acknowledged write: index into the history.
    Ack { at: Duration, record: usize },
}

impl Event {
    /// Ordering key: instant, then breaks before acknowledgements, then history order.
    fn key(&self) -> (Duration, u8, usize) {
        match *self {
            Event::Break { at, promotion } => (at, 0, usize::from(promotion)),
            Event::Ack { at, record } => (at, 1, record),
        }
    }
}

/// A term being built: the public fields plus the acknowledged records.
struct TermBuild {
    term: Term,
    acks: Vec<usize>,
}

fn terms(writes: &[WriteRecord], promotions: &[Promotion]) -> Vec<TermBuild> {
    let mut events: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
    for (index, write) in writes.iter().enumerate() {
        let event = match write.outcome {
            WriteOutcome::Acknowledged => Event::Ack {
                at: write.answered,
                record: index,
            },
            WriteOutcome::Refused => Event::Break {
                at: write.answered,
                promotion: false,
            },
            WriteOutcome::Indeterminate => continue,
        };
        events.entry(write.node.as_str()).or_default().push(event);
    }
    for promotion in promotions {
        events
            .entry(promotion.node.as_str())
            .or_default()
            .push(Event::Break {
                at: promotion.at,
                promotion: true,
            });
    }
    let mut built = Vec::new();
    for (node, mut node_events) in events {
        node_events.sort_by_key(Event::key);
        let mut current: Option<TermBuild> = None;
        for event in node_events {
            match event {
                Event::Break { at, promotion } => {
                    built.extend(current.take());
                    if promotion {
                        current = Some(TermBuild {
                            term: Term {
                                node: node.to_string(),
                                start: at,
                                promoted: true,
                                first_ack: None,
                                last_ack: None,
                                acknowledged: 0,
                            },
                            acks: Vec::new(),
                        });
                    }
                }
                Event::Ack { at, record } => {
                    let term = current.get_or_insert_with(|| TermBuild {
                        term: Term {
                            node: node.to_string(),
                            start: at,
                            promoted: false,
                            first_ack: None,
                            last_ack: None,
                            acknowledged: 0,
                        },
                        acks: Vec::new(),
                    });
                    term.term.first_ack.get_or_insert(at);
                    term.term.last_ack = Some(at);
                    term.term.acknowledged += 1;
                    term.acks.push(record);
                }
            }
        }
        built.extend(current);
    }
    built.sort_by(|a, b| (a.term.start, &a.term.node).cmp(&(b.term.start, &b.term.node)));
    built
}

/// Checks a run: see the module documentation for the definitions.
pub fn check(
    writes: &[WriteRecord],
    final_state: &FinalState,
    promotions: &[Promotion],
) -> CheckReport {
    let built = terms(writes, promotions);

    let mut split_brain = Vec::new();
    for term in &built {
        for &record in &term.acks {
            let write = &writes[record];
            let at = write.answered;
            // The earliest later term of another node started strictly before this ack.
            let superseding = built.iter().find(|other| {
                other.term.node != term.term.node
                    && other.term.start > term.term.start
                    && other.term.start < at
            });
            if let Some(other) = superseding {
                split_brain.push(SplitBrainWrite {
                    id: write.id,
                    node: write.node.clone(),
                    acknowledged: at,
                    superseded_by: other.term.node.clone(),
                    superseded_at: other.term.start,
                    on_final_primary: final_state.ids.contains(&write.id),
                });
            }
        }
    }
    split_brain.sort_by_key(|w| (w.acknowledged, w.id));

    let count = |outcome: WriteOutcome| writes.iter().filter(|w| w.outcome == outcome).count();
    let present_with = |outcome: WriteOutcome| -> Vec<i64> {
        let ids: BTreeSet<i64> = writes
            .iter()
            .filter(|w| w.outcome == outcome && final_state.ids.contains(&w.id))
            .map(|w| w.id)
            .collect();
        ids.into_iter().collect()
    };
    let lost: BTreeSet<i64> = writes
        .iter()
        .filter(|w| w.outcome == WriteOutcome::Acknowledged && !final_state.ids.contains(&w.id))
        .map(|w| w.id)
        .collect();

    let mut seen = BTreeSet::new();
    let duplicate_ids: BTreeSet<i64> = writes
        .iter()
        .filter(|w| !seen.insert(w.id))
        .map(|w| w.id)
        .collect();

    let mut acks: Vec<Duration> = writes
        .iter()
        .filter_map(WriteRecord::acknowledged_at)
        .collect();
    acks.sort();
    let mut longest_gap: Option<Gap> = None;
    for pair in acks.windows(2) {
        if let [from, to] = *pair {
            let gap = Gap { from, to };
            if longest_gap.is_none_or(|longest| gap.length() > longest.length()) {
                longest_gap = Some(gap);
            }
        }
    }

    CheckReport {
        final_primary: final_state.primary.clone(),
        writes: writes.len(),
        acknowledged: count(WriteOutcome::Acknowledged),
        refused: count(WriteOutcome::Refused),
        indeterminate: count(WriteOutcome::Indeterminate),
        succession: built.into_iter().map(|b| b.term).collect(),
        split_brain,
        lost: lost.into_iter().collect(),
        refused_present: present_with(WriteOutcome::Refused),
        indeterminate_present: present_with(WriteOutcome::Indeterminate).len(),
        duplicate_ids: duplicate_ids.into_iter().collect(),
        first_ack: acks.first().copied(),
        last_ack: acks.last().copied(),
        longest_gap,
    }
}

/// At most this many ids are listed in the Markdown report per list.
const LISTED: usize = 20;

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn optional_seconds(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".to_string(), seconds)
}

fn id_list(ids: &[i64]) -> String {
    let mut text = ids
        .iter()
        .take(LISTED)
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > LISTED {
        let _ = write!(text, ", … ({} more)", ids.len() - LISTED);
    }
    text
}

impl CheckReport {
    /// What breaks the guarantees, one sentence each; empty for a correct run. Lost
    /// acknowledged writes count only in synchronous mode (`synchronous`).
    pub fn violations(&self, synchronous: bool) -> Vec<String> {
        let mut found = Vec::new();
        if !self.split_brain.is_empty() {
            found.push(format!(
                "{} writes acknowledged by a superseded primary (split brain)",
                self.split_brain.len()
            ));
        }
        if synchronous && !self.lost.is_empty() {
            found.push(format!(
                "{} acknowledged writes missing from the final primary in synchronous mode",
                self.lost.len()
            ));
        }
        if !self.refused_present.is_empty() {
            found.push(format!(
                "{} refused writes present on the final primary",
                self.refused_present.len()
            ));
        }
        if !self.duplicate_ids.is_empty() {
            found.push(format!(
                "{} ids used by more than one write: the history is invalid",
                self.duplicate_ids.len()
            ));
        }
        found
    }

    /// The report as Markdown (a `###` section), for report files.
    pub fn to_markdown(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "### Write check\n");
        let _ = writeln!(
            text,
            "Final primary `{}`; {} writes sent: {} acknowledged, {} refused, {} indeterminate. \
             Acknowledged from {} to {} (one monotonic clock, since the start of the run).\n",
            self.final_primary,
            self.writes,
            self.acknowledged,
            self.refused,
            self.indeterminate,
            optional_seconds(self.first_ack),
            optional_seconds(self.last_ack),
        );
        let _ = writeln!(text, "| figure | value | expected |\n| --- | --- | --- |");
        let _ = writeln!(
            text,
            "| (a) writes acknowledged by a superseded primary (split brain) | {} | 0 |",
            self.split_brain.len()
        );
        let _ = writeln!(
            text,
            "| (b) acknowledged writes missing from the final primary | {} of {} | 0 in sync mode |",
            self.lost.len(),
            self.acknowledged
        );
        let gap = self.longest_gap.map_or_else(
            || "—".to_string(),
            |g| {
                format!(
                    "{} ms (from {} to {})",
                    g.length().as_millis(),
                    seconds(g.from),
                    seconds(g.to)
                )
            },
        );
        let _ = writeln!(
            text,
            "| (c) longest window without an acknowledged write | {gap} | — |"
        );
        let _ = writeln!(
            text,
            "| refused writes present on the final primary | {} | 0 |",
            self.refused_present.len()
        );
        let _ = writeln!(
            text,
            "| indeterminate writes present on the final primary | {} of {} | any |",
            self.indeterminate_present, self.indeterminate
        );
        if !self.duplicate_ids.is_empty() {
            let _ = writeln!(
                text,
                "| ids used twice (invalid history) | {} | 0 |",
                self.duplicate_ids.len()
            );
        }
        let _ = writeln!(
            text,
            "\nSuccession of primaries (terms):\n\n\
             | node | start | opened by | first ack | last ack | acknowledged |\n\
             | --- | --- | --- | --- | --- | --- |"
        );
        for term in &self.succession {
            let _ = writeln!(
                text,
                "| `{}` | {} | {} | {} | {} | {} |",
                term.node,
                seconds(term.start),
                if term.promoted {
                    "promotion"
                } else {
                    "first ack"
                },
                optional_seconds(term.first_ack),
                optional_seconds(term.last_ack),
                term.acknowledged
            );
        }
        if !self.split_brain.is_empty() {
            let _ = writeln!(
                text,
                "\nSplit-brain writes (first {LISTED}):\n\n\
                 | id | acknowledged by | at | superseded by | since | on final primary |\n\
                 | --- | --- | --- | --- | --- | --- |"
            );
            for write in self.split_brain.iter().take(LISTED) {
                let _ = writeln!(
                    text,
                    "| {} | `{}` | {} | `{}` | {} | {} |",
                    write.id,
                    write.node,
                    seconds(write.acknowledged),
                    write.superseded_by,
                    seconds(write.superseded_at),
                    if write.on_final_primary { "yes" } else { "no" }
                );
            }
        }
        if !self.lost.is_empty() {
            let _ = writeln!(text, "\nLost acknowledged ids: {}.", id_list(&self.lost));
        }
        if !self.refused_present.is_empty() {
            let _ = writeln!(
                text,
                "\nRefused ids present on the final primary: {}.",
                id_list(&self.refused_present)
            );
        }
        if !self.duplicate_ids.is_empty() {
            let _ = writeln!(
                text,
                "\nIds used more than once: {}.",
                id_list(&self.duplicate_ids)
            );
        }
        text
    }
}
