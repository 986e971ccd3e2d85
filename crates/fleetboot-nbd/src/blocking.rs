//! NBD on blocking sockets, one thread per connection, for disks whose reads wait on
//! something slower than a local file: an edge cache's image whose chunks may still be on
//! their way from the origin, an agent's disk whose missing blocks come from the server.
//! The async server ([`crate::server`]) is for local files; these disks would make it hand
//! every read to a thread anyway.
//!
//! The protocol is the same machines' ([`Handshake`], [`Transmission`], [`Responder`]), and
//! so are the bounds ([`Admission`]): caps in all and per address, checked before the
//! greeting ([`Admission::admit_or_count`]); a connection idle past the idle timeout gives
//! way when a cap is reached; a handshake must end within the handshake timeout and a
//! started request or reply must progress within the request timeout; dead peers are found
//! by TCP keepalive. No TLS: these serve a site's read-only images or a machine's own disk
//! on loopback.

use crate::handshake::{ExportLookup, Handshake, LookupError, Status};
use crate::limits::{Limits, Ticket};
use crate::transmission::{Event, InputBuffer, Responder, Transmission};
use crate::BlockDevice;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// How often a connection waiting for its next request looks whether it was asked to make
/// room for another.
const EVICTION_POLL: Duration = Duration::from_secs(1);

/// What a connection serves: the handshake's exports, and then the disk of the one agreed on.
pub trait Exports: ExportLookup {
    type Disk: BlockDevice;
    /// The disk of `export`, which the handshake just accepted.
    fn disk(&mut self, export: &str) -> Result<Arc<Self::Disk>, LookupError>;
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Serves one connection: the handshake, then requests against the disk it opened, until
/// the client disconnects, breaks the protocol, stalls, or is evicted (`ticket`).
pub fn serve_connection<E: Exports>(
    sock: TcpStream,
    peer: SocketAddr,
    exports: &mut E,
    ticket: &Ticket,
    limits: &Limits,
) -> io::Result<()> {
    sock.set_nodelay(true)?;
    crate::limits::keep_alive(&sock);
    sock.set_read_timeout(Some(limits.handshake_timeout))?;
    sock.set_write_timeout(Some(limits.request_timeout))?;
    let mut rd = sock.try_clone()?;
    let mut wr = io::BufWriter::with_capacity(256 << 10, sock);
    let mut hs = Handshake::new();
    wr.write_all(&hs.take_output())?;
    wr.flush()?;
    let mut buf: Vec<u8> = Vec::new();
    let session = loop {
        let mut chunk = [0u8; 4096];
        let n = rd.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let (used, status) = hs.handle(&buf, exports);
        buf.drain(..used);
        wr.write_all(&hs.take_output())?;
        wr.flush()?;
        match status {
            Status::Continue => {}
            // No TLS is offered: the handshake never asks for it.
            Status::StartTls | Status::Closed(_) => return Ok(()),
            Status::Ready(s) => break s,
        }
    };
    let disk = exports.disk(&session.export).map_err(|e| bad_data(format!("{e:?}")))?;
    let disk: &E::Disk = &disk;
    tracing::debug!(%peer, export = session.export, "NBD transmission begins");
    let mut machine = Transmission::new(&session, disk.block_size());
    let replies = machine.replies();
    let mut input = InputBuffer::with_leftover(machine.input_capacity(), &buf)
        .ok_or_else(|| bad_data("client sent requests before the handshake ended".into()))?;
    let mut responder = Responder::new();
    let activity = &ticket.activity;
    loop {
        let (used, event) = machine.handle(input.data());
        match event {
            None if used == 0 => {
                // Replies go out before waiting for more requests.
                wr.flush()?;
                if input.spare().is_empty() {
                    // Cannot happen with a buffer from input_capacity(); never read 0 bytes
                    // and take it for the client's EOF.
                    return Err(bad_data("input buffer full mid-request".into()));
                }
                let between_requests = input.is_empty() && !machine.mid_request();
                let n = if between_requests {
                    // A booted system's disk may stay quiet for hours: it waits as long as
                    // nobody needs its slot.
                    activity.idle();
                    rd.set_read_timeout(Some(EVICTION_POLL))?;
                    let n = loop {
                        match rd.read(input.spare()) {
                            Err(e) if timed_out(&e) => {
                                if activity.is_evicted() {
                                    tracing::debug!(%peer, "idle NBD connection closed to make room");
                                    return Ok(());
                                }
                            }
                            other => break other?,
                        }
                    };
                    activity.busy();
                    rd.set_read_timeout(Some(limits.request_timeout))?;
                    n
                } else {
                    rd.read(input.spare())?
                };
                match n {
                    0 if between_requests => return Ok(()),
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => input.filled(n),
                }
                continue;
            }
            None => {}
            Some(Event::WriteData { offset, data, .. }) => {
                if let Err(error) = Responder::write_data(disk, offset, data) {
                    machine.write_failed(error);
                }
            }
            Some(Event::Command { cookie, command }) => {
                wr.write_all(responder.execute(disk, replies, cookie, command))?;
                // A long READ leaves in pieces.
                while responder.read_pending() {
                    match responder.continue_read(disk) {
                        Ok(piece) => wr.write_all(piece)?,
                        Err(e) => {
                            wr.flush()?;
                            return Err(bad_data(e.to_string()));
                        }
                    }
                }
            }
            Some(Event::Reject { cookie, command, error, message }) => {
                tracing::debug!(%peer, command, error, message, "NBD request refused");
                wr.write_all(responder.reject(replies, cookie, error, message))?;
            }
            Some(Event::Disconnect) => return wr.flush(),
            Some(Event::Close(e)) => {
                wr.flush()?;
                return Err(bad_data(e.to_string()));
            }
        }
        input.consume(used);
    }
}

/// Serves `sock` on a thread of its own named `thread`, holding `ticket` until it ends.
/// `exports` is made on that thread. A thread that cannot be had closes the connection.
pub fn spawn<E, F>(thread: &str, sock: TcpStream, peer: SocketAddr, ticket: Ticket, limits: Limits, exports: F)
where
    E: Exports,
    F: FnOnce() -> E + Send + 'static,
{
    let spawned = std::thread::Builder::new().name(thread.into()).spawn(move || {
        let mut exports = exports();
        if let Err(e) = serve_connection(sock, peer, &mut exports, &ticket, &limits) {
            tracing::debug!(%peer, error = %e, "NBD connection ended");
        }
        drop(ticket);
    });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "no thread for an NBD connection; closed");
    }
}
