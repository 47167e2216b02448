//! Test bed: a real Kubernetes control plane for tests.
