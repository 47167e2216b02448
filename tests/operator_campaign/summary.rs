//! The campaign's figures: the rounds table, totals per fault, and the Events of the run.

use std::collections::BTreeMap;
use std::time::Duration;

use pgrs_testbed::TestBed;

use crate::faults::Kind;
use crate::operator_support::event_lines;
use crate::round::{self, RoundResult};

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The totals: per fault kind, then over all rounds.
pub fn totals(results: &[RoundResult]) -> Vec<String> {
    let mut lines = vec![
        "| fault | rounds | failovers | longest window without an acknowledged write | slowest \
         settle after the heal |\n| --- | --- | --- | --- | --- |"
            .to_string(),
    ];
    let by_kind: BTreeMap<Kind, Vec<&RoundResult>> =
        results.iter().fold(BTreeMap::new(), |mut map, r| {
            map.entry(r.fault.kind).or_default().push(r);
            map
        });
    for (kind, rounds) in &by_kind {
        let longest = rounds.iter().map(|r| r.window).max().unwrap_or_default();
        let slowest = rounds
            .iter()
            .map(|r| r.settled.saturating_sub(r.heal_done))
            .max()
            .unwrap_or_default();
        lines.push(format!(
            "| {} {} | {} | {} | {} | {} |",
            kind.number(),
            kind.describe(),
            rounds.len(),
            rounds.iter().filter(|r| r.failover()).count(),
            seconds(longest),
            seconds(slowest)
        ));
    }
    let wall: Duration = results.iter().map(|r| r.wall).sum();
    lines.push(format!(
        "| all | {} | {} | {} | {} |",
        results.len(),
        results.iter().filter(|r| r.failover()).count(),
        seconds(results.iter().map(|r| r.window).max().unwrap_or_default()),
        seconds(
            results
                .iter()
                .map(|r| r.settled.saturating_sub(r.heal_done))
                .max()
                .unwrap_or_default()
        )
    ));
    lines.push(format!(
        "\n{} rounds in {:.0} s ({:.1} s a round on average).",
        results.len(),
        wall.as_secs_f64(),
        wall.as_secs_f64() / results.len().max(1) as f64
    ));
    lines
}

pub fn print_rounds(results: &[RoundResult]) {
    eprintln!("{}", round::TABLE_HEADER);
    for r in results {
        eprintln!("{}", round::table_row(r));
    }
}

/// The Events of the run by reason: how many, and up to three distinct messages each.
pub fn events(bed: &TestBed, ns: &str) -> String {
    let mut by_reason: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for line in event_lines(bed, ns).lines() {
        let (reason, message) = line.split_once(": ").unwrap_or((line, ""));
        let entry = by_reason.entry(reason.to_string()).or_default();
        entry.0 += 1;
        if entry.1.len() < 3 && !entry.1.iter().any(|m| m == message) {
            entry.1.push(message.to_string());
        }
    }
    let mut text =
        "| Event reason | count | messages (up to 3) |\n| --- | --- | --- |\n".to_string();
    for (reason, (count, messages)) in by_reason {
        text.push_str(&format!(
            "| {reason} | {count} | {} |\n",
            messages.join(" / ").replace('|', "\\|")
        ));
    }
    text
}
