//! The operator's control state survives an operator restart: a sync-mode cluster
//! (`examples/sync.yaml`) records its quorum `ANY 1 (<the two standbys>)` in the ConfigMap
//! `<name>-control`; the operator is SIGKILLed and a new one started. The new one reads the
//! record back (its log says which quorum), never writes another record while the cluster is
//! unchanged, and does not re-apply `synchronous_standby_names` (it remembers what the
//! primary applies). Before the state was persisted, a restarted operator started from an
//! empty record, i.e. assumed asynchronous replication until a serving round narrowed it again.
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use operator_support::*;
use pgrs::control::ControlState;
use pgrs::engine::SyncSet;
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg-sync";

async fn control_state(client: &Client, ns: &str) -> Result<ControlState, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let name = format!("{CLUSTER}-control");
    let config_map = api.get(&name).await.map_err(|e| format!("{name}: {e}"))?;
    let text = config_map
        .data
        .and_then(|d| d.get("state.json").cloned())
        .ok_or("no state.json")?;
    ControlState::from_json(&text).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_keeps_the_recorded_sync_quorum() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-restart").await;
    let mut operator = OperatorProcess::start(bed, &ns_name);
    apply_repo_manifest(bed, &ns_name, "examples/sync.yaml");
    let primary =
        wait_three_ready_healthy(&client, &ns_name, CLUSTER, "sync cluster Healthy").await;
    let standbys: Vec<String> = (0..3)
        .map(|i| format!("{CLUSTER}-{i}"))
        .filter(|n| *n != primary)
        .collect();
    let quorum = SyncSet {
        k: 1,
        members: standbys.clone(),
    };
    let before = eventually(
        "the quorum recorded in the control ConfigMap",
        Duration::from_secs(60),
        || async {
            let state = control_state(&client, &ns_name).await?;
            (state.memory.recorded_sync == quorum
                && state.applied_sync.get(&primary) == Some(&quorum))
            .then_some(state.clone())
            .ok_or(format!("{:?}", state.memory.recorded_sync))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Restart in the middle of the cluster's life. The killed leader does not release the
    // operator's election Lease: the new operator leads once it expired (15 s by default), then
    // reads the control state back. The ConfigMap is sampled all along and for 10 s after.
    operator.kill();
    let restarted = OperatorProcess::start(bed, &ns_name);
    let started = Instant::now();
    let mut read_back_at = None;
    let mut samples = 0;
    loop {
        let state = control_state(&client, &ns_name)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            state.memory.recorded_sync, before.memory.recorded_sync,
            "the recorded quorum changed across the restart"
        );
        assert_eq!(state.applied_sync, before.applied_sync);
        assert!(!state.memory.sync_record_lost);
        samples += 1;
        if read_back_at.is_none() && restarted.log().contains("control state read back") {
            read_back_at = Some(Instant::now());
        }
        match read_back_at {
            Some(at) if at.elapsed() > Duration::from_secs(10) => break,
            None if started.elapsed() > Duration::from_secs(60) => {
                panic!(
                    "the new operator did not read the state back:\n{}",
                    restarted.log()
                )
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 50, "{samples} samples");

    let log = restarted.log();
    let read_back = log
        .lines()
        .find(|l| l.contains("control state read back"))
        .unwrap_or_default();
    let names = quorum.to_standby_names();
    assert!(
        read_back.contains(&names) || read_back.contains(&names.replace('"', "\\\"")),
        "{read_back}"
    );
    assert!(
        !log.contains("SetSynchronousStandbys"),
        "the new operator re-applied synchronous_standby_names it should have remembered:\n{log}"
    );
    // The restarted operator does reconcile (the cluster stays Healthy under it).
    let status = cluster_status(&client, &ns_name, CLUSTER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.current_primary.as_deref(), Some(primary.as_str()));
}
