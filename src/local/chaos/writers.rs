//! The writers of `pgrs local chaos`, recording a write history for the checker
//! ([`crate::chaos::check`]):
//!
//! * one writer through the **write endpoint**, as an application writes: it learns which node
//!   a connection landed on (`current_setting('port')`) and attributes its writes to that node;
//!   the per-round unavailability is measured on its acknowledgements;
//! * one writer **straight to every node's postgres port**: a node that still acknowledges
//!   writes after it was superseded is seen, and each node's refusals (a replica's read-only
//!   error, a refused or not-yet-accepted connection) mark where its terms as primary end.
//!
//! Every attempt gets an id unique over the run (one counter for all writers) and its sent and
//! answered instants since one `Instant` base. Each writer reconnects after errors; connection
//! attempts and INSERTs are bounded by timeouts, past which the outcome is indeterminate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::chaos::{WriteOutcome, WriteRecord};
use crate::local::layout::LocalConfig;

use super::load::connection_string;

/// Between two writes through the write endpoint (as the load before the checker).
pub const ENDPOINT_PAUSE: Duration = Duration::from_millis(2);
/// Between two write attempts of a writer straight to one node.
pub const DIRECT_PERIOD: Duration = Duration::from_millis(20);
/// A connection attempt without an answer by then is given up: indeterminate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An INSERT without an answer by then is given up: indeterminate, and its session dropped.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

const INSERT: &str = "INSERT INTO pgrs_chaos (id) VALUES ($1)";

/// Which writer made an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the write endpoint (the node is where the connection landed).
    Endpoint,
    /// Straight to the node's postgres port.
    Direct,
}

/// One write attempt of the history, with the writer that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub via: Via,
    pub write: WriteRecord,
}

pub use crate::chaos::outcome_of;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What every writer task shares: the clock base, the history, the id counter, the stop flag.
#[derive(Clone)]
struct Shared {
    start: Instant,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    next_id: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// A fresh id and the instant it is sent at.
    fn next(&self) -> (i64, Duration) {
        (
            self.next_id.fetch_add(1, Ordering::SeqCst),
            self.start.elapsed(),
        )
    }

    fn record(&self, via: Via, node: &str, id: i64, sent: Duration, outcome: WriteOutcome) {
        let write = WriteRecord {
            id,
            node: node.to_string(),
            sent,
            answered: self.start.elapsed(),
            outcome,
        };
        lock(&self.attempts).push(Attempt { via, write });
    }
}

/// Connects within [`CONNECT_TIMEOUT`]; the outcome of the attempt when that fails.
async fn connect(conninfo: &str) -> Result<Client, WriteOutcome> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(conninfo, NoTls)).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(error)) => Err(outcome_of(&error)),
        Err(_) => Err(WriteOutcome::Indeterminate),
    }
}

/// One INSERT within [`ANSWER_TIMEOUT`]: its outcome, and whether the session stays usable
/// (only after a read-only refusal).
async fn insert(client: &Client, id: i64) -> (WriteOutcome, bool) {
    match tokio::time::timeout(ANSWER_TIMEOUT, client.execute(INSERT, &[&id])).await {
        Ok(Ok(_)) => (WriteOutcome::Acknowledged, true),
        Ok(Err(error)) => {
            let keep = error
                .code()
                .is_some_and(|code| *code == SqlState::READ_ONLY_SQL_TRANSACTION);
            (outcome_of(&error), keep)
        }
        Err(_) => (WriteOutcome::Indeterminate, false),
    }
}

/// A writer straight to `node`'s postgres: one attempt per [`DIRECT_PERIOD`], a failed
/// connection attempt recorded as a write attempt (refused or indeterminate) too.
async fn direct_writer(shared: Shared, node: String, conninfo: String) {
    let mut session: Option<Client> = None;
    while !shared.stopped() {
        let (id, sent) = shared.next();
        if session.as_ref().is_some_and(Client::is_closed) {
            session = None;
        }
        let client = match session.take() {
            Some(client) => Ok(client),
            None => connect(&conninfo).await,
        };
        let outcome = match client {
            Ok(client) => {
                let (outcome, keep) = insert(&client, id).await;
                if keep {
                    session = Some(client);
                }
                outcome
            }
            Err(outcome) => outcome,
        };
        shared.record(Via::Direct, &node, id, sent, outcome);
        tokio::time::sleep(DIRECT_PERIOD).await;
    }
}

/// Connects through the write endpoint and asks postgres which node it is (its port).
async fn connect_endpoint(
    conninfo: &str,
    nodes: &BTreeMap<u16, String>,
) -> Option<(Client, String)> {
    let client = connect(conninfo).await.ok()?;
    let asked = tokio::time::timeout(
        ANSWER_TIMEOUT,
        client.query_one("SELECT current_setting('port')::int", &[]),
    )
    .await;
    let port: i32 = match asked {
        Ok(Ok(row)) => row.try_get(0).ok()?,
        _ => return None,
    };
    let node = u16::try_from(port).ok().and_then(|p| nodes.get(&p))?;
    Some((client, node.clone()))
}

/// The writer through the write endpoint: inserts one row after another (pausing
/// [`ENDPOINT_PAUSE`]), reconnecting after any failure. A failed connection is not a write
/// attempt (the node behind the endpoint is unknown then).
async fn endpoint_writer(shared: Shared, conninfo: String, nodes: BTreeMap<u16, String>) {
    while !shared.stopped() {
        let Some((client, node)) = connect_endpoint(&conninfo, &nodes).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !shared.stopped() {
            let (id, sent) = shared.next();
            let (outcome, _) = insert(&client, id).await;
            shared.record(Via::Endpoint, &node, id, sent, outcome);
            if outcome != WriteOutcome::Acknowledged {
                break;
            }
            tokio::time::sleep(ENDPOINT_PAUSE).await;
        }
    }
}

/// The writers of a run: one through the write endpoint, one straight to each node.
pub struct Writers {
    shared: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts the writers on `config`'s cluster, ids from `first_id` upwards, instants since
    /// `start`.
    pub fn start(config: &LocalConfig, password: &str, first_id: i64, start: Instant) -> Writers {
        let shared = Shared {
            start,
            attempts: Arc::new(Mutex::new(Vec::new())),
            next_id: Arc::new(AtomicI64::new(first_id)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let nodes: BTreeMap<u16, String> = config
            .nodes
            .iter()
            .map(|n| (n.pg_port, n.name.clone()))
            .collect();
        let mut tasks = vec![tokio::spawn(endpoint_writer(
            shared.clone(),
            connection_string(config.write_port, &config.superuser, password),
            nodes,
        ))];
        for node in &config.nodes {
            tasks.push(tokio::spawn(direct_writer(
                shared.clone(),
                node.name.clone(),
                connection_string(node.pg_port, &config.superuser, password),
            )));
        }
        tracing::info!(
            writers = tasks.len(),
            first_id,
            "chaos writers started: one through the write endpoint, one per node"
        );
        Writers { shared, tasks }
    }

    /// Writes acknowledged through the write endpoint that were sent at or after `since`.
    pub fn endpoint_acknowledged_since(&self, since: Instant) -> usize {
        let since = since.saturating_duration_since(self.shared.start);
        lock(&self.shared.attempts)
            .iter()
            .filter(|a| {
                a.via == Via::Endpoint
                    && a.write.outcome == WriteOutcome::Acknowledged
                    && a.write.sent >= since
            })
            .count()
    }

    /// The history so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        lock(&self.shared.attempts).clone()
    }

    /// Stops every writer (each ends within its timeouts) and returns the history.
    pub async fn stop(self) -> Vec<Attempt> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            if let Err(error) = tokio::time::timeout(Duration::from_secs(15), task).await {
                tracing::warn!(%error, "a chaos writer did not stop in time");
            }
        }
        lock(&self.shared.attempts).clone()
    }
}

/// The endpoint writer's attempts as [`super::WriteRecord`]s on `start`'s clock, for the
/// per-round unavailability through the write endpoint.
pub fn endpoint_records(attempts: &[Attempt], start: Instant) -> Vec<super::WriteRecord> {
    attempts
        .iter()
        .filter(|a| a.via == Via::Endpoint)
        .map(|a| super::WriteRecord {
            id: a.write.id,
            started: start + a.write.sent,
            finished: start + a.write.answered,
            acknowledged: a.write.outcome == WriteOutcome::Acknowledged,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_a_refusal() {
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let outcome = connect(&connection_string(port, "postgres", "x"))
            .await
            .err();
        assert_eq!(outcome, Some(WriteOutcome::Refused));
    }

    #[test]
    fn endpoint_records_keep_only_the_endpoint_writer() {
        let start = Instant::now();
        let attempt = |via, id, outcome| Attempt {
            via,
            write: WriteRecord {
                id,
                node: "node0".to_string(),
                sent: Duration::from_millis(id as u64),
                answered: Duration::from_millis(id as u64 + 1),
                outcome,
            },
        };
        let attempts = vec![
            attempt(Via::Endpoint, 1, WriteOutcome::Acknowledged),
            attempt(Via::Direct, 2, WriteOutcome::Acknowledged),
            attempt(Via::Endpoint, 3, WriteOutcome::Indeterminate),
        ];
        let records = endpoint_records(&attempts, start);
        assert_eq!(records.len(), 2);
        assert!(records[0].acknowledged && !records[1].acknowledged);
        assert_eq!(records[1].finished, start + Duration::from_millis(4));
    }
}
