//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, READ) built
//! on `fleetboot-nbd`'s codec: the agent's unicast path to the server's export of the
//! image, for blocks the stream has not delivered yet.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use fleetboot_nbd::proto::{
    cflags, cmd, hflags, info, parse_greeting, rep, InfoRequest, NbdOption, OptionReply, Request,
    SimpleReply, MAX_REQUEST_LEN,
};

/// A connected NBD client, past its handshake.
#[derive(Debug)]
pub struct NbdClient {
    sock: TcpStream,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The export's description (fleetboot's names the image's `sha256:`).
    pub description: String,
    cookie: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl NbdClient {
    /// Connects to `addr` (`host:port`) and opens `export` with `NBD_OPT_GO`.
    pub fn connect(addr: &str, export: &str) -> io::Result<NbdClient> {
        let sa = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| bad(format!("no address for {addr}")))?;
        let mut sock = TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        sock.read_exact(&mut g)?;
        let hf = parse_greeting(&g)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("short greeting"))?;
        if hf & hflags::FIXED_NEWSTYLE == 0 {
            return Err(bad("server is not fixed-newstyle"));
        }
        let mut cf = cflags::FIXED_NEWSTYLE;
        if hf & hflags::NO_ZEROES != 0 {
            cf |= cflags::NO_ZEROES;
        }
        let mut out = cf.to_be_bytes().to_vec();
        NbdOption::Go(InfoRequest {
            name: export.to_string(),
            requests: vec![info::EXPORT, info::DESCRIPTION],
        })
        .encode(&mut out);
        sock.write_all(&out)?;
        let mut size = None;
        let mut flags = 0;
        let mut description = String::new();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let (r, used) = loop {
                if let Some(x) = OptionReply::parse(&buf).map_err(|e| bad(e.to_string()))? {
                    break x;
                }
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk)?;
                if n == 0 {
                    return Err(bad("server closed during the handshake"));
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            buf.drain(..used);
            if rep::is_error(r.reply) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "export {export:?} refused ({:#x}): {}",
                        r.reply,
                        String::from_utf8_lossy(&r.data)
                    ),
                ));
            }
            match r.reply {
                rep::INFO if r.data.len() >= 2 => {
                    let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                    match kind {
                        info::EXPORT if r.data.len() == 12 => {
                            size = Some(u64::from_be_bytes(r.data[2..10].try_into().unwrap()));
                            flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        }
                        info::DESCRIPTION => {
                            description = String::from_utf8_lossy(&r.data[2..]).into_owned();
                        }
                        _ => {}
                    }
                }
                rep::ACK => break,
                _ => {}
            }
        }
        let size = size.ok_or_else(|| bad("no NBD_INFO_EXPORT before the ACK"))?;
        Ok(NbdClient {
            sock,
            size,
            flags,
            description,
            cookie: 1,
        })
    }

    /// The `sha256:` in the export's description, if any.
    pub fn sha256(&self) -> Option<String> {
        let i = self.description.find("sha256:")?;
        let hex: String = self.description[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        (hex.len() == 64).then_some(hex)
    }

    /// Reads `buf.len()` bytes at `offset` (split into requests the server accepts).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST_LEN as usize);
            let at = offset + done as u64;
            let error = self.command(cmd::READ, 0, at, n as u32, &[], Some(&mut buf[done..done + n]))?;
            if error != 0 {
                return Err(io::Error::other(format!(
                    "NBD read at {at} failed: error {error}"
                )));
            }
            done += n;
        }
        Ok(())
    }

    /// Sends one request (`payload` follows a WRITE) and returns the server's error value
    /// (0 for success); a READ's data, on success, goes to `read_into` (`len` bytes).
    pub fn command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
    ) -> io::Result<u32> {
        let cookie = self.cookie;
        self.cookie += 1;
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        let mut out = req.encode().to_vec();
        out.extend_from_slice(payload);
        self.sock.write_all(&out)?;
        let mut h = [0u8; SimpleReply::SIZE];
        self.sock.read_exact(&mut h)?;
        let r = SimpleReply::parse(&h)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("short reply"))?;
        if r.cookie != cookie {
            return Err(bad("reply for another request"));
        }
        if r.error == 0 && command == cmd::READ {
            match read_into {
                Some(b) if b.len() == len as usize => self.sock.read_exact(b)?,
                _ => return Err(bad("READ needs a buffer of its length")),
            }
        }
        Ok(r.error)
    }

    /// Sends `NBD_CMD_DISC`.
    pub fn disconnect(mut self) {
        let req = Request {
            flags: 0,
            command: cmd::DISC,
            cookie: self.cookie,
            offset: 0,
            len: 0,
        };
        let _ = self.sock.write_all(&req.encode());
    }
}
