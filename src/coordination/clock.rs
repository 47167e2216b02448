//! Fencing time. A lease observer on another machine keeps counting while this machine is
//! suspended (a paused VM, a laptop lid), so a fencing deadline must too: CLOCK_MONOTONIC (the
//! clock of tokio's timers) stops during a suspend, CLOCK_BOOTTIME does not. A [`FenceInstant`]
//! carries both readings; a deadline has passed as soon as it has on either clock (tokio's keeps
//! tests with a paused clock deterministic, the boot clock covers suspended time).

use std::time::Duration;

use tokio::time::Instant;

/// CLOCK_BOOTTIME since boot (counts suspended time).
fn boot_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux ≥ 2.6.39.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if result != 0 {
        // Cannot happen on Linux; the tokio reading still bounds every deadline.
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An instant on both the tokio (monotonic) clock and the boot clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceInstant {
    tokio: Instant,
    boot: Duration,
}

impl FenceInstant {
    pub fn now() -> Self {
        FenceInstant {
            tokio: Instant::now(),
            boot: boot_time(),
        }
    }

    /// The tokio reading, for timers.
    pub fn tokio(self) -> Instant {
        self.tokio
    }

    /// Time left until `self` on the clock that has advanced more (zero once passed).
    pub fn remaining(self) -> Duration {
        let now = FenceInstant::now();
        self.tokio
            .saturating_duration_since(now.tokio)
            .min(self.boot.saturating_sub(now.boot))
    }

    pub fn has_passed(self) -> bool {
        self.remaining().is_zero()
    }

    /// Time since `self`, on the clock that has advanced more.
    pub fn elapsed(self) -> Duration {
        let now = FenceInstant::now();
        now.tokio
            .saturating_duration_since(self.tokio)
            .max(now.boot.saturating_sub(self.boot))
    }

    /// Whether `self` is later than `other` (on the tokio clock; both advance together).
    pub fn is_after(self, other: FenceInstant) -> bool {
        self.tokio > other.tokio
    }
}

impl FenceInstant {
    /// `duration` before `self` (as far back as both clocks reach).
    pub fn earlier_by(self, duration: Duration) -> FenceInstant {
        FenceInstant {
            tokio: self.tokio.checked_sub(duration).unwrap_or(self.tokio),
            boot: self.boot.saturating_sub(duration),
        }
    }
}

impl std::ops::Add<Duration> for FenceInstant {
    type Output = FenceInstant;

    fn add(self, duration: Duration) -> FenceInstant {
        FenceInstant {
            tokio: self.tokio + duration,
            boot: self.boot + duration,
        }
    }
}
