//! Runs the classifier over `classifier_corpus.txt`: every tricky statement with its expected
//! route and reason.

use pgrs_router::{Classifier, Route};

struct Entry {
    line: usize,
    route: Route,
    reason: String,
    sql: String,
}

fn corpus() -> Vec<Entry> {
    let text = include_str!("classifier_corpus.txt");
    let mut entries: Vec<Entry> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with("##") {
            continue;
        }
        if let Some(header) = line.strip_prefix("== ") {
            let (route, reason) = header
                .split_once(' ')
                .unwrap_or_else(|| panic!("line {}: header needs route and reason", index + 1));
            let route = match route {
                "replica" => Route::Replica,
                "primary" => Route::Primary,
                other => panic!("line {}: unknown route {other}", index + 1),
            };
            entries.push(Entry {
                line: index + 1,
                route,
                reason: reason.trim().to_owned(),
                sql: String::new(),
            });
        } else if let Some(entry) = entries.last_mut() {
            if !entry.sql.is_empty() {
                entry.sql.push('\n');
            }
            entry.sql.push_str(line);
        }
    }
    entries
}

#[test]
fn corpus_has_at_least_sixty_statements_on_both_routes() {
    let entries = corpus();
    assert!(entries.len() >= 60, "only {} statements", entries.len());
    let replica = entries.iter().filter(|e| e.route == Route::Replica).count();
    assert!(replica >= 20 && entries.len() - replica >= 20);
}

#[test]
fn every_corpus_statement_gets_its_expected_route_and_reason() {
    let classifier = Classifier::default();
    let mut failures = Vec::new();
    for entry in corpus() {
        let got = classifier.classify(&entry.sql);
        let reason = serde_json::to_value(got.reason)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default();
        if got.route != entry.route || reason != entry.reason {
            failures.push(format!(
                "line {}: expected {:?}/{} got {:?}/{}: {}",
                entry.line, entry.route, entry.reason, got.route, reason, entry.sql
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
