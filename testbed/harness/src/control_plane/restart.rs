//! Stopping and starting etcd and kube-apiserver of a running control plane, for
//! outage tests (see `crate::faults`). A restarted component runs the very same
//! command line: same ports, data directory, certificates and service-account keys,
//! so existing clients (kube-rs, kubectl, kube-controller-manager, the fake kubelet,
//! pods) reconnect by themselves.

use std::time::Duration;

use super::{ControlPlane, ProcessError};

/// A control-plane component that tests may stop and start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Restartable {
    Etcd,
    KubeApiserver,
}

impl std::fmt::Display for Restartable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Restartable::Etcd => "etcd",
            Restartable::KubeApiserver => "kube-apiserver",
        })
    }
}

impl ControlPlane {
    fn component_mut(&mut self, which: Restartable) -> &mut crate::process::Component {
        match which {
            Restartable::Etcd => &mut self.etcd,
            Restartable::KubeApiserver => &mut self.apiserver,
        }
    }

    /// Stops `which` (SIGTERM to its process group, `grace`, then SIGKILL). Nothing
    /// else is touched: pods, the kubelet and the other components keep running.
    /// Idempotent.
    pub fn stop_component(&mut self, which: Restartable, grace: Duration) {
        self.component_mut(which).stop(grace);
    }

    /// Starts `which` again with its original command line, unless it runs. Does not
    /// wait for readiness. The process dies with the calling thread
    /// (`PR_SET_PDEATHSIG`), so call this on a thread that lives as long as the bed.
    pub fn start_component(&mut self, which: Restartable) -> Result<(), ProcessError> {
        if self.component_mut(which).running() {
            return Ok(());
        }
        let spec = match which {
            Restartable::Etcd => &self.etcd_spec,
            Restartable::KubeApiserver => &self.apiserver_spec,
        };
        let component = spec.start()?;
        *self.component_mut(which) = component;
        Ok(())
    }

    /// True while `which` is started and has not exited.
    pub fn component_running(&mut self, which: Restartable) -> bool {
        self.component_mut(which).running()
    }

    /// The tail of `which`'s log.
    pub fn component_log_tail(&mut self, which: Restartable, lines: usize) -> String {
        self.component_mut(which).log_tail(lines)
    }

    /// `http://127.0.0.1:<port>`: etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }
}
