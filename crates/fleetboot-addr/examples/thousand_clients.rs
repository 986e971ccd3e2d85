//! One machine, a thousand clients: leases N addresses on one interface (DHCP, or a static
//! range), opens a TCP connection and a UDP exchange from each to a peer, then lets them
//! all go (DHCPRELEASE, addresses removed).
//!
//! ```text
//! ip netns exec LAB cargo run -p fleetboot-addr --example thousand_clients -- \
//!     --interface eth0 --count 1000 --peer 10.78.0.1:7000
//! ip netns exec LAB cargo run -p fleetboot-addr --example thousand_clients -- \
//!     --interface eth0 --count 200 --static 10.78.2.0-10.78.2.255/20
//! ```
//!
//! `--dad` chooses the ARP probing before use (default `quick`: 2 probes 100 ms apart and
//! 200 ms of listening; `rfc5227` takes 4-7 s per address), `--pending` how many leases
//! are acquired at once (default 256).
//!
//! The peer (`--peer IP:PORT`) is any TCP and UDP echo service on that port; without one
//! the addresses are only leased, installed and released. Run it inside a network
//! namespace you made: it broadcasts DHCP and changes the interface's addresses.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fleetboot_addr::{AddrPool, DadConfig, OwnedAddr, PoolConfig, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    interface: String,
    count: usize,
    peer: Option<SocketAddr>,
    range: Option<(Ipv4Addr, Ipv4Addr, u8)>,
    hold: Duration,
    dad: Option<DadConfig>,
    pending: usize,
}

fn parse_range(s: &str) -> Option<(Ipv4Addr, Ipv4Addr, u8)> {
    let (range, prefix) = s.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, prefix.parse().ok()?))
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        interface: String::new(),
        count: 100,
        peer: None,
        range: None,
        hold: Duration::ZERO,
        dad: Some(DadConfig::quick()),
        pending: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--interface" => a.interface = value()?,
            "--count" => a.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--peer" => a.peer = Some(value()?.parse().map_err(|e| format!("--peer: {e}"))?),
            "--static" => {
                let v = value()?;
                a.range = Some(parse_range(&v).ok_or(format!("--static {v}: want FIRST-LAST/PREFIX"))?);
            }
            "--dad" => {
                a.dad = match value()?.as_str() {
                    "quick" => Some(DadConfig::quick()),
                    "rfc5227" => Some(DadConfig::rfc5227()),
                    "off" => None,
                    v => return Err(format!("--dad {v}: quick, rfc5227 or off")),
                }
            }
            "--pending" => a.pending = value()?.parse().map_err(|e| format!("--pending: {e}"))?,
            "--hold" => a.hold = Duration::from_secs(value()?.parse().map_err(|e| format!("--hold: {e}"))?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.interface.is_empty() {
        return Err("--interface is required".into());
    }
    Ok(a)
}

/// A TCP line and a UDP datagram to the peer, each answered: proof the address works.
async fn talk(addr: &OwnedAddr, peer: SocketAddr) -> std::io::Result<()> {
    let line = format!("hello from {}\n", addr.ip());
    let mut tcp = addr.tcp_connect(peer).await?;
    tcp.write_all(line.as_bytes()).await?;
    let mut back = vec![0u8; line.len()];
    tcp.read_exact(&mut back).await?;
    let udp = addr.udp(0)?;
    let mut buf = [0u8; 512];
    for _ in 0..5 {
        udp.send_to(line.as_bytes(), peer).await?;
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), udp.recv_from(&mut buf)).await {
            let (n, _) = r?;
            if buf[..n] == *line.as_bytes() {
                return Ok(());
            }
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no UDP echo"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let a = args().map_err(|e| format!("{e}\nusage: thousand_clients --interface IF [--count N] [--peer IP:PORT] [--static FIRST-LAST/PREFIX] [--dad quick|rfc5227|off] [--pending N] [--hold SECS]"))?;
    let mut cfg = match a.range {
        Some((first, last, prefix)) => PoolConfig::static_range(&a.interface, first, last, prefix),
        None => PoolConfig::dhcp(&a.interface),
    };
    cfg.dad = a.dad;
    cfg.max_pending = a.pending;
    if let Source::Dhcp(d) = &mut cfg.source {
        // Quick first retries for a lab segment, and the patience of a real client
        // (10 DISCOVERs over ~50 s) for a server that falls behind.
        d.initial_timeout = Duration::from_millis(500);
        d.discover_attempts = 10;
    }
    let pool = AddrPool::start(cfg)?;
    // The interface's own addresses, which are not the pool's to count.
    let before: std::collections::HashSet<Ipv4Addr> = pool.installed()?.iter().map(|a| a.ip).collect();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..a.count)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let addr = pool.lease().await.map_err(|e| e.to_string())?;
                if let Some(peer) = a.peer {
                    talk(&addr, peer).await.map_err(|e| format!("{}: {e}", addr.ip()))?;
                }
                Ok::<_, String>(addr)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        match t.await? {
            Ok(addr) => held.push(addr),
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} of {} addresses leased, installed{} in {secs:.2} s ({:.0}/s)",
        held.len(),
        a.count,
        if a.peer.is_some() { " and used" } else { "" },
        held.len() as f64 / secs
    );
    for (e, n) in &errors {
        println!("  {n} × {e}");
    }
    tokio::time::sleep(a.hold).await;
    let t1 = Instant::now();
    let released = held.len();
    drop(held);
    pool.idle().await;
    let left = pool.installed()?.iter().filter(|a| !before.contains(&a.ip)).count();
    println!(
        "{released} released and removed in {:.2} s; {left} addresses left on {}",
        t1.elapsed().as_secs_f64(),
        a.interface
    );
    println!("{:?}", pool.stats());
    Ok(())
}
