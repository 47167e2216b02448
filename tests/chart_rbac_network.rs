//! The chart's RBAC and NetworkPolicy, with the real `helm` of the test bed's cache: a
//! ClusterRole by default, a Role in `watchNamespace` when it is set (same rules, no unused
//! verb), and the optional NetworkPolicy on the database pods' labels and ports as the code
//! defines them (`pgrs::api::names`). `helm lint --strict` passes with every mode. No API server
//! is needed; tests/operator_helm.rs installs the namespaced mode with the policy on the bed.

mod chart_support;

use chart_support::{chart, helm, kinds, template};
use pgrs::api::names;
use serde_yaml::Value;

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    documents
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn verbs(rules: &Value, resource: &str) -> Vec<String> {
    let rule = rules
        .as_sequence()
        .expect("rules")
        .iter()
        .find(|r| {
            r["resources"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|v| v.as_str() == Some(resource)))
        })
        .unwrap_or_else(|| panic!("no rule for {resource}"));
    serde_yaml::from_value(rule["verbs"].clone()).expect("verbs")
}

#[test]
fn chart_lints_in_every_mode() {
    let chart = chart();
    helm(&["lint", "--strict", &chart]);
    helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "watchNamespace=apps",
        "--set",
        "networkPolicy.enabled=true",
    ]);
    helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.namespaces={a,b}",
    ]);
}

#[test]
fn cluster_role_by_default_and_role_in_the_watched_namespace() {
    let all = template(&[]);
    let cluster_role = named(&all, "ClusterRole", "release-pgrs").expect("ClusterRole");
    assert!(named(&all, "ClusterRoleBinding", "release-pgrs").is_some());
    assert!(named(&all, "Role", "release-pgrs").is_none());

    let one = template(&["watchNamespace=apps"]);
    let kinds_one = kinds(&one);
    assert!(
        !kinds_one.iter().any(|k| k.starts_with("Cluster")),
        "cluster-scoped RBAC in namespaced mode: {kinds_one:?}"
    );
    let role = named(&one, "Role", "release-pgrs").expect("Role");
    let binding = named(&one, "RoleBinding", "release-pgrs").expect("RoleBinding");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("apps"));
    assert_eq!(binding["metadata"]["namespace"].as_str(), Some("apps"));
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("Role"));
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some("pgrs-system")
    );
    assert_eq!(role["rules"], cluster_role["rules"]);
    let election = named(&one, "Role", "release-pgrs-leader-election").expect("election Role");
    assert_eq!(
        election["metadata"]["namespace"].as_str(),
        Some("pgrs-system")
    );

    // No verb the operator does not call (or hold for the agents' Role).
    let rules = &cluster_role["rules"];
    assert_eq!(verbs(rules, "secrets"), ["get", "create", "patch"]);
    assert_eq!(verbs(rules, "leases"), ["get", "watch", "create", "update"]);
    for rule in rules.as_sequence().expect("rules") {
        let resources = format!("{:?}", rule["resources"]);
        let verbs: Vec<String> = serde_yaml::from_value(rule["verbs"].clone()).expect("verbs");
        assert!(
            !verbs.iter().any(|v| v == "*" || v == "deletecollection"),
            "{resources}: {verbs:?}"
        );
        if verbs.iter().any(|v| v == "delete") {
            assert_eq!(
                rule["resources"],
                Value::from(vec!["pods"]),
                "{resources}: delete"
            );
        }
    }
}

#[test]
fn network_policy_only_when_enabled_on_the_database_pods() {
    let off = template(&[]);
    assert!(
        off.iter()
            .all(|d| d["kind"].as_str() != Some("NetworkPolicy"))
    );

    let on = template(&["networkPolicy.enabled=true"]);
    let policy = named(&on, "NetworkPolicy", "release-pgrs-database").expect("NetworkPolicy");
    assert_eq!(
        policy["metadata"]["namespace"].as_str(),
        Some("pgrs-system")
    );

    // The selector is a subset of the labels the operator puts on every database pod.
    let database = names::cluster_labels("pg");
    let selector = &policy["spec"]["podSelector"]["matchLabels"];
    for (key, value) in selector.as_mapping().expect("matchLabels") {
        let key = key.as_str().expect("label key");
        assert_eq!(
            database.get(key).map(String::as_str),
            value.as_str(),
            "{key}"
        );
    }
    let ingress = policy["spec"]["ingress"].as_sequence().expect("ingress");
    let port = |rule: &Value| rule["ports"][0]["port"].as_u64();
    let agent = ingress
        .iter()
        .find(|r| port(r) == Some(u64::from(names::AGENT_PORT)))
        .expect("agent port rule");
    let postgres = ingress
        .iter()
        .find(|r| port(r) == Some(u64::from(names::POSTGRES_PORT)))
        .expect("PostgreSQL port rule");
    // Agent port: the operator's pods (release namespace) and the database pods.
    assert_eq!(
        agent["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            .as_str(),
        Some("pgrs-system")
    );
    assert_eq!(
        agent["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("pgrs-operator")
    );
    assert_eq!(agent["from"][1]["podSelector"]["matchLabels"], *selector);
    assert_eq!(agent["from"].as_sequence().map(Vec::len), Some(2));
    // PostgreSQL: database pods, the operator (its SQL), then any pod of the namespace by
    // default…
    assert_eq!(postgres["from"][0]["podSelector"]["matchLabels"], *selector);
    assert_eq!(postgres["from"][1], agent["from"][0]);
    assert!(
        postgres["from"][2]["podSelector"]
            .as_mapping()
            .is_some_and(|m| m.is_empty())
    );

    // …or the configured clients; the policy follows watchNamespace.
    let custom = template(&[
        "networkPolicy.enabled=true",
        "watchNamespace=apps",
        "networkPolicy.clients[0].podSelector.matchLabels.app=shop",
    ]);
    let policy = named(&custom, "NetworkPolicy", "release-pgrs-database").expect("policy");
    assert_eq!(policy["metadata"]["namespace"].as_str(), Some("apps"));
    let postgres = &policy["spec"]["ingress"][1]["from"];
    assert_eq!(postgres.as_sequence().map(Vec::len), Some(3));
    assert_eq!(
        postgres[2]["podSelector"]["matchLabels"]["app"].as_str(),
        Some("shop")
    );

    let several = template(&[
        "networkPolicy.enabled=true",
        "networkPolicy.namespaces={a,b}",
    ]);
    let namespaces: Vec<_> = several
        .iter()
        .filter(|d| d["kind"].as_str() == Some("NetworkPolicy"))
        .filter_map(|d| d["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(namespaces, ["a", "b"]);
}
