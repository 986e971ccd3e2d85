//! End-to-end: one QEMU/iPXE VM boots the lab payload from the dnsmasq reference over HTTP.
//! Runs only as root with the lab packages and payload installed (scripts/setup.sh);
//! otherwise it prints why and passes, unless `FLEETBOOT_REQUIRE_E2E=1` makes that a
//! failure (`fleetboot_lab::gate`). Pass/fail is the marker line, never a time.

use fleetboot_lab::{gate, payload, run, LabOptions, Mode, ServerKind};

#[test]
fn dnsmasq_reference_boots_one_vm_over_http() {
    if !gate::e2e_ready_with(
        "dnsmasq_reference_boots_one_vm_over_http",
        &["qemu-system-x86_64", "dnsmasq", "python3", "ip", "ss", "timeout"],
        &[(
            payload::is_complete(&payload::default_dir()),
            "no lab payload (scripts/setup.sh builds it)",
        )],
    ) {
        return;
    }
    let report =
        run(LabOptions::new(1, Mode::Http, ServerKind::DnsmasqReference)).expect("lab run");
    assert!(report.success(), "{report}");
}
