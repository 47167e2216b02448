use super::*;

fn report(role: Role, major: u32, upgrade: Option<MajorUpgradeOutcome>) -> InstanceReport {
    InstanceReport {
        role,
        major: Some(major),
        streaming: role == Role::Replica,
        upgrade: upgrade.map(|outcome| MajorUpgradeReport {
            from: 15,
            to: 17,
            outcome,
            message: Some("tables_using_reg.txt: public.blocker.f".into()),
            seconds: Some(1.0),
        }),
    }
}

struct Cluster {
    instances: Vec<String>,
    pods: BTreeMap<String, String>,
    reports: BTreeMap<String, InstanceReport>,
}

impl Cluster {
    fn on(major: u32) -> Self {
        let instances: Vec<String> = (0..3).map(|i| format!("pg-{i}")).collect();
        let pods = instances
            .iter()
            .map(|n| (n.clone(), format!("{n}-uid1")))
            .collect();
        let reports = instances
            .iter()
            .map(|n| {
                let role = if n == "pg-0" {
                    Role::Primary
                } else {
                    Role::Replica
                };
                (n.clone(), report(role, major, None))
            })
            .collect();
        Cluster {
            instances,
            pods,
            reports,
        }
    }

    fn input<'a>(
        &'a self,
        running: Option<u32>,
        current: Option<&'a MajorUpgradeStatus>,
    ) -> UpgradeInput<'a> {
        UpgradeInput {
            spec_major: 17,
            running_major: running,
            current,
            holder: Some("pg-0"),
            instances: &self.instances,
            pods: &self.pods,
            reports: &self.reports,
            current_image: Some("pgrs:1"),
            retry_token: None,
        }
    }

    fn restarted(&mut self, name: &str, report: InstanceReport) {
        self.pods.insert(name.into(), format!("{name}-uid2"));
        self.reports.insert(name.into(), report);
    }
}

#[test]
fn a_raised_version_upgrades_the_primary_first_then_reclones_the_replicas() {
    let mut cluster = Cluster::on(15);
    let started = plan(&cluster.input(Some(15), None));
    assert_eq!(started.transition, Transition::Started);
    assert!(started.hold, "no control round while the primary upgrades");
    assert_eq!(started.restart, ["pg-0"]);
    assert_eq!(started.grant.as_deref(), Some("pg-0"));
    assert_eq!(
        started.template,
        Template::Upgrade {
            from_image: "pgrs:1".into()
        }
    );
    let status = started.status.expect("recorded");
    assert_eq!((status.from, status.to, started.running), (15, 17, 15));

    // The old pod is gone, the new one has not answered yet: hold, grant, do not restart again.
    cluster.pods.remove("pg-0");
    cluster.reports.remove("pg-0");
    let waiting = plan(&cluster.input(Some(15), Some(&status)));
    assert!(waiting.hold && waiting.restart.is_empty());
    assert_eq!(waiting.grant.as_deref(), Some("pg-0"));

    cluster.restarted(
        "pg-0",
        report(Role::Primary, 17, Some(MajorUpgradeOutcome::Upgraded)),
    );
    let upgraded = plan(&cluster.input(Some(15), Some(&status)));
    assert_eq!(upgraded.transition, Transition::PrimaryUpgraded);
    assert!(
        !upgraded.hold,
        "the upgraded primary serves through the control round"
    );
    assert_eq!(upgraded.restart, ["pg-1", "pg-2"]);
    let status = upgraded.status.expect("recorded");
    assert_eq!(status.phase, MajorUpgradePhase::RecloningReplicas);

    cluster.restarted(
        "pg-1",
        report(Role::Replica, 17, Some(MajorUpgradeOutcome::Recloned)),
    );
    let one_left = plan(&cluster.input(Some(15), Some(&status)));
    assert_eq!(one_left.restart, ["pg-2"]);
    assert_eq!(one_left.transition, Transition::None);

    cluster.restarted(
        "pg-2",
        report(Role::Replica, 17, Some(MajorUpgradeOutcome::Recloned)),
    );
    let done = plan(&cluster.input(Some(15), Some(&status)));
    assert_eq!(done.transition, Transition::Completed);
    assert_eq!(done.running, 17);
    assert_eq!(done.template, Template::Spec);
    let status = done.status.expect("kept");
    let steady = plan(&cluster.input(Some(17), Some(&status)));
    assert_eq!(steady.transition, Transition::None);
    assert!(!steady.hold && steady.restart.is_empty() && steady.grant.is_none());
}

#[test]
fn a_refused_check_keeps_the_old_major_until_a_retry() {
    let mut cluster = Cluster::on(15);
    let status = plan(&cluster.input(Some(15), None))
        .status
        .expect("started");
    cluster.restarted(
        "pg-0",
        report(Role::Primary, 15, Some(MajorUpgradeOutcome::CheckFailed)),
    );
    let failed = plan(&cluster.input(Some(15), Some(&status)));
    assert_eq!(failed.transition, Transition::Failed);
    assert_eq!(failed.running, 15);
    assert!(failed.restart.is_empty() && !failed.hold);
    assert_eq!(
        failed.template,
        Template::Old {
            major: 15,
            image: "pgrs:1".into()
        }
    );
    let status = failed.status.expect("recorded");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("--check refused") && message.contains("public.blocker.f"),
        "{message}"
    );

    // It stays failed (no restart loop)...
    let again = plan(&cluster.input(Some(15), Some(&status)));
    assert_eq!(again.transition, Transition::None);
    assert!(matches!(again.template, Template::Old { major: 15, .. }));
    // ...until the retry annotation changes.
    let mut input = cluster.input(Some(15), Some(&status));
    input.retry_token = Some("1");
    let retried = plan(&input);
    assert_eq!(retried.transition, Transition::Started);
    assert_eq!(retried.restart, ["pg-0"]);
    // The pod of the failed attempt still reports its refusal: it does not end the retry.
    let status = retried.status.expect("started again");
    let mut input = cluster.input(Some(15), Some(&status));
    input.retry_token = Some("1");
    let waiting = plan(&input);
    assert_eq!(waiting.transition, Transition::None);
    assert!(waiting.hold);
    assert_eq!(waiting.restart, ["pg-0"]);
}

#[test]
fn an_upgrade_waits_for_a_serving_primary_and_never_lowers() {
    let mut cluster = Cluster::on(15);
    cluster
        .reports
        .insert("pg-0".into(), report(Role::Starting, 15, None));
    let waiting = plan(&cluster.input(Some(15), None));
    assert_eq!(waiting.transition, Transition::None);
    assert!(waiting.waiting.is_some() && waiting.restart.is_empty() && !waiting.hold);

    let cluster = Cluster::on(17);
    let mut input = cluster.input(Some(18), None);
    input.spec_major = 17;
    let lower = plan(&input);
    assert_eq!(lower.transition, Transition::None);
    assert_eq!(lower.template, Template::Spec);

    // First sight of a cluster of this operator version: it runs its spec's major.
    let first = plan(&cluster.input(None, None));
    assert_eq!((first.running, first.transition), (17, Transition::None));
}
