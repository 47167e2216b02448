//! The local cluster's status document (served by the controller at `GET /v1/cluster`; the
//! types are in [`crate::view::local`]) rendered as a table for `pgrs local status`. Pure.

pub use crate::view::local::{EventRecord, LeaseStatus, LocalStatus, NodeStatus};

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

fn unknown_or<T: ToString>(value: Option<T>) -> String {
    value.map_or("unknown".to_string(), |v| v.to_string())
}

/// The `pgrs local status` table.
pub fn render_table(status: &LocalStatus) -> String {
    let header = [
        "NODE",
        "ROLE",
        "PG",
        "TL",
        "CURRENT",
        "RECEIVED",
        "REPLAYED",
        "LAG-BYTES",
        "LAG-S",
        "SYNC",
        "UPSTREAM",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for node in &status.nodes {
        let role = match (&node.role, node.reachable) {
            (_, false) => "unreachable".to_string(),
            (Some(role), true) => role.clone(),
            (None, true) => "unknown".to_string(),
        };
        let is_replica = node.role.as_deref() == Some("replica");
        rows.push(vec![
            node.name.clone(),
            role,
            if node.postgres_up { "up" } else { "down" }.to_string(),
            or_dash(node.timeline),
            or_dash(node.current_lsn),
            or_dash(node.receive_lsn),
            or_dash(node.replay_lsn),
            if is_replica {
                unknown_or(node.lag_bytes)
            } else {
                "-".to_string()
            },
            if is_replica {
                node.lag_seconds
                    .map_or("unknown".to_string(), |s| format!("{s:.3}"))
            } else {
                "-".to_string()
            },
            or_dash(node.sync_state.clone()),
            or_dash(node.upstream.clone()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    out.push_str(&format!(
        "cluster {}  phase {:?}  primary {}  mode {}\n",
        status.cluster,
        status.phase,
        status.primary.as_deref().unwrap_or("none"),
        if status.sync { "sync" } else { "async" }
    ));
    out.push_str(&format!(
        "lease holder {} (version {}), {}\n",
        status.lease.holder.as_deref().unwrap_or("none"),
        status.lease.version,
        match status.lease.expires_in_ms {
            Some(ms) => format!(
                "counts as expired in {:.1} s unless renewed",
                ms as f64 / 1000.0
            ),
            None => "not held".to_string(),
        }
    ));
    out.push_str(&format!(
        "write endpoint {}\n{}\n\n",
        status.write_endpoint, status.message
    ));
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Lsn, Phase};

    fn node(name: &str, role: &str) -> NodeStatus {
        NodeStatus {
            name: name.to_string(),
            pg_port: 1,
            agent_port: 2,
            reachable: true,
            role: Some(role.to_string()),
            postgres_up: true,
            timeline: Some(2),
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            sync_state: None,
            upstream: None,
            agent_pid: None,
            last_error: None,
        }
    }

    #[test]
    fn unknown_lag_is_never_shown_as_zero() {
        let mut primary = node("node0", "primary");
        primary.current_lsn = Some(Lsn(0x300_0000));
        let mut caught_up = node("node1", "replica");
        caught_up.lag_bytes = Some(0);
        caught_up.lag_seconds = Some(0.0);
        caught_up.upstream = Some("node0".to_string());
        caught_up.sync_state = Some("quorum".to_string());
        let unknown = node("node2", "replica");
        let mut gone = node("node3", "replica");
        gone.reachable = false;
        gone.postgres_up = false;
        let status = LocalStatus {
            cluster: "local".to_string(),
            phase: Phase::Healthy,
            message: "node0 is primary".to_string(),
            primary: Some("node0".to_string()),
            lease: LeaseStatus {
                holder: Some("node0".to_string()),
                version: "12".to_string(),
                expires_in_ms: Some(7500),
                duration_ms: 8000,
            },
            write_endpoint: "127.0.0.1:15432".to_string(),
            sync: true,
            nodes: vec![primary, caught_up, unknown, gone],
            events: vec![],
            last_failover: None,
            updated_at: chrono::Utc::now(),
        };
        let table = render_table(&status);
        let line = |name: &str| {
            table
                .lines()
                .find(|l| {
                    l.split_whitespace().next() == Some(name) && l.split_whitespace().count() >= 10
                })
                .expect("row")
                .to_string()
        };
        assert!(line("node0").contains("0/3000000"), "{table}");
        assert!(
            line("node1").contains(" 0 ") && line("node1").contains("0.000"),
            "{table}"
        );
        assert!(line("node1").contains("quorum"), "{table}");
        assert_eq!(line("node2").matches("unknown").count(), 2, "{table}");
        assert!(line("node3").contains("unreachable"), "{table}");
        assert!(
            table.contains("lease holder node0 (version 12), counts as expired in 7.5 s"),
            "{table}"
        );
    }
}
