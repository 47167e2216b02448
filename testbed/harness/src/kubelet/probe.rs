//! Readiness probes, executed for real against the pod IP (or inside the pod). Probes of
//! the pod IP come from the node's probe address (`PodNetwork::probe_source`), not from
//! the gateway the host's other processes use.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::images::ImageMap;
use super::sandbox::Sandbox;

/// Result of one probe run: `Err` carries why it failed (kept for the pod's logs).
pub type ProbeResult = Result<(), String>;

/// Tracks consecutive results against the probe's thresholds.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    pub ready: bool,
    successes: i32,
    failures: i32,
    pub last_error: Option<String>,
}

impl ProbeState {
    /// Records a result; readiness flips after `successThreshold` successes /
    /// `failureThreshold` failures in a row.
    pub fn record(&mut self, probe: &Probe, result: ProbeResult) {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                self.last_error = None;
                if self.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                    self.ready = true;
                }
            }
            Err(e) => {
                self.successes = 0;
                self.failures += 1;
                self.last_error = Some(e);
                if self.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                    self.ready = false;
                }
            }
        }
    }
}

impl ProbeState {
    /// `failureThreshold` failures in a row (for liveness and startup probes).
    pub fn failed(&self, probe: &Probe) -> bool {
        self.failures >= probe.failure_threshold.unwrap_or(3).max(1)
    }
}

/// Period between probe runs.
pub fn period(probe: &Probe) -> Duration {
    Duration::from_secs(u64::try_from(probe.period_seconds.unwrap_or(10).max(1)).unwrap_or(10))
}

pub fn initial_delay(probe: &Probe) -> Duration {
    Duration::from_secs(u64::try_from(probe.initial_delay_seconds.unwrap_or(0).max(0)).unwrap_or(0))
}

fn timeout(probe: &Probe) -> Duration {
    Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1))
}

/// A named or numbered container port.
fn port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("container has no port named {name:?}")),
    }
}

/// The pod IP a probe dials, and the address it comes from (as a real kubelet probes from
/// its node, not from where controllers run).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub pod_ip: Ipv4Addr,
    /// The local address probes of `pod_ip` are sent from.
    pub source: Ipv4Addr,
}

/// A TCP connection to `host:port`, from `target.source` when `host` is the pod IP.
async fn tcp_connect(
    target: Target,
    host: &str,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    if host != target.pod_ip.to_string() {
        return tokio::net::TcpStream::connect((host, port)).await;
    }
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((target.source, 0)))?;
    socket
        .connect(SocketAddr::from((target.pod_ip, port)))
        .await
}

/// Runs `probe` once for `container` of a pod at `target.pod_ip` whose main process is `pid`.
pub async fn run(
    probe: &Probe,
    container: &Container,
    target: Target,
    pid: Option<u32>,
    image: &str,
    images: &ImageMap,
) -> ProbeResult {
    let limit = timeout(probe);
    if let Some(http) = &probe.http_get {
        // HTTPS as a kubelet does it: encrypted, the certificate not verified.
        let https = http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
        let port = port(container, &http.port)?;
        let pod_ip = target.pod_ip.to_string();
        let host = http.host.clone().unwrap_or_else(|| pod_ip.clone());
        let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
        let scheme = if https { "https" } else { "http" };
        let url = format!("{scheme}://{host}:{port}{path}");
        let mut client = reqwest::Client::builder()
            .timeout(limit)
            .no_proxy()
            .danger_accept_invalid_certs(https);
        if host == pod_ip {
            client = client.local_address(IpAddr::V4(target.source));
        }
        let client = client.build().map_err(|e| e.to_string())?;
        let mut request = client.get(&url);
        for header in http.http_headers.iter().flatten() {
            request = request.header(&header.name, &header.value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {url}: status {status}"))
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        let port = port(container, &tcp.port)?;
        let host = tcp
            .host
            .clone()
            .unwrap_or_else(|| target.pod_ip.to_string());
        match tokio::time::timeout(limit, tcp_connect(target, &host, port)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connect {host}:{port}: {e}")),
            Err(_) => Err(format!("connect {host}:{port}: timed out after {limit:?}")),
        }
    } else if let Some(exec) = &probe.exec {
        let pid = pid.ok_or("the container is not running")?;
        let command = exec.command.clone().unwrap_or_default();
        let (program, argv) = images
            .resolve(image, &command, &[])
            .map_err(|e| format!("exec probe: {e}"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Sandbox::Join { pid }
            .apply(&mut cmd)
            .map_err(|e| format!("exec probe: {e}"))?;
        let output = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| format!("exec {command:?}: timed out after {limit:?}"))?
            .map_err(|e| format!("exec {command:?}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "exec {command:?}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    } else if probe.grpc.is_some() {
        Err("grpc probes are not supported by the fake kubelet".to_owned())
    } else {
        Err("probe has no handler".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_thresholds() {
        let probe = Probe {
            success_threshold: Some(1),
            failure_threshold: Some(2),
            ..Default::default()
        };
        let mut state = ProbeState::default();
        assert!(!state.ready);
        state.record(&probe, Ok(()));
        assert!(state.ready);
        state.record(&probe, Err("x".into()));
        assert!(state.ready, "one failure is below the threshold");
        state.record(&probe, Err("x".into()));
        assert!(!state.ready);
        assert_eq!(state.last_error.as_deref(), Some("x"));
    }
}
