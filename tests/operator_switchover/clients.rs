//! The clients of `operator_switchover`: a watch of `-rw`'s EndpointSlice and a writer through
//! `-rw` that logs in as the application's owner, as an application does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use pgrs_testbed::wait::eventually;

use crate::operator_support::endpoint_addresses;

const CLUSTER: &str = "pg";

/// When `-rw`'s ready addresses changed, and to what.
type RwChange = (Instant, Vec<String>);

/// The ready addresses of `-rw` each time they changed, polled every 10 ms.
pub struct RwWatch {
    changes: Arc<Mutex<Vec<RwChange>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RwWatch {
    pub fn start(client: Client, ns: String) -> RwWatch {
        let changes = Arc::new(Mutex::new(Vec::<RwChange>::new()));
        let task = {
            let changes = changes.clone();
            tokio::spawn(async move {
                loop {
                    let addresses = endpoint_addresses(&client, &ns, "pg-rw").await;
                    {
                        let mut changes = changes.lock().expect("changes");
                        if changes.last().map(|(_, a)| a) != Some(&addresses) {
                            changes.push((Instant::now(), addresses));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        RwWatch { changes, task }
    }

    /// When, after `since`, `-rw` first selected one address other than `old`, and which.
    pub fn selects_other(&self, old: &str, since: Instant) -> Option<(Duration, String)> {
        self.changes
            .lock()
            .expect("changes")
            .iter()
            .find(|(at, addresses)| *at >= since && addresses.len() == 1 && addresses[0] != old)
            .map(|(at, addresses)| (at.duration_since(since), addresses[0].clone()))
    }

    /// When, after `since`, `-rw` first selected only `address`.
    pub fn selects_only(&self, address: &str, since: Instant) -> Option<Duration> {
        self.changes
            .lock()
            .expect("changes")
            .iter()
            .find(|(at, addresses)| *at >= since && addresses.as_slice() == [address])
            .map(|(at, _)| at.duration_since(since))
    }
}

impl Drop for RwWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `<cluster>-app` Secret's keys (username, password, dbname, port).
pub async fn app_secret(client: &Client, ns: &str) -> BTreeMap<String, String> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{CLUSTER}-app"))
        .await
        .expect("read the Secret pg-app")
        .data
        .expect("Secret data")
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("UTF-8 value")))
        .collect()
}

/// Logs in as the application's owner (what a client of `-rw` does) on `host`.
pub async fn login(
    host: &str,
    app: &BTreeMap<String, String>,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(5432)
        .user(&app["username"])
        .password(&app["password"])
        .dbname(&app["dbname"])
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(2));
    let tls = pgrs::tls::encrypt_only_connector().map_err(|e| e.to_string())?;
    let (client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| format!("log in on {host}: {e:?}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// (id, address, when acknowledged).
pub type Acked = (i64, String, Instant);

/// A client of `-rw`: INSERTs ids 1, 2, … every 20 ms on one session to the address the
/// `-rw` EndpointSlice names; on any failure it drops the session and looks the address up
/// again (every 20 ms).
pub struct AppWriter {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl AppWriter {
    pub fn start(client: Client, ns: String, app: BTreeMap<String, String>) -> AppWriter {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut next_id = 1i64;
                let mut session: Option<(String, tokio_postgres::Client)> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if session.is_none()
                        && let [address] =
                            endpoint_addresses(&client, &ns, "pg-rw").await.as_slice()
                        && let Ok(db) = login(address, &app).await
                    {
                        session = Some((address.clone(), db));
                    }
                    if let Some((address, db)) = &session {
                        let id = next_id;
                        next_id += 1;
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                        let insert = db.execute("INSERT INTO t (id) VALUES ($1)", &params);
                        match tokio::time::timeout(Duration::from_secs(2), insert).await {
                            Ok(Ok(_)) => acked.lock().expect("acked").push((
                                id,
                                address.clone(),
                                Instant::now(),
                            )),
                            _ => session = None,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        AppWriter { acked, stop, task }
    }

    pub fn acked(&self) -> Vec<Acked> {
        self.acked.lock().expect("acked").clone()
    }

    pub async fn wait_writes_flow(&self) {
        eventually(
            "writes flow through -rw",
            Duration::from_secs(60),
            || async {
                let count = self.acked().len();
                (count >= 20)
                    .then_some(())
                    .ok_or(format!("{count} acknowledged"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn finish(self) -> Vec<Acked> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = self.acked.clone();
        let _ = self.task.await;
        acked.lock().expect("acked").clone()
    }
}
