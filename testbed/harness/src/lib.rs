//! Test bed: a real Kubernetes control plane for tests.
//!
//! Real etcd, kube-apiserver and kube-controller-manager (built by `testbed/build.sh`)
//! on loopback ports, plus a fake kubelet that runs pods as local processes in their
//! own network namespaces. See docs/testing.md.

pub mod bins;
pub mod control_plane;
pub mod faults;
pub mod kubelet;
pub mod network;
pub mod node;
pub mod pki;
pub mod process;
pub mod real_cluster;
pub mod testbed;
pub mod wait;

pub use testbed::{TestBed, TestBedError, TestBedOptions, TestNamespace, shared};
