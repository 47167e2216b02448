//! Unit tests of the Rust-side logic of the API: group resolution, the operator's own
//! validation and the mapping to the engine's spec.

use std::time::Duration;

use kube::core::ObjectMeta;

use super::*;
use crate::engine;

fn spec(replicas: u32) -> PgReplicaSetSpec {
    PgReplicaSetSpec {
        postgres_version: 15,
        image: None,
        replicas,
        storage: StorageSpec {
            size: "1Gi".to_string(),
            storage_class_name: None,
        },
        resources: None,
        parameters: Default::default(),
        replication: ReplicationSpec::default(),
        failover: FailoverSpec::default(),
        groups: Vec::new(),
        monitoring: MonitoringSpec::default(),
        switchover: None,
        bootstrap: BootstrapSpec::default(),
        tls: crate::api::TlsSpec::default(),
        enable_superuser_access: false,
    }
}

fn group(name: &str, replicas: u32, failover_priority: u32) -> InstanceGroup {
    InstanceGroup {
        name: name.to_string(),
        replicas,
        node_selector: Default::default(),
        affinity: None,
        tolerations: Vec::new(),
        failover_priority,
        sync_eligible: true,
    }
}

fn cluster(name: &str, spec: PgReplicaSetSpec) -> PgReplicaSet {
    let mut cluster = PgReplicaSet::new(name, spec);
    cluster.metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some("db".to_string()),
        ..ObjectMeta::default()
    };
    cluster
}

#[test]
fn default_group_is_named_after_the_cluster() {
    let groups = resolve_groups("pg", &spec(3));
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, DEFAULT_GROUP);
    assert_eq!(groups[0].statefulset, "pg");
    assert_eq!(instance_names("pg", &spec(3)), ["pg-0", "pg-1", "pg-2"]);
}

#[test]
fn named_groups_prefix_their_statefulsets() {
    let mut spec = spec(3);
    spec.groups = vec![group("east", 2, 2), group("west", 1, 0)];
    assert_eq!(
        instance_names("pg", &spec),
        ["pg-east-0", "pg-east-1", "pg-west-0"]
    );
}

#[test]
fn validate_accepts_a_plain_cluster() {
    assert_eq!(validate(&cluster("pg", spec(3))), Ok(()));
}

#[test]
fn validate_refuses_bootstrap_names_that_are_not_plain_or_are_reserved() {
    let with = |database: &str, owner: &str| {
        let mut spec = spec(3);
        spec.bootstrap = BootstrapSpec {
            database: database.to_string(),
            owner: owner.to_string(),
        };
        validate(&cluster("pg", spec))
    };
    assert_eq!(with("orders_2", "_shop"), Ok(()));
    for (database, owner, field) in [
        ("App", "app", "database"),
        ("app", "1app", "owner"),
        ("a-b", "app", "database"),
        ("app", "", "owner"),
        ("app", &"x".repeat(64), "owner"),
        ("app", "pg_app", "owner"),
        ("app", "postgres", "owner"),
        ("app", "replicator", "owner"),
        ("template1", "app", "database"),
        ("postgres", "app", "database"),
    ] {
        let error = with(database, owner).expect_err(owner);
        assert!(
            error
                .to_string()
                .starts_with(&format!("spec.bootstrap.{field} ")),
            "{error}"
        );
    }
}

#[test]
fn validate_refuses_names_too_long_for_derived_objects() {
    let name = "a".repeat(validation::MAX_CLUSTER_NAME_LEN + 1);
    assert_eq!(
        validate(&cluster(&name, spec(3))),
        Err(InvalidSpec::NameTooLong {
            name: name.clone(),
            statefulset: name.clone(),
            len: name.len()
        })
    );
    let longest = "a".repeat(validation::MAX_CLUSTER_NAME_LEN);
    assert_eq!(validate(&cluster(&longest, spec(3))), Ok(()));
    // With groups, the longest `<name>-<group>` counts.
    let mut grouped = spec(3);
    grouped.groups = vec![group("east", 2, 1), group("longest-zone-15", 1, 1)];
    let fits = "a".repeat(names::MAX_STATEFULSET_NAME_LEN - "-longest-zone-15".len());
    assert_eq!(validate(&cluster(&fits, grouped.clone())), Ok(()));
    let error = validate(&cluster(&format!("{fits}a"), grouped))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("-longest-zone-15\" has 53 characters, at most 52"),
        "{error}"
    );
}

#[test]
fn the_name_limit_keeps_every_derived_name_a_label() {
    assert_eq!(names::MAX_STATEFULSET_NAME_LEN, 52);
    let name = "a".repeat(validation::MAX_CLUSTER_NAME_LEN);
    let mut derived = vec![
        names::rw_service(&name),
        names::ro_service(&name),
        names::r_service(&name),
        names::headless_service(&name),
        // The controller-revision-hash label value: `<statefulset>-<hash>`, hash ≤ 10.
        format!("{name}-{}", u32::MAX),
        crate::protocol::names::slot_name_for(&format!("{name}-15")),
    ];
    derived.extend(instance_names(&name, &spec(16)));
    for derived in derived {
        assert!(derived.len() <= names::MAX_LABEL_LEN, "{derived}");
        assert!(
            names::is_dns1035_label(&derived.replace('_', "-")),
            "{derived}"
        );
    }
}

#[test]
fn validate_refuses_names_that_are_not_dns_labels() {
    for name in ["pg.prod", "1pg", "pg-", "Pg"] {
        let error = validate(&cluster(name, spec(3))).unwrap_err();
        assert_eq!(
            error,
            InvalidSpec::NameNotLabel {
                name: name.to_string()
            }
        );
        assert!(error.to_string().contains("DNS-1035 label"));
    }
    assert!(names::is_dns1035_label("pg-2"));
    assert!(!names::is_dns1035_label(""));
}

#[test]
fn validate_refuses_the_parameters_admission_refuses() {
    let mut spec = spec(3);
    spec.parameters.insert("ssl".into(), "on".into());
    let error = validate(&cluster("pg", spec.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("spec.parameters: ssl cannot be set: TLS settings"),
        "{error}"
    );
    spec.parameters.clear();
    spec.parameters.insert(
        "shared_preload_libraries".into(),
        "pg_stat_statements".into(),
    );
    assert_eq!(validate(&cluster("pg", spec)), Ok(()));
}

#[test]
fn validate_refuses_parameters_the_chosen_major_no_longer_has() {
    let mut spec = spec(3);
    spec.parameters
        .insert("old_snapshot_threshold".into(), "-1".into());
    spec.postgres_version = 16;
    assert_eq!(validate(&cluster("pg", spec.clone())), Ok(()));
    spec.postgres_version = 17;
    let error = validate(&cluster("pg", spec)).unwrap_err().to_string();
    assert!(
        error.contains("spec.parameters.old_snapshot_threshold does not exist in PostgreSQL 17"),
        "{error}"
    );
}

#[test]
fn the_schema_accepts_the_supported_majors_and_defaults_to_15() {
    let crd =
        serde_json::to_value(<super::PgReplicaSet as kube::CustomResourceExt>::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let version = &schema["properties"]["spec"]["properties"]["postgresVersion"];
    let supported = crate::postgres::version::SUPPORTED_MAJORS;
    let bound = |major: u32| Some(f64::from(major));
    assert_eq!(version["minimum"].as_f64(), bound(*supported.start()));
    assert_eq!(version["maximum"].as_f64(), bound(*supported.end()));
    let default = crate::postgres::version::DEFAULT_MAJOR;
    assert_eq!(version["default"].as_u64(), Some(u64::from(default)));
}

#[test]
fn validate_refuses_a_switchover_to_an_unknown_instance() {
    let mut spec = spec(3);
    spec.switchover = Some(SwitchoverSpec {
        target_instance: "pg-3".to_string(),
    });
    let error = validate(&cluster("pg", spec.clone())).unwrap_err();
    assert!(error.to_string().contains("spec.switchover.targetInstance"));
    spec.switchover = Some(SwitchoverSpec {
        target_instance: "pg-2".to_string(),
    });
    assert_eq!(validate(&cluster("pg", spec)), Ok(()));
}

#[test]
fn engine_spec_carries_the_failover_settings() {
    let mut spec = spec(3);
    spec.replication.mode = ReplicationMode::Sync;
    spec.replication.sync_replicas = 2;
    spec.replication.data_durability = DataDurability::Preferred;
    spec.replication.max_failover_lag_bytes = Some(4096);
    spec.failover.lease_duration_seconds = 3.0;
    spec.failover.allow_data_loss = true;
    spec.monitoring.status_interval_seconds = 4;
    let engine = engine_spec("pg", &spec);
    assert_eq!(engine.mode, engine::ReplicationMode::Sync);
    assert_eq!(engine.sync_replicas, 2);
    assert_eq!(engine.durability, engine::DataDurability::Preferred);
    assert_eq!(engine.max_failover_lag_bytes, Some(4096));
    assert_eq!(engine.lease_duration, Duration::from_secs(3));
    assert!(engine.allow_data_loss);
    assert!(engine.failover_enabled);
    // Three missed polls of 4 s, more than the engine's default.
    assert_eq!(engine.report_stale_after, Duration::from_secs(12));
}

#[test]
fn engine_spec_expands_group_priorities_to_instances() {
    let mut spec = spec(3);
    spec.groups = vec![group("east", 2, 5), group("dr", 1, 0)];
    let engine = engine_spec("pg", &spec);
    assert_eq!(engine.priority_of("pg-east-0"), 5);
    assert_eq!(engine.priority_of("pg-east-1"), 5);
    assert_eq!(engine.priority_of("pg-dr-0"), 0);
    assert_eq!(engine.priorities.len(), 3);
}

#[test]
fn fractional_seconds_become_milliseconds() {
    assert_eq!(seconds_to_duration(0.5), Duration::from_millis(500));
    assert_eq!(seconds_to_duration(1.25), Duration::from_millis(1250));
    assert_eq!(seconds_to_duration(8.0), Duration::from_secs(8));
    assert_eq!(seconds_to_duration(-1.0), Duration::ZERO);
}

#[test]
fn crd_renders_with_its_header() {
    let yaml = crd_yaml().expect("renders");
    assert!(yaml.starts_with("# Generated by `pgrs crd`"));
    assert!(yaml.contains("name: pgreplicasets.pgrs.dev"));
}

#[test]
fn descriptions_are_reflowed_but_keep_paragraphs_and_lists() {
    assert_eq!(
        reflow("one\ntwo\n\nthree\n- a\n- b"),
        "one two\n\nthree\n- a\n- b"
    );
    let crd = serde_json::to_value(crd().expect("CRD builds")).expect("serializes");
    let failover = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["failover"]["properties"]["enabled"]["description"];
    assert_eq!(
        failover,
        "Promote a standby automatically when the primary is lost. Planned switchovers work either way."
    );
}
