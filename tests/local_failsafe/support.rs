//! What the three scenarios share: the cluster with its writers, freezing a process (thawed on
//! drop), the agents' statuses, and figures over the write history.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgrs::chaos::{WriteOutcome, WriteRecord};
use pgrs::local::chaos::prepare_table;
use pgrs::local::chaos::writers::{Attempt, Via, Writers};
use pgrs::local::status::LocalStatus;
use pgrs::protocol::api::AgentStatus;
use pgrs::protocol::client::AgentClient;

use super::local_support::{Cluster, now_ms};

/// A process stopped with SIGSTOP; SIGCONT on [`Frozen::thaw`] or on drop, so that a failing
/// test never leaves the controller frozen for `pgrs local down`.
pub struct Frozen {
    pid: i32,
    what: String,
    thawed: bool,
}

impl Frozen {
    pub fn freeze(pid: i32, what: &str) -> Frozen {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap_or_else(|e| panic!("SIGSTOP {what}: {e}"));
        Frozen {
            pid,
            what: what.to_string(),
            thawed: false,
        }
    }

    pub fn thaw(&mut self) {
        if !self.thawed {
            kill(Pid::from_raw(self.pid), Signal::SIGCONT)
                .unwrap_or_else(|e| panic!("SIGCONT {}: {e}", self.what));
            self.thawed = true;
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        }
    }
}

/// A healthy cluster under the chaos writers (one through the write endpoint, one straight to
/// each node's postgres, every 20 ms), with a client for every agent.
pub struct Run {
    name: String,
    pub cluster: Cluster,
    pub primary: String,
    pub replicas: Vec<String>,
    pub agents: BTreeMap<String, AgentClient>,
    /// The writers' clock base.
    pub start: Instant,
    writers: Option<Writers>,
}

impl Run {
    /// `pgrs local up` (2 replicas, async, default lease profile, `extra` flags), healthy, the
    /// writers started and acknowledged on the primary; with the failsafe on, armed (the member
    /// list written in the lease).
    pub async fn up(name: &str, extra: &[&str]) -> Run {
        let cluster = Cluster::up(2, extra);
        let status = cluster.wait_healthy(Duration::from_secs(90)).await;
        let primary = status.primary.clone().expect("a primary");
        let replicas: Vec<String> = (status.nodes.iter())
            .map(|n| n.name.clone())
            .filter(|n| *n != primary)
            .collect();
        assert_eq!(replicas.len(), 2, "two replicas: {:?}", status.nodes);
        let config = cluster.layout().read_config().expect("config");
        let agents = (config.nodes.iter())
            .map(|n| {
                let client = AgentClient::new(config.agent_url(n), Some(cluster.token()))
                    .expect("agent client");
                (n.name.clone(), client)
            })
            .collect();
        prepare_table(&cluster.write_conninfo())
            .await
            .expect("create the table");
        let start = Instant::now();
        let writers = Writers::start(&config, &cluster.superuser_password(), 1, start);
        let run = Run {
            name: name.to_string(),
            cluster,
            primary,
            replicas,
            agents,
            start,
            writers: Some(writers),
        };
        if !extra.contains(&"--no-failsafe") {
            run.wait_agent(
                &run.primary,
                "failsafe armed",
                Duration::from_secs(30),
                |s| s.failsafe.as_ref().is_some_and(|f| f.armed),
            )
            .await;
        }
        let warm = Instant::now();
        while acks(&run.attempts(), &run.primary).len() < 20 {
            assert!(
                warm.elapsed() < Duration::from_secs(30),
                "[{name}] the writer straight to {} got no acknowledgements",
                run.primary
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "[{name}] {} primary, replicas {:?}, writers acknowledged",
            run.primary, run.replicas
        );
        run
    }

    /// The agent's status within two seconds (`None`: no answer, e.g. frozen).
    pub async fn agent_status(&self, node: &str) -> Option<AgentStatus> {
        let client = &self.agents[node];
        tokio::time::timeout(Duration::from_secs(2), client.status())
            .await
            .ok()?
            .ok()
    }

    /// Waits until a status document the controller computed after `since_ms` (wall clock)
    /// shows the cluster healthy: right after a thaw it still serves the one it computed before
    /// the freeze.
    pub async fn wait_healthy_after(&self, since_ms: i64, timeout: Duration) -> LocalStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = pgrs::local::cli::cluster_status(&self.cluster.dir).await;
            if let Ok(status) = &status
                && status.updated_at.timestamp_millis() > since_ms
                && pgrs::local::cli::is_healthy(status)
            {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "[{}] not healthy within {} s: {status:?}\n{}",
                self.name,
                timeout.as_secs(),
                self.cluster.events_since(since_ms)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The persisted lease (the store writes it before answering): holder, version, renewal
    /// time, in one line.
    pub fn lease_line(&self) -> String {
        let text = std::fs::read_to_string(self.cluster.layout().lease()).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let record = &value["record"];
        format!(
            "holder {}, version {}, renewed at {}",
            record["holder"], record["version"], record["renewedAt"]
        )
    }

    /// Polls `node`'s agent until `accept` holds; panics with the last status after `timeout`.
    pub async fn wait_agent(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.agent_status(node).await;
            if let Some(status) = status.as_ref().filter(|s| accept(s)) {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{node}: {what} not seen within {} s; last status: {status:#?}\n{}",
                timeout.as_secs(),
                self.cluster.controller_log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The write history so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.writers
            .as_ref()
            .map(Writers::attempts)
            .unwrap_or_default()
    }

    /// Stops the writers; the whole history.
    pub async fn stop_writers(&mut self) -> Vec<Attempt> {
        match self.writers.take() {
            Some(writers) => writers.stop().await,
            None => Vec::new(),
        }
    }

    /// Now, on the writers' clock.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn controller_pid(&self) -> i32 {
        self.cluster
            .layout()
            .controller_pid()
            .expect("controller pid")
    }

    pub fn agent_pid(&self, node: &str) -> i32 {
        pgrs::local::layout::read_pid(&self.cluster.layout().agent_pid(node)).expect("agent pid")
    }

    /// The controller's events since `since_ms` (wall clock) whose message names `action`.
    pub fn actions_since(&self, since_ms: i64, action: &str) -> Vec<String> {
        (self.cluster.events().iter())
            .filter(|e| super::local_support::wall_ms(&e["at"]) >= since_ms)
            .filter(|e| e["reason"] == "Action")
            .filter_map(|e| e["message"].as_str())
            .filter(|m| m.contains(action))
            .map(str::to_string)
            .collect()
    }

    /// When `node`'s keeper (or watchdog) logged the fence, wall clock ms after `since_ms`.
    pub fn fenced_after(&self, node: &str, since_ms: i64) -> Option<i64> {
        std::fs::read_to_string(self.cluster.layout().agent_log(node))
            .ok()?
            .lines()
            .filter(|l| l.contains("fencing: stopping postgres immediately"))
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.timestamp_millis() - since_ms)
            .find(|after| *after >= 0)
    }

    /// `node`'s agent log lines about the lease, the failsafe and fencing, for a report.
    pub fn keeper_log(&self, node: &str, since_ms: i64) -> Vec<String> {
        std::fs::read_to_string(self.cluster.layout().agent_log(node))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                ["failsafe", "fenc", "renew", "confirm"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .filter(|l| {
                (l.split_whitespace().next())
                    .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                    .is_some_and(|at| at.timestamp_millis() >= since_ms - 2000)
            })
            .map(|l| l.chars().take(300).collect())
            .collect()
    }
}

/// The logs (controller, events, agents) are kept in `target/test-output/local_failsafe_<name>`.
impl Drop for Run {
    fn drop(&mut self) {
        let kept = self
            .cluster
            .keep_logs(&format!("local_failsafe_{}", self.name));
        eprintln!("[{}] logs kept in {}", self.name, kept.display());
    }
}

/// Wall clock now, for the agents' and controller's logs.
pub fn wall_now() -> i64 {
    now_ms()
}

/// The direct writer's history to `node` (not the write endpoint's).
pub fn direct(attempts: &[Attempt], node: &str) -> Vec<WriteRecord> {
    attempts
        .iter()
        .filter(|a| a.via == Via::Direct && a.write.node == node)
        .map(|a| a.write.clone())
        .collect()
}

/// When `node` acknowledged the direct writer's writes, ascending.
pub fn acks(attempts: &[Attempt], node: &str) -> Vec<Duration> {
    let mut acks: Vec<Duration> = direct(attempts, node)
        .iter()
        .filter_map(WriteRecord::acknowledged_at)
        .collect();
    acks.sort();
    acks
}

/// The longest stretch of `[from, to]` without an acknowledgement in `acks` (sorted), and when
/// it began.
pub fn longest_gap(acks: &[Duration], from: Duration, to: Duration) -> (Duration, Duration) {
    let mut points = vec![from];
    points.extend(acks.iter().copied().filter(|a| *a > from && *a < to));
    points.push(to);
    points
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or_default()
}

/// How the direct writes to `node` within `[from, to]` (by send instant) ended.
pub fn outcomes(attempts: &[Attempt], node: &str, from: Duration, to: Duration) -> String {
    let writes = direct(attempts, node);
    let within = writes.iter().filter(|w| w.sent >= from && w.sent <= to);
    let count = |o: WriteOutcome| within.clone().filter(|w| w.outcome == o).count();
    format!(
        "{} acknowledged, {} refused, {} indeterminate",
        count(WriteOutcome::Acknowledged),
        count(WriteOutcome::Refused),
        count(WriteOutcome::Indeterminate)
    )
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
