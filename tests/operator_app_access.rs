//! Application access on the test bed: a cluster with `spec.bootstrap` gets the Secret
//! `<name>-app`; its credentials log in as the owner role to its database on the primary
//! (writes included), a wrong password is refused, the same credentials work on the new
//! primary after a switchover, and deleting the Secret of a bootstrapped cluster is an error
//! Event (never a new password). Remote superuser logins are refused by default
//! (`enableSuperuserAccess` unset): the superuser's right password over TLS gets `pg_hba.conf
//! rejects connection` on every pod, and the switchover works without them;
//! `enableSuperuserAccess: true` lets it in on every pod and `false` refuses it again, both
//! without restarting postgres.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`). The Service DNS name does not resolve on the test bed: the `uri` is
//! checked to parse and name `<name>-rw.<ns>`, and the sessions go to the primary pod's IP.

mod operator_support;

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use operator_support::*;
use pgrs::api::Phase;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

const MANIFEST: &str = "\
apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata:
  name: pg
spec:
  replicas: 3
  storage:
    size: 1Gi
  bootstrap:
    database: shop
    owner: shop_owner
";

/// The `<cluster>-app` Secret's keys as strings.
async fn app_secret(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{CLUSTER}-app"))
        .await
        .expect("read the Secret pg-app");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    secret
        .data
        .expect("Secret data")
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("UTF-8 value")))
        .collect()
}

/// Logs in as the Secret's `username` to `host` with `password`, its `dbname`.
async fn login(
    host: &str,
    app: &BTreeMap<String, String>,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(app["port"].parse().expect("port"))
        .user(&app["username"])
        .password(password)
        .dbname(&app["dbname"])
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(5));
    let tls = pgrs::tls::encrypt_only_connector().map_err(|e| e.to_string())?;
    let (client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Every instance's `pg_postmaster_start_time()` (unchanged unless postgres restarted).
async fn postmaster_starts(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let login = app_login(client, ns, CLUSTER).await;
    let mut starts = BTreeMap::new();
    for (pod, ip) in pod_ips(client, ns, CLUSTER).await {
        let session = connect(&ip, &login).await.expect("connect as the owner");
        let start: String = session
            .query_one("SELECT pg_postmaster_start_time()::text", &[])
            .await
            .expect("pg_postmaster_start_time")
            .get(0);
        starts.insert(pod, start);
    }
    starts
}

/// Logs in with the Secret's password, retrying a little (a new primary may still be running
/// its promotion's last statements).
async fn login_eventually(host: &str, app: &BTreeMap<String, String>) -> tokio_postgres::Client {
    eventually(
        &format!("log in as the app owner on {host}"),
        Duration::from_secs(60),
        || login(host, app, &app["password"]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_secret_logs_in_as_the_owner_before_and_after_a_switchover() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-app").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_manifest_text(bed, &ns_name, MANIFEST);
    let primary = wait_three_ready_healthy(&client, &ns_name, CLUSTER, "cluster Healthy").await;

    let app = app_secret(&client, &ns_name).await;
    assert_eq!(app["username"], "shop_owner");
    assert_eq!(app["dbname"], "shop");
    assert_eq!(app["host"], "pg-rw");
    assert_eq!(app["port"], "5432");
    assert!(app["password"].len() >= 32, "a generated password");
    let host = format!("pg-rw.{ns_name}");
    assert_eq!(
        app["jdbc-uri"],
        format!(
            "jdbc:postgresql://{host}:5432/shop?password={}&user=shop_owner",
            app["password"]
        )
    );
    assert_eq!(
        app["pgpass"],
        format!("{host}:5432:shop:shop_owner:{}\n", app["password"])
    );
    let uri = tokio_postgres::Config::from_str(&app["uri"]).expect("the uri parses");
    assert_eq!(uri.get_user(), Some("shop_owner"));
    assert_eq!(uri.get_dbname(), Some("shop"));
    assert_eq!(uri.get_password(), Some(app["password"].as_bytes()));
    assert_eq!(uri.get_ports(), [5432]);
    assert!(
        matches!(uri.get_hosts(), [tokio_postgres::config::Host::Tcp(h)] if *h == host),
        "{:?}",
        uri.get_hosts()
    );

    // The uri with the primary pod's IP in place of the Service name.
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let primary_ip = ips[&primary].clone();
    let direct = app["uri"].replace(&format!("@{host}:"), &format!("@{primary_ip}:"));
    let mut config = tokio_postgres::Config::from_str(&direct).expect("the direct uri parses");
    config
        .connect_timeout(Duration::from_secs(5))
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (session, connection) = config
        .connect(pgrs::tls::encrypt_only_connector().expect("a TLS connector"))
        .await
        .expect("connect with the uri");
    tokio::spawn(connection);
    session
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1)")
        .await
        .expect("the owner creates a table and writes");
    let user: String = session
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    assert_eq!(user, "shop_owner");

    let Err(refused) = login(&primary_ip, &app, "not-the-password").await else {
        panic!("a wrong password is refused");
    };
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );

    // The superuser, with its right password over TLS, is refused from the pod network on
    // every instance (no `enableSuperuserAccess`): `pg_hba.conf` rejects it before SCRAM.
    let superuser = superuser_login(&client, &ns_name, CLUSTER).await;
    for (pod, ip) in &ips {
        let Err(refused) = connect(ip, &superuser).await else {
            panic!("a remote superuser login to {pod} was accepted");
        };
        assert!(
            refused.contains("pg_hba.conf rejects connection") && refused.contains("\"postgres\""),
            "{pod}: {refused}"
        );
    }

    // Allowed live (no pod restart: a `pg_hba.conf` reload), then refused again.
    let starts = postmaster_starts(&client, &ns_name).await;
    merge_patch_spec(bed, &ns_name, CLUSTER, r#"{"enableSuperuserAccess":true}"#);
    for (pod, ip) in &ips {
        let session = eventually(
            &format!("a remote superuser login to {pod}"),
            Duration::from_secs(30),
            || connect(ip, &superuser),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let is_superuser: bool = session
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .expect("rolsuper")
            .get(0);
        assert!(is_superuser, "{pod}");
    }
    merge_patch_spec(bed, &ns_name, CLUSTER, r#"{"enableSuperuserAccess":false}"#);
    for (pod, ip) in &ips {
        eventually(
            &format!("the remote superuser refused again on {pod}"),
            Duration::from_secs(30),
            || async {
                match connect(ip, &superuser).await {
                    Ok(_) => Err("accepted".to_string()),
                    Err(e) if e.contains("pg_hba.conf rejects connection") => Ok(()),
                    Err(e) => Err(e),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        postmaster_starts(&client, &ns_name).await,
        starts,
        "no postgres restarted"
    );

    // A switchover: the same credentials work on the new primary, the row is there.
    let target = ["pg-0", "pg-1", "pg-2"]
        .into_iter()
        .find(|name| *name != primary)
        .expect("a standby")
        .to_string();
    request_switchover(bed, &ns_name, CLUSTER, &target);
    eventually(
        "the target is Healthy primary",
        Duration::from_secs(120),
        || async {
            let status = cluster_status(&client, &ns_name, CLUSTER).await?;
            match (&status.phase, &status.current_primary) {
                (Some(Phase::Healthy), Some(current)) if *current == target => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let target_ip = ips[&target].clone();
    let session = login_eventually(&target_ip, &app).await;
    session
        .batch_execute("INSERT INTO orders VALUES (2)")
        .await
        .expect("the owner writes on the new primary");
    let count: i64 = session
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2);

    // Deleting the Secret of a bootstrapped cluster: an error, not a new password.
    kubectl(
        bed,
        &[
            "delete",
            "secret",
            &format!("{CLUSTER}-app"),
            "-n",
            &ns_name,
        ],
    );
    wait_event(bed, &ns_name, "SecretMissing", "pg-app").await;
    let recreated = Api::<Secret>::namespaced(client.clone(), &ns_name)
        .get_opt(&format!("{CLUSTER}-app"))
        .await
        .expect("read the Secret pg-app");
    assert!(recreated.is_none(), "the Secret is not generated again");
    drop(operator);
}
