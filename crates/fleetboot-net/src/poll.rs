//! Waiting on several sockets with a deadline (`ppoll(2)`, nanosecond resolution: a
//! paced sender's waits are often well under a millisecond).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// A reusable set of sockets to wait on.
///
/// ```no_run
/// # use fleetboot_net::Poller;
/// # let (a, b) = (std::net::UdpSocket::bind("127.0.0.1:0")?, std::net::UdpSocket::bind("127.0.0.1:0")?);
/// # let deadline = None;
/// let mut poller = Poller::new();
/// let ia = poller.add(&a);
/// let ib = poller.add(&b);
/// poller.wait(deadline)?;
/// if poller.is_ready(ia) { /* drain a */ }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Poller {
    fds: Vec<libc::pollfd>,
}

impl Poller {
    pub fn new() -> Poller {
        Poller::default()
    }

    /// Forgets every socket (to rebuild the set when sockets come and go).
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds a socket to wait for; returns its position for [`Poller::is_ready`]. The set
    /// holds the descriptor number only: keep the socket open until [`Poller::wait`]
    /// returns (a closed one is reported ready, with `POLLNVAL`).
    pub fn add(&mut self, sock: &impl AsFd) -> usize {
        self.fds.push(libc::pollfd { fd: sock.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 });
        self.fds.len() - 1
    }

    /// Sockets in the set.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Waits until a socket is readable (or has an error to report) or `deadline` passes
    /// (`None`: no deadline; a deadline already past checks without waiting). Returns how
    /// many are ready; 0 after the deadline or a signal.
    pub fn wait(&mut self, deadline: Option<Instant>) -> io::Result<usize> {
        self.wait_for(deadline.map(|d| d.saturating_duration_since(Instant::now())))
    }

    /// [`Poller::wait`] with a timeout instead of a deadline.
    pub fn wait_for(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        for f in &mut self.fds {
            f.revents = 0;
        }
        crate::sys::ppoll(&mut self.fds, timeout)
    }

    /// Whether the socket at `index` was ready after the last wait.
    pub fn is_ready(&self, index: usize) -> bool {
        self.fds
            .get(index)
            .is_some_and(|f| f.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
    }
}

/// Waits until `sock` is readable or `timeout` passes; returns whether it is readable.
pub fn wait_readable(sock: &impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut p = Poller::new();
    p.add(sock);
    Ok(p.wait_for(Some(timeout))? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UdpBuilder;

    #[test]
    fn reports_which_socket_is_readable() {
        let a = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        let b = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        let mut p = Poller::new();
        let (ia, ib) = (p.add(&a), p.add(&b));
        assert_eq!(p.len(), 2);
        // Nothing queued, a deadline already past: returns at once, nothing ready.
        assert_eq!(p.wait(Some(Instant::now())).unwrap(), 0);
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        assert_eq!(p.wait(Some(Instant::now() + Duration::from_secs(5))).unwrap(), 1);
        assert!(!p.is_ready(ia));
        assert!(p.is_ready(ib));
        assert!(!p.is_ready(7));
        assert!(wait_readable(&b, Duration::from_secs(5)).unwrap());
        let mut buf = [0u8; 4];
        b.recv(&mut buf).unwrap();
        assert!(!wait_readable(&b, Duration::from_millis(1)).unwrap());
        p.clear();
        assert!(p.is_empty());
    }
}
