//! What one host, or all of them together, can make the NBD server hold.
//!
//! - **Connections**: at most [`Limits::max_connections`] in all and
//!   [`Limits::max_connections_per_client`] per client address. A connection past either
//!   cap is closed at once (before the greeting), counted in
//!   `fleetboot_nbd_connections_refused_total{reason}` and logged at most once per 10 s.
//! - **Idle connections** give way: when a cap is reached, a connection that has waited
//!   longer than [`Limits::idle_timeout`] for its next request is closed to make room
//!   (the idlest first; per-address cap: one of that address's own). An idle connection
//!   nobody needs the room of stays: a diskless machine's root disk may be quiet for hours,
//!   and closing it would fail the machine. Dead peers are found by TCP keepalive.
//! - **Stalls**: a handshake must finish within [`Limits::handshake_timeout`]; once a
//!   request has begun (its header or WRITE payload partly received) or a reply is being
//!   sent, each read or write must progress within [`Limits::request_timeout`].
//! - **Memory** per connection: its input buffer (256 KiB) plus one READ piece
//!   ([`crate::transmission::READ_PIECE`]), whatever the clients ask.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds of the NBD server; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    /// Threads doing disk I/O for every connection ([`crate::pool::DiskPool`]).
    pub io_threads: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            max_connections_per_client: 16,
            handshake_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(300),
            io_threads: 8,
        }
    }
}

/// Logs a condition at most once per period, counting what it held back.
#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl LogEvery {
    pub const fn new(period: Duration) -> LogEvery {
        LogEvery { period, last: Mutex::new(None), held: AtomicU64::new(0) }
    }

    /// `Some(held back since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.period => {
                self.held.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.held.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// [`Limits::max_connections`] are open.
    Global,
    /// This address has [`Limits::max_connections_per_client`] open.
    PerClient,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Global => "global_cap",
            Refused::PerClient => "per_client_cap",
        }
    }
}

const BUSY: u64 = u64::MAX;

/// TCP keepalive on a client's socket: a peer that vanished (powered off mid-session) frees
/// its slot, and its overlay, within minutes, without closing quiet but live clients.
pub fn keep_alive(sock: &impl std::os::fd::AsFd) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    let _ = socket2::SockRef::from(sock).set_tcp_keepalive(&keepalive);
}

/// What a connection tells the admission about itself.
#[derive(Debug)]
pub struct Activity {
    /// Milliseconds (since the admission began) at which the connection started waiting for
    /// its next request; [`BUSY`] while it is in its handshake or works on one.
    idle_since: AtomicU64,
    evicted: AtomicBool,
    evict: tokio::sync::Notify,
    base: Instant,
}

impl Activity {
    /// Waiting for the next request, nothing half-received, no reply pending.
    pub fn idle(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.idle_since.store(ms.min(BUSY - 1), Ordering::Relaxed);
    }
    pub fn busy(&self) {
        self.idle_since.store(BUSY, Ordering::Relaxed);
    }
    /// Resolves once the connection was chosen to make room for another.
    pub async fn evicted(&self) {
        loop {
            if self.evicted.load(Ordering::Acquire) {
                return;
            }
            self.evict.notified().await;
        }
    }
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct Slot {
    ip: IpAddr,
    activity: Arc<Activity>,
}

#[derive(Debug, Default)]
struct State {
    per_ip: HashMap<IpAddr, usize>,
    conns: HashMap<u64, Slot>,
    next: u64,
}

/// Counts connections against [`Limits`]; hands out a [`Ticket`] per admitted one.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    idle_ms: u64,
    base: Instant,
    state: Mutex<State>,
}

/// An admitted connection; dropping it frees the slot (unless it was evicted, which freed
/// it already).
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    pub activity: Arc<Activity>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        if let Some(slot) = st.conns.remove(&self.id) {
            Admission::forget(&mut st, slot.ip);
        }
        metrics::gauge!("fleetboot_nbd_connections").set(st.conns.len() as f64);
    }
}

impl Admission {
    pub fn new(limits: &Limits) -> Arc<Admission> {
        Arc::new(Admission {
            max_total: limits.max_connections.max(1),
            max_per_ip: limits.max_connections_per_client.max(1),
            idle_ms: limits.idle_timeout.as_millis() as u64,
            base: Instant::now(),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(st: &mut State, ip: IpAddr) {
        if let Some(n) = st.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                st.per_ip.remove(&ip);
            }
        }
    }

    /// The connection (of `ip`, or of anyone) idle the longest, if longer than the idle
    /// timeout.
    fn idlest(&self, st: &State, ip: Option<IpAddr>) -> Option<u64> {
        let now = self.base.elapsed().as_millis() as u64;
        st.conns
            .iter()
            .filter(|(_, s)| ip.is_none_or(|ip| s.ip == ip))
            .filter_map(|(id, s)| {
                let since = s.activity.idle_since.load(Ordering::Relaxed);
                (since != BUSY && now.saturating_sub(since) >= self.idle_ms).then_some((since, *id))
            })
            .min()
            .map(|(_, id)| id)
    }

    fn evict(st: &mut State, id: u64) {
        if let Some(slot) = st.conns.remove(&id) {
            Admission::forget(st, slot.ip);
            slot.activity.evicted.store(true, Ordering::Release);
            slot.activity.evict.notify_one();
            metrics::counter!("fleetboot_nbd_connections_evicted_total").increment(1);
            tracing::debug!(peer = %slot.ip, "an idle connection makes room for a new one");
        }
    }

    /// Admits a connection from `ip`, making room by closing an idle connection if a cap
    /// is reached, or says which cap refused it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let mut st = self.lock();
        if st.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            match self.idlest(&st, Some(ip)) {
                Some(id) => Admission::evict(&mut st, id),
                None => return Err(Refused::PerClient),
            }
        }
        if st.conns.len() >= self.max_total {
            match self.idlest(&st, None) {
                Some(id) => Admission::evict(&mut st, id),
                None => return Err(Refused::Global),
            }
        }
        let id = st.next;
        st.next += 1;
        let activity = Arc::new(Activity {
            idle_since: AtomicU64::new(BUSY),
            evicted: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
            base: self.base,
        });
        st.conns.insert(id, Slot { ip, activity: activity.clone() });
        *st.per_ip.entry(ip).or_insert(0) += 1;
        metrics::gauge!("fleetboot_nbd_connections").set(st.conns.len() as f64);
        Ok(Ticket { admission: self.clone(), id, activity })
    }

    /// [`Admission::admit`], or the refusal counted in
    /// `fleetboot_nbd_connections_refused_total{reason}` and logged at most once per 10 s,
    /// naming the setting that caps it (`caps`: the global one, the per-address one).
    pub fn admit_or_count(self: &Arc<Self>, peer: SocketAddr, caps: (&str, &str)) -> Option<Ticket> {
        static REFUSED_CONNECTIONS: LogEvery = LogEvery::new(Duration::from_secs(10));
        let refused = match self.admit(peer.ip()) {
            Ok(ticket) => return Some(ticket),
            Err(refused) => refused,
        };
        metrics::counter!("fleetboot_nbd_connections_refused_total", "reason" => refused.label()).increment(1);
        if let Some(held_back) = REFUSED_CONNECTIONS.allow() {
            let (open, from_peer) = self.open(peer.ip());
            let cap = match refused {
                Refused::Global => caps.0,
                Refused::PerClient => caps.1,
            };
            tracing::warn!(%peer, open, from_peer, cap, held_back, "NBD connection refused: the cap is reached");
        }
        None
    }

    /// Connections open now (in all, and from `ip`).
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let st = self.lock();
        (st.conns.len(), st.per_ip.get(&ip).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize, idle_ms: u64) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_client: per,
            idle_timeout: Duration::from_millis(idle_ms),
            ..Limits::default()
        }
    }

    #[test]
    fn caps_per_address_and_in_all() {
        let a = Admission::new(&limits(5, 2, 3_600_000));
        let (x, y, z): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).unwrap_err(), Refused::PerClient);
        let _t3 = a.admit(y).unwrap();
        let _t4 = a.admit(y).unwrap();
        let _t5 = a.admit(z).unwrap();
        assert_eq!(a.admit(z).unwrap_err(), Refused::Global);
        assert_eq!(a.open(x), (5, 2));
        drop(t1);
        assert_eq!(a.open(x), (4, 1));
        let t6 = a.admit(z).unwrap();
        let w: IpAddr = "10.0.0.4".parse().unwrap();
        // Busy or recently idle connections are never evicted.
        t6.activity.idle();
        assert_eq!(a.admit(w).unwrap_err(), Refused::Global);
    }

    #[test]
    fn a_connection_idle_past_the_timeout_makes_room() {
        let a = Admission::new(&limits(2, 2, 0));
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let busy = a.admit(x).unwrap();
        let idle = a.admit(x).unwrap();
        idle.activity.idle();
        // Per address: x's idle connection goes for x's new one.
        let newer = a.admit(x).unwrap();
        assert!(idle.activity.is_evicted());
        assert!(!busy.activity.is_evicted());
        assert_eq!(a.open(x), (2, 2));
        drop(idle); // the evicted connection closing frees nothing twice
        assert_eq!(a.open(x), (2, 2));
        // In all: nobody idle, y is refused; once x's newer connection idles, y gets in.
        assert_eq!(a.admit(y).unwrap_err(), Refused::Global);
        newer.activity.idle();
        let _y = a.admit(y).unwrap();
        assert!(newer.activity.is_evicted());
        assert_eq!(a.open(y), (2, 1));
        drop(busy);
        assert_eq!(a.open(x), (1, 0));
    }

    #[tokio::test]
    async fn eviction_wakes_the_connection() {
        let a = Admission::new(&limits(1, 1, 0));
        let t = a.admit("10.0.0.1".parse().unwrap()).unwrap();
        t.activity.idle();
        let act = t.activity.clone();
        let waiter = tokio::spawn(async move { act.evicted().await });
        let _other = a.admit("10.0.0.1".parse().unwrap()).unwrap();
        waiter.await.unwrap();
    }

    #[test]
    fn log_every_holds_back_and_counts() {
        let l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.held.load(Ordering::Relaxed), 2);
    }
}
