//! Secrets that change while the agent runs (a rotated password or agent token): the current
//! value and, for [`ROTATION_WINDOW`] after the agent saw the change, the previous one.
//!
//! - The agent token: both values are accepted during the window, so a caller that still holds
//!   the old token (the operator between two reconciles, the other agents whose kubelet has not
//!   refreshed the Secret volume yet) never gets a 401.
//! - A password: connections try the current value and, refused, the previous one (the role's
//!   password is changed on the primary a moment after the files changed).
//!
//! [`Rotation`] is the pure part (time passed in); [`RotatingSecret`] shares one between tasks.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::agent::instance::Secret;

/// How long the previous value of a rotated secret stays valid after the change was seen.
pub const ROTATION_WINDOW: Duration = Duration::from_secs(300);

/// A secret's current value and the previous one with the instant it was replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct Rotation {
    current: Secret,
    previous: Option<(Secret, Instant)>,
}

impl Rotation {
    pub fn new(current: Secret) -> Self {
        Rotation {
            current,
            previous: None,
        }
    }

    pub fn current(&self) -> &Secret {
        &self.current
    }

    /// Replaces the current value by `new` (seen at `now`); `false` when it is the same value.
    pub fn rotate(&mut self, new: Secret, now: Instant) -> bool {
        if new == self.current {
            return false;
        }
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some((old, now));
        true
    }

    /// The previous value while it is still within [`ROTATION_WINDOW`] of the change.
    pub fn previous(&self, now: Instant) -> Option<&Secret> {
        self.previous
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < ROTATION_WINDOW)
            .map(|(secret, _)| secret)
    }

    /// Whether `given` is the current value, or the previous one within the window. Both are
    /// compared in constant time, whatever matches.
    pub fn accepts(&self, given: &[u8], now: Instant) -> bool {
        let current = tokens_match(given, self.current.expose().as_bytes());
        let previous = self
            .previous(now)
            .is_some_and(|previous| tokens_match(given, previous.expose().as_bytes()));
        current | previous
    }
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("rotated_at", &self.previous.as_ref().map(|(_, at)| at))
            .finish_non_exhaustive()
    }
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from timings.
pub fn tokens_match(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// A [`Rotation`] shared by the tasks of the agent (clones see the same value); the secret
/// file watcher rotates it, everything else reads it.
#[derive(Clone)]
pub struct RotatingSecret(Arc<RwLock<Rotation>>);

impl RotatingSecret {
    pub fn new(current: Secret) -> Self {
        RotatingSecret(Arc::new(RwLock::new(Rotation::new(current))))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Rotation> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn current(&self) -> Secret {
        self.read().current().clone()
    }

    /// The previous value while within [`ROTATION_WINDOW`].
    pub fn previous(&self) -> Option<Secret> {
        self.read().previous(Instant::now()).cloned()
    }

    /// Sets a new value; `false` when it did not change.
    pub fn rotate(&self, new: Secret) -> bool {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .rotate(new, Instant::now())
    }

    pub fn accepts(&self, given: &[u8]) -> bool {
        self.read().accepts(given, Instant::now())
    }
}

impl std::fmt::Debug for RotatingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotatingSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(!tokens_match(b"abd", b"abc"));
        assert!(!tokens_match(b"ab", b"abc"));
    }

    #[test]
    fn the_same_value_is_no_rotation() {
        let start = Instant::now();
        let mut rotation = Rotation::new(Secret::new("old"));
        assert!(!rotation.rotate(Secret::new("old"), start));
        assert_eq!(rotation.previous(start), None);
        assert!(rotation.accepts(b"old", start));
        assert!(!rotation.accepts(b"new", start));
    }

    #[test]
    fn both_tokens_are_accepted_within_the_window_only() {
        let start = Instant::now();
        let mut rotation = Rotation::new(Secret::new("old"));
        assert!(rotation.rotate(Secret::new("new"), start));
        assert_eq!(rotation.current().expose(), "new");
        let inside = start + ROTATION_WINDOW - Duration::from_secs(1);
        assert!(rotation.accepts(b"new", inside));
        assert!(rotation.accepts(b"old", inside));
        assert_eq!(rotation.previous(inside).map(Secret::expose), Some("old"));
        assert!(!rotation.accepts(b"other", inside));
        let after = start + ROTATION_WINDOW;
        assert!(rotation.accepts(b"new", after));
        assert!(!rotation.accepts(b"old", after), "the window is bounded");
        assert_eq!(rotation.previous(after), None);
    }

    #[test]
    fn a_second_rotation_forgets_the_first_value() {
        let start = Instant::now();
        let mut rotation = Rotation::new(Secret::new("one"));
        rotation.rotate(Secret::new("two"), start);
        let later = start + Duration::from_secs(10);
        rotation.rotate(Secret::new("three"), later);
        assert!(!rotation.accepts(b"one", later));
        assert!(rotation.accepts(b"two", later));
        assert!(rotation.accepts(b"three", later));
        // The window counts from the last change.
        assert!(rotation.accepts(b"two", later + ROTATION_WINDOW - Duration::from_secs(1)));
    }

    #[test]
    fn shared_values_are_seen_by_every_clone_and_never_printed() {
        let secret = RotatingSecret::new(Secret::new("old"));
        let clone = secret.clone();
        assert!(secret.rotate(Secret::new("new")));
        assert_eq!(clone.current().expose(), "new");
        assert_eq!(
            clone.previous().map(|s| s.expose().to_string()),
            Some("old".into())
        );
        assert_eq!(format!("{clone:?}"), "RotatingSecret(<redacted>)");
        assert!(!format!("{:?}", Rotation::new(Secret::new("hunter2"))).contains("hunter2"));
    }
}
