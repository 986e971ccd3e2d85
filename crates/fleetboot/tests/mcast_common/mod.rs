//! Shared by `multicast_tftp_e2e` and `negotiators_e2e`: a lab of namespaces, `fleetboot
//! files` / `fleetboot negotiate` processes started by the lab (killed by pid on drop),
//! their JSON-line records, and a small PXE client (boot server discovery REQUEST to 4011,
//! then the PXE MTFTP fetch) run on a thread that entered a client namespace. The client
//! knows fleetboot's wait packets and waits as told.
#![allow(dead_code)]

use fleetboot_dhcp::codec::{opt, BOOTREQUEST};
use fleetboot_dhcp::pxe::{BootItem, PxeOptions};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_lab::netns::{Lab, Proto};
use fleetboot_tftp::mtftp::{ClientPhase, MtftpClient, MtftpClientConfig};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// fleetboot's option 43 sub-option in a wait packet (`SUB_WAIT_MS` in
/// `src/negotiate/boot.rs`): wait this many milliseconds (u32, big-endian) before asking again.
pub const SUB_WAIT_MS: u8 = 0xB0;

/// How long a wait packet (a DHCPACK without a boot file carrying [`SUB_WAIT_MS`]) asks the
/// client to wait; `None` for anything else, such as the real answer.
pub fn wait_period(m: &DhcpMessage) -> Option<Duration> {
    if m.message_type() != Some(MessageType::Ack) || !m.file.is_empty() {
        return None;
    }
    let p = PxeOptions::decode(m.option(opt::VENDOR_SPECIFIC)?).ok()?;
    let (_, v) = p.other.iter().find(|(c, _)| *c == SUB_WAIT_MS)?;
    let ms = u32::from_be_bytes(v.as_slice().try_into().ok()?);
    Some(Duration::from_millis(u64::from(ms)))
}

pub fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fleetboot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("root")).unwrap();
    d
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `timeout LIMIT ip netns exec NS fleetboot SUB --config CFG`, output to `log`.
pub fn spawn_fleetboot(
    lab: &mut Lab,
    ns: &str,
    sub: &str,
    cfg: &Path,
    log: &Path,
    limit_s: u64,
) -> u32 {
    let mut c = Command::new("timeout");
    c.arg(limit_s.to_string())
        .args([
            "ip",
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_fleetboot"),
            sub,
            "--config",
        ])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap());
    lab.spawn(sub, c).unwrap()
}

pub fn wait_udp(lab: &Lab, ns: &str, port: u16) {
    lab.wait_listening(ns, Proto::Udp, port, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("port {port} in {ns}: {e:#}"));
}

/// Every JSON record in a records file.
pub fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs `f` on a thread whose network namespace is `ns` (sockets it opens live there).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// What one emulated PXE client ended with.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub mac: [u8; 6],
    pub negotiator: Ipv4Addr,
    pub file: String,
    pub group: SocketAddrV4,
    pub file_server: SocketAddrV4,
    pub bytes: Vec<u8>,
    /// Wait packets received (from any negotiator) before the answer.
    pub waits: u32,
}

fn poll_one(sockets: &[&UdpSocket], ms: i32) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: valid pollfd array for the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

/// Boot server discovery: REQUEST to each negotiator in turn (2 s each, REQUEST repeated
/// every 500 ms) until one answers with a DHCPACK carrying the boot file and MTFTP
/// sub-options 1-5; then PXE MTFTP. A wait packet is not an answer: the client counts it,
/// repeats its REQUEST only after the period it names, and stays with that negotiator
/// (up to 10 s) meanwhile.
pub fn pxe_client(
    me: Ipv4Addr,
    mac: [u8; 6],
    negotiators: &[Ipv4Addr],
    boot_type: u16,
    limit: Duration,
) -> Result<Fetched, String> {
    let start = Instant::now();
    let sock = UdpSocket::bind(SocketAddrV4::new(me, 0)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&mac);
    let xid = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    let pxe = PxeOptions {
        boot_item: Some(BootItem {
            server_type: boot_type,
            layer: 0,
        }),
        ..Default::default()
    };
    let mut req = DhcpMessage {
        op: BOOTREQUEST,
        xid,
        ciaddr: me,
        chaddr,
        ..DhcpMessage::default()
    };
    req.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    req.set_option(
        opt::VENDOR_CLASS,
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    );
    req.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    req.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    let bytes = req.encode();
    let mut buf = vec![0u8; 2048];
    let mut k = 0usize;
    let mut last_err = String::new();
    let mut waits = 0u32;
    'boot: loop {
        if start.elapsed() > limit {
            return Err(last_err);
        }
        let (ack, from) = 'ask: loop {
            if start.elapsed() > limit {
                return Err(format!("no boot server answered within {limit:?}"));
            }
            let n = negotiators[k % negotiators.len()];
            k += 1;
            let asked = Instant::now();
            let mut until = asked + Duration::from_secs(2);
            let mut next_send = asked;
            while Instant::now() < until {
                if Instant::now() >= next_send {
                    let _ = sock.send_to(&bytes, SocketAddrV4::new(n, 4011));
                    next_send = Instant::now() + Duration::from_millis(500);
                }
                if let Ok((len, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                    let Ok(m) = DhcpMessage::parse(&buf[..len]) else {
                        continue;
                    };
                    if m.xid != xid || m.message_type() != Some(MessageType::Ack) {
                        continue;
                    }
                    if let Some(w) = wait_period(&m) {
                        waits += 1;
                        next_send = Instant::now() + w;
                        until = until
                            .max(next_send + Duration::from_millis(500))
                            .min(asked + Duration::from_secs(10));
                        continue;
                    }
                    break 'ask (m, *from.ip());
                }
            }
        };
        let p = PxeOptions::decode(ack.option(opt::VENDOR_SPECIFIC).ok_or("no option 43")?)
            .map_err(|e| e.to_string())?;
        let file = String::from_utf8_lossy(&ack.file).to_string();
        let group = SocketAddrV4::new(
            p.mtftp_ip.ok_or("no sub-option 1")?,
            p.mtftp_client_port.ok_or("no sub-option 2")?,
        );
        let server = SocketAddrV4::new(ack.siaddr, p.mtftp_server_port.ok_or("no sub-option 3")?);
        let tmout = Duration::from_secs(u64::from(p.mtftp_timeout.ok_or("no sub-option 4")?));
        let delay = Duration::from_secs(u64::from(p.mtftp_delay.ok_or("no sub-option 5")?));
        // Listen on the group (bound to the group address, so other groups on the same port in
        // this namespace stay out), talk from a unicast socket.
        let g = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        g.set_reuse_address(true).unwrap();
        g.set_multicast_all_v4(false).unwrap();
        g.bind(&std::net::SocketAddr::V4(group).into())
            .map_err(|e| format!("bind {group}: {e}"))?;
        g.join_multicast_v4(group.ip(), &me)
            .map_err(|e| e.to_string())?;
        g.set_nonblocking(true).unwrap();
        let gs: UdpSocket = g.into();
        let us = UdpSocket::bind(SocketAddrV4::new(me, 0)).unwrap();
        us.set_nonblocking(true).unwrap();
        let mut c = MtftpClient::new(
            Instant::now(),
            MtftpClientConfig {
                file: file.clone(),
                server,
                listen_timeout: tmout,
                delay,
                rrq_retry: Duration::from_secs(1),
            },
        );
        // A file server that does not send (it died after the negotiator answered): back to
        // discovery, as a PXE ROM that fails and retries would.
        let mut progress = (0u16, Instant::now());
        while c.phase() != ClientPhase::Done {
            if start.elapsed() > limit || progress.1.elapsed() > Duration::from_secs(8) {
                last_err = format!(
                    "{file} from {server} on {group}: stalled (have {} blocks)",
                    c.contiguous()
                );
                continue 'boot;
            }
            if c.contiguous() != progress.0 {
                progress = (c.contiguous(), Instant::now());
            }
            while let Some((to, b)) = c.poll_transmit() {
                let _ = us.send_to(&b, to);
            }
            poll_one(&[&gs, &us], 50);
            let now = Instant::now();
            for s in [&gs, &us] {
                while let Ok((len, std::net::SocketAddr::V4(from))) = s.recv_from(&mut buf) {
                    c.handle_data(now, from, &buf[..len]);
                }
            }
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        while let Some((to, b)) = c.poll_transmit() {
            let _ = us.send_to(&b, to);
        }
        return Ok(Fetched {
            mac,
            negotiator: from,
            file,
            group,
            file_server: server,
            bytes: c.file().unwrap(),
            waits,
        });
    }
}
