//! Message flows through the engine (port 67) and the boot server (port 4011), built the
//! way real clients build them.

use fleetboot_boot::{ClientIdentity, MacAddr};
use fleetboot_dhcp::codec::{opt, FLAG_BROADCAST};
use fleetboot_dhcp::pxe::{discovery, BootItem};
use fleetboot_dhcp::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const T0: u64 = 1_700_000_000;

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, n)
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x77, 0x00, n])
}

fn subnet(net: [u8; 3], lo: u8, hi: u8) -> Subnet {
    let a = |n| Ipv4Addr::new(net[0], net[1], net[2], n);
    Subnet {
        network: a(0),
        prefix_len: 24,
        range_start: a(lo),
        range_end: a(hi),
        router: Some(a(1)),
        dns: vec![a(1), Ipv4Addr::new(9, 9, 9, 9)],
        domain: Some("lab.example".into()),
        lease_time: 3600,
    }
}

fn config(mode: Mode) -> EngineConfig {
    EngineConfig {
        mode,
        server_ip: SERVER,
        subnets: vec![subnet([10, 77, 0], 100, 110), subnet([10, 88, 0], 100, 110)],
        reservations: vec![Reservation {
            mac: Some(mac(0x50)),
            client_id: None,
            ip: ip(50),
        }],
        ..EngineConfig::default()
    }
}

fn advisor(id: &ClientIdentity) -> Option<BootOffer> {
    let file = if id.is_ipxe {
        format!("http://10.77.0.1:8080/boot/{}.ipxe", id.mac.hyphenated())
    } else if id.arch.is_some_and(|a| a.is_http_boot()) {
        "http://10.77.0.1:8080/ipxe.efi".into()
    } else {
        "undionly.kpxe".into()
    };
    Some(BootOffer {
        file,
        next_server: SERVER,
    })
}

/// What iPXE's DHCPDISCOVER carries (captured from the lab's QEMU firmware).
fn ipxe(mt: MessageType, m: MacAddr) -> DhcpMessage {
    let mut msg = pxe_rom(mt, m);
    msg.set_option(opt::USER_CLASS, b"iPXE".to_vec());
    msg.set_option(
        opt::IPXE_ENCAP,
        vec![0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0x13, 0x01, 0x01],
    );
    let mut cid = vec![1];
    cid.extend_from_slice(&m.0);
    msg.set_option(opt::CLIENT_ID, cid);
    msg
}

/// A PXE ROM that is not iPXE.
fn pxe_rom(mt: MessageType, m: MacAddr) -> DhcpMessage {
    let mut msg = plain(mt, m);
    msg.flags = FLAG_BROADCAST;
    msg.set_option(opt::MAX_MESSAGE_SIZE, 1472u16.to_be_bytes().to_vec());
    msg.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    msg.set_option(opt::CLIENT_NII, vec![1, 2, 1]);
    let mut uuid = vec![0];
    uuid.extend(0x10..0x20u8);
    msg.set_option(opt::CLIENT_UUID, uuid);
    msg.set_option(
        opt::VENDOR_CLASS,
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    );
    msg.set_option(
        opt::PARAMETER_LIST,
        vec![1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 175],
    );
    msg
}

/// dhclient: no PXE anything.
fn plain(mt: MessageType, m: MacAddr) -> DhcpMessage {
    let mut msg = DhcpMessage {
        xid: 0x1234_5678,
        ..DhcpMessage::default()
    };
    msg.set_mac(m);
    msg.set_option(opt::MESSAGE_TYPE, vec![mt as u8]);
    msg.set_option(opt::PARAMETER_LIST, vec![1, 28, 2, 3, 15, 6, 12]);
    msg
}

fn with(mut msg: DhcpMessage, code: u8, v: impl Into<Vec<u8>>) -> DhcpMessage {
    msg.set_option(code, v);
    msg
}

fn selecting(msg: DhcpMessage, offered: Ipv4Addr, server: Ipv4Addr) -> DhcpMessage {
    let msg = with(msg, opt::REQUESTED_IP, offered.octets());
    with(msg, opt::SERVER_ID, server.octets())
}

type Advisor = fn(&ClientIdentity) -> Option<BootOffer>;
type TestEngine = Engine<Advisor>;
const ADVISOR: Advisor = advisor;

/// A datagram a machine sent.
#[derive(Debug, Clone)]
struct Sent {
    dest: SocketAddrV4,
    /// To 255.255.255.255.
    broadcast: bool,
    bytes: Vec<u8>,
}

/// What a machine did with one datagram: its replies, the lease changes it asked to
/// persist (taken as committed at once), its trace lines, and why it dropped the datagram.
#[derive(Debug, Default)]
struct Output {
    transmits: Vec<Sent>,
    lease_changes: Vec<LeaseChange>,
    events: Vec<Trace>,
    dropped: Option<String>,
}

/// The monotonic clock `now - T0` seconds after the tests' start.
fn instant(now: u64) -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now) + Duration::from_secs(now.saturating_sub(T0))
}

fn drain(now: Instant, mut poll: impl FnMut(Instant, &mut Vec<u8>) -> Option<Transmit>) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(t) = poll(now, &mut buf) {
        let bytes = buf[buf.len() - t.size..].to_vec();
        let SocketAddr::V4(dest) = t.destination else { panic!("{t:?}") };
        out.push(Sent { dest, broadcast: *dest.ip() == Ipv4Addr::BROADCAST, bytes });
    }
    out
}

fn exchange<A: BootAdvisor>(e: &mut Engine<A>, now: u64, source: SocketAddrV4, bytes: &[u8]) -> Output {
    let at = instant(now);
    e.handle(at, now, SocketAddr::V4(source), bytes);
    let mut out = Output::default();
    while let Some(ev) = e.poll_event() {
        match ev {
            Event::Persist { ticket, changes } => {
                out.lease_changes.extend(changes);
                e.committed(ticket);
            }
            Event::Trace(t) => out.events.push(t),
            Event::Dropped { reason, .. } => out.dropped = Some(reason),
        }
    }
    out.transmits = drain(at, |n, b| e.poll_transmit(n, b));
    out
}

fn send_from(e: &mut TestEngine, now: u64, msg: &DhcpMessage, source: SocketAddrV4) -> Output {
    exchange(e, now, source, &msg.encode())
}

fn send(e: &mut TestEngine, now: u64, msg: &DhcpMessage) -> Output {
    send_from(e, now, msg, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))
}

/// A boot server on port 4011 with the boot profiles of `advisor`.
fn boot_server<A: BootAdvisor>(advisor: A) -> BootServer<A> {
    BootServer::new(BootServerConfig { server_ip: SERVER, client_port: 68, proxy_requests: true, multicast: None }, advisor)
}

fn ask_4011<A: BootAdvisor>(b: &mut BootServer<A>, msg: &[u8], source: SocketAddrV4) -> Output {
    let at = instant(T0);
    b.handle(at, SocketAddr::V4(source), msg);
    let mut out = Output::default();
    while let Some(ev) = b.poll_event() {
        match ev {
            BootEvent::Trace(t) => out.events.push(t),
            BootEvent::Dropped { reason, .. } => out.dropped = Some(reason),
            other => panic!("no multicast files here: {other:?}"),
        }
    }
    out.transmits = drain(at, |n, buf| b.poll_transmit(n, buf));
    out
}

fn only_reply(out: &Output) -> (DhcpMessage, Sent) {
    assert_eq!(out.transmits.len(), 1, "expected one transmit: {out:#?}");
    let t = out.transmits[0].clone();
    (DhcpMessage::parse(&t.bytes).unwrap(), t)
}

fn server() -> TestEngine {
    Engine::new(config(Mode::Server), ADVISOR).unwrap()
}

fn bcast() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
}

#[test]
fn ipxe_dora_gets_script_and_no_pxedhcp() {
    let mut e = server();
    let out = send(&mut e, T0, &ipxe(MessageType::Discover, mac(0x10)));
    let (offer, t) = only_reply(&out);
    assert!(out.lease_changes.is_empty(), "offers are not persisted");
    assert_eq!((t.dest, t.broadcast), (bcast(), true));
    assert_eq!(offer.op, 2);
    assert_eq!(offer.xid, 0x1234_5678);
    assert_eq!(offer.message_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr, ip(100));
    assert_eq!(offer.server_id(), Some(SERVER));
    assert_eq!(
        offer.option(opt::LEASE_TIME),
        Some(&3600u32.to_be_bytes()[..])
    );
    assert_eq!(
        offer.option(opt::RENEWAL_TIME),
        Some(&1800u32.to_be_bytes()[..])
    );
    assert_eq!(
        offer.option(opt::REBINDING_TIME),
        Some(&3150u32.to_be_bytes()[..])
    );
    assert_eq!(
        offer.option(opt::SUBNET_MASK),
        Some(&[255, 255, 255, 0][..])
    );
    assert_eq!(offer.option(opt::ROUTER), Some(&[10, 77, 0, 1][..]));
    assert_eq!(
        offer.option(opt::DNS),
        Some(&[10, 77, 0, 1, 9, 9, 9, 9][..])
    );
    assert_eq!(offer.option(opt::DOMAIN), Some(&b"lab.example"[..]));
    assert_eq!(offer.vendor_class().as_deref(), Some("PXEClient"));
    assert_eq!(offer.siaddr, SERVER);
    let url = "http://10.77.0.1:8080/boot/52-54-00-77-00-10.ipxe";
    assert_eq!(offer.file, url.as_bytes());
    assert_eq!(offer.option(opt::BOOTFILE), Some(url.as_bytes()));
    assert_eq!(offer.option(opt::IPXE_ENCAP), Some(&[176, 1, 1][..]));
    assert_eq!(
        offer.client_uuid(),
        Some(core::array::from_fn(|i| 0x10 + i as u8))
    );
    let pxe = PxeOptions::decode(offer.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
    assert_eq!(pxe.discovery_control, Some(discovery::USE_BOOTFILE));
    assert!(out.events.iter().any(|ev| ev.kind == "DHCPDISCOVER"));
    assert!(out
        .events
        .iter()
        .any(|ev| ev.kind == "DHCPOFFER" && ev.detail.contains(url)));

    let out = send(
        &mut e,
        T0 + 1,
        &selecting(ipxe(MessageType::Request, mac(0x10)), ip(100), SERVER),
    );
    let (ack, t) = only_reply(&out);
    assert!(t.broadcast);
    assert_eq!(ack.message_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr, ip(100));
    assert_eq!(ack.option(opt::IPXE_ENCAP), Some(&[176, 1, 1][..]));
    let [LeaseChange::Bound(lease)] = &out.lease_changes[..] else {
        panic!("{:?}", out.lease_changes)
    };
    assert_eq!(
        (lease.ip, lease.mac, lease.expires_at),
        (ip(100), mac(0x10), T0 + 1 + 3600)
    );
    assert_eq!(
        lease.client_id.as_deref(),
        Some(&[1, 0x52, 0x54, 0x00, 0x77, 0x00, 0x10][..])
    );
    assert!(out
        .events
        .iter()
        .any(|ev| ev.kind == "DHCPACK" && ev.detail.starts_with("10.77.0.100 file=")));
}

#[test]
fn pxe_rom_gets_tftp_boot_file_without_ipxe_options() {
    let mut e = server();
    let out = send(&mut e, T0, &pxe_rom(MessageType::Discover, mac(0x11)));
    let (offer, _) = only_reply(&out);
    assert_eq!(offer.file, b"undionly.kpxe");
    assert_eq!(offer.sname, b"10.77.0.1");
    assert_eq!(offer.option(opt::TFTP_SERVER), Some(&b"10.77.0.1"[..]));
    assert_eq!(offer.siaddr, SERVER);
    assert!(!offer.has_ipxe_encap());
    assert!(offer.has_option(opt::VENDOR_SPECIFIC));
}

#[test]
fn plain_client_gets_plain_lease() {
    let mut e = server();
    let out = send(&mut e, T0, &plain(MessageType::Discover, mac(0x12)));
    let (offer, _) = only_reply(&out);
    assert_eq!(offer.yiaddr, ip(100));
    for code in [
        opt::VENDOR_CLASS,
        opt::BOOTFILE,
        opt::VENDOR_SPECIFIC,
        opt::TFTP_SERVER,
        opt::IPXE_ENCAP,
    ] {
        assert!(!offer.has_option(code), "option {code}");
    }
    assert!(offer.file.is_empty() && offer.sname.is_empty());
    assert_eq!(offer.siaddr, Ipv4Addr::UNSPECIFIED);
    // dhclient asked for 28.
    assert_eq!(offer.option(opt::BROADCAST), Some(&[10, 77, 0, 255][..]));
}

#[test]
fn http_boot_client_gets_httpclient_and_url() {
    let mut e = server();
    let mut msg = pxe_rom(MessageType::Discover, mac(0x13));
    msg.set_option(
        opt::VENDOR_CLASS,
        b"HTTPClient:Arch:00016:UNDI:003001".to_vec(),
    );
    msg.set_option(opt::CLIENT_ARCH, vec![0, 16]);
    let (offer, _) = only_reply(&send(&mut e, T0, &msg));
    assert_eq!(offer.vendor_class().as_deref(), Some("HTTPClient"));
    assert_eq!(
        offer.option(opt::BOOTFILE),
        Some(&b"http://10.77.0.1:8080/ipxe.efi"[..])
    );
    assert!(!offer.has_option(opt::VENDOR_SPECIFIC));
}

#[test]
fn offers_are_held_and_sticky() {
    let mut e = server();
    let a = send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    let b = send(&mut e, T0, &plain(MessageType::Discover, mac(2)));
    let a2 = send(&mut e, T0 + 2, &plain(MessageType::Discover, mac(1)));
    assert_eq!(only_reply(&a).0.yiaddr, ip(100));
    assert_eq!(only_reply(&b).0.yiaddr, ip(101));
    assert_eq!(
        only_reply(&a2).0.yiaddr,
        ip(100),
        "a retransmitted DISCOVER gets the same offer"
    );
    // Asking for an address another client holds an offer for does not take it.
    let c = send(
        &mut e,
        T0 + 3,
        &with(
            plain(MessageType::Discover, mac(3)),
            opt::REQUESTED_IP,
            ip(101).octets(),
        ),
    );
    assert_eq!(only_reply(&c).0.yiaddr, ip(102));
    // Requested and free: granted.
    let d = send(
        &mut e,
        T0 + 3,
        &with(
            plain(MessageType::Discover, mac(4)),
            opt::REQUESTED_IP,
            ip(107).octets(),
        ),
    );
    assert_eq!(only_reply(&d).0.yiaddr, ip(107));
}

#[test]
fn request_for_another_server_forgets_our_offer() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    let other = Ipv4Addr::new(10, 77, 0, 2);
    let out = send(
        &mut e,
        T0 + 1,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), other),
    );
    assert!(out.transmits.is_empty() && out.lease_changes.is_empty());
    assert!(out.dropped.unwrap().contains("10.77.0.2"));
    let out = send(&mut e, T0 + 2, &plain(MessageType::Discover, mac(2)));
    assert_eq!(only_reply(&out).0.yiaddr, ip(100));
}

#[test]
fn selecting_an_address_held_by_another_is_naked() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );
    let out = send(
        &mut e,
        T0 + 1,
        &selecting(plain(MessageType::Request, mac(2)), ip(100), SERVER),
    );
    let (nak, t) = only_reply(&out);
    assert_eq!(nak.message_type(), Some(MessageType::Nak));
    assert!(t.broadcast && out.lease_changes.is_empty());
}

#[test]
fn init_reboot() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );
    let reboot = |m, addr: Ipv4Addr| {
        with(
            plain(MessageType::Request, m),
            opt::REQUESTED_IP,
            addr.octets(),
        )
    };

    // Its own address: ACK, lease extended.
    let out = send(&mut e, T0 + 100, &reboot(mac(1), ip(100)));
    assert_eq!(only_reply(&out).0.message_type(), Some(MessageType::Ack));
    assert!(
        matches!(&out.lease_changes[..], [LeaseChange::Bound(l)] if l.expires_at == T0 + 100 + 3600)
    );

    // Someone else's, or one we never gave it, or another subnet: NAK, broadcast.
    for (m, addr) in [
        (mac(2), ip(100)),
        (mac(2), ip(105)),
        (mac(1), Ipv4Addr::new(192, 168, 1, 5)),
    ] {
        let out = send(&mut e, T0 + 100, &reboot(m, addr));
        let (nak, t) = only_reply(&out);
        assert_eq!(nak.message_type(), Some(MessageType::Nak), "{addr}");
        assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!((t.dest, t.broadcast), (bcast(), true));
        assert!(out.events.iter().any(|ev| ev.kind == "DHCPNAK"));
    }

    // Not authoritative: silence instead.
    let mut quiet = Engine::new(
        EngineConfig {
            authoritative: false,
            ..config(Mode::Server)
        },
        ADVISOR,
    )
    .unwrap();
    let out = send(&mut quiet, T0, &reboot(mac(2), ip(105)));
    assert!(out.transmits.is_empty() && out.dropped.is_some());
}

#[test]
fn renewing_is_unicast_and_extends() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );
    let mut renew = plain(MessageType::Request, mac(1));
    renew.ciaddr = ip(100);
    let out = send_from(&mut e, T0 + 1800, &renew, SocketAddrV4::new(ip(100), 68));
    let (ack, t) = only_reply(&out);
    assert_eq!(
        (ack.message_type(), ack.yiaddr, ack.ciaddr),
        (Some(MessageType::Ack), ip(100), ip(100))
    );
    assert_eq!(
        (t.dest, t.broadcast),
        (SocketAddrV4::new(ip(100), 68), false)
    );
    assert!(
        matches!(&out.lease_changes[..], [LeaseChange::Bound(l)] if l.expires_at == T0 + 1800 + 3600)
    );

    // Renewing an address it does not hold: NAK, broadcast (the client may not have it).
    let mut bogus = plain(MessageType::Request, mac(2));
    bogus.ciaddr = ip(100);
    let (nak, t) = only_reply(&send(&mut e, T0 + 1800, &bogus));
    assert_eq!(nak.message_type(), Some(MessageType::Nak));
    assert!(t.broadcast);
}

#[test]
fn release_and_decline() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );

    let decline = selecting(plain(MessageType::Decline, mac(1)), ip(100), SERVER);
    let out = send(&mut e, T0 + 5, &decline);
    assert!(out.transmits.is_empty());
    assert!(
        matches!(&out.lease_changes[..], [LeaseChange::Declined(l)] if l.ip == ip(100) && l.state == LeaseState::Declined)
    );
    // Quarantined: the next client, and the decliner, get another address.
    for m in [mac(1), mac(2)] {
        let out = send(&mut e, T0 + 10, &plain(MessageType::Discover, m));
        assert_ne!(only_reply(&out).0.yiaddr, ip(100));
    }

    let mut e = server();
    send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );
    let mut release = with(
        plain(MessageType::Release, mac(2)),
        opt::SERVER_ID,
        SERVER.octets(),
    );
    release.ciaddr = ip(100);
    let out = send(&mut e, T0 + 5, &release);
    assert!(
        out.lease_changes.is_empty(),
        "another client cannot release it"
    );
    release.set_mac(mac(1));
    let out = send(&mut e, T0 + 5, &release);
    assert_eq!(out.lease_changes, [LeaseChange::Removed(ip(100))]);
    assert!(out.transmits.is_empty());
}

#[test]
fn inform_gets_options_but_no_lease() {
    let mut e = server();
    let mut inform = plain(MessageType::Inform, mac(1));
    inform.ciaddr = ip(20);
    let out = send_from(&mut e, T0, &inform, SocketAddrV4::new(ip(20), 68));
    let (ack, t) = only_reply(&out);
    assert_eq!(ack.message_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert!(!ack.has_option(opt::LEASE_TIME));
    assert!(ack.has_option(opt::SUBNET_MASK) && ack.has_option(opt::ROUTER));
    assert_eq!(
        (t.dest, t.broadcast),
        (SocketAddrV4::new(ip(20), 68), false)
    );
    assert!(out.lease_changes.is_empty());
}

#[test]
fn relayed_requests_use_the_relay_subnet() {
    let mut e = server();
    let mut d = ipxe(MessageType::Discover, mac(1));
    d.giaddr = RELAY;
    d.hops = 1;
    let (offer, t) = only_reply(&send_from(&mut e, T0, &d, SocketAddrV4::new(RELAY, 67)));
    assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 88, 0, 100));
    assert_eq!(offer.giaddr, RELAY);
    assert_eq!(offer.hops, 1);
    assert_eq!(offer.option(opt::ROUTER), Some(&[10, 88, 0, 1][..]));
    assert_eq!((t.dest, t.broadcast), (SocketAddrV4::new(RELAY, 67), false));

    let mut r = selecting(ipxe(MessageType::Request, mac(1)), offer.yiaddr, SERVER);
    r.giaddr = RELAY;
    let out = send(&mut e, T0, &r);
    let (ack, t) = only_reply(&out);
    assert_eq!(ack.message_type(), Some(MessageType::Ack));
    assert_eq!(t.dest, SocketAddrV4::new(RELAY, 67));

    // A NAK through a relay goes to the relay with the broadcast bit set.
    let mut bad = with(
        plain(MessageType::Request, mac(2)),
        opt::REQUESTED_IP,
        ip(100).octets(),
    );
    bad.giaddr = RELAY;
    let (nak, t) = only_reply(&send(&mut e, T0, &bad));
    assert_eq!(nak.message_type(), Some(MessageType::Nak));
    assert!(nak.broadcast_flag());
    assert_eq!((t.dest, t.broadcast), (SocketAddrV4::new(RELAY, 67), false));

    // A relay in no configured subnet.
    let mut stray = plain(MessageType::Discover, mac(3));
    stray.giaddr = Ipv4Addr::new(172, 16, 0, 1);
    let out = send(&mut e, T0, &stray);
    assert!(out.transmits.is_empty() && out.dropped.is_some());
}

#[test]
fn reservations_win() {
    let mut e = server();
    let d = with(
        plain(MessageType::Discover, mac(0x50)),
        opt::REQUESTED_IP,
        ip(104).octets(),
    );
    assert_eq!(only_reply(&send(&mut e, T0, &d)).0.yiaddr, ip(50));
    let out = send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(0x50)), ip(50), SERVER),
    );
    assert_eq!(only_reply(&out).0.message_type(), Some(MessageType::Ack));
    // Nobody else may have it, even by asking.
    let out = send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(50), SERVER),
    );
    assert_eq!(only_reply(&out).0.message_type(), Some(MessageType::Nak));
}

#[test]
fn restart_restores_leases() {
    let mut e = server();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    let out = send(
        &mut e,
        T0,
        &selecting(plain(MessageType::Request, mac(1)), ip(100), SERVER),
    );
    let LeaseChange::Bound(lease) = out.lease_changes[0].clone() else {
        panic!()
    };

    let mut e = server();
    e.load_lease(lease);
    let out = send(&mut e, T0 + 10, &plain(MessageType::Discover, mac(2)));
    assert_eq!(only_reply(&out).0.yiaddr, ip(101));
    let out = send(&mut e, T0 + 10, &plain(MessageType::Discover, mac(1)));
    assert_eq!(only_reply(&out).0.yiaddr, ip(100));
}

#[test]
fn pool_exhaustion_is_reported() {
    let mut cfg = config(Mode::Server);
    cfg.subnets[0].range_end = ip(101);
    let mut e = Engine::new(cfg, ADVISOR).unwrap();
    send(&mut e, T0, &plain(MessageType::Discover, mac(1)));
    send(&mut e, T0, &plain(MessageType::Discover, mac(2)));
    let out = send(&mut e, T0, &plain(MessageType::Discover, mac(3)));
    assert!(out.transmits.is_empty());
    assert!(out.dropped.unwrap().contains("no free address"));
    // Offers lapse after offer_hold_secs.
    let out = send(&mut e, T0 + 31, &plain(MessageType::Discover, mac(3)));
    assert_eq!(only_reply(&out).0.yiaddr, ip(100));
}

#[test]
fn proxy_answers_pxe_clients_only() {
    let mut e = Engine::new(config(Mode::Proxy), ADVISOR).unwrap();
    for msg in [
        ipxe(MessageType::Discover, mac(1)),
        pxe_rom(MessageType::Discover, mac(2)),
    ] {
        let out = send(&mut e, T0, &msg);
        let (offer, t) = only_reply(&out);
        assert_eq!(offer.message_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.siaddr, SERVER);
        assert_eq!(offer.server_id(), Some(SERVER));
        assert_eq!(offer.vendor_class().as_deref(), Some("PXEClient"));
        assert!(offer.client_uuid().is_some());
        assert!(!offer.has_option(opt::LEASE_TIME) && !offer.has_option(opt::SUBNET_MASK));
        let pxe = PxeOptions::decode(offer.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
        assert_eq!(pxe.discovery_control, Some(11));
        assert_eq!(pxe.boot_servers[0].addrs, [SERVER]);
        assert_eq!(pxe.boot_menu.len(), 1);
        assert_eq!(pxe.menu_prompt.unwrap().timeout, 0);
        assert!(!offer.file.is_empty());
        assert_eq!((t.dest, t.broadcast), (bcast(), true));
        assert!(out.lease_changes.is_empty());
        assert!(out.events.iter().any(|ev| ev.kind == "PROXYOFFER"));
    }
    // The REQUEST to the real DHCP server is not ours; one to us is.
    let other = Ipv4Addr::new(10, 77, 0, 254);
    let out = send(
        &mut e,
        T0,
        &selecting(ipxe(MessageType::Request, mac(1)), ip(150), other),
    );
    assert!(out.transmits.is_empty());
    let out = send(
        &mut e,
        T0,
        &with(
            ipxe(MessageType::Request, mac(1)),
            opt::REQUESTED_IP,
            ip(150).octets(),
        ),
    );
    let (ack, _) = only_reply(&out);
    assert_eq!(
        (ack.message_type(), ack.yiaddr),
        (Some(MessageType::Ack), Ipv4Addr::UNSPECIFIED)
    );

    for msg in [
        plain(MessageType::Discover, mac(3)),
        plain(MessageType::Request, mac(3)),
    ] {
        let out = send(&mut e, T0, &msg);
        assert!(out.transmits.is_empty() && out.lease_changes.is_empty());
        assert!(out.dropped.is_some());
    }
    assert_eq!(e.leases().iter().count(), 0);
}

/// Port 4011 without multicast files: the boot server answers boot server discovery and
/// the ProxyDHCP REQUEST from the boot profiles, in either DHCP mode (it has no mode).
#[test]
fn boot_server_port_4011() {
    let mut b = boot_server(ADVISOR);
    let mut req = pxe_rom(MessageType::Request, mac(1));
    req.ciaddr = ip(150);
    let asked = PxeOptions {
        boot_item: Some(BootItem {
            server_type: 0x8000,
            layer: 0,
        }),
        ..Default::default()
    };
    req.set_option(opt::VENDOR_SPECIFIC, asked.encode());
    let src = SocketAddrV4::new(ip(150), 68);
    let out = ask_4011(&mut b, &req.encode(), src);
    let (ack, t) = only_reply(&out);
    assert_eq!((t.dest, t.broadcast), (src, false));
    assert_eq!(ack.message_type(), Some(MessageType::Ack));
    assert_eq!(ack.server_id(), Some(SERVER));
    assert_eq!(ack.vendor_class().as_deref(), Some("PXEClient"));
    assert_eq!(ack.file, b"undionly.kpxe");
    assert_eq!(ack.ciaddr, ip(150));
    assert!(ack.client_uuid().is_some());
    let pxe = PxeOptions::decode(ack.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
    assert_eq!(pxe.boot_item, asked.boot_item);
    assert!(out.events.iter().any(|ev| ev.kind == "BOOTSERVER-ACK"));
    assert!(out.events.iter().any(|ev| ev.kind == "DHCPREQUEST" && ev.detail.contains("port=4011")));

    // No source address, a ciaddr: to it, on the client port.
    let mut from_nowhere = pxe_rom(MessageType::Request, mac(1));
    from_nowhere.ciaddr = ip(151);
    let out = ask_4011(&mut b, &from_nowhere.encode(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    assert_eq!(only_reply(&out).1.dest, SocketAddrV4::new(ip(151), 68));
    // No source address and no ciaddr: broadcast to port 68.
    let out = ask_4011(&mut b, &pxe_rom(MessageType::Request, mac(1)).encode(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    let (_, t) = only_reply(&out);
    assert_eq!((t.dest, t.broadcast), (bcast(), true));

    for msg in [plain(MessageType::Request, mac(3)), pxe_rom(MessageType::Discover, mac(3))] {
        let out = ask_4011(&mut b, &msg.encode(), src);
        assert!(out.transmits.is_empty() && out.dropped.is_some());
    }
    // A negotiator on its own (no boot profiles) answers nothing here.
    let mut alone = boot_server(NoBootFiles);
    let out = ask_4011(&mut alone, &req.encode(), src);
    assert!(out.transmits.is_empty());
    assert!(out.dropped.unwrap().contains("no boot offer"));
}

#[test]
fn malformed_input_is_dropped() {
    let mut e = server();
    let good = ipxe(MessageType::Discover, mac(1)).encode();
    let end = 240 + good[240..].iter().position(|&b| b == 255).unwrap();
    let mut cases: Vec<Vec<u8>> = (0..end).map(|n| good[..n].to_vec()).collect();
    cases.retain(|c| c.len() < 240 || DhcpMessage::parse(c).is_err());
    let mut bad_len = good[..240].to_vec();
    bad_len.extend_from_slice(&[53, 1, 1, 60, 200, b'P']);
    cases.push(bad_len);
    let mut flood = good[..240].to_vec();
    flood.extend_from_slice(&[53, 1, 1]);
    (0..3000).for_each(|_| flood.extend_from_slice(&[77, 0]));
    cases.push(flood);
    let mut no_cookie = good.clone();
    no_cookie[236..240].copy_from_slice(&[0, 0, 0, 0]);
    cases.push(no_cookie);
    let mut reply = good.clone();
    reply[0] = 2;
    cases.push(reply);
    cases.push(
        plain(MessageType::Discover, mac(1))
            .encode()
            .into_iter()
            .take(240)
            .collect(),
    );
    cases.push(
        with(
            plain(MessageType::Discover, mac(1)),
            opt::MESSAGE_TYPE,
            vec![42],
        )
        .encode(),
    );
    cases.push(
        with(
            plain(MessageType::Discover, mac(1)),
            opt::MESSAGE_TYPE,
            vec![1, 1],
        )
        .encode(),
    );
    cases.push(plain(MessageType::Offer, mac(1)).encode());
    let mut b = boot_server(ADVISOR);
    let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    for (i, c) in cases.iter().enumerate() {
        for out in [exchange(&mut e, T0, from, c), ask_4011(&mut b, c, from)] {
            assert!(out.transmits.is_empty(), "case {i}");
            assert!(out.lease_changes.is_empty(), "case {i}");
            assert!(out.dropped.is_some(), "case {i}");
        }
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
            let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
            for mode in [Mode::Server, Mode::Proxy] {
                let mut e = Engine::new(config(mode), ADVISOR).unwrap();
                prop_assert!(exchange(&mut e, T0, from, &bytes).transmits.is_empty());
            }
            prop_assert!(ask_4011(&mut boot_server(ADVISOR), &bytes, from).transmits.is_empty());
        }

        #[test]
        fn random_options_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..600), mt in 0u8..10) {
            let mut bytes = plain(MessageType::Discover, mac(1)).encode();
            bytes.truncate(240);
            bytes.extend_from_slice(&[53, 1, mt]);
            bytes.extend_from_slice(&tail);
            let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
            for mode in [Mode::Server, Mode::Proxy] {
                let mut e = Engine::new(config(mode), ADVISOR).unwrap();
                for t in &exchange(&mut e, T0, from, &bytes).transmits {
                    prop_assert!(DhcpMessage::parse(&t.bytes).is_ok());
                }
            }
            for t in &ask_4011(&mut boot_server(ADVISOR), &bytes, from).transmits {
                prop_assert!(DhcpMessage::parse(&t.bytes).is_ok());
            }
        }
    }
}

/// "Never one address to two clients", under random traffic from many clients with time
/// advancing and restarts that keep only what was persisted.
mod invariants {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    struct Client {
        mac: MacAddr,
        client_id: Option<Vec<u8>>,
        offered: Option<Ipv4Addr>,
        bound: Option<Ipv4Addr>,
    }

    /// Clients that share a MAC have distinct client ids: with equal ids (or none) they
    /// would be one client by RFC 2131's rules, and rightly share an address.
    fn clients() -> Vec<Client> {
        let c = |m: u8, id: Option<&[u8]>| Client {
            mac: mac(m),
            client_id: id.map(<[u8]>::to_vec),
            offered: None,
            bound: None,
        };
        vec![
            c(1, None),
            c(2, None),
            c(3, Some(b"a")),
            c(3, Some(b"b")),
            c(4, Some(&[1, 0x52, 0x54, 0, 0x77, 0, 4])),
            c(5, None),
            c(6, Some(b"six")),
            c(0x50, None),
        ]
    }

    fn small_config(authoritative: bool) -> EngineConfig {
        let mut cfg = config(Mode::Server);
        cfg.authoritative = authoritative;
        cfg.subnets[0].range_end = ip(103);
        cfg.subnets[0].lease_time = 600;
        cfg.decline_hold_secs = 300;
        cfg.reservations.push(Reservation {
            mac: None,
            client_id: Some(b"six".to_vec()),
            ip: ip(101),
        });
        cfg
    }

    #[derive(Debug, Clone)]
    enum Op {
        Discover(usize, Option<u8>),
        Select(usize, bool),
        InitReboot(usize, Option<u8>),
        Renew(usize),
        Release(usize),
        Decline(usize),
        Advance(u64),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        let c = 0..8usize;
        let addr = proptest::option::of(prop_oneof![98u8..106, Just(50)]);
        prop_oneof![
            4 => (c.clone(), addr.clone()).prop_map(|(c, a)| Op::Discover(c, a)),
            4 => (c.clone(), proptest::bool::weighted(0.85)).prop_map(|(c, ours)| Op::Select(c, ours)),
            2 => (c.clone(), addr).prop_map(|(c, a)| Op::InitReboot(c, a)),
            2 => c.clone().prop_map(Op::Renew),
            1 => c.clone().prop_map(Op::Release),
            1 => c.prop_map(Op::Decline),
            2 => prop_oneof![0u64..40, 200u64..900].prop_map(Op::Advance),
            1 => Just(Op::Restart),
        ]
    }

    fn request(c: &Client, mt: MessageType) -> DhcpMessage {
        let mut m = plain(mt, c.mac);
        if let Some(id) = &c.client_id {
            m.set_option(opt::CLIENT_ID, id.clone());
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn never_one_address_to_two_clients(
            ops in proptest::collection::vec(op(), 1..80),
            authoritative in any::<bool>(),
        ) {
            let cfg = small_config(authoritative);
            let mut engine = Engine::new(cfg.clone(), ADVISOR).unwrap();
            let mut store: BTreeMap<Ipv4Addr, Lease> = BTreeMap::new();
            let mut cs = clients();
            // What each client believes it holds, from the ACKs it received: ip -> (client, expiry).
            let mut holders: BTreeMap<Ipv4Addr, (usize, u64)> = BTreeMap::new();
            let mut now = T0;

            for op in ops {
                let (who, msg) = match op {
                    Op::Advance(s) => { now += s; continue }
                    Op::Restart => {
                        engine = Engine::new(cfg.clone(), ADVISOR).unwrap();
                        store.values().for_each(|l| engine.load_lease(l.clone()));
                        continue;
                    }
                    Op::Discover(i, a) => {
                        let mut m = request(&cs[i], MessageType::Discover);
                        if let Some(a) = a { m.set_option(opt::REQUESTED_IP, ip(a).octets()); }
                        (i, m)
                    }
                    Op::Select(i, ours) => {
                        let Some(addr) = cs[i].offered else { continue };
                        let server = if ours { SERVER } else { Ipv4Addr::new(10, 77, 0, 2) };
                        (i, selecting(request(&cs[i], MessageType::Request), addr, server))
                    }
                    Op::InitReboot(i, a) => {
                        let Some(addr) = a.map(ip).or(cs[i].bound) else { continue };
                        (i, with(request(&cs[i], MessageType::Request), opt::REQUESTED_IP, addr.octets()))
                    }
                    Op::Renew(i) => {
                        let Some(addr) = cs[i].bound else { continue };
                        let mut m = request(&cs[i], MessageType::Request);
                        m.ciaddr = addr;
                        (i, m)
                    }
                    Op::Release(i) => {
                        let Some(addr) = cs[i].bound.take() else { continue };
                        let mut m = with(request(&cs[i], MessageType::Release), opt::SERVER_ID, SERVER.octets());
                        m.ciaddr = addr;
                        (i, m)
                    }
                    Op::Decline(i) => {
                        let Some(addr) = cs[i].bound.take() else { continue };
                        (i, selecting(request(&cs[i], MessageType::Decline), addr, SERVER))
                    }
                };
                let out = send(&mut engine, now, &msg);

                // Persist first, as the contract says.
                for ch in &out.lease_changes {
                    match ch {
                        LeaseChange::Bound(l) | LeaseChange::Declined(l) => { store.insert(l.ip, l.clone()); }
                        LeaseChange::Removed(a) => { store.remove(a); }
                    }
                    match ch {
                        LeaseChange::Removed(a) => { holders.remove(a); }
                        LeaseChange::Declined(l) => { holders.remove(&l.ip); }
                        LeaseChange::Bound(_) => {}
                    }
                }

                for t in &out.transmits {
                    let reply = DhcpMessage::parse(&t.bytes).unwrap();
                    prop_assert_eq!(reply.mac(), cs[who].mac);
                    match reply.message_type() {
                        Some(MessageType::Offer) => cs[who].offered = Some(reply.yiaddr),
                        Some(MessageType::Ack) => {
                            let a = reply.yiaddr;
                            let reserved = cfg.reservations.iter().any(|r| r.ip == a
                                && (r.mac == Some(cs[who].mac) || (r.client_id.is_some() && r.client_id == cs[who].client_id)));
                            prop_assert!(cfg.subnets[0].in_range(a) || reserved, "ACKed {} outside range", a);
                            if let Some(&(other, until)) = holders.get(&a) {
                                prop_assert!(other == who || until <= now,
                                    "{} ACKed to client {} while client {} holds it until {} (now {})", a, who, other, until, now);
                            }
                            holders.retain(|_, (c, _)| *c != who);
                            holders.insert(a, (who, now + 600));
                            cs[who].bound = Some(a);
                            cs[who].offered = None;
                        }
                        Some(MessageType::Nak) => { cs[who].bound = None; cs[who].offered = None; }
                        other => prop_assert!(false, "unexpected reply {:?}", other),
                    }
                }

                // The table agrees: live bound leases have distinct addresses and owners.
                let live: Vec<&Lease> = engine.leases().iter()
                    .filter(|l| l.state == LeaseState::Bound && l.is_live(now)).collect();
                for (i, a) in live.iter().enumerate() {
                    for b in &live[i + 1..] {
                        prop_assert_ne!(a.ip, b.ip);
                        let same_client = match (&a.client_id, &b.client_id) {
                            (Some(x), Some(y)) => x == y,
                            _ => a.mac == b.mac,
                        };
                        prop_assert!(!same_client, "one client holds {} and {}", a.ip, b.ip);
                    }
                }
                // And the store holds exactly what the engine holds.
                let table: BTreeMap<Ipv4Addr, Lease> = engine.leases().iter().map(|l| (l.ip, l.clone())).collect();
                prop_assert_eq!(&table, &store);
            }
        }
    }
}

/// An advisor whose PXE boot file is handed out by a negotiator on port 4011.
struct Negotiated;

impl BootAdvisor for Negotiated {
    fn boot_for(&self, id: &ClientIdentity) -> Option<BootOffer> {
        advisor(id)
    }

    fn discovery_type(&self, _: &ClientIdentity, offer: &BootOffer) -> Option<u16> {
        (offer.file == "undionly.kpxe").then_some(0x8001)
    }
}

#[test]
fn negotiated_files_send_pxe_roms_to_boot_server_discovery() {
    let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let options = |out: &Output| {
        let (reply, _) = only_reply(out);
        PxeOptions::decode(reply.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap()
    };
    let mut answers = Vec::new();
    for mode in [Mode::Proxy, Mode::Server] {
        let mut e = Engine::new(config(mode), Negotiated).unwrap();
        answers.push((format!("{mode:?} on 67"), options(&exchange(&mut e, T0, from, &pxe_rom(MessageType::Discover, mac(1)).encode()))));
    }
    // The ProxyDHCP REQUEST a ROM sends to port 4011 after its address is bound.
    let mut b = boot_server(Negotiated);
    answers.push(("4011".into(), options(&ask_4011(&mut b, &pxe_rom(MessageType::Request, mac(1)).encode(), from))));
    for (what, pxe) in answers {
        // Discovery, unicast to this server, for the negotiator's boot server type; the
        // file is not to be taken from this answer.
        assert_eq!(pxe.discovery_control, Some(discovery::NO_BROADCAST | discovery::NO_MULTICAST), "{what}");
        assert_eq!(pxe.boot_servers.len(), 1);
        assert_eq!(pxe.boot_servers[0].server_type, 0x8001);
        assert_eq!(pxe.boot_servers[0].addrs, [SERVER]);
        assert_eq!(pxe.boot_menu[0].server_type, 0x8001);
        assert_eq!(pxe.mtftp_ip, None);
    }
    // iPXE never runs discovery: it keeps taking the file.
    let mut e = Engine::new(config(Mode::Proxy), Negotiated).unwrap();
    let out = exchange(&mut e, T0, from, &ipxe(MessageType::Discover, mac(2)).encode());
    let (offer, _) = only_reply(&out);
    assert!(offer.file.starts_with(b"http://"));
}

/// Persist before send is the engine's own rule: a reply that depends on a lease change
/// stays inside it until the shell reports the change durable, whatever else is sent
/// meanwhile; a failed commit means the reply never leaves.
#[test]
fn replies_wait_for_their_lease_to_be_committed() {
    let mut e = server();
    let from = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
    let at = instant(T0);
    let poll = |e: &mut TestEngine| drain(at, |n, b| e.poll_transmit(n, b));
    let events = |e: &mut TestEngine| std::iter::from_fn(|| e.poll_event()).collect::<Vec<_>>();
    let persist = |evs: &[Event]| {
        evs.iter()
            .find_map(|ev| match ev {
                Event::Persist { ticket, changes } => Some((*ticket, changes.clone())),
                _ => None,
            })
            .expect("a lease change to persist")
    };
    // Offers are not persisted: they leave at once.
    e.handle(at, T0, from, &ipxe(MessageType::Discover, mac(1)).encode());
    assert!(!events(&mut e).iter().any(|ev| matches!(ev, Event::Persist { .. })));
    assert_eq!(poll(&mut e).len(), 1);
    // The REQUEST: a lease to persist, and no ACK yet.
    e.handle(at, T0, from, &selecting(ipxe(MessageType::Request, mac(1)), ip(100), SERVER).encode());
    let (ticket, changes) = persist(&events(&mut e));
    assert!(matches!(&changes[..], [LeaseChange::Bound(l)] if l.ip == ip(100)));
    assert!(poll(&mut e).is_empty(), "the ACK waits for its commit");
    assert_eq!(e.held(), 1);
    // Another client is served meanwhile; the ACK still waits.
    e.handle(at, T0, from, &ipxe(MessageType::Discover, mac(2)).encode());
    let other = poll(&mut e);
    assert_eq!(other.len(), 1);
    assert_eq!(DhcpMessage::parse(&other[0].bytes).unwrap().message_type(), Some(MessageType::Offer));
    e.committed(ticket);
    let ack = poll(&mut e);
    assert_eq!(ack.len(), 1);
    assert_eq!(DhcpMessage::parse(&ack[0].bytes).unwrap().message_type(), Some(MessageType::Ack));
    assert_eq!(e.held(), 0);

    // A commit that fails: the ACK never leaves, not even when the ticket is named again.
    e.handle(at, T0, from, &selecting(ipxe(MessageType::Request, mac(2)), ip(101), SERVER).encode());
    let (ticket, _) = persist(&events(&mut e));
    e.commit_failed(ticket);
    e.committed(ticket);
    assert!(poll(&mut e).is_empty());
    assert_eq!(e.stats().withheld, 1);
    assert!(events(&mut e).iter().any(|ev| matches!(ev, Event::Trace(t) if t.kind == "REPLY-WITHHELD" && t.mac == mac(2))));
    // The client asks again and gets its ACK once that commit succeeds.
    e.handle(at, T0 + 1, from, &selecting(ipxe(MessageType::Request, mac(2)), ip(101), SERVER).encode());
    let (ticket, _) = persist(&events(&mut e));
    e.committed(ticket);
    assert_eq!(poll(&mut e).len(), 1);
}

/// Hostile bytes never make the engine or the boot server panic, and both keep the
/// contract (append only, timers past `now`).
#[test]
fn engine_and_boot_server_keep_the_contract() {
    use fleetboot_testkit::{conformance, Node, Rng};
    struct Port67(TestEngine);
    impl Node for Port67 {
        fn handle(&mut self, now: Instant, from: SocketAddr, _: SocketAddr, bytes: &[u8]) {
            self.0.handle(now, 1_700_000_000, from, bytes);
            while let Some(ev) = self.0.poll_event() {
                if let Event::Persist { ticket, .. } = ev {
                    self.0.committed(ticket);
                }
            }
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.0.handle_timeout(now)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.0.poll_timeout()
        }
        fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
            self.0.poll_transmit(now, buf).map(|t| (SocketAddr::from((SERVER, 67)), t))
        }
    }
    struct Port4011(BootServer<Advisor>);
    impl Node for Port4011 {
        fn handle(&mut self, now: Instant, from: SocketAddr, _: SocketAddr, bytes: &[u8]) {
            self.0.handle(now, from, bytes);
            while self.0.poll_event().is_some() {}
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.0.handle_timeout(now)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.0.poll_timeout()
        }
        fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
            self.0.poll_transmit(now, buf).map(|t| (SocketAddr::from((SERVER, 4011)), t))
        }
    }
    let now = instant(T0);
    let from = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
    let mut rng = Rng::new(67);
    for mode in [Mode::Server, Mode::Proxy] {
        let mut node = Port67(Engine::new(config(mode), ADVISOR).unwrap());
        // Real traffic first, so mutated copies of real replies are in the mix.
        for m in [ipxe(MessageType::Discover, mac(1)), pxe_rom(MessageType::Discover, mac(2))] {
            node.handle(now, from, from, &m.encode());
        }
        let c = conformance::check(&mut node, now, SocketAddr::from((SERVER, 67)), &[from], &mut rng, 3000);
        assert!(c.datagrams >= 2, "{c:?}");
    }
    let mut node = Port4011(boot_server(ADVISOR));
    node.handle(now, from, from, &pxe_rom(MessageType::Request, mac(1)).encode());
    let c = conformance::check(&mut node, now, SocketAddr::from((SERVER, 4011)), &[from], &mut rng, 3000);
    assert!(c.datagrams >= 1, "{c:?}");
}
