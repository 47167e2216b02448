//! Pure conversions between the Kubernetes Lease object and the [`LeaseRecord`].

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use crate::coordination::lease::LeaseRecord;

pub(super) const ABSENT_VERSION: &str = super::KubeLeaseStore::ABSENT_VERSION;

/// Annotation holding the exact lease duration: `leaseDurationSeconds` has whole seconds only.
const DURATION_MS_ANNOTATION: &str = "pgrs.dev/lease-duration-ms";

/// Annotation naming the holder's incarnation (its pod's UID) that renews the Lease: two copies
/// of one pod name (a force-deleted pod still running beside its replacement) are told apart.
/// A grant clears it; the holder's first renewal claims it.
const INCARNATION_ANNOTATION: &str = "pgrs.dev/holder-incarnation";
/// The failsafe member list the holder wrote (names, comma separated).
const FAILSAFE_MEMBERS_ANNOTATION: &str = "pgrs.dev/failsafe-members";

fn failsafe_members_of(lease: &Lease) -> Option<Vec<String>> {
    let value = lease
        .metadata
        .annotations
        .as_ref()?
        .get(FAILSAFE_MEMBERS_ANNOTATION)?;
    Some(
        value
            .split(',')
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// `lease` with the failsafe member list set (or removed).
pub(super) fn with_failsafe_members(mut lease: Lease, members: Option<&[String]>) -> Lease {
    let annotations = lease.metadata.annotations.get_or_insert_default();
    match members {
        Some(names) => {
            annotations.insert(FAILSAFE_MEMBERS_ANNOTATION.to_string(), names.join(","));
        }
        None => {
            annotations.remove(FAILSAFE_MEMBERS_ANNOTATION);
        }
    }
    lease
}

pub(super) fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

pub(super) fn absent_record(duration: Duration) -> LeaseRecord {
    LeaseRecord {
        holder: None,
        version: ABSENT_VERSION.to_string(),
        duration,
        renewed_at: None,
        incarnation: None,
        transitions: 0,
        failsafe_members: None,
    }
}

pub(super) fn resource_version(lease: &Lease) -> Option<&str> {
    lease.metadata.resource_version.as_deref()
}

pub(super) fn incarnation_of(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INCARNATION_ANNOTATION))
        .map(String::as_str)
}

fn set_incarnation(lease: &mut Lease, incarnation: Option<&str>) {
    let annotations = lease.metadata.annotations.get_or_insert_default();
    match incarnation {
        Some(incarnation) => {
            annotations.insert(INCARNATION_ANNOTATION.to_string(), incarnation.to_string());
        }
        None => {
            annotations.remove(INCARNATION_ANNOTATION);
        }
    }
}

pub(super) fn holder_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// The record of `lease`; `None` without a resourceVersion. The duration is the exact one from
/// the annotation, else `leaseDurationSeconds`, else `default_duration` (a Lease created by
/// someone else).
pub(super) fn record_from_lease(lease: &Lease, default_duration: Duration) -> Option<LeaseRecord> {
    let version = resource_version(lease)?.to_string();
    let spec = lease.spec.clone().unwrap_or_default();
    let annotated = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DURATION_MS_ANNOTATION))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis);
    let seconds = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs);
    Some(LeaseRecord {
        holder: holder_of(lease).map(str::to_string),
        version,
        duration: annotated.or(seconds).unwrap_or(default_duration),
        renewed_at: spec.renew_time.as_ref().and_then(from_micro_time),
        incarnation: incarnation_of(lease).map(str::to_string),
        failsafe_members: failsafe_members_of(lease),
        transitions: spec
            .lease_transitions
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
    })
}

/// Whole seconds for `leaseDurationSeconds`, rounded up (never 0: the API rejects it).
pub(super) fn duration_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_millis().div_ceil(1000).max(1);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

pub(super) fn to_micro_time(at: chrono::DateTime<chrono::Utc>) -> Option<MicroTime> {
    let nanos = at.timestamp_nanos_opt()?;
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .ok()
        .map(MicroTime)
}

pub(super) fn from_micro_time(time: &MicroTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(
        time.0.as_second(),
        u32::try_from(time.0.subsec_nanosecond()).ok()?,
    )
}

pub(super) fn set_duration(lease: &mut Lease, duration: Duration) {
    lease.metadata.annotations.get_or_insert_default().insert(
        DURATION_MS_ANNOTATION.to_string(),
        duration.as_millis().to_string(),
    );
    lease.spec.get_or_insert_default().lease_duration_seconds = Some(duration_seconds(duration));
}

/// A new Lease object, held by `holder` or unheld.
pub(super) fn new_lease(
    name: &str,
    holder: Option<&str>,
    duration: Duration,
    at: chrono::DateTime<chrono::Utc>,
) -> Lease {
    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            acquire_time: holder.and(to_micro_time(at)),
            renew_time: holder.and(to_micro_time(at)),
            lease_transitions: Some(if holder.is_some() { 1 } else { 0 }),
            ..LeaseSpec::default()
        }),
    };
    set_duration(&mut lease, duration);
    lease
}

/// `lease` taken over by (or re-acquired for) `holder`; a change of holder counts a transition.
pub(super) fn with_holder(
    mut lease: Lease,
    holder: &str,
    duration: Duration,
    at: chrono::DateTime<chrono::Utc>,
) -> Lease {
    let changes_holder = holder_of(&lease) != Some(holder);
    let spec = lease.spec.get_or_insert_default();
    if changes_holder {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        spec.acquire_time = to_micro_time(at);
    }
    spec.holder_identity = Some(holder.to_string());
    spec.renew_time = to_micro_time(at);
    set_duration(&mut lease, duration);
    // A grant is to the name: whichever incarnation of it renews first claims the Lease.
    set_incarnation(&mut lease, None);
    lease
}

/// `lease` renewed by its holder; an incarnation-aware holder claims it.
pub(super) fn renewed(
    mut lease: Lease,
    duration: Duration,
    at: chrono::DateTime<chrono::Utc>,
    incarnation: Option<&str>,
) -> Lease {
    lease.spec.get_or_insert_default().renew_time = to_micro_time(at);
    set_duration(&mut lease, duration);
    if incarnation.is_some() {
        set_incarnation(&mut lease, incarnation);
    }
    lease
}

pub(super) fn released(mut lease: Lease, at: chrono::DateTime<chrono::Utc>) -> Lease {
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = None;
    spec.renew_time = to_micro_time(at);
    set_incarnation(&mut lease, None);
    lease
}

pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap()
    }

    fn stored(mut lease: Lease, version: &str) -> Lease {
        lease.metadata.resource_version = Some(version.to_string());
        lease
    }

    #[test]
    fn duration_seconds_round_up_and_are_never_zero() {
        assert_eq!(duration_seconds(Duration::from_secs(8)), 8);
        assert_eq!(duration_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(duration_seconds(Duration::from_millis(1)), 1);
        assert_eq!(duration_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn a_new_held_lease_reads_back_as_its_record() {
        let lease = stored(
            new_lease("c-primary", Some("c-0"), Duration::from_millis(2500), at()),
            "42",
        );
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.holder.as_deref(), Some("c-0"));
        assert_eq!(record.version, "42");
        assert_eq!(record.duration, Duration::from_millis(2500));
        assert_eq!(record.renewed_at, Some(at()));
        assert_eq!(record.transitions, 1);
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(3));
    }

    #[test]
    fn an_unheld_lease_has_no_holder_and_no_transitions() {
        let lease = stored(
            new_lease("c-primary", None, Duration::from_secs(8), at()),
            "7",
        );
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.holder, None);
        assert_eq!(record.transitions, 0);
        assert_eq!(record.renewed_at, None);
    }

    #[test]
    fn without_annotation_the_duration_comes_from_seconds_then_the_default() {
        let mut lease = stored(
            new_lease("c-primary", None, Duration::from_secs(8), at()),
            "7",
        );
        lease.metadata.annotations = None;
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.duration, Duration::from_secs(8));
        lease.spec = None;
        let record = record_from_lease(&lease, Duration::from_secs(99)).unwrap();
        assert_eq!(record.duration, Duration::from_secs(99));
    }

    #[test]
    fn a_lease_without_resource_version_has_no_record() {
        let lease = new_lease("c-primary", None, Duration::from_secs(8), at());
        assert_eq!(record_from_lease(&lease, Duration::from_secs(8)), None);
    }

    #[test]
    fn only_a_change_of_holder_counts_a_transition() {
        let lease = new_lease("c-primary", Some("c-0"), Duration::from_secs(8), at());
        let same = with_holder(lease.clone(), "c-0", Duration::from_secs(8), at());
        assert_eq!(same.spec.as_ref().unwrap().lease_transitions, Some(1));
        let other = with_holder(lease, "c-1", Duration::from_secs(8), at());
        assert_eq!(other.spec.as_ref().unwrap().lease_transitions, Some(2));
        let released = released(other, at());
        assert_eq!(holder_of(&released), None);
        let back = with_holder(released, "c-1", Duration::from_secs(8), at());
        assert_eq!(back.spec.as_ref().unwrap().lease_transitions, Some(3));
    }

    #[test]
    fn a_renewal_claims_the_incarnation_and_a_grant_or_release_clears_it() {
        let duration = Duration::from_secs(8);
        let granted = new_lease("c-primary", Some("c-0"), duration, at());
        assert_eq!(incarnation_of(&granted), None);
        let claimed = renewed(granted, duration, at(), Some("uid-a"));
        assert_eq!(incarnation_of(&claimed), Some("uid-a"));
        let record = record_from_lease(&stored(claimed.clone(), "3"), duration).unwrap();
        assert_eq!(record.incarnation.as_deref(), Some("uid-a"));
        // A store without an incarnation (the operator) keeps the claim when it renews.
        let kept = renewed(claimed.clone(), duration, at(), None);
        assert_eq!(incarnation_of(&kept), Some("uid-a"));
        let regranted = with_holder(claimed.clone(), "c-0", duration, at());
        assert_eq!(incarnation_of(&regranted), None, "a grant is to the name");
        assert_eq!(incarnation_of(&released(claimed, at())), None);
    }
}
