//! Sampling the three nodes, the persisted lease and the target's agent every ~100 ms.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NodeState {
    /// No connection (postgres down, or no answer within 1.5 s).
    Down,
    /// Connected, `pg_is_in_recovery()` = true.
    Recovery,
    /// Out of recovery and the INSERT committed.
    Writable,
    /// Out of recovery but the INSERT failed (shutting down, …).
    NotWritable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lease {
    pub(super) holder: Option<String>,
    pub(super) version: String,
    pub(super) renewed_at_ms: Option<i64>,
}

/// What `GET /v1/status` of the target's agent said (the fields the timeline needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AgentView {
    pub(super) role: Role,
    pub(super) intended_role: Role,
    pub(super) in_recovery: Option<bool>,
    pub(super) fence_reason: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct Tick {
    /// Wall clock (ms) when the samples were issued: a write acknowledged in this tick was
    /// committed no earlier than this.
    pub(super) at_ms: i64,
    pub(super) lease_before: Option<Lease>,
    pub(super) lease_after: Option<Lease>,
    pub(super) states: Vec<(String, NodeState)>,
    pub(super) target_agent: Option<AgentView>,
}

pub(super) fn read_lease(cluster: &Cluster) -> Option<Lease> {
    read_lease_file(&cluster.layout().lease())
}

/// The persisted lease record (`lease.json`, written before every answer of the lease service).
pub(super) fn read_lease_file(path: &std::path::Path) -> Option<Lease> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let record = &value["record"];
    Some(Lease {
        holder: record["holder"].as_str().map(str::to_string),
        version: record["version"].as_str()?.to_string(),
        renewed_at_ms: record["renewedAt"].as_str().and_then(|at| {
            chrono::DateTime::parse_from_rfc3339(at)
                .ok()
                .map(|t| t.timestamp_millis())
        }),
    })
}

/// One fresh connection: recovery state, and an INSERT when out of recovery.
pub(super) async fn sample(conninfo: String, node: String) -> NodeState {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.ok()?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .ok()?;
        if row.get::<_, bool>(0) {
            return Some(NodeState::Recovery);
        }
        Some(
            match client
                .execute(
                    "INSERT INTO held_back_probe (node) VALUES ($1)",
                    &[&node.as_str()],
                )
                .await
            {
                Ok(_) => NodeState::Writable,
                Err(_) => NodeState::NotWritable,
            },
        )
    };
    tokio::time::timeout(Duration::from_millis(1500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(NodeState::Down)
}

pub(super) async fn agent_view(client: &AgentClient) -> Option<AgentView> {
    let status: AgentStatus = tokio::time::timeout(Duration::from_millis(1500), client.status())
        .await
        .ok()?
        .ok()?;
    Some(AgentView {
        role: status.role,
        intended_role: status.intended_role,
        in_recovery: status.in_recovery,
        fence_reason: status.fence_reason,
    })
}

/// Samples every node every [`SAMPLE_EVERY`] until `stop` is set.
pub(super) fn start_sampler(
    cluster: &Cluster,
    nodes: Vec<String>,
    target_agent: AgentClient,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Tick>> {
    let conninfos: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.clone(), cluster.node_conninfo(n)))
        .collect();
    let lease_path = cluster.layout().lease();
    tokio::spawn(async move {
        let mut ticks = Vec::new();
        while !*stop.borrow() {
            let started = Instant::now();
            let lease_before = read_lease_file(&lease_path);
            let at_ms = now_ms();
            let samples = futures::future::join_all(
                conninfos
                    .iter()
                    .map(|(node, conninfo)| sample(conninfo.clone(), node.clone())),
            );
            let (states, agent) = tokio::join!(samples, agent_view(&target_agent));
            let lease_after = read_lease_file(&lease_path);
            ticks.push(Tick {
                at_ms,
                lease_before,
                lease_after,
                states: nodes.iter().cloned().zip(states).collect(),
                target_agent: agent,
            });
            tokio::time::sleep(SAMPLE_EVERY.saturating_sub(started.elapsed())).await;
        }
        ticks
    })
}

pub(super) async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `timeout`.
pub(super) async fn wait_for<F, Fut>(what: &str, timeout: Duration, cluster: &Cluster, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {} s\n{}",
            timeout.as_secs(),
            cluster.controller_log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's log lines about fencing and the lease (renewal failures, the fence itself).
pub(super) fn fencing_log_lines(cluster: &Cluster, node: &str) -> Vec<String> {
    std::fs::read_to_string(cluster.layout().agent_log(node))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("fenc")
                || l.contains("renewal")
                || l.contains("promot")
                || l.contains("watchdog")
        })
        .map(|l| l.chars().take(400).collect())
        .collect()
}
