//! `KubeLeaseStore` against the real kube-apiserver of the test bed: the lease contract
//! (acquire, renew, conflicts, release) on a `coordination.k8s.io/v1` Lease, and the RBAC the
//! agents run with (get/update on their own Lease only).
//!
//! Needs the test-bed binaries (`testbed/build.sh`); without them every test fails.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use pgrs::coordination::{KubeLeaseStore, LeaseError, LeaseStore};
use pgrs_testbed::{TestBed, shared};

const DURATION: Duration = Duration::from_secs(8);
const CLUSTER: &str = "pg";

async fn bed() -> &'static TestBed {
    match shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

fn store(client: Client, namespace: &str) -> KubeLeaseStore {
    KubeLeaseStore::new(client, namespace, CLUSTER, DURATION)
}

async fn lease_object(client: &Client, namespace: &str) -> Lease {
    Api::<Lease>::namespaced(client.clone(), namespace)
        .get(&KubeLeaseStore::lease_name(CLUSTER))
        .await
        .expect("read the Lease object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_on_an_absent_lease_creates_it_with_the_holder() {
    let bed = bed().await;
    let ns = bed.namespace("lease-acq").await.expect("namespace");
    let client = bed.client().await.expect("admin client");
    let store = store(client.clone(), ns.name());

    let empty = store.get().await.expect("get a missing lease");
    assert_eq!(empty.holder, None);
    assert_eq!(empty.version, KubeLeaseStore::ABSENT_VERSION);
    assert_eq!(empty.duration, DURATION);

    let held = store
        .acquire("pg-0", &empty.version)
        .await
        .expect("acquire the absent lease");
    assert_eq!(held.holder.as_deref(), Some("pg-0"));
    assert_ne!(held.version, empty.version);
    assert_eq!(held.transitions, 1);
    assert_eq!(store.get().await.expect("get"), held);

    let object = lease_object(&client, ns.name()).await;
    assert_eq!(object.metadata.name.as_deref(), Some("pg-primary"));
    assert_eq!(
        object.metadata.resource_version.as_deref(),
        Some(&*held.version)
    );
    let spec = object.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("pg-0"));
    assert_eq!(spec.lease_duration_seconds, Some(8));
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());

    // A second create-acquire finds it there: a conflict naming the holder.
    match store.acquire("pg-1", KubeLeaseStore::ABSENT_VERSION).await {
        Err(LeaseError::Conflict { current, .. }) => assert_eq!(*current, held),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_on_an_unheld_lease_created_by_the_operator() {
    let bed = bed().await;
    let ns = bed.namespace("lease-unheld").await.expect("namespace");
    let client = bed.client().await.expect("admin client");
    let store = store(client.clone(), ns.name());

    let unheld = store.create_if_absent().await.expect("create the Lease");
    assert_eq!(unheld.holder, None);
    assert_ne!(unheld.version, KubeLeaseStore::ABSENT_VERSION);
    assert_eq!(unheld.transitions, 0);
    assert_eq!(
        store.create_if_absent().await.expect("already there"),
        unheld,
        "create_if_absent leaves an existing Lease alone"
    );
    let held = store
        .acquire("pg-0", &unheld.version)
        .await
        .expect("acquire");
    assert_eq!(held.holder.as_deref(), Some("pg-0"));
    assert_eq!(held.transitions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_renews_and_others_are_refused() {
    let bed = bed().await;
    let ns = bed.namespace("lease-renew").await.expect("namespace");
    let client = bed.client().await.expect("admin client");
    let store = store(client.clone(), ns.name());
    let held = store
        .acquire("pg-0", KubeLeaseStore::ABSENT_VERSION)
        .await
        .expect("acquire");
    let renew_time = |lease: Lease| lease.spec.and_then(|s| s.renew_time).expect("renewTime");
    let before = renew_time(lease_object(&client, ns.name()).await);

    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = store.renew("pg-0").await.expect("the holder renews");
    assert_eq!(renewed.holder.as_deref(), Some("pg-0"));
    assert_ne!(
        renewed.version, held.version,
        "a renewal changes the version"
    );
    assert_eq!(renewed.transitions, 1, "a renewal is no transition");
    assert!(renew_time(lease_object(&client, ns.name()).await).0 > before.0);
    let again = store.renew("pg-0").await.expect("renews again");
    assert_ne!(again.version, renewed.version);

    // Another instance (its own store and client) is refused, and nothing changes.
    let other = self::store(bed.client().await.expect("client"), ns.name());
    match other.renew("pg-1").await {
        Err(LeaseError::NotHolder { requester, current }) => {
            assert_eq!(requester, "pg-1");
            assert_eq!(*current, again);
        }
        other => panic!("expected NotHolder, got {other:?}"),
    }
    assert_eq!(store.get().await.expect("get"), again);

    // The holder's cached copy is stale after a takeover: its renewal must still be refused.
    let taken = other
        .acquire("pg-1", &again.version)
        .await
        .expect("takeover");
    match store.renew("pg-0").await {
        Err(LeaseError::NotHolder { current, .. }) => assert_eq!(*current, taken),
        other => panic!("expected NotHolder after the takeover, got {other:?}"),
    }
}

/// Two incarnations of one pod name (a force-deleted pod still running beside its replacement):
/// the first renewal after a grant claims the Lease for its incarnation, the other copy's
/// renewals are refused (its keeper fences), and a new grant lets either claim it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_incarnation_of_a_holder_renews() {
    let bed = bed().await;
    let ns = bed.namespace("lease-incarnation").await.expect("namespace");
    let operator = store(bed.client().await.expect("client"), ns.name());
    let old_pod = store(bed.client().await.expect("client"), ns.name())
        .with_incarnation(Some("uid-old".to_string()));
    let new_pod = store(bed.client().await.expect("client"), ns.name())
        .with_incarnation(Some("uid-new".to_string()));
    operator
        .acquire("pg-0", KubeLeaseStore::ABSENT_VERSION)
        .await
        .expect("grant");
    let claimed = old_pod
        .renew("pg-0")
        .await
        .expect("the first renewal claims");
    assert_eq!(claimed.incarnation.as_deref(), Some("uid-old"));
    match new_pod.renew("pg-0").await {
        Err(LeaseError::OtherIncarnation {
            holder,
            requester,
            current,
        }) => {
            assert_eq!(
                (holder.as_str(), requester.as_str(), current.as_str()),
                ("pg-0", "uid-new", "uid-old")
            );
        }
        other => panic!("expected OtherIncarnation, got {other:?}"),
    }
    match new_pod.release("pg-0").await {
        Err(LeaseError::OtherIncarnation { .. }) => {}
        other => panic!("the other copy must not release it either: {other:?}"),
    }
    assert_eq!(
        operator.get().await.expect("get"),
        claimed,
        "nothing changed"
    );
    // The operator grants pg-0 again (after expiry): the replacement may claim it now.
    let regranted = operator
        .acquire("pg-0", &claimed.version)
        .await
        .expect("grant again");
    assert_eq!(regranted.incarnation, None);
    new_pod.renew("pg-0").await.expect("the replacement claims");
    assert!(matches!(
        old_pod.renew("pg-0").await,
        Err(LeaseError::OtherIncarnation { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_or_releasing_a_missing_lease_is_refused() {
    let bed = bed().await;
    let ns = bed.namespace("lease-missing").await.expect("namespace");
    let store = store(bed.client().await.expect("client"), ns.name());
    assert!(matches!(
        store.renew("pg-0").await,
        Err(LeaseError::NotHolder { .. })
    ));
    assert!(matches!(
        store.release("pg-0").await,
        Err(LeaseError::NotHolder { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_with_a_stale_version_conflicts() {
    let bed = bed().await;
    let ns = bed.namespace("lease-stale").await.expect("namespace");
    let store = store(bed.client().await.expect("client"), ns.name());
    let first = store
        .acquire("pg-0", KubeLeaseStore::ABSENT_VERSION)
        .await
        .expect("acquire");
    let renewed = store.renew("pg-0").await.expect("renew");

    match store.acquire("pg-1", &first.version).await {
        Err(LeaseError::Conflict { expected, current }) => {
            assert_eq!(expected, first.version);
            assert_eq!(*current, renewed);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A version that never existed (but is well-formed) conflicts too.
    assert!(matches!(
        store.acquire("pg-1", "1").await,
        Err(LeaseError::Conflict { .. })
    ));
    assert_eq!(store.get().await.expect("get"), renewed);
}

/// Two instances race for the same version, each with its own client: exactly one wins, and
/// the loser's conflict names the winner.
async fn race(bed: &TestBed, namespace: &str, version: &str) -> String {
    let a = store(bed.client().await.expect("client"), namespace);
    let b = store(bed.client().await.expect("client"), namespace);
    let (ra, rb) = tokio::join!(a.acquire("pg-a", version), b.acquire("pg-b", version));
    let (winner, lost) = match (ra, rb) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        (ra, rb) => panic!("exactly one acquirer must win: {ra:?} / {rb:?}"),
    };
    let holder = winner.holder.clone().expect("a holder");
    match lost {
        LeaseError::Conflict { current, .. } => assert_eq!(*current, winner),
        other => panic!("the loser must see a conflict, got {other:?}"),
    }
    assert_eq!(a.get().await.expect("get"), winner);
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquirers_with_the_same_version_exactly_one_wins() {
    let bed = bed().await;
    let ns = bed.namespace("lease-race").await.expect("namespace");
    let store = store(bed.client().await.expect("client"), ns.name());

    // On the absent Lease (both try to create it)...
    race(bed, ns.name(), KubeLeaseStore::ABSENT_VERSION).await;
    // ...and repeatedly on the existing one (both try to replace it).
    for _ in 0..5 {
        let current = store.get().await.expect("get");
        let holder = race(bed, ns.name(), &current.version).await;
        let after = store.get().await.expect("get");
        assert_eq!(after.holder.as_deref(), Some(holder.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_then_another_acquires() {
    let bed = bed().await;
    let ns = bed.namespace("lease-release").await.expect("namespace");
    let client = bed.client().await.expect("client");
    let primary = store(client.clone(), ns.name());
    let replica = store(bed.client().await.expect("client"), ns.name());
    let held = primary
        .acquire("pg-0", KubeLeaseStore::ABSENT_VERSION)
        .await
        .expect("acquire");

    match replica.release("pg-1").await {
        Err(LeaseError::NotHolder { current, .. }) => assert_eq!(*current, held),
        other => panic!("a non-holder's release must be refused, got {other:?}"),
    }
    let released = primary.release("pg-0").await.expect("release");
    assert_eq!(released.holder, None);
    assert_ne!(released.version, held.version);
    let spec = lease_object(&client, ns.name()).await.spec.expect("spec");
    assert_eq!(spec.holder_identity, None);
    assert!(matches!(
        primary.renew("pg-0").await,
        Err(LeaseError::NotHolder { .. })
    ));

    let taken = replica
        .acquire("pg-1", &released.version)
        .await
        .expect("acquire after release");
    assert_eq!(taken.holder.as_deref(), Some("pg-1"));
    assert_eq!(taken.transitions, 2);
    assert_eq!(primary.get().await.expect("get"), taken);
}

fn forbidden(result: Result<(), kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_get_update_on_its_lease_only_can_use_it_and_nothing_else() {
    let bed = bed().await;
    let ns = bed.namespace("lease-rbac").await.expect("namespace");
    let admin = bed.client().await.expect("admin client");
    let pp = PostParams::default();
    let lease_name = KubeLeaseStore::lease_name(CLUSTER);

    // What the operator sets up: the Lease, the agent's ServiceAccount, Role and binding.
    let operator_store = store(admin.clone(), ns.name());
    let unheld = operator_store
        .create_if_absent()
        .await
        .expect("the operator creates the Lease");
    let other_store =
        KubeLeaseStore::for_lease(admin.clone(), ns.name(), "other-primary", DURATION);
    let other = other_store
        .create_if_absent()
        .await
        .expect("another cluster's Lease");
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns.name());
    accounts
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "pg-agent"}})).unwrap(),
        )
        .await
        .expect("create ServiceAccount");
    Api::<Role>::namespaced(admin.clone(), ns.name())
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pg-agent"},
                "rules": [{
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": [lease_name],
                    "verbs": ["get", "update"]
                }]
            }))
            .unwrap(),
        )
        .await
        .expect("create Role");
    Api::<RoleBinding>::namespaced(admin.clone(), ns.name())
        .create(
            &pp,
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pg-agent"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pg-agent"},
                "subjects": [{"kind": "ServiceAccount", "name": "pg-agent", "namespace": ns.name()}]
            }))
            .unwrap(),
        )
        .await
        .expect("create RoleBinding");
    let request =
        serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = accounts
        .create_token_request("pg-agent", &pp, &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&bed.token_kubeconfig("pg-agent", &token))
        .expect("token kubeconfig");
    let as_agent = pgrs_testbed::control_plane::client_from_kubeconfig(kubeconfig)
        .await
        .expect("token client");
    let agent_store = store(as_agent.clone(), ns.name());

    // Granted (the binding may take a moment to reach the authorizer's cache).
    let seen = pgrs_testbed::wait::eventually(
        "the agent can read its Lease",
        Duration::from_secs(10),
        || async { agent_store.get().await.map_err(|e| e.to_string()) },
    )
    .await
    .expect("get allowed by the Role");
    assert_eq!(seen, unheld);
    let held = agent_store
        .acquire("pg-0", &unheld.version)
        .await
        .expect("acquire allowed by the Role");
    let renewed = agent_store.renew("pg-0").await.expect("renew allowed");
    assert_ne!(renewed.version, held.version);
    let released = agent_store.release("pg-0").await.expect("release allowed");
    assert_eq!(released.holder, None);

    // Denied: another Lease, through the store (with a message saying what failed)...
    let foreign = KubeLeaseStore::for_lease(as_agent.clone(), ns.name(), "other-primary", DURATION);
    match foreign.get().await {
        Err(LeaseError::Unavailable(message)) => {
            assert!(
                message.contains("other-primary") && message.contains("403"),
                "the error says which Lease and why: {message}"
            );
        }
        other => panic!("reading another Lease must fail, got {other:?}"),
    }
    assert!(matches!(
        foreign.acquire("pg-0", &other.version).await,
        Err(LeaseError::Unavailable(_))
    ));
    assert_eq!(
        other_store.get().await.expect("admin reads it"),
        other,
        "the other Lease is untouched"
    );
    // ...and directly: no create, delete or list, even of its own Lease.
    let leases: Api<Lease> = Api::namespaced(as_agent.clone(), ns.name());
    let absent = KubeLeaseStore::for_lease(as_agent, ns.name(), "new-primary", DURATION);
    assert!(matches!(
        absent.acquire("pg-0", KubeLeaseStore::ABSENT_VERSION).await,
        Err(LeaseError::Unavailable(message)) if message.contains("403")
    ));
    assert!(forbidden(
        leases
            .delete(&lease_name, &DeleteParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        leases.list(&ListParams::default()).await.map(|_| ())
    ));
}
