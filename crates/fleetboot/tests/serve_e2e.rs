//! `fleetboot serve`'s smaller services against real peers in private namespaces:
//!
//! - router advertisements (`[router_advertisement]`, `serve/ra.rs`): a host in a client
//!   namespace solicits like iPXE does while it waits for IPv6 and gets an answer; the
//!   advertisement is a well-formed NDP message (hop limit 255, from a link-local
//!   address) that offers no default route (router lifetime 0), no prefix and no DHCPv6
//!   (M/O off) — and the client's kernel, accepting RAs, ends up with no IPv6 default route
//!   and no address beyond its link-local one;
//! - the NBD service's export list: `nbdinfo --list` against `fleetboot serve` names
//!   every catalog image as `NAME` and `NAME:VERSION`, each with its size.
//!
//! Needs root, `ip`, `ss`, `timeout`, `sha256sum`, `curl` and `nbdinfo`; skips otherwise
//! unless `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{e2e_ready, host, s, Env, BIN};
use fleetboot_lab::netns::{Proto, CLIENT_IF, SERVER_IF};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use fleetboot_lab::netns::in_namespace;

/// Waits until no IPv6 address of `ns`/`dev` is still tentative (duplicate address
/// detection done): before that a host cannot send from its link-local address.
fn wait_dad(env: &Env, ns: &str, dev: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = env
            .lab
            .exec(ns, &["ip", "-6", "addr", "show", "dev", dev], Duration::from_secs(10))
            .expect("ip -6 addr");
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("scope link") && !text.contains("tentative") {
            return;
        }
        assert!(Instant::now() < end, "{ns}/{dev} still tentative after 30 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One ICMPv6 message as received: (source, hop limit from the IPv6 header, bytes).
type Icmp6 = (Ipv6Addr, i32, Vec<u8>);

/// A raw ICMPv6 socket on `CLIENT_IF` that reports each message's hop limit.
fn icmp6_socket() -> Socket {
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).expect("raw ICMPv6 socket");
    sock.bind_device(Some(CLIENT_IF.as_bytes())).unwrap();
    sock.set_multicast_hops_v6(255).unwrap();
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the given length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "IPV6_RECVHOPLIMIT: {}", std::io::Error::last_os_error());
    sock
}

/// The next router advertisement on `sock` before `deadline`, other ICMPv6 skipped.
fn next_ra(sock: &Socket, deadline: Instant) -> Option<Icmp6> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        let mut buf = [0u8; 1500];
        let mut name: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut control = [0u8; 128];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut name as *mut libc::sockaddr_in6 as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len();
        // SAFETY: recvmsg into the buffers described by msg.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) {
                continue;
            }
            panic!("recvmsg: {e}");
        }
        let bytes = buf[..n as usize].to_vec();
        if bytes.first() != Some(&134) {
            continue; // our own solicitation, neighbour discovery, ...
        }
        let mut hop_limit = -1;
        // SAFETY: walking the control messages recvmsg filled in, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                    hop_limit = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        return Some((Ipv6Addr::from(name.sin6_addr.s6_addr), hop_limit, bytes));
    }
}

/// What a router advertisement offers, from its bytes (RFC 4861 §4.2).
#[derive(Debug)]
struct Ra {
    managed: bool,
    other: bool,
    router_lifetime: u16,
    /// Option types present (3: prefix information, 24: route information, ...).
    options: Vec<u8>,
}

fn parse_ra(b: &[u8]) -> Ra {
    assert!(b.len() >= 16 && b[0] == 134 && b[1] == 0, "not a router advertisement: {b:02x?}");
    let mut options = Vec::new();
    let mut rest = &b[16..];
    while !rest.is_empty() {
        assert!(rest.len() >= 2 && rest[1] > 0, "malformed RA options: {b:02x?}");
        let len = rest[1] as usize * 8;
        assert!(len <= rest.len(), "RA option past the end: {b:02x?}");
        options.push(rest[0]);
        rest = &rest[len..];
    }
    Ra {
        managed: b[5] & 0x80 != 0,
        other: b[5] & 0x40 != 0,
        router_lifetime: u16::from_be_bytes([b[6], b[7]]),
        options,
    }
}

fn check_ra((from, hop_limit, bytes): &Icmp6, what: &str) {
    let ra = parse_ra(bytes);
    assert_eq!(*hop_limit, 255, "{what}: hop limit (receivers drop NDP below 255)");
    assert!(from.is_unicast_link_local(), "{what}: from {from}, not a link-local address");
    assert_eq!(ra.router_lifetime, 0, "{what}: offers itself as a default router: {ra:?}");
    assert!(!ra.managed && !ra.other, "{what}: sends hosts to DHCPv6: {ra:?}");
    assert!(
        !ra.options.contains(&3) && !ra.options.contains(&24),
        "{what}: offers a prefix or a route: {ra:?}"
    );
}

#[test]
fn router_advertisement_ends_the_wait_and_offers_nothing() {
    if !e2e_ready("router_advertisement_ends_the_wait_and_offers_nothing", &["sysctl"]) {
        return;
    }
    let mut env = Env::new("ra");
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg.push_str("\n[router_advertisement]\nenabled = true\n");
    std::fs::write(&env.config, cfg).unwrap();
    let c = env.add_client(Some("10.77.0.30/24"), None);
    // A host that takes what RAs offer: routes, prefixes (SLAAC), DHCPv6 hints.
    for key in ["accept_ra=1", "autoconf=1", "accept_ra_defrtr=1", "accept_ra_pinfo=1"] {
        let k = format!("net.ipv6.conf.{CLIENT_IF}.{key}");
        env.run_ok(&c.ns, &["sysctl", "-q", "-w", &k], 10);
    }
    let srv = env.server_ns();
    wait_dad(&env, &srv, SERVER_IF);
    wait_dad(&env, &c.ns, CLIENT_IF);

    // Listen before the server starts: its first advertisement is unsolicited.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let listener = in_namespace(&c.ns, move || {
        let sock = icmp6_socket();
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let first = next_ra(&sock, Instant::now() + Duration::from_secs(60));
        // Then wait as iPXE does: solicit (to ff02::2, all routers) and expect an answer.
        // The server's next unsolicited one is 60 s away, so an RA within 20 s answers us.
        // SAFETY: if_nametoindex on a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        let rs = [133u8, 0, 0, 0, 0, 0, 0, 0];
        let all_routers = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), 0, 0, ifindex);
        let sent = Instant::now();
        sock.send_to(&rs, &SockAddr::from(all_routers)).expect("sending a router solicitation");
        let answer = next_ra(&sock, sent + Duration::from_secs(20));
        (first, answer)
    });
    ready_rx.recv().unwrap();
    env.start_server();
    go_tx.send(()).unwrap();
    let (first, answer) = listener.join().expect("the listening thread");
    let first = first.unwrap_or_else(|| panic!("no router advertisement within 60 s of start\n{}", env.log_tail()));
    check_ra(&first, "unsolicited RA");
    let answer = answer.unwrap_or_else(|| {
        panic!("no router advertisement answered the solicitation within 20 s\n{}", env.log_tail())
    });
    check_ra(&answer, "solicited RA");

    // The client's kernel processed them (it accepts RAs): nothing changed its routing.
    let routes = env.run_ok(&c.ns, &["ip", "-6", "route", "show", "default"], 10).stdout_str();
    assert!(routes.trim().is_empty(), "an IPv6 default route appeared: {routes}");
    let global = env
        .run_ok(&c.ns, &["ip", "-6", "addr", "show", "dev", CLIENT_IF, "scope", "global"], 10)
        .stdout_str();
    assert!(global.trim().is_empty(), "an address from a prefix appeared: {global}");
}

const NBD_PORT: u16 = 10809;

#[test]
fn nbdinfo_lists_the_catalog_through_fleetboot_serve() {
    if !e2e_ready("nbdinfo_lists_the_catalog_through_fleetboot_serve", &["nbdinfo"]) {
        return;
    }
    let mut env = Env::new("nbd-list");
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!("\n[nbd]\nenabled = true\nlisten = \"0.0.0.0:{NBD_PORT}\"\n"));
    std::fs::write(&env.config, cfg).unwrap();
    // alpha:1 (1 MiB), alpha:2 (2 MiB + 512), beta:1 (64 KiB).
    let images = [("alpha", 1 << 20), ("alpha", (2 << 20) + 512), ("beta", 64 << 10)];
    for (i, (name, size)) in images.iter().enumerate() {
        let f = env.dir.join(format!("img{i}.raw"));
        std::fs::write(&f, common::random_bytes(i as u64 + 1, *size)).unwrap();
        let cfg = s(&env.config);
        host(&[BIN, "image", "import", &s(&f), "--name", name, "--format", "raw", "--config", &cfg], 60);
    }
    env.start_server();
    let srv = env.server_ns();
    env.lab
        .wait_listening(&srv, Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .expect("NBD listening");
    let c = env.add_client(Some("10.77.0.31/24"), None);
    let uri = format!("nbd://10.77.0.1:{NBD_PORT}");
    let out = env.run_ok(&c.ns, &["nbdinfo", "--list", "--json", &uri], 60).stdout_str();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {out}"));
    let mut got: Vec<(String, u64)> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports in {v:#}"))
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap()))
        .collect();
    got.sort();
    let want: Vec<(String, u64)> = vec![
        ("alpha".into(), (2 << 20) + 512), // the latest version
        ("alpha:1".into(), 1 << 20),
        ("alpha:2".into(), (2 << 20) + 512),
        ("beta".into(), 64 << 10),
        ("beta:1".into(), 64 << 10),
    ];
    assert_eq!(got, want, "nbdinfo --list:\n{out}");
    // The plain listing names them too (what an operator types).
    let text = env.run_ok(&c.ns, &["nbdinfo", "--list", &uri], 60).stdout_str();
    for (name, _) in &want {
        assert!(text.contains(&format!("export=\"{name}\"")) || text.contains(&format!("export=\"{name}\":")), "{name} missing from:\n{text}");
    }
}
