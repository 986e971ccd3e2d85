//! `fleetboot doctor` against setups broken one thing at a time, on this host without
//! namespaces: a baseline that passes, then each mistake an operator makes — a config
//! key misspelt, a boot file missing, empty or unreadable by the service's account, the
//! served root missing or closed, data_dir not writable, a damaged store, a port held by
//! another process or on an address this host lacks, an interface that does not exist or
//! lacks the address, no firmware boot file at all, shim without GRUB beside it, a clock
//! before the binary's build — each must turn exactly its check to an error (or warning)
//! with a fix, and the exit status with it. The network checks that need namespaces
//! (interface down, MTU, other DHCP servers, read-only and full filesystems, forwarding)
//! are in `doctor_e2e.rs`.

mod doctor_common;

use doctor_common::{current_user, run, Setup, TempDir, BIN};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn me() -> String {
    current_user()
}

#[test]
fn a_sound_setup_has_no_errors_and_says_what_it_checked() {
    let dir = TempDir::new("sound");
    let setup = Setup::new(&dir.0);
    let r = run(&setup.write(), &["--service-user", &me()]);
    r.assert_clean();
    r.expect("config", "ok", "is valid");
    r.expect("interface", "ok", "lo has server.address 127.0.0.1");
    r.expect("boot-file", "ok", "BIOS");
    r.expect("boot-file", "ok", "UEFI x64");
    r.expect("root", "ok", "is readable (2 entries)");
    r.expect("data-dir", "ok", "does not exist yet");
    r.expect("store", "ok", "does not exist yet");
    r.expect("disk-space", "ok", "MiB free");
    assert_eq!(r.with("dhcp-servers", "skipped").len(), 1, "dhcp.mode = off: no probe\n{}", r.stdout);
    // With the store created by fleetboot itself, it opens.
    std::fs::create_dir_all(&setup.data_dir).unwrap();
    drop(fleetboot_store::Store::open(&setup.data_dir.join("fleetboot.db")).unwrap());
    let r = run(&setup.write(), &["--service-user", &me()]);
    r.assert_clean();
    r.expect("store", "ok", "opens (0 leases)");
    r.expect("data-dir", "ok", "is writable");
}

#[test]
fn the_terminal_report_gives_each_problem_its_fix_and_fails() {
    let dir = TempDir::new("human");
    let setup = Setup::new(&dir.0);
    std::fs::remove_file(setup.root().join("undionly.kpxe")).unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--no-dhcp-probe", "--service-user", &me(), "--config"])
        .arg(setup.write())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text.lines().position(|l| l.starts_with("ERROR") && l.contains("undionly.kpxe is missing")).expect(&text);
    let fix = text.lines().nth(line + 1).unwrap();
    assert!(fix.contains("fix: ") && fix.contains("/usr/lib/ipxe/undionly.kpxe"), "{text}");
    assert!(text.lines().last().unwrap().starts_with("1 error(s)"), "{text}");
}

#[test]
fn a_misspelt_key_is_the_only_finding() {
    let dir = TempDir::new("key");
    let mut setup = Setup::new(&dir.0);
    setup.extra = "[nbd]\nenable = true\n".into();
    let r = run(&setup.write(), &[]);
    assert_eq!(r.findings.len(), 1, "{}", r.stdout);
    r.expect("config", "error", "nbd.enable");
}

#[test]
fn missing_or_empty_boot_files_name_where_to_get_them() {
    let dir = TempDir::new("bootfiles");
    let setup = Setup::new(&dir.0);
    std::fs::remove_file(setup.root().join("undionly.kpxe")).unwrap();
    std::fs::write(setup.root().join("snponly.efi"), b"").unwrap();
    let r = run(&setup.write(), &["--service-user", &me()]);
    let missing = r.expect("boot-file", "error", "undionly.kpxe is missing (pxe.bios)");
    assert!(missing.fix.as_deref().unwrap().contains("/usr/lib/ipxe/undionly.kpxe"), "{missing:?}");
    r.expect("boot-file", "error", "snponly.efi is empty");
    assert_eq!(r.errors().len(), 2, "{}", r.stdout);
}

#[test]
fn files_the_service_account_cannot_read_are_errors() {
    let dir = TempDir::new("perms");
    let setup = Setup::new(&dir.0);
    let config = setup.write();
    // Readable by everyone: fine for nobody too.
    run(&config, &["--service-user", "nobody"]).expect("boot-file", "ok", "BIOS");
    chmod(&setup.root().join("undionly.kpxe"), 0o600);
    let r = run(&config, &["--service-user", "nobody"]);
    let f = r.expect("boot-file", "error", "is not readable by nobody");
    assert!(f.fix.as_deref().unwrap().contains("chmod a+r"), "{f:?}");
    chmod(&setup.root().join("undionly.kpxe"), 0o644);
    chmod(&setup.root(), 0o700);
    let r = run(&config, &["--service-user", "nobody"]);
    r.expect("root", "error", "is not readable by nobody");
    r.expect("boot-file", "error", "does not let nobody through");
}

#[test]
fn a_missing_root_is_an_error() {
    let dir = TempDir::new("noroot");
    let setup = Setup::new(&dir.0);
    std::fs::remove_dir_all(setup.root()).unwrap();
    let r = run(&setup.write(), &["--service-user", &me()]);
    let f = r.expect("root", "error", "No such file or directory");
    assert!(f.fix.as_deref().unwrap().starts_with("mkdir -p"), "{f:?}");
}

#[test]
fn a_data_dir_the_service_account_cannot_write_is_an_error() {
    let dir = TempDir::new("datadir");
    let setup = Setup::new(&dir.0);
    std::fs::create_dir_all(&setup.data_dir).unwrap();
    chmod(&setup.data_dir, 0o755);
    let r = run(&setup.write(), &["--service-user", "nobody"]);
    let f = r.expect("data-dir", "error", "is not writable by nobody");
    assert!(f.fix.as_deref().unwrap().contains("chown -R nobody:nobody"), "{f:?}");
    // The directory is the account's, but a store created by root is not: the service
    // could not write its leases (fleetboot run by hand as root first).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let nobody = 65534;
        std::os::unix::fs::chown(&setup.data_dir, Some(nobody), Some(nobody)).unwrap();
        std::fs::write(setup.data_dir.join("fleetboot.db"), b"").unwrap();
        chmod(&setup.data_dir.join("fleetboot.db"), 0o640);
        let r = run(&setup.write(), &["--service-user", "nobody"]);
        assert!(r.with("data-dir", "error").iter().all(|f| f.summary.contains("fleetboot.db")), "{}", r.stdout);
        r.expect("data-dir", "error", "fleetboot.db (mode 0640, owner root:root) is not writable by nobody");
        std::fs::remove_file(setup.data_dir.join("fleetboot.db")).unwrap();
    }
    // Not there yet, in a directory nobody may not write: it could not be created.
    std::fs::remove_dir(&setup.data_dir).unwrap();
    run(&setup.write(), &["--service-user", "nobody"]).expect("data-dir", "error", "nobody cannot create it");
}

#[test]
fn a_damaged_store_is_an_error_with_a_way_out() {
    let dir = TempDir::new("store");
    let setup = Setup::new(&dir.0);
    std::fs::create_dir_all(&setup.data_dir).unwrap();
    std::fs::write(setup.data_dir.join("fleetboot.db"), vec![0x5a; 8192]).unwrap();
    let r = run(&setup.write(), &["--service-user", &me()]);
    let f = r.expect("store", "error", "cannot be read");
    assert!(f.fix.as_deref().unwrap().contains("fleetboot.db.broken"), "{f:?}");
}

#[test]
fn ports_held_by_another_process_name_it() {
    let dir = TempDir::new("ports");
    let mut setup = Setup::new(&dir.0);
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    setup.http_listen = tcp.local_addr().unwrap().to_string();
    setup.tftp_listen = udp.local_addr().unwrap().to_string();
    let r = run(&setup.write(), &["--service-user", &me()]);
    let pid = format!("(pid {})", std::process::id());
    let http = r.expect("port", "error", &format!("{}/tcp (HTTP, http.listen) is held by", tcp.local_addr().unwrap().port()));
    assert!(http.summary.contains(&pid), "{http:?}");
    assert!(http.fix.as_deref().unwrap().contains("http.listen"), "{http:?}");
    let tftp = r.expect("port", "error", &format!("{}/udp (TFTP, tftp.listen) is held by", udp.local_addr().unwrap().port()));
    assert!(tftp.summary.contains(&pid), "{tftp:?}");
    drop((tcp, udp));
    let r = run(&setup.write(), &["--service-user", &me()]);
    r.assert_clean();
    assert_eq!(r.with("port", "ok").len(), 2, "both free once released:\n{}", r.stdout);
}

#[test]
fn a_listen_address_this_host_lacks_is_an_error() {
    let dir = TempDir::new("listen");
    let mut setup = Setup::new(&dir.0);
    setup.tftp_listen = "192.0.2.55:6969".into();
    run(&setup.write(), &["--service-user", &me()]).expect("port", "error", "192.0.2.55 is not an address of this host");
}

#[test]
fn an_interface_that_is_not_there_or_lacks_the_address_is_an_error() {
    let dir = TempDir::new("iface");
    let mut setup = Setup::new(&dir.0);
    setup.interface = Some("nosuch0".into());
    let r = run(&setup.write(), &["--service-user", &me()]);
    let f = r.expect("interface", "error", "\"nosuch0\" does not exist on this host");
    assert!(f.summary.contains("lo"), "lists the interfaces there are: {f:?}");
    setup.interface = Some("lo".into());
    setup.address = "192.0.2.1".into();
    let f = run(&setup.write(), &["--service-user", &me()]).expect("interface", "error", "lo does not have server.address 192.0.2.1").clone();
    assert!(f.fix.unwrap().contains("ip addr add 192.0.2.1"));
    setup.interface = None;
    run(&setup.write(), &["--service-user", &me()]).expect("interface", "error", "192.0.2.1 is not an address of this host");
}

#[test]
fn dhcp_without_an_interface_or_any_firmware_file_is_warned_about() {
    let dir = TempDir::new("firmware");
    let mut setup = Setup::new(&dir.0);
    setup.mode = "proxy".into();
    setup.interface = None;
    let text = setup.config_text().replace("bios = \"undionly.kpxe\"\nuefi_x64 = \"snponly.efi\"\n", "");
    let config = dir.0.join("nofirmware.toml");
    std::fs::write(&config, text).unwrap();
    let r = run(&config, &["--service-user", &me()]);
    r.expect("firmware", "warning", "no firmware boot file is configured");
    r.expect("interface", "warning", "server.interface is not set");
    assert!(r.exit_ok, "warnings alone pass:\n{}", r.stdout);
}

#[test]
fn loaders_without_what_they_load_next_are_errors() {
    let dir = TempDir::new("shim");
    let mut setup = Setup::new(&dir.0);
    std::fs::create_dir_all(setup.root().join("sb")).unwrap();
    std::fs::write(setup.root().join("sb/shimx64.efi"), b"shim").unwrap();
    std::fs::write(setup.root().join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(setup.root().join("lpxelinux.0"), b"pxelinux").unwrap();
    setup.extra = "[[profile]]\nname = \"secure\"\nboot = { kind = \"linux\", kernel = \"vmlinuz\", loader = \"sb/shimx64.efi\" }\n\
                   [[profile]]\nname = \"old-bios\"\nboot = { kind = \"linux\", kernel = \"vmlinuz\", loader = \"lpxelinux.0\" }\n"
        .into();
    let r = run(&setup.write(), &["--service-user", &me()]);
    r.expect("boot-file", "ok", "profile \"secure\" loader");
    let f = r.expect("boot-file", "error", "sb/grubx64.efi is missing");
    assert!(f.summary.contains("shim loads it"), "{f:?}");
    assert!(f.fix.as_deref().unwrap().contains("grubnetx64.efi.signed"), "{f:?}");
    let f = r.expect("boot-file", "error", "ldlinux.c32 is missing");
    assert!(f.fix.as_deref().unwrap().contains("syslinux-common"), "{f:?}");
    assert_eq!(r.errors().len(), 2, "{}", r.stdout);
}

#[test]
fn a_clock_before_the_build_is_an_error() {
    let dir = TempDir::new("clock");
    let setup = Setup::new(&dir.0);
    // A copy of the binary written "in 2100": to it, this host's clock is in the past.
    let copy = dir.0.join("fleetboot");
    std::fs::copy(BIN, &copy).unwrap();
    let ok = Command::new("touch").args(["-d", "2100-01-01 00:00:00"]).arg(&copy).status().unwrap();
    assert!(ok.success());
    let r = doctor_common::run_in(Command::new(&copy), &setup.write(), &["--no-dhcp-probe", "--service-user", &me()]);
    let f = r.expect("clock", "error", "before this fleetboot binary was written (2100-01-01 00:00:00 UTC)");
    assert!(f.fix.as_deref().unwrap().contains("timedatectl set-ntp"), "{f:?}");
    // The binary as built: no such error.
    assert!(run(&setup.write(), &["--service-user", &me()]).with("clock", "error").is_empty());
}
