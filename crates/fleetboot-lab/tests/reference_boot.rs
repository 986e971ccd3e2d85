//! End-to-end: one QEMU/iPXE VM boots the lab payload from the dnsmasq reference over HTTP.
//! Runs only as root with the lab packages and payload installed (scripts/setup.sh);
//! otherwise it prints why and passes. Pass/fail is the marker line, never a time.

use fleetboot_lab::{run, LabOptions, Mode, ServerKind};

fn lab_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    for t in ["qemu-system-x86_64", "dnsmasq", "python3", "ip", "ss"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!("{t} not installed"));
        }
    }
    if !fleetboot_lab::payload::is_complete(&fleetboot_lab::payload::default_dir()) {
        return Err("no lab payload (scripts/setup.sh)".into());
    }
    Ok(())
}

#[test]
fn dnsmasq_reference_boots_one_vm_over_http() {
    if let Err(why) = lab_available() {
        eprintln!("skipping lab test: {why}");
        return;
    }
    let report =
        run(LabOptions::new(1, Mode::Http, ServerKind::DnsmasqReference)).expect("lab run");
    assert!(report.success(), "{report}");
}
