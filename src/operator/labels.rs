//! The pod labels the Services select: `pgrs.dev/role` (`<name>-rw` selects the serving lease
//! holder only), `pgrs.dev/read-pool` (`<name>-ro`: replicas within the read lag limit),
//! `pgrs.dev/in-service` (none on a fenced pod). Which labels each pod should carry is pure;
//! relabelling moves the primary label away before anyone gains it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::operator::build::names;
use crate::operator::pods::PodView;

#[derive(Debug, thiserror::Error)]
#[error("failed to relabel pod {pod}: {source}")]
pub struct RelabelError {
    pub pod: String,
    #[source]
    pub source: kube::Error,
}

/// The role, read-pool and in-service labels every pod should carry. Pure: `primary` is the
/// serving lease holder (the only pod `<name>-rw` may select); `readable` the replicas within
/// the read lag limit; `fenced` pods carry none of them (no Service selects them).
pub fn desired_labels(
    pods: &HashMap<String, PodView>,
    primary: Option<&str>,
    replicas: &BTreeSet<String>,
    readable: &BTreeSet<String>,
    fenced: &BTreeSet<String>,
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut changes = BTreeMap::new();
    for pod in pods.values() {
        let is_fenced = fenced.contains(&pod.name);
        let role = if is_fenced {
            None
        } else if Some(pod.name.as_str()) == primary {
            Some(names::ROLE_PRIMARY)
        } else if replicas.contains(&pod.name) {
            Some(names::ROLE_REPLICA)
        } else {
            None
        };
        let read_pool =
            (readable.contains(&pod.name) && !is_fenced).then_some(names::READ_POOL_MEMBER);
        let in_service = (!is_fenced).then_some(names::IN_SERVICE);
        let mut patch = BTreeMap::new();
        for (key, want) in [
            (names::LABEL_ROLE, role),
            (names::LABEL_READ_POOL, read_pool),
            (names::LABEL_IN_SERVICE, in_service),
        ] {
            if pod.labels.get(key).map(String::as_str) != want {
                patch.insert(key.to_string(), want.map(str::to_string));
            }
        }
        if !patch.is_empty() {
            changes.insert(pod.name.clone(), patch);
        }
    }
    changes
}

/// Applies label changes: first the pods that lose the primary label, then the others, so
/// that `<name>-rw` never selects two pods. The patches of each of the two groups are sent
/// together: on a switchover the new primary's label is the last step before `-rw` moves.
pub async fn relabel(
    api: &Api<Pod>,
    changes: &BTreeMap<String, BTreeMap<String, Option<String>>>,
) -> Result<(), RelabelError> {
    let loses_primary = |patch: &BTreeMap<String, Option<String>>| {
        patch
            .get(names::LABEL_ROLE)
            .is_some_and(|v| v.as_deref() != Some(names::ROLE_PRIMARY))
    };
    let (first, then): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, p)| loses_primary(p));
    for group in [first, then] {
        let patches = group
            .into_iter()
            .map(|(pod, labels)| patch_labels(api, pod, labels));
        futures::future::try_join_all(patches).await?;
    }
    Ok(())
}

async fn patch_labels(
    api: &Api<Pod>,
    pod: &str,
    labels: &BTreeMap<String, Option<String>>,
) -> Result<(), RelabelError> {
    let started = std::time::Instant::now();
    let body = serde_json::json!({ "metadata": { "labels": labels } });
    api.patch(pod, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(|source| RelabelError {
            pod: pod.to_string(),
            source,
        })?;
    tracing::info!(
        pod,
        role = labels
            .get(names::LABEL_ROLE)
            .map(|v| v.as_deref().unwrap_or("none")),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pod relabelled"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> (String, PodView) {
        (
            name.to_string(),
            PodView {
                name: name.to_string(),
                ip: Some("10.0.0.1".to_string()),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                deleting: false,
                uid: None,
                https: false,
            },
        )
    }

    #[test]
    fn the_old_primary_loses_its_label_and_the_new_one_gains_it() {
        let pods = HashMap::from([
            pod("pg-0", &[(names::LABEL_ROLE, names::ROLE_PRIMARY)]),
            pod("pg-1", &[(names::LABEL_ROLE, names::ROLE_REPLICA)]),
        ]);
        let none_fenced = BTreeSet::new();
        let changes = desired_labels(
            &pods,
            Some("pg-1"),
            &BTreeSet::new(),
            &BTreeSet::new(),
            &none_fenced,
        );
        assert_eq!(changes["pg-0"][names::LABEL_ROLE], None);
        assert_eq!(
            changes["pg-1"][names::LABEL_ROLE].as_deref(),
            Some(names::ROLE_PRIMARY)
        );
        // Without a serving primary nobody carries the primary label.
        let none = desired_labels(
            &pods,
            None,
            &BTreeSet::new(),
            &BTreeSet::new(),
            &none_fenced,
        );
        assert_eq!(none["pg-0"][names::LABEL_ROLE], None);
        assert!(!none.contains_key("pg-1") || none["pg-1"][names::LABEL_ROLE].is_none());
    }

    #[test]
    fn a_fenced_pod_leaves_every_service() {
        let pods = HashMap::from([
            pod(
                "pg-0",
                &[
                    (names::LABEL_ROLE, names::ROLE_PRIMARY),
                    (names::LABEL_IN_SERVICE, names::IN_SERVICE),
                ],
            ),
            pod(
                "pg-1",
                &[
                    (names::LABEL_ROLE, names::ROLE_REPLICA),
                    (names::LABEL_READ_POOL, names::READ_POOL_MEMBER),
                    (names::LABEL_IN_SERVICE, names::IN_SERVICE),
                ],
            ),
        ]);
        let replicas = BTreeSet::from(["pg-1".to_string()]);
        let fenced = BTreeSet::from(["pg-1".to_string()]);
        let changes = desired_labels(&pods, Some("pg-0"), &replicas, &replicas, &fenced);
        for key in [
            names::LABEL_ROLE,
            names::LABEL_READ_POOL,
            names::LABEL_IN_SERVICE,
        ] {
            assert_eq!(changes["pg-1"][key], None, "{key}");
        }
        assert!(!changes.contains_key("pg-0"));
    }
}
