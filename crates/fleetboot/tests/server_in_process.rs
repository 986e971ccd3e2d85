//! `fleetboot::serve::Server` in this process: the ports it reports, its shutdown, and the
//! lease store a test can put between the DHCP shell and its commits.

mod loopback;

use fleetboot::serve::{Commit, LeaseStore, Options};
use fleetboot_dhcp::client::ClientConfig;
use fleetboot_store::{Store, Write};
use loopback::Loopback;
use std::sync::{Arc, Mutex};

const SECTIONS: &str = r#"
[[dhcp.subnet]]
network = "127.0.0.0/8"
range = ["127.77.0.10", "127.77.0.250"]

[[profile]]
name = "everyone"
boot = { kind = "boot_file", path = "x.efi" }
"#;

/// Port 0 in the config becomes a real port everywhere a client is told about it (the
/// DHCP boot file's URL, the disk URL in a script), and a stopped server releases every
/// port it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_ports_are_reported_and_released() {
    let disk = "[nbd]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
                [[client]]\nmac = \"52:54:00:77:00:02\"\ngroup = \"disk\"\n\
                [[profile]]\nname = \"disk\"\npriority = 1\nmatch = { group = [\"disk\"] }\n\
                boot = { kind = \"linux\", kernel = \"k\", disk = { image = \"deb\" } }\n";
    let lb = Loopback::start("ports", "server", &format!("{SECTIONS}{disk}")).await;
    let a = lb.server.local_addrs().clone();
    for (what, addr) in [("dhcp", a.dhcp), ("pxe", a.pxe), ("tftp", a.tftp), ("http", a.http), ("nbd", a.nbd), ("admin", a.admin)] {
        assert!(addr.is_some_and(|a| a.port() != 0), "{what}: {addr:?}");
    }
    let ack = lb.dhcp(ClientConfig::ipxe("52:54:00:77:00:01".parse().unwrap(), [7; 16])).await;
    assert_eq!(ack.boot_file.unwrap(), format!("http://127.0.0.1:{}/boot/52-54-00-77-00-01.ipxe", a.http.unwrap().port()));
    let disk_client = lb.dhcp(ClientConfig::ipxe("52:54:00:77:00:02".parse().unwrap(), [7; 16])).await;
    let (_, script) = lb.http_get_from(disk_client.ip.into(), "/boot/52-54-00-77-00-02.ipxe").await;
    let want = format!("fleetboot.disk=nbd://127.0.0.1:{}/deb@52-54-00-77-00-02", a.nbd.unwrap().port());
    assert!(String::from_utf8_lossy(&script).contains(&want), "{}", String::from_utf8_lossy(&script));
    // The NBD service behind that port greets like one (fixed newstyle: NBDMAGIC IHAVEOPT).
    let mut nbd = tokio::net::TcpStream::connect(a.nbd.unwrap()).await.unwrap();
    let mut greeting = [0u8; 16];
    tokio::io::AsyncReadExt::read_exact(&mut nbd, &mut greeting).await.unwrap();
    assert_eq!(&greeting, b"NBDMAGICIHAVEOPT");
    drop(nbd);
    lb.server.shutdown().await.unwrap();
    // Every socket is closed: the same ports can be bound again at once.
    std::net::TcpListener::bind(a.http.unwrap()).expect("HTTP port released");
    std::net::TcpListener::bind(a.admin.unwrap()).expect("API port released");
    std::net::TcpListener::bind(a.nbd.unwrap()).expect("NBD port released");
    std::net::UdpSocket::bind(a.tftp.unwrap()).expect("TFTP port released");
    for udp in [a.dhcp.unwrap(), a.pxe.unwrap()] {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.bind(&udp.into()).unwrap_or_else(|e| panic!("DHCP port {udp} not released: {e}"));
    }
}

/// Records what the DHCP shell commits, then commits it to the real store.
struct Recording {
    store: Store,
    seen: Arc<Mutex<Vec<Write>>>,
}

impl LeaseStore for Recording {
    fn commit(&self, writes: Vec<Write>) -> Commit<'_> {
        self.seen.lock().unwrap().extend(writes.iter().cloned());
        Box::pin(self.store.write(writes))
    }
}

/// `Options::lease_store` is the store the DHCP shell commits leases through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_commits_go_through_the_substituted_store() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let options = Options {
        lease_store: Some(Box::new(move |store| Arc::new(Recording { store, seen: recorder }))),
    };
    let lb = Loopback::start_with("lease-store", "server", SECTIONS, options).await;
    let ack = lb.dhcp(ClientConfig::pxe("52:54:00:77:00:01".parse().unwrap(), [7; 16])).await;
    let committed: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|w| match w {
            Write::UpsertLease(l) => Some((l.ip, l.mac.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(committed, [(ack.ip, "52:54:00:77:00:01".to_string())]);
    let stored = lb.server.shared().store.leases().unwrap();
    assert_eq!(stored.iter().map(|l| l.ip).collect::<Vec<_>>(), [ack.ip]);
    lb.server.shutdown().await.unwrap();
}
