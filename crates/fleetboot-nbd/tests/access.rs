//! Who may open what, with real NBD clients on loopback: 127.0.0.1 is the clients' host,
//! 127.0.0.2 plays another machine of the same LAN (the raw client binds to it).
//!
//! The server here lets catalog images be read from 10.0.0.0/8 only (so not from
//! 127.0.0.1), and its client authority says which address acts as which MAC: 127.0.0.1
//! is client `…:01`, 127.0.0.2 is client `…:02`.

mod common;

use common::*;
use fleetboot_boot::MacAddr;
use fleetboot_nbd::access::{everyone, Access, AllowList, ClientAuthority, Decision};
use fleetboot_nbd::proto::{rep, InfoRequest, NbdOption};
use fleetboot_nbd::{Limits, OverlayMode, ServerOptions};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const MINE: &str = "img@aa-00-00-00-00-01";
const THEIRS: &str = "img@aa-00-00-00-00-02";
const OTHER_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Client `…:0N` is 127.0.0.N, as a lease table would say.
#[derive(Debug)]
struct Leases;

impl ClientAuthority for Leases {
    fn may_open(&self, peer: IpAddr, mac: MacAddr, _capability: Option<&str>) -> Decision {
        let holder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, mac.0[5]));
        if peer == holder {
            Decision::Allow
        } else {
            Decision::refuse("not_holder", format!("{peer} does not hold {mac}'s lease"))
        }
    }
}

fn guarded(limits: Limits) -> Fixture {
    let access = Access { allow: AllowList::parse(&["10.0.0.0/8"]).unwrap(), clients: Arc::new(Leases) };
    Fixture::with_options(OverlayMode::Standard, ServerOptions { access, limits, tls: None, send_from_files: true })
}

fn nbdinfo(args: &[&str]) -> (bool, String) {
    let out = Command::new("nbdinfo").args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn overlay_dirs(f: &Fixture) -> usize {
    walk(&f.dir.path().join("overlays"))
}

fn walk(p: &std::path::Path) -> usize {
    std::fs::read_dir(p).map_or(0, |rd| rd.flatten().filter(|e| e.path().is_dir()).map(|e| 1 + walk(&e.path())).sum())
}

/// nbdinfo and qemu-io get their own client's disk and nothing else: not another
/// client's overlay, not the catalog image, not the export list; nothing is created on
/// disk for what they were refused.
#[test]
fn a_client_gets_its_own_disk_and_nothing_else() {
    if !tools_ready("a_client_gets_its_own_disk_and_nothing_else", &["nbdinfo", "qemu-io"]) {
        return;
    }
    let f = guarded(Limits::default());
    let before = overlay_dirs(&f);

    let (ok, out) = nbdinfo(&["--json", &f.uri(MINE)]);
    assert!(ok, "its own overlay: {out}");
    assert!(out.contains("\"is_read_only\": false"), "{out}");

    let (ok, out) = nbdinfo(&["--json", &f.uri(THEIRS)]);
    assert!(!ok, "another client's overlay was described: {out}");
    assert!(!out.contains("export-size"), "{out}");
    // The refusal says why (nbdinfo does not print the server's message).
    let mut s = RawClient::start(f.addr);
    let r = RawClient::option(&mut s, &NbdOption::Info(InfoRequest { name: THEIRS.into(), requests: vec![] }));
    let last = r.last().unwrap();
    assert_eq!(last.reply, rep::ERR_POLICY);
    assert!(String::from_utf8_lossy(&last.data).contains("does not hold"), "{:?}", String::from_utf8_lossy(&last.data));
    drop(s);
    let (verdict, out) = qemu_io(&f.uri(THEIRS), &["write -P 0x66 0 64k"]);
    assert!(matches!(verdict, QemuIo::Broken(_) | QemuIo::OpenRefused(_)), "{verdict:?}: {out}");

    let (ok, out) = nbdinfo(&["--list", &f.uri("")]);
    assert!(!ok, "the export list reached a host outside nbd.allow: {out}");
    assert!(!out.contains("aa-00-00-00-00"), "{out}");
    let (ok, out) = nbdinfo(&["--json", &f.uri("img")]);
    assert!(!ok, "the catalog image reached a host outside nbd.allow: {out}");

    // Its own disk works end to end.
    assert_eq!(qemu_io(&f.uri(MINE), &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]).0, QemuIo::Ok);
    f.wait_released("aa-00-00-00-00-01", Duration::from_secs(10));
    // Refused names left nothing behind; the own standard overlay is gone after use too.
    assert!(f.exports.live_overlays().is_empty());
    assert_eq!(overlay_dirs(&f), before, "a refused name created an overlay directory");
    f.assert_image_unchanged();
}

/// Once a client's overlay is open, a connection from another address cannot join it,
/// even for an authority that would let that address act as the client.
#[test]
fn a_live_overlay_cannot_be_joined_from_another_address() {
    let access = Access { allow: everyone(), clients: Arc::new(fleetboot_nbd::access::AnyPeerIsAnyClient) };
    let f = Fixture::with_options(OverlayMode::Standard, ServerOptions::new(access));
    let mut owner = RawClient::connect(f.addr, MINE);
    let refused = RawClient::try_connect_from(f.addr, Some(OTHER_HOST), MINE, false).err();
    assert_eq!(refused, Some(rep::ERR_POLICY));
    // The owner's second connection joins (clients use several).
    let second = RawClient::try_connect_from(f.addr, None, MINE, false);
    assert!(second.is_ok());
    assert_eq!(owner.read(0, 4096), image_bytes()[..4096]);
}

/// Past the per-address cap a connection is closed before the greeting; another address
/// still gets in, and a freed slot serves the capped address again.
#[test]
fn connections_past_the_cap_are_closed_before_the_greeting() {
    let limits = Limits { max_connections: 5, max_connections_per_client: 3, ..Limits::default() };
    let access = Access { allow: everyone(), clients: Arc::new(Leases) };
    let f = Fixture::with_options(OverlayMode::Standard, ServerOptions { access, limits, tls: None, send_from_files: true });
    // Three connections in their handshake (never idle) fill this address's share.
    let mut held: Vec<_> = (0..3).map(|_| RawClient::start(f.addr)).collect();
    assert_closed_before_greeting(std::net::TcpStream::connect(f.addr).unwrap());
    // Another address still gets in, up to the global cap.
    let mut other: Vec<_> = (0..2).map(|_| RawClient::start_from(f.addr, Some(OTHER_HOST))).collect();
    assert_closed_before_greeting(std::net::TcpStream::connect(f.addr).unwrap());
    // The held connections still work.
    let r = RawClient::option(&mut held[0], &NbdOption::Info(InfoRequest { name: "img".into(), requests: vec![] }));
    assert_eq!(r.last().unwrap().reply, rep::ACK);
    let r = RawClient::option(&mut other[0], &NbdOption::Info(InfoRequest { name: THEIRS.into(), requests: vec![] }));
    assert_eq!(r.last().unwrap().reply, rep::ACK);
    // A freed slot is taken again.
    drop(held.pop());
    wait_for("a freed slot", Duration::from_secs(10), || {
        let mut s = std::net::TcpStream::connect(f.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut g).is_ok()
    });
}

fn assert_closed_before_greeting(mut s: std::net::TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 18];
    match std::io::Read::read(&mut s, &mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("a connection past the cap got {n} bytes of greeting"),
    }
}
