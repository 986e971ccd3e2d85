//! fleetboot's services in this process, on loopback, with real sockets: no root, no
//! namespaces, every port picked by the OS.
//!
//! [`Loopback::start`] writes a config around the caller's sections (`server.address` is
//! 127.0.0.1, DHCP is bound to `lo` with its replies sent to this test's client port, TFTP,
//! HTTP and the API listen on 127.0.0.1:0) and starts a [`fleetboot::serve::Server`]. The
//! clients here speak the protocols themselves: [`Loopback::dhcp`] runs `fleetboot_dhcp`'s
//! `DhcpClient` (what the boot-storm emulator uses: iPXE's or a PXE ROM's options) over
//! UDP, [`Loopback::tftp_get`] a lock-step TFTP read, [`Loopback::http_get`] an HTTP/1.1
//! GET, [`Loopback::api`] a request to the API with a token.
//!
//! A client's own data (its script, its trace) is served to the address holding its
//! lease: every address of 127.0.0.0/8 is this host's, so a test leases 127.77.0.x and
//! asks from that address (`*_from`), or from another one to play someone else.
//!
//! Why DHCP on loopback is safe: the server's DHCP sockets are bound to `lo`
//! (`server.interface`, SO_BINDTODEVICE), so its broadcast replies leave on `lo` only, to
//! `dhcp.client_port` = the port of this test's client socket, itself bound to `lo`.
//! Timeouts here only stop a hung test; they never decide a result.

#![allow(dead_code)]

use fleetboot::config::Config;
use fleetboot::serve::{Options, Server};
use fleetboot_dhcp::client::{Binding, ClientConfig, DhcpClient};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Stops a test that hangs; never a pass/fail criterion.
pub const HANG: Duration = Duration::from_secs(20);

/// A per-test directory under the system temp dir, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "fleetboot-loopback-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Loopback {
    pub server: Server,
    pub config: Config,
    /// The DHCP client socket (bound to `lo`, on `dhcp.client_port`).
    dhcp_client: UdpSocket,
    pub dir: TestDir,
}

/// A UDP socket on `lo` only, any port.
fn lo_socket() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).unwrap();
    s.bind_device(Some(b"lo")).expect("SO_BINDTODEVICE lo");
    s.set_broadcast(true).unwrap();
    s.set_nonblocking(true).unwrap();
    s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into()).unwrap();
    UdpSocket::from_std(s.into()).unwrap()
}

impl Loopback {
    /// The server of `sections` (TOML appended after `[server]`, `[dhcp]` and the listen
    /// addresses, so it may add `[[dhcp.subnet]]`, `[pxe]`, profiles...), with `dhcp_mode`.
    pub async fn start(name: &str, dhcp_mode: &str, sections: &str) -> Loopback {
        Loopback::start_with(name, dhcp_mode, sections, Options::default()).await
    }

    pub async fn start_with(name: &str, dhcp_mode: &str, sections: &str, options: Options) -> Loopback {
        Loopback::start_full(name, dhcp_mode, &[], sections, options).await
    }

    /// [`Loopback::start_with`], with `(section, keys)` added to the sections this writes
    /// itself (`server`, `dhcp`, `tftp`, `http`, `admin`).
    pub async fn start_full(name: &str, dhcp_mode: &str, extra: &[(&str, &str)], sections: &str, options: Options) -> Loopback {
        let more = |section: &str| extra.iter().filter(|(s, _)| *s == section).map(|(_, k)| format!("{k}\n")).collect::<String>();
        let (server, dhcp, tftp, http, admin) = (more("server"), more("dhcp"), more("tftp"), more("http"), more("admin"));
        let dir = TestDir::new(name);
        std::fs::create_dir_all(dir.0.join("root")).unwrap();
        let dhcp_client = lo_socket();
        let client_port = dhcp_client.local_addr().unwrap().port();
        let text = format!(
            "data_dir = \"data\"\n\
             [server]\naddress = \"127.0.0.1\"\ninterface = \"lo\"\nroot = \"root\"\n{server}\
             [dhcp]\nmode = \"{dhcp_mode}\"\nport = 0\npxe_port = 0\nclient_port = {client_port}\n{dhcp}\
             [tftp]\nlisten = \"127.0.0.1:0\"\n{tftp}\
             [http]\nlisten = \"127.0.0.1:0\"\n{http}\
             [admin]\nlisten = \"127.0.0.1:0\"\n{admin}\
             {sections}\n"
        );
        std::fs::write(dir.0.join("fleetboot.toml"), &text).unwrap();
        let config = Config::load(&dir.0.join("fleetboot.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let server = Server::start_with(config.clone(), options).await.unwrap_or_else(|e| panic!("{e:#}"));
        Loopback { server, config, dhcp_client, dir }
    }

    pub fn http(&self) -> SocketAddr {
        self.server.local_addrs().http.expect("HTTP is on")
    }

    /// The config file the server was started from (for the command line).
    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("fleetboot.toml")
    }

    pub fn admin(&self) -> SocketAddr {
        self.server.local_addrs().admin.expect("the API is on")
    }

    /// The admin token `fleetboot serve` made at its first start.
    pub fn bootstrap_token(&self) -> String {
        std::fs::read_to_string(self.config.bootstrap_token_path()).expect("data_dir/admin.token").trim().to_string()
    }

    /// `method path` to the API with `token` (`None`: no Authorization header) and an
    /// optional JSON body: status and body.
    pub async fn api(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Vec<u8>) {
        let mut headers = Vec::new();
        let auth;
        if let Some(t) = token {
            auth = format!("Bearer {t}");
            headers.push(("Authorization", auth.as_str()));
        }
        request(self.admin(), None, method, path, &headers, body.map(str::as_bytes)).await
    }

    /// DISCOVER → OFFER → REQUEST → ACK as `client` does it; the binding from the ACK.
    pub async fn dhcp(&self, client: ClientConfig) -> Binding {
        let server = self.server.local_addrs().dhcp.expect("DHCP is on");
        let mac = client.mac;
        let t0 = Instant::now();
        let xid = u32::from_be_bytes([mac.0[2], mac.0[3], mac.0[4], mac.0[5]]);
        let mut c = DhcpClient::new(client, xid, t0);
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            assert!(now - t0 < HANG, "{mac}: no lease after {HANG:?} ({:?})", c.state());
            // The client addresses 255.255.255.255:67; on loopback the server is here.
            while let Some(t) = c.poll_transmit(now) {
                self.dhcp_client.send_to(&t.bytes, server).await.unwrap();
            }
            if let Some(b) = c.binding() {
                return b.clone();
            }
            assert!(!c.is_failed(), "{mac}: {:?}", c.state());
            let wait = c.poll_timeout().map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
            match tokio::time::timeout(wait, self.dhcp_client.recv_from(&mut buf)).await {
                Ok(r) => {
                    let (n, _) = r.unwrap();
                    let _ = c.handle(Instant::now(), &buf[..n]);
                }
                Err(_) => c.handle_timeout(Instant::now()),
            }
        }
    }

    /// Sends one raw datagram to the DHCP port and returns what comes back to the client
    /// port within `wait` (nothing is a valid answer: `None`).
    pub async fn dhcp_exchange(&self, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let server = self.server.local_addrs().dhcp.expect("DHCP is on");
        self.dhcp_client.send_to(bytes, server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(wait, self.dhcp_client.recv_from(&mut buf)).await.ok()?.unwrap();
        Some(buf[..n].to_vec())
    }

    /// A TFTP read (octet, no options, lock-step): the file, or the server's ERROR text.
    pub async fn tftp_get(&self, name: &str) -> Result<Vec<u8>, String> {
        self.tftp_get_from("127.0.0.1".parse().unwrap(), name).await
    }

    /// [`Loopback::tftp_get`] from the local address `from`.
    pub async fn tftp_get_from(&self, from: IpAddr, name: &str) -> Result<Vec<u8>, String> {
        let server = self.server.local_addrs().tftp.expect("TFTP is on");
        let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
        let mut rrq = vec![0, 1];
        rrq.extend_from_slice(name.as_bytes());
        rrq.push(0);
        rrq.extend_from_slice(b"octet\0");
        sock.send_to(&rrq, server).await.unwrap();
        let (mut file, mut next) = (Vec::new(), 1u16);
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = tokio::time::timeout(HANG, sock.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("TFTP {name}: nothing for {HANG:?}"))
                .unwrap();
            let p = &buf[..n];
            match (p.first(), p.get(1)) {
                (Some(0), Some(3)) if n >= 4 => {
                    let block = u16::from_be_bytes([p[2], p[3]]);
                    if block == next {
                        file.extend_from_slice(&p[4..]);
                        next = next.wrapping_add(1);
                    }
                    sock.send_to(&[0, 4, p[2], p[3]], from).await.unwrap();
                    if block == next.wrapping_sub(1) && n - 4 < 512 {
                        return Ok(file);
                    }
                }
                (Some(0), Some(5)) => return Err(String::from_utf8_lossy(&p[4..]).trim_end_matches('\0').to_string()),
                _ => panic!("TFTP {name}: unexpected packet {p:?}"),
            }
        }
    }

    /// `GET path` over HTTP/1.1: status and body.
    pub async fn http_get(&self, path: &str) -> (u16, Vec<u8>) {
        request(self.http(), None, "GET", path, &[], None).await
    }

    /// [`Loopback::http_get`] from the local address `from`.
    pub async fn http_get_from(&self, from: IpAddr, path: &str) -> (u16, Vec<u8>) {
        request(self.http(), Some(from), "GET", path, &[], None).await
    }
}

/// One HTTP/1.1 request to `to` (from the local address `from`, if given): status and body.
pub async fn request(
    to: SocketAddr,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    let sock = TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("binding {ip}: {e}"));
    }
    let mut s = sock.connect(to).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    if let Some(b) = body {
        req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len());
    }
    req += "\r\n";
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    s.write_all(&bytes).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut resp)).await.expect("HTTP answer").unwrap();
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP header");
    let head = String::from_utf8_lossy(&resp[..end]).to_string();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "chunked body: {head}");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (status, resp[end + 4..].to_vec())
}
