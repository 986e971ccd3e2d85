//! UDP plumbing shared by `fleetboot files` and `fleetboot negotiate`, on `fleetboot_net`:
//! nonblocking sockets with the multicast settings pinned (TTL, `IP_MULTICAST_ALL` off, an
//! explicit multicast interface), a wait over a set of sockets, and JSON-line records.

use anyhow::{Context, Result};
use fleetboot_net::{MulticastInterface, Poller, UdpBuilder};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A nonblocking UDP socket bound to `bind`. Multicast leaves through `local` (the host's
/// address) with `ttl`, and the socket only receives groups it joined itself.
pub fn udp(bind: SocketAddrV4, local: Ipv4Addr, ttl: u32, reuse: bool) -> Result<UdpSocket> {
    udp_on(bind, local, ttl, reuse, None)
}

/// [`udp`], bound to interface `device` too when one is given (`server.interface`).
pub fn udp_on(bind: SocketAddrV4, local: Ipv4Addr, ttl: u32, reuse: bool, device: Option<&str>) -> Result<UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(bind))
        .reuse_address(reuse)
        .device(device)
        .multicast_interface(MulticastInterface::Address(local))
        .multicast_ttl(ttl)
        .multicast_loop(true)
        .nonblocking(true)
        .bind()
        .with_context(|| format!("binding UDP {bind}"))
}

/// Joins `group` on the interface that has `local`.
pub fn join(sock: &UdpSocket, group: Ipv4Addr, local: Ipv4Addr) -> Result<()> {
    sock.join_multicast_v4(&group, &local)
        .with_context(|| format!("joining {group} on {local}"))
}

/// Waits until one of `socks` is readable or `deadline` passes (at most `cap` from now).
/// Returns which are readable.
pub fn wait(socks: &[&UdpSocket], deadline: Option<Instant>, cap: Duration) -> Vec<bool> {
    let mut poller = Poller::new();
    for s in socks {
        poller.add(*s);
    }
    wait_on(&mut poller, deadline, cap)
}

/// [`wait`] over a [`Poller`] the caller filled.
pub fn wait_on(poller: &mut Poller, deadline: Option<Instant>, cap: Duration) -> Vec<bool> {
    let d = deadline.map_or(cap, |d| d.saturating_duration_since(Instant::now()).min(cap));
    match poller.wait_for(Some(d)) {
        Ok(n) if n > 0 => (0..poller.len()).map(|i| poller.is_ready(i)).collect(),
        _ => vec![false; poller.len()],
    }
}

/// Drains one non-blocking socket: every datagram with its IPv4 source.
pub fn drain(sock: &UdpSocket, buf: &mut [u8], mut f: impl FnMut(SocketAddrV4, &[u8])) {
    for _ in 0..256 {
        match sock.recv_from(buf) {
            Ok((n, std::net::SocketAddr::V4(from))) => f(from, &buf[..n]),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Sends, logging (not failing on) errors: UDP is best effort and every sender retries.
pub fn send(sock: &UdpSocket, to: SocketAddrV4, bytes: &[u8]) {
    if let Err(e) = sock.send_to(bytes, to) {
        tracing::debug!("send to {to}: {e}");
    }
}

/// Append-only JSON lines, flushed per line so a killed process leaves complete records.
pub struct Records(Option<Mutex<std::fs::File>>);

impl Records {
    pub fn open(path: Option<&Path>) -> Result<Records> {
        let f = match path {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("records file {}", p.display()))?,
            )),
            None => None,
        };
        Ok(Records(f))
    }

    pub fn write(&self, v: serde_json::Value) {
        tracing::info!(target: "fleetboot::records", "{v}");
        if let Some(f) = &self.0 {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{v}");
            let _ = f.flush();
        }
    }
}

/// Unix milliseconds, for records.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
