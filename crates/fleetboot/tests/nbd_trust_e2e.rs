//! End to end: who may read a network disk, checked with NBD clients fleetboot did not
//! write, against a real `fleetboot serve` in the lab's namespaces.
//!
//! - **TLS** (`[nbd.tls]`, `mode = "require"`): a CA and a server certificate for
//!   10.77.0.1 are made here with `openssl`. `nbdcopy` (libnbd, `nbds://...?tls-certificates=DIR`)
//!   and `qemu-img` (`tls-creds-x509`) trusting that CA read a catalog image byte for byte
//!   and write a client's private overlay and read it back; a plain client
//!   (`nbdinfo nbd://`, `qemu-img`) is refused with the server's "TLS first"; clients that
//!   trust another CA read nothing, and the handshake libnbd aborts is counted in
//!   `fleetboot_nbd_tls_failures_total` (QEMU checks the certificate only once the
//!   handshake is done, then hangs up).
//! - **Client certificates** (`client_ca`): clients showing a certificate that CA signed
//!   read the disk; none, or one from another CA, is refused in the handshake and counted.
//! - **ProxyDHCP**: another server hands out the addresses, so an address proves nothing.
//!   A machine asks port 4011 like iPXE does, fetches the script its ProxyDHCP answer names
//!   (`boot/<capability>/<mac>.ipxe`), and opens the disk URL on its kernel command line,
//!   which carries a disk capability (`IMAGE@MAC~CAPABILITY`) — no `[[dhcp.reservation]]`
//!   needed. From another address, `nbdinfo` cannot open that overlay without a capability,
//!   nor with the machine's expired or forged one, nor with the capability that fetched its
//!   script (another scope).
//!
//! Needs root, `openssl`, `nbdinfo`, `nbdcopy` and `qemu-img`; skips otherwise unless
//! `FLEETBOOT_REQUIRE_E2E=1`. Network safety: only namespaces the lab creates.

mod common;

use common::{assert_same_file, e2e_ready, fleetboot_with_config as fleetboot, host, parse_metric, random_bytes, s, Env};
use fleetboot_dhcp::codec::{opt, BOOTREQUEST};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

const NBD_PORT: u16 = 10809;
const IMAGE_BYTES: usize = 3 << 20;

/// A CA in `dir` (`ca-cert.pem`, the name libnbd and QEMU look for) and, when `server_ip`
/// is given, a server certificate it signed for that address (`server-cert.pem`,
/// `server-key.pem`).
fn make_pki(dir: &Path, ca_name: &str, server_ip: Option<&str>) {
    fs::create_dir_all(dir).unwrap();
    let d = s(dir);
    let subj = format!("/CN={ca_name}");
    let (ca_key, ca_cert) = (format!("{d}/ca-key.pem"), format!("{d}/ca-cert.pem"));
    let mut ca = vec!["openssl", "req", "-x509", "-days", "2", "-subj", &subj];
    ca.extend_from_slice(&EC_KEY);
    ca.extend_from_slice(&["-keyout", &ca_key, "-out", &ca_cert]);
    host(&ca, 60);
    if let Some(ip) = server_ip {
        sign(dir, "server", &format!("/CN={ip}"), &format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"));
    }
}

/// A fresh P-256 key, unencrypted.
const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// `ROLE-cert.pem` and `ROLE-key.pem` in `dir`, signed by the CA there (`ROLE`: `server`
/// or `client`, the names libnbd and QEMU look for), with the extensions `ext`.
fn sign(dir: &Path, role: &str, subj: &str, ext: &str) {
    let d = s(dir);
    let (ca_key, ca_cert) = (format!("{d}/ca-key.pem"), format!("{d}/ca-cert.pem"));
    let (key, csr, cert, extfile) =
        (format!("{d}/{role}-key.pem"), format!("{d}/{role}.csr"), format!("{d}/{role}-cert.pem"), format!("{d}/{role}-ext.cnf"));
    fs::write(&extfile, format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}")).unwrap();
    let mut req = vec!["openssl", "req", "-subj", subj];
    req.extend_from_slice(&EC_KEY);
    req.extend_from_slice(&["-keyout", &key, "-out", &csr]);
    host(&req, 60);
    host(
        &["openssl", "x509", "-req", "-days", "2", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key, "-CAcreateserial",
          "-extfile", &extfile, "-out", &cert],
        60,
    );
}

/// `qemu-img` arguments that open `export` over TLS trusting the CA in `pki`.
fn qemu_tls(pki: &Path, export: &str) -> (String, String) {
    (
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display()),
        format!("driver=nbd,server.type=inet,server.host=10.77.0.1,server.port={NBD_PORT},export={export},tls-creds=tls0"),
    )
}

#[test]
fn nbd_over_tls_with_real_clients() {
    if !e2e_ready("nbd_over_tls_with_real_clients", &["openssl", "nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    const CLIENT_MAC: &str = "52:54:00:77:0e:20";
    let mut env = Env::new("nbd-tls");
    let dir = env.dir.path.clone();
    let (pki, other) = (dir.join("pki"), dir.join("other-ca"));
    make_pki(&pki, "fleetboot test CA", Some("10.77.0.1"));
    make_pki(&other, "someone else's CA", None);
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        r#"
[[dhcp.reservation]]
mac = "{CLIENT_MAC}"
ip = "10.77.0.20"

[nbd]
enabled = true
listen = "0.0.0.0:{NBD_PORT}"
overlay = "private"

[nbd.tls]
certificate = "{pki}/server-cert.pem"
key = "{pki}/server-key.pem"
mode = "require"
"#,
        pki = pki.display()
    ));
    fs::write(&env.config, cfg).unwrap();
    let image = dir.join("tls-disk.raw");
    fs::write(&image, random_bytes(0x715, IMAGE_BYTES)).unwrap();
    let out = fleetboot(&["image", "import", &s(&image), "--name", "tls-disk", "--format", "raw"], &env.config);
    assert!(out.contains("imported tls-disk:1"), "{out}");
    env.start_server();
    let srv = env.server_ns();
    env.lab
        .wait_listening(&srv, fleetboot_lab::netns::Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .expect("NBD listening");
    let ns = env.add_client(Some("10.77.0.20/24"), Some(CLIENT_MAC)).ns;
    let nbds = |export: &str, ca: &Path| format!("nbds://10.77.0.1:{NBD_PORT}/{export}?tls-certificates={}", ca.display());

    // libnbd trusting the server's CA reads the catalog image byte for byte.
    let got = dir.join("read-by-nbdcopy.raw");
    env.run_ok(&ns, &["nbdcopy", &nbds("tls-disk", &pki), &s(&got)], 60);
    assert_same_file("the image read over TLS by nbdcopy", &image, &got);
    // So does QEMU's NBD client.
    let got = dir.join("read-by-qemu-img.raw");
    let (object, opts) = qemu_tls(&pki, "tls-disk");
    env.run_ok(&ns, &["qemu-img", "convert", "-O", "raw", "--object", &object, "--image-opts", &opts, &s(&got)], 60);
    assert_same_file("the image read over TLS by qemu-img", &image, &got);

    // Writes travel the same way: the client fills its private overlay over TLS with
    // libnbd and reads it back with QEMU.
    let mine = format!("tls-disk@{}", CLIENT_MAC.replace(':', "-"));
    let written = dir.join("written.raw");
    fs::write(&written, random_bytes(0xd15c, IMAGE_BYTES)).unwrap();
    env.run_ok(&ns, &["nbdcopy", &s(&written), &nbds(&mine, &pki)], 60);
    let back = dir.join("read-back.raw");
    let (object, opts) = qemu_tls(&pki, &mine);
    env.run_ok(&ns, &["qemu-img", "convert", "-O", "raw", "--object", &object, "--image-opts", &opts, &s(&back)], 60);
    assert_same_file("the overlay written and read back over TLS", &written, &back);

    // Without TLS: refused before any export is named, and QEMU says why.
    let plain = format!("nbd://10.77.0.1:{NBD_PORT}/tls-disk");
    let r = env.run(&ns, &["nbdinfo", &plain], 60);
    assert!(!r.ok(), "a plain nbdinfo read the disk: {}", r.stdout_str());
    let r = env.run(&ns, &["qemu-img", "info", &plain], 60);
    assert!(!r.ok() && r.stderr.contains("TLS"), "a plain qemu-img: {}{}", r.stdout_str(), r.stderr);

    // Clients that trust another CA do not read the disk. libnbd checks the certificate
    // during the handshake and aborts it: the server counts that failure, once.
    let failures = |env: &mut Env| {
        let (code, body) = env.api(&[], "/metrics");
        assert_eq!(code, 200);
        parse_metric(&String::from_utf8_lossy(&body), "fleetboot_nbd_tls_failures_total")
    };
    let before = failures(&mut env);
    let r = env.run(&ns, &["nbdinfo", &nbds("tls-disk", &other)], 60);
    assert!(!r.ok(), "nbdinfo trusting another CA read the disk: {}", r.stdout_str());
    assert!(r.stderr.contains("certificate"), "nbdinfo trusting another CA: {}", r.stderr);
    assert!(env.eventually(50, |e| failures(e) > before), "fleetboot_nbd_tls_failures_total stayed at {before}");
    assert_eq!(failures(&mut env), before + 1.0, "one failed handshake, one count");
    // QEMU finishes the handshake, then checks the certificate and hangs up: for the
    // server that is a hang-up, not a failed handshake.
    let (object, opts) = qemu_tls(&other, "tls-disk");
    let r = env.run(&ns, &["qemu-img", "info", "--object", &object, "--image-opts", &opts], 60);
    assert!(!r.ok() && r.stderr.contains("issuer"), "qemu-img trusting another CA: {}{}", r.stdout_str(), r.stderr);
    assert!(env.server_alive());
}

/// With `[nbd.tls] client_ca`, a client must also show a certificate that CA signed:
/// libnbd and QEMU with one read the disk; libnbd with none, or with one another CA signed,
/// is refused in the handshake, and each refusal is counted.
#[test]
fn nbd_client_certificates_from_the_configured_ca_only() {
    if !e2e_ready("nbd_client_certificates_from_the_configured_ca_only", &["openssl", "nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    let mut env = Env::new("nbd-mtls");
    let dir = env.dir.path.clone();
    let (pki, no_cert, other) = (dir.join("pki"), dir.join("no-client-cert"), dir.join("other-ca"));
    make_pki(&pki, "fleetboot test CA", Some("10.77.0.1"));
    sign(&pki, "client", "/CN=rack-7 loader", "extendedKeyUsage=clientAuth\n");
    // Trusts the server, shows no certificate.
    fs::create_dir_all(&no_cert).unwrap();
    fs::copy(pki.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    // Trusts the server, shows a certificate someone else's CA signed.
    make_pki(&other, "someone else's CA", None);
    sign(&other, "client", "/CN=rack-7 loader", "extendedKeyUsage=clientAuth\n");
    fs::copy(pki.join("ca-cert.pem"), other.join("ca-cert.pem")).unwrap();
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        r#"
[nbd]
enabled = true
listen = "0.0.0.0:{NBD_PORT}"

[nbd.tls]
certificate = "{pki}/server-cert.pem"
key = "{pki}/server-key.pem"
mode = "require"
client_ca = "{pki}/ca-cert.pem"
"#,
        pki = pki.display()
    ));
    fs::write(&env.config, cfg).unwrap();
    let image = dir.join("mtls-disk.raw");
    fs::write(&image, random_bytes(0x3715, IMAGE_BYTES)).unwrap();
    let out = fleetboot(&["image", "import", &s(&image), "--name", "mtls-disk", "--format", "raw"], &env.config);
    assert!(out.contains("imported mtls-disk:1"), "{out}");
    env.start_server();
    let srv = env.server_ns();
    env.lab
        .wait_listening(&srv, fleetboot_lab::netns::Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .expect("NBD listening");
    let ns = env.add_client(Some("10.77.0.21/24"), None).ns;
    let nbds = |certs: &Path| format!("nbds://10.77.0.1:{NBD_PORT}/mtls-disk?tls-certificates={}", certs.display());

    let got = dir.join("read-with-a-client-cert.raw");
    env.run_ok(&ns, &["nbdcopy", &nbds(&pki), &s(&got)], 60);
    assert_same_file("the image read by nbdcopy with a client certificate", &image, &got);
    let got = dir.join("read-by-qemu-img.raw");
    let (object, opts) = qemu_tls(&pki, "mtls-disk");
    env.run_ok(&ns, &["qemu-img", "convert", "-O", "raw", "--object", &object, "--image-opts", &opts, &s(&got)], 60);
    assert_same_file("the image read by qemu-img with a client certificate", &image, &got);

    let failures = |env: &mut Env| {
        let (code, body) = env.api(&[], "/metrics");
        assert_eq!(code, 200);
        parse_metric(&String::from_utf8_lossy(&body), "fleetboot_nbd_tls_failures_total")
    };
    for (who, certs) in [("no client certificate", &no_cert), ("a client certificate from another CA", &other)] {
        let before = failures(&mut env);
        let r = env.run(&ns, &["nbdinfo", &nbds(certs)], 60);
        assert!(!r.ok(), "nbdinfo with {who} read the disk: {}", r.stdout_str());
        assert!(env.eventually(50, |e| failures(e) > before), "nbdinfo with {who}: fleetboot_nbd_tls_failures_total stayed at {before}");
    }
    assert!(env.server_alive());
}

/// Runs `f` in network namespace `ns` and waits for what it returns.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    fleetboot_lab::netns::in_namespace(ns, f).join().expect("the thread in the namespace panicked")
}

/// What iPXE asks the ProxyDHCP boot server (port 4011) from address `me`: the boot file
/// of the answer, the script URL.
fn ipxe_proxy_boot_file(mac: [u8; 6], me: Ipv4Addr) -> String {
    let sock = UdpSocket::bind(SocketAddrV4::new(me, 68)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&mac);
    let mut m = DhcpMessage { op: BOOTREQUEST, xid: 0x4e42_4401, ciaddr: me, chaddr, ..DhcpMessage::default() };
    m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    m.set_option(opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001".to_vec());
    m.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    m.set_option(77, b"iPXE".to_vec());
    let req = m.encode();
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 4011);
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        sock.send_to(&req, to).unwrap();
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let reply = DhcpMessage::parse(&buf[..n]).expect("a DHCP message from 4011");
        let file = reply.option(67).map(<[u8]>::to_vec).unwrap_or_else(|| reply.file.clone());
        let file = String::from_utf8_lossy(&file).trim_end_matches('\0').to_string();
        if !file.is_empty() {
            return file;
        }
    }
    panic!("no boot file from {to}");
}

#[test]
fn proxydhcp_disk_urls_carry_a_capability_only_their_machine_gets() {
    if !e2e_ready("proxydhcp_disk_urls_carry_a_capability_only_their_machine_gets", &["nbdinfo", "nbdcopy"]) {
        return;
    }
    const MACHINE: &str = "52:54:00:77:0e:31";
    const MACHINE_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x0e, 0x31];
    let mut env = Env::new("nbd-proxy-cap");
    let dir = env.dir.path.clone();
    let cfg = fs::read_to_string(&env.config).unwrap();
    // ProxyDHCP: another server hands out the addresses; fleetboot knows no subnet, no
    // lease and no reservation.
    let (head, rest) = cfg.split_once("[dhcp]\n").unwrap();
    let (_, tail) = rest.split_once("[pxe]\n").unwrap();
    let mut cfg = format!("{head}[dhcp]\nmode = \"proxy\"\n\n[pxe]\n{tail}");
    cfg.push_str(&format!(
        r#"
[nbd]
enabled = true
listen = "0.0.0.0:{NBD_PORT}"
overlay = "private"

[[profile]]
name = "on-its-disk"
priority = 1
match = {{ mac = ["{MACHINE}"] }}
boot = {{ kind = "linux", kernel = "vmlinuz", cmdline = "console=ttyS0", disk = {{ image = "proxy-disk" }} }}
"#
    ));
    fs::write(&env.config, cfg).unwrap();
    fleetboot(&["check-config"], &env.config);
    let image = dir.join("proxy-disk.raw");
    fs::write(&image, random_bytes(0x9c0, IMAGE_BYTES)).unwrap();
    fleetboot(&["image", "import", &s(&image), "--name", "proxy-disk", "--format", "raw"], &env.config);
    env.start_server();
    let srv = env.server_ns();
    env.lab
        .wait_listening(&srv, fleetboot_lab::netns::Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .expect("NBD listening");
    // The addresses another DHCP server gave them.
    let machine = env.add_client(Some("10.77.0.31/24"), Some(MACHINE)).ns;
    let other = env.add_client(Some("10.77.0.32/24"), Some("52:54:00:77:0e:32")).ns;

    // The machine boots as iPXE would: its ProxyDHCP answer names its script, under the
    // script's capability; the script's disk URL carries a disk capability.
    let script_url = in_ns(&machine, || ipxe_proxy_boot_file(MACHINE_BYTES, Ipv4Addr::new(10, 77, 0, 31)));
    let script_cap = script_url
        .strip_prefix("http://10.77.0.1:8080/boot/")
        .and_then(|r| r.strip_suffix("/52-54-00-77-0e-31.ipxe"))
        .unwrap_or_else(|| panic!("not a script URL with a capability: {script_url}"))
        .to_string();
    let (code, body) = env.http(&machine, &[], &script_url);
    let script = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{script_url}: {script}");
    let disk = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetboot.disk="))
        .unwrap_or_else(|| panic!("no disk URL in the script: {script}"))
        .to_string();
    let prefix = format!("nbd://10.77.0.1:{NBD_PORT}/proxy-disk@52-54-00-77-0e-31~");
    let disk_cap = disk.strip_prefix(&prefix).unwrap_or_else(|| panic!("no capability in the disk URL: {disk}")).to_string();
    assert_ne!(disk_cap, script_cap, "the disk and the script share a capability");

    // The machine opens its disk with it (no reservation), writes, and reads it back.
    let written = dir.join("written.raw");
    fs::write(&written, random_bytes(0xcafe, IMAGE_BYTES)).unwrap();
    env.run_ok(&machine, &["nbdcopy", &s(&written), &disk], 60);
    let back = dir.join("read-back.raw");
    env.run_ok(&machine, &["nbdcopy", &disk, &s(&back)], 60);
    assert_same_file("the machine's own disk, written and read back", &written, &back);

    // Another host gets nowhere without the disk capability.
    let key = fleetboot_auth::CapabilityKey::load_or_create(&dir.join("data/capability.key")).unwrap();
    let expired = key.issue(fleetboot::serve::shared::NBD_SCOPE, &MACHINE_BYTES, 1_000_000);
    // One character of the tag changed (not the last: its low bits are padding).
    let mut forged: Vec<char> = disk_cap.chars().collect();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    let bare = format!("nbd://10.77.0.1:{NBD_PORT}/proxy-disk@52-54-00-77-0e-31");
    let refused = |env: &mut Env, reason: &str| {
        let (code, body) = env.api(&[], "/metrics");
        assert_eq!(code, 200);
        parse_metric(&String::from_utf8_lossy(&body), &format!("fleetboot_nbd_exports_refused_total{{reason=\"{reason}\"}}"))
    };
    for (url, reason, what) in [
        (bare.clone(), "not_holder", "no capability"),
        (format!("{bare}~{expired}"), "expired", "its expired capability"),
        (format!("{bare}~{forged}"), "forged", "a forged capability"),
        (format!("{bare}~{script_cap}"), "forged", "the capability of its script"),
    ] {
        let before = refused(&mut env, reason);
        let r = env.run(&other, &["nbdinfo", &url], 60);
        assert!(!r.ok(), "10.77.0.32 opened the machine's disk with {what}: {}", r.stdout_str());
        assert!(
            env.eventually(50, |e| refused(e, reason) > before),
            "{what}: fleetboot_nbd_exports_refused_total{{reason=\"{reason}\"}} stayed at {before}"
        );
    }
    // Nor can it read the disk through the overlay its owner wrote: nothing of it leaked.
    let r = env.run(&other, &["nbdcopy", &bare, &s(&dir.join("stolen.raw"))], 60);
    assert!(!r.ok(), "10.77.0.32 copied the machine's disk");
    assert!(env.server_alive());
}
