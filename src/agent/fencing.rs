//! The agent's side of lease fencing: what the supervisor's state means for the keeper
//! ([`fencing_state`]), and wiring the keeper to the supervisor ([`start_fencing`]).

use std::sync::Arc;

use crate::agent::instance::AgentConfig;
use crate::agent::kube_mode::KubeMode;
use crate::agent::supervisor::{self, Phase, SupervisorHandle, SupervisorState};
use crate::coordination::{AgentFencing, FenceFn, KubeLeaseStore, LeaseArgs, LocalPrimaryState};
use crate::protocol::api::Role;

/// What the supervisor's state means for fencing.
/// A stop marks the phase `Stopped` when it begins: until the postmaster has exited it is
/// `Stopping` (the lease is kept), and only a clean exit releases the lease.
pub fn fencing_state(state: &SupervisorState) -> LocalPrimaryState {
    match (state.phase, state.intended_role) {
        (Phase::Running, Role::Primary) => LocalPrimaryState::Serving,
        (Phase::Starting, Role::Primary) if state.new_data_dir => LocalPrimaryState::Bootstrapping,
        (Phase::Starting, Role::Primary) => LocalPrimaryState::Restarting,
        (Phase::Stopped, _) if state.pid.is_some() => LocalPrimaryState::Stopping,
        (Phase::Stopped, _) if state.clean_stop => LocalPrimaryState::StoppedOnRequest,
        _ => LocalPrimaryState::NotPrimary,
    }
}

/// Lease fencing (when `--lease-url` is given, or in a pod): the keeper fences through the
/// supervisor's immediate shutdown, and is armed while postgres runs as primary.
pub fn start_fencing(
    args: &LeaseArgs,
    config: &AgentConfig,
    handle: &SupervisorHandle,
    kube: Option<(Arc<KubeLeaseStore>, KubeMode)>,
) -> anyhow::Result<Option<AgentFencing>> {
    let fence_handle = handle.clone();
    let fence: FenceFn = Arc::new(move |reason: String| {
        let handle = fence_handle.clone();
        Box::pin(async move {
            if let Err(error) = handle.fence(&reason).await {
                tracing::error!(%error, "fencing through the supervisor failed");
            }
        })
    });
    let state_handle: supervisor::SupervisorHandle = handle.clone();
    let state = Arc::new(move || fencing_state(&state_handle.state()));
    let fencing = match kube {
        Some((store, kube)) => {
            let fencing = AgentFencing::start_with_store(
                args,
                store,
                &kube.describe(),
                config.name(),
                &config.data_dir,
                fence,
                state,
            )?;
            // The start's read of "holder == self": a primary slow to start must not serve on it.
            if let Some(at) = kube.confirmed_at() {
                fencing.keeper().confirm(at);
            }
            Some(fencing)
        }
        None => AgentFencing::start(args, config.name(), &config.data_dir, fence, state)?,
    };
    if let Some(fencing) = &fencing {
        // Armed before the promotion is signalled, not when the monitor next looks.
        let keeper = fencing.keeper().clone();
        handle.on_promotion(Arc::new(move || keeper.activate()));
    }
    Ok(fencing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: Phase, intended_role: Role, pid: Option<u32>) -> SupervisorState {
        SupervisorState {
            phase,
            pid,
            ..SupervisorState::starting(intended_role, None)
        }
    }

    /// Hole 3: a stop marks the phase Stopped when it *begins*; a fast shutdown may take the
    /// stop timeout and then escalate to immediate. The lease is released only once the
    /// postmaster has exited, and only from a clean shutdown.
    #[test]
    fn a_stop_in_progress_does_not_release_the_lease() {
        let stopping = state(Phase::Stopped, Role::Primary, Some(4242));
        assert_ne!(
            fencing_state(&stopping),
            LocalPrimaryState::StoppedOnRequest,
            "the postmaster still runs: the lease must be kept (and renewed)"
        );
    }

    #[test]
    fn only_a_clean_stop_releases_the_lease() {
        let mut stopped = state(Phase::Stopped, Role::Primary, None);
        assert_eq!(fencing_state(&stopped), LocalPrimaryState::NotPrimary);
        stopped.clean_stop = true;
        assert_eq!(fencing_state(&stopped), LocalPrimaryState::StoppedOnRequest);
    }

    /// A restarted agent (a pod's container restart) does not renew while postgres starts;
    /// only a first primary's initdb does.
    #[test]
    fn only_a_new_data_directory_renews_during_the_start() {
        let mut starting = state(Phase::Starting, Role::Primary, None);
        assert_eq!(fencing_state(&starting), LocalPrimaryState::Restarting);
        starting.new_data_dir = true;
        assert_eq!(fencing_state(&starting), LocalPrimaryState::Bootstrapping);
    }

    #[test]
    fn a_signalled_promotion_is_a_serving_primary() {
        let mut promoting = state(Phase::Running, Role::Primary, Some(4242));
        promoting.promotion_pending = true;
        assert_eq!(fencing_state(&promoting), LocalPrimaryState::Serving);
    }
}
