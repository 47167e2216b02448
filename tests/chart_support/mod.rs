//! `helm` of the test bed's cache (`testbed/build.sh`) on charts/pgrs, for the chart tests that
//! need no API server.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use pgrs_testbed::bins::Binaries;
use serde::Deserialize as _;

/// Runs `helm args...` with a throw-away home, panicking with its output on failure.
pub fn helm(args: &[&str]) -> String {
    let binaries = Binaries::locate()
        .unwrap_or_else(|e| panic!("the test bed's helm is missing ({e}); run testbed/build.sh"));
    let home = tempfile::tempdir().expect("temp dir");
    let output = Command::new(binaries.helm())
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    assert!(
        output.status.success(),
        "helm {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn chart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charts/pgrs")
        .display()
        .to_string()
}

/// `helm template` with `--set` values, as parsed YAML documents.
pub fn template(values: &[&str]) -> Vec<serde_yaml::Value> {
    let chart = chart();
    let mut args = vec!["template", "release", chart.as_str(), "-n", "pgrs-system"];
    for value in values {
        args.extend(["--set", value]);
    }
    let text = helm(&args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_yaml::Value::deserialize(document).expect("rendered YAML parses"))
        .filter(|document| !document.is_null())
        .collect()
}

pub fn kinds(documents: &[serde_yaml::Value]) -> BTreeSet<String> {
    documents
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

pub fn find<'a>(documents: &'a [serde_yaml::Value], kind: &str) -> Option<&'a serde_yaml::Value> {
    documents.iter().find(|d| d["kind"].as_str() == Some(kind))
}
