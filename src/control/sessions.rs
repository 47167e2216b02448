//! Superuser sessions to the instances' postgres, kept between uses: a SCRAM handshake per
//! statement would sit on the switchover path. A kept session that fails (postgres restarted
//! since) is dropped and the statements are retried once on a new one; a statement's own error
//! is not retried.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_postgres::Client;

use crate::postgres::probe::{ConnectTarget, connect};
use crate::postgres::{promote, sql};

use super::platform::{CallError, InstanceSql};

/// How long opening a session may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Inner {
    targets: HashMap<String, ConnectTarget>,
    sessions: HashMap<String, (ConnectTarget, Arc<Client>)>,
    warming: BTreeSet<String>,
}

/// Kept sessions per instance. Cheap to clone.
#[derive(Clone, Default)]
pub struct SessionPool {
    inner: Arc<Mutex<Inner>>,
}

impl SessionPool {
    pub fn new(targets: HashMap<String, ConnectTarget>) -> Self {
        let pool = SessionPool::default();
        pool.set_targets(targets);
        pool
    }

    /// Where each instance is reached now (pod IPs change); a kept session to an old address
    /// is dropped.
    pub fn set_targets(&self, targets: HashMap<String, ConnectTarget>) {
        let mut inner = lock(&self.inner);
        inner
            .sessions
            .retain(|name, (target, _)| targets.get(name) == Some(target));
        inner.targets = targets;
    }

    fn target(&self, instance: &str) -> Result<ConnectTarget, CallError> {
        lock(&self.inner)
            .targets
            .get(instance)
            .cloned()
            .ok_or_else(|| CallError::Gone(format!("{instance} has no postgres address")))
    }

    fn kept(&self, instance: &str) -> Option<Arc<Client>> {
        lock(&self.inner)
            .sessions
            .get(instance)
            .filter(|(_, c)| !c.is_closed())
            .map(|(_, c)| c.clone())
    }

    async fn open(&self, instance: &str) -> Result<Arc<Client>, CallError> {
        let target = self.target(instance)?;
        let client = Arc::new(
            connect(&target, CONNECT_TIMEOUT)
                .await
                .map_err(|e| CallError::Failed(e.to_string()))?,
        );
        let mut inner = lock(&self.inner);
        // A session opened meanwhile wins; the target may have moved meanwhile too.
        if inner.targets.get(instance) == Some(&target) {
            inner
                .sessions
                .insert(instance.to_string(), (target, client.clone()));
        }
        Ok(client)
    }

    fn forget(&self, instance: &str) {
        lock(&self.inner).sessions.remove(instance);
    }

    /// Runs `work` on the kept session to `instance`, or on a new one when the kept one failed
    /// (a statement's own error is not retried).
    pub async fn run<F, T, E>(&self, instance: &str, work: F) -> Result<T, CallError>
    where
        F: for<'c> Fn(&'c Client) -> BoxFuture<'c, Result<T, E>> + Send + Sync,
        E: std::error::Error + 'static,
    {
        if let Some(client) = self.kept(instance) {
            match work(&client).await {
                Ok(value) => return Ok(value),
                Err(error) if sql::statement_failed(&error) => {
                    return Err(CallError::Failed(error.to_string()));
                }
                Err(error) => {
                    tracing::debug!(instance, %error, "kept session failed; reconnecting");
                    self.forget(instance);
                }
            }
        }
        let client = self.open(instance).await?;
        work(&client).await.map_err(|error| {
            if !sql::statement_failed(&error) {
                self.forget(instance);
            }
            CallError::Failed(error.to_string())
        })
    }
}

impl InstanceSql for SessionPool {
    fn checkpoint<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(self.run(instance, |client| Box::pin(promote::checkpoint(client))))
    }

    fn set_synchronous_standby_names<'a>(
        &'a self,
        instance: &'a str,
        names: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        let names = names.to_string();
        Box::pin(self.run(instance, move |client| {
            let names = names.clone();
            Box::pin(async move { sql::set_synchronous_standby_names(client, &names).await })
        }))
    }

    fn warm(&self, instance: &str) {
        {
            let mut inner = lock(&self.inner);
            let kept = inner
                .sessions
                .get(instance)
                .is_some_and(|(_, c)| !c.is_closed());
            if kept || !inner.warming.insert(instance.to_string()) {
                return;
            }
        }
        let pool = self.clone();
        let instance = instance.to_string();
        tokio::spawn(async move {
            if let Err(error) = pool.open(&instance).await {
                tracing::debug!(%instance, %error, "could not open a session ahead");
            }
            lock(&pool.inner).warming.remove(&instance);
        });
    }
}
