//! The blocking shell (`fleetboot_nbd::blocking`), as an edge cache and an agent run it:
//! the protocol over a thread per connection, and the same bounds as the async server.

mod common;

use common::{wait_for, RawClient};
use fleetboot_nbd::blocking::{self, Exports};
use fleetboot_nbd::device::MemoryDisk;
use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, LookupError};
use fleetboot_nbd::limits::Admission;
use fleetboot_nbd::{BlockDevice, Limits};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const OTHER_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

struct OneDisk(Arc<MemoryDisk>);

impl ExportLookup for OneDisk {
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
        Ok(vec![("img".into(), "a disk".into())])
    }
    fn lookup(&mut self, name: &str, _go: bool) -> Result<ExportInfo, LookupError> {
        match name {
            "img" => Ok(ExportInfo { size: self.0.size(), read_only: false, multi_conn: true, description: "a disk".into() }),
            _ => Err(LookupError::Unknown(name.into())),
        }
    }
}

impl Exports for OneDisk {
    type Disk = MemoryDisk;
    fn disk(&mut self, _export: &str) -> Result<Arc<MemoryDisk>, LookupError> {
        Ok(self.0.clone())
    }
}

/// A blocking server on 127.0.0.1:0 within `limits`, serving one 1 MiB disk.
fn start(limits: Limits) -> (SocketAddr, Arc<MemoryDisk>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let disk = Arc::new(MemoryDisk::new(1 << 20, false));
    let served = disk.clone();
    std::thread::spawn(move || {
        let admission = Admission::new(&limits);
        for accepted in listener.incoming() {
            let Ok(sock) = accepted else { continue };
            let peer = sock.peer_addr().unwrap();
            let Some(ticket) = admission.admit_or_count(peer, ("test.max", "test.per_client")) else {
                continue;
            };
            let disk = served.clone();
            blocking::spawn("test-nbd", sock, peer, ticket, limits.clone(), move || OneDisk(disk));
        }
    });
    (addr, disk)
}

fn connect_from(addr: SocketAddr, ip: IpAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

fn closed_before_greeting(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 18];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn writes_and_reads_go_through_to_the_disk() {
    let (addr, disk) = start(Limits::default());
    let mut c = RawClient::connect(addr, "img");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(c.write(4096, &data), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.read(4096, data.len() as u32), data);
    assert_eq!(&disk.contents()[4096..4096 + data.len()], &data[..]);
    c.disconnect();
}

/// Past the per-address cap a connection is closed before the greeting, another address
/// still gets in up to the global cap; a freed slot serves again.
#[test]
fn connections_past_a_cap_are_closed_before_the_greeting() {
    let limits = Limits { max_connections: 3, max_connections_per_client: 2, ..Limits::default() };
    let (addr, _) = start(limits);
    // Connections in their handshake are never idle: they hold their slots.
    let mut held: Vec<_> = (0..2).map(|_| RawClient::start(addr)).collect();
    assert!(closed_before_greeting(TcpStream::connect(addr).unwrap()), "a third connection from one address was greeted");
    let _other = RawClient::start_from(addr, Some(OTHER_HOST));
    assert!(
        closed_before_greeting(connect_from(addr, OTHER_HOST)),
        "a connection past the global cap was greeted"
    );
    drop(held.pop());
    wait_for("a freed slot", Duration::from_secs(10), || {
        let s = TcpStream::connect(addr).unwrap();
        !closed_before_greeting(s)
    });
}

/// A connection waiting for its next request longer than the idle timeout gives its slot to
/// a new one from the same address; a busy one never does.
#[test]
fn an_idle_connection_gives_way_when_the_cap_is_reached() {
    let limits = Limits { max_connections: 8, max_connections_per_client: 1, idle_timeout: Duration::from_millis(200), ..Limits::default() };
    let (addr, _) = start(limits);
    let mut idle = RawClient::connect(addr, "img");
    assert_eq!(idle.read(0, 512).len(), 512);
    // Five idle timeouts: the server's clock for the idle one starts when it is back
    // waiting, which a loaded machine may delay past the reply this side has read.
    std::thread::sleep(Duration::from_millis(1000));
    let mut newer = RawClient::connect(addr, "img");
    assert_eq!(newer.read(0, 512).len(), 512);
    // The idle one was closed to make room (within the shell's eviction poll).
    idle.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(idle.sock.read(&mut b), Ok(0) | Err(_)), "the idle connection is still open");
}
