//! What the doctor reads about this host: interface state from sysfs, sysctls, who holds a
//! port (`/proc/net` and `/proc/PID/fd`), what a user may read or write by the mode bits,
//! free space, NTP state. Readers only: nothing here changes the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `/sys/class/net/NAME/FILE`, trimmed.
pub fn sys_net(iface: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(iface).join(file)).ok().map(|s| s.trim().to_string())
}

/// The interface's `IFF_*` flags.
pub fn iface_flags(iface: &str) -> Option<u32> {
    u32::from_str_radix(sys_net(iface, "flags")?.trim_start_matches("0x"), 16).ok()
}

pub const IFF_UP: u32 = 0x1;
pub const IFF_MULTICAST: u32 = 0x1000;

pub fn mtu(iface: &str) -> Option<u32> {
    sys_net(iface, "mtu")?.parse().ok()
}

/// A sysctl by its `/proc/sys` path (`net/ipv4/ip_forward`), in this network namespace.
pub fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path)).ok().map(|s| s.trim().to_string())
}

pub fn sysctl_u64(path: &str) -> Option<u64> {
    sysctl(path)?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Udp,
    Tcp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        })
    }
}

/// A bound socket of this network namespace, as `/proc/net/{udp,tcp}[6]` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub proto: Proto,
    pub local: SocketAddr,
    pub inode: u64,
}

/// Every bound UDP socket and listening TCP socket of this namespace.
pub fn bound_sockets() -> Vec<Bound> {
    let mut out = Vec::new();
    for (file, proto) in [("udp", Proto::Udp), ("udp6", Proto::Udp), ("tcp", Proto::Tcp), ("tcp6", Proto::Tcp)] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) {
            out.extend(parse_proc_net(&text, proto));
        }
    }
    out
}

/// Parses one `/proc/net/{udp,tcp}[6]` table. TCP sockets count only when listening
/// (state 0A); a UDP socket is bound once it has a local port.
pub fn parse_proc_net(text: &str, proto: Proto) -> Vec<Bound> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if proto == Proto::Tcp && *state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = parse_proc_addr(addr)?;
            Some(Bound { proto, local: SocketAddr::new(ip, port), inode: inode.parse().ok()? })
        })
        .collect()
}

/// `/proc/net` writes addresses as the kernel's 32-bit words in host byte order.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => {
            let a: [u8; 16] = bytes.try_into().ok()?;
            let v6 = Ipv6Addr::from(a);
            Some(v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)))
        }
        _ => None,
    }
}

/// Whether a socket bound at `held` takes `port`/`proto` away from one binding `want`:
/// same port, and the addresses overlap (either is a wildcard, or they are equal).
pub fn overlaps(held: &Bound, proto: Proto, want: SocketAddr) -> bool {
    held.proto == proto
        && held.local.port() == want.port()
        && (held.local.ip().is_unspecified() || want.ip().is_unspecified() || held.local.ip() == want.ip())
}

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.command, self.pid)
    }
}

/// The processes whose open files include the socket `inode`. Other users' processes are
/// visible only to root.
pub fn holders(inode: u64) -> Vec<Holder> {
    let target = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())) {
            let command = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_string();
            out.push(Holder { pid, command });
        }
    }
    out
}

/// A local account, as `/etc/passwd` and `/etc/group` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
}

/// The account `name` from `/etc/passwd` (primary group) and `/etc/group` (supplementary).
pub fn account(name: &str) -> Option<Account> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    account_from(name, &passwd, &group)
}

pub fn account_from(name: &str, passwd: &str, group: &str) -> Option<Account> {
    let f: Vec<&str> = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.first() == Some(&name))?;
    let uid = f.get(2)?.parse().ok()?;
    let mut gids = vec![f.get(3)?.parse().ok()?];
    for l in group.lines() {
        let g: Vec<&str> = l.split(':').collect();
        if g.get(3).is_some_and(|m| m.split(',').any(|m| m == name)) {
            if let Some(gid) = g.get(2).and_then(|s| s.parse().ok()) {
                gids.push(gid);
            }
        }
    }
    Some(Account { name: name.to_string(), uid, gids })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Why `account` cannot reach `path` for `want`, by the mode bits of the path and every
/// directory above it (search permission); `None` when it can. Root may do anything; ACLs
/// are not read.
pub fn denied(account: &Account, path: &Path, want: Access) -> Option<String> {
    if account.uid == 0 {
        return None;
    }
    let bit = |m: &std::fs::Metadata, r: u32, w: u32, x: u32| -> bool {
        let mode = m.mode();
        let shift = if m.uid() == account.uid {
            6
        } else if account.gids.contains(&m.gid()) {
            3
        } else {
            0
        };
        let need = (r << 2) | (w << 1) | x;
        (mode >> shift) & need == need
    };
    let mut dirs: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_path_buf).collect();
    dirs.reverse();
    for d in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
        let Ok(m) = std::fs::metadata(d) else { continue };
        if !bit(&m, 0, 0, 1) {
            return Some(format!("{} (mode {:04o}, {}) does not let {} through", d.display(), m.mode() & 0o7777, owner(&m), account.name));
        }
    }
    let m = std::fs::metadata(path).ok()?;
    let is_dir = m.is_dir();
    let ok = match (want, is_dir) {
        (Access::Read, false) => bit(&m, 1, 0, 0),
        (Access::Read, true) => bit(&m, 1, 0, 1),
        (Access::Write, false) => bit(&m, 0, 1, 0),
        (Access::Write, true) => bit(&m, 0, 1, 1),
    };
    (!ok).then(|| {
        let what = if want == Access::Read { "readable" } else { "writable" };
        format!("{} (mode {:04o}, {}) is not {what} by {}", path.display(), m.mode() & 0o7777, owner(&m), account.name)
    })
}

fn owner(m: &std::fs::Metadata) -> String {
    format!("owner {}:{}", user_name(m.uid()).unwrap_or_else(|| m.uid().to_string()), group_name(m.gid()).unwrap_or_else(|| m.gid().to_string()))
}

fn id_name(file: &str, id: u32) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == id).then(|| f[0].to_string())
    })
}

pub fn user_name(uid: u32) -> Option<String> {
    id_name("/etc/passwd", uid)
}

pub fn group_name(gid: u32) -> Option<String> {
    id_name("/etc/group", gid)
}

/// Bytes available to unprivileged writers and the filesystem's size, under `path`.
pub fn free_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills the zeroed struct; `c` is NUL-terminated and lives across the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok((s.f_bavail as u64 * frsize, s.f_blocks as u64 * frsize))
}

/// Whether the kernel's clock discipline says it is synchronized to a time source
/// (`adjtimex`: not `TIME_ERROR`, `STA_UNSYNC` clear). Reading needs no privilege.
pub fn ntp_synchronized() -> Option<bool> {
    // SAFETY: ntp_adjtime with modes = 0 only reads the kernel's state into `t`.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::ntp_adjtime(&mut t) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && t.status & libc::STA_UNSYNC == 0)
}

/// The running kernel's version as (major, minor).
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = sysctl("kernel/osrelease")?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The account doctor runs as.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Whether a holder is a fleetboot process (by its command name).
pub fn is_fleetboot(h: &Holder) -> bool {
    h.command == "fleetboot" || h.command.starts_with("fleetboot-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_parse_into_bound_sockets() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   12: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
                   13: 0100007F:0045 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4343 2 0000000000000000 0\n";
        let got = parse_proc_net(udp, Proto::Udp);
        assert_eq!(got[0], Bound { proto: Proto::Udp, local: "0.0.0.0:67".parse().unwrap(), inode: 4242 });
        assert_eq!(got[1].local, "127.0.0.1:69".parse().unwrap());
        let tcp = "  sl  local_address rem_address   st ...\n\
                   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0 100 0 0 10 0\n\
                   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 78 1 0 100 0 0 10 0\n";
        let got = parse_proc_net(tcp, Proto::Tcp);
        assert_eq!(got.len(), 1, "only the listening socket: {got:?}");
        assert_eq!(got[0].local.port(), 8080);
        let tcp6 = "  sl ...\n 0: 00000000000000000000000000000000:2A41 00000000000000000000000000000000:0000 0A 0 0 0 0 0 0 99 1\n";
        assert_eq!(parse_proc_net(tcp6, Proto::Tcp)[0].local, "[::]:10817".parse().unwrap());
        assert!(parse_proc_net("header\ngarbage line\n", Proto::Udp).is_empty());
    }

    #[test]
    fn a_wildcard_or_the_same_address_on_the_same_port_conflicts() {
        let held = |a: &str| Bound { proto: Proto::Udp, local: a.parse().unwrap(), inode: 1 };
        assert!(overlaps(&held("0.0.0.0:69"), Proto::Udp, "10.0.0.1:69".parse().unwrap()));
        assert!(overlaps(&held("10.0.0.1:69"), Proto::Udp, "0.0.0.0:69".parse().unwrap()));
        assert!(!overlaps(&held("10.0.0.2:69"), Proto::Udp, "10.0.0.1:69".parse().unwrap()));
        assert!(!overlaps(&held("0.0.0.0:69"), Proto::Tcp, "0.0.0.0:69".parse().unwrap()));
        assert!(!overlaps(&held("0.0.0.0:70"), Proto::Udp, "0.0.0.0:69".parse().unwrap()));
    }

    #[test]
    fn accounts_come_with_their_supplementary_groups() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nfleetboot:x:998:997::/var/lib/fleetboot:/usr/sbin/nologin\n";
        let group = "root:x:0:\nfleetboot:x:997:\ntftp:x:120:fleetboot,other\n";
        let a = account_from("fleetboot", passwd, group).unwrap();
        assert_eq!((a.uid, a.gids.clone()), (998, vec![997, 120]));
        assert!(account_from("nobody", passwd, group).is_none());
    }
}
