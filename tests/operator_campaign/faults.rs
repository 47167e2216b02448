//! The campaign's faults: what a round may break, the seeded draw of a round's fault, and the
//! guard that undoes it (cuts healed, stopped control-plane components started again) — on
//! `heal`, or on drop when the round fails.

use std::net::Ipv4Addr;
use std::time::Duration;

use pgrs_testbed::TestBed;
use pgrs_testbed::control_plane::Restartable;
use pgrs_testbed::faults::{Direction, Peer, PodNet};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The agent port the operator polls (`Peer::HostPort(AGENT_PORT)` cuts the operator alone).
const AGENT_PORT: u16 = pgrs::api::names::AGENT_PORT;
/// A round's fault lasts this long at least, and at most `MAX_HOLD`.
pub const MIN_HOLD: Duration = Duration::from_secs(3);
pub const MAX_HOLD: Duration = Duration::from_secs(20);

/// The five faults of issue 13's campaign (numbered as there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// 1. The current primary cut from the API server only.
    PrimaryFromApi,
    /// 2. The operator cut from the primary's agent (`Peer::HostPort(8008)`).
    OperatorFromPrimary,
    /// 3. The primary cut from both replicas only.
    PrimaryFromReplicas,
    /// 4. The primary cut from everyone.
    PrimaryFromEveryone,
    /// 5. kube-apiserver and etcd stopped; the database is healthy.
    ControlPlaneDown,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::PrimaryFromApi,
        Kind::OperatorFromPrimary,
        Kind::PrimaryFromReplicas,
        Kind::PrimaryFromEveryone,
        Kind::ControlPlaneDown,
    ];

    /// Its number in issue 13's list.
    pub fn number(self) -> u8 {
        match self {
            Kind::PrimaryFromApi => 1,
            Kind::OperatorFromPrimary => 2,
            Kind::PrimaryFromReplicas => 3,
            Kind::PrimaryFromEveryone => 4,
            Kind::ControlPlaneDown => 5,
        }
    }

    pub fn from_number(n: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.number() == n)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::PrimaryFromApi => "primary cut from the API server",
            Kind::OperatorFromPrimary => "operator cut from the primary's agent",
            Kind::PrimaryFromReplicas => "primary cut from both replicas",
            Kind::PrimaryFromEveryone => "primary cut from everyone",
            Kind::ControlPlaneDown => "kube-apiserver and etcd stopped",
        }
    }
}

/// One round's fault, as drawn.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub kind: Kind,
    pub hold: Duration,
    /// The cut's direction (faults 1–4); for fault 5, `Inbound` means "kube-apiserver stopped
    /// first", anything else "etcd first".
    pub direction: Direction,
}

impl Fault {
    /// E.g. "4 primary cut from everyone (inbound)" or "5 … (etcd first)".
    pub fn label(&self) -> String {
        let how = match (self.kind, self.direction) {
            (Kind::ControlPlaneDown, Direction::Inbound) => "kube-apiserver first".to_string(),
            (Kind::ControlPlaneDown, _) => "etcd first".to_string(),
            (_, Direction::Both) => "both ways".to_string(),
            (_, direction) => direction.to_string(),
        };
        format!("{} {} ({how})", self.kind.number(), self.kind.describe())
    }

    /// The components in the order they are stopped (fault 5).
    pub fn stop_order(&self) -> [Restartable; 2] {
        match self.direction {
            Direction::Inbound => [Restartable::KubeApiserver, Restartable::Etcd],
            _ => [Restartable::Etcd, Restartable::KubeApiserver],
        }
    }
}

/// The seeded sequence of faults. Kinds come from a bag refilled and shuffled whenever it is
/// empty, so that every kind occurs equally often (and a short sample has distinct kinds);
/// every round draws its kind, then its hold, then its direction, so a campaign of `n` rounds
/// is a prefix of a longer one with the same seed and kinds.
pub struct Plan {
    rng: StdRng,
    kinds: Vec<Kind>,
    bag: Vec<Kind>,
}

impl Plan {
    pub fn new(seed: u64, kinds: Vec<Kind>) -> Plan {
        assert!(!kinds.is_empty(), "no fault kind to draw from");
        Plan {
            rng: StdRng::seed_from_u64(seed),
            kinds,
            bag: Vec::new(),
        }
    }

    pub fn next_fault(&mut self) -> Fault {
        if self.bag.is_empty() {
            self.bag = self.kinds.clone();
            self.bag.shuffle(&mut self.rng);
        }
        let kind = self.bag.pop().expect("a refilled bag");
        let hold = Duration::from_millis(
            self.rng
                .random_range(MIN_HOLD.as_millis() as u64..=MAX_HOLD.as_millis() as u64),
        );
        let direction = [Direction::Inbound, Direction::Outbound, Direction::Both]
            [self.rng.random_range(0..3usize)];
        Fault {
            kind,
            hold,
            direction,
        }
    }
}

/// What a fault broke, undone by `heal` or on drop (also when the round panics): every cut of
/// the pods it touched healed, every stopped component started again (etcd first).
pub struct FaultGuard {
    bed: &'static TestBed,
    nets: Vec<PodNet>,
    stopped: Vec<Restartable>,
}

impl FaultGuard {
    /// Applies `fault` to the cluster whose primary is `primary` (pod network `primary_net`)
    /// and whose replicas have the IPs `replica_ips`.
    pub async fn apply(
        bed: &'static TestBed,
        fault: &Fault,
        primary_net: PodNet,
        replica_ips: &[Ipv4Addr],
    ) -> FaultGuard {
        let mut guard = FaultGuard {
            bed,
            nets: Vec::new(),
            stopped: Vec::new(),
        };
        let peers: Vec<Peer> = match fault.kind {
            Kind::PrimaryFromApi => vec![Peer::ApiServer],
            Kind::OperatorFromPrimary => vec![Peer::HostPort(AGENT_PORT)],
            Kind::PrimaryFromReplicas => replica_ips.iter().map(|ip| Peer::Ip(*ip)).collect(),
            Kind::PrimaryFromEveryone => vec![Peer::Everyone],
            Kind::ControlPlaneDown => {
                for component in fault.stop_order() {
                    // Recorded first: a stop that fails half-way is still started again.
                    guard.stopped.push(component);
                    bed.stop_component(component)
                        .await
                        .unwrap_or_else(|e| panic!("stop {component}: {e}"));
                }
                Vec::new()
            }
        };
        if !peers.is_empty() {
            guard.nets.push(primary_net.clone());
            for peer in peers {
                primary_net
                    .cut(peer, fault.direction)
                    .unwrap_or_else(|e| panic!("cut {peer:?}: {e}"));
            }
        }
        guard
    }

    /// Heals every cut and starts every stopped component (etcd before kube-apiserver: its
    /// start waits for the API server's `/readyz` only when that one runs).
    pub async fn heal(mut self) {
        for net in std::mem::take(&mut self.nets) {
            net.heal_all()
                .unwrap_or_else(|e| panic!("heal {}: {e}", net.pod()));
        }
        for component in start_order(std::mem::take(&mut self.stopped)) {
            self.bed
                .start_component(component)
                .await
                .unwrap_or_else(|e| panic!("start {component}: {e}"));
        }
    }
}

fn start_order(mut stopped: Vec<Restartable>) -> Vec<Restartable> {
    stopped.sort_by_key(|c| match c {
        Restartable::Etcd => 0,
        Restartable::KubeApiserver => 1,
    });
    stopped.dedup();
    stopped
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        for net in self.nets.drain(..) {
            if let Err(e) = net.heal_all() {
                eprintln!("heal {}: {e}", net.pod());
            }
        }
        let stopped = start_order(std::mem::take(&mut self.stopped));
        if stopped.is_empty() {
            return;
        }
        // Drop cannot await: start them from a thread of its own with a runtime of its own,
        // which works whatever runtime (if any) drops the guard.
        let bed = self.bed;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to restart the control plane");
                runtime.block_on(async {
                    for component in stopped {
                        if let Err(e) = bed.start_component(component).await {
                            eprintln!("start {component} after a failed round: {e}");
                        }
                    }
                });
            });
        });
    }
}
