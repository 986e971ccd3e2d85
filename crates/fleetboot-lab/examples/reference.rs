//! Boots VMs from the dnsmasq reference (or fleetboot) through the lab harness.
//! usage (root): reference [http|tftp|proxy] [VMS] [--fleetboot EXE] [--keep] [--compare RUNS]
use std::path::PathBuf;

use fleetboot_lab::{bench, run, LabOptions, Mode, ServerKind};

fn main() -> anyhow::Result<()> {
    let mut mode = Mode::Http;
    let mut vms = 1;
    let mut server = ServerKind::DnsmasqReference;
    let mut keep = false;
    let mut compare = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--fleetboot" => {
                server = ServerKind::Fleetboot {
                    exe: PathBuf::from(args.next().expect("EXE")),
                }
            }
            "--keep" => keep = true,
            "--compare" => compare = Some(args.next().expect("RUNS").parse()?),
            n if n.parse::<usize>().is_ok() => vms = n.parse()?,
            m => mode = m.parse()?,
        }
    }
    let mut opts = LabOptions::new(vms, mode, server);
    opts.keep = keep;
    if let Some(runs) = compare {
        let c = bench::compare(&opts, runs)?;
        println!("{c}");
        return Ok(());
    }
    let report = run(opts)?;
    std::process::exit(if report.success() { 0 } else { 1 });
}
