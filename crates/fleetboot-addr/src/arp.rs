//! Duplicate address detection (RFC 5227): before an address is used, ARP probes ask
//! whether anyone holds it; after it is installed, ARP announcements tell the neighbours.
//!
//! [`ArpPacket`] is the codec (28 bytes, Ethernet + IPv4 only; anything else is ignored).
//! [`ArpWatch`] is the shell: one packet socket per pool, one reader task that marks a
//! probed address as conflicting when another host claims it (an ARP packet whose sender
//! is that address) or probes for it at the same time (a probe for it from another MAC).

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::sys;

const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;
pub const ARP_LEN: usize = 28;

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    /// `None` for anything that is not Ethernet/IPv4 ARP or is too short.
    pub fn parse(b: &[u8]) -> Option<ArpPacket> {
        if b.len() < ARP_LEN || b[0..2] != [0, 1] || b[2..4] != [8, 0] || b[4] != 6 || b[5] != 4
        {
            return None;
        }
        let op = u16::from_be_bytes([b[6], b[7]]);
        if op != OP_REQUEST && op != OP_REPLY {
            return None;
        }
        let mac = |at: usize| <[u8; 6]>::try_from(&b[at..at + 6]).ok();
        let ip = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        Some(ArpPacket {
            op,
            sender_mac: mac(8)?,
            sender_ip: ip(14),
            target_mac: mac(18)?,
            target_ip: ip(24),
        })
    }

    pub fn encode(&self) -> [u8; ARP_LEN] {
        let mut b = [0u8; ARP_LEN];
        b[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 0]);
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sender_mac);
        b[14..18].copy_from_slice(&self.sender_ip.octets());
        b[18..24].copy_from_slice(&self.target_mac);
        b[24..28].copy_from_slice(&self.target_ip.octets());
        b
    }

    /// An ARP probe for `ip`: sender address 0.0.0.0, so no neighbour cache learns from it.
    pub fn probe(mac: [u8; 6], ip: Ipv4Addr) -> ArpPacket {
        ArpPacket {
            op: OP_REQUEST,
            sender_mac: mac,
            sender_ip: Ipv4Addr::UNSPECIFIED,
            target_mac: [0; 6],
            target_ip: ip,
        }
    }

    /// An ARP announcement: a request whose sender and target are both `ip`.
    pub fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> ArpPacket {
        ArpPacket {
            sender_ip: ip,
            ..ArpPacket::probe(mac, ip)
        }
    }

    /// Whether this packet, heard while probing `candidate` from `own_mac`, means someone
    /// else has it or wants it (RFC 5227 §2.1.1).
    pub fn conflicts_with(&self, candidate: Ipv4Addr, own_mac: [u8; 6]) -> bool {
        if self.sender_mac == own_mac {
            return false;
        }
        self.sender_ip == candidate
            || (self.op == OP_REQUEST
                && self.sender_ip.is_unspecified()
                && self.target_ip == candidate)
    }
}

/// How to probe. [`DadConfig::rfc5227`] is the RFC's timing (3 probes 1-2 s apart, then 2 s
/// of listening, 2 announcements 2 s apart); labs on one wire can afford much less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DadConfig {
    /// ARP probes sent before the address is taken.
    pub probes: u32,
    /// Time between probes.
    pub probe_interval: Duration,
    /// Listening after the last probe.
    pub wait_after: Duration,
    /// Announcements sent once the address is installed.
    pub announcements: u32,
    pub announce_interval: Duration,
}

impl DadConfig {
    pub fn rfc5227() -> DadConfig {
        DadConfig {
            probes: 3,
            probe_interval: Duration::from_millis(1500),
            wait_after: Duration::from_secs(2),
            announcements: 2,
            announce_interval: Duration::from_secs(2),
        }
    }

    /// Two probes 100 ms apart, 200 ms of listening, one announcement: for a lab segment
    /// where every host answers within microseconds.
    pub fn quick() -> DadConfig {
        DadConfig {
            probes: 2,
            probe_interval: Duration::from_millis(100),
            wait_after: Duration::from_millis(200),
            announcements: 1,
            announce_interval: Duration::from_millis(0),
        }
    }
}

/// The probes in flight on one interface, fed by one reader task.
pub struct ArpWatch {
    fd: AsyncFd<OwnedFd>,
    ifindex: u32,
    mac: [u8; 6],
    probing: Mutex<HashMap<Ipv4Addr, Arc<AtomicBool>>>,
}

impl ArpWatch {
    /// Opens the packet socket and starts the reader task (on the current runtime). The
    /// task ends when the last `Arc` is dropped.
    pub fn start(ifindex: u32, mac: [u8; 6]) -> io::Result<Arc<ArpWatch>> {
        // SAFETY: the OwnedFd is a valid descriptor that only the AsyncFd owns and closes.
        let fd = unsafe { AsyncFd::register(sys::arp_socket(ifindex)?)? };
        let watch = Arc::new(ArpWatch {
            fd,
            ifindex,
            mac,
            probing: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                let Some(w) = weak.upgrade() else { return };
                let ready = tokio::time::timeout(Duration::from_secs(1), w.fd.readable()).await;
                let Ok(Ok(mut guard)) = ready else { continue };
                match guard.try_io(|fd| sys::arp_recv(fd.as_raw_fd(), &mut buf)) {
                    Ok(Ok(Some(n))) => w.heard(&buf[..n]),
                    Ok(Ok(None)) | Err(_) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "ARP socket failed; duplicate address detection stops");
                        return;
                    }
                }
            }
        });
        Ok(watch)
    }

    fn heard(&self, bytes: &[u8]) {
        let Some(p) = ArpPacket::parse(bytes) else { return };
        let probing = self.probing.lock().unwrap_or_else(|e| e.into_inner());
        for ip in [p.sender_ip, p.target_ip] {
            if let Some(flag) = probing.get(&ip) {
                if p.conflicts_with(ip, self.mac) {
                    flag.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn send(&self, p: ArpPacket) -> io::Result<()> {
        sys::arp_send(self.fd.get_ref().as_raw_fd(), self.ifindex, &p.encode())
    }

    /// Probes `ip` as `config` says; `Ok(true)` when another host has it or probes for it.
    pub async fn probe(&self, ip: Ipv4Addr, config: &DadConfig) -> io::Result<bool> {
        let flag = Arc::new(AtomicBool::new(false));
        {
            let mut probing = self.probing.lock().unwrap_or_else(|e| e.into_inner());
            if probing.contains_key(&ip) {
                return Ok(true); // one of ours is already probing it
            }
            probing.insert(ip, flag.clone());
        }
        let result = async {
            for i in 0..config.probes {
                if i > 0 {
                    tokio::time::sleep(config.probe_interval).await;
                }
                if flag.load(Ordering::Relaxed) {
                    return Ok(true);
                }
                self.send(ArpPacket::probe(self.mac, ip))?;
            }
            tokio::time::sleep(config.wait_after).await;
            Ok(flag.load(Ordering::Relaxed))
        }
        .await;
        self.probing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
        result
    }

    /// Announces `ip` (now installed) `config.announcements` times.
    pub async fn announce(&self, ip: Ipv4Addr, config: &DadConfig) -> io::Result<()> {
        for i in 0..config.announcements {
            if i > 0 {
                tokio::time::sleep(config.announce_interval).await;
            }
            self.send(ArpPacket::announcement(self.mac, ip))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const OTHER: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 50);

    #[test]
    fn round_trip_and_garbage() {
        for p in [ArpPacket::probe(ME, IP), ArpPacket::announcement(ME, IP)] {
            assert_eq!(ArpPacket::parse(&p.encode()), Some(p));
        }
        let good = ArpPacket::probe(ME, IP).encode();
        for cut in 0..ARP_LEN {
            assert_eq!(ArpPacket::parse(&good[..cut]), None);
        }
        let mut bad = good;
        bad[3] = 0xdd; // IPv6 protocol type
        assert_eq!(ArpPacket::parse(&bad), None);
        let mut bad = good;
        bad[7] = 3; // RARP
        assert_eq!(ArpPacket::parse(&bad), None);
    }

    #[test]
    fn what_counts_as_a_conflict() {
        // Someone answering for it, or announcing it.
        let reply = ArpPacket {
            op: OP_REPLY,
            sender_mac: OTHER,
            sender_ip: IP,
            target_mac: ME,
            target_ip: Ipv4Addr::UNSPECIFIED,
        };
        assert!(reply.conflicts_with(IP, ME));
        assert!(ArpPacket::announcement(OTHER, IP).conflicts_with(IP, ME));
        // Someone else probing for it at the same time.
        assert!(ArpPacket::probe(OTHER, IP).conflicts_with(IP, ME));
        // Our own packets, or traffic about other addresses, are not.
        assert!(!ArpPacket::probe(ME, IP).conflicts_with(IP, ME));
        assert!(!ArpPacket::announcement(OTHER, Ipv4Addr::new(10, 78, 0, 51)).conflicts_with(IP, ME));
        // An ordinary request for it from a host that has an address is a question, not a
        // claim.
        let asking = ArpPacket {
            sender_ip: Ipv4Addr::new(10, 78, 0, 1),
            ..ArpPacket::probe(OTHER, IP)
        };
        assert!(!asking.conflicts_with(IP, ME));
    }
}
