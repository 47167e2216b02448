//! pgrs-router: read/write splitting for applications on a pgrs cluster.
//!
//! Skeleton: the routing library is built by its own issue.
