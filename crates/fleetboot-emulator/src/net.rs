//! The emulator's contact with the host: the namespace check, the address pool its
//! clients lease from, and every socket they open.
//!
//! Addresses come from a [`fleetboot_addr::AddrPool`] on the interface ([`pool_config`]):
//! each client leases its own as itself (its MAC, client id and PXE identity), and the
//! pool probes it with ARP, installs it over netlink with the lease's lifetime, and takes
//! it off again when the client lets go. The pool owns the one DHCP socket (UDP port 68,
//! bound to the interface), which belongs to no client: a client has no address yet while
//! it asks for one.
//!
//! Every other socket of an emulated client is made here, from its leased address
//! (`local`), through `fleetboot_net`: [`client_udp`] (boot server discovery and the PXE
//! MTFTP requests; stream registrations and acknowledgements), [`client_udp_tokio`] (TFTP),
//! [`group_socket`] (PXE MTFTP data), [`stream_group_socket`] (the stream's datagrams),
//! [`client_tcp`] (HTTP). The client holds its lease for as long as it boots.

use crate::{EmulateError, EmulateOptions};
use fleetboot_addr::{DadConfig, PoolConfig};
use fleetboot_net::{Buffer, MulticastInterface, UdpBuilder};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use tokio::net::UdpSocket;

/// The inode of the kernel's initial network namespace (`PROC_NET_INIT_INO`, fixed since
/// Linux 3.8): the host's own network, whatever PID 1 is.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

fn refuse(why: String) -> EmulateError {
    EmulateError::DefaultNamespace(format!(
        "{why}. The emulator broadcasts DHCP and adds addresses to the interface, so it only \
         runs inside a lab namespace: `ip netns exec NAME fleetboot emulate ...`"
    ))
}

/// The named namespace (`/run/netns/NAME`, as `ip netns add` makes) this process is in.
fn named_netns(dev: u64, ino: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find_map(|e| {
            let m = std::fs::metadata(e.path()).ok()?;
            (m.dev() == dev && m.ino() == ino).then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// Fails unless this process runs in a network namespace of its own: not the kernel's
/// initial one, not PID 1's, and — when PID 1's cannot be read (a sandbox hiding it) — one
/// named under `/run/netns`. The emulator broadcasts DHCP and adds addresses: that
/// belongs in a lab namespace, never on the host. Returns a description for the log.
pub fn check_lab_namespace() -> Result<String, EmulateError> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self/ns/net").map_err(|e| {
        refuse(format!(
            "cannot tell which network namespace this is (/proc/self/ns/net: {e})"
        ))
    })?;
    let id = format!("net:[{}]", me.ino());
    if me.ino() == INIT_NET_INO {
        return Err(refuse(format!(
            "this process is in the kernel's initial network namespace ({id})"
        )));
    }
    match std::fs::metadata("/proc/1/ns/net") {
        Ok(init) if init.dev() == me.dev() && init.ino() == me.ino() => Err(refuse(format!(
            "this process shares the network namespace of PID 1 ({id})"
        ))),
        Ok(_) => Ok(match named_netns(me.dev(), me.ino()) {
            Some(name) => format!("{id} ({name})"),
            None => id,
        }),
        Err(e) => match named_netns(me.dev(), me.ino()) {
            Some(name) => Ok(format!("{id} ({name})")),
            None => Err(refuse(format!(
                "cannot read PID 1's network namespace ({e}) and this one ({id}) is not a \
                 named namespace under /run/netns"
            ))),
        },
    }
}

/// The pool every client of a run leases from: DHCP on the run's interface, each lease
/// with the client's own identity ([`fleetboot_addr::AddrPool::lease_observed`]), a quick
/// ARP probe (two probes 100 ms apart, 200 ms of listening: a lab segment answers at
/// once), every client's exchange in flight at once (a storm starts them together), and a
/// DHCPRELEASE at the end only when asked for.
pub fn pool_config(opts: &EmulateOptions) -> PoolConfig {
    let mut cfg = PoolConfig::dhcp(&opts.interface);
    cfg.dad = Some(DadConfig::quick());
    cfg.max_leases = opts.clients;
    cfg.max_pending = opts.clients;
    cfg.send_release = opts.release;
    cfg
}

/// A client's unicast UDP socket (any port on its address), nonblocking.
pub fn client_udp(local: Ipv4Addr, purpose: &str) -> std::io::Result<std::net::UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(SocketAddrV4::new(local, 0))).nonblocking(true).purpose(purpose).bind()
}

/// [`client_udp`] as a tokio socket.
pub fn client_udp_tokio(local: Ipv4Addr, purpose: &str) -> std::io::Result<UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(SocketAddrV4::new(local, 0))).purpose(purpose).bind_tokio()
}

/// A client's socket for a multicast group: bound to the group address and port (so no
/// other group's traffic on that port reaches it), joined on the client's address,
/// `IP_MULTICAST_ALL` off (the builder's default: groups other sockets of this host joined
/// stay out), shared with the other clients of this host.
pub fn group_socket(group: SocketAddrV4, local: Ipv4Addr) -> std::io::Result<std::net::UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(group))
        .reuse_address(true)
        .join(IpAddr::V4(*group.ip()), MulticastInterface::Address(local))
        .nonblocking(true)
        .purpose("MTFTP group")
        .bind()
}

/// [`group_socket`] for a stream client, with a receive buffer of `recv_buffer` bytes:
/// every client of the host gets its own copy of each datagram, and a hundred clients
/// share the host's cores, so each needs room for what arrives while it waits its turn.
pub fn stream_group_socket(group: SocketAddrV4, local: Ipv4Addr, recv_buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(group))
        .reuse_address(true)
        .join(IpAddr::V4(*group.ip()), MulticastInterface::Address(local))
        .buffer(Buffer::Receive, recv_buffer)
        .nonblocking(true)
        .purpose("stream group")
        .bind()
}

/// A TCP connection to `server` from the client's address (`None`: routing chooses).
pub async fn client_tcp(local: Option<Ipv4Addr>, server: SocketAddrV4) -> std::io::Result<tokio::net::TcpStream> {
    fleetboot_net::connect_tokio(local.map(IpAddr::V4), SocketAddr::V4(server)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_namespace_of_pid_1() {
        // Tests run in the host's namespace unless someone put them in a lab one.
        let init = std::fs::read_link("/proc/self/ns/net")
            .is_ok_and(|l| l.to_string_lossy() == format!("net:[{INIT_NET_INO}]"));
        match check_lab_namespace() {
            Err(EmulateError::DefaultNamespace(m)) => assert!(m.contains("ip netns exec"), "{m}"),
            Ok(id) => assert!(!init, "accepted the initial namespace {id}"),
            Err(e) => panic!("{e}"),
        }
        if init {
            assert!(check_lab_namespace().is_err());
        }
    }
}
