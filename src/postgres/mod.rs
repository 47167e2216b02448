//! postgres layer (see docs/architecture.md).
