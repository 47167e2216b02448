//! Acceptance 1 and 4 of issue 4: the clients report the chosen versions against the
//! test bed, and ServiceAccount tokens from the TokenRequest API meet real RBAC.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, PostParams};
use pgrs_testbed::shared;

fn bed_or_fail(
    result: Result<&'static pgrs_testbed::TestBed, pgrs_testbed::TestBedError>,
) -> &'static pgrs_testbed::TestBed {
    match result {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

fn run(mut command: std::process::Command) -> String {
    let output = command.output().expect("command runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_helm_report_the_chosen_versions() {
    let bed = bed_or_fail(shared().await);
    let versions = bed.versions().clone();
    eprintln!("test bed: {versions:?}, warm start {:?}", bed.warm_start());

    let mut kubectl = bed.kubectl();
    kubectl.args(["version", "-o", "json"]);
    let version: serde_json::Value =
        serde_json::from_str(&run(kubectl)).expect("kubectl version json");
    assert_eq!(
        version["clientVersion"]["gitVersion"],
        versions.kubernetes.as_str()
    );
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        versions.kubernetes.as_str()
    );

    let mut helm = bed.helm();
    helm.args(["version", "--template", "{{.Version}}"]);
    assert_eq!(run(helm).trim(), versions.helm);

    // helm reads the server's version: a chart constrained to >= the chosen minor
    // installs, and sees that version in .Capabilities.
    let ns = bed.namespace("helm").await.expect("namespace");
    let chart = tempfile::tempdir().expect("chart dir");
    let minor = versions
        .kubernetes
        .trim_start_matches("v1.")
        .split('.')
        .next()
        .unwrap_or("0")
        .to_owned();
    std::fs::write(
        chart.path().join("Chart.yaml"),
        format!("apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: \">=1.{minor}.0-0\"\n"),
    )
    .expect("write Chart.yaml");
    std::fs::create_dir(chart.path().join("templates")).expect("templates dir");
    std::fs::write(
        chart.path().join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )
    .expect("write template");
    let mut install = bed.helm();
    install
        .args(["install", "probe"])
        .arg(chart.path())
        .args(["--namespace", ns.name()]);
    run(install);
    let client = bed.client().await.expect("client");
    let cm = Api::<ConfigMap>::namespaced(client, ns.name())
        .get("probe")
        .await
        .expect("helm created the ConfigMap");
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("kubeVersion")
            .map(String::as_str),
        Some(versions.kubernetes.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_authenticate_and_rbac_denies_what_the_role_lacks() {
    let bed = bed_or_fail(shared().await);
    let ns = bed.namespace("rbac").await.expect("namespace");
    let admin = bed.client().await.expect("admin client");
    let pp = PostParams::default();

    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns.name());
    accounts
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "reader"}})).unwrap(),
        )
        .await
        .expect("create ServiceAccount");
    Api::<Role>::namespaced(admin.clone(), ns.name())
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
            }))
            .unwrap(),
        )
        .await
        .expect("create Role");
    Api::<RoleBinding>::namespaced(admin.clone(), ns.name())
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "reader-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns.name()}]
            }))
            .unwrap(),
        )
        .await
        .expect("create RoleBinding");

    let request =
        serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = accounts
        .create_token_request("reader", &pp, &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token");
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&bed.token_kubeconfig("reader", &token)).unwrap();
    let as_reader = pgrs_testbed::control_plane::client_from_kubeconfig(kubeconfig)
        .await
        .expect("token client");

    // Authenticated as the ServiceAccount.
    let review: serde_json::Value = as_reader
        .request(
            http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header("content-type", "application/json")
                .body(
                    br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#
                        .to_vec(),
                )
                .unwrap(),
        )
        .await
        .expect("SelfSubjectReview");
    assert_eq!(
        review["status"]["userInfo"]["username"],
        format!("system:serviceaccount:{}:reader", ns.name())
    );

    // Granted: list pods here (RBAC bindings may take a moment to reach the authorizer cache).
    let pods: Api<Pod> = Api::namespaced(as_reader.clone(), ns.name());
    pgrs_testbed::wait::eventually("reader can list pods", Duration::from_secs(10), || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .expect("allowed by the Role");

    let forbidden = |result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(status)) => status.code == 403,
        _ => false,
    };
    // Denied: secrets, writes, and other namespaces.
    let secrets: Api<Secret> = Api::namespaced(as_reader.clone(), ns.name());
    assert!(
        forbidden(secrets.list(&ListParams::default()).await.map(|_| ())),
        "listing secrets must be forbidden"
    );
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "x", "image": "pgrs-testbed/tiny-http"}]}
    }))
    .unwrap();
    assert!(
        forbidden(pods.create(&pp, &pod).await.map(|_| ())),
        "creating pods must be forbidden"
    );
    let elsewhere: Api<Pod> = Api::namespaced(as_reader, "default");
    assert!(
        forbidden(elsewhere.list(&ListParams::default()).await.map(|_| ())),
        "pods of another namespace must be forbidden"
    );
}
