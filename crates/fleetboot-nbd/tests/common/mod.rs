//! Shared by the integration tests: an image in a catalog, a server on 127.0.0.1:0 in a
//! background runtime, a tiny raw NBD client, tool checks.
#![allow(dead_code)]

use fleetboot_images::{Catalog, ImportOptions};
use fleetboot_nbd::proto::*;
use fleetboot_nbd::{Exports, ExportsConfig, OverlayMode};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

pub const IMAGE_SIZE: usize = 8 << 20;

/// True when every tool runs here; otherwise the one gate's skip message, or its failure
/// under FLEETBOOT_REQUIRE_E2E=1.
pub fn tools_ready(test: &str, tools: &[&str]) -> bool {
    fleetboot_lab::gate::tools_ready(test, tools)
}

/// Waits (polling, at most `within`) until `cond` holds; panics naming `what` otherwise.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The test image: 8 MiB, data in the first 3 MiB and in MiB 6, holes elsewhere.
pub fn image_bytes() -> Vec<u8> {
    let mut v = vec![0u8; IMAGE_SIZE];
    for (i, b) in v.iter_mut().enumerate() {
        let mib = i >> 20;
        if mib < 3 || mib == 6 {
            *b = ((i * 13) ^ (i >> 9)) as u8 | 1;
        }
    }
    v
}

pub fn sha256_file(p: &Path) -> String {
    let d = Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub catalog: Catalog,
    pub exports: Arc<Exports>,
    pub addr: SocketAddr,
    pub image_path: PathBuf,
    pub image_sha: String,
    _rt: Option<tokio::runtime::Runtime>,
}

impl Fixture {
    /// Everything open to everyone on loopback.
    pub fn new(mode: OverlayMode) -> Fixture {
        Fixture::with_options(mode, fleetboot_nbd::ServerOptions::new(fleetboot_nbd::Access::open_to_all()))
    }

    pub fn with_options(mode: OverlayMode, options: fleetboot_nbd::ServerOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let catalog = prepare_catalog(dir.path());
        let mut cfg = ExportsConfig::new(dir.path());
        cfg.default_mode = mode;
        let exports = Exports::new(catalog.clone(), cfg).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(fleetboot_nbd::serve(listener, exports.clone(), options));
        let v = catalog.resolve("img").unwrap();
        let image_path = catalog.blob_path(&v.sha256);
        Fixture {
            image_sha: v.sha256,
            dir,
            catalog,
            exports,
            addr,
            image_path,
            _rt: Some(rt),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.addr.port(), export)
    }

    /// Waits until no connection of client `mac` holds its overlay any more.
    pub fn wait_released(&self, mac: &str, within: Duration) {
        wait_for(&format!("the overlay of {mac} to be released"), within, || {
            self.exports.live_overlays().iter().all(|o| o.1 != mac)
        });
    }

    /// The shared image file is exactly what was imported.
    pub fn assert_image_unchanged(&self) {
        assert_eq!(
            sha256_file(&self.image_path),
            self.image_sha,
            "the shared image changed"
        );
    }
}

/// A catalog in `dir` with the test image imported as `img`.
pub fn prepare_catalog(dir: &Path) -> Catalog {
    let catalog = Catalog::open_dir(dir).unwrap();
    let src = dir.join("src.raw");
    std::fs::write(&src, image_bytes()).unwrap();
    catalog
        .import(
            &src,
            &ImportOptions {
                name: Some("img".into()),
                format: Some("raw".into()),
            },
            &mut |_| {},
        )
        .unwrap();
    std::fs::remove_file(&src).unwrap();
    catalog
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// How a qemu-io run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuIo {
    /// Every command succeeded.
    Ok,
    /// A `read -P` found other bytes than the pattern (the connection itself was fine).
    PatternMismatch,
    /// A request failed with this error message (e.g. "Operation not permitted").
    RequestFailed(String),
    /// qemu connected and finished the handshake but would not open the image: the reason
    /// ("Permission denied" for writing to a read-only export).
    OpenRefused(String),
    /// Anything else: qemu-io could not connect or run (the output).
    Broken(String),
}

/// qemu-io commands against a URI; returns how it ended and its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> (QemuIo, String) {
    qemu_io_with(uri, cmds, false)
}

/// The same, opening the image read-only (`qemu-io -r`): for read-only exports.
pub fn qemu_io_read_only(uri: &str, cmds: &[&str]) -> (QemuIo, String) {
    qemu_io_with(uri, cmds, true)
}

fn qemu_io_with(uri: &str, cmds: &[&str], read_only: bool) -> (QemuIo, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    const REFUSED: &str = "Could not open image: ";
    let verdict = if text.contains("Pattern verification failed") {
        QemuIo::PatternMismatch
    } else if let Some(i) = text.find(" failed: ") {
        // "write failed: Operation not permitted"
        let msg = text[i + " failed: ".len()..].lines().next().unwrap_or("");
        QemuIo::RequestFailed(msg.trim().to_string())
    } else if let Some(i) = text.find(REFUSED) {
        let msg = text[i + REFUSED.len()..].lines().next().unwrap_or("");
        QemuIo::OpenRefused(msg.trim().to_string())
    } else if !out.status.success() || text.contains("can't open") {
        QemuIo::Broken(text.clone())
    } else {
        QemuIo::Ok
    };
    (verdict, text)
}

/// A minimal NBD client for protocol tests.
pub struct RawClient {
    pub sock: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    cookie: u64,
}

pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    /// Block status descriptors when the reply was a block status chunk.
    pub extents: Vec<(u32, u32)>,
    /// `OFFSET_DATA` chunks the data came in (structured replies).
    pub data_chunks: usize,
}

impl RawClient {
    pub fn start(addr: SocketAddr) -> TcpStream {
        Self::start_from(addr, None)
    }

    /// Connects from `local` (another loopback address: another host, to the server).
    pub fn start_from(addr: SocketAddr, local: Option<std::net::IpAddr>) -> TcpStream {
        let mut s = match local {
            None => TcpStream::connect(addr).unwrap(),
            Some(ip) => {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                sock.bind(&SocketAddr::new(ip, 0).into()).unwrap();
                sock.connect(&addr.into()).unwrap();
                sock.into()
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(
            parse_greeting(&g).unwrap(),
            Some(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES)
        );
        s.write_all(&(cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES).to_be_bytes())
            .unwrap();
        s
    }

    pub fn option(s: &mut TcpStream, o: &NbdOption) -> Vec<OptionReply> {
        let mut b = Vec::new();
        o.encode(&mut b);
        s.write_all(&b).unwrap();
        Self::read_replies(s)
    }

    /// Reads option replies up to a final one (ACK or error).
    pub fn read_replies(s: &mut TcpStream) -> Vec<OptionReply> {
        let mut v = Vec::new();
        loop {
            let mut h = [0u8; OptionReply::HEADER];
            s.read_exact(&mut h).unwrap();
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut all = h.to_vec();
            all.resize(OptionReply::HEADER + len, 0);
            s.read_exact(&mut all[OptionReply::HEADER..]).unwrap();
            let (r, _) = OptionReply::parse(&all).unwrap().unwrap();
            let done = r.reply == rep::ACK || rep::is_error(r.reply);
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Connects to `export` with structured replies and base:allocation.
    pub fn connect(addr: SocketAddr, export: &str) -> RawClient {
        Self::try_connect(addr, export, true).unwrap()
    }

    pub fn try_connect(addr: SocketAddr, export: &str, structured: bool) -> Result<RawClient, u32> {
        Self::try_connect_from(addr, None, export, structured)
    }

    pub fn try_connect_from(
        addr: SocketAddr,
        local: Option<std::net::IpAddr>,
        export: &str,
        structured: bool,
    ) -> Result<RawClient, u32> {
        let mut s = Self::start_from(addr, local);
        if structured {
            assert_eq!(
                Self::option(&mut s, &NbdOption::StructuredReply)[0].reply,
                rep::ACK
            );
            let r = Self::option(
                &mut s,
                &NbdOption::SetMetaContext(MetaRequest {
                    name: export.into(),
                    queries: vec![BASE_ALLOCATION.into()],
                }),
            );
            if rep::is_error(r[0].reply) {
                return Err(r[0].reply);
            }
        }
        let r = Self::option(
            &mut s,
            &NbdOption::Go(InfoRequest {
                name: export.into(),
                requests: vec![],
            }),
        );
        let last = r.last().unwrap();
        if last.reply != rep::ACK {
            return Err(last.reply);
        }
        let info = &r[0].data;
        let size = u64::from_be_bytes(info[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info[10..12].try_into().unwrap());
        Ok(RawClient {
            sock: s,
            size,
            flags,
            structured,
            cookie: 0,
        })
    }

    pub fn send(&mut self, command: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let req = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            len,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(payload);
        self.sock.write_all(&b).unwrap();
        self.cookie
    }

    /// Reads one whole reply (all chunks of a structured one).
    pub fn recv(&mut self) -> std::io::Result<(u64, Reply)> {
        let mut magic = [0u8; 4];
        self.sock.read_exact(&mut magic)?;
        let m = u32::from_be_bytes(magic);
        if m == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.sock.read_exact(&mut rest)?;
            let mut all = magic.to_vec();
            all.extend_from_slice(&rest);
            let r = SimpleReply::parse(&all).unwrap().unwrap();
            return Ok((
                r.cookie,
                Reply {
                    error: r.error,
                    data: Vec::new(),
                    extents: Vec::new(),
                    data_chunks: 0,
                },
            ));
        }
        assert_eq!(m, STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut reply = Reply {
            error: 0,
            data: Vec::new(),
            extents: Vec::new(),
            data_chunks: 0,
        };
        let mut first = true;
        loop {
            let mut h = [0u8; ChunkHeader::SIZE];
            if first {
                h[..4].copy_from_slice(&magic);
                self.sock.read_exact(&mut h[4..])?;
                first = false;
            } else {
                self.sock.read_exact(&mut h)?;
            }
            let c = ChunkHeader::parse(&h).unwrap().unwrap();
            let mut p = vec![0u8; c.len as usize];
            self.sock.read_exact(&mut p)?;
            match c.kind {
                chunk::OFFSET_DATA => {
                    reply.data.extend_from_slice(&p[8..]);
                    reply.data_chunks += 1;
                }
                chunk::BLOCK_STATUS => reply.extents = parse_block_status(&p).unwrap().1,
                chunk::ERROR => reply.error = parse_error_chunk(&p).unwrap().0,
                chunk::NONE => {}
                k => panic!("unexpected chunk type {k}"),
            }
            if c.flags & chunk::FLAG_DONE != 0 {
                return Ok((c.cookie, reply));
            }
        }
    }

    pub fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Reply {
        let c = self.send(command, flags, offset, len, payload);
        let (got, mut r) = self.recv().unwrap();
        assert_eq!(got, c, "cookie");
        if !self.structured && command == cmd::READ && r.error == 0 {
            r.data = vec![0u8; len as usize];
            self.sock.read_exact(&mut r.data).unwrap();
        }
        r
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(cmd::READ, 0, offset, len, &[]);
        assert_eq!(r.error, 0, "read {offset}+{len}");
        r.data
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(cmd::WRITE, 0, offset, data.len() as u32, data)
            .error
    }

    pub fn flush(&mut self) -> u32 {
        self.call(cmd::FLUSH, 0, 0, 0, &[]).error
    }

    /// Sends NBD_CMD_DISC and waits until the server has closed the connection (which it
    /// does after releasing the connection's overlay).
    pub fn disconnect(mut self) {
        self.send(cmd::DISC, 0, 0, 0, &[]);
        let mut b = [0u8; 64];
        match self.sock.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the server did not close after NBD_CMD_DISC: {other:?}"),
        }
    }
}
