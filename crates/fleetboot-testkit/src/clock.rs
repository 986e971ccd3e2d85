use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Simulated time: a base [`Instant`] plus an offset that only the simulation moves.
///
/// Protocol timers use [`SimClock::now`]. Machines that keep wall-clock time (DHCP lease
/// expiry is persisted as Unix seconds) read [`SimClock::unix_secs`], which follows the
/// simulated time and can also be stepped on its own with [`SimClock::step_wall`], the way
/// an NTP correction moves the wall clock but not the monotonic one.
#[derive(Debug, Clone)]
pub struct SimClock {
    base: Instant,
    offset: Duration,
    /// Wall-clock time at `base`, in nanoseconds since the Unix epoch.
    wall_base_ns: i128,
}

/// The wall clock a simulation starts at unless told: 2025-01-01T00:00:00Z, a fixed
/// moment so that runs are identical whatever day they run.
pub const DEFAULT_WALL_START: u64 = 1_735_689_600;

impl Default for SimClock {
    fn default() -> Self {
        SimClock::new()
    }
}

impl SimClock {
    /// Starts now (only as an anchor: time moves when the simulation says).
    pub fn new() -> SimClock {
        SimClock::at(Instant::now())
    }

    pub fn at(base: Instant) -> SimClock {
        SimClock { base, offset: Duration::ZERO, wall_base_ns: i128::from(DEFAULT_WALL_START) * 1_000_000_000 }
    }

    /// Sets the wall clock at the current instant to `unix_secs`.
    pub fn with_wall(mut self, unix_secs: u64) -> SimClock {
        self.wall_base_ns = i128::from(unix_secs) * 1_000_000_000 - self.offset.as_nanos() as i128;
        self
    }

    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.offset
    }

    /// Moves time forward by `d`: a tick, or a jump (a host that was suspended wakes with
    /// every timer overdue).
    pub fn advance(&mut self, d: Duration) {
        self.offset += d;
    }

    /// Moves time forward to `t`; never backwards.
    pub fn advance_to(&mut self, t: Instant) {
        if let Some(d) = t.checked_duration_since(self.now()) {
            self.offset += d;
        }
    }

    /// Steps the wall clock by `secs` (negative: backwards) without moving [`SimClock::now`].
    pub fn step_wall(&mut self, secs: i64) {
        self.wall_base_ns += i128::from(secs) * 1_000_000_000;
    }

    fn wall_ns(&self) -> i128 {
        self.wall_base_ns + self.offset.as_nanos() as i128
    }

    /// Wall-clock time in Unix seconds (0 before the epoch).
    pub fn unix_secs(&self) -> u64 {
        u64::try_from(self.wall_ns().div_euclid(1_000_000_000)).unwrap_or(0)
    }

    /// Wall-clock time in Unix milliseconds (0 before the epoch).
    pub fn unix_ms(&self) -> u64 {
        u64::try_from(self.wall_ns().div_euclid(1_000_000)).unwrap_or(0)
    }

    /// Wall-clock time as a [`SystemTime`].
    pub fn system_time(&self) -> SystemTime {
        let ns = self.wall_ns().max(0) as u128;
        UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_wall_move_together_until_the_wall_is_stepped() {
        let mut c = SimClock::new().with_wall(1_000);
        let t0 = c.now();
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
        assert_eq!((c.unix_secs(), c.unix_ms()), (1_001, 1_001_500));
        c.advance_to(t0); // never backwards
        assert_eq!(c.elapsed(), Duration::from_millis(1500));
        c.step_wall(-3_600);
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
        assert_eq!(c.unix_secs(), 0, "before the epoch reads as 0");
        c.step_wall(7_200);
        assert_eq!(c.unix_secs(), 4_601);
        assert_eq!(c.system_time(), UNIX_EPOCH + Duration::from_millis(4_601_500));
        assert_eq!(SimClock::new().unix_secs(), DEFAULT_WALL_START);
    }
}
