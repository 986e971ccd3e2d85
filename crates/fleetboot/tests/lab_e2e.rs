//! End to end: QEMU VMs with their built-in iPXE firmware boot the lab payload from
//! `fleetboot serve` inside private network namespaces. A VM passes only when its serial
//! console prints the whole marker line with this run's nonce and its own MAC.
//!
//! Needs root, QEMU and the lab packages (scripts/setup.sh). Without them the tests say
//! why and pass, unless FLEETBOOT_REQUIRE_E2E=1 (scripts/test.sh sets it), where they fail.

use fleetboot_lab::{LabOptions, Mode, ServerKind};
use std::path::PathBuf;

fn boot(vms: usize, mode: Mode) {
    if !fleetboot_lab::gate::e2e_ready("lab e2e", &["qemu-system-x86_64", "ip", "dnsmasq"]) {
        return;
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_fleetboot"));
    let report = fleetboot_lab::run(LabOptions::new(vms, mode, ServerKind::Fleetboot { exe })).expect("lab run");
    println!("{report}");
    assert_eq!(report.vms.len(), vms);
    assert!(report.success(), "not every VM printed its marker; logs kept in {}", report.work_dir.display());
    assert_eq!(report.marker_times().len(), vms);
    for vm in &report.vms {
        // The server's own trace saw this VM's DHCP exchange and its file fetches.
        let kinds: Vec<&str> = vm.timeline.iter().map(|e| e.kind.as_str()).collect();
        assert!(vm.trace_error.is_none(), "{}: trace failed: {:?}", vm.mac, vm.trace_error);
        let want_offer = if mode == Mode::Proxy { "PROXYOFFER" } else { "DHCPOFFER" };
        for want in ["DHCPDISCOVER", want_offer] {
            assert!(kinds.contains(&want), "{}: no {want} in trace {kinds:?}", vm.mac);
        }
        let fetched = if mode == Mode::Tftp { "TFTP-DONE" } else { "HTTP-GET" };
        assert!(kinds.contains(&fetched), "{}: no {fetched} in trace {kinds:?}", vm.mac);
    }
}

#[test]
fn one_vm_boots_over_http_with_full_dhcp() {
    boot(1, Mode::Http);
}

#[test]
fn one_vm_boots_over_tftp_only() {
    boot(1, Mode::Tftp);
}

#[test]
fn one_vm_boots_through_proxydhcp_beside_dnsmasq() {
    boot(1, Mode::Proxy);
}

#[test]
fn three_vms_boot_at_once() {
    boot(3, Mode::Http);
}
