//! Large HTTP transfers in a boot storm are sent a bounded number at a time, machines that
//! started booting first going first.
//!
//! When 200 machines ask for a 14 MB kernel at once and the bottleneck is shared (the
//! server's link, or its disks), sending to all of them at once gives each 1/200 of it:
//! every machine finishes at the very end of the storm. Sending to `http.concurrent_transfers`
//! of them at a time moves the same bytes in the same total time, but machines finish one
//! after another — half of them by half-time — and start booting their kernels meanwhile.
//!
//! Who goes first: the machine (client address) whose first large transfer came earliest,
//! so a machine that got its kernel asks for its initrd ahead of the machines that are
//! still waiting for their kernels. A transfer never waits longer than [`MAX_WAIT`] (then it
//! is sent beside the others, as if there were no gate: boot firmware gives up on a silent
//! response after a few seconds), and one whose client stops reading for [`STALL`] gives
//! its place back to the next one and goes on without it, so slow or stuck clients do not
//! hold the storm back. Files under [`GATED_FROM`] bytes (scripts, configurations) are
//! never held.

use metrics::{counter, gauge};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Bodies at least this large wait for a place; smaller ones are sent at once.
pub const GATED_FROM: u64 = 1 << 20;
/// The longest a transfer waits for a place before it is sent anyway.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// A transfer whose client accepts nothing for this long gives its place to the next.
pub const STALL: Duration = Duration::from_millis(250);
/// How long a client's first large transfer counts for its place in the queue.
const CLIENT_MEMORY: Duration = Duration::from_secs(60);
/// Clients remembered at once (their first transfer's time).
const MAX_CLIENTS: usize = 16_384;

/// The places for large transfers, shared by every connection of the HTTP service.
pub struct TransferGate {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    active: usize,
    /// Waiting transfers by (their client's first transfer, arrival): the earliest first.
    queue: BTreeMap<(Instant, u64), oneshot::Sender<()>>,
    first_seen: HashMap<IpAddr, Instant>,
    arrivals: u64,
    full_logged: bool,
}

/// How a transfer got to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// A place was free.
    AtOnce,
    /// After waiting for a place.
    Queued,
    /// After waiting [`MAX_WAIT`] without getting a place: it holds none.
    WaitedTooLong,
}

/// A place held by one transfer: given back (to the next waiting transfer) when dropped or
/// [`Permit::give_back`]ed.
pub struct Permit {
    gate: Option<Arc<TransferGate>>,
    pub admitted: Admitted,
}

impl Permit {
    /// The transfer goes on without its place (its client is slow): the next one starts.
    pub fn give_back(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.release();
        }
    }

    /// Whether this transfer still holds a place.
    pub fn holds_place(&self) -> bool {
        self.gate.is_some()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// A transfer waiting for its place; if it is dropped just after a place was handed to
/// it, the place goes on to the next.
struct Waiting {
    rx: oneshot::Receiver<()>,
    gate: Arc<TransferGate>,
    /// The place handed over was taken (by a [`Permit`]).
    taken: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.gate.release();
        }
    }
}

impl TransferGate {
    /// `limit` transfers at once; 0: no limit (every transfer goes at once).
    pub fn new(limit: usize) -> Arc<TransferGate> {
        Arc::new(TransferGate { limit, state: Mutex::new(State::default()) })
    }

    /// Waits for a place for a transfer to `client` (at most [`MAX_WAIT`]).
    pub async fn admit(self: &Arc<Self>, client: IpAddr) -> Permit {
        if self.limit == 0 {
            return Permit { gate: None, admitted: Admitted::AtOnce };
        }
        let now = Instant::now();
        let waiting = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let first = s.first_transfer(client, now);
            if s.active < self.limit {
                s.active += 1;
                gauge!("fleetboot_http_transfers_active").set(s.active as f64);
                return Permit { gate: Some(self.clone()), admitted: Admitted::AtOnce };
            }
            let (tx, rx) = oneshot::channel();
            s.arrivals += 1;
            let key = (first, s.arrivals);
            s.queue.insert(key, tx);
            gauge!("fleetboot_http_transfers_queued").set(s.queue.len() as f64);
            if s.queue.len() == 1 {
                tracing::debug!(limit = self.limit, "large transfers are queuing: all places are taken");
            }
            (Waiting { rx, gate: self.clone(), taken: false }, key)
        };
        let (mut waiting, key) = waiting;
        match tokio::time::timeout(MAX_WAIT, &mut waiting.rx).await {
            Ok(Ok(())) => {
                // The place was handed over with the active count unchanged: it is ours now.
                waiting.taken = true;
                Permit { gate: Some(self.clone()), admitted: Admitted::Queued }
            }
            _ => {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                s.queue.remove(&key);
                gauge!("fleetboot_http_transfers_queued").set(s.queue.len() as f64);
                drop(s);
                tracing::debug!(%client, "a large transfer waited its longest for a place; sent beside the others");
                // Dropping `waiting` gives back a place handed over after the timeout.
                drop(waiting);
                Permit { gate: None, admitted: Admitted::WaitedTooLong }
            }
        }
    }

    /// A place is free: the first waiting transfer gets it, else it is free.
    fn release(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, tx)) = s.queue.pop_first() {
            if tx.send(()).is_ok() {
                gauge!("fleetboot_http_transfers_queued").set(s.queue.len() as f64);
                return;
            }
        }
        gauge!("fleetboot_http_transfers_queued").set(0.0);
        s.active = s.active.saturating_sub(1);
        gauge!("fleetboot_http_transfers_active").set(s.active as f64);
    }

    /// Transfers holding a place and waiting for one.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.active, s.queue.len())
    }
}

impl State {
    /// When `client` asked for its first large transfer (within [`CLIENT_MEMORY`]).
    fn first_transfer(&mut self, client: IpAddr, now: Instant) -> Instant {
        if let Some(&first) = self.first_seen.get(&client) {
            if now.duration_since(first) < CLIENT_MEMORY {
                return first;
            }
        }
        if self.first_seen.len() >= MAX_CLIENTS && !self.first_seen.contains_key(&client) {
            self.first_seen.retain(|_, first| now.duration_since(*first) < CLIENT_MEMORY);
            if self.first_seen.len() >= MAX_CLIENTS {
                // Every entry is recent: this client is ordered by its own arrival only.
                counter!("fleetboot_http_transfer_clients_full_total").increment(1);
                if !self.full_logged {
                    self.full_logged = true;
                    tracing::warn!(max = MAX_CLIENTS, "too many clients to order large transfers by their first one; newcomers go by arrival");
                }
                return now;
            }
        }
        self.first_seen.insert(client, now);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// Polls `f` once (it is not ready when a place is not free).
    async fn try_admit(gate: &Arc<TransferGate>, client: IpAddr) -> tokio::task::JoinHandle<Permit> {
        let gate = gate.clone();
        let h = tokio::spawn(async move { gate.admit(client).await });
        tokio::task::yield_now().await;
        h
    }

    #[tokio::test]
    async fn a_client_that_started_first_goes_ahead_of_later_ones() {
        let gate = TransferGate::new(1);
        // Client 1 takes the place with its kernel; 2 and 3 wait for theirs.
        let kernel1 = gate.admit(ip(1)).await;
        assert_eq!(kernel1.admitted, Admitted::AtOnce);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let kernel2 = try_admit(&gate, ip(2)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let kernel3 = try_admit(&gate, ip(3)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Client 1's initrd comes after both, but client 1 started first.
        let initrd1 = try_admit(&gate, ip(1)).await;
        assert_eq!(gate.counts(), (1, 3));
        drop(kernel1);
        let initrd1 = initrd1.await.unwrap();
        assert_eq!(initrd1.admitted, Admitted::Queued);
        assert!(!kernel2.is_finished() && !kernel3.is_finished());
        drop(initrd1);
        let k2 = kernel2.await.unwrap();
        assert!(!kernel3.is_finished());
        drop(k2);
        assert_eq!(kernel3.await.unwrap().admitted, Admitted::Queued);
        assert_eq!(gate.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_transfer_waits_at_most_max_wait_and_then_holds_no_place() {
        let gate = TransferGate::new(1);
        let held = gate.admit(ip(1)).await;
        let waiter = try_admit(&gate, ip(2)).await;
        tokio::time::sleep(MAX_WAIT + Duration::from_millis(50)).await;
        let late = waiter.await.unwrap();
        assert_eq!(late.admitted, Admitted::WaitedTooLong);
        assert!(!late.holds_place());
        drop(late);
        // Its end gives back no place it never had.
        assert_eq!(gate.counts(), (1, 0));
        drop(held);
        assert_eq!(gate.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_place_given_back_early_or_abandoned_goes_to_the_next() {
        let gate = TransferGate::new(1);
        let mut slow = gate.admit(ip(1)).await;
        let gone = try_admit(&gate, ip(2)).await;
        let next = try_admit(&gate, ip(3)).await;
        // Client 2 hangs up while waiting.
        gone.abort();
        let _ = gone.await;
        // Client 1 stops reading: it gives its place back and goes on without.
        slow.give_back();
        assert!(!slow.holds_place());
        let next = next.await.unwrap();
        assert_eq!(next.admitted, Admitted::Queued);
        assert_eq!(gate.counts(), (1, 0));
        drop(slow);
        drop(next);
        assert_eq!(gate.counts(), (0, 0));
    }

    #[tokio::test]
    async fn no_limit_means_no_waiting() {
        let gate = TransferGate::new(0);
        let permits: Vec<_> = futures_util::future::join_all((0..50).map(|i| gate.admit(ip(i)))).await;
        assert!(permits.iter().all(|p| p.admitted == Admitted::AtOnce && !p.holds_place()));
        assert_eq!(gate.counts(), (0, 0));
    }

    #[test]
    fn the_clients_remembered_are_bounded_and_newcomers_then_go_by_arrival() {
        let mut state = State::default();
        let start = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            state.first_transfer(IpAddr::from(i.to_be_bytes()), start);
        }
        assert_eq!(state.first_seen.len(), MAX_CLIENTS);
        // Every entry is recent: one more client is not remembered, and is ordered by now.
        let later = start + Duration::from_secs(1);
        let stranger = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(state.first_transfer(stranger, later), later);
        assert_eq!(state.first_seen.len(), MAX_CLIENTS);
        assert!(!state.first_seen.contains_key(&stranger));
        // A remembered client keeps its place.
        assert_eq!(state.first_transfer(IpAddr::from(7u32.to_be_bytes()), later), start);
        // Once the entries are older than CLIENT_MEMORY they make room.
        let much_later = start + CLIENT_MEMORY + Duration::from_secs(1);
        assert_eq!(state.first_transfer(stranger, much_later), much_later);
        assert_eq!(state.first_seen.len(), 1);
    }

    #[tokio::test]
    async fn many_transfers_through_few_places_leave_nothing_held() {
        let gate = TransferGate::new(3);
        let mut tasks = Vec::new();
        for i in 0..40u8 {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let p = gate.admit(ip(i % 7)).await;
                tokio::time::sleep(Duration::from_millis(5 + i as u64 % 4)).await;
                drop(p);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(gate.counts(), (0, 0));
    }
}
