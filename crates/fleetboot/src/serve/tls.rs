//! The operators' listener, plain TCP or TLS (rustls, with the certificate chain and key
//! of `admin.tls_cert`/`admin.tls_key`).
//!
//! TLS handshakes run beside the accept loop, each bounded in time, at most
//! [`MAX_HANDSHAKES`] at once: a peer that opens a connection and says nothing holds a
//! slot for [`HANDSHAKE_TIME`] at most and never stops others from connecting.

use crate::config::TlsFiles;
use anyhow::{Context, Result};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use super::accept::Accepting;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 64;
/// How long a peer has to finish its TLS handshake.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Where a request on the operators' listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, super::accept::Bounded<AdminListener>>> for Peer {
    fn connect_info(stream: IncomingStream<'_, super::accept::Bounded<AdminListener>>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

pub struct AdminListener {
    local: SocketAddr,
    inner: Inner,
}

enum Inner {
    Plain(Accepting),
    /// Finished handshakes, from the task that accepts and shakes hands.
    Tls { ready: mpsc::Receiver<(Box<dyn Io>, SocketAddr)>, acceptor: tokio::task::JoinHandle<()> },
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        // The accept task owns the socket: stopping it releases the port.
        if let Inner::Tls { acceptor, .. } = &self.inner {
            acceptor.abort();
        }
    }
}

/// The server side of TLS from PEM files: a certificate chain (leaf first) and its key.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("admin.tls_cert {}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("admin.tls_cert {}", files.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("admin.tls_cert {}: no certificate in it", files.cert.display());
    }
    if let Err(e) = fleetboot_auth::secret::check_private(&files.key) {
        tracing::warn!("admin.tls_key: {e}");
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| format!("admin.tls_key {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("admin.tls_cert and admin.tls_key do not make a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl AdminListener {
    /// Binds `listen`; with `tls`, loads the certificate first (a bad one is an error here,
    /// at start, not at the first connection).
    pub async fn bind(listen: SocketAddr, tls: Option<&TlsFiles>) -> Result<AdminListener> {
        let config = tls.map(server_config).transpose()?;
        let tcp = TcpListener::bind(listen).await.with_context(|| format!("binding admin.listen {listen}"))?;
        let local = tcp.local_addr()?;
        let inner = match config {
            None => Inner::Plain(Accepting::new(tcp, "admin")),
            Some(config) => {
                let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
                let acceptor = tokio::spawn(accept_tls(tcp, tokio_rustls::TlsAcceptor::from(Arc::new(config)), tx));
                Inner::Tls { ready, acceptor }
            }
        };
        Ok(AdminListener { local, inner })
    }
}

async fn accept_tls(tcp: TcpListener, acceptor: tokio_rustls::TlsAcceptor, ready: mpsc::Sender<(Box<dyn Io>, SocketAddr)>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    // Accept errors (out of descriptors) are counted and logged at most every few seconds.
    let mut tcp = Accepting::new(tcp, "admin");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = Listener::accept(&mut tcp).await;
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIME, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((Box::new(tls) as Box<dyn Io>, peer)).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("fleetboot_admin_tls_handshake_failures_total", "reason" => "error").increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("fleetboot_admin_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                    tracing::debug!(%peer, "TLS handshake not finished in time");
                }
            }
        });
    }
}

impl Listener for AdminListener {
    type Io = Box<dyn Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.inner {
            Inner::Plain(tcp) => {
                let (s, a) = Listener::accept(tcp).await;
                (Box::new(s), a)
            }
            Inner::Tls { ready, .. } => match ready.recv().await {
                Some(conn) => conn,
                // The accept task is gone (it never ends on its own): accept nothing more.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
