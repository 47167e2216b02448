//! coordination layer (see docs/architecture.md).
