//! The two durability promises of the address service, in-process on loopback (no root):
//!
//! - "An ACK never goes out for a lease that is not on disk": with a lease store that
//!   holds the commit until the test lets it go, and with one whose commit fails, the
//!   client's REQUEST gets no ACK on its real socket, while the server keeps answering
//!   others (a later client's OFFER arrives: everything sent before it has arrived too).
//!   Let go, the commit reaches the store and the ACK arrives after it, for a lease that a
//!   separate connection reads from the file.
//! - "Many ACKs, one fsync": a burst of REQUESTs whose commits queue up together is
//!   committed in one transaction (`fleetboot_store::Store::stats`), and no client sees
//!   its ACK before that transaction was let go.
//!
//! Nothing here waits on a clock to decide: the tests wait for what the server does (its
//! commit was asked for, its trace says the reply was withheld, its store has queued the
//! writes), and `HANG` only stops a test that hangs.

mod loopback;

use fleetboot::serve::{Commit, LeaseStore, Options};
use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::{ClientConfig, DhcpClient};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_store::{Store, StoreError, Write};
use loopback::{Loopback, HANG};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const SECTIONS: &str = r#"
[[dhcp.subnet]]
network = "127.0.0.0/8"
range = ["127.77.0.10", "127.77.0.250"]

[[profile]]
name = "everyone"
boot = { kind = "boot_file", path = "x.efi" }
"#;

/// A lease store that reports each commit it is asked for and holds it until the test
/// lets it go on to the real store (or drops the go-ahead: the commit then fails).
struct HeldCommits {
    store: Store,
    asked: mpsc::UnboundedSender<(Vec<Write>, oneshot::Sender<()>)>,
}

impl LeaseStore for HeldCommits {
    fn commit(&self, writes: Vec<Write>) -> Commit<'_> {
        let (go, released) = oneshot::channel();
        let _ = self.asked.send((writes.clone(), go));
        Box::pin(async move {
            released.await.map_err(|_| StoreError::WriterGone)?;
            self.store.write(writes).await
        })
    }
}

/// A lease store whose commits fail (as a full disk or a stopped writer would).
struct FailsCommits(mpsc::UnboundedSender<Vec<Write>>);

impl LeaseStore for FailsCommits {
    fn commit(&self, writes: Vec<Write>) -> Commit<'_> {
        let _ = self.0.send(writes);
        Box::pin(async { Err(StoreError::WriterGone) })
    }
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x77, 0x01, last])
}

fn is(m: &DhcpMessage, mac: MacAddr, mt: MessageType) -> bool {
    m.mac() == mac && m.message_type() == Some(mt)
}

/// Client `a` asks for a lease up to its REQUEST; `stored` waits until the server has done
/// what the store lets it (asked for the commit, learned of its failure). Then client `b`
/// sends a DISCOVER and the test reads the client port until `b`'s OFFER: everything the
/// server sent before that OFFER, in particular any ACK for `a`, has arrived by then.
async fn request_then_marker<F: std::future::Future<Output = ()>>(lb: &Loopback, a: MacAddr, b: MacAddr, stored: impl FnOnce() -> F) -> Vec<DhcpMessage> {
    let t0 = Instant::now();
    let mut c = DhcpClient::new(ClientConfig::ipxe(a, [1; 16]), 0xA1, t0);
    let mut out = Vec::new();
    c.poll_transmit(t0, &mut out).unwrap();
    lb.dhcp_send(&out).await;
    let offer = lb.dhcp_until(|m| is(m, a, MessageType::Offer)).await;
    c.handle(t0, SocketAddr::from(([127, 0, 0, 1], 67)), &offer.last().unwrap().encode());
    out.clear();
    c.poll_transmit(t0, &mut out).unwrap();
    assert_eq!(DhcpMessage::parse(&out).unwrap().message_type(), Some(MessageType::Request));
    lb.dhcp_send(&out).await;
    stored().await;
    let mut d = DhcpClient::new(ClientConfig::ipxe(b, [2; 16]), 0xB2, t0);
    out.clear();
    d.poll_transmit(t0, &mut out).unwrap();
    lb.dhcp_send(&out).await;
    lb.dhcp_until(|m| is(m, b, MessageType::Offer)).await
}

/// The commit is asked for and held: no ACK leaves while it is held and the lease is not
/// in the store, yet the server goes on answering; let go, the commit reaches the store
/// and only then does the ACK arrive, for the lease now on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_while_the_lease_commit_has_not_completed() {
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    let options = Options { lease_store: Some(Box::new(move |store| Arc::new(HeldCommits { store, asked: asked_tx }))) };
    let lb = Loopback::start_with("held-commit", "server", SECTIONS, options).await;
    let store = lb.server.shared().store.clone();
    let (a, b) = (mac(1), mac(2));
    let mut go = None;
    let got = request_then_marker(&lb, a, b, || async {
        let (writes, release) = tokio::time::timeout(HANG, asked.recv()).await.expect("the shell asked for a commit").unwrap();
        assert!(matches!(&writes[..], [Write::UpsertLease(l)] if l.mac == a.to_string()), "{writes:?}");
        go = Some(release);
    })
    .await;
    let acks: Vec<_> = got.iter().filter(|m| is(m, a, MessageType::Ack)).collect();
    assert!(acks.is_empty(), "an ACK left before its lease was on disk: {acks:?}");
    assert!(store.leases().unwrap().is_empty(), "the held commit reached the store");
    let before = store.stats();
    go.take().expect("the commit was asked for").send(()).unwrap();
    let ack = lb.dhcp_until(|m| is(m, a, MessageType::Ack)).await.pop().unwrap();
    // Read from a connection of its own: what a crash right after the ACK would leave.
    let on_disk = fleetboot_store::ReadOnlyStore::open(store.path()).unwrap().leases().unwrap();
    assert!(on_disk.iter().any(|l| l.ip == ack.yiaddr && l.mac == a.to_string()), "ACK for {} arrived, lease not on disk: {on_disk:?}", ack.yiaddr);
    assert_eq!(store.stats().durable_writes - before.durable_writes, 1, "the one held commit went through the store");
    lb.server.shutdown().await.unwrap();
}

/// The commit fails: the reply is withheld for good (the trace says so), and the server
/// goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_when_the_lease_commit_fails() {
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    let options = Options { lease_store: Some(Box::new(move |_| Arc::new(FailsCommits(asked_tx)))) };
    let lb = Loopback::start_with("fails-commits", "server", SECTIONS, options).await;
    let (a, b) = (mac(3), mac(4));
    let store = lb.server.shared().store.clone();
    let got = request_then_marker(&lb, a, b, || async {
        tokio::time::timeout(HANG, asked.recv()).await.expect("the shell asked for a commit").unwrap();
        // The shell learned of the failure once the trace (written after the outcome)
        // says the reply was withheld.
        let end = Instant::now() + HANG;
        while !store.trace(&a.to_string(), 100).unwrap().iter().any(|t| t.kind == "REPLY-WITHHELD") {
            assert!(Instant::now() < end, "no REPLY-WITHHELD in the trace after {HANG:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let acks: Vec<_> = got.iter().filter(|m| is(m, a, MessageType::Ack)).collect();
    assert!(acks.is_empty(), "an ACK left for a lease whose commit failed: {acks:?}");
    assert!(store.leases().unwrap().is_empty());
    lb.server.shutdown().await.unwrap();
}

/// 32 clients' REQUESTs arrive while the store's writer is held: their 32 lease commits
/// queue up, none is committed and no ACK leaves; released, all 32 go in one transaction
/// and every client is bound (with its lease on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_acks_costs_one_transaction() {
    const N: u64 = 32;
    let lb = Loopback::start("group-commit", "server", SECTIONS).await;
    let store = lb.server.shared().store.clone();
    let before = store.stats();
    let hold = store.hold_commits();
    let released = AtomicBool::new(false);
    let clients: Vec<ClientConfig> = (0..N as u8)
        .map(|i| {
            let mut c = ClientConfig::ipxe(mac(0x40 + i), [i; 16]);
            // No retransmission while the writer is held: exactly one REQUEST each.
            c.initial_timeout = HANG * 2;
            c
        })
        .collect();
    let release = async {
        let end = Instant::now() + HANG;
        while store.stats().queued < before.queued + N {
            assert!(Instant::now() < end, "only {:?} of {N} commits queued", store.stats().queued - before.queued);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let held = store.stats();
        assert_eq!(held.durable_writes, before.durable_writes, "nothing is committed while the writer is held");
        released.store(true, Ordering::SeqCst);
        drop(hold);
    };
    let ack_after_release = |m: &DhcpMessage| {
        if m.message_type() == Some(MessageType::Ack) {
            assert!(released.load(Ordering::SeqCst), "{} got its ACK while its lease commit was held", m.mac());
        }
    };
    let (bindings, ()) = tokio::join!(lb.dhcp_many(clients, ack_after_release), release);
    let after = store.stats();
    assert_eq!(after.queued - before.queued, N, "one commit per REQUEST");
    assert_eq!(after.durable_writes - before.durable_writes, N);
    assert_eq!(
        after.durable_transactions - before.durable_transactions,
        1,
        "{N} ACKs' leases in one transaction: {before:?} -> {after:?}"
    );
    let stored: Vec<_> = store.leases().unwrap().into_iter().map(|l| (l.ip, l.mac)).collect();
    assert_eq!(stored.len(), N as usize);
    for b in &bindings {
        assert!(stored.iter().any(|(ip, _)| *ip == b.ip), "{} was ACKed but is not on disk", b.ip);
    }
    lb.server.shutdown().await.unwrap();
}

/// The real store behind the shell: a lease is on disk by the time its ACK arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ack_finds_its_lease_on_disk() {
    let lb = Loopback::start("on-disk", "server", SECTIONS).await;
    let store: Store = lb.server.shared().store.clone();
    for i in 0..5u8 {
        let b = lb.dhcp(ClientConfig::pxe(mac(0x80 + i), [i; 16])).await;
        let on_disk = fleetboot_store::ReadOnlyStore::open(store.path()).unwrap().leases().unwrap();
        assert!(on_disk.iter().any(|l| l.ip == b.ip && l.mac == mac(0x80 + i).to_string()), "{} not on disk at its ACK", b.ip);
    }
    lb.server.shutdown().await.unwrap();
}
