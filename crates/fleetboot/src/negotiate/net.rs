//! Blocking-free UDP plumbing shared by `fleetboot files` and `fleetboot negotiate`:
//! socket2 sockets with the multicast settings pinned (TTL, `IP_MULTICAST_ALL` off, an
//! explicit multicast interface), `poll(2)` over a set of sockets, and JSON-line records.

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A non-blocking UDP socket bound to `bind`. Multicast leaves through `local` (the
/// host's address) with `ttl`, and the socket only receives groups it joined itself.
pub fn udp(bind: SocketAddrV4, local: Ipv4Addr, ttl: u32, reuse: bool) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    s.set_multicast_all_v4(false)?;
    s.set_multicast_if_v4(&local)?;
    s.set_multicast_ttl_v4(ttl)?;
    s.set_multicast_loop_v4(true)?;
    s.set_nonblocking(true)?;
    s.bind(&bind.into())
        .with_context(|| format!("binding UDP {bind}"))?;
    Ok(s.into())
}

/// Joins `group` on the interface that has `local`.
pub fn join(sock: &UdpSocket, group: Ipv4Addr, local: Ipv4Addr) -> Result<()> {
    sock.join_multicast_v4(&group, &local)
        .with_context(|| format!("joining {group} on {local}"))
}

/// Waits until one of `socks` is readable or `deadline` passes (at most `cap` from now).
/// Returns which are readable.
pub fn wait(socks: &[&UdpSocket], deadline: Option<Instant>, cap: Duration) -> Vec<bool> {
    let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
    wait_fds(&fds, deadline, cap)
}

/// [`wait`] over raw descriptors.
pub fn wait_fds(socks: &[RawFd], deadline: Option<Instant>, cap: Duration) -> Vec<bool> {
    let now = Instant::now();
    let d = deadline.map_or(cap, |d| d.saturating_duration_since(now).min(cap));
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = d.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: fds is a valid array of pollfd of the given length for the call's duration.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; socks.len()];
    }
    fds.iter()
        .map(|f| f.revents & (libc::POLLIN | libc::POLLERR) != 0)
        .collect()
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
