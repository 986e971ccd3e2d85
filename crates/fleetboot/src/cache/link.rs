//! The cache's side of its link to the origin: a small HTTP/1.1 client (one request per
//! connection, `Content-Length` bodies, nothing else) that signs every request with the
//! cache's key and checks every control reply against the origin's.
//!
//! The link remembers when the origin last failed: for [`DOWN_FOR`] after a failure, boots
//! do not wait for it (they go to the image map at once); fills and the directives loop
//! keep trying, and the first success clears it.

use fleetboot_cache::auth::{self, AUTH_HEADER, REPLY_HEADER};
use fleetboot_cache::config::CacheConfig;
use fleetboot_cache::keys::SigningKey;
use fleetboot_cache::manifest::Manifest;
use fleetboot_cache::messages::{Message, MAX_BODY};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a failed origin is taken as down by boots.
pub const DOWN_FOR: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No answer: connection refused, timed out, reset.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// An answer that refuses.
    #[error("origin answered {0}: {1}")]
    Status(u16, String),
    /// An answer that cannot be trusted or read.
    #[error("origin reply refused: {0}")]
    Invalid(String),
}

pub struct Link {
    cfg: CacheConfig,
    key: SigningKey,
    down: Mutex<Option<(Instant, String)>>,
    /// Every byte of every body received from the origin.
    pub bytes_in: AtomicU64,
}

/// A response whose body is still to be read.
pub struct Reply {
    pub status: u16,
    headers: HashMap<String, String>,
    pub length: Option<u64>,
    reader: BufReader<TcpStream>,
    idle: Duration,
    nonce: [u8; 16],
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Reads exactly `buf.len()` body bytes. The idle limit applies to each read, not to
    /// the whole: a slow link that keeps delivering is not a stalled one (giving up on it
    /// would throw away a partly received chunk and ask the origin for it again).
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), LinkError> {
        let mut at = 0;
        while at < buf.len() {
            match tokio::time::timeout(self.idle, self.reader.read(&mut buf[at..])).await {
                Ok(Ok(0)) => return Err(LinkError::Unreachable("reading the body: the origin closed the connection".into())),
                Ok(Ok(n)) => at += n,
                Ok(Err(e)) => return Err(LinkError::Unreachable(format!("reading the body: {e}"))),
                Err(_) => return Err(LinkError::Unreachable("the body stalled".into())),
            }
        }
        Ok(())
    }

    /// The whole body, at most `max` bytes.
    async fn body(&mut self, max: usize) -> Result<Vec<u8>, LinkError> {
        match self.length {
            Some(n) if n > max as u64 => Err(LinkError::Invalid(format!("a body of {n} bytes (at most {max})"))),
            Some(n) => {
                let mut b = vec![0u8; n as usize];
                self.read_exact(&mut b).await?;
                Ok(b)
            }
            None => {
                let mut b = Vec::new();
                let mut limited = (&mut self.reader).take(max as u64 + 1);
                match tokio::time::timeout(self.idle, limited.read_to_end(&mut b)).await {
                    Ok(Ok(_)) if b.len() <= max => Ok(b),
                    Ok(Ok(_)) => Err(LinkError::Invalid(format!("a body over {max} bytes"))),
                    Ok(Err(e)) => Err(LinkError::Unreachable(e.to_string())),
                    Err(_) => Err(LinkError::Unreachable("the body stalled".into())),
                }
            }
        }
    }
}

/// Percent-encodes a path segment-wise (`/` kept).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Link {
    pub fn new(cfg: CacheConfig, key: SigningKey) -> Link {
        Link { cfg, key, down: Mutex::new(None), bytes_in: AtomicU64::new(0) }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.origin_timeout_ms)
    }

    /// Why the origin is taken as down, while it is.
    pub fn down(&self) -> Option<String> {
        let d = self.down.lock().unwrap_or_else(|e| e.into_inner());
        d.as_ref().filter(|(until, _)| Instant::now() < *until).map(|(_, why)| why.clone())
    }

    fn note(&self, r: &Result<Reply, LinkError>) {
        let mut d = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Err(LinkError::Unreachable(why)) => *d = Some((Instant::now() + DOWN_FOR, why.clone())),
            _ => *d = None,
        }
    }

    /// Sends one signed request (`extra`: more header lines, each ending in CRLF); `idle`
    /// bounds every wait for bytes.
    pub async fn send(&self, method: &str, path: &str, body: &[u8], extra: &str, idle: Duration) -> Result<Reply, LinkError> {
        let r = self.send_inner(method, path, body, extra, idle).await;
        self.note(&r);
        r
    }

    async fn send_inner(&self, method: &str, path: &str, body: &[u8], extra: &str, idle: Duration) -> Result<Reply, LinkError> {
        let authority = self.cfg.origin.authority();
        let stream = match tokio::time::timeout(self.timeout(), TcpStream::connect(&authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(LinkError::Unreachable(format!("connecting to {authority}: {e}"))),
            Err(_) => return Err(LinkError::Unreachable(format!("connecting to {authority}: timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let nonce = super::keyfile::nonce();
        let sig = auth::sign_request(&self.key, &self.cfg.name, method, path, super::now_ms(), nonce, body);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{AUTH_HEADER}: {sig}\r\n{extra}Content-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        let mut reader = BufReader::with_capacity(256 << 10, stream);
        let write = async {
            reader.get_mut().write_all(head.as_bytes()).await?;
            reader.get_mut().write_all(body).await
        };
        match tokio::time::timeout(self.timeout(), write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LinkError::Unreachable(format!("sending to {authority}: {e}"))),
            Err(_) => return Err(LinkError::Unreachable(format!("sending to {authority}: timed out"))),
        }
        read_head(reader, idle, nonce).await
    }

    /// A signed control exchange: the reply must be 200, signed by the origin for this
    /// request, and a valid `T`.
    pub async fn control<T: Message>(&self, method: &str, path: &str, body: &[u8], idle: Duration) -> Result<T, LinkError> {
        let mut r = self.send(method, path, body, "Content-Type: application/json\r\n", idle).await?;
        let bytes = r.body(MAX_BODY).await?;
        self.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if r.status != 200 {
            return Err(LinkError::Status(r.status, String::from_utf8_lossy(&bytes).chars().take(300).collect()));
        }
        auth::verify_reply(&self.cfg.origin_key, r.header(REPLY_HEADER), &r.nonce, 200, &bytes)
            .map_err(|e| LinkError::Invalid(format!("{path}: {e}")))?;
        T::parse(&bytes).map_err(|e| LinkError::Invalid(format!("{path}: {e}")))
    }

    /// The signed manifest of `name` (its newest version, or `version`), checked.
    pub async fn manifest(&self, name: &str, version: Option<u64>) -> Result<(Manifest, Vec<u8>), LinkError> {
        let path = match version {
            Some(v) => format!("/cache/v1/manifest/{}?version={v}", encode_path(name)),
            None => format!("/cache/v1/manifest/{}", encode_path(name)),
        };
        let mut r = self.send("GET", &path, b"", "", self.timeout()).await?;
        // A manifest is 32 bytes a chunk: large images have large ones.
        let bytes = r.body(160 << 20).await?;
        self.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if r.status != 200 {
            return Err(LinkError::Status(r.status, String::from_utf8_lossy(&bytes).chars().take(300).collect()));
        }
        let m = Manifest::decode(&bytes, &self.cfg.origin_key).map_err(|e| LinkError::Invalid(format!("manifest of {name}: {e}")))?;
        if m.name != name || version.is_some_and(|v| v != m.version) {
            return Err(LinkError::Invalid(format!("asked for {name} {version:?}, got {} version {}", m.name, m.version)));
        }
        Ok((m, bytes))
    }

    /// Bytes `start..=end` of the content with this SHA-256: a reply whose body is exactly
    /// that range.
    pub async fn blob(&self, sha256: &str, start: u64, end: u64) -> Result<Reply, LinkError> {
        let path = format!("/cache/v1/blob/{sha256}");
        // The range is not signed: a Range an attacker changes yields bytes that fail their
        // chunk hashes, nothing worse.
        let mut r = self.send("GET", &path, b"", &format!("Range: bytes={start}-{end}\r\n"), self.timeout()).await?;
        if r.status != 206 && !(r.status == 200 && start == 0) {
            let text = r.body(4096).await.unwrap_or_default();
            return Err(LinkError::Status(r.status, String::from_utf8_lossy(&text).into_owned()));
        }
        if r.length != Some(end - start + 1) {
            return Err(LinkError::Invalid(format!("asked for {} bytes, the answer has {:?}", end - start + 1, r.length)));
        }
        Ok(r)
    }
}

async fn read_head(mut reader: BufReader<TcpStream>, idle: Duration, nonce: [u8; 16]) -> Result<Reply, LinkError> {
    let mut budget = MAX_HEAD;
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = match tokio::time::timeout(idle, (&mut reader).take(budget as u64).read_line(&mut line)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(LinkError::Unreachable(format!("reading the answer: {e}"))),
            Err(_) => return Err(LinkError::Unreachable("no answer in time".into())),
        };
        if n == 0 || !line.ends_with('\n') {
            return Err(LinkError::Unreachable("the connection closed mid-answer".into()));
        }
        budget = budget.saturating_sub(n);
        let l = line.trim_end().to_string();
        if l.is_empty() {
            break;
        }
        lines.push(l);
    }
    let status_line = lines.first().cloned().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| LinkError::Invalid(format!("not an HTTP answer: {status_line:?}")))?;
    let mut headers = HashMap::new();
    for l in &lines[1..] {
        let (k, v) = l.split_once(':').ok_or_else(|| LinkError::Invalid(format!("bad header {l:?}")))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    if headers.get("transfer-encoding").is_some_and(|t: &String| !t.eq_ignore_ascii_case("identity")) {
        return Err(LinkError::Invalid("chunked answers are not expected from an origin".into()));
    }
    let length = match headers.get("content-length") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| LinkError::Invalid(format!("bad Content-Length {v:?}")))?),
        None => None,
    };
    Ok(Reply { status, headers, length, reader, idle, nonce })
}

#[cfg(test)]
mod tests {
    use super::encode_path;

    #[test]
    fn paths_are_percent_encoded_but_for_slashes() {
        assert_eq!(encode_path("files/a b/c?d#e%"), "files/a%20b/c%3Fd%23e%25");
        assert_eq!(encode_path("files/vmlinuz-6.1_x.gz"), "files/vmlinuz-6.1_x.gz");
    }
}
