//! Writers straight to every pod's postgres (not through `-rw`, as the application owner of
//! `<cluster>-app`: remote superuser logins are refused), for the partition tests
//! (`operator_partition`, `operator_partition_observe`): every attempt is recorded as a
//! `pgrs::chaos::WriteRecord` on one clock for the Jepsen-style checker, and a superseded
//! primary that still acknowledges writes is seen. Also the guard that heals a pod's network
//! faults. Included with `#[path = "operator_support/writers.rs"] mod writers;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrs::chaos::{WriteOutcome, WriteRecord};
use pgrs_testbed::faults::PodNet;

use crate::operator_support::Login;

/// Between two write attempts of one writer.
pub const WRITE_PERIOD: Duration = Duration::from_millis(50);
/// A connection attempt or an INSERT without an answer by then is indeterminate.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

pub use pgrs::chaos::outcome_of;

async fn connect_raw(host: &str, login: &Login) -> Result<tokio_postgres::Client, WriteOutcome> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(5432)
        .user(&login.user)
        .password(&login.password)
        .dbname(&login.dbname)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(ANSWER_TIMEOUT);
    // Pods refuse plain connections from the pod network (`hostnossl ... reject`).
    let Ok(tls) = pgrs::tls::encrypt_only_connector() else {
        return Err(WriteOutcome::Indeterminate);
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, config.connect(tls)).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(outcome_of(&e)),
        Err(_) => Err(WriteOutcome::Indeterminate),
    }
}

/// One writer per pod, each on its own reconnecting connection to the pod IP, INSERTing
/// unique ids into `t (id)` every 50 ms and recording every attempt on one clock (`start`).
/// An INSERT without an answer within 1 s is recorded as indeterminate and its connection
/// dropped (its backend may still commit it).
pub struct Writers {
    records: Arc<Mutex<Vec<WriteRecord>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `pods`: pod name → pod IP.
    pub fn start(pods: &BTreeMap<String, String>, login: &Login, start: Instant) -> Writers {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicI64::new(1));
        let tasks = pods
            .iter()
            .map(|(pod, ip)| {
                let (pod, ip, login) = (pod.clone(), ip.clone(), login.clone());
                let (records, stop, next_id) = (records.clone(), stop.clone(), next_id.clone());
                tokio::spawn(async move {
                    let mut db: Option<tokio_postgres::Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let sent = start.elapsed();
                        let outcome = match &db {
                            None => match connect_raw(&ip, &login).await {
                                Ok(client) => {
                                    db = Some(client);
                                    None
                                }
                                Err(outcome) => Some(outcome),
                            },
                            Some(_) => None,
                        };
                        let outcome = match (outcome, &db) {
                            (Some(outcome), _) => outcome,
                            (None, Some(client)) => {
                                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                                let insert =
                                    client.execute("INSERT INTO t (id) VALUES ($1)", &params);
                                match tokio::time::timeout(ANSWER_TIMEOUT, insert).await {
                                    Ok(Ok(_)) => WriteOutcome::Acknowledged,
                                    Ok(Err(e)) => {
                                        let outcome = outcome_of(&e);
                                        // A read-only refusal keeps the session usable.
                                        if e.code().is_none() || outcome != WriteOutcome::Refused {
                                            db = None;
                                        }
                                        outcome
                                    }
                                    Err(_) => {
                                        db = None;
                                        WriteOutcome::Indeterminate
                                    }
                                }
                            }
                            (None, None) => unreachable!("connected above"),
                        };
                        records.lock().expect("records").push(WriteRecord {
                            id,
                            node: pod.clone(),
                            sent,
                            answered: start.elapsed(),
                            outcome,
                        });
                        tokio::time::sleep(WRITE_PERIOD).await;
                    }
                })
            })
            .collect();
        Writers {
            records,
            stop,
            tasks,
        }
    }

    pub fn acknowledged_by(&self, pod: &str) -> usize {
        self.records
            .lock()
            .expect("records")
            .iter()
            .filter(|r| r.node == pod && r.outcome == WriteOutcome::Acknowledged)
            .count()
    }

    /// The attempts recorded so far.
    pub fn records(&self) -> Vec<WriteRecord> {
        self.records.lock().expect("records").clone()
    }

    pub async fn finish(self) -> Vec<WriteRecord> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.records.lock().expect("records").clone()
    }
}

/// Heals every cut of the pod on drop (also when the test fails).
pub struct Healer(pub PodNet);

impl Drop for Healer {
    fn drop(&mut self) {
        if let Err(e) = self.0.heal_all() {
            eprintln!("heal {}: {e}", self.0.pod());
        }
    }
}
