//! Unit tests of [`super`]: rendering is pure, so every rule is checked here.

use std::path::Path;

use super::*;

fn settings() -> PostgresSettings {
    PostgresSettings {
        instance_name: "db-1".into(),
        port: 5433,
        listen_addresses: "127.0.0.1".into(),
        socket_dir: "/run/pgrs".into(),
        max_wal_senders: 10,
        max_replication_slots: 10,
        wal_keep_size_mb: 64,
        max_slot_wal_keep_size_mb: Some(1024),
        archive_command: None,
        synchronous_standby_names: None,
        parameters: BTreeMap::new(),
        parameters_include: None,
        tls: None,
    }
}

#[test]
fn primary_config_has_replication_settings_and_no_upstream() {
    let text = render_postgresql_conf(&settings(), None).unwrap();
    for expected in [
        "port = 5433\n",
        "wal_level = replica\n",
        "hot_standby = on\n",
        "max_wal_senders = 10\n",
        "wal_keep_size = '64MB'\n",
        "max_slot_wal_keep_size = '1024MB'\n",
        "archive_mode = off\n",
        "primary_conninfo = ''\n",
        "unix_socket_directories = '/run/pgrs'\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[test]
fn standby_config_points_at_upstream_with_passfile_and_slot() {
    let standby = StandbySettings {
        upstream: Upstream {
            host: "10.0.0.1".into(),
            port: 5432,
            slot: Some("pgrs_db_1".into()),
        },
        replication_user: "replicator".into(),
        passfile: "/run/pgrs/pgpass".into(),
    };
    let text = render_postgresql_conf(&settings(), Some(&standby)).unwrap();
    assert!(
        text.contains(
            "primary_conninfo = 'host=''10.0.0.1'' port=5432 user=''replicator'' \
         passfile=''/run/pgrs/pgpass'' application_name=''db-1'' connect_timeout=5'\n"
        ),
        "{text}"
    );
    assert!(text.contains("primary_slot_name = 'pgrs_db_1'\n"), "{text}");
    assert!(!text.contains("password="), "{text}");
}

#[test]
fn archive_and_sync_settings_are_rendered_when_asked() {
    let mut s = settings();
    s.archive_command = Some("cp %p /archive/%f".into());
    s.synchronous_standby_names = Some("ANY 1 (*)".into());
    s.max_slot_wal_keep_size_mb = None;
    let text = render_postgresql_conf(&s, None).unwrap();
    assert!(text.contains("archive_mode = on\n"));
    assert!(text.contains("archive_command = 'cp %p /archive/%f'\n"));
    assert!(text.contains("synchronous_standby_names = 'ANY 1 (*)'\n"));
    assert!(text.contains("max_slot_wal_keep_size = -1\n"));
}

#[test]
fn user_parameters_are_quoted_and_agent_owned_ones_refused() {
    let parsed =
        parse_parameters(&["shared_buffers=16MB".into(), "log_line_prefix=it's".into()]).unwrap();
    let mut s = settings();
    s.parameters = parsed;
    let text = render_postgresql_conf(&s, None).unwrap();
    assert!(text.contains("shared_buffers = '16MB'\n"));
    assert!(text.contains("log_line_prefix = 'it''s'\n"));
    assert_eq!(
        parse_parameters(&["port=1".into()]),
        Err(ConfigError::AgentOwned("port".into()))
    );
    assert_eq!(
        parse_parameters(&["Primary_Conninfo=x".into()]),
        Err(ConfigError::AgentOwned("primary_conninfo".into()))
    );
    assert!(matches!(
        parse_parameters(&["bad name=1".into()]),
        Err(ConfigError::BadName(_))
    ));
    assert!(matches!(
        parse_parameters(&["novalue".into()]),
        Err(ConfigError::NotAnAssignment(_))
    ));
}

#[test]
fn the_parameters_file_round_trips_the_operator_rendering() {
    let text = "# Managed by pgrs from spec.parameters of the PgReplicaSet.\n\
                log_line_prefix = 'it''s %m \\\\ '\n\
                work_mem = '4MB'\n\
                \n\
                Shared_Buffers=16MB   # a comment\n";
    let parsed = parse_parameters_file(text).unwrap();
    assert_eq!(
        parsed,
        BTreeMap::from([
            ("log_line_prefix".to_string(), "it's %m \\ ".to_string()),
            ("shared_buffers".to_string(), "16MB".to_string()),
            ("work_mem".to_string(), "4MB".to_string()),
        ])
    );
    let include = render_parameters_include(&parsed);
    assert_eq!(parse_parameters_file(&include).unwrap(), parsed);
}

#[test]
fn the_parameters_file_refuses_directives_owned_names_and_garbage() {
    assert_eq!(
        parse_parameters_file("port = 1\n"),
        Err(ConfigError::AgentOwned("port".into()))
    );
    assert!(matches!(
        parse_parameters_file("include_if_exists = '/etc/x'\n"),
        Err(ConfigError::FileSyntax { line: 1, .. })
    ));
    assert!(matches!(
        parse_parameters_file("# c\nwork_mem = '4MB\n"),
        Err(ConfigError::FileSyntax { line: 2, .. })
    ));
    assert!(matches!(
        parse_parameters_file("work_mem = '4MB' x\n"),
        Err(ConfigError::FileSyntax { line: 1, .. })
    ));
}

#[test]
fn the_include_is_rendered_last_and_the_hash_is_stable() {
    let mut s = settings();
    s.parameters_include = Some("/run/pgrs/parameters.conf".into());
    let text = render_postgresql_conf(&s, None).unwrap();
    assert!(
        text.trim_end()
            .ends_with("include_if_exists = '/run/pgrs/parameters.conf'"),
        "{text}"
    );
    let a = BTreeMap::from([("work_mem".to_string(), "4MB".to_string())]);
    let b = BTreeMap::from([("work_mem".to_string(), "8MB".to_string())]);
    assert_eq!(parameters_hash(&a), parameters_hash(&a.clone()));
    assert_ne!(parameters_hash(&a), parameters_hash(&b));
    assert_ne!(parameters_hash(&a), parameters_hash(&BTreeMap::new()));
    // Name/value boundaries count: {"ab": "c"} is not {"a": "bc"}.
    let ab = BTreeMap::from([("ab".to_string(), "c".to_string())]);
    let a_bc = BTreeMap::from([("a".to_string(), "bc".to_string())]);
    assert_ne!(parameters_hash(&ab), parameters_hash(&a_bc));
    assert_eq!(parameters_hash(&BTreeMap::new()).len(), 16);
}

#[test]
fn parameters_removed_in_the_running_major_are_refused() {
    let parameters = parse_parameters(&["force_parallel_mode=on".into()]).unwrap();
    assert_eq!(check_parameters_for_major(15, &parameters), Ok(()));
    let error = check_parameters_for_major(16, &parameters).unwrap_err();
    assert!(
        error.to_string().contains("PostgreSQL 16")
            && error.to_string().contains("debug_parallel_query"),
        "{error}"
    );
    let fine = parse_parameters(&["work_mem=4MB".into()]).unwrap();
    for major in crate::postgres::version::SUPPORTED_MAJORS {
        assert_eq!(check_parameters_for_major(major, &fine), Ok(()));
    }
}

#[test]
fn nothing_the_agent_renders_is_missing_from_a_supported_major() {
    // What the agent writes must start every supported major: no parameter removed in any
    // of them (promote_trigger_file, gone in 16, above all).
    let mut s = settings();
    s.archive_command = Some("true".into());
    s.synchronous_standby_names = Some("ANY 1 (*)".into());
    let standby = StandbySettings {
        upstream: Upstream {
            host: "h".into(),
            port: 1,
            slot: Some("s".into()),
        },
        replication_user: "r".into(),
        passfile: "/p".into(),
    };
    for text in [
        render_postgresql_conf(&s, None).unwrap(),
        render_postgresql_conf(&s, Some(&standby)).unwrap(),
    ] {
        assert!(!text.contains("promote_trigger_file"), "{text}");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
        {
            let name = line.split(" = ").next().unwrap();
            for major in crate::postgres::version::SUPPORTED_MAJORS {
                assert_eq!(
                    crate::postgres::version::removed_parameter(major, name),
                    None,
                    "{name} on {major}"
                );
            }
        }
    }
}

#[test]
fn hba_uses_scram_only() {
    let text = render_pg_hba("replicator", false, None);
    let words = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    assert!(
        text.lines()
            .any(|l| words(l) == "host replication replicator"),
        "{text}"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.ends_with("scram-sha-256"), "{line}");
    }
}

#[test]
fn passfile_escapes_separators() {
    assert_eq!(passfile_line("rep", "a:b\\c"), "*:*:*:rep:a\\:b\\\\c\n");
}

#[test]
fn slot_names_are_valid_identifiers() {
    assert_eq!(slot_name_for("Db-1.x"), "pgrs_db_1_x");
    assert!(slot_name_for(&"a".repeat(100)).len() <= 63);
}

fn tls() -> TlsSettings {
    TlsSettings {
        cert_file: "/run/pgrs/tls/tls.crt".into(),
        key_file: "/run/pgrs/tls/tls.key".into(),
        ca_file: "/run/pgrs/tls/ca.crt".into(),
        server_name: "db-headless.ns.svc".into(),
    }
}

#[test]
fn tls_turns_ssl_on_with_the_agents_copies_of_the_files() {
    let mut s = settings();
    assert!(
        render_postgresql_conf(&s, None)
            .unwrap()
            .contains("ssl = off\n")
    );
    s.tls = Some(tls());
    let text = render_postgresql_conf(&s, None).unwrap();
    for expected in [
        "ssl = on\n",
        "ssl_cert_file = '/run/pgrs/tls/tls.crt'\n",
        "ssl_key_file = '/run/pgrs/tls/tls.key'\n",
        "ssl_ca_file = '/run/pgrs/tls/ca.crt'\n",
        "ssl_min_protocol_version = 'TLSv1.2'\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[test]
fn a_tls_standby_verifies_its_upstream_by_the_cluster_name_and_binds_the_channel() {
    let mut s = settings();
    s.tls = Some(tls());
    let standby = StandbySettings {
        upstream: Upstream {
            host: "10.0.0.1".into(),
            port: 5432,
            slot: None,
        },
        replication_user: "replicator".into(),
        passfile: "/run/pgrs/pgpass".into(),
    };
    let text = render_postgresql_conf(&s, Some(&standby)).unwrap();
    assert!(
        text.contains(
            "primary_conninfo = 'host=''db-headless.ns.svc'' hostaddr=''10.0.0.1'' port=5432 \
             user=''replicator'' passfile=''/run/pgrs/pgpass'' application_name=''db-1'' \
             connect_timeout=5 sslmode=verify-full sslrootcert=''/run/pgrs/tls/ca.crt'' \
             sslcert=''/run/pgrs/tls/client.crt'' channel_binding=require'\n"
        ),
        "{text}"
    );
    // A host name is verified as itself.
    let info = conninfo(
        "db-0.example",
        5432,
        "u",
        Path::new("/p"),
        "a",
        None,
        Some(&tls()),
    );
    assert!(info.starts_with("host='db-0.example' port=5432"), "{info}");
    assert!(!info.contains("hostaddr"), "{info}");
}

#[test]
fn with_tls_remote_connections_must_use_it_and_loopback_may_not() {
    let text = render_pg_hba("replicator", true, None);
    let rules: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    // The first rule matching (type, database, address) wins, as in postgres.
    let first = |kind: &str, database: &str, network: &str| {
        rules
            .iter()
            .find(|r| {
                (r[0] == kind || (r[0] == "host" && kind != "local"))
                    && (r[1] == database || r[1] == "all")
                    && r.get(3) == Some(&network)
            })
            .map(|r| *r.last().unwrap())
    };
    assert_eq!(first("hostnossl", "all", "0.0.0.0/0"), Some("reject"));
    assert_eq!(first("hostnossl", "replication", "::/0"), Some("reject"));
    assert_eq!(first("hostssl", "all", "0.0.0.0/0"), Some("scram-sha-256"));
    assert_eq!(
        first("hostssl", "replication", "0.0.0.0/0"),
        Some("scram-sha-256")
    );
    assert_eq!(
        first("hostnossl", "all", "127.0.0.1/32"),
        Some("scram-sha-256")
    );
    assert!(!text.contains("trust"), "{text}");
}

/// Rules as (type, database, user, network, method), comments left out.
fn hba_rules(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("local"))
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// The method of the first rule postgres would match for a TCP login (`ssl`: over TLS).
fn first_match<'a>(
    rules: &'a [Vec<&'a str>],
    ssl: bool,
    database: &str,
    user: &str,
    network: &str,
) -> Option<&'a str> {
    rules
        .iter()
        .find(|r| {
            let kind = r[0] == "host" || (r[0] == "hostssl") == ssl;
            let db = r[1] == database || (r[1] == "all" && database != "replication");
            kind && db && (r[2] == user || r[2] == "all") && r[3] == network
        })
        .map(|r| r[4])
}

#[test]
fn without_superuser_access_the_superuser_logs_in_over_loopback_only() {
    for tls in [false, true] {
        let text = render_pg_hba("replicator", tls, Some("postgres"));
        let rules = hba_rules(&text);
        for network in ["0.0.0.0/0", "::/0"] {
            assert_eq!(
                first_match(&rules, tls, "postgres", "postgres", network),
                Some("reject"),
                "tls {tls}: {text}"
            );
            assert_eq!(
                first_match(&rules, tls, "postgres", "app", network),
                Some("scram-sha-256"),
                "tls {tls}: {text}"
            );
            assert_eq!(
                first_match(&rules, tls, "replication", "replicator", network),
                Some("scram-sha-256"),
                "tls {tls}: {text}"
            );
        }
        for network in ["127.0.0.1/32", "::1/128"] {
            assert_eq!(
                first_match(&rules, tls, "postgres", "postgres", network),
                Some("scram-sha-256"),
                "tls {tls}: {text}"
            );
        }
    }
    let allowed = render_pg_hba("replicator", true, None);
    assert_eq!(
        first_match(
            &hba_rules(&allowed),
            true,
            "postgres",
            "postgres",
            "0.0.0.0/0"
        ),
        Some("scram-sha-256"),
        "{allowed}"
    );
}
