//! A tiny HTTP server run by test-bed pods (image `pgrs-testbed/tiny-http`).
//!
//! Usage: `tiny-http [--port N] [--data-dir DIR]`
//!
//! - `GET /healthz` → `ok` (readiness probes);
//! - `GET /` → JSON: hostname, pod IP env, and how often it has started on DIR
//!   (a counter kept in DIR, so a pod that comes back on the same volume counts up);
//! - `GET /whoami` → the user the API server sees for the in-cluster credentials
//!   (a SelfSubjectReview with the mounted ServiceAccount token).

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Args {
    port: u16,
    data_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: 8080,
        data_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => args.port = value.parse().map_err(|e| format!("--port: {e}"))?,
            "--data-dir" => args.data_dir = Some(PathBuf::from(value)),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Increments and returns the start counter in `dir`.
fn count_boot(dir: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("boots");
    let boots = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    std::fs::write(&path, boots.to_string())?;
    Ok(boots)
}

async fn whoami() -> Result<String, String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| e.to_string())?;
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
    });
    let body = serde_json::to_vec(&review).map_err(|e| e.to_string())?;
    let request = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("content-type", "application/json")
        .body(body)
        .map_err(|e| e.to_string())?;
    let response: serde_json::Value = client.request(request).await.map_err(|e| e.to_string())?;
    Ok(response["status"]["userInfo"]["username"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

async fn respond(path: &str, boots: Option<u64>) -> (u16, String) {
    match path {
        "/healthz" => (200, "ok".to_owned()),
        "/" => {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let body = serde_json::json!({
                "hostname": hostname,
                "boots": boots,
                "kubernetes_service_host": std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            });
            (200, body.to_string())
        }
        "/whoami" => match whoami().await {
            Ok(user) => (200, user),
            Err(e) => (500, e),
        },
        _ => (404, "not found".to_owned()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tiny-http: {e}");
            std::process::exit(2);
        }
    };
    let boots = match &args.data_dir {
        Some(dir) => match count_boot(dir) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!(
                    "tiny-http: failed to count starts in {}: {e}",
                    dir.display()
                );
                std::process::exit(1);
            }
        },
        None => None,
    };
    let listener = match TcpListener::bind(("0.0.0.0", args.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tiny-http: failed to listen on port {}: {e}", args.port);
            std::process::exit(1);
        }
    };
    eprintln!(
        "tiny-http: listening on port {} (boots: {boots:?})",
        args.port
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tiny-http: failed to handle SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = term.recv() => {
                eprintln!("tiny-http: SIGTERM, exiting");
                return;
            }
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (code, body) = respond(&path, boots).await;
            let reply = format!(
                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}
