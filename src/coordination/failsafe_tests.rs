//! The failsafe: the replica's confirmations against the promote gate, the member list in the
//! lease, and the keeper serving on confirmations over real HTTP while its store is cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::time::Instant;

use super::*;
use crate::coordination::tests::{Partitionable, held_by, quick_timings, recording_fence};
use crate::coordination::{LeaseKeeper, LeaseStore, MemoryLeaseStore};
use crate::protocol::failsafe::{ConfirmRequest, FailsafeMember};

fn member(name: &str, url: &str) -> FailsafeMember {
    FailsafeMember {
        name: name.to_string(),
        agent_url: url.to_string(),
        postgres_host: "127.0.0.1".to_string(),
        postgres_port: 5432,
    }
}

fn on(members: Vec<FailsafeMember>) -> FailsafeMembersRequest {
    FailsafeMembersRequest {
        enabled: true,
        members,
    }
}

fn ask_from(primary: &str) -> ConfirmRequest {
    ConfirmRequest {
        primary: primary.to_string(),
        host: "127.0.0.1".to_string(),
        port: 5432,
        deadline_unix_ms: Some(chrono::Utc::now().timestamp_millis() + 100),
    }
}

/// A question that reached a member long after the primary gave up on it (the member was
/// frozen) is refused: it must not block the member's promotion for a lease duration.
#[test]
fn an_abandoned_question_is_not_confirmed() {
    let b = Failsafe::new("b", quick_timings(), "t".into());
    b.set_members(on(vec![member("a", "x"), member("b", "y")]));
    let mut late = ask_from("a");
    late.deadline_unix_ms = Some(chrono::Utc::now().timestamp_millis() - 10_000);
    let refusal = b.confirm(&late, Ok(())).expect_err("abandoned");
    assert!(refusal.contains("gave up"), "{refusal}");
    b.admit_promotion().expect("nothing confirmed");
}

#[test]
fn a_confirmed_replica_refuses_promotion_until_the_confirmation_expires() {
    let b = Failsafe::new("b", quick_timings(), "t".into());
    b.set_members(on(vec![member("a", "x"), member("b", "y")]));
    let answer = b.confirm(&ask_from("a"), Ok(())).expect("b follows a");
    assert_eq!(answer.member, "b");
    assert_eq!(
        answer.valid_ms,
        quick_timings().lease_duration.as_millis() as u64
    );
    let refusal = b.admit_promotion().expect_err("confirmed: no promotion");
    assert!(refusal.contains("confirmed to a"), "{refusal}");
    assert_eq!(b.status().confirmed_primary.as_deref(), Some("a"));
    std::thread::sleep(quick_timings().lease_duration + Duration::from_millis(20));
    b.admit_promotion().expect("the confirmation expired");
}

#[test]
fn a_replica_whose_promotion_passed_the_gate_does_not_confirm() {
    let b = Failsafe::new("b", quick_timings(), "t".into());
    b.set_members(on(vec![member("a", "x"), member("b", "y")]));
    b.admit_promotion().expect("nothing confirmed yet");
    let refusal = b
        .confirm(&ask_from("a"), Ok(()))
        .expect_err("being promoted");
    assert!(refusal.contains("passed the gate"), "{refusal}");
}

#[test]
fn a_replica_confirms_only_what_it_follows_and_only_when_on() {
    let b = Failsafe::new("b", quick_timings(), "t".into());
    let off = b
        .confirm(&ask_from("a"), Ok(()))
        .expect_err("off by default");
    assert!(off.contains("off"), "{off}");
    b.set_members(on(vec![member("a", "x")]));
    let other = b
        .confirm(&ask_from("a"), Err("follows 10.0.0.9:5432".into()))
        .expect_err("follows someone else");
    assert!(other.contains("10.0.0.9"), "{other}");
    b.admit_promotion()
        .expect("a refused confirmation does not block a promotion");
}

#[test]
fn the_lease_list_must_name_the_candidate() {
    let mut record = LeaseRecord {
        holder: Some("b".into()),
        version: "3".into(),
        duration: Duration::from_secs(8),
        renewed_at: None,
        transitions: 1,
        incarnation: None,
        failsafe_members: None,
    };
    assert_eq!(membership_refusal(&record, "c"), None, "no list: no rule");
    record.failsafe_members = Some(vec!["a".into(), "b".into()]);
    assert_eq!(membership_refusal(&record, "b"), None);
    let refusal = membership_refusal(&record, "c").expect("c was never asked");
    assert!(refusal.contains("does not name c"), "{refusal}");
}

#[test]
fn the_holder_writes_the_list_when_it_changes_and_clears_it_when_off() {
    let a = Failsafe::new("a", quick_timings(), "t".into());
    assert_eq!(a.wanted_lease_members(), None, "off and nothing written");
    a.set_members(on(vec![member("b", "y"), member("a", "x")]));
    let wanted = a.wanted_lease_members().expect("a list to write");
    assert_eq!(wanted, Some(vec!["a".to_string(), "b".to_string()]));
    // An unknown outcome: b may be in the lease, so it would be asked, but nothing is armed.
    a.note_lease_members(wanted.as_deref(), None);
    assert!(!a.status().armed);
    let mut record = quick_record();
    record.failsafe_members = wanted.clone();
    a.note_lease_members(wanted.as_deref(), Some(&record));
    assert!(a.status().armed);
    assert_eq!(a.wanted_lease_members(), None, "written");
    a.set_members(FailsafeMembersRequest::default());
    assert_eq!(a.wanted_lease_members(), Some(None), "off: clear the list");
    a.reset_primary();
    assert_eq!(
        a.wanted_lease_members(),
        None,
        "a former holder writes nothing"
    );
}

fn quick_record() -> LeaseRecord {
    LeaseRecord {
        holder: Some("a".into()),
        version: "1".into(),
        duration: quick_timings().lease_duration,
        renewed_at: None,
        transitions: 0,
        incarnation: None,
        failsafe_members: None,
    }
}

/// A member's agent, reduced to the failsafe's confirm endpoint.
struct Member {
    failsafe: Arc<Failsafe>,
    follows: Arc<AtomicBool>,
    url: String,
}

async fn serve_member(name: &str) -> Member {
    let failsafe = Arc::new(Failsafe::new(name, quick_timings(), "t".into()));
    let follows = Arc::new(AtomicBool::new(true));
    let (handler, flag) = (failsafe.clone(), follows.clone());
    let app = axum::Router::new().route(
        FAILSAFE_CONFIRM_PATH,
        axum::routing::post(
            move |axum::Json(request): axum::Json<ConfirmRequest>| async move {
                let follows = if flag.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("follows someone else".to_string())
                };
                match handler.confirm(&request, follows) {
                    Ok(answer) => Ok(axum::Json(answer)),
                    Err(error) => Err((axum::http::StatusCode::CONFLICT, error)),
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Member {
        failsafe,
        follows,
        url,
    }
}

/// The store is cut from the primary only: it serves on b's and c's confirmations well past
/// its renew deadline, until one of them stops following it; then it fences within the
/// deadline of the last round every member confirmed.
#[tokio::test]
async fn the_primary_serves_on_confirmations_while_every_member_confirms() {
    let timings = quick_timings();
    let store = Arc::new(Partitionable {
        inner: MemoryLeaseStore::new(timings.lease_duration),
        cut: AtomicBool::new(false),
    });
    held_by(&store.inner, "a").await;
    let (b, c) = (serve_member("b").await, serve_member("c").await);
    let members = vec![
        member("a", "http://127.0.0.1:9"),
        member("b", &b.url),
        member("c", &c.url),
    ];
    for m in [&b, &c] {
        m.failsafe.set_members(on(members.clone()));
    }
    let keeper = LeaseKeeper::new(store.clone(), "a", timings).expect("keeper");
    let failsafe = Arc::new(Failsafe::new("a", timings, "t".into()));
    failsafe.set_members(on(members));
    keeper.set_failsafe(failsafe.clone());
    let (fence, mut fenced) = recording_fence();
    tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    // The first renewal writes the member list into the lease.
    let written = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if store
                .inner
                .get()
                .await
                .expect("get")
                .failsafe_members
                .is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(written.is_ok(), "the list was never written to the lease");
    assert!(failsafe.status().armed);

    store.cut.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    let served = tokio::time::timeout(timings.renew_deadline * 4, fenced.recv()).await;
    assert!(
        served.is_err(),
        "fenced although every member confirmed: {served:?}"
    );
    let status = failsafe.status();
    assert!(
        status.serving_on_confirmations_ms.is_some(),
        "not serving on confirmations: {status:?}"
    );
    assert_eq!(b.failsafe.status().confirmed_primary.as_deref(), Some("a"));
    assert!(
        b.failsafe.admit_promotion().is_err(),
        "b must refuse promotion"
    );

    c.follows.store(false, Ordering::SeqCst);
    let stopped_following = Instant::now();
    let (fenced_at, reason) = tokio::time::timeout(timings.renew_deadline * 3, fenced.recv())
        .await
        .expect("fenced once c no longer follows")
        .expect("fence called");
    eprintln!(
        "served {} ms on confirmations; fenced {} ms after c stopped following: {reason}",
        (stopped_following - cut_at).as_millis(),
        (fenced_at - stopped_following).as_millis()
    );
    assert!(fenced_at - stopped_following <= timings.renew_deadline + Duration::from_millis(200));
    // b's last confirmation outlives the primary's fence: never two writers.
    let b_left = b.failsafe.status().confirmation_remaining_ms.unwrap_or(0);
    assert!(
        b_left > 0,
        "b's confirmation expired before the primary fenced"
    );
}

/// A refusal by the store (another holder) is not an outage: the failsafe does not apply.
#[tokio::test]
async fn a_lease_held_by_another_fences_even_with_confirming_members() {
    let timings = quick_timings();
    let store = Arc::new(MemoryLeaseStore::new(timings.lease_duration));
    held_by(store.as_ref(), "a").await;
    let b = serve_member("b").await;
    let members = vec![member("a", "http://127.0.0.1:9"), member("b", &b.url)];
    b.failsafe.set_members(on(members.clone()));
    let keeper = LeaseKeeper::new(store.clone(), "a", timings).expect("keeper");
    let failsafe = Arc::new(Failsafe::new("a", timings, "t".into()));
    failsafe.set_members(on(members));
    keeper.set_failsafe(failsafe);
    let (fence, mut fenced) = recording_fence();
    tokio::spawn(keeper.clone().run(fence));
    keeper.activate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let version = store.get().await.expect("get").version;
    store.acquire("b", &version).await.expect("take over");
    let (_, reason) = tokio::time::timeout(Duration::from_secs(2), fenced.recv())
        .await
        .expect("fenced")
        .expect("fence called");
    assert!(reason.contains("held by b"), "{reason}");
}
