//! Where a boot file comes from: `http://` and `tftp://` URLs, plain TFTP file names, and
//! the references an iPXE script makes relative to the script's own URL.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// A parsed source of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `path` starts with `/` and is sent as it is (already percent-encoded).
    Http {
        host: String,
        port: u16,
        path: String,
    },
    /// `file` is what goes in the RRQ: the URL path without its leading `/`, decoded
    /// (iPXE does the same).
    Tftp {
        host: String,
        port: u16,
        file: String,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Http { host, port, path } if *port == 80 => {
                write!(f, "http://{host}{path}")
            }
            Location::Http { host, port, path } => write!(f, "http://{host}:{port}{path}"),
            Location::Tftp { host, port, file } if *port == 69 => {
                write!(f, "tftp://{host}/{file}")
            }
            Location::Tftp { host, port, file } => write!(f, "tftp://{host}:{port}/{file}"),
        }
    }
}

fn split_authority(rest: &str, default_port: u16) -> Result<(String, u16, &str), String> {
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.contains('@') {
        return Err("user information in URLs is not supported".into());
    }
    let (host, port) = match auth.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("bad port {p:?}"))
                .and_then(|p| if p == 0 { Err("port 0".into()) } else { Ok(p) })?,
        ),
        None => (auth, default_port),
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    // Drop a fragment; keep the query (HTTP) as part of the path.
    let path = path.split('#').next().unwrap_or("/");
    Ok((host.to_string(), port, path))
}

/// `%XX` decoding; malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Location {
    /// Parses a URL, or takes a name without a scheme as a TFTP file on `tftp_server` (the
    /// DHCP next-server) the way PXE firmware does.
    pub fn parse(s: &str, tftp_server: Option<Ipv4Addr>) -> Result<Location, String> {
        let s = s.trim();
        let err = |why: String| format!("{s:?}: {why}");
        if let Some((scheme, rest)) = s.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "http" => {
                    let (host, port, path) = split_authority(rest, 80).map_err(err)?;
                    Ok(Location::Http {
                        host,
                        port,
                        path: path.to_string(),
                    })
                }
                "tftp" => {
                    let (host, port, path) = split_authority(rest, 69).map_err(err)?;
                    let path = path.split('?').next().unwrap_or("");
                    let file = percent_decode(path.strip_prefix('/').unwrap_or(path));
                    if file.is_empty() {
                        return Err(err("no file name".into()));
                    }
                    Ok(Location::Tftp { host, port, file })
                }
                other => Err(err(format!(
                    "scheme {other:?} is not supported (http, tftp)"
                ))),
            };
        }
        if s.is_empty() {
            return Err("empty boot file name".into());
        }
        let server =
            tftp_server.ok_or_else(|| err("a TFTP file name but no next-server".into()))?;
        Ok(Location::Tftp {
            host: server.to_string(),
            port: 69,
            file: s.to_string(),
        })
    }

    pub fn is_http(&self) -> bool {
        matches!(self, Location::Http { .. })
    }

    /// The last path segment (what `--expect NAME=...` matches).
    pub fn file_name(&self) -> &str {
        let p = match self {
            Location::Http { path, .. } => path.split('?').next().unwrap_or(""),
            Location::Tftp { file, .. } => file,
        };
        p.rsplit('/').next().unwrap_or(p)
    }

    pub fn host_port(&self) -> (&str, u16) {
        match self {
            Location::Http { host, port, .. } | Location::Tftp { host, port, .. } => {
                (host.as_str(), *port)
            }
        }
    }
}

/// Resolves a reference found in a script fetched from `base` (RFC 3986 §5.2, the cases
/// iPXE scripts use: absolute URLs, absolute paths, and names relative to the script's
/// directory).
pub fn join(base: &Location, reference: &str) -> String {
    let reference = reference.trim();
    if reference.contains("://") {
        return reference.to_string();
    }
    let (scheme, host, port, dir) = match base {
        Location::Http { host, port, path } => {
            let p = path.split('?').next().unwrap_or("/");
            (
                "http",
                host,
                *port,
                p[..=p.rfind('/').unwrap_or(0)].to_string(),
            )
        }
        Location::Tftp { host, port, file } => {
            let p = format!("/{file}");
            let dir = p[..=p.rfind('/').unwrap_or(0)].to_string();
            ("tftp", host, *port, dir)
        }
    };
    let path = if reference.starts_with('/') {
        reference.to_string()
    } else {
        format!("{dir}{reference}")
    };
    format!("{scheme}://{host}:{port}{path}")
}

/// Resolves `host:port` to an IPv4 socket address (a literal, else the resolver).
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddrV4, String> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddrV4::new(ip, port));
    }
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?;
    for a in addrs {
        if let std::net::SocketAddr::V4(v4) = a {
            return Ok(v4);
        }
    }
    Err(format!("{host} has no IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Option<Ipv4Addr> = Some(Ipv4Addr::new(10, 77, 0, 1));

    #[test]
    fn parses_the_forms_fleetboot_hands_out() {
        assert_eq!(
            Location::parse("http://10.77.0.1:8080/boot/02-fb.ipxe", None).unwrap(),
            Location::Http {
                host: "10.77.0.1".into(),
                port: 8080,
                path: "/boot/02-fb.ipxe".into()
            }
        );
        assert_eq!(
            Location::parse("tftp://10.77.0.1/vmlinuz", None).unwrap(),
            Location::Tftp {
                host: "10.77.0.1".into(),
                port: 69,
                file: "vmlinuz".into()
            }
        );
        assert_eq!(
            Location::parse("boot/02-fb-ee-00-00-01.ipxe", NS).unwrap(),
            Location::Tftp {
                host: "10.77.0.1".into(),
                port: 69,
                file: "boot/02-fb-ee-00-00-01.ipxe".into()
            }
        );
        assert_eq!(
            Location::parse("tftp://h:1069/a%20b/c", None).unwrap(),
            Location::Tftp {
                host: "h".into(),
                port: 1069,
                file: "a b/c".into()
            }
        );
        assert_eq!(
            Location::parse("http://h", None).unwrap().to_string(),
            "http://h/"
        );
        assert!(Location::parse("https://h/x", None).is_err());
        assert!(Location::parse("pxelinux.0", None).is_err());
        assert!(Location::parse("http://h:0/x", None).is_err());
        assert!(Location::parse("tftp://h/", None).is_err());
        assert!(Location::parse("", NS).is_err());
    }

    #[test]
    fn file_names_and_joins() {
        let base = Location::parse("http://10.77.0.1:8080/boot/x.ipxe", None).unwrap();
        assert_eq!(join(&base, "vmlinuz"), "http://10.77.0.1:8080/boot/vmlinuz");
        assert_eq!(
            join(&base, "/files/initrd.gz"),
            "http://10.77.0.1:8080/files/initrd.gz"
        );
        assert_eq!(join(&base, "tftp://a/b"), "tftp://a/b");
        let t = Location::parse("boot/x.ipxe", NS).unwrap();
        assert_eq!(join(&t, "vmlinuz"), "tftp://10.77.0.1:69/boot/vmlinuz");
        let f = Location::parse(&join(&t, "vmlinuz"), None).unwrap();
        assert_eq!(f.file_name(), "vmlinuz");
        let h = Location::parse("http://a/files/initrd.gz?x=1", None).unwrap();
        assert_eq!(h.file_name(), "initrd.gz");
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
