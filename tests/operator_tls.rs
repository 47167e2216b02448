//! TLS on the test bed (the default): the operator makes the cluster CA (`<name>-ca`) and the
//! server certificate every instance serves (`<name>-tls`); a client that trusts only that CA
//! and checks the name (`verify-full`, SCRAM with `channel_binding=require`) logs in on a pod
//! IP; a plain connection from the pod network is refused by `pg_hba.conf`; every replication
//! connection is encrypted; the agents' API answers HTTPS only, verified as the cluster's
//! name, and a client of another CA is refused. The manifest allows remote superuser logins
//! (`enableSuperuserAccess: true`): the superuser logs in over TLS, verified.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use operator_support::*;
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
  # The superuser logs in from the pod network only when allowed (pg_stat_replication below).
  enableSuperuserAccess: true
";

async fn secret_text(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> (String, Vec<(String, String)>) {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("read the Secret {name}: {e}"));
    let data = secret
        .data
        .expect("Secret data")
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("UTF-8 value")))
        .collect();
    (secret.type_.unwrap_or_default(), data)
}

fn key<'a>(data: &'a [(String, String)], key: &str) -> &'a str {
    data.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| {
            panic!(
                "key {key} in {:?}",
                data.iter().map(|(k, _)| k).collect::<Vec<_>>()
            )
        })
}

/// `verify-full` with the cluster CA: dials `ip`, checks the certificate for `server_name`.
async fn connect_verified(
    ip: &str,
    server_name: &str,
    ca_pem: &str,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(server_name)
        .hostaddr(ip.parse().expect("a pod IP"))
        .port(5432)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .channel_binding(tokio_postgres::config::ChannelBinding::Require)
        .connect_timeout(Duration::from_secs(5));
    let rustls = pgrs::tls::client_config(ca_pem, None).map_err(|e| e.to_string())?;
    let (client, connection) = config
        .connect(pgrs::tls::postgres_connector(rustls))
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => format!("{e}: {:?}", std::error::Error::source(&e)),
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Every byte the pod's interface sends and receives during `duration` (an `AF_PACKET` socket
/// in the pod's network namespace: what a sniffer on the node would see of this pod).
fn sniff(pod: &pgrs_testbed::faults::PodNet, duration: Duration) -> Vec<u8> {
    pod.run_inside(move || {
        // SAFETY: plain socket calls on a descriptor owned and closed here.
        unsafe {
            let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let mut captured = Vec::new();
            let mut buffer = vec![0u8; 65_536];
            let until = std::time::Instant::now() + duration;
            while std::time::Instant::now() < until {
                let n = libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0);
                if n > 0 {
                    captured.extend_from_slice(&buffer[..n as usize]);
                }
            }
            libc::close(fd);
            captured
        }
    })
    .expect("enter the pod's network namespace")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_of_a_default_cluster_is_encrypted_and_verified() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-tls").await;
    let _operator = OperatorProcess::start(bed, &ns_name);
    apply_manifest_text(bed, &ns_name, MANIFEST);
    let primary = wait_three_ready_healthy(&client, &ns_name, CLUSTER, "cluster Healthy").await;

    // The Secrets: a CA, and a kubernetes.io/tls server certificate it issued for the
    // cluster's names.
    let (_, ca) = secret_text(&client, &ns_name, "pg-ca").await;
    let ca_pem = key(&ca, "ca.crt").to_string();
    assert!(key(&ca, "ca.key").contains("PRIVATE KEY"));
    let (kind, tls) = secret_text(&client, &ns_name, "pg-tls").await;
    assert_eq!(kind, "kubernetes.io/tls");
    assert_eq!(key(&tls, "ca.crt"), ca_pem);
    let cert = key(&tls, "tls.crt");
    assert!(pgrs::tls::issued_by(cert, &ca_pem).expect("a certificate"));
    let wanted: Vec<String> = [
        "pg-rw",
        &format!("pg-rw.{ns_name}.svc"),
        &format!("*.pg-instances.{ns_name}.svc"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        pgrs::tls::covers(cert, &wanted, &[]).expect("SANs"),
        "{wanted:?}"
    );

    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let primary_ip = ips[&primary].clone();
    let password = superuser_login(&client, &ns_name, CLUSTER).await.password;
    let server_name = format!("pg-rw.{ns_name}.svc");

    // verify-full + channel binding on the primary's pod IP.
    let session = eventually("a verified session", Duration::from_secs(30), || {
        connect_verified(&primary_ip, &server_name, &ca_pem, &password)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let row = session
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "the session is not encrypted");
    eprintln!("verified session: {}", row.get::<_, String>(1));

    // Every replication connection is encrypted.
    let streams = eventually(
        "two encrypted walsenders",
        Duration::from_secs(30),
        || async {
            let rows = session
                .query(
                    "SELECT r.application_name, s.ssl FROM pg_stat_replication r \
                 JOIN pg_stat_ssl s USING (pid)",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            let all: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            if all.len() == 2 && all.iter().all(|(_, ssl)| *ssl) {
                Ok(all)
            } else {
                Err(format!("walsenders (name, ssl): {all:?}"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("encrypted walsenders: {streams:?}");

    // A certificate name the server does not carry, or another CA: refused.
    assert!(
        connect_verified(&primary_ip, "db.example", &ca_pem, &password)
            .await
            .is_err(),
        "a wrong server name was accepted"
    );
    let other = pgrs::tls::Authority::generate("other", Duration::from_secs(86_400)).expect("a CA");
    assert!(
        connect_verified(&primary_ip, &server_name, other.cert_pem(), &password)
            .await
            .is_err(),
        "a certificate of another CA was accepted"
    );

    // Plain TCP from the pod network: refused by pg_hba.conf, naming the missing encryption.
    let mut plain = tokio_postgres::Config::new();
    plain
        .host(&primary_ip)
        .port(5432)
        .user("postgres")
        .password(&password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let refused = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain connection was accepted");
    let message = refused
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| refused.to_string());
    assert!(message.contains("no encryption"), "{message}");

    // The agents' API: HTTPS only, verified as the cluster's headless name.
    let agent_name = format!("pg-instances.{ns_name}.svc");
    let https = pgrs::tls::agent_http_client(&ca_pem, &agent_name).expect("an HTTPS client");
    for ip in ips.values() {
        let healthz = https
            .get(format!("https://{ip}:8008/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("https://{ip}:8008/healthz: {e}"));
        assert!(healthz.status().is_success(), "{}", healthz.status());
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a client")
            .get(format!("http://{ip}:8008/healthz"))
            .send()
            .await;
        assert!(
            http.as_ref()
                .map(|r| !r.status().is_success())
                .unwrap_or(true),
            "plain HTTP answered: {http:?}"
        );
    }
    let foreign = pgrs::tls::agent_http_client(other.cert_pem(), &agent_name).expect("a client");
    assert!(
        foreign
            .get(format!("https://{primary_ip}:8008/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_err(),
        "an agent's certificate verified against another CA"
    );

    // A sniffer on the primary's interface while rows replicate, the test's session writes,
    // and the operator and this test call the agent with the token: none of it in cleartext.
    // The canary (the user name of a plain connection attempt, sent before the refusal)
    // shows that the sniffer sees what is in cleartext.
    let token = {
        let (_, secrets) = secret_text(&client, &ns_name, "pg-secrets").await;
        key(&secrets, "agent-token").to_string()
    };
    let pod = bed
        .pod_net(&ns_name, &primary)
        .expect("the primary's network namespace");
    let sniffer = tokio::task::spawn_blocking(move || sniff(&pod, Duration::from_secs(8)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let row_marker = "sniffed-row-marker-7f3a";
    session
        .batch_execute("CREATE TABLE IF NOT EXISTS sniffed (note text)")
        .await
        .expect("create a table");
    for _ in 0..20 {
        session
            .execute("INSERT INTO sniffed VALUES ($1)", &[&row_marker])
            .await
            .expect("insert a row");
    }
    let status = https
        .get(format!("https://{primary_ip}:8008/v1/status"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the status over HTTPS");
    assert!(status.status().is_success(), "{}", status.status());
    let canary = "sniffer-canary-user";
    let mut plain = tokio_postgres::Config::new();
    plain
        .host(&primary_ip)
        .port(5432)
        .user(canary)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let _ = plain.connect(tokio_postgres::NoTls).await;
    let captured = sniffer.await.expect("the sniffer");
    eprintln!("sniffed {} bytes on {primary}'s interface", captured.len());
    assert!(
        contains(&captured, canary),
        "the sniffer saw nothing in cleartext"
    );
    assert!(
        !contains(&captured, row_marker),
        "a row crossed the network in cleartext"
    );
    assert!(
        !contains(&captured, &token),
        "the agent token crossed the network in cleartext"
    );
    assert!(
        !contains(&captured, &password),
        "the superuser password crossed the network in cleartext"
    );
}
