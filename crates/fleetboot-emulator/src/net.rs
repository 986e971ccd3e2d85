//! The emulator's contact with the host: the namespace check, every socket it opens, and
//! the addresses it puts on (and takes off) the interface.
//!
//! Every socket of an emulated client is made here, from its address (`local`), through
//! `fleetboot_net`: [`client_udp`] (boot server discovery and the PXE MTFTP requests),
//! [`client_udp_tokio`] (TFTP), [`group_socket`] (PXE MTFTP data), [`client_tcp`] (HTTP).
//! Only the shared DHCP socket on port 68 ([`dhcp_socket`]) belongs to no client (a client
//! has no address yet while it asks for one). Giving each client a socket of its own some
//! other way means changing these four functions.

use crate::EmulateError;
use fleetboot_net::{Buffer, MulticastInterface, UdpBuilder};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// Receive buffer asked for on the DHCP socket: a storm's replies arrive in bursts.
const DHCP_RCVBUF: usize = 4 << 20;
/// `ip` processes run at once.
const IP_CONCURRENCY: usize = 4;
const IP_TIMEOUT: Duration = Duration::from_secs(10);

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

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmulateError {
    let context = context.into();
    move |source| EmulateError::Io { context, source }
}

/// UDP 0.0.0.0:68 on `interface` only, allowed to broadcast: the DHCP replies of every
/// client (a storm's replies arrive in bursts, hence the deep receive queue).
pub fn dhcp_socket(interface: &str) -> Result<UdpSocket, EmulateError> {
    UdpBuilder::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)))
        .reuse_address(true)
        .broadcast(true)
        .device(Some(interface))
        .buffer(Buffer::Receive, DHCP_RCVBUF)
        .purpose("emulated clients' DHCP (is a DHCP client running here?)")
        .bind_tokio()
        .map_err(io("the DHCP socket"))
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

/// A TCP connection to `server` from the client's address (`None`: routing chooses).
pub async fn client_tcp(local: Option<Ipv4Addr>, server: SocketAddrV4) -> std::io::Result<tokio::net::TcpStream> {
    fleetboot_net::connect_tokio(local.map(IpAddr::V4), SocketAddr::V4(server)).await
}

/// Addresses added to one interface, removed again by [`Addresses::remove_all`] (or on
/// drop). Only addresses this emulator added are ever removed.
pub struct Addresses {
    interface: String,
    added: Mutex<Vec<String>>,
    limit: Semaphore,
}

async fn run_ip(args: &[String]) -> Result<(), String> {
    let mut c = tokio::process::Command::new("ip");
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(IP_TIMEOUT, c.output())
        .await
        .map_err(|_| format!("`ip {}` timed out", args.join(" ")))?
        .map_err(|e| format!("running `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Addresses {
    pub fn new(interface: &str) -> Arc<Addresses> {
        Arc::new(Addresses {
            interface: interface.to_string(),
            added: Mutex::new(Vec::new()),
            limit: Semaphore::new(IP_CONCURRENCY),
        })
    }

    fn added(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.added.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `ip addr add IP/PREFIX brd + dev IFACE`.
    pub async fn add(&self, ip: Ipv4Addr, prefix: u8) -> Result<(), String> {
        let _permit = self.limit.acquire().await.map_err(|e| e.to_string())?;
        let cidr = format!("{ip}/{prefix}");
        let args: Vec<String> = ["addr", "add", &cidr, "brd", "+", "dev", &self.interface]
            .iter()
            .map(|s| s.to_string())
            .collect();
        run_ip(&args).await?;
        self.added().push(cidr);
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.added().len()
    }

    /// Removes every address added, newest first (so secondaries go before the primary,
    /// whose removal would take them along), in one `ip -force -batch` run.
    pub fn remove_all(&self) -> usize {
        let cidrs: Vec<String> = std::mem::take(&mut *self.added());
        if cidrs.is_empty() {
            return 0;
        }
        let batch: String = cidrs
            .iter()
            .rev()
            .map(|c| format!("addr del {c} dev {}\n", self.interface))
            .collect();
        let run = || -> std::io::Result<()> {
            use std::io::Write;
            let mut child = std::process::Command::new("ip")
                .args(["-force", "-batch", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(batch.as_bytes())?;
            let deadline = std::time::Instant::now() + IP_TIMEOUT * 3;
            loop {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other("ip -batch timed out"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        if let Err(e) = run() {
            tracing::error!(error = %e, interface = %self.interface, "removing the emulated clients' addresses failed");
        }
        cidrs.len()
    }
}

impl Drop for Addresses {
    fn drop(&mut self) {
        self.remove_all();
    }
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
