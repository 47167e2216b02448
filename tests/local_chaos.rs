//! `pgrs local chaos` end to end, judged by the write checker: one round of each failure kind
//! (hard kill, graceful stop, switchover) on a synchronous cluster, under the writer through
//! the write endpoint and the writers straight to every node. The command succeeds (it fails on
//! any violation the checker finds), and its report holds the per-round table and the
//! checker's section: no write acknowledged by a superseded primary, no acknowledged write
//! missing from the final primary (synchronous replication), the replicas' refusals seen.

mod local_support;

use std::time::Duration;

use local_support::{Cluster, pgrs};

/// The value column of the checker's figure row starting with `label` (e.g. `(a)`).
fn figure<'a>(report: &'a str, label: &str) -> &'a str {
    let row = report
        .lines()
        .find(|line| line.starts_with(&format!("| {label} ")))
        .unwrap_or_else(|| panic!("no figure {label} in the report:\n{report}"));
    row.split('|').nth(2).map(str::trim).unwrap_or_default()
}

/// The count of writes that ended `how` (e.g. `refused`) in the checker's summary sentence.
fn summary_count(report: &str, how: &str) -> u64 {
    let sentence = report
        .lines()
        .find(|line| line.starts_with("Final primary "))
        .unwrap_or_else(|| panic!("no summary sentence in the report:\n{report}"));
    let before = sentence
        .split(&format!(" {how}"))
        .next()
        .unwrap_or_default();
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {how} count in {sentence:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_rounds_pass_the_write_check_in_sync_mode() {
    let cluster = Cluster::up(2, &["--sync"]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert!(status.sync, "the cluster runs in sync mode");
    cluster.wait_quorum(2, Duration::from_secs(30)).await;

    let report_path = cluster.dir.with_file_name("chaos-report.md");
    let args = [
        "local".to_string(),
        "chaos".to_string(),
        "--dir".to_string(),
        cluster.dir_text(),
        "--rounds".to_string(),
        "1".to_string(),
        "--report".to_string(),
        report_path.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgrs(&args)
    })
    .await
    .expect("run pgrs local chaos");
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();
    if !output.status.success() {
        let logs = cluster.keep_logs("local_chaos");
        panic!(
            "pgrs local chaos failed ({}), logs in {}:\n{}\nreport:\n{report}\ncontroller log:\n{}",
            output.status,
            logs.display(),
            String::from_utf8_lossy(&output.stderr),
            cluster.controller_log_tail()
        );
    }
    eprintln!("{report}");

    // The per-round table: one row per kind.
    for kind in [
        "hard kill (SIGKILL agent + postgres)",
        "graceful stop (SIGTERM agent)",
        "planned switchover",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("| {kind} | 1 |"))),
            "no row for {kind}:\n{report}"
        );
    }
    // The checker's section and its verdict.
    assert!(report.contains("### Write check"), "{report}");
    assert_eq!(figure(&report, "(a)"), "0", "split-brain writes:\n{report}");
    let lost = figure(&report, "(b)");
    assert!(
        lost.starts_with("0 of "),
        "acknowledged writes lost in sync mode: {lost}\n{report}"
    );
    assert_ne!(lost, "0 of 0", "no write acknowledged:\n{report}");
    assert_eq!(
        figure(&report, "refused writes present on the final primary"),
        "0"
    );
    // The writers straight to the replicas were refused: they ran, and their refusals end terms.
    assert!(
        summary_count(&report, "refused") > 0,
        "no refusal recorded: the direct writers did not run\n{report}"
    );
    // Three failovers: at least the first primary and the three promoted ones as terms.
    let terms = report
        .lines()
        .skip_while(|l| !l.starts_with("Succession of primaries"))
        .filter(|l| l.starts_with("| `node"))
        .count();
    assert!(terms >= 4, "{terms} terms for 3 failovers:\n{report}");
}
