//! Measuring one level of the scale benchmark: the operator's CPU and memory from /proc, its
//! API requests from the API server's flow-control metrics, its reconciles from its `/metrics`;
//! and the report table.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Client;

/// Measurement window of CPU, API requests and reconciles.
const WINDOW: Duration = Duration::from_secs(30);

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub background: usize,
    pub cpu_percent: f64,
    pub rss_mb: f64,
    pub hwm_mb: f64,
    pub api_per_second: f64,
    pub reconciles_per_second: f64,
    pub reconcile_p50: String,
    pub reconcile_p99: String,
    pub spec_change: Duration,
    /// Median of the failovers of the level.
    pub failover: Duration,
    pub failover_max: Duration,
    pub write_gap: Duration,
    pub load: String,
}

/// Counters read at the start and at the end of a window.
struct Sample {
    at: Instant,
    cpu_ticks: u64,
    api_requests: f64,
    reconciles: f64,
    buckets: BTreeMap<String, f64>,
}

async fn sample(client: &Client, schema: &str, pid: u32, port: u16) -> Sample {
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET the operator's /metrics")
        .text()
        .await
        .expect("the operator's /metrics");
    Sample {
        at: Instant::now(),
        cpu_ticks: cpu_ticks(pid),
        api_requests: api_requests(client, schema).await,
        reconciles: sum_of(&metrics, "pgrs_operator_reconciles_total"),
        buckets: reconcile_buckets(&metrics),
    }
}

/// CPU, memory, API requests and reconciles of the operator `pid` (metrics on `port`) over
/// [`WINDOW`]; the spec-change and failover fields are left at zero.
pub async fn measure_window(
    client: &Client,
    schema: &str,
    pid: u32,
    port: u16,
    background: usize,
) -> Row {
    let first = sample(client, schema, pid, port).await;
    tokio::time::sleep(WINDOW).await;
    let last = sample(client, schema, pid, port).await;
    let seconds = last.at.duration_since(first.at).as_secs_f64();
    let ticks_per_second = clock_ticks_per_second();
    let delta: BTreeMap<String, f64> = last
        .buckets
        .iter()
        .map(|(le, count)| (le.clone(), count - first.buckets.get(le).unwrap_or(&0.0)))
        .collect();
    Row {
        background,
        cpu_percent: (last.cpu_ticks - first.cpu_ticks) as f64 / ticks_per_second / seconds * 100.0,
        rss_mb: status_kb(pid, "VmRSS") / 1024.0,
        hwm_mb: status_kb(pid, "VmHWM") / 1024.0,
        api_per_second: (last.api_requests - first.api_requests) / seconds,
        reconciles_per_second: (last.reconciles - first.reconciles) / seconds,
        reconcile_p50: quantile(&delta, 0.5),
        reconcile_p99: quantile(&delta, 0.99),
        spec_change: Duration::ZERO,
        failover: Duration::ZERO,
        failover_max: Duration::ZERO,
        write_gap: Duration::ZERO,
        load: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // The fields after the command name (which may hold spaces) start at field 3.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12th and 13th after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn status_kb(pid: u32, key: &str) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0.0)
}

/// Requests of FlowSchema `schema` dispatched by the API server so far.
pub async fn api_requests(client: &Client, schema: &str) -> f64 {
    let request = axum::http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client
        .request_text(request)
        .await
        .expect("GET the API server's /metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
        .filter(|l| l.contains(&format!("flow_schema=\"{schema}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the samples of `name` (any labels).
fn sum_of(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with(&format!("{name}_")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Cumulative reconcile-duration buckets summed over the clusters, by `le`.
fn reconcile_buckets(metrics: &str) -> BTreeMap<String, f64> {
    let mut buckets = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("pgrs_reconcile_duration_seconds_bucket{"))
    {
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("")
            .to_string();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *buckets.entry(le).or_insert(0.0) += value;
    }
    buckets
}

/// The bucket bound under which `q` of the observations fall ("≤ 0.05 s").
fn quantile(cumulative: &BTreeMap<String, f64>, q: f64) -> String {
    let mut bounds: Vec<(f64, &String, f64)> = cumulative
        .iter()
        .map(|(le, count)| (le.parse().unwrap_or(f64::INFINITY), le, *count))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last().map(|b| b.2).unwrap_or(0.0);
    if total <= 0.0 {
        return "–".to_string();
    }
    bounds
        .iter()
        .find(|(_, _, count)| *count >= q * total)
        .map(|(_, le, _)| format!("≤ {le} s"))
        .unwrap_or_else(|| "–".to_string())
}

pub fn render(rows: &[Row]) -> String {
    let mut text = String::from(
        "# Scale benchmark (test bed, release builds)\n\n\
         `ha` (3 instances) plus N single-instance clusters (shared_buffers 16MB), one operator.\n\
         CPU over a 30 s window after 20 s of quiet; API requests are the operator's own\n\
         (flow-control metrics of its ServiceAccount); reconcile quantiles are bucket bounds.\n\n\
         | N (background) | clusters | operator CPU | RSS | peak RSS | API req/s | reconciles/s | reconcile p50 | reconcile p99 | spec change (all 3 pods) | failover (first write), median / max | longest write gap | load (1/5/15 min) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        text.push_str(&format!(
            "| {} | {} | {:.1} % | {:.1} MB | {:.1} MB | {:.1} | {:.1} | {} | {} | {:.2} s | {:.2} / {:.2} s | {:.2} s | {} |\n",
            row.background,
            row.background + 1,
            row.cpu_percent,
            row.rss_mb,
            row.hwm_mb,
            row.api_per_second,
            row.reconciles_per_second,
            row.reconcile_p50,
            row.reconcile_p99,
            row.spec_change.as_secs_f64(),
            row.failover.as_secs_f64(),
            row.failover_max.as_secs_f64(),
            row.write_gap.as_secs_f64(),
            row.load,
        ));
    }
    text
}
