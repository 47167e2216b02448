//! The connection handed out by the router.

use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;

use deadpool_postgres::{ClientWrapper, Object};

use crate::error::RouterError;
use crate::lsn::{Lsn, WalToken};

/// A pooled connection chosen by the router. Dereferences to the deadpool client, so
/// `query`, `execute`, `prepare_cached` and `transaction` work as usual.
pub struct RoutedClient {
    pub(super) client: Object,
    pub(super) node: Arc<str>,
    pub(super) index: usize,
    pub(super) on_primary: bool,
}

impl RoutedClient {
    /// The endpoint this connection belongs to (`host:port`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the connection goes to the node the router currently writes to.
    pub fn is_primary(&self) -> bool {
        self.on_primary
    }

    /// The primary's WAL insert position, to call right after a write committed on this
    /// connection: its text form is the read-your-writes token for [`Consistency::Token`].
    pub async fn wal_token(&self) -> Result<WalToken, RouterError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|source| RouterError::Query {
                node: self.node.to_string(),
                source,
            })?;
        let text: String = row.try_get(0).map_err(|source| RouterError::Query {
            node: self.node.to_string(),
            source,
        })?;
        // The server always prints a valid pg_lsn; a parse failure would be a server bug.
        let lsn = Lsn::from_str(&text).unwrap_or(Lsn(u64::MAX));
        Ok(WalToken(lsn))
    }
}

impl Deref for RoutedClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl DerefMut for RoutedClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
    }
}
