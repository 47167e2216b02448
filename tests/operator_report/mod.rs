//! Failover timing reports of the operator chaos tests: one Markdown file per test in
//! `target/pgrs-reports/operator-failover-<test>.md` (figures for `docs/failover.md`). Timings
//! are measured by the test itself from the moment it injected the fault, on its own monotonic
//! clock; the operator's `status.lastFailover` timestamps (whole seconds: `metav1.Time`) are
//! listed next to them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use pgrs::api::FailoverRecord;

/// One step of a failover, measured from the fault.
pub struct Step {
    pub name: &'static str,
    pub after: Option<Duration>,
    pub how: &'static str,
}

impl Step {
    /// The "detected" step: when `status.phase` left Healthy.
    pub fn detected(after: Option<Duration>) -> Step {
        Step {
            name: "detected",
            after,
            how: "status.phase leaves Healthy",
        }
    }

    /// The "promoted" step: when `status.currentPrimary` named the new primary.
    pub fn promoted(after: Option<Duration>) -> Step {
        Step {
            name: "promoted",
            after,
            how: "status.currentPrimary names the new primary",
        }
    }
}

pub struct Report {
    pub test: &'static str,
    pub scenario: &'static str,
    pub lease_seconds: u64,
    pub steps: Vec<Step>,
    /// Longest time without an acknowledged write around the fault, and how it was measured.
    pub write_unavailable: Option<Duration>,
    pub write_how: &'static str,
    pub record: Option<FailoverRecord>,
    /// Wall clock when the fault was injected (to place `lastFailover` timestamps).
    pub fault_at: k8s_openapi::jiff::Timestamp,
    pub notes: Vec<String>,
}

fn millis(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".to_string(), |d| format!("{} ms", d.as_millis()))
}

fn since_fault(
    fault: k8s_openapi::jiff::Timestamp,
    at: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
) -> String {
    at.map_or_else(
        || "—".to_string(),
        |t| {
            // `metav1.Time` keeps whole seconds: the fault's second is truncated alike.
            let seconds = t.0.as_second() - fault.as_second();
            format!("{seconds} s")
        },
    )
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut text = format!(
            "# Operator failover: {}\n\nTest `{}`, Lease duration {} s, on the test bed \
             (real kube-apiserver, fake kubelet, pods as local processes).\n\n\
             | step | after the fault | measured as |\n| --- | --- | --- |\n",
            self.scenario, self.test, self.lease_seconds
        );
        for step in &self.steps {
            text.push_str(&format!(
                "| {} | {} | {} |\n",
                step.name,
                millis(step.after),
                step.how
            ));
        }
        text.push_str(&format!(
            "| write unavailability | {} | {} |\n",
            millis(self.write_unavailable),
            self.write_how
        ));
        if let Some(record) = &self.record {
            text.push_str(&format!(
                "\n`status.lastFailover` ({} → {}, reason {}, LSN gap {}), whole seconds after the fault: \
                 detected {}, fenced {}, promoted {}, service switched {}.\n",
                record.from.as_deref().unwrap_or("?"),
                record.to,
                record.reason,
                record
                    .lsn_gap_bytes
                    .map_or("unknown".to_string(), |g| format!("{g} bytes")),
                since_fault(self.fault_at, record.detected_at.as_ref()),
                since_fault(self.fault_at, record.fenced_at.as_ref()),
                since_fault(self.fault_at, record.promoted_at.as_ref()),
                since_fault(self.fault_at, record.service_switched_at.as_ref()),
            ));
        }
        for note in &self.notes {
            text.push_str(&format!("\n{note}\n"));
        }
        text
    }

    /// Writes `target/pgrs-reports/operator-failover-<test>.md` and returns its path.
    pub fn write(&self) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .map(|p| p.join("pgrs-reports"))
            .unwrap_or_else(|| PathBuf::from("target/pgrs-reports"));
        std::fs::create_dir_all(&dir).expect("create the report directory");
        let path = dir.join(format!("operator-failover-{}.md", self.test));
        let text = self.markdown();
        std::fs::write(&path, &text).expect("write the failover report");
        eprintln!("{text}\nfailover report: {}", path.display());
        path
    }
}

/// The longest gap between consecutive acknowledgements (sorted instants), at least from
/// `fault` on: the write outage the fault caused.
pub fn longest_gap(acks: &[std::time::Instant], fault: std::time::Instant) -> Option<Duration> {
    let mut sorted: Vec<_> = acks.to_vec();
    sorted.sort();
    let before = sorted.iter().rev().find(|a| **a <= fault).copied();
    let after: Vec<_> = sorted.iter().filter(|a| **a > fault).copied().collect();
    if after.is_empty() {
        return None;
    }
    let mut previous = before?;
    let mut longest = Duration::ZERO;
    for at in after {
        longest = longest.max(at.duration_since(previous));
        previous = at;
    }
    Some(longest)
}

/// When the cluster's status first left Healthy and first named another primary than `old`,
/// from `fault` on (polled every 100 ms for up to `limit`).
pub struct Watched {
    pub detected: Option<Duration>,
    pub promoted: Option<Duration>,
}

/// Watches `status.phase` and `status.currentPrimary` in the background from `fault` on.
pub fn watch_failover(
    client: kube::Client,
    ns: &str,
    cluster: &str,
    old: &str,
    fault: std::time::Instant,
    limit: Duration,
) -> tokio::task::JoinHandle<Watched> {
    let api: kube::Api<pgrs::api::PgReplicaSet> = kube::Api::namespaced(client, ns);
    let (cluster, old) = (cluster.to_string(), old.to_string());
    tokio::spawn(async move {
        let mut watched = Watched {
            detected: None,
            promoted: None,
        };
        while fault.elapsed() < limit {
            if let Ok(Some(status)) = api.get(&cluster).await.map(|c| c.status) {
                if watched.detected.is_none() && status.phase != Some(pgrs::api::Phase::Healthy) {
                    watched.detected = Some(fault.elapsed());
                }
                if status.current_primary.as_ref().is_some_and(|p| *p != old) {
                    watched.promoted = Some(fault.elapsed());
                    watched.detected.get_or_insert(fault.elapsed());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watched
    })
}

/// One step of a repeated scenario: its name, how it is measured, and its time after the
/// request (or fault) in each round (`None`: not seen in that round).
pub struct RoundStep {
    pub name: &'static str,
    pub how: &'static str,
    pub rounds: Vec<Option<Duration>>,
}

/// The p50 (lower median) and the maximum of the rounds that saw a step.
pub fn p50_max(values: &[Option<Duration>]) -> Option<(Duration, Duration)> {
    let mut seen: Vec<Duration> = values.iter().flatten().copied().collect();
    seen.sort();
    let max = *seen.last()?;
    Some((seen[(seen.len() - 1) / 2], max))
}

/// A step-by-step timing table over several rounds of the same scenario:
/// `target/pgrs-reports/operator-failover-<test>.md`.
pub struct RoundsReport {
    pub test: &'static str,
    pub scenario: &'static str,
    pub lease_seconds: u64,
    pub steps: Vec<RoundStep>,
    pub notes: Vec<String>,
}

impl RoundsReport {
    pub fn markdown(&self) -> String {
        let rounds = self.steps.iter().map(|s| s.rounds.len()).max().unwrap_or(0);
        let mut text = format!(
            "# Operator failover: {}\n\nTest `{}`, {rounds} round(s), Lease duration {} s, on the \
             test bed (real kube-apiserver and controller-manager, fake kubelet, pods as local \
             processes). Times after the request, p50 (lower median) and max over the rounds.\n\n\
             | step | p50 | max | each round | measured as |\n| --- | --- | --- | --- | --- |\n",
            self.scenario, self.test, self.lease_seconds
        );
        for step in &self.steps {
            let (p50, max) =
                p50_max(&step.rounds).map_or((None, None), |(p, m)| (Some(p), Some(m)));
            let each: Vec<String> = step
                .rounds
                .iter()
                .map(|d| d.map_or("—".to_string(), |d| d.as_millis().to_string()))
                .collect();
            text.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                step.name,
                millis(p50),
                millis(max),
                each.join(", "),
                step.how
            ));
        }
        for note in &self.notes {
            text.push_str(&format!("\n{note}\n"));
        }
        text
    }

    /// Writes `target/pgrs-reports/operator-failover-<test>.md` and returns its path.
    pub fn write(&self) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .map(|p| p.join("pgrs-reports"))
            .unwrap_or_else(|| PathBuf::from("target/pgrs-reports"));
        std::fs::create_dir_all(&dir).expect("create the report directory");
        let path = dir.join(format!("operator-failover-{}.md", self.test));
        let text = self.markdown();
        std::fs::write(&path, &text).expect("write the failover report");
        eprintln!("{text}\nfailover report: {}", path.display());
        path
    }
}

/// The first line of an operator log (text format: an RFC 3339 timestamp first) at or after
/// `since` (wall clock) that contains every one of `needles`; its time after `since`.
pub fn log_step(
    log: &str,
    since: k8s_openapi::jiff::Timestamp,
    until: Option<k8s_openapi::jiff::Timestamp>,
    needles: &[&str],
) -> Option<Duration> {
    log.lines().find_map(|line| {
        let at: k8s_openapi::jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
        if at < since || until.is_some_and(|u| at >= u) || !needles.iter().all(|n| line.contains(n))
        {
            return None;
        }
        Duration::try_from(at.duration_since(since)).ok()
    })
}

/// `uptime`'s load averages, for the report (the figures depend on the machine's load).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}
