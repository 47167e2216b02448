//! The chart's optional monitoring objects, with the real `helm` of the test bed's cache
//! (`testbed/build.sh`): `helm lint --strict` and `helm template` with the `monitoring.*` values
//! off (the default) and on. The PrometheusRule, ServiceMonitor, metrics Service and Grafana
//! dashboard appear only when asked for, and every metric their expressions use is one the code
//! exports (`pgrs::metrics::names`). No API server is needed.

mod chart_support;

use std::collections::BTreeSet;
use std::path::Path;

use chart_support::{chart, find, helm, kinds, template};

const ALL_ON: &[&str] = &[
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
];

/// The `pgrs_*` names an expression uses (PromQL: a name is followed by `{`, `[`, `)`, a space…).
fn metric_names(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(start) = rest.find("pgrs_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn chart_lints_with_monitoring_off_and_on() {
    let chart = chart();
    helm(&["lint", "--strict", &chart]);
    let mut args = vec!["lint", "--strict", chart.as_str()];
    for value in ALL_ON {
        args.extend(["--set", value]);
    }
    helm(&args);
}

#[test]
fn monitoring_objects_appear_only_when_enabled() {
    let off = template(&[]);
    let off_kinds = kinds(&off);
    for kind in ["PrometheusRule", "ServiceMonitor"] {
        assert!(
            find(&off, kind).is_none(),
            "{kind} rendered by default: {off_kinds:?}"
        );
    }
    assert!(
        !off_kinds
            .iter()
            .any(|k| k.ends_with("-metrics") || k.ends_with("-dashboard")),
        "monitoring objects rendered by default: {off_kinds:?}"
    );

    let on = template(ALL_ON);
    let on_kinds = kinds(&on);
    for expected in [
        "PrometheusRule/release-pgrs",
        "ServiceMonitor/release-pgrs",
        "Service/release-pgrs-metrics",
        "ConfigMap/release-pgrs-dashboard",
    ] {
        assert!(
            on_kinds.contains(expected),
            "{expected} missing: {on_kinds:?}"
        );
    }
    // Everything the default renders is still there, unchanged in kind and name.
    assert!(
        off_kinds.is_subset(&on_kinds),
        "{off_kinds:?} vs {on_kinds:?}"
    );

    // The ServiceMonitor scrapes the metrics Service's port, which selects the operator pods.
    let monitor = find(&on, "ServiceMonitor").expect("ServiceMonitor");
    let service = on
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("release-pgrs-metrics"))
        .expect("metrics Service");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"],
        "{monitor:?}"
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    let deployment = find(&on, "Deployment").expect("Deployment");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = service["spec"]["selector"]
        .as_mapping()
        .expect("Service selector");
    for (key, value) in selector {
        assert_eq!(
            &pod_labels[key], value,
            "the metrics Service selects the operator pods"
        );
    }
    assert_eq!(
        service["metadata"]["annotations"]["prometheus.io/scrape"].as_str(),
        Some("true")
    );

    // Only the annotated Service: no ServiceMonitor.
    let service_only = template(&["monitoring.service.enabled=true"]);
    let service_only_kinds = kinds(&service_only);
    assert!(service_only_kinds.contains("Service/release-pgrs-metrics"));
    assert!(find(&service_only, "ServiceMonitor").is_none());
    assert!(find(&service_only, "PrometheusRule").is_none());
}

#[test]
fn alerts_and_dashboard_use_only_exported_metrics() {
    let on = template(ALL_ON);
    let rule = find(&on, "PrometheusRule").expect("PrometheusRule");
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().expect("groups") {
        for alert in group["rules"].as_sequence().expect("rules") {
            let name = alert["alert"].as_str().expect("alert name").to_string();
            let expression = alert["expr"].as_str().expect("expr");
            let names = metric_names(expression);
            assert!(!names.is_empty(), "{name}: no pgrs metric in {expression}");
            for metric in names {
                assert!(
                    pgrs::metrics::names::is_exported(&metric),
                    "alert {name} uses {metric}, which pgrs does not export"
                );
                used.insert(metric);
            }
            assert!(
                alert["labels"]["severity"].as_str().is_some(),
                "{name} has a severity"
            );
            alerts.insert(name);
        }
    }
    for expected in [
        "PgrsReplicationLagWarning",
        "PgrsReplicationLagCritical",
        "PgrsNoPrimary",
        "PgrsReplicaNotStreaming",
        "PgrsFailoverHappened",
    ] {
        assert!(alerts.contains(expected), "{expected} missing: {alerts:?}");
    }
    for metric in [
        "pgrs_instance_lag_seconds",
        "pgrs_instance_lag_bytes",
        "pgrs_cluster_has_primary",
        "pgrs_instance_wal_receiver_up",
        "pgrs_failovers_total",
    ] {
        assert!(used.contains(metric), "no alert on {metric}");
    }

    // The thresholds come from the values.
    let custom = template(&[
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.lagWarningSeconds=42",
    ]);
    let text = serde_yaml::to_string(find(&custom, "PrometheusRule").expect("rule")).expect("yaml");
    assert!(text.contains("(pgrs_instance_lag_seconds) > 42"), "{text}");

    let dashboard = on
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("release-pgrs-dashboard"))
        .expect("dashboard ConfigMap");
    assert_eq!(
        dashboard["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["pgrs.json"].as_str().expect("pgrs.json"))
            .expect("the dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut dashboard_metrics = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expression = target["expr"].as_str().expect("expr");
            for metric in metric_names(expression) {
                assert!(
                    pgrs::metrics::names::is_exported(&metric),
                    "panel {} uses {metric}, which pgrs does not export",
                    panel["title"]
                );
                dashboard_metrics.insert(metric);
            }
        }
    }
    for metric in ["pgrs_instance_lag_bytes", "pgrs_instance_is_primary"] {
        assert!(
            dashboard_metrics.contains(metric),
            "no panel shows {metric}"
        );
    }
}

#[test]
fn docs_list_every_exported_metric() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
    for metric in pgrs::metrics::names::ALL {
        assert!(
            text.contains(&format!("`{}`", metric.name)),
            "{} is not described in docs/metrics.md",
            metric.name
        );
    }
    for name in metric_names(&text) {
        assert!(
            pgrs::metrics::names::is_exported(&name) || name.starts_with("pgrs_operator_"),
            "docs/metrics.md names {name}, which pgrs does not export"
        );
    }
}
