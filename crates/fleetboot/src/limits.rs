//! Process-wide limits and the helpers every bound uses.
//!
//! - [`raise_fd_limit`]: every role starts by raising its soft `RLIMIT_NOFILE` to the hard
//!   limit (sockets, open files and SQLite all share it) and says what it got.
//! - [`Throttle`]: a log line that is written at most once per interval, with the count of
//!   the occurrences it stood for, so a flood that hits a bound is logged, not echoed.
//! - [`is_out_of_fds`]: whether an error is the process or the system out of descriptors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The descriptor limits the process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current `RLIMIT_NOFILE`.
pub fn fd_limit() -> Option<FdLimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    // rlim_t is u64 on 64-bit Linux, narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    Some(FdLimit { soft: r.rlim_cur as u64, hard: r.rlim_max as u64 })
}

/// Raises the soft descriptor limit to the hard one (the default soft limit, 1024, is
/// what a few hundred TFTP transfers and NBD connections exhaust) and logs what was granted
/// (at info level for a long-running role, debug otherwise). Returns the limit in force.
pub fn raise_fd_limit(long_running: bool) -> Option<FdLimit> {
    let before = fd_limit()?;
    if before.soft < before.hard {
        let r = libc::rlimit { rlim_cur: before.hard as libc::rlim_t, rlim_max: before.hard as libc::rlim_t };
        // SAFETY: setrlimit reads one rlimit from the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(soft = before.soft, hard = before.hard, error = %e, "could not raise the open file limit");
        }
    }
    let now = fd_limit()?;
    metrics::gauge!("fleetboot_fd_limit").set(now.soft as f64);
    if long_running {
        tracing::info!(soft = now.soft, hard = now.hard, was = before.soft, "open file limit (RLIMIT_NOFILE)");
    } else {
        tracing::debug!(soft = now.soft, hard = now.hard, was = before.soft, "open file limit (RLIMIT_NOFILE)");
    }
    Some(now)
}

/// Descriptors open in this process now (`/proc/self/fd`), for the metrics.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Whether `e` means no descriptor was left (EMFILE: this process; ENFILE: the system),
/// also when it wraps the OS error with what was being done (`fleetboot_net`'s socket
/// errors do).
pub fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
        || e.get_ref()
            .and_then(|inner| inner.source())
            .and_then(|os| os.downcast_ref::<std::io::Error>())
            .is_some_and(is_out_of_fds)
}

/// Whether any error in `e`'s chain is [`is_out_of_fds`].
pub fn chain_out_of_fds(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(is_out_of_fds))
}

/// A log line written at most once per `every`: [`Throttle::ready`] says when, and how
/// many occurrences were not logged since the last time.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

/// How often a bound that keeps being hit is logged again.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, last: Mutex::new(None), skipped: AtomicU64::new(0) }
    }

    /// `Some(skipped)` when this occurrence should be logged (the first one, then once per
    /// interval), with the number of occurrences since the last line; `None` otherwise.
    pub fn ready(&self) -> Option<u64> {
        self.ready_at(Instant::now())
    }

    fn ready_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.skipped.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_descriptors_is_seen_through_a_wrapped_error() {
        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "socket: {}", self.0)
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrap = |code| std::io::Error::other(Wrapped(std::io::Error::from_raw_os_error(code)));
        assert!(is_out_of_fds(&std::io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_fds(&wrap(libc::EMFILE)));
        assert!(is_out_of_fds(&wrap(libc::ENFILE)));
        assert!(!is_out_of_fds(&wrap(libc::EADDRINUSE)));
        assert!(chain_out_of_fds(&anyhow::Error::from(wrap(libc::EMFILE)).context("TFTP transfer")));
    }

    #[test]
    fn throttle_logs_once_per_interval_with_the_count_skipped() {
        let t = Throttle::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(t.ready_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.ready_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.ready_at(t0 + Duration::from_secs(30)), Some(5));
        assert_eq!(t.ready_at(t0 + Duration::from_secs(31)), None);
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let got = raise_fd_limit(false).unwrap();
        assert_eq!(got.soft, got.hard);
        assert!(open_fds().unwrap() > 0);
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_out_of_fds(&emfile));
        assert!(chain_out_of_fds(&anyhow::Error::from(emfile).context("binding")));
        assert!(!is_out_of_fds(&std::io::Error::from_raw_os_error(libc::EACCES)));
    }
}
