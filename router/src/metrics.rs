//! Router counters, readable as a snapshot (JSON) or in Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Monotonic counters of routing decisions and health events.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct MetricsSnapshot {
            $(pub $name: u64,)*
        }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl MetricsSnapshot {
            /// Prometheus text exposition, counters prefixed with `pgrs_router_`.
            pub fn to_prometheus(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP pgrs_router_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE pgrs_router_{} counter", stringify!($name));
                    let _ = writeln!(out, "pgrs_router_{} {}", stringify!($name), self.$name);
                )*
                out
            }
        }
    };
}

counters! {
    reads_replica: "Reads served by a replica.",
    reads_primary: "Reads served by the primary (sticky key, token not reached, classifier or fallback).",
    reads_fallback_no_replica: "Reads sent to the primary because no replica was eligible.",
    reads_sticky: "Reads sent to the primary inside a key's stickiness window.",
    reads_causal_replica: "Reads with a WAL token served by a replica that had replayed it.",
    reads_causal_primary: "Reads with a WAL token sent to the primary because no replica reached it in time.",
    writes: "Writes sent to the primary.",
    writes_rejected_read_only: "Writes refused at once because no primary is reachable.",
    read_only_retries: "Statements retried on the primary after a replica answered SQLSTATE 25006.",
    read_only_mode_entered: "Times the router entered read-only mode.",
    lag_alert_episodes: "Times a replica's lag crossed the alert threshold.",
    node_failures: "Connection failures that marked a node down before the next probe.",
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_value() {
        let metrics = Metrics::default();
        Metrics::bump(&metrics.writes);
        Metrics::bump(&metrics.writes);
        let text = metrics.snapshot().to_prometheus();
        assert!(text.contains("# TYPE pgrs_router_writes counter\npgrs_router_writes 2\n"));
        assert!(text.contains("pgrs_router_reads_replica 0\n"));
    }
}
