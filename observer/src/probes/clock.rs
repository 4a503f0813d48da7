//! Kernel timestamps (CLOCK_BOOTTIME) to wall-clock time.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::record::BootNs;

fn now_ns(clock: libc::clockid_t) -> std::io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// CLOCK_BOOTTIME now, in the kernel programs' unit.
pub fn boot_now_ns() -> std::io::Result<BootNs> {
    now_ns(libc::CLOCK_BOOTTIME).map(|ns| ns as BootNs)
}

/// Converts `bpf_ktime_get_boot_ns()` stamps to [`SystemTime`] with the offset between
/// CLOCK_REALTIME and CLOCK_BOOTTIME measured when it was made. The wall clock can be stepped
/// later (NTP): make a new one from time to time in a long-running process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootClock {
    /// CLOCK_REALTIME minus CLOCK_BOOTTIME, nanoseconds.
    realtime_offset_ns: i128,
}

impl BootClock {
    /// Measures the offset now: the boot-time read is bracketed by two real-time reads,
    /// and the tightest of a few brackets wins.
    pub fn new() -> std::io::Result<Self> {
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let before = now_ns(libc::CLOCK_REALTIME)?;
            let boot = now_ns(libc::CLOCK_BOOTTIME)?;
            let after = now_ns(libc::CLOCK_REALTIME)?;
            let width = after - before;
            let offset = before + width / 2 - boot;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Ok(Self {
            realtime_offset_ns: best.map_or(0, |(_, offset)| offset),
        })
    }

    /// A clock with a known offset (CLOCK_REALTIME - CLOCK_BOOTTIME), for replays and tests.
    pub const fn with_offset_ns(realtime_offset_ns: i128) -> Self {
        Self { realtime_offset_ns }
    }

    /// CLOCK_REALTIME - CLOCK_BOOTTIME in nanoseconds: what exporters add to kernel stamps.
    pub const fn offset_ns(&self) -> i128 {
        self.realtime_offset_ns
    }

    /// Wall-clock time of a kernel stamp (clamped to the epoch, never panics).
    pub fn to_system_time(&self, boot_ns: BootNs) -> SystemTime {
        let unix_ns = i128::from(boot_ns) + self.realtime_offset_ns;
        let unix_ns = u64::try_from(unix_ns.max(0)).unwrap_or(u64::MAX);
        UNIX_EPOCH + Duration::from_nanos(unix_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_the_offset() {
        let clock = BootClock::with_offset_ns(1_700_000_000_000_000_000);
        assert_eq!(
            clock.to_system_time(5_000_000_000),
            UNIX_EPOCH + Duration::from_secs(1_700_000_005)
        );
        assert_eq!(BootClock::with_offset_ns(-10).to_system_time(3), UNIX_EPOCH);
    }

    #[test]
    fn a_fresh_kernel_stamp_maps_to_about_now() {
        let clock = BootClock::new().unwrap();
        let stamp = boot_now_ns().unwrap();
        let now = SystemTime::now();
        let mapped = clock.to_system_time(stamp);
        let skew = now.duration_since(mapped).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(50), "skew {skew:?}");
    }
}
