//! A TFTP read as a tokio shell around `fleetboot_tftp::ReadClient`, which follows the
//! server's transfer id (TID) and answers strangers with ERROR 5 itself; the socket comes
//! from `fleetboot_net`.

use crate::sink::Sink;
use fleetboot_net::Outbox;
use fleetboot_tftp::client::{ClientConfig, ClientError, ClientState, ReadClient};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpParams {
    /// Requested block size (iPXE asks for 1432).
    pub blksize: u16,
    /// Requested window size; 1 leaves the option out (lock-step, like iPXE).
    pub windowsize: u16,
    /// Silence after which the RRQ or last ACK is resent.
    pub timeout: Duration,
    /// Consecutive timeouts before the transfer fails.
    pub retries: u32,
}

impl Default for TftpParams {
    fn default() -> Self {
        TftpParams {
            blksize: 1432,
            windowsize: 1,
            timeout: Duration::from_secs(1),
            retries: 8,
        }
    }
}

/// Counts for the report, filled in even when the transfer fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TftpStats {
    /// Times the client's timer fired (each resends the RRQ or the last ACK).
    pub timeouts: u64,
    /// The size the server announced (tsize), if it did.
    pub tsize: Option<u64>,
    pub blksize: u16,
    pub windowsize: u16,
    /// Datagrams from a source other than the transfer's TID.
    pub foreign: u64,
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::TimedOut => "timed out".into(),
        ClientError::Server { code, message } => format!("server error {code:?}: {message}"),
        ClientError::BadOack { option } => format!("unacceptable OACK option {option:?}"),
        other => format!("{other:?}"),
    }
}

/// Reads `file` from `server` (port 69 or another) into `sink`, from a socket bound to
/// `local`. The announced tsize, when there is one, must match what arrived.
pub async fn get(
    local: Ipv4Addr,
    server: SocketAddrV4,
    file: &str,
    params: &TftpParams,
    sink: &mut Sink,
    stats: &mut TftpStats,
) -> Result<(), String> {
    let sock = crate::net::client_udp_tokio(local, "TFTP client").map_err(|e| format!("binding {local}: {e}"))?;
    let mut options = vec![
        ("blksize".to_string(), params.blksize.to_string()),
        ("tsize".to_string(), "0".to_string()),
    ];
    if params.windowsize > 1 {
        options.push(("windowsize".to_string(), params.windowsize.to_string()));
    }
    let config = ClientConfig {
        timeout: params.timeout,
        max_retries: params.retries,
    };
    let mut client = ReadClient::with_config(file, &options, SocketAddr::V4(server), Instant::now(), config);
    let mut out = Outbox::new(8);
    let mut rx = vec![0u8; 65536];
    loop {
        while let Some(t) = client.poll_transmit(Instant::now(), out.buffer()) {
            out.push(t);
        }
        if !out.is_empty() {
            // A datagram the kernel refused counts as lost: the timer resends.
            if let Err(e) = out.send_async(&sock).await {
                tracing::debug!(error = %e, "TFTP send failed");
            }
            out.clear();
        }
        // Stream what arrived into the sink (hashed, kept only if small): two hundred
        // clients fetching kernels and initrds must not each hold the whole files.
        let data = client.take_data();
        if !data.is_empty() {
            sink.write(&data)?;
        }
        stats.blksize = client.blksize();
        stats.windowsize = client.windowsize();
        stats.tsize = client.tsize();
        stats.foreign = client.foreign();
        match client.state() {
            ClientState::Done => break,
            ClientState::Failed(e) => return Err(describe(e)),
            _ => {}
        }
        let Some(deadline) = client.poll_timeout() else {
            return Err("transfer stalled without a timer".into());
        };
        tokio::select! {
            r = sock.recv_from(&mut rx) => {
                // An error is an ICMP report about an earlier send: the timer decides.
                if let Ok((n, from)) = r {
                    client.handle(Instant::now(), from, &rx[..n]);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                stats.timeouts += 1;
                client.handle_timeout(Instant::now());
            }
        }
    }
    if let Some(t) = client.tsize() {
        if t != sink.bytes() {
            return Err(format!(
                "received {} bytes but the server announced tsize {t}",
                sink.bytes()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use fleetboot_net::UdpBuilder;
    use super::*;
    use fleetboot_tftp::codec::Packet;
    use fleetboot_tftp::server::{ReadTransfer, TransferConfig};

    /// A one-transfer TFTP server on loopback that answers from a new port, like fleetboot.
    async fn serve(data: Vec<u8>, drop_every: usize) -> SocketAddrV4 {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let main = UdpBuilder::new(lo).bind_tokio().unwrap();
        let SocketAddr::V4(addr) = main.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let (n, peer) = main.recv_from(&mut buf).await.unwrap();
            let Ok(Packet::Rrq { options, .. }) = Packet::parse(&buf[..n]) else {
                panic!("want an RRQ")
            };
            let sock = UdpBuilder::new(lo).connect(peer).bind_tokio().unwrap();
            let mut src = data;
            let mut t = ReadTransfer::new(
                Instant::now(),
                peer,
                &options,
                src.len() as u64,
                &TransferConfig::default(),
            );
            let mut out = Vec::new();
            let mut sent = 0usize;
            loop {
                while let Some(tx) = t.poll_transmit(Instant::now(), &mut src, &mut out) {
                    sent += 1;
                    if drop_every == 0 || sent.checked_rem(drop_every) != Some(0) {
                        sock.send(&out[out.len() - tx.size..]).await.unwrap();
                    }
                    out.clear();
                }
                if t.is_finished() {
                    break;
                }
                let Some(d) = t.poll_timeout() else { break };
                tokio::select! {
                    r = sock.recv(&mut buf) => if let Ok(n) = r { t.handle(Instant::now(), peer, &buf[..n]) },
                    _ = tokio::time::sleep_until(d.into()) => t.handle_timeout(Instant::now()),
                }
            }
        });
        addr
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn windowed_read_from_a_new_port() {
        let d = data(100_000);
        let server = serve(d.clone(), 0).await;
        let mut sink = Sink::new(true);
        let mut stats = TftpStats::default();
        let params = TftpParams {
            windowsize: 8,
            ..TftpParams::default()
        };
        get(
            Ipv4Addr::LOCALHOST,
            server,
            "f",
            &params,
            &mut sink,
            &mut stats,
        )
        .await
        .unwrap();
        assert_eq!(sink.finish().data.unwrap(), d);
        assert_eq!(
            (stats.blksize, stats.windowsize, stats.tsize),
            (1432, 8, Some(100_000))
        );
    }

    #[tokio::test]
    async fn lossy_lockstep_read_recovers() {
        let d = data(20 * 512 + 3);
        let server = serve(d.clone(), 7).await;
        let mut sink = Sink::new(true);
        let mut stats = TftpStats::default();
        let params = TftpParams {
            blksize: 512,
            timeout: Duration::from_millis(50),
            ..TftpParams::default()
        };
        get(
            Ipv4Addr::LOCALHOST,
            server,
            "f",
            &params,
            &mut sink,
            &mut stats,
        )
        .await
        .unwrap();
        assert_eq!(sink.finish().data.unwrap(), d);
    }

    #[tokio::test]
    async fn no_server_times_out() {
        // A bound socket that never answers.
        let silent = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind_tokio().unwrap();
        let SocketAddr::V4(addr) = silent.local_addr().unwrap() else {
            unreachable!()
        };
        let params = TftpParams {
            timeout: Duration::from_millis(10),
            retries: 2,
            ..TftpParams::default()
        };
        let mut stats = TftpStats::default();
        let e = get(
            Ipv4Addr::LOCALHOST,
            addr,
            "f",
            &params,
            &mut Sink::new(false),
            &mut stats,
        )
        .await
        .unwrap_err();
        assert_eq!(e, "timed out");
        assert_eq!(stats.timeouts, 3);
    }
}
