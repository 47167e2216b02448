//! In-process lease store, optionally persisted to a JSON file so that a restarted local
//! controller keeps the holder and never reuses a version.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::lease::{LeaseError, LeaseRecord, LeaseStore};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    record: LeaseRecord,
    counter: u64,
}

pub struct MemoryLeaseStore {
    state: Mutex<Stored>,
    persist_to: Option<PathBuf>,
}

impl MemoryLeaseStore {
    /// A fresh, unheld lease kept in memory only.
    pub fn new(duration: Duration) -> Self {
        MemoryLeaseStore {
            state: Mutex::new(Stored {
                record: LeaseRecord {
                    holder: None,
                    version: "1".to_string(),
                    duration,
                    renewed_at: None,
                    transitions: 0,
                    incarnation: None,
                    failsafe_members: None,
                },
                counter: 1,
            }),
            persist_to: None,
        }
    }

    /// A lease persisted to `path`: loaded from it when it exists (the stored duration is
    /// replaced by `duration`), written on every change.
    pub fn persistent(path: &Path, duration: Duration) -> Result<Self, LeaseError> {
        let persist_error = |source| LeaseError::Persist {
            path: path.display().to_string(),
            source,
        };
        let mut state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<Stored>(&bytes).map_err(|e| {
                persist_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::new(duration).snapshot_stored()
            }
            Err(e) => return Err(persist_error(e)),
        };
        state.record.duration = duration;
        let store = MemoryLeaseStore {
            state: Mutex::new(state),
            persist_to: Some(path.to_path_buf()),
        };
        Ok(store)
    }

    fn snapshot_stored(&self) -> Stored {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        // A panic while holding the lock cannot leave a half-written record (writes are
        // single assignments), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn persist(&self, stored: &Stored) -> Result<(), LeaseError> {
        let Some(path) = &self.persist_to else {
            return Ok(());
        };
        let persist_error = |source| LeaseError::Persist {
            path: path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(stored)
            .map_err(|e| persist_error(std::io::Error::other(e)))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(persist_error)?;
        std::fs::rename(&tmp, path).map_err(persist_error)
    }

    /// Apply `change` to the record (when it returns Ok), bump the version and persist.
    fn update(
        &self,
        change: impl FnOnce(&mut LeaseRecord) -> Result<(), LeaseError>,
    ) -> Result<LeaseRecord, LeaseError> {
        let mut stored = self.lock();
        let mut next = stored.clone();
        change(&mut next.record)?;
        next.counter += 1;
        next.record.version = next.counter.to_string();
        next.record.renewed_at = Some(chrono::Utc::now());
        // Persist before answering: a renewal acknowledged but lost by a restart would let the
        // holder believe in a lease that observers time from an older version.
        self.persist(&next)?;
        *stored = next;
        Ok(stored.record.clone())
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn get(&self) -> BoxFuture<'_, Result<LeaseRecord, LeaseError>> {
        let record = self.lock().record.clone();
        Box::pin(async move { Ok(record) })
    }

    fn renew<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let result = self.update(|record| {
            if record.holder.as_deref() != Some(holder) {
                return Err(LeaseError::NotHolder {
                    requester: holder.to_string(),
                    current: Box::new(record.clone()),
                });
            }
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        expected_version: &'a str,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let result = self.update(|record| {
            if record.version != expected_version {
                return Err(LeaseError::Conflict {
                    expected: expected_version.to_string(),
                    current: Box::new(record.clone()),
                });
            }
            if record.holder.as_deref() != Some(holder) {
                record.transitions += 1;
            }
            record.holder = Some(holder.to_string());
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let result = self.update(|record| {
            if record.holder.as_deref() != Some(holder) {
                return Err(LeaseError::NotHolder {
                    requester: holder.to_string(),
                    current: Box::new(record.clone()),
                });
            }
            record.holder = None;
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn set_failsafe_members<'a>(
        &'a self,
        holder: &'a str,
        members: Option<Vec<String>>,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        let result = self.update(|record| {
            if record.holder.as_deref() != Some(holder) {
                return Err(LeaseError::NotHolder {
                    requester: holder.to_string(),
                    current: Box::new(record.clone()),
                });
            }
            record.failsafe_members = members;
            Ok(())
        });
        Box::pin(async move { result })
    }
}
