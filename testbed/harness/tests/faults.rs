//! Issue 13, first building block: network faults per pod and direction (also the
//! host's connections to one pod port, sparing the kubelet's probes), delay and loss,
//! and API-server/etcd outages — each proven with real traffic.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use pgrs_testbed::control_plane::Restartable;
use pgrs_testbed::faults::{Direction, Netem, Peer, PodNet};
use pgrs_testbed::kubelet::images::TINY_HTTP_IMAGE_REPOSITORY;
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestNamespace, shared};
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_secs(60);
const CUT_TIMEOUT: Duration = Duration::from_millis(500);

/// One test at a time: they share one bed, and one test's faults (the control plane taken
/// away, iptables and netem rules, a loaded machine timing out another's connects) made the
/// others' checks fail in CI when they ran side by side.
static ALONE: Mutex<()> = Mutex::const_new(());

async fn bed() -> &'static TestBed {
    match shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

/// Starts tiny-http pods `names` in `ns` and returns their network namespaces once
/// they are Ready.
async fn pods(bed: &TestBed, ns: &TestNamespace<'_>, names: &[&str]) -> Vec<PodNet> {
    let client = bed.client().await.expect("client");
    let api: Api<Pod> = Api::namespaced(client, ns.name());
    for name in names {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "web",
                    "image": format!("{TINY_HTTP_IMAGE_REPOSITORY}:test"),
                    "args": ["--port", "8080"],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}
                }]
            }
        }))
        .expect("pod");
        api.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }
    eventually("pods Ready", TIMEOUT, || async {
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let ready = list
            .items
            .iter()
            .filter(|p| names.contains(&p.metadata.name.as_deref().unwrap_or_default()))
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready == names.len() {
            Ok(())
        } else {
            Err(format!("{ready} of {} ready", names.len()))
        }
    })
    .await
    .expect("pods ready");
    names
        .iter()
        .map(|name| bed.pod_net(ns.name(), name).expect("pod network namespace"))
        .collect()
}

fn http(pod: &PodNet) -> SocketAddr {
    SocketAddr::from((pod.ip(), 8080))
}

/// Whether `from` completes a TCP connect to `to` within [`CUT_TIMEOUT`].
fn reaches(from: &PodNet, to: SocketAddr) -> bool {
    from.tcp_connect(to, CUT_TIMEOUT)
        .expect("enter the pod's namespace")
        .is_ok()
}

/// Whether `from` reaches `to` within a few connect attempts: a heal (or a busy
/// machine) may need a moment before a handshake completes, a cut never lets one through.
fn reaches_soon(from: &PodNet, to: SocketAddr) -> bool {
    (0..6).any(|attempt| {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        reaches(from, to)
    })
}

async fn get_text(url: &str) -> Result<String, String> {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("{status}: {text}"))
    }
}

/// A UDP socket bound inside `pod` on an ephemeral port, with a short read timeout.
fn udp(pod: &PodNet) -> UdpSocket {
    let ip = pod.ip();
    let socket = pod
        .run_inside(move || UdpSocket::bind((ip, 0)))
        .expect("enter the pod's namespace")
        .expect("bind udp");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    socket
}

/// How many of `count` datagrams `from` sends to `to` arrive (sent in bursts of 50,
/// so that `to`'s receive buffer never overflows).
fn delivered(from: &UdpSocket, to: &UdpSocket, count: usize) -> usize {
    let target = to.local_addr().expect("address");
    let mut buffer = [0u8; 16];
    let mut received = 0;
    for burst in (0..count).collect::<Vec<_>>().chunks(50) {
        for i in burst {
            // A cut or lossy outbound direction fails the send itself (EPERM from DROP).
            let _ = from.send_to(&(*i as u32).to_be_bytes(), target);
        }
        while to.recv_from(&mut buffer).is_ok() {
            received += 1;
        }
    }
    received
}

fn iptables_rules(pod: &PodNet) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", pod.netns(), "iptables", "-S"])
        .output()
        .expect("iptables -S");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_separate_a_pod_from_the_api_server_one_peer_or_everyone_and_heal() {
    let _alone = ALONE.lock().await;
    let bed = bed().await;
    let ns = bed.namespace("cuts").await.expect("namespace");
    let pods = pods(bed, &ns, &["a", "b", "c"]).await;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let whoami = format!("http://{}/whoami", http(a));
    let user = format!("system:serviceaccount:{}:default", ns.name());

    // Before: the pod process reaches the API server; everyone reaches everyone.
    assert_eq!(get_text(&whoami).await.expect("whoami before"), user);
    assert!(reaches_soon(a, a.api_address()));
    assert!(reaches_soon(a, http(b)) && reaches_soon(b, http(a)));

    // Cut from the API server only.
    a.cut(Peer::ApiServer, Direction::Both).expect("cut api");
    assert!(!reaches(a, a.api_address()), "a reaches the API server");
    let during = get_text(&whoami).await;
    assert!(
        during.is_err(),
        "whoami answered during the cut: {during:?}"
    );
    assert!(reaches_soon(a, http(b)), "an API cut also cut a peer");
    get_text(&format!("http://{}/healthz", http(a)))
        .await
        .expect("the host (and the kubelet's probes) still reach the pod");
    a.heal(Peer::ApiServer, Direction::Both).expect("heal api");
    assert!(reaches_soon(a, a.api_address()));
    let after = eventually("whoami after heal", Duration::from_secs(15), || {
        get_text(&whoami)
    })
    .await
    .expect("whoami after heal");
    assert_eq!(after, user);

    // Cut from one peer only: the other peer is still reachable, both ways.
    a.cut(Peer::Ip(b.ip()), Direction::Both).expect("cut b");
    assert!(
        !reaches(a, http(b)) && !reaches(b, http(a)),
        "a and b still talk"
    );
    assert!(
        reaches_soon(a, http(c)) && reaches_soon(c, http(a)),
        "c lost a"
    );
    a.heal(Peer::Ip(b.ip()), Direction::Both).expect("heal b");
    assert!(reaches_soon(a, http(b)) && reaches_soon(b, http(a)));

    // One direction: a drops what b sends but b still hears a (UDP shows it; a TCP
    // handshake needs both directions).
    let (ua, ub) = (udp(a), udp(b));
    a.cut(Peer::Ip(b.ip()), Direction::Inbound)
        .expect("cut inbound");
    assert_eq!(delivered(&ua, &ub, 5), 5, "outbound a→b was cut too");
    assert_eq!(delivered(&ub, &ua, 5), 0, "inbound b→a was not cut");
    a.heal(Peer::Ip(b.ip()), Direction::Inbound)
        .expect("heal inbound");
    a.cut(Peer::Ip(b.ip()), Direction::Outbound)
        .expect("cut outbound");
    assert_eq!(delivered(&ua, &ub, 5), 0, "outbound a→b was not cut");
    assert_eq!(delivered(&ub, &ua, 5), 5, "inbound b→a was cut too");
    a.heal(Peer::Ip(b.ip()), Direction::Both)
        .expect("heal outbound via both");
    assert_eq!(delivered(&ua, &ub, 5), 5);

    // Cut from everyone (node lost), then heal everything.
    a.cut(Peer::Everyone, Direction::Both)
        .expect("cut everyone");
    assert!(!reaches(a, a.api_address()) && !reaches(a, http(b)) && !reaches(c, http(a)));
    let host = get_text(&format!("http://{}/healthz", http(a))).await;
    assert!(host.is_err(), "the host reached a cut-off pod: {host:?}");
    // b's own traffic is untouched.
    assert!(reaches_soon(b, http(c)) && reaches_soon(b, b.api_address()));
    a.heal_all().expect("heal all");
    assert!(!iptables_rules(a).contains("PGRS"), "{}", iptables_rules(a));
    assert!(
        reaches_soon(a, a.api_address()),
        "a lost the API server after heal_all"
    );
    assert!(reaches_soon(a, http(b)), "a lost b after heal_all");
    assert!(reaches_soon(c, http(a)), "c lost a after heal_all");
}

/// Whether pod `name`'s `Ready` condition is True.
async fn pod_ready(bed: &TestBed, ns: &str, name: &str) -> bool {
    let client = bed.client().await.expect("client");
    let pod = Api::<Pod>::namespaced(client, ns)
        .get(name)
        .await
        .expect("get pod");
    pod.status
        .and_then(|s| s.conditions)
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `GET url` sent from `source` (a local address of the host).
async fn get_from(source: std::net::Ipv4Addr, url: &str) -> Result<String, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .local_address(std::net::IpAddr::V4(source))
        .build()
        .map_err(|e| e.to_string())?
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_cut_stops_the_hosts_connections_to_that_port_but_not_the_probes() {
    let _alone = ALONE.lock().await;
    let bed = bed().await;
    let ns = bed.namespace("hostport").await.expect("namespace");
    let pods = pods(bed, &ns, &["a", "b"]).await;
    let (a, b) = (&pods[0], &pods[1]);
    let healthz = format!("http://{}/healthz", http(a));
    assert_ne!(
        a.probe_source(),
        bed.gateway(),
        "probes have their own source"
    );
    get_text(&healthz).await.expect("the host reaches a");

    // The host's connections to a:8080 stall; from the probes' address they pass, and
    // so do the pod's other connections to the host and its peers.
    a.cut(Peer::HostPort(8080), Direction::Both)
        .expect("cut the host from a:8080");
    let during = get_text(&healthz).await;
    assert!(during.is_err(), "the host reached a:8080: {during:?}");
    get_from(a.probe_source(), &healthz)
        .await
        .expect("the probes' address still reaches a:8080");
    assert!(reaches(a, a.api_address()), "a lost the API server");
    assert!(reaches(b, http(a)) && reaches(a, http(b)), "a lost b");
    // Past the readiness probe's failure threshold (3 × 1 s): still Ready.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        pod_ready(bed, ns.name(), "a").await,
        "a's readiness probe failed under a host-port cut"
    );
    a.heal(Peer::HostPort(8080), Direction::Both)
        .expect("heal the host port");
    get_text(&healthz).await.expect("the host reaches a again");

    // The probes really come from that address: cutting it fails them, a turns unready.
    a.cut(Peer::Ip(a.probe_source()), Direction::Both)
        .expect("cut the probes");
    eventually("a turns unready", Duration::from_secs(15), || async {
        (!pod_ready(bed, ns.name(), "a").await)
            .then_some(())
            .ok_or("still ready".to_owned())
    })
    .await
    .expect("a unready without its probes");
    get_text(&healthz)
        .await
        .expect("the host (gateway) still reaches a");
    a.heal_all().expect("heal all");
    eventually("a is ready again", Duration::from_secs(15), || async {
        pod_ready(bed, ns.name(), "a")
            .await
            .then_some(())
            .ok_or("not ready".to_owned())
    })
    .await
    .expect("a ready after the heal");
    assert!(!iptables_rules(a).contains("PGRS"), "{}", iptables_rules(a));
}

/// Median TCP connect time from `from` to `to` over 5 tries.
fn connect_time(from: &PodNet, to: SocketAddr) -> Duration {
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            from.tcp_connect(to, Duration::from_secs(3))
                .expect("enter the pod's namespace")
                .expect("connect")
        })
        .collect();
    times.sort();
    times[2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_loss_show_in_measured_traffic() {
    let _alone = ALONE.lock().await;
    let bed = bed().await;
    let ns = bed.namespace("netem").await.expect("namespace");
    let pods = pods(bed, &ns, &["a", "b"]).await;
    let (a, b) = (&pods[0], &pods[1]);
    let ms = Duration::from_millis;

    let baseline = connect_time(a, http(b));
    assert!(baseline < ms(50), "baseline connect {baseline:?}");

    let delay = Netem {
        delay: ms(200),
        loss: 0.0,
    };
    a.netem(Direction::Outbound, delay).expect("outbound delay");
    let outbound = connect_time(a, http(b));
    a.netem(Direction::Inbound, delay)
        .expect("inbound delay too");
    let both = connect_time(a, http(b));
    a.clear_netem().expect("clear");
    a.netem(Direction::Inbound, delay).expect("inbound delay");
    let inbound = connect_time(a, http(b));
    a.clear_netem().expect("clear");
    let cleared = connect_time(a, http(b));
    eprintln!(
        "connect a→b: baseline {baseline:?}, +200 ms out {outbound:?}, in {inbound:?}, both {both:?}, cleared {cleared:?}"
    );
    assert!(outbound >= ms(200) && outbound < ms(400), "{outbound:?}");
    assert!(inbound >= ms(200) && inbound < ms(400), "{inbound:?}");
    assert!(both >= ms(400) && both < ms(700), "{both:?}");
    assert!(cleared < ms(50), "{cleared:?}");

    // 50 % loss on what a sends; what b sends is untouched.
    let (ua, ub) = (udp(a), udp(b));
    a.netem(
        Direction::Outbound,
        Netem {
            delay: Duration::ZERO,
            loss: 0.5,
        },
    )
    .expect("loss");
    let lossy = delivered(&ua, &ub, 400);
    let other_way = delivered(&ub, &ua, 100);
    a.heal_all().expect("heal all");
    let healed = delivered(&ua, &ub, 400);
    eprintln!("udp a→b with 50% loss: {lossy}/400; b→a {other_way}/100; healed {healed}/400");
    assert!((120..=280).contains(&lossy), "{lossy}/400 delivered");
    assert_eq!(other_way, 100);
    assert_eq!(healed, 400);
    assert!(!iptables_rules(a).contains("PGRS"), "{}", iptables_rules(a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_and_etcd_restart_while_pods_keep_running() {
    let _alone = ALONE.lock().await;
    let bed = bed().await;
    let ns = bed.namespace("outage").await.expect("namespace");
    let pods = pods(bed, &ns, &["a"]).await;
    let a = &pods[0];
    let client = bed.client().await.expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = || async {
        tokio::time::timeout(
            Duration::from_secs(3),
            namespaces.list(&ListParams::default().limit(1)),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    list().await.expect("list before");
    let api_port: u16 = bed
        .server_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in the server URL");
    let healthz = format!("http://{}/healthz", http(a));
    let whoami = format!("http://{}/whoami", http(a));

    // kube-apiserver down: connections are refused, calls fail, pods keep serving.
    bed.stop_component(Restartable::KubeApiserver)
        .await
        .expect("stop kube-apiserver");
    let refused = std::net::TcpStream::connect(("127.0.0.1", api_port));
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert!(
        list().await.is_err(),
        "a call succeeded without an API server"
    );
    get_text(&healthz)
        .await
        .expect("the pod serves during the outage");
    assert!(get_text(&whoami).await.is_err(), "the pod reached the API");
    bed.start_component(Restartable::KubeApiserver)
        .await
        .expect("restart kube-apiserver");
    // The same client (same address and CA) works again, and so does the pod's.
    eventually("the old client works again", Duration::from_secs(15), list)
        .await
        .expect("list after restart");
    eventually(
        "the pod reaches the API again",
        Duration::from_secs(15),
        || get_text(&whoami),
    )
    .await
    .expect("whoami after restart");

    // etcd down: the API server cannot serve reads; after etcd's restart it can.
    bed.stop_component(Restartable::Etcd)
        .await
        .expect("stop etcd");
    assert!(list().await.is_err(), "a list succeeded without etcd");
    get_text(&healthz)
        .await
        .expect("the pod serves without etcd");
    bed.start_component(Restartable::Etcd)
        .await
        .expect("restart etcd");
    eventually(
        "lists work after etcd's restart",
        Duration::from_secs(15),
        list,
    )
    .await
    .expect("list after etcd restart");
    // Writes too: the fake kubelet still runs pods created now.
    let more = self::pods(bed, &ns, &["b"]).await;
    assert!(reaches(&more[0], http(a)));
}
