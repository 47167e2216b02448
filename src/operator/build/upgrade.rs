//! The pod template of a major-version upgrade ([`crate::operator::upgrade`]): the new image,
//! plus an init container of the old image that copies the old major's installation into an
//! emptyDir, which the agent gets as `--upgrade-from` (pg_upgrade needs both majors' programs).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, Probe, Volume, VolumeMount,
};

/// The emptyDir holding the old binaries.
const VOLUME: &str = "pgrs-upgrade";
const MOUNT: &str = "/pgrs-upgrade";
/// Startup probe failures allowed while the agent upgrades (one a second: an hour).
const STARTUP_FAILURES: i32 = 3600;
/// The init container's name.
pub const INIT_CONTAINER: &str = "copy-binaries";

/// Adds the copy of `from_image`'s binaries to every pod of `statefulset`.
pub fn with_upgrade_from(statefulset: &mut StatefulSet, from_image: &str) {
    let Some(pod) = statefulset.spec.template.spec.as_mut() else {
        return;
    };
    let mount = VolumeMount {
        name: VOLUME.to_string(),
        mount_path: MOUNT.to_string(),
        ..VolumeMount::default()
    };
    let security_context = pod
        .containers
        .first()
        .and_then(|c| c.security_context.clone());
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    pod.init_containers
        .get_or_insert_with(Vec::new)
        .push(Container {
            name: INIT_CONTAINER.to_string(),
            image: Some(from_image.to_string()),
            args: Some(vec!["copy-binaries".to_string(), format!("--to={MOUNT}")]),
            volume_mounts: Some(vec![mount.clone()]),
            security_context,
            ..Container::default()
        });
    for container in &mut pod.containers {
        // The agent serves HTTP only after pg_upgrade: the liveness probe waits for it (an
        // hour at most) rather than restart the container in the middle of the upgrade.
        container.startup_probe = container.liveness_probe.clone().map(|probe| Probe {
            period_seconds: Some(1),
            failure_threshold: Some(STARTUP_FAILURES),
            ..probe
        });
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount.clone());
        container.env.get_or_insert_with(Vec::new).push(EnvVar {
            name: "PGRS_UPGRADE_FROM".to_string(),
            value: Some(MOUNT.to_string()),
            ..EnvVar::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetSpec;
    use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};

    #[test]
    fn the_old_image_copies_its_binaries_for_the_agent() {
        let mut statefulset = StatefulSet {
            spec: StatefulSetSpec {
                template: PodTemplateSpec {
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "agent".into(),
                            image: Some("pgrs:1-pg17".into()),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                    ..PodTemplateSpec::default()
                },
                ..StatefulSetSpec::default()
            },
            ..StatefulSet::default()
        };
        with_upgrade_from(&mut statefulset, "pgrs:1");
        let pod = statefulset.spec.template.spec.expect("pod");
        let init = &pod.init_containers.expect("init")[0];
        assert_eq!(init.image.as_deref(), Some("pgrs:1"));
        assert_eq!(init.args.as_ref().expect("args")[0], "copy-binaries");
        let agent = &pod.containers[0];
        assert_eq!(agent.image.as_deref(), Some("pgrs:1-pg17"));
        assert!(
            agent
                .env
                .as_ref()
                .expect("env")
                .iter()
                .any(|e| e.name == "PGRS_UPGRADE_FROM")
        );
        assert_eq!(pod.volumes.expect("volumes")[0].name, VOLUME);
    }
}
