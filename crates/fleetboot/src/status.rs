//! Live status of the roles that run beside `fleetboot serve`, for its dashboard: what a
//! stream session, a boot negotiator or a multicast file server is doing right now.
//!
//! Each of those processes (`fleetboot stream serve`, `fleetboot negotiate`, `fleetboot
//! files`, or the negotiator and file server inside `fleetboot serve`) writes one small JSON
//! report, `data_dir/status/<role>-<pid>.json`, when what it reports changed and at most
//! once a second ([`Writer`]); the dashboard reads the directory with its other panels,
//! at most every 2 s for all viewers ([`read_reports`]). The roles share `data_dir` when
//! they run on one host from one config, as the packaged units do.
//!
//! Why files and not a listener: a report only says what a process already logs, and the
//! directory is as private as the store next to it (0700, reports 0600, written by a
//! rename so a reader never sees half of one). Whoever could forge a report could already
//! change the store; no port is opened and nothing here can change what a process does.
//!
//! A report of a process that ended is shown, marked ended, for [`ENDED_SHOWN_MS`] (a
//! finished stream session's figures stay readable), then ignored; the next writer of the
//! host removes such leftovers.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Under `data_dir`.
pub const STATUS_DIR: &str = "status";
/// How long the report of a process that has ended is still shown.
pub const ENDED_SHOWN_MS: u64 = 60_000;
/// Reports read from the directory at most (the dashboard's panels are bounded anyway).
pub const MAX_REPORTS: usize = 256;
/// A larger file is not a report of ours: skipped.
const MAX_REPORT_BYTES: u64 = 1 << 20;
/// Streams or slots one report carries at most.
pub const MAX_ITEMS: usize = 500;
/// How often a writer may write.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// One process's report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `stream`, `negotiator` or `file server`.
    pub role: String,
    pub pid: u32,
    /// The address it serves from (`server.address`).
    pub server: String,
    /// Unix milliseconds of this report.
    pub updated_ms: u64,
    #[serde(default)]
    pub streams: Vec<StreamLive>,
    #[serde(default)]
    pub slots: Vec<SlotLive>,
}

/// One multicast stream session, as its sender sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamLive {
    /// The image as the `[[stream.session]]` names it.
    pub image: String,
    /// The session id (hex): a new one each time a session starts again.
    pub session: String,
    /// `group:port`.
    pub group: String,
    /// `announcing`, `sending`, `lock-step`, `repairing`, `done`.
    pub state: String,
    /// Receivers registered, and how many of them reported the image complete.
    pub receivers: u32,
    pub complete: u32,
    /// Repair datagrams sent (multicast and unicast), and repair rounds run.
    pub repairs: u64,
    pub rounds: u32,
    /// Datagram bytes sent so far, against the image's size: the egress ratio.
    pub bytes_sent: u64,
    pub image_size: u64,
}

/// A multicast (group, port) in use: handed out by a negotiator or carried by a file server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlotLive {
    /// `group:port`.
    pub group: String,
    pub file: String,
    /// A negotiator: clients it sent there. A file server: transfers it opened there.
    pub clients: u64,
    /// Unix milliseconds since the slot is in use.
    pub since_ms: u64,
    /// A negotiator: the file server; a file server: the negotiators that registered it.
    pub with: String,
}

/// A report as read, with whether its process still runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub report: Report,
    pub running: bool,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn running(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

fn pid_of(name: &str) -> Option<u32> {
    name.strip_suffix(".json")?.rsplit('-').next()?.parse().ok()
}

/// Writes one process's report, when it changed and at most every [`WRITE_EVERY`].
/// Best effort: a status that cannot be written is logged once and the role goes on.
pub struct Writer {
    dir: PathBuf,
    path: PathBuf,
    role: String,
    server: String,
    /// What was last written (without its time), and when.
    last: Option<(Vec<StreamLive>, Vec<SlotLive>)>,
    written: Option<Instant>,
    failed: bool,
}

impl Writer {
    /// The writer of this process's `role` report under `data_dir`; removes the reports of
    /// processes that ended more than [`ENDED_SHOWN_MS`] ago.
    pub fn new(data_dir: &Path, role: &str, server: impl Into<String>) -> Writer {
        let dir = data_dir.join(STATUS_DIR);
        let slug: String = role.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let path = dir.join(format!("{slug}-{}.json", std::process::id()));
        let w = Writer { dir, path, role: role.into(), server: server.into(), last: None, written: None, failed: false };
        w.remove_leftovers();
        w
    }

    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let now = std::time::SystemTime::now();
        for e in entries.flatten().take(MAX_REPORTS * 4) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = pid_of(&name) else { continue };
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|m| now.duration_since(m).ok());
            if !running(pid) && old.is_some_and(|d| d.as_millis() as u64 > ENDED_SHOWN_MS) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Writes the report if it changed since the last write and that write is at least
    /// [`WRITE_EVERY`] old; a change held back is written by a later call.
    pub fn publish(&mut self, now: Instant, mut streams: Vec<StreamLive>, mut slots: Vec<SlotLive>) {
        streams.truncate(MAX_ITEMS);
        slots.truncate(MAX_ITEMS);
        if self.last.as_ref().is_some_and(|(s, g)| *s == streams && *g == slots) {
            return;
        }
        if self.written.is_some_and(|t| now.saturating_duration_since(t) < WRITE_EVERY) {
            return;
        }
        let report = Report {
            role: self.role.clone(),
            pid: std::process::id(),
            server: self.server.clone(),
            updated_ms: unix_ms(),
            streams: streams.clone(),
            slots: slots.clone(),
        };
        self.written = Some(now);
        match self.write(&report) {
            Ok(()) => self.last = Some((streams, slots)),
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write this process's status for the dashboard (it goes on without)");
            }
            Err(_) => {}
        }
    }

    fn write(&self, report: &Report) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(report).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Every report under `data_dir/status` worth showing at `now_ms`: of a running process, or
/// of one that ended less than [`ENDED_SHOWN_MS`] ago. Unreadable or foreign files are
/// skipped; no directory is no report.
pub fn read_reports(data_dir: &Path, now_ms: u64) -> std::io::Result<Vec<Seen>> {
    let entries = match std::fs::read_dir(data_dir.join(STATUS_DIR)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        if out.len() >= MAX_REPORTS {
            break;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if pid_of(&name).is_none() || e.metadata().map_or(true, |m| !m.is_file() || m.len() > MAX_REPORT_BYTES) {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else { continue };
        let Ok(mut report) = serde_json::from_slice::<Report>(&bytes) else {
            tracing::debug!(file = %name, "not a status report: skipped");
            continue;
        };
        report.streams.truncate(MAX_ITEMS);
        report.slots.truncate(MAX_ITEMS);
        let running = running(report.pid);
        if running || now_ms.saturating_sub(report.updated_ms) <= ENDED_SHOWN_MS {
            out.push(Seen { report, running });
        }
    }
    out.sort_by(|a, b| (&a.report.role, &a.report.server, a.report.pid).cmp(&(&b.report.role, &b.report.server, b.report.pid)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(clients: u64) -> SlotLive {
        SlotLive { group: "239.1.1.1:1758".into(), file: "pxe.0".into(), clients, since_ms: 5, with: "10.0.0.1".into() }
    }

    #[test]
    fn a_report_is_written_on_change_at_most_every_second_and_read_back() {
        let dir = std::env::temp_dir().join(format!("fb-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = Writer::new(&dir, "negotiator", "10.0.0.1");
        let t0 = Instant::now();
        w.publish(t0, Vec::new(), vec![slot(1)]);
        let seen = read_reports(&dir, unix_ms()).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].running && seen[0].report.slots == [slot(1)] && seen[0].report.role == "negotiator");
        w.publish(t0 + Duration::from_millis(500), Vec::new(), vec![slot(2)]);
        assert_eq!(read_reports(&dir, unix_ms()).unwrap()[0].report.slots, [slot(1)], "not twice in a second");
        w.publish(t0 + Duration::from_millis(1_000), Vec::new(), vec![slot(2)]);
        assert_eq!(read_reports(&dir, unix_ms()).unwrap()[0].report.slots, [slot(2)], "the change held back is written");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir.join(STATUS_DIR)), mode(&w.path)), (0o700, 0o600));

        // A process that ended: shown for a while, then not; foreign files are skipped.
        let mut ended = read_reports(&dir, unix_ms()).unwrap()[0].report.clone();
        ended.pid = u32::MAX - 1;
        std::fs::write(dir.join(STATUS_DIR).join(format!("stream-{}.json", ended.pid)), serde_json::to_vec(&ended).unwrap()).unwrap();
        std::fs::write(dir.join(STATUS_DIR).join("stream-7.json"), b"{not json").unwrap();
        std::fs::write(dir.join(STATUS_DIR).join("notes.txt"), b"x").unwrap();
        let seen = read_reports(&dir, ended.updated_ms + 1_000).unwrap();
        assert_eq!(seen.iter().map(|s| s.running).collect::<Vec<_>>(), [true, false], "{seen:?}");
        assert_eq!(read_reports(&dir, ended.updated_ms + ENDED_SHOWN_MS + 1).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
