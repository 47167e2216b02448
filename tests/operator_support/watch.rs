//! Background watchers of the operator chaos tests: the operator's `/metrics` (reconcile rounds
//! started and finished), which pods' postgres accept writes (split-brain detector), and the
//! operator leader-election Lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use pgrs_testbed::TestBed;

use super::{OperatorProcess, connect};

/// The operators' leader-election Lease (in the watched namespace).
pub const OPERATOR_LEASE: &str = "pgrs-operator";
/// Election timings (seconds) of `start_elected` operators, as in `operator_leader`.
pub const ELECTION_LEASE_SECONDS: u64 = 8;
pub const ELECTION_RENEW_DEADLINE_SECONDS: u64 = 5;
pub const ELECTION_RETRY_PERIOD_SECONDS: u64 = 1;

/// An operator taking part in leader election as `identity`, metrics on `port`.
pub fn start_elected(bed: &TestBed, ns: &str, identity: &str, port: u16) -> OperatorProcess {
    OperatorProcess::start_with(
        bed,
        ns,
        port,
        &[
            "--leader-election-identity",
            identity,
            "--leader-election-lease-duration",
            &ELECTION_LEASE_SECONDS.to_string(),
            "--leader-election-renew-deadline",
            &ELECTION_RENEW_DEADLINE_SECONDS.to_string(),
            "--leader-election-retry-period",
            &ELECTION_RETRY_PERIOD_SECONDS.to_string(),
        ],
    )
}

/// The holder of the operators' Lease; an error while there is none.
pub async fn operator_leader(client: &Client, ns: &str) -> Result<String, String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get(OPERATOR_LEASE)
        .await
        .map_err(|e| e.to_string())?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "the Lease has no holder".to_string())
}

/// The sum of every series of metric `name` (a bare name, or the `_sum`/`_count` series of a
/// histogram) on the operator's `/metrics` at `port`.
pub async fn metric(port: u16, name: &str) -> Result<f64, String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    metric_in(&text, name).ok_or_else(|| format!("{name} missing from {text}"))
}

fn metric_in(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name).then(|| value.trim().parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// One scrape of the operator's round counters.
#[derive(Debug, Clone, Copy)]
pub struct RoundSample {
    pub sent: Instant,
    pub received: Instant,
    /// `pgrs_operator_reconciles_total`: counted when a round starts.
    pub started: u64,
    /// `pgrs_reconcile_duration_seconds_count` / `_sum`: counted when a round ends.
    pub finished: u64,
    pub seconds: f64,
}

/// Scrapes the round counters of the operator at `port` every 100 ms until stopped.
pub struct RoundWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<RoundSample>>,
}

impl RoundWatch {
    pub fn start(port: u16) -> RoundWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let url = format!("http://127.0.0.1:{port}/metrics");
                    let text = async {
                        reqwest::Client::new()
                            .get(&url)
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await?
                            .text()
                            .await
                    }
                    .await;
                    let received = Instant::now();
                    if let Ok(text) = text
                        && let (Some(started), Some(finished), Some(seconds)) = (
                            metric_in(&text, "pgrs_operator_reconciles_total"),
                            metric_in(&text, "pgrs_reconcile_duration_seconds_count"),
                            metric_in(&text, "pgrs_reconcile_duration_seconds_sum"),
                        )
                    {
                        samples.push(RoundSample {
                            sent,
                            received,
                            started: started as u64,
                            finished: finished as u64,
                            seconds,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                samples
            })
        };
        RoundWatch { stop, task }
    }

    pub async fn finish(self) -> Vec<RoundSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the round watcher")
    }
}

/// What the round counters say about `[from, to]` (on the test's clock).
#[derive(Debug, Clone, Copy)]
pub struct RoundFigures {
    /// Rounds started in the window.
    pub started: u64,
    /// Rounds finished in the window.
    pub finished: u64,
    /// Upper bound of the longest time between two round starts, the last one to `to`
    /// included (a round still running at `to` counts from its start).
    pub longest_gap: Duration,
    /// Upper bound of the longest round that finished in the window (the duration sum of the
    /// rounds finished between two scrapes; exact when one finished).
    pub longest_round: Duration,
    /// Scrapes in the window.
    pub samples: usize,
}

/// Round figures of the scrapes `samples` in `[from, to]`. Panics without two scrapes there.
pub fn round_figures(samples: &[RoundSample], from: Instant, to: Instant) -> RoundFigures {
    let window: Vec<&RoundSample> = samples
        .iter()
        .filter(|s| s.sent >= from && s.received <= to)
        .collect();
    assert!(
        window.len() >= 2,
        "the round watcher scraped {} times in the window",
        window.len()
    );
    let (first, last) = (window[0], window[window.len() - 1]);
    // A start counted between scrapes i-1 and i happened after i-1 was sent; the next one
    // before the scrape that shows it was received.
    let mut longest_gap = Duration::ZERO;
    let mut last_start_after = first.sent;
    let mut longest_round = Duration::ZERO;
    for pair in window.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        if after.started > before.started {
            longest_gap = longest_gap.max(after.received.duration_since(last_start_after));
            last_start_after = before.sent;
        }
        if after.finished > before.finished {
            let seconds = (after.seconds - before.seconds).max(0.0);
            longest_round = longest_round.max(Duration::from_secs_f64(seconds));
        }
    }
    longest_gap = longest_gap.max(last.received.duration_since(last_start_after));
    RoundFigures {
        started: last.started - first.started,
        finished: last.finished - first.finished,
        longest_gap,
        longest_round,
        samples: window.len(),
    }
}

/// One probe of every pod: which ones' postgres accepted a `pg_is_in_recovery()` and said no.
#[derive(Debug, Clone)]
pub struct WritableSample {
    pub at: Instant,
    pub writable: Vec<String>,
    pub answered: usize,
}

/// Asks every pod's postgres `SELECT pg_is_in_recovery()` every 200 ms (all pods at once,
/// sessions kept), to catch two writable primaries at the same moment.
pub struct PrimaryProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<WritableSample>>,
}

impl PrimaryProbe {
    /// `pods`: pod name → pod IP (stable while the pods are not deleted).
    pub fn start(pods: BTreeMap<String, String>, login: super::Login) -> PrimaryProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sessions: BTreeMap<String, Option<tokio_postgres::Client>> =
                    pods.keys().map(|p| (p.clone(), None)).collect();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let probes = sessions.iter_mut().map(|(pod, session)| {
                        let ip = pods[pod].clone();
                        let login = login.clone();
                        async move {
                            let answer = tokio::time::timeout(Duration::from_secs(1), async {
                                if session.is_none() {
                                    *session = Some(connect(&ip, &login).await?);
                                }
                                let db = session.as_ref().expect("a session");
                                let row = db
                                    .query_one("SELECT pg_is_in_recovery()", &[])
                                    .await
                                    .map_err(|e| e.to_string())?;
                                Ok::<bool, String>(row.get(0))
                            })
                            .await;
                            match answer {
                                Ok(Ok(in_recovery)) => Some((pod.clone(), !in_recovery)),
                                _ => {
                                    *session = None;
                                    None
                                }
                            }
                        }
                    });
                    let answers: Vec<(String, bool)> = futures::future::join_all(probes)
                        .await
                        .into_iter()
                        .flatten()
                        .collect();
                    samples.push(WritableSample {
                        at: Instant::now(),
                        answered: answers.len(),
                        writable: answers
                            .into_iter()
                            .filter(|(_, writable)| *writable)
                            .map(|(pod, _)| pod)
                            .collect(),
                    });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                samples
            })
        };
        PrimaryProbe { stop, task }
    }

    pub async fn finish(self) -> Vec<WritableSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the primary probe")
    }
}

/// Asserts that no probe found two writable primaries.
pub fn never_two_primaries(samples: &[WritableSample]) {
    for sample in samples {
        assert!(
            sample.writable.len() <= 1,
            "split brain: {:?} all accepted writes (pg_is_in_recovery() = false) in the same probe",
            sample.writable
        );
    }
}

/// When (from `since`) a probe first found `pod` writable.
pub fn first_writable(samples: &[WritableSample], pod: &str, since: Instant) -> Option<Duration> {
    samples
        .iter()
        .filter(|s| s.at >= since)
        .find(|s| s.writable.iter().any(|w| w == pod))
        .map(|s| s.at.duration_since(since))
}

/// Keeps the evidence of a failed chaos test in `target/pgrs-reports/evidence-<test>/`: the
/// full logs of its operators, every container log of the namespace, its Leases and Events
/// (the test bed removes its state directory when the test binary exits).
pub fn save_evidence(bed: &TestBed, ns: &str, test: &str, operators: &[(&str, &OperatorProcess)]) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|p| p.join("pgrs-reports"))
        .unwrap_or_else(|| std::path::PathBuf::from("target/pgrs-reports"))
        .join(format!("evidence-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for (name, operator) in operators {
        let _ = std::fs::write(dir.join(format!("operator-{name}.log")), operator.log());
    }
    for (file, args) in [
        ("leases.yaml", vec!["get", "leases", "-n", ns, "-o", "yaml"]),
        ("events.txt", vec!["get", "events", "-n", ns, "-o", "wide"]),
        (
            "pgreplicasets.yaml",
            vec!["get", "pgrs", "-n", ns, "-o", "yaml"],
        ),
        (
            "configmaps.yaml",
            vec!["get", "configmaps", "-n", ns, "-o", "yaml"],
        ),
        ("pods.yaml", vec!["get", "pods", "-n", ns, "-o", "yaml"]),
    ] {
        if let Ok(output) = bed.kubectl().args(&args).output() {
            let _ = std::fs::write(dir.join(file), &output.stdout);
        }
    }
    let pods = bed.dir().join("kubelet").join("pods");
    if let Ok(entries) = std::fs::read_dir(&pods) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&format!("{ns}_")) {
                continue;
            }
            let Ok(logs) = std::fs::read_dir(entry.path().join("logs")) else {
                continue;
            };
            for log in logs.flatten() {
                let target = dir.join(format!("{name}-{}", log.file_name().to_string_lossy()));
                let _ = std::fs::copy(log.path(), target);
            }
        }
    }
    eprintln!("evidence kept in {}", dir.display());
}

/// Owns a test's operator processes; when the test panics, keeps the evidence
/// (`save_evidence`) before the processes are killed.
pub struct Evidence<'a> {
    pub bed: &'a TestBed,
    pub ns: String,
    pub test: &'static str,
    pub operators: Vec<(&'static str, OperatorProcess)>,
}

impl Evidence<'_> {
    pub fn operator(&mut self, name: &str) -> &mut OperatorProcess {
        &mut self
            .operators
            .iter_mut()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no operator {name}"))
            .1
    }

    /// Keeps the evidence now (e.g. for a finding that the test reports before failing).
    pub fn save(&self) {
        let operators: Vec<(&str, &OperatorProcess)> =
            self.operators.iter().map(|(n, o)| (*n, o)).collect();
        save_evidence(self.bed, &self.ns, self.test, &operators);
    }
}

impl Drop for Evidence<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.save();
        }
    }
}
