//! The write load through the write endpoint that the `pgrs local` end-to-end tests use
//! (`WriteLoad`: acknowledged or not, nothing more), the table it writes to, and the figures
//! computed from it. `pgrs local chaos` itself records a full history with
//! [`super::writers`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_postgres::NoTls;

/// One write as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct WriteRecord {
    pub id: i64,
    pub started: Instant,
    pub finished: Instant,
    pub acknowledged: bool,
}

/// A continuous insert load through an address (the write endpoint); every acknowledged id is
/// recorded. Reconnects after any error.
pub struct WriteLoad {
    records: Arc<Mutex<Vec<WriteRecord>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn connection_string(port: u16, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres connect_timeout=2"
    )
}

/// Creates the table the load writes to (idempotent), retrying for a few seconds while the
/// write endpoint has no primary.
pub async fn prepare_table(conninfo: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
                .await
                .context("failed to connect to the write endpoint")?;
            tokio::spawn(connection);
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS pgrs_chaos (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())",
                )
                .await
                .context("failed to create table pgrs_chaos")?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl WriteLoad {
    /// Starts inserting ids from `first_id` upwards, one at a time, pausing `pause` between writes.
    pub fn start(conninfo: String, first_id: i64, pause: Duration) -> WriteLoad {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let records = records.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut next_id = first_id;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let connected = tokio::time::timeout(
                        Duration::from_secs(3),
                        tokio_postgres::connect(&conninfo, NoTls),
                    )
                    .await;
                    let client = match connected {
                        Ok(Ok((client, connection))) => {
                            tokio::spawn(connection);
                            client
                        }
                        _ => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let id = next_id;
                        next_id += 1;
                        let started = Instant::now();
                        let result = tokio::time::timeout(
                            Duration::from_secs(5),
                            client.execute("INSERT INTO pgrs_chaos (id) VALUES ($1)", &[&id]),
                        )
                        .await;
                        let acknowledged = matches!(result, Ok(Ok(1)));
                        lock(&records).push(WriteRecord {
                            id,
                            started,
                            finished: Instant::now(),
                            acknowledged,
                        });
                        if !acknowledged {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        };
        WriteLoad {
            records,
            stop,
            task,
        }
    }

    pub fn records(&self) -> Vec<WriteRecord> {
        lock(&self.records).clone()
    }

    pub fn acknowledged_since(&self, since: Instant) -> usize {
        lock(&self.records)
            .iter()
            .filter(|r| r.acknowledged && r.started >= since)
            .count()
    }

    pub async fn stop(self) -> Vec<WriteRecord> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        lock(&self.records).clone()
    }
}

/// The longest gap between two consecutive acknowledged writes finishing in
/// [`from`, `to`] (plus the last one before `from`): the write-unavailability window.
pub fn unavailability(records: &[WriteRecord], from: Instant, to: Instant) -> Option<Duration> {
    let acked: Vec<Instant> = records
        .iter()
        .filter(|r| r.acknowledged)
        .map(|r| r.finished)
        .collect();
    let before = acked.iter().copied().filter(|t| *t < from).max()?;
    let mut previous = before;
    let mut widest = Duration::ZERO;
    for t in acked.into_iter().filter(|t| *t >= from && *t <= to) {
        widest = widest.max(t.saturating_duration_since(previous));
        previous = t;
    }
    Some(widest)
}

/// Which acknowledged ids are missing from the table on `conninfo` (the final primary).
pub async fn missing_acknowledged(
    conninfo: &str,
    acknowledged: &[i64],
) -> anyhow::Result<Vec<i64>> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .context("failed to connect to check acknowledged writes")?;
    tokio::spawn(connection);
    let rows = client
        .query("SELECT id FROM pgrs_chaos", &[])
        .await
        .context("failed to read pgrs_chaos")?;
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    Ok(acknowledged
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect())
}
