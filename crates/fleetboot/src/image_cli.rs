//! `fleetboot image ...`: the disk image catalog under `data_dir/images` (fleetboot-images)
//! from the command line. A running server sees changes at once (the catalog file is
//! replaced atomically under a lock).

use crate::config::Config;
use anyhow::{Context, Result};
use clap::Subcommand;
use fleetboot_images::{Catalog, ImageVersion, ImportOptions, Phase, Progress};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import a disk image (raw; qcow2, vmdk, vdi, vhdx, qed via `qemu-img convert`) as the
    /// next version of NAME. Prints the new version.
    Import {
        file: PathBuf,
        /// Default: the file name up to its first dot.
        #[arg(long)]
        name: Option<String>,
        /// The file's format (raw, qcow2, ...). Default: detected from its magic bytes.
        #[arg(long)]
        format: Option<String>,
        #[arg(long, short)]
        config: PathBuf,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every version of every image.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the versions of one image.
    Show {
        name: String,
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove NAME:VERSION, or every version of NAME. Content no version refers to is deleted.
    Remove {
        /// NAME or NAME:VERSION.
        spec: String,
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn catalog(config: &Path) -> Result<Catalog> {
    let config = Config::load(config)?;
    Catalog::open_dir(&config.data_dir)
        .with_context(|| format!("opening the image catalog in {}", config.data_dir.display()))
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Import {
            file,
            name,
            format,
            config,
            json,
        } => {
            let catalog = catalog(&config)?;
            let mut bar = Bar::new();
            let v = catalog
                .import(&file, &ImportOptions { name, format }, &mut |p| {
                    bar.update(p)
                })
                .with_context(|| format!("importing {}", file.display()))?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "imported {} ({}, sha256 {}, from {})",
                    v.reference(),
                    human(v.size),
                    v.sha256,
                    v.source_format
                );
            }
            Ok(())
        }
        ImageCommand::List { config, json } => print(&catalog(&config)?.list()?, json),
        ImageCommand::Show { name, config, json } => {
            let c = catalog(&config)?;
            let v = match name.contains(':') {
                true => vec![c.resolve(&name)?],
                false => c.show(&name)?,
            };
            print(&v, json)
        }
        ImageCommand::Remove { spec, config } => {
            for v in catalog(&config)?.remove(&spec)? {
                println!("removed {} (sha256 {})", v.reference(), v.sha256);
            }
            Ok(())
        }
    }
}

fn print(images: &[ImageVersion], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(images)?);
        return Ok(());
    }
    if images.is_empty() {
        println!("no images");
        return Ok(());
    }
    println!(
        "{:<32} {:>10}  {:<19}  {:<8} {:<16} SOURCE",
        "IMAGE", "SIZE", "IMPORTED (UTC)", "FORMAT", "SHA256"
    );
    for v in images {
        println!(
            "{:<32} {:>10}  {:<19}  {:<8} {:<16} {}",
            v.reference(),
            human(v.size),
            date(v.imported_at),
            v.source_format,
            &v.sha256[..16.min(v.sha256.len())],
            v.source
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub(crate) fn date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let tod = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

/// The import's progress on stderr: a redrawn bar on a terminal, a line per phase and
/// every 10% otherwise (logs stay readable).
struct Bar {
    tty: bool,
    started: Instant,
    phase: Option<Phase>,
    phase_started: Instant,
    last_draw: Option<Instant>,
    last_decile: u64,
    drawn: bool,
}

impl Bar {
    fn new() -> Bar {
        Bar {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            phase: None,
            phase_started: Instant::now(),
            last_draw: None,
            last_decile: 0,
            drawn: false,
        }
    }

    fn label(p: Phase) -> &'static str {
        match p {
            Phase::Convert => "converting",
            Phase::Copy => "copying",
            Phase::Hash => "hashing",
            Phase::Verify => "verifying",
        }
    }

    fn update(&mut self, p: Progress) {
        let mut err = std::io::stderr().lock();
        if self.phase != Some(p.phase) {
            if self.drawn && self.tty {
                let _ = writeln!(err);
            }
            self.phase = Some(p.phase);
            self.phase_started = Instant::now();
            self.last_decile = 0;
            self.last_draw = None;
            if !self.tty {
                let _ = writeln!(err, "{} {}", Self::label(p.phase), human(p.total));
            }
        }
        let frac = if p.total == 0 {
            1.0
        } else {
            (p.done as f64 / p.total as f64).min(1.0)
        };
        if self.tty {
            let now = Instant::now();
            let due = self
                .last_draw
                .is_none_or(|t| now - t >= Duration::from_millis(100));
            if !due && p.done < p.total {
                return;
            }
            self.last_draw = Some(now);
            let secs = self.phase_started.elapsed().as_secs_f64().max(1e-3);
            let rate = p.done as f64 / secs;
            const WIDTH: usize = 30;
            let filled = (frac * WIDTH as f64) as usize;
            let _ = write!(
                err,
                "\r{:<10} [{}{}] {:>5.1}%  {} / {}  {}/s ",
                Self::label(p.phase),
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                frac * 100.0,
                human(p.done),
                human(p.total),
                human(rate as u64)
            );
            self.drawn = true;
        } else {
            let decile = (frac * 10.0) as u64;
            if decile > self.last_decile {
                self.last_decile = decile;
                let _ = writeln!(
                    err,
                    "  {}%  {} / {}",
                    decile * 10,
                    human(p.done),
                    human(p.total)
                );
            }
        }
    }

    fn finish(&mut self) {
        let mut err = std::io::stderr().lock();
        if self.drawn && self.tty {
            let _ = writeln!(err);
        }
        let _ = writeln!(err, "done in {:.1}s", self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(date(1_709_251_199), "2024-02-29 23:59:59");
    }
}
