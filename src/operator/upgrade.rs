//! Pure planning of a major-version upgrade (`spec.postgresVersion` raised). No IO, no clock:
//! the controller feeds in the status it recorded, the pods and what the agents reported, and
//! carries out the plan returned here (docs/postgres-versions.md, "On Kubernetes").
//!
//! 1. Start, only on a cluster whose Lease holder serves as primary on the running major:
//!    remember the pods and the old image; the StatefulSets get the new image with an init
//!    container of the old image that copies the old binaries (`pgrs copy-binaries`).
//! 2. `UpgradingPrimary`: the primary's pod is restarted (writes stop), no control round runs
//!    (nothing may fail over meanwhile), and the Lease is granted to the primary again and again
//!    so that its agent, which runs pg_upgrade before it serves, starts on a fresh proof. Its
//!    report ends the phase: up on the new major, or the upgrade refused (`pg_upgrade --check`)
//!    or failed — then it runs the old major from the copied binaries and the upgrade fails.
//! 3. `RecloningReplicas`: control rounds again (the primary serves writes); every replica's
//!    pod is restarted once and cloned from the upgraded primary.
//! 4. `Completed` once every instance reports the new major, a replica streaming.
//!
//! `Failed` keeps the cluster on the old major (its image and binaries); a new value of the
//! annotation `pgrs.dev/retry-upgrade` starts over.

use std::collections::BTreeMap;

use crate::api::{MajorUpgradePhase, MajorUpgradeStatus};
use crate::protocol::api::{MajorUpgradeOutcome, MajorUpgradeReport, Role};

/// The annotation whose new value retries a failed upgrade.
pub const ANNOTATION_RETRY: &str = "pgrs.dev/retry-upgrade";

/// One instance as the upgrade sees it (its agent's last answer).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceReport {
    pub role: Role,
    /// The major the agent runs postgres with.
    pub major: Option<u32>,
    /// A replica whose WAL receiver streams.
    pub streaming: bool,
    pub upgrade: Option<MajorUpgradeReport>,
}

#[derive(Debug, Clone)]
pub struct UpgradeInput<'a> {
    pub spec_major: u32,
    /// `status.postgresVersion` (absent before the first reconcile of this operator version).
    pub running_major: Option<u32>,
    pub current: Option<&'a MajorUpgradeStatus>,
    /// The Lease holder.
    pub holder: Option<&'a str>,
    pub instances: &'a [String],
    /// Pod name → UID of the pods that exist (not being deleted).
    pub pods: &'a BTreeMap<String, String>,
    pub reports: &'a BTreeMap<String, InstanceReport>,
    /// The image the StatefulSets run now.
    pub current_image: Option<&'a str>,
    /// The value of [`ANNOTATION_RETRY`].
    pub retry_token: Option<&'a str>,
}

/// The pods' template while the plan holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template {
    /// `spec` as it is.
    Spec,
    /// `spec` (the new major), with the init container copying the binaries of `from_image`.
    Upgrade { from_image: String },
    /// The old major and its image (a failed upgrade).
    Old { major: u32, image: String },
}

/// What happens to `status.majorUpgrade`, stamped with the time by the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    None,
    Started,
    PrimaryUpgraded,
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpgradePlan {
    /// The major the cluster runs (for `status.postgresVersion`).
    pub running: u32,
    /// `status.majorUpgrade` after this step.
    pub status: Option<MajorUpgradeStatus>,
    pub transition: Transition,
    pub template: Template,
    /// Pods to delete (each once: still the pod the upgrade started with).
    pub restart: Vec<String>,
    /// Grant the Lease to this instance (again).
    pub grant: Option<String>,
    /// Skip the control round (no failover while the primary upgrades).
    pub hold: bool,
    /// Why an upgrade waits to start, for the status message.
    pub waiting: Option<String>,
}

impl UpgradePlan {
    fn steady(running: u32, status: Option<MajorUpgradeStatus>) -> Self {
        UpgradePlan {
            running,
            status,
            transition: Transition::None,
            template: Template::Spec,
            restart: Vec::new(),
            grant: None,
            hold: false,
            waiting: None,
        }
    }
}

pub fn plan(input: &UpgradeInput<'_>) -> UpgradePlan {
    let running = input.running_major.unwrap_or(input.spec_major);
    let current = input.current.cloned();
    match current {
        Some(upgrade) if upgrade.phase == MajorUpgradePhase::UpgradingPrimary => {
            upgrading_primary(input, upgrade)
        }
        Some(upgrade) if upgrade.phase == MajorUpgradePhase::RecloningReplicas => {
            recloning(input, upgrade)
        }
        Some(upgrade)
            if upgrade.phase == MajorUpgradePhase::Failed
                && upgrade.to == input.spec_major
                && upgrade.retry_token.as_deref() == input.retry_token =>
        {
            let template = Template::Old {
                major: upgrade.from,
                image: upgrade.from_image.clone(),
            };
            UpgradePlan {
                template,
                ..UpgradePlan::steady(upgrade.from, Some(upgrade))
            }
        }
        previous if input.spec_major > running => start(input, running, previous),
        previous => UpgradePlan::steady(running, previous),
    }
}

fn start(
    input: &UpgradeInput<'_>,
    running: u32,
    previous: Option<MajorUpgradeStatus>,
) -> UpgradePlan {
    let wait = |why: String| UpgradePlan {
        waiting: Some(why),
        ..UpgradePlan::steady(running, previous.clone())
    };
    let Some(primary) = input.holder else {
        return wait("the cluster has no primary yet".into());
    };
    let serving = input
        .reports
        .get(primary)
        .is_some_and(|r| r.role == Role::Primary && r.major == Some(running));
    if !serving {
        return wait(format!(
            "{primary} does not report itself primary on PostgreSQL {running}"
        ));
    }
    let Some(from_image) = input.current_image else {
        return wait("the StatefulSet's image is not known yet".into());
    };
    let pods: BTreeMap<String, String> = input
        .instances
        .iter()
        .filter_map(|name| Some((name.clone(), input.pods.get(name)?.clone())))
        .collect();
    let status = MajorUpgradeStatus {
        from: running,
        to: input.spec_major,
        phase: MajorUpgradePhase::UpgradingPrimary,
        primary: primary.to_string(),
        from_image: from_image.to_string(),
        pods,
        started_at: None,
        primary_upgraded_at: None,
        finished_at: None,
        message: None,
        retry_token: input.retry_token.map(str::to_string),
    };
    UpgradePlan {
        running,
        template: Template::Upgrade {
            from_image: from_image.to_string(),
        },
        restart: restart_once(input, &status, std::slice::from_ref(&status.primary)),
        grant: Some(status.primary.clone()),
        hold: true,
        waiting: None,
        transition: Transition::Started,
        status: Some(status),
    }
}

fn upgrading_primary(input: &UpgradeInput<'_>, mut upgrade: MajorUpgradeStatus) -> UpgradePlan {
    let from_image = upgrade.from_image.clone();
    let primary = upgrade.primary.clone();
    // Only a report of the restarted pod counts: the pod the upgrade started with may carry
    // the outcome of an earlier attempt.
    let restarted = input
        .pods
        .get(&primary)
        .is_some_and(|uid| upgrade.pods.get(&primary) != Some(uid));
    let report = input.reports.get(&primary).filter(|_| restarted);
    let outcome = report
        .and_then(|r| r.upgrade.as_ref())
        .filter(|u| u.to == upgrade.to);
    match outcome {
        Some(done)
            if matches!(
                done.outcome,
                MajorUpgradeOutcome::CheckFailed | MajorUpgradeOutcome::Failed
            ) =>
        {
            upgrade.phase = MajorUpgradePhase::Failed;
            upgrade.message = Some(format!(
                "{}: {}",
                match done.outcome {
                    MajorUpgradeOutcome::CheckFailed => "pg_upgrade --check refused the upgrade",
                    _ => "pg_upgrade failed",
                },
                done.message.as_deref().unwrap_or("no details")
            ));
            UpgradePlan {
                template: Template::Old {
                    major: upgrade.from,
                    image: from_image,
                },
                transition: Transition::Failed,
                ..UpgradePlan::steady(upgrade.from, Some(upgrade))
            }
        }
        Some(done)
            if done.outcome == MajorUpgradeOutcome::Upgraded
                && report
                    .is_some_and(|r| r.role == Role::Primary && r.major == Some(upgrade.to)) =>
        {
            upgrade.phase = MajorUpgradePhase::RecloningReplicas;
            let replicas: Vec<String> = upgrade
                .pods
                .keys()
                .filter(|name| **name != primary)
                .cloned()
                .collect();
            let restart = restart_once(input, &upgrade, &replicas);
            UpgradePlan {
                running: upgrade.from,
                template: Template::Upgrade { from_image },
                restart,
                grant: None,
                hold: false,
                waiting: None,
                transition: Transition::PrimaryUpgraded,
                status: Some(upgrade),
            }
        }
        _ => UpgradePlan {
            running: upgrade.from,
            template: Template::Upgrade { from_image },
            restart: restart_once(input, &upgrade, std::slice::from_ref(&primary)),
            grant: Some(primary),
            hold: true,
            waiting: None,
            transition: Transition::None,
            status: Some(upgrade),
        },
    }
}

fn recloning(input: &UpgradeInput<'_>, mut upgrade: MajorUpgradeStatus) -> UpgradePlan {
    let from_image = upgrade.from_image.clone();
    let replicas: Vec<String> = upgrade
        .pods
        .keys()
        .filter(|name| **name != upgrade.primary)
        .cloned()
        .collect();
    let restart = restart_once(input, &upgrade, &replicas);
    let done = input.instances.iter().all(|name| {
        input.reports.get(name).is_some_and(|r| {
            r.major == Some(upgrade.to)
                && (r.role == Role::Primary || (r.role == Role::Replica && r.streaming))
        })
    });
    if done && restart.is_empty() {
        upgrade.phase = MajorUpgradePhase::Completed;
        upgrade.pods.clear();
        upgrade.message = None;
        return UpgradePlan {
            transition: Transition::Completed,
            ..UpgradePlan::steady(upgrade.to, Some(upgrade))
        };
    }
    UpgradePlan {
        running: upgrade.from,
        template: Template::Upgrade { from_image },
        restart,
        grant: None,
        hold: false,
        waiting: None,
        transition: Transition::None,
        status: Some(upgrade),
    }
}

/// Those of `names` whose pod is still the one the upgrade started with.
fn restart_once(
    input: &UpgradeInput<'_>,
    upgrade: &MajorUpgradeStatus,
    names: &[String],
) -> Vec<String> {
    names
        .iter()
        .filter(|name| {
            let original = upgrade.pods.get(*name);
            original.is_some() && input.pods.get(*name) == original
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
