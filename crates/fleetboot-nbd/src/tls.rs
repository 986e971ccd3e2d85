//! NBD over TLS, as the protocol defines it: the client asks with `NBD_OPT_STARTTLS` during
//! option haggling, the server acknowledges, and both run a TLS handshake on the same
//! connection (the handshake machine's side is [`crate::handshake::TlsPolicy`]).
//!
//! X.509 only, with rustls: a server certificate chain and key (PEM), and optionally a CA
//! whose certificates clients must present (`client_ca`). TLS with pre-shared keys, which
//! GnuTLS-based clients offer as `tls-creds-psk`, is not available: rustls has no external
//! PSK support.

use crate::handshake::TlsPolicy;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `[nbd.tls]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the server certificate, then its chain.
    pub certificate: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Whether clients must use TLS (otherwise they may).
    pub required: bool,
    /// PEM: CA certificates; when set, a client must present a certificate one of them
    /// signed.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct TlsError {
    pub what: &'static str,
    pub path: PathBuf,
    pub message: String,
}

fn err(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError { what, path: path.to_path_buf(), message: message.to_string() }
}

/// What a server needs for TLS connections.
#[derive(Clone)]
pub struct Tls {
    pub policy: TlsPolicy,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(what, path, e))?;
    if certs.is_empty() {
        return Err(err(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

impl Tls {
    /// Reads the certificate, key and client CA files and builds the TLS configuration.
    pub fn load(s: &TlsSettings) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = certificates("nbd.tls.certificate", &s.certificate)?;
        let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| err("nbd.tls.key", &s.key, e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("nbd.tls.certificate", &s.certificate, e))?;
        let builder = match &s.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates("nbd.tls.client_ca", ca)? {
                    roots.add(c).map_err(|e| err("nbd.tls.client_ca", ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| err("nbd.tls.client_ca", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| err("nbd.tls.key", &s.key, format!("does not go with the certificate: {e}")))?;
        Ok(Tls {
            policy: if s.required { TlsPolicy::Required } else { TlsPolicy::Optional },
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}
