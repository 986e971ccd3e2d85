//! fleetboot and the dnsmasq reference side by side through the same harness
//! (`fleetboot lab --compare`): alternate runs, median time to the marker, ratio.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::runner::{run, LabOptions, Mode, ServerKind};

/// The result of [`compare`].
#[derive(Clone, Debug)]
pub struct Comparison {
    pub vms: usize,
    pub mode: Mode,
    pub runs: usize,
    /// Every VM's time to the marker over all fleetboot runs.
    pub fleetboot: Vec<Duration>,
    /// The same for the dnsmasq reference.
    pub dnsmasq: Vec<Duration>,
    /// VMs that did not print the marker.
    pub fleetboot_failures: usize,
    pub dnsmasq_failures: usize,
    pub fleetboot_median: Option<Duration>,
    pub dnsmasq_median: Option<Duration>,
    /// fleetboot median / dnsmasq median (< 1 means fleetboot boots faster).
    pub ratio: Option<f64>,
}

/// The median of some durations (mean of the middle two for an even count).
pub fn median(v: &[Duration]) -> Option<Duration> {
    let mut s = v.to_vec();
    s.sort();
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2),
    }
}

/// Runs fleetboot (`opts.server` must be [`ServerKind::Fleetboot`]) and the dnsmasq
/// reference alternately `runs` times each with `opts.vms` VMs in `opts.mode`.
/// Boot failures are counted, not fatal; harness errors (setup) are returned.
pub fn compare(opts: &LabOptions, runs: usize) -> Result<Comparison> {
    if !matches!(opts.server, ServerKind::Fleetboot { .. }) {
        bail!("compare needs ServerKind::Fleetboot (the reference is run alongside)");
    }
    let mut c = Comparison {
        vms: opts.vms,
        mode: opts.mode,
        runs,
        fleetboot: Vec::new(),
        dnsmasq: Vec::new(),
        fleetboot_failures: 0,
        dnsmasq_failures: 0,
        fleetboot_median: None,
        dnsmasq_median: None,
        ratio: None,
    };
    for i in 0..runs {
        for server in [opts.server.clone(), ServerKind::DnsmasqReference] {
            let is_fb = matches!(server, ServerKind::Fleetboot { .. });
            let o = LabOptions {
                server,
                work_dir: opts.work_dir.as_ref().map(|d| {
                    d.join(format!(
                        "run{i}-{}",
                        if is_fb { "fleetboot" } else { "dnsmasq" }
                    ))
                }),
                ..opts.clone()
            };
            let r = run(o)?;
            let times = r.marker_times();
            let failures = r.vms.len() - times.len();
            if is_fb {
                c.fleetboot.extend(times);
                c.fleetboot_failures += failures;
            } else {
                c.dnsmasq.extend(times);
                c.dnsmasq_failures += failures;
            }
        }
    }
    c.fleetboot_median = median(&c.fleetboot);
    c.dnsmasq_median = median(&c.dnsmasq);
    if let (Some(f), Some(d)) = (c.fleetboot_median, c.dnsmasq_median) {
        c.ratio = Some(f.as_secs_f64() / d.as_secs_f64());
    }
    Ok(c)
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = |d: Option<Duration>| {
            d.map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into())
        };
        write!(
            f,
            "mode={} vms={} runs={}: fleetboot median {} (n={}, failures {}), dnsmasq median {} (n={}, failures {}), ratio fleetboot/dnsmasq {}",
            self.mode,
            self.vms,
            self.runs,
            m(self.fleetboot_median),
            self.fleetboot.len(),
            self.fleetboot_failures,
            m(self.dnsmasq_median),
            self.dnsmasq.len(),
            self.dnsmasq_failures,
            self.ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = Duration::from_secs;
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[s(3), s(1), s(2)]), Some(s(2)));
        assert_eq!(
            median(&[s(4), s(1), s(2), s(3)]),
            Some(Duration::from_millis(2500))
        );
    }
}
