//! Acceptance 2 and 3 of issue 4: a StatefulSet runs as real processes with their own
//! pod IPs, behind an EndpointSlice; deleted pods come back on the same persistent
//! directory; deleting the StatefulSet garbage-collects its pods. Plus what the fake
//! kubelet refuses.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use pgrs_testbed::kubelet::images::TINY_HTTP_IMAGE_REPOSITORY;
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, shared};

const TIMEOUT: Duration = Duration::from_secs(60);

async fn bed() -> &'static TestBed {
    match shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

fn web_statefulset() -> (Service, StatefulSet) {
    let service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 8080}]
        }
    }))
    .unwrap();
    let sts = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "serviceName": "web",
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "web",
                        "image": format!("{TINY_HTTP_IMAGE_REPOSITORY}:test"),
                        "args": ["--port", "8080", "--data-dir", "/var/lib/web"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/web"}]
                    }]
                }
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
            }]
        }
    }))
    .unwrap();
    (service, sts)
}

async fn get_json(url: &str) -> Result<serde_json::Value, String> {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let text = response.text().await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

async fn get_text(url: &str) -> Result<String, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
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

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_runs_pods_with_own_ips_keeps_their_data_and_is_garbage_collected() {
    let bed = bed().await;
    let ns = bed.namespace("sts").await.expect("namespace");
    let client = bed.client().await.expect("client");
    let pp = PostParams::default();
    let (service, sts) = web_statefulset();
    Api::<Service>::namespaced(client.clone(), ns.name())
        .create(&pp, &service)
        .await
        .expect("create Service");
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), ns.name());
    statefulsets
        .create(&pp, &sts)
        .await
        .expect("create StatefulSet");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let by_app = ListParams::default().labels("app=web");

    // 2: both pods Ready (OrderedReady: web-1 only starts after web-0 is Ready).
    eventually("StatefulSet web has 2 ready replicas", TIMEOUT, || async {
        let sts = statefulsets.get("web").await.map_err(|e| e.to_string())?;
        let ready = sts.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        if ready == 2 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        }
    })
    .await
    .expect("StatefulSet ready");
    let running = pods.list(&by_app).await.expect("list pods");
    let ips: BTreeSet<String> = running.items.iter().filter_map(pod_ip).collect();
    assert_eq!(ips.len(), 2, "two distinct pod IPs: {ips:?}");
    let subnet = format!("{}.", bed.gateway().to_string().rsplit_once('.').unwrap().0);
    assert!(
        ips.iter().all(|ip| ip.starts_with(&subnet)),
        "pod IPs {ips:?} in {subnet}0/24"
    );

    // The Service's EndpointSlice lists exactly the pod IPs, ready.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns.name());
    eventually(
        "EndpointSlice of web lists both pod IPs",
        TIMEOUT,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .map_err(|e| e.to_string())?;
            let listed: BTreeSet<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                .flat_map(|e| e.addresses.iter().cloned())
                .collect();
            if listed == ips {
                Ok(())
            } else {
                Err(format!("listed {listed:?}, pods {ips:?}"))
            }
        },
    )
    .await
    .expect("EndpointSlice");

    // The host reaches each pod's port at its pod IP; each is its own host.
    for pod in &running.items {
        let name = pod.metadata.name.clone().unwrap();
        let ip = pod_ip(pod).unwrap();
        let reply = get_json(&format!("http://{ip}:8080/"))
            .await
            .expect("pod answers at its IP");
        assert_eq!(reply["hostname"], name.as_str());
        assert_eq!(reply["boots"], 1, "{name} starts on a fresh volume");
    }

    // In-cluster config works from inside a pod: the mounted token authenticates.
    let web0 = pods.get("web-0").await.expect("web-0");
    let ip0 = pod_ip(&web0).unwrap();
    let user = get_text(&format!("http://{ip0}:8080/whoami"))
        .await
        .expect("whoami");
    assert_eq!(user, format!("system:serviceaccount:{}:default", ns.name()));

    // 3: delete web-0; the controller recreates it and it finds its data again.
    let old_uid = web0.metadata.uid.clone();
    pods.delete("web-0", &DeleteParams::default())
        .await
        .expect("delete web-0");
    let recreated = eventually("web-0 recreated and Ready", TIMEOUT, || async {
        let pod = pods.get("web-0").await.map_err(|e| e.to_string())?;
        if pod.metadata.uid != old_uid && is_ready(&pod) {
            Ok(pod)
        } else {
            Err("not yet".to_owned())
        }
    })
    .await
    .expect("web-0 back");
    let ip = pod_ip(&recreated).expect("pod IP");
    let reply = get_json(&format!("http://{ip}:8080/"))
        .await
        .expect("recreated pod answers");
    assert_eq!(reply["hostname"], "web-0");
    assert_eq!(
        reply["boots"], 2,
        "web-0 came back on the same persistent directory"
    );

    // Deleting the StatefulSet garbage-collects its pods (and the kubelet finishes them).
    statefulsets
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete StatefulSet");
    eventually("pods of web are gone", TIMEOUT, || async {
        let left = pods.list(&by_app).await.map_err(|e| e.to_string())?;
        if left.items.is_empty() {
            Ok(())
        } else {
            Err(format!("{} left", left.items.len()))
        }
    })
    .await
    .expect("pods garbage-collected");
    // Their processes are gone too: nothing answers at the old IPs.
    for ip in &ips {
        assert!(
            get_text(&format!("http://{ip}:8080/healthz"))
                .await
                .is_err(),
            "{ip} still answers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_with_foreign_images_are_refused_with_a_clear_message() {
    let bed = bed().await;
    let ns = bed.namespace("refuse").await.expect("namespace");
    let client = bed.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nginx"},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let message = eventually("nginx pod refused", TIMEOUT, || async {
        let pod = pods.get("nginx").await.map_err(|e| e.to_string())?;
        let waiting = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.waiting);
        match waiting {
            Some(w) if w.reason.as_deref() == Some("ErrImagePull") => {
                Ok(w.message.unwrap_or_default())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("refusal in the status");
    assert!(
        message.contains("nginx:1.27") && message.contains("cannot run on the pgrs test bed"),
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(client, ns.name());
    let listed = events.list(&ListParams::default()).await.expect("events");
    assert!(
        listed
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ErrImagePull")),
        "a Warning event explains the refusal"
    );
    // A refused pod still deletes cleanly.
    pods.delete("nginx", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("refused pod deleted", TIMEOUT, || async {
        match pods.get_opt("nginx").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_owned()),
        }
    })
    .await
    .expect("deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_restart_on_exit_and_failed_liveness_and_wait_for_missing_config() {
    let bed = bed().await;
    let ns = bed.namespace("lifecycle").await.expect("namespace");
    let client = bed.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let pp = PostParams::default();
    let image = format!("{TINY_HTTP_IMAGE_REPOSITORY}:test");

    // A container that exits (bad flag, exit code 2) is restarted per restartPolicy.
    let crashing: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "crashing"},
        "spec": {"containers": [{"name": "c", "image": image, "args": ["--bogus", "x"]}]}
    }))
    .unwrap();
    pods.create(&pp, &crashing)
        .await
        .expect("create crashing pod");

    // A container whose liveness probe fails is stopped and restarted.
    let unhealthy: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "unhealthy"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "c", "image": image, "args": ["--port", "8080"],
                "livenessProbe": {"httpGet": {"path": "/missing", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}
            }]
        }
    }))
    .unwrap();
    pods.create(&pp, &unhealthy)
        .await
        .expect("create unhealthy pod");

    // A pod whose env needs a ConfigMap that does not exist yet waits, then starts
    // once it appears; the value reaches the process (its port comes from it).
    let waiting: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "waiting"},
        "spec": {"containers": [{
            "name": "c",
            "image": image,
            "args": ["--port", "$(PORT)"],
            "env": [{"name": "PORT", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "port"}}}],
            "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1}
        }]}
    }))
    .unwrap();
    pods.create(&pp, &waiting)
        .await
        .expect("create waiting pod");

    let restarts = eventually("crashing pod restarted twice", TIMEOUT, || async {
        let pod = pods.get("crashing").await.map_err(|e| e.to_string())?;
        let status = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .ok_or("no container status")?;
        let exit = status
            .last_state
            .and_then(|s| s.terminated)
            .map(|t| t.exit_code);
        if status.restart_count >= 2 && exit == Some(2) {
            Ok(status.restart_count)
        } else {
            Err(format!(
                "restarts {}, last exit {exit:?}",
                status.restart_count
            ))
        }
    })
    .await
    .expect("restarts");
    assert!(restarts >= 2);
    eventually(
        "unhealthy pod restarted by its liveness probe",
        TIMEOUT,
        || async {
            let pod = pods.get("unhealthy").await.map_err(|e| e.to_string())?;
            let restarts = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .map(|c| c.restart_count)
                .unwrap_or(0);
            if restarts >= 1 {
                Ok(())
            } else {
                Err(format!("{restarts} restarts"))
            }
        },
    )
    .await
    .expect("liveness restart");

    let reason = eventually(
        "waiting pod reports the missing ConfigMap",
        TIMEOUT,
        || async {
            let pod = pods.get("waiting").await.map_err(|e| e.to_string())?;
            let waiting = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|s| s.waiting)
                .ok_or("not waiting")?;
            Ok(format!("{:?}: {:?}", waiting.reason, waiting.message))
        },
    )
    .await
    .expect("waiting status");
    assert!(
        reason.contains("CreateContainerConfigError") && reason.contains("later"),
        "{reason}"
    );
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "later"}, "data": {"port": "9090"}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, ns.name())
        .create(&pp, &cm)
        .await
        .expect("create ConfigMap");
    let pod = eventually(
        "waiting pod Ready once its ConfigMap exists",
        TIMEOUT,
        || async {
            let pod = pods.get("waiting").await.map_err(|e| e.to_string())?;
            if is_ready(&pod) {
                Ok(pod)
            } else {
                Err("not ready".to_owned())
            }
        },
    )
    .await
    .expect("ready");
    let ip = pod_ip(&pod).expect("pod IP");
    get_text(&format!("http://{ip}:9090/healthz"))
        .await
        .expect("listens on the port from the ConfigMap");
}
