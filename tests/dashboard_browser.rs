//! The dashboard in a real browser: headless Chromium, driven through chromedriver's WebDriver
//! HTTP API, against a running `pgrs local` cluster (real PostgreSQL). The page loads, shows
//! the primary, and after `pgrs local switchover` shows the new one without a reload. Screenshots
//! go to `target/test-output/dashboard/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/setup-debian`).

mod local_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use local_support::{Cluster, pgrs};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output/dashboard");
    std::fs::create_dir_all(&dir).expect("create target/test-output/dashboard");
    dir
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the dashboard browser test needs Debian's chromium and \
                 chromium-driver; run scripts/setup-debian"
            );
        }
        let profile = tempfile::tempdir().expect("temp dir");
        let log = profile.path().join("chromedriver.log");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http,
            log,
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.json::<Value>());
            if let Some(body) = ready
                && let Ok(body) = body.await
                && body["value"]["ready"] == true
            {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready:\n{}",
                driver.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn session(&self) -> Session<'_> {
        let profile = self._profile.path().join("chromium-profile");
        let body = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--disable-dev-shm-usage",
                            "--window-size=1400,1000",
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                },
            },
        });
        let answer = self
            .call(reqwest::Method::POST, "/session", Some(body))
            .await;
        let id = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {answer}\n{}", self.log_tail()))
            .to_string();
        Session { driver: self, id }
    }

    /// One WebDriver call; panics on a transport error or a WebDriver error.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method.clone(), path, body).await {
            Ok(value) => value,
            Err(error) => panic!("WebDriver {method} {path}: {error}\n{}", self.log_tail()),
        }
    }

    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", body["value"]));
        }
        Ok(body["value"].clone())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.id)
    }

    async fn navigate(&self, url: &str) {
        self.driver
            .call(
                reqwest::Method::POST,
                &self.path("/url"),
                Some(json!({ "url": url })),
            )
            .await;
    }

    /// The rendered text of the first element matching `css`, or why there is none (the page
    /// re-renders every second: a reference may go stale between the two calls).
    async fn text(&self, css: &str) -> Result<String, String> {
        let found = self
            .driver
            .try_call(
                reqwest::Method::POST,
                &self.path("/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        let element = found[ELEMENT]
            .as_str()
            .ok_or_else(|| format!("no element reference in {found}"))?;
        let text = self
            .driver
            .try_call(
                reqwest::Method::GET,
                &self.path(&format!("/element/{element}/text")),
                None,
            )
            .await?;
        text.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no text in {text}"))
    }

    /// Waits until the element's text satisfies `check`; returns it.
    async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last = Err("not read yet".to_string());
        while Instant::now() < deadline {
            last = self.text(css).await;
            if let Ok(text) = &last
                && check(text)
            {
                return Ok(text.clone());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "{css}: last read {last:?} after {} s",
            timeout.as_secs()
        ))
    }

    async fn script(&self, script: &str) -> Value {
        self.driver
            .call(
                reqwest::Method::POST,
                &self.path("/execute/sync"),
                Some(json!({ "script": script, "args": [] })),
            )
            .await
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self
            .driver
            .call(reqwest::Method::GET, &self.path("/screenshot"), None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 screenshot"))
            .expect("decode the screenshot");
        assert_png(&png, name);
        let path = output_dir().join(name);
        std::fs::write(&path, &png).expect("write the screenshot");
        path
    }

    async fn close(self) {
        let _ = self
            .driver
            .try_call(reqwest::Method::DELETE, &self.path(""), None)
            .await;
    }
}

/// A PNG of a real page: the signature, a sensible size, and enough bytes to hold more than a
/// blank page.
fn assert_png(png: &[u8], name: &str) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{name}: not a PNG (starts with {:?})",
        &png[..png.len().min(8)]
    );
    assert!(png.len() > 24, "{name}: truncated PNG");
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
    assert!(
        width >= 800 && height >= 600,
        "{name}: screenshot is only {width}x{height}"
    );
    assert!(
        png.len() > 20_000,
        "{name}: {} bytes is too small for a rendered dashboard",
        png.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_primary_and_follows_a_switchover_in_chromium() {
    // The browser first: a missing chromium fails before a cluster is started.
    let driver = Driver::start().await;
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(90)).await;
    let first = status.primary.clone().expect("primary");
    let config = cluster.layout().read_config().expect("config");
    let url = format!("{}/", config.controller_url());

    // The JSON behind the page.
    let api: Value = reqwest::get(format!("{url}api/clusters"))
        .await
        .expect("GET /api/clusters")
        .json()
        .await
        .expect("JSON");
    assert_eq!(api["apiVersion"], "pgrs.dev/dashboard/v1", "{api}");
    assert_eq!(api["source"], "local", "{api}");
    assert_eq!(api["clusters"][0]["primary"], first.as_str(), "{api}");
    assert_eq!(
        api["clusters"][0]["nodes"].as_array().map(Vec::len),
        Some(3)
    );

    let session = driver.session().await;
    session.navigate(&url).await;
    let title = session.script("return document.title").await;
    assert_eq!(title, "pgrs replication status");
    let shown = session
        .wait_text("[data-testid=primary]", Duration::from_secs(30), |t| {
            t == first
        })
        .await
        .unwrap_or_else(|e| panic!("the page does not show primary {first}: {e}"));
    assert_eq!(shown, first);
    session
        .wait_text("[data-testid=phase]", Duration::from_secs(30), |t| {
            t == "Healthy"
        })
        .await
        .unwrap_or_else(|e| panic!("the page does not show Healthy: {e}"));
    // Every node has a row, the primary's says so, and the replicas stream from it.
    let primary_role = session
        .text(&format!("tr[data-node={first}] [data-testid=role]"))
        .await
        .expect("primary row");
    assert_eq!(primary_role, "primary");
    let replicas = session
        .script("return document.querySelectorAll('tr[data-node] .role.replica').length")
        .await;
    assert_eq!(replicas, 2, "two replica rows");
    // A marker that a reload would erase: the page must update in place.
    session
        .script("window.pgrsNoReload = 'still here'; return null")
        .await;
    // Let the lag chart gather a few samples before the first screenshot.
    session
        .wait_text(".legend", Duration::from_secs(30), |t| !t.trim().is_empty())
        .await
        .unwrap_or_else(|e| panic!("no lag chart: {e}"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = session.screenshot("healthy.png").await;
    eprintln!("screenshot: {}", before.display());

    let switched = pgrs(&["local", "switchover", "--dir", &cluster.dir_text()]);
    assert!(
        switched.status.success(),
        "pgrs local switchover failed: {}{}\n{}",
        String::from_utf8_lossy(&switched.stdout),
        String::from_utf8_lossy(&switched.stderr),
        cluster.controller_log_tail()
    );
    let after = cluster.wait_healthy(Duration::from_secs(90)).await;
    let second = after.primary.clone().expect("new primary");
    assert_ne!(second, first, "the switchover did not change the primary");

    let shown_at = Instant::now();
    let shown = session
        .wait_text("[data-testid=primary]", Duration::from_secs(60), |t| {
            t == second
        })
        .await
        .unwrap_or_else(|e| panic!("the page does not show the new primary {second}: {e}"));
    assert_eq!(shown, second);
    eprintln!(
        "the page showed {second} {} ms after the switchover command returned",
        shown_at.elapsed().as_millis()
    );
    let marker = session.script("return window.pgrsNoReload || null").await;
    assert_eq!(marker, "still here", "the page was reloaded");
    // The switchover is listed with its timings.
    let failovers = session
        .wait_text(".grid table", Duration::from_secs(30), |t| {
            t.contains("Switchover") && t.contains(&second)
        })
        .await
        .unwrap_or_else(|e| panic!("the switchover is not listed: {e}"));
    assert!(failovers.contains(" ms"), "no duration in {failovers:?}");
    session
        .wait_text(
            &format!("tr[data-node={first}] [data-testid=role]"),
            Duration::from_secs(60),
            |t| t == "replica",
        )
        .await
        .unwrap_or_else(|e| panic!("{first} is not shown as a replica: {e}"));
    let path = session.screenshot("after-switchover.png").await;
    eprintln!("screenshot: {}", path.display());
    session.close().await;
}
