//! End to end: the GRUB and PXELINUX configurations `fleetboot serve` renders per client,
//! fetched the way boot loaders fetch them (TFTP with a leading `/` as GRUB asks, plain
//! TFTP names as PXELINUX asks, and HTTP; curl and tftp-hpa as the clients), checked by GRUB's own parser
//! (`grub-script-check`), and the rules around them: what a client that no profile suits
//! gets, and that an operator's real file of the same name wins.
//!
//! The VM tests in `firmware_e2e.rs` boot real GRUB and PXELINUX from these files; this
//! one pins down their content. Needs root, curl, tftp-hpa and grub-common.

mod common;

use common::{e2e_ready, s, Env, HTTP};
use std::fs;

fn tftp_get(env: &mut Env, ns: &str, name: &str) -> String {
    let out = env.dir.join(format!("tftp-{}", name.replace(['/', ':'], "_")));
    // tftp-hpa reads "host:file" into a name with a colon; curl sends the name as is.
    let r = if name.contains(':') {
        let url = format!("tftp://10.77.0.1/{name}");
        env.run(ns, &["curl", "-sS", "--path-as-is", "--max-time", "20", "-o", &s(&out), &url], 30)
    } else {
        env.run(ns, &["tftp", "10.77.0.1", "-m", "binary", "-c", "get", name, &s(&out)], 30)
    };
    let text = fs::read_to_string(&out).unwrap_or_default();
    assert!(r.ok() && !text.is_empty(), "tftp get {name}: {} {}", r.stderr, r.stdout_str());
    text
}

fn grub_syntax_ok(env: &mut Env, text: &str, tag: &str) {
    let path = env.dir.join(format!("{tag}.cfg"));
    fs::write(&path, text).unwrap();
    // grub-script-check exits non-zero (and `host` panics) on a syntax error.
    common::host(&["grub-script-check", &s(&path)], 30);
}

#[test]
fn grub_and_pxelinux_configs_follow_the_profile() {
    if !e2e_ready("grub_and_pxelinux_configs_follow_the_profile", &["tftp", "grub-script-check"]) {
        return;
    }
    let mut env = Env::new("loader-configs");
    // A client's own configuration goes only to the address that holds its MAC: two
    // reserved clients, one in the lab group and one that no lab profile suits.
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(
        "\n[[dhcp.reservation]]\nmac = \"52:54:00:77:00:10\"\nip = \"10.77.0.20\"\n\
         \n[[dhcp.reservation]]\nmac = \"52:54:00:77:09:09\"\nip = \"10.77.0.21\"\n",
    );
    fs::write(&env.config, cfg).unwrap();
    env.start_server();
    let ns = env.add_client(Some("10.77.0.20/24"), Some("52:54:00:77:00:10")).ns;
    let other_ns = env.add_client(Some("10.77.0.21/24"), Some("52:54:00:77:09:09")).ns;

    // GRUB's first file: the same for everyone, it sends GRUB to its own file.
    let entry = tftp_get(&mut env, &ns, "/grub/grub.cfg");
    assert!(entry.contains("configfile \"${prefix}/${net_default_mac}.cfg\""), "{entry}");
    grub_syntax_ok(&mut env, &entry, "entry");

    // The lab client (group "lab", profile lab-linux): kernel and initrd over TFTP.
    let lab = tftp_get(&mut env, &ns, "/grub/52:54:00:77:00:10.cfg");
    assert!(lab.contains("\nif linux (tftp,10.77.0.1)/vmlinuz console=ttyS0 panic=-1; then\n"), "{lab}");
    assert!(lab.contains("\tif initrd (tftp,10.77.0.1)/initrd.gz; then\n\t\tboot\n"), "{lab}");
    grub_syntax_ok(&mut env, &lab, "lab");
    // Over HTTP, by the hyphenated MAC too: the same file.
    let (code, body) = env.http(&ns, &[], &format!("{HTTP}/files/grub/52-54-00-77-00-10.cfg"));
    assert_eq!(code, 200);
    assert_eq!(String::from_utf8_lossy(&body), lab);

    // Anyone else matches an iPXE script profile, which GRUB cannot run: it is told so
    // and exits, and the file still parses.
    let other = tftp_get(&mut env, &other_ns, "/grub/52:54:00:77:09:09.cfg");
    assert!(other.contains("iPXE script, which GRUB cannot run") && !other.contains("linux "), "{other}");
    grub_syntax_ok(&mut env, &other, "other");

    // PXELINUX: by MAC, next to the boot file (here at the top of the tree).
    let px = tftp_get(&mut env, &ns, "pxelinux.cfg/01-52-54-00-77-00-10");
    assert!(
        px.contains("LABEL fleetboot\n  KERNEL http://10.77.0.1:8080/files/vmlinuz\n  INITRD http://10.77.0.1:8080/files/initrd.gz\n  APPEND console=ttyS0 panic=-1\n"),
        "{px}"
    );
    let px_other = tftp_get(&mut env, &other_ns, "bios/pxelinux.cfg/01-52-54-00-77-09-09");
    assert!(px_other.contains("LOCALBOOT -1") && !px_other.contains("KERNEL"), "{px_other}");
    // Names PXELINUX tries first (UUID, IP in hex) and its default are not fleetboot's.
    let (code, _) = env.http(&ns, &[], &format!("{HTTP}/files/pxelinux.cfg/default"));
    assert_eq!(code, 404);

    // Neither client reads the other's configuration (it names kernels, command lines).
    let (code, _) = env.http(&other_ns, &[], &format!("{HTTP}/files/grub/52-54-00-77-00-10.cfg"));
    assert_eq!(code, 403, "another client's GRUB config must be refused");
    let stolen = env.dir.join("stolen.cfg");
    let r = env.run(&ns, &["tftp", "10.77.0.1", "-m", "binary", "-c", "get", "pxelinux.cfg/01-52-54-00-77-09-09", &s(&stolen)], 30);
    assert!(fs::read(&stolen).map(|b| b.is_empty()).unwrap_or(true), "another client's PXELINUX config must be refused: {}", r.stdout_str());

    // An operator's own file of the same name wins.
    env.put_file("grub/grub.cfg", b"# the site's own menu\n");
    let own = tftp_get(&mut env, &ns, "/grub/grub.cfg");
    assert_eq!(own, "# the site's own menu\n");

    // The fetches are in the lab client's trace.
    let kinds = env.trace_kinds("52:54:00:77:00:10");
    assert!(kinds.iter().any(|k| k == "TFTP-DONE") && kinds.iter().any(|k| k == "HTTP-CONFIG"), "{kinds:?}");
}
