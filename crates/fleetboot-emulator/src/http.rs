//! A minimal HTTP/1.1 client for boot files: one GET per connection, from a chosen local
//! address, `Content-Length` or chunked bodies (or up to EOF when the server gives
//! neither), redirects followed like iPXE does. Nothing else: no TLS, no keep-alive, no
//! compression.

use crate::sink::Sink;
use crate::url::{resolve, Location};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

/// Longest response head accepted.
const MAX_HEAD: usize = 32 * 1024;
const MAX_REDIRECTS: usize = 5;
/// Silence on a connection after which the fetch fails.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpInfo {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub redirects: usize,
}

struct Head {
    status: u16,
    reason: String,
    content_length: Option<u64>,
    chunked: bool,
    location: Option<String>,
}

async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    budget: &mut usize,
) -> Result<String, String> {
    let mut line = Vec::new();
    let n = tokio::time::timeout(IDLE, r.read_until(b'\n', &mut line))
        .await
        .map_err(|_| "timed out reading the response".to_string())?
        .map_err(|e| format!("reading the response: {e}"))?;
    if n == 0 {
        return Err("connection closed before the response was complete".into());
    }
    *budget = budget
        .checked_sub(n)
        .ok_or_else(|| format!("response head longer than {MAX_HEAD} bytes"))?;
    if line.last() != Some(&b'\n') {
        return Err("connection closed in the middle of a line".into());
    }
    let s = String::from_utf8_lossy(&line);
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

async fn read_head<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Head, String> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, &mut budget).await?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut head = Head {
        status,
        reason,
        content_length: None,
        chunked: false,
        location: None,
    };
    loop {
        let line = read_line(r, &mut budget).await?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let v = value
                    .parse::<u64>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
                if head.content_length.is_some_and(|old| old != v) {
                    return Err("conflicting Content-Length headers".into());
                }
                head.content_length = Some(v);
            }
            "transfer-encoding" => {
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if last.eq_ignore_ascii_case("chunked") {
                    head.chunked = true;
                } else if !last.eq_ignore_ascii_case("identity") {
                    return Err(format!("unsupported Transfer-Encoding {value:?}"));
                }
            }
            "location" => head.location = Some(value.to_string()),
            _ => {}
        }
    }
    Ok(head)
}

async fn copy_exact<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    mut n: u64,
    sink: &mut Sink,
    buf: &mut [u8],
) -> Result<(), String> {
    while n > 0 {
        let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        let got = tokio::time::timeout(IDLE, r.read(&mut buf[..want]))
            .await
            .map_err(|_| "timed out reading the body".to_string())?
            .map_err(|e| format!("reading the body: {e}"))?;
        if got == 0 {
            return Err(format!(
                "connection closed with {n} body bytes missing ({} received)",
                sink.bytes()
            ));
        }
        sink.write(&buf[..got])?;
        n -= got as u64;
    }
    Ok(())
}

async fn read_body<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    head: &Head,
    sink: &mut Sink,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    if head.chunked {
        let mut budget = MAX_HEAD;
        loop {
            let line = read_line(r, &mut budget).await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(r, &mut budget).await?.is_empty() {}
                return Ok(());
            }
            copy_exact(r, size, sink, &mut buf).await?;
            if !read_line(r, &mut budget).await?.is_empty() {
                return Err("chunk not followed by CRLF".into());
            }
            budget = MAX_HEAD;
        }
    }
    if let Some(len) = head.content_length {
        return copy_exact(r, len, sink, &mut buf).await;
    }
    // Neither: the body ends when the server closes.
    loop {
        let got = tokio::time::timeout(IDLE, r.read(&mut buf))
            .await
            .map_err(|_| "timed out reading the body".to_string())?
            .map_err(|e| format!("reading the body: {e}"))?;
        if got == 0 {
            return Ok(());
        }
        sink.write(&buf[..got])?;
    }
}

/// One GET on a fresh connection from `local` (port chosen by the kernel).
async fn get_once(
    local: Option<Ipv4Addr>,
    host: &str,
    port: u16,
    path: &str,
    sink: &mut Sink,
) -> Result<Head, String> {
    let server = resolve(host, port).await?;
    let stream = tokio::time::timeout(IDLE, crate::net::client_tcp(local, server))
        .await
        .map_err(|_| format!("connecting to {server}: timed out"))?
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let host_header = if port == 80 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: fleetboot-emulator (iPXE)\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    wr.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut r = BufReader::with_capacity(64 * 1024, rd);
    let head = read_head(&mut r).await?;
    if head.status == 200 {
        read_body(&mut r, &head, sink).await?;
    }
    Ok(head)
}

/// GETs `url` (an `http://` URL) into `sink`, following up to five redirects.
pub async fn get(local: Option<Ipv4Addr>, url: &str, sink: &mut Sink) -> Result<HttpInfo, String> {
    let mut loc = Location::parse(url, None)?;
    for redirects in 0..=MAX_REDIRECTS {
        let Location::Http { host, port, path } = &loc else {
            return Err(format!("{loc}: not an http:// URL"));
        };
        let head = get_once(local, host, *port, path, sink).await?;
        match head.status {
            200 => {
                if head.content_length.is_some_and(|l| l != sink.bytes()) {
                    return Err("body length differs from Content-Length".into());
                }
                return Ok(HttpInfo {
                    status: 200,
                    content_length: head.content_length,
                    chunked: head.chunked,
                    redirects,
                });
            }
            301 | 302 | 303 | 307 | 308 => {
                let to = head
                    .location
                    .ok_or_else(|| format!("HTTP {} without Location", head.status))?;
                loc = Location::parse(&crate::url::join(&loc, &to), None)?;
            }
            s => return Err(format!("HTTP {s} {}", head.reason)),
        }
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Serves one canned response per connection, in order; returns the base URL.
    async fn serve(responses: Vec<Vec<u8>>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for resp in responses {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&b[..n]);
                }
                assert!(req.starts_with(b"GET /"));
                s.write_all(&resp).await.unwrap();
            }
        });
        format!("http://{addr}")
    }

    async fn fetch(responses: Vec<Vec<u8>>) -> Result<(HttpInfo, Vec<u8>), String> {
        let base = serve(responses).await;
        let mut sink = Sink::new(true);
        let info = get(Some(Ipv4Addr::LOCALHOST), &format!("{base}/x"), &mut sink).await?;
        Ok((info, sink.finish().data.unwrap()))
    }

    #[tokio::test]
    async fn content_length_body() {
        let (info, body) = fetch(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello".to_vec(),
        ])
        .await
        .unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(info.content_length, Some(5));
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let (info, body) = fetch(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nTrailer: x\r\n\r\n"
                .to_vec(),
        ])
        .await
        .unwrap();
        assert_eq!(body, b"hello");
        assert!(info.chunked);
    }

    #[tokio::test]
    async fn body_to_eof_and_redirect() {
        let (info, body) = fetch(vec![
            b"HTTP/1.1 302 Found\r\nLocation: /y\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec(),
        ])
        .await
        .unwrap();
        assert_eq!(body, b"until close");
        assert_eq!(info.redirects, 1);
    }

    #[tokio::test]
    async fn errors_are_reported() {
        let e = fetch(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
        ])
        .await
        .unwrap_err();
        assert_eq!(e, "HTTP 404 Not Found");
        let e = fetch(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".to_vec()
        ])
        .await
        .unwrap_err();
        assert!(e.contains("5 body bytes missing"), "{e}");
        let e = fetch(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ])
        .await
        .unwrap_err();
        assert!(e.contains("chunk size"), "{e}");
        let e = fetch(vec![b"SSH-2.0-x\r\n".to_vec()]).await.unwrap_err();
        assert!(e.contains("not an HTTP/1.x"), "{e}");
    }
}
