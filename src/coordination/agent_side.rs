//! Lease fencing as the agent wires it: command-line options, the keeper and its watchdog, a
//! monitor that arms the keeper while the local postgres is primary, and the promotion gate (the
//! agent promotes only when it sees itself as the lease holder).
//!
//! Kept generic over the agent (closures for "what is postgres doing" and "fence now"), so that
//! `coordination` does not depend on `agent`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::clock::FenceInstant;
use super::failsafe::{Failsafe, membership_refusal};
use super::http::HttpLeaseStore;
use super::keeper::{DEFAULT_START_BUDGET, FenceFn, KeeperMode, LeaseKeeper};
use super::lease::{LeaseError, LeaseStore, LeaseTimings, TimingsError};
use super::watchdog::{WatchdogCommand, spawn_watchdog};

/// Lease options of `pgrs agent`. Without `--lease-url` the agent does not fence itself (a
/// standalone agent; the controller then has no split-brain protection).
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// URL of the lease service (`pgrs local` serves one on loopback).
    #[arg(long, env = "PGRS_LEASE_URL")]
    pub lease_url: Option<String>,
    /// Timing profile: `default` (8 s lease, renew 1 s, deadline 5 s, shutdown budget 2 s) or
    /// `aggressive` (3 s / 0.5 s / 1.5 s / 1 s). The options below override single values.
    #[arg(long, default_value = "default")]
    pub lease_profile: String,
    #[arg(long)]
    pub lease_duration_ms: Option<u64>,
    #[arg(long)]
    pub lease_renew_interval_ms: Option<u64>,
    #[arg(long)]
    pub lease_renew_deadline_ms: Option<u64>,
    #[arg(long)]
    pub lease_shutdown_budget_ms: Option<u64>,
    /// How long a primary may be down (restarting, crash-looping) before it stops renewing and
    /// fences, so that the lease expires and a replica takes over [default: 10000].
    #[arg(long, env = "PGRS_LEASE_START_BUDGET_MS")]
    pub lease_start_budget_ms: Option<u64>,
    /// Do not start the out-of-process fencing watchdog (tests only: a frozen agent then
    /// cannot fence).
    #[arg(long, hide = true)]
    pub no_fence_watchdog: bool,
}

impl LeaseArgs {
    pub fn timings(&self) -> Result<LeaseTimings, TimingsError> {
        let mut timings = LeaseTimings::profile(&self.lease_profile)?;
        let ms = Duration::from_millis;
        if let Some(v) = self.lease_duration_ms {
            timings.lease_duration = ms(v);
        }
        if let Some(v) = self.lease_renew_interval_ms {
            timings.renew_interval = ms(v);
        }
        if let Some(v) = self.lease_renew_deadline_ms {
            timings.renew_deadline = ms(v);
        }
        if let Some(v) = self.lease_shutdown_budget_ms {
            timings.shutdown_budget = ms(v);
        }
        timings.validate()?;
        Ok(timings)
    }

    pub fn start_budget(&self) -> Duration {
        self.lease_start_budget_ms
            .map_or(DEFAULT_START_BUDGET, Duration::from_millis)
    }

    /// The same options as command-line arguments (for a controller spawning agents).
    pub fn to_args(timings: &LeaseTimings, lease_url: &str) -> Vec<String> {
        vec![
            format!("--lease-url={lease_url}"),
            format!("--lease-duration-ms={}", timings.lease_duration.as_millis()),
            format!(
                "--lease-renew-interval-ms={}",
                timings.renew_interval.as_millis()
            ),
            format!(
                "--lease-renew-deadline-ms={}",
                timings.renew_deadline.as_millis()
            ),
            format!(
                "--lease-shutdown-budget-ms={}",
                timings.shutdown_budget.as_millis()
            ),
        ]
    }
}

/// What the local postgres is doing, as far as lease fencing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPrimaryState {
    /// Running as primary: the lease must be held and renewed.
    Serving,
    /// Meant to be primary but (re)starting: a keeper already active keeps renewing, within the
    /// start budget (postgres crashed under this agent); a fresh agent process does not renew
    /// until postgres serves (a crash-looping process must not keep the lease), and then fences
    /// at once unless its start proof is younger than the renew deadline.
    Restarting,
    /// A first primary creating its data directory (initdb): renews during the start, within
    /// the bootstrap budget (nothing to fail over to yet, and initdb may outlast the renew
    /// deadline and, on a busy node, the start budget).
    Bootstrapping,
    /// A stop was requested and the postmaster has not exited yet: keep renewing.
    Stopping,
    /// A replica, or fenced: nothing to renew.
    NotPrimary,
    /// Stopped on request, and the postmaster exited from a clean shutdown: release the lease.
    StoppedOnRequest,
}

pub struct AgentFencing {
    keeper: Arc<LeaseKeeper>,
    store: Arc<dyn LeaseStore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for AgentFencing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct Gate {
    keeper: Arc<LeaseKeeper>,
    store: Arc<dyn LeaseStore>,
    identity: String,
    path: &'static str,
}

async fn promote_gate(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || request.uri().path() != gate.path {
        return next.run(request).await;
    }
    // A renewal, not a read: a read proves the holder, not for how long the lease stays valid.
    // The renewal's start is the proof the promoted primary's fencing deadline counts from.
    let asked_at = FenceInstant::now();
    let refusal = match gate.store.renew(&gate.identity).await {
        Ok(record) => match failsafe_refusal(&gate, &record) {
            None => {
                gate.keeper.confirm(asked_at);
                return next.run(request).await;
            }
            Some(refusal) => refusal,
        },
        Err(LeaseError::NotHolder { current, .. }) => format!(
            "refusing to promote: the lease is held by {}, not by {}",
            current.holder.as_deref().unwrap_or("nobody"),
            gate.identity
        ),
        Err(error) => format!("refusing to promote: cannot renew the lease: {error}"),
    };
    tracing::warn!(identity = %gate.identity, %refusal, "promotion refused");
    (
        StatusCode::CONFLICT,
        axum::Json(serde_json::json!({ "error": refusal })),
    )
        .into_response()
}

/// The failsafe's part of the gate: the candidate must be named by the lease's member list and
/// must not have confirmed a primary serving on confirmations (then it is recorded as admitted).
fn failsafe_refusal(gate: &Gate, record: &super::lease::LeaseRecord) -> Option<String> {
    if let Some(refusal) = membership_refusal(record, &gate.identity) {
        return Some(refusal);
    }
    gate.keeper.failsafe()?.admit_promotion().err()
}

impl AgentFencing {
    /// Starts lease fencing when `args.lease_url` is set: the keeper, its watchdog (for the
    /// postgres of `data_dir`) and the monitor polling `state`.
    pub fn start(
        args: &LeaseArgs,
        identity: &str,
        data_dir: &Path,
        fence: FenceFn,
        state: Arc<dyn Fn() -> LocalPrimaryState + Send + Sync>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = &args.lease_url else {
            return Ok(None);
        };
        let timings = args.timings()?;
        // A request may not outlive a renew interval: a hung store must not delay fencing.
        let store: Arc<dyn LeaseStore> =
            Arc::new(HttpLeaseStore::new(url, timings.renew_interval)?);
        Self::start_with_store(args, store, url, identity, data_dir, fence, state).map(Some)
    }

    /// Starts lease fencing on any lease store (the Kubernetes Lease in a pod); `description`
    /// names the store in the log.
    pub fn start_with_store(
        args: &LeaseArgs,
        store: Arc<dyn LeaseStore>,
        description: &str,
        identity: &str,
        data_dir: &Path,
        fence: FenceFn,
        state: Arc<dyn Fn() -> LocalPrimaryState + Send + Sync>,
    ) -> anyhow::Result<Self> {
        let url = description;
        let timings = args.timings()?;
        let keeper = LeaseKeeper::new(store.clone(), identity, timings)?;
        let start_budget = args.start_budget();
        keeper.set_start_budget(start_budget);
        let mut tasks = vec![tokio::spawn(keeper.clone().run(fence))];
        if !args.no_fence_watchdog {
            let command = WatchdogCommand::current_exe()?;
            tasks.push(spawn_watchdog(&command, data_dir, keeper.clone())?);
        }
        tasks.push(tokio::spawn(monitor(keeper.clone(), state)));
        tracing::info!(identity, lease_url = %url, ?timings, start_budget_ms = start_budget.as_millis() as u64, "lease fencing enabled");
        Ok(AgentFencing {
            keeper,
            store,
            tasks,
        })
    }

    pub fn keeper(&self) -> &Arc<LeaseKeeper> {
        &self.keeper
    }

    /// Turns the lease-store-outage failsafe machinery on (whether it is used is the
    /// controller's switch, [`Failsafe::set_members`]); `token` authenticates this agent's
    /// requests to the other members; `http` (when the agents serve HTTPS) is the client
    /// pinned to the cluster CA that reaches them.
    pub fn enable_failsafe(&self, token: String, http: Option<reqwest::Client>) -> Arc<Failsafe> {
        let mut failsafe = Failsafe::new(self.keeper.identity(), self.keeper.timings(), token);
        if let Some(http) = http {
            failsafe = failsafe.with_http(http);
        }
        let failsafe = Arc::new(failsafe);
        self.keeper.set_failsafe(failsafe.clone());
        failsafe
    }

    /// Wraps the agent's router so that `POST promote_path` runs only for the lease holder.
    pub fn gate_promote(&self, router: Router, promote_path: &'static str) -> Router {
        router.layer(axum::middleware::from_fn_with_state(
            Gate {
                keeper: self.keeper.clone(),
                store: self.store.clone(),
                identity: self.keeper.identity().to_string(),
                path: promote_path,
            },
            promote_gate,
        ))
    }

    /// After postgres was shut down gracefully: give the lease up (no-op unless primary).
    pub async fn release_after_stop(&self) {
        if self.keeper.mode() == KeeperMode::Active {
            let _ = self.keeper.release().await;
        }
    }
}

/// Arms the keeper while the local postgres is primary: polls `state` every 20 ms.
async fn monitor(
    keeper: Arc<LeaseKeeper>,
    state: Arc<dyn Fn() -> LocalPrimaryState + Send + Sync>,
) {
    // After a fence, re-arm only once postgres was seen not serving: until the fence callback
    // has marked the instance fenced, it may still look like a primary.
    let mut may_rearm = false;
    loop {
        match (state(), keeper.mode()) {
            (LocalPrimaryState::Serving, KeeperMode::Idle) => keeper.activate(),
            (LocalPrimaryState::Serving, KeeperMode::Fenced) if may_rearm => {
                // Serving again after a fence: a promotion; prove the lease anew.
                may_rearm = false;
                keeper.activate();
            }
            (LocalPrimaryState::Serving | LocalPrimaryState::Stopping, KeeperMode::Active) => {
                keeper.note_serving(true)
            }
            (_, KeeperMode::Fenced) => may_rearm = true,
            (LocalPrimaryState::Restarting, KeeperMode::Active) => keeper.note_serving(false),
            (LocalPrimaryState::Bootstrapping, KeeperMode::Active) => keeper.note_bootstrapping(),
            // A first primary's initdb on a lease granted to it: renew during the start so that
            // it does not serve on stale proof; the bootstrap budget runs.
            (LocalPrimaryState::Bootstrapping, KeeperMode::Idle) if keeper.confirmed() => {
                keeper.activate();
                keeper.note_bootstrapping();
            }
            (LocalPrimaryState::StoppedOnRequest, KeeperMode::Active) => {
                let _ = keeper.release().await;
            }
            (LocalPrimaryState::NotPrimary, KeeperMode::Active) => keeper.deactivate(),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
