//! Issue 12, hole 5, on real processes: a primary whose postgres cannot start again (its
//! control file made unreadable, its postmaster killed) must not block failover: its agent
//! stops renewing the lease after the start budget, and a replica is promoted within lease
//! duration + start budget + a margin.

mod local_support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use local_support::Cluster;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Default timings: 8 s lease; the start budget is 10 s; 5 s margin for the controller's
/// observation, the promotion and status polling.
const FAILOVER_WITHIN: Duration = Duration::from_secs(8 + 10 + 5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_primary_is_failed_over_within_lease_duration_and_start_budget() {
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let old = status.primary.clone().expect("primary");
    let data_dir = cluster.layout().data_dir(&old);
    let control = data_dir.join("global").join("pg_control");
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o000))
        .expect("chmod pg_control");
    let pidfile = std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("pidfile");
    let postmaster: i32 = pidfile
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("postmaster pid");
    kill(Pid::from_raw(postmaster), Signal::SIGKILL).expect("SIGKILL postmaster");
    let killed = Instant::now();
    let new = match pgrs::local::chaos::wait_new_primary(&cluster.dir, &old, FAILOVER_WITHIN).await
    {
        Ok(primary) => primary,
        Err(error) => panic!(
            "no failover within {} s of the crash loop: {error}\n{}",
            FAILOVER_WITHIN.as_secs(),
            cluster.controller_log_tail()
        ),
    };
    eprintln!(
        "crash loop of {old}: {new} serves {} ms after the postmaster was killed",
        killed.elapsed().as_millis()
    );
    cluster.assert_single_primary().await;
    // Let the cleanup stop the old node normally.
    let _ = std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600));
}
