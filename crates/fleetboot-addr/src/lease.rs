//! [`OwnedAddr`]: one leased address, shared by the sockets bound to it.
//!
//! The address lives as long as its last user. Every [`OwnedAddr`] clone and every socket
//! made from one holds the lease; when the last is dropped, the pool's task for that lease
//! releases it (DHCPRELEASE from the address, then the address off the interface). When the
//! lease is lost instead (NAK, expiry, interface gone, pool shut down), the task takes the
//! address off, records why, and shuts its sockets down: a read or write on any of them
//! then fails with [`LeaseLost`] (as the `io::Error`'s inner error).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::socket::{LeasedStdTcp, LeasedStdUdp, LeasedTcpListener, LeasedTcpStream, LeasedUdpSocket};
use crate::sys;

/// Why a lease ended while it was held, inside the `io::Error` a socket returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lease on {ip} was lost: {why}")]
pub struct LeaseLost {
    pub ip: Ipv4Addr,
    pub why: String,
}

/// Where the address came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A static range: the lifetime the pool gives its addresses.
    Static,
    /// DHCP: what the first ACK said (server, lease time, router, boot file, a ProxyDHCP
    /// offer heard on the way), and the identity the lease was taken with.
    Dhcp {
        binding: Box<fleetboot_dhcp::Binding>,
        client_id: Vec<u8>,
        chaddr: [u8; 6],
    },
}

/// A socket to shut down when the lease is lost.
pub(crate) trait HasFd: Send + Sync {
    fn fd(&self) -> RawFd;
}

impl<T: AsRawFd + Send + Sync> HasFd for T {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// What the pool's lease task and the users share.
pub(crate) struct LeaseShared {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub origin: Origin,
    lost_flag: AtomicBool,
    lost: Mutex<Option<LeaseLost>>,
    lost_tx: watch::Sender<bool>,
    sockets: Mutex<Vec<Weak<dyn HasFd>>>,
}

impl LeaseShared {
    pub fn new(ip: Ipv4Addr, prefix_len: u8, origin: Origin) -> Arc<LeaseShared> {
        Arc::new(LeaseShared {
            ip,
            prefix_len,
            origin,
            lost_flag: AtomicBool::new(false),
            lost: Mutex::new(None),
            lost_tx: watch::channel(false).0,
            sockets: Mutex::new(Vec::new()),
        })
    }

    /// Marks the lease lost and shuts every socket on it down.
    pub fn lose(&self, why: String) {
        {
            let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            if lost.is_some() {
                return;
            }
            *lost = Some(LeaseLost { ip: self.ip, why });
        }
        self.lost_flag.store(true, Ordering::Release);
        self.lost_tx.send_replace(true);
        let sockets = std::mem::take(&mut *self.sockets.lock().unwrap_or_else(|e| e.into_inner()));
        for s in sockets.iter().filter_map(Weak::upgrade) {
            sys::shutdown(s.fd());
        }
    }

    pub fn lost(&self) -> Option<LeaseLost> {
        if !self.lost_flag.load(Ordering::Acquire) {
            return None;
        }
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn register(&self, s: Weak<dyn HasFd>) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.retain(|w| w.strong_count() > 0);
        sockets.push(s);
        drop(sockets);
        // Lost between the caller's check and now: shut it down too.
        if self.lost_flag.load(Ordering::Acquire) {
            if let Some(s) = self.sockets.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                if let Some(s) = s.upgrade() {
                    sys::shutdown(s.fd());
                }
            }
        }
    }
}

/// The user side: dropping the last one tells the lease task to release.
struct Holder {
    shared: Arc<LeaseShared>,
    release: Mutex<Option<oneshot::Sender<()>>>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(tx) = self.release.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The task may be gone (lease lost, runtime shut down): then the kernel's
            // lifetime and the server's expiry finish the job.
            let _ = tx.send(());
        }
    }
}

/// One leased address (see the module documentation). Cheap to clone.
#[derive(Clone)]
pub struct OwnedAddr {
    holder: Arc<Holder>,
}

impl fmt::Debug for OwnedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedAddr")
            .field("ip", &self.ip())
            .field("prefix_len", &self.prefix_len())
            .field("lost", &self.lost())
            .finish()
    }
}

/// How long a blocking connect may take.
const STD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl OwnedAddr {
    pub(crate) fn new(shared: Arc<LeaseShared>, release: oneshot::Sender<()>) -> OwnedAddr {
        OwnedAddr {
            holder: Arc::new(Holder {
                shared,
                release: Mutex::new(Some(release)),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<LeaseShared> {
        &self.holder.shared
    }

    /// The leased address.
    pub fn ip(&self) -> Ipv4Addr {
        self.holder.shared.ip
    }

    /// The prefix length it was installed with.
    pub fn prefix_len(&self) -> u8 {
        self.holder.shared.prefix_len
    }

    /// Where it came from (the DHCP server, lease time, client identity).
    pub fn origin(&self) -> &Origin {
        &self.holder.shared.origin
    }

    /// Why the lease ended, once it has; `None` while it is held.
    pub fn lost(&self) -> Option<LeaseLost> {
        self.holder.shared.lost()
    }

    /// Resolves when the lease is lost (never, while it is held).
    pub async fn lost_wait(&self) -> LeaseLost {
        let mut rx = self.holder.shared.lost_tx.subscribe();
        let _ = rx.wait_for(|lost| *lost).await;
        self.lost().unwrap_or_else(|| LeaseLost {
            ip: self.ip(),
            why: "the pool is gone".into(),
        })
    }

    pub(crate) fn check(&self) -> io::Result<()> {
        match self.lost() {
            Some(l) => Err(lost_error(l)),
            None => Ok(()),
        }
    }

    /// A UDP socket bound to this address and `port` (0: an ephemeral port).
    pub fn udp(&self, port: u16) -> io::Result<LeasedUdpSocket> {
        self.check()?;
        LeasedUdpSocket::bind(self.clone(), port)
    }

    /// A TCP connection from this address (ephemeral port) to `peer`.
    pub async fn tcp_connect(&self, peer: SocketAddr) -> io::Result<LeasedTcpStream> {
        self.check()?;
        LeasedTcpStream::connect(self.clone(), peer).await
    }

    /// A TCP listener on this address and `port`.
    pub fn tcp_listen(&self, port: u16) -> io::Result<LeasedTcpListener> {
        self.check()?;
        LeasedTcpListener::bind(self.clone(), port)
    }

    /// A blocking UDP socket bound to this address and `port`, for code without a runtime.
    pub fn std_udp(&self, port: u16) -> io::Result<LeasedStdUdp> {
        self.check()?;
        LeasedStdUdp::bind(self.clone(), port)
    }

    /// A blocking TCP connection from this address to `peer` (10 s to connect).
    pub fn std_tcp_connect(&self, peer: SocketAddr) -> io::Result<LeasedStdTcp> {
        self.check()?;
        LeasedStdTcp::connect(self.clone(), peer, STD_CONNECT_TIMEOUT)
    }
}

/// The `io::Error` a socket returns once its lease is lost.
pub(crate) fn lost_error(l: LeaseLost) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, l)
}
