//! The checks themselves, each pushing its findings. Every finding that is not `ok` says
//! what to do, with the file, key, port or command to change.

use super::host::{self, Access, Account, Proto};
use super::{probe, Finding, Options};
use crate::config::{Config, DhcpMode};
use fleetboot_boot::BootPlan;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The only directory the packaged systemd units let fleetboot write.
const UNIT_STATE_DIR: &str = "/var/lib/fleetboot";
/// What the DHCP socket asks for (`serve::dhcp`), to ride out a boot storm's burst.
const DHCP_RECV_BUFFER: u64 = 8 << 20;

pub fn all(c: &Config, o: &Options, out: &mut Vec<Finding>) {
    let account = host::account(&o.service_user);
    let user = account.as_ref();
    interface(c, out);
    ports(c, out);
    dhcp_servers(c, o, out);
    root(c, user, out);
    boot_files(c, user, out);
    clock(out);
    data_dir(c, user, &o.service_user, out);
    store(c, out);
    network(c, out);
    if account.is_none() {
        out.push(Finding::skipped(
            "permissions",
            format!(
                "no account {:?} on this host (the package creates it): files were checked as the user running doctor only",
                o.service_user
            ),
        ));
    }
}

fn list(items: impl IntoIterator<Item = impl ToString>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn interface(c: &Config, out: &mut Vec<Finding>) {
    let all = match fleetboot_net::interfaces() {
        Ok(a) => a,
        Err(e) => return out.push(Finding::error("interface", format!("cannot list interfaces: {e}"), "run doctor on the host (or namespace) fleetboot runs in")),
    };
    let addr = IpAddr::V4(c.address);
    let holder = all.iter().find(|i| i.has(addr));
    let names = || list(all.iter().map(|i| i.name.clone()));
    let Some(name) = &c.interface else {
        if c.dhcp.mode != DhcpMode::Off {
            out.push(Finding::warning(
                "interface",
                "server.interface is not set: fleetboot answers DHCP on every interface of this host",
                format!(
                    "set server.interface to the interface facing the clients{}",
                    holder.map(|i| format!(" ({} has server.address)", i.name)).unwrap_or_default()
                ),
            ));
        }
        match holder {
            Some(i) => out.push(Finding::ok("interface", format!("server.address {} is on {}", c.address, i.name))),
            None => out.push(Finding::error(
                "interface",
                format!("server.address {} is not an address of this host", c.address),
                format!("clients are sent to it for every file: add it to an interface (ip addr add {}/24 dev IFACE) or set server.address to one of this host's", c.address),
            )),
        }
        return;
    };
    let Some(iface) = all.iter().find(|i| &i.name == name) else {
        return out.push(Finding::error(
            "interface",
            format!("server.interface {name:?} does not exist on this host (it has: {})", names()),
            "set server.interface to the interface facing the clients",
        ));
    };
    let flags = host::iface_flags(name).unwrap_or(0);
    if flags & host::IFF_UP == 0 {
        out.push(Finding::error(
            "interface",
            format!("{name} is down"),
            format!("ip link set {name} up, and bring it up at boot (/etc/network/interfaces, systemd-networkd or NetworkManager)"),
        ));
    }
    if iface.has(addr) {
        out.push(Finding::ok("interface", format!("{name} has server.address {}", c.address)));
    } else {
        let elsewhere = holder.map(|i| format!("; {} is on {}", c.address, i.name)).unwrap_or_default();
        out.push(Finding::error(
            "interface",
            format!("{name} does not have server.address {} (it has: {}){elsewhere}", c.address, list(&iface.ipv4)),
            format!(
                "clients are told to fetch from {}: add it (ip addr add {}/24 dev {name}) or set server.address and server.interface to match",
                c.address, c.address
            ),
        ));
    }
    if let (Some(t), Some(mtu)) = (&c.tftp, host::mtu(name)) {
        // IPv4 (20) + UDP (8) + TFTP DATA header (4) around each block.
        let fits = mtu.saturating_sub(32);
        if u32::from(t.max_blksize) > fits {
            out.push(Finding::warning(
                "interface",
                format!("{name}'s MTU is {mtu}: TFTP blocks of tftp.max_blksize = {} bytes do not fit in one frame and are sent as IP fragments, which some firmware drops", t.max_blksize),
                format!("set tftp.max_blksize = {fits}"),
            ));
        }
    }
    let multicast_roles = c.files.is_some() || c.negotiate.is_some() || c.stream.is_some();
    if multicast_roles && flags & host::IFF_MULTICAST == 0 {
        out.push(Finding::warning(
            "interface",
            format!("{name} has multicast turned off, and [files], [negotiate] or [stream] multicast on it"),
            format!("ip link set {name} multicast on"),
        ));
    }
}

/// A socket a configured service binds, and how (`shared`: with SO_REUSEADDR and
/// SO_REUSEPORT, as the DHCP shell and the negotiators' peer port do).
struct Wanted {
    what: String,
    proto: Proto,
    addr: SocketAddr,
    device: Option<String>,
    shared: bool,
}

fn wanted(c: &Config) -> Vec<Wanted> {
    let device = c.interface.clone().filter(|n| fleetboot_net::interface_index(n).is_ok());
    let any = |port: u16| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut w = Vec::new();
    let mut add = |what: &str, proto, addr: SocketAddr, device: Option<String>, shared| {
        if addr.port() != 0 {
            w.push(Wanted { what: what.to_string(), proto, addr, device, shared });
        }
    };
    if c.dhcp.mode != DhcpMode::Off {
        add("DHCP, dhcp.port", Proto::Udp, any(c.dhcp.port), device.clone(), true);
        if c.negotiate.is_none() {
            add("PXE boot server, dhcp.pxe_port", Proto::Udp, any(c.dhcp.pxe_port), device.clone(), true);
        }
    }
    if let Some(t) = &c.tftp {
        add("TFTP, tftp.listen", Proto::Udp, t.listen, device.clone(), false);
    }
    if let Some(h) = c.http {
        add("HTTP, http.listen", Proto::Tcp, h, None, false);
    }
    if c.nbd.enabled {
        add("NBD, nbd.listen", Proto::Tcp, c.nbd.listen, None, false);
    }
    if let Some(n) = &c.negotiate {
        add("negotiator, negotiate.listen_port", Proto::Udp, any(n.listen_port), None, false);
        add("negotiator peers, negotiate.peer_port", Proto::Udp, any(n.peers.port), None, true);
    }
    if let Some(f) = &c.files {
        add("file server control, files.control_port", Proto::Udp, any(f.control_port), None, false);
        add("file server peers, files.peer_port", Proto::Udp, any(f.peer_port), None, true);
        add("PXE MTFTP, files.mtftp_port", Proto::Udp, any(f.mtftp_port), device.clone(), false);
        add("RFC 2090 multicast TFTP, files.rfc2090_port", Proto::Udp, any(f.rfc2090_port), device.clone(), false);
    }
    // One check per socket: a port two roles share with SO_REUSEPORT is checked once.
    w.dedup_by(|a, b| a.proto == b.proto && a.addr == b.addr);
    w
}

fn try_bind(w: &Wanted) -> std::io::Result<()> {
    match w.proto {
        Proto::Udp => fleetboot_net::UdpBuilder::new(w.addr)
            .device(w.device.as_deref())
            .reuse_address(w.shared)
            .reuse_port(w.shared)
            .purpose("doctor's port test")
            .bind()
            .map(drop),
        Proto::Tcp => fleetboot_net::TcpListenerBuilder::new(w.addr).reuse_address(true).device(w.device.as_deref()).bind().map(drop),
    }
}

fn ports(c: &Config, out: &mut Vec<Finding>) {
    let bound = host::bound_sockets();
    let me = std::process::id();
    let unprivileged_from = host::sysctl_u64("net/ipv4/ip_unprivileged_port_start").unwrap_or(1024);
    for w in wanted(c) {
        let port = format!("{}/{} ({})", w.addr.port(), w.proto, w.what);
        let mut holders: Vec<host::Holder> = bound
            .iter()
            .filter(|b| host::overlaps(b, w.proto, w.addr))
            .flat_map(|b| host::holders(b.inode))
            .filter(|h| h.pid != me)
            .collect();
        holders.sort_by_key(|h| h.pid);
        holders.dedup();
        let unknown_holder = holders.is_empty() && bound.iter().any(|b| host::overlaps(b, w.proto, w.addr));
        let (ours, others): (Vec<_>, Vec<_>) = holders.into_iter().partition(host::is_fleetboot);
        let running = || format!("{port} is in use by {}: the service is running", list(&ours));
        let held_by = || {
            if others.is_empty() {
                "another process (run doctor as root to see which)".to_string()
            } else {
                list(&others)
            }
        };
        let move_it = format!(
            "stop that process (systemctl disable --now its unit), or give fleetboot another port in {}",
            w.what.split(", ").nth(1).unwrap_or("the config")
        );
        match try_bind(&w) {
            Ok(()) if w.shared && !others.is_empty() && w.addr.port() == c.dhcp.port => {
                if c.dhcp.mode == DhcpMode::Proxy {
                    out.push(Finding::ok("port", format!("{port}: shared with {}, as ProxyDHCP beside a DHCP server on this host", list(&others))));
                } else {
                    out.push(Finding::error(
                        "port",
                        format!("{port} is also held by {}: two DHCP servers on this host would both answer every DISCOVER", list(&others)),
                        "stop the other DHCP server on this interface, or set dhcp.mode = \"proxy\" so that it hands out addresses and fleetboot answers only PXE clients",
                    ));
                }
            }
            Ok(()) if !ours.is_empty() => out.push(Finding::ok("port", running())),
            Ok(()) => out.push(Finding::ok("port", format!("{port} is free"))),
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                if others.is_empty() && !unknown_holder && !ours.is_empty() {
                    out.push(Finding::ok("port", running()));
                } else {
                    out.push(Finding::error("port", format!("{port} is held by {}", held_by()), move_it));
                }
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied && u64::from(w.addr.port()) < unprivileged_from => {
                if !others.is_empty() || unknown_holder {
                    out.push(Finding::error("port", format!("{port} is held by {}", held_by()), move_it));
                } else if !ours.is_empty() {
                    out.push(Finding::ok("port", running()));
                } else {
                    out.push(Finding::ok(
                        "port",
                        format!("{port}: no process holds it (not test-bound: binding it needs CAP_NET_BIND_SERVICE, which the fleetboot units grant)"),
                    ));
                }
            }
            Err(e) if e.kind() == ErrorKind::AddrNotAvailable => out.push(Finding::error(
                "port",
                format!("{port}: {} is not an address of this host", w.addr.ip()),
                format!("listen on 0.0.0.0:{} or on one of this host's addresses", w.addr.port()),
            )),
            Err(e) => out.push(Finding::error("port", format!("{port} cannot be bound: {e}"), "see the error above")),
        }
    }
}

fn dhcp_servers(c: &Config, o: &Options, out: &mut Vec<Finding>) {
    const CHECK: &str = "dhcp-servers";
    if c.dhcp.mode == DhcpMode::Off {
        return out.push(Finding::skipped(CHECK, "dhcp.mode = \"off\": other DHCP servers are not looked for"));
    }
    if !o.probe_dhcp {
        return out.push(Finding::skipped(CHECK, "other DHCP servers were not looked for (--no-dhcp-probe)"));
    }
    let Some(iface) = c.interface.as_deref().filter(|n| fleetboot_net::interface_index(n).is_ok()) else {
        return out.push(Finding::skipped(
            CHECK,
            "other DHCP servers were not looked for: the probe is sent only on an existing server.interface",
        ));
    };
    let (mac, offers) = match probe::run(iface, c.dhcp.port, c.dhcp.client_port, o.probe_wait) {
        Ok(r) => r,
        Err(e) => {
            let why = if e.kind() == ErrorKind::PermissionDenied {
                format!("binding port {} needs root", c.dhcp.client_port)
            } else {
                e.to_string()
            };
            return out.push(Finding::skipped(CHECK, format!("could not send a DHCPDISCOVER on {iface}: {why}")));
        }
    };
    let local: Vec<IpAddr> = fleetboot_net::interfaces()
        .unwrap_or_default()
        .iter()
        .flat_map(|i| i.ipv4.iter().map(|a| IpAddr::V4(*a)))
        .collect();
    let (ours, others): (Vec<_>, Vec<_>) =
        offers.iter().partition(|f| f.server_id == Some(c.address) || local.contains(&f.from.ip()));
    let describe = |f: &probe::Offer| {
        let who = match f.server_id {
            Some(id) if IpAddr::V4(id) != f.from.ip() => format!("{} (server id {id})", f.from.ip()),
            _ => f.from.ip().to_string(),
        };
        let what = match (f.address, &f.boot_file) {
            (Some(a), Some(b)) if !b.is_empty() => format!("offered {a} and boot file {b:?}"),
            (Some(a), _) => format!("offered {a}"),
            (None, Some(b)) => format!("answered as a PXE server with boot file {b:?}"),
            (None, None) => "answered as a PXE server".to_string(),
        };
        format!("{who} {what}")
    };
    let wait = o.probe_wait.as_secs();
    let asked = format!("a DHCPDISCOVER from {mac} on {iface}");
    let itself = if ours.is_empty() { "" } else { " (fleetboot itself answered too)" };
    let address_servers: Vec<_> = others.iter().filter(|f| f.address.is_some()).collect();
    match c.dhcp.mode {
        DhcpMode::Server if !address_servers.is_empty() => out.push(Finding::error(
            CHECK,
            format!("another DHCP server answers on {iface}: {}", list(address_servers.iter().map(|f| describe(f)))),
            "set dhcp.mode = \"proxy\": that server keeps handing out addresses and fleetboot answers PXE clients only (ProxyDHCP); or stop that server on this segment",
        )),
        DhcpMode::Server => out.push(Finding::ok(CHECK, format!("no other DHCP server answered {asked} within {wait} s{itself}"))),
        DhcpMode::Proxy if address_servers.is_empty() => out.push(Finding::warning(
            CHECK,
            format!("no DHCP server answered {asked} within {wait} s: in proxy mode clients get their addresses from another server"),
            "start the site's DHCP server on this segment (or a relay to it), or set dhcp.mode = \"server\" for fleetboot to hand out addresses",
        )),
        DhcpMode::Proxy => out.push(Finding::ok(
            CHECK,
            format!("{} hands out addresses on {iface}; fleetboot adds boot information as ProxyDHCP{itself}", list(address_servers.iter().map(|f| describe(f)))),
        )),
        DhcpMode::Off => {}
    }
    let rival_pxe: Vec<_> = others.iter().filter(|f| f.pxe || f.boot_file.as_ref().is_some_and(|b| !b.is_empty())).collect();
    if !rival_pxe.is_empty() {
        out.push(Finding::warning(
            CHECK,
            format!("another server hands boot information to PXE clients on {iface}: {}", list(rival_pxe.iter().map(|f| describe(f)))),
            "a PXE ROM boots whichever answer it takes first: turn boot answers off on that server (dnsmasq: dhcp-boot, pxe-service; ISC/Kea: filename, next-server) or leave booting to it",
        ));
    }
}

fn root(c: &Config, user: Option<&Account>, out: &mut Vec<Finding>) {
    let r = &c.root;
    let fix_missing = format!("mkdir -p {} and put the boot files there, or point server.root at them", r.display());
    match std::fs::metadata(r) {
        Err(e) => out.push(Finding::error("root", format!("server.root {}: {e}", r.display()), fix_missing)),
        Ok(m) if !m.is_dir() => out.push(Finding::error("root", format!("server.root {} is not a directory", r.display()), fix_missing)),
        Ok(_) => match std::fs::read_dir(r) {
            Err(e) => out.push(Finding::error("root", format!("server.root {} cannot be listed: {e}", r.display()), format!("chmod a+rx {}", r.display()))),
            Ok(entries) => {
                if let Some(why) = user.and_then(|u| host::denied(u, r, Access::Read)) {
                    out.push(Finding::error("root", why, format!("chmod a+rx {} (the services run as {})", r.display(), user.map_or("", |u| u.name.as_str()))));
                } else {
                    out.push(Finding::ok("root", format!("server.root {} is readable ({} entries)", r.display(), entries.count())));
                }
            }
        },
    }
}

/// Where Debian puts a well-known boot file, and which package does.
fn debian_source(name: &str) -> Option<(&'static str, &'static str)> {
    let base = name.rsplit('/').next().unwrap_or(name);
    Some(match base {
        "undionly.kpxe" => ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        "ipxe.efi" => ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
        "snponly.efi" => ("/usr/lib/ipxe/snponly.efi", "ipxe"),
        "ipxe.pxe" => ("/usr/lib/ipxe/ipxe.pxe", "ipxe"),
        "shimx64.efi" => ("/usr/lib/shim/shimx64.efi.signed", "shim-signed"),
        "grubx64.efi" => ("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed", "grub-efi-amd64-signed"),
        "grubaa64.efi" => ("/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed", "grub-efi-arm64-signed"),
        "lpxelinux.0" => ("/usr/lib/PXELINUX/lpxelinux.0", "pxelinux"),
        "pxelinux.0" => ("/usr/lib/PXELINUX/pxelinux.0", "pxelinux"),
        "ldlinux.c32" => ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common"),
        _ => return None,
    })
}

fn fix_for_missing(name: &str, dest: &Path, key: &str) -> String {
    if name.ends_with("i386-pc/core.0") {
        return "grub-mknetdir --net-directory=ROOT --subdir=grub (package grub-pc-bin) writes it".replace("ROOT", &dest.display().to_string().replace(name, ""));
    }
    match debian_source(name) {
        Some((src, pkg)) if Path::new(src).exists() => format!("cp {src} {} (from Debian's {pkg})", dest.display()),
        Some((src, pkg)) => format!("apt install {pkg}, then cp {src} {}", dest.display()),
        None => format!("put the file at {}, or change {key}", dest.display()),
    }
}

/// A file a client will ask for: which firmware or profile, the config key, the path under
/// server.root.
struct BootFile {
    label: String,
    key: String,
    path: String,
}

fn configured_boot_files(c: &Config) -> Vec<BootFile> {
    let mut v = Vec::new();
    let fw = &c.pxe.firmware;
    for (label, key, path) in [
        ("BIOS", "pxe.bios", &fw.bios),
        ("UEFI x64", "pxe.uefi_x64", &fw.uefi_x64),
        ("UEFI ia32", "pxe.uefi_ia32", &fw.uefi_ia32),
        ("arm64 UEFI", "pxe.arm64", &fw.arm64),
        ("UEFI HTTP Boot", "pxe.uefi_http", &fw.uefi_http),
    ] {
        if let Some(p) = path {
            v.push(BootFile { label: label.into(), key: key.into(), path: p.clone() });
        }
    }
    for p in &c.profiles {
        let at = |what: &str| (format!("profile {:?} {what}", p.name), format!("profile {:?}: boot.{what}", p.name));
        match &p.boot {
            BootPlan::Linux { kernel, initrd, loader, .. } => {
                let (label, key) = at("kernel");
                v.push(BootFile { label, key, path: kernel.clone() });
                for (i, f) in initrd.iter().enumerate() {
                    let (label, key) = at(&format!("initrd[{i}]"));
                    v.push(BootFile { label, key, path: f.clone() });
                }
                if let Some(l) = loader {
                    let (label, key) = at("loader");
                    v.push(BootFile { label, key, path: l.clone() });
                    // What the loader itself fetches next from the same directory.
                    let sibling = |name: &str| match l.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{name}"),
                        None => name.to_string(),
                    };
                    let base = l.rsplit('/').next().unwrap_or(l);
                    let next = match base {
                        "shimx64.efi" => Some(("grubx64.efi", "shim loads it from its own directory")),
                        "lpxelinux.0" | "pxelinux.0" => Some(("ldlinux.c32", "PXELINUX loads it from its own directory")),
                        _ => None,
                    };
                    if let Some((name, why)) = next {
                        v.push(BootFile {
                            label: format!("profile {:?} loader's {name} ({why})", p.name),
                            key: format!("profile {:?}: boot.loader", p.name),
                            path: sibling(name),
                        });
                    }
                }
            }
            BootPlan::BootFile { path } => {
                let (label, key) = at("path");
                v.push(BootFile { label, key, path: path.clone() });
            }
            BootPlan::Script { .. } | BootPlan::Sanboot { .. } => {}
        }
    }
    v
}

fn boot_files(c: &Config, user: Option<&Account>, out: &mut Vec<Finding>) {
    let files = configured_boot_files(c);
    for f in &files {
        if f.path.contains("://") {
            out.push(Finding::ok("boot-file", format!("{}: {} is a URL, not checked", f.label, f.path)));
            continue;
        }
        let dest = c.root.join(f.path.trim_start_matches('/'));
        let shown = dest.display();
        match std::fs::metadata(&dest) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                out.push(Finding::error("boot-file", format!("{}: {shown} is missing ({})", f.label, f.key), fix_for_missing(&f.path, &dest, &f.key)))
            }
            Err(e) => out.push(Finding::error("boot-file", format!("{}: {shown}: {e}", f.label), "see the error above")),
            Ok(m) if !m.is_file() => out.push(Finding::error("boot-file", format!("{}: {shown} is not a file", f.label), format!("point {} at a file", f.key))),
            Ok(m) if m.len() == 0 => out.push(Finding::error(
                "boot-file",
                format!("{}: {shown} is empty", f.label),
                fix_for_missing(&f.path, &dest, &f.key),
            )),
            Ok(m) => {
                if let Err(e) = std::fs::File::open(&dest) {
                    out.push(Finding::error("boot-file", format!("{}: {shown} cannot be read: {e}", f.label), format!("chmod a+r {shown}")));
                } else if let Some(why) = user.and_then(|u| host::denied(u, &dest, Access::Read)) {
                    out.push(Finding::error(
                        "boot-file",
                        format!("{}: {why}", f.label),
                        format!("chmod a+r {shown} (and a+x on the directories above it)"),
                    ));
                } else {
                    out.push(Finding::ok("boot-file", format!("{}: {shown} ({} bytes)", f.label, m.len())));
                }
            }
        }
    }
    if c.dhcp.mode == DhcpMode::Off {
        return;
    }
    let fw = &c.pxe.firmware;
    let kinds = [("BIOS", &fw.bios), ("UEFI x64", &fw.uefi_x64), ("arm64 UEFI", &fw.arm64), ("UEFI HTTP Boot", &fw.uefi_http)];
    let (with, without): (Vec<_>, Vec<_>) = kinds.iter().partition(|(_, f)| f.is_some());
    let profile_boots = c.profiles.iter().any(|p| matches!(&p.boot, BootPlan::BootFile { .. } | BootPlan::Linux { loader: Some(_), .. }));
    if with.is_empty() && !profile_boots {
        out.push(Finding::warning(
            "firmware",
            "no firmware boot file is configured: PXE ROMs that are not iPXE are offered nothing to boot",
            "set [pxe] bios = \"undionly.kpxe\" and uefi_x64 = \"ipxe.efi\" (Debian's ipxe package has both), arm64 and uefi_http as your fleet needs",
        ));
    } else {
        let missing = match without.is_empty() {
            true => String::new(),
            false => format!(
                "; none for {} (those clients boot only through a profile's loader or boot file)",
                list(without.iter().map(|(k, _)| *k))
            ),
        };
        out.push(Finding::ok("firmware", format!("first boot files configured for {}{missing}", list(with.iter().map(|(k, _)| *k)))));
    }
}

/// `2026-04-14 09:30:00 UTC`.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_else(|e| -(e.duration().as_secs() as i64));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

fn clock(out: &mut Vec<Finding>) {
    let now = SystemTime::now();
    let built = std::env::current_exe().and_then(std::fs::metadata).and_then(|m| m.modified());
    if let Ok(built) = built {
        if now < built {
            out.push(Finding::error(
                "clock",
                format!("the system clock says {}, before this fleetboot binary was written ({})", utc(now), utc(built)),
                "set the clock (timedatectl set-ntp true, or chrony): leases expire at Unix times stored in the store, so a wrong clock ends or stretches every lease",
            ));
        }
    }
    match host::ntp_synchronized() {
        Some(true) => out.push(Finding::ok("clock", format!("synchronized to a time source; now {}", utc(now)))),
        Some(false) => out.push(Finding::warning(
            "clock",
            format!("the clock is not synchronized to a time source (now {})", utc(now)),
            "timedatectl set-ntp true (systemd-timesyncd) or install chrony: lease expiry and boot traces are wall-clock times",
        )),
        None => out.push(Finding::skipped("clock", "the kernel's synchronization state cannot be read")),
    }
}

/// `path`, or its closest ancestor that exists.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

fn data_dir(c: &Config, user: Option<&Account>, user_name: &str, out: &mut Vec<Finding>) {
    let d = &c.data_dir;
    let shown = d.display();
    let chown = format!("chown -R {user_name}:{user_name} {shown}");
    match std::fs::metadata(d) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = existing_ancestor(d).unwrap_or_else(|| PathBuf::from("/"));
            let denied = user.and_then(|u| host::denied(u, &parent, Access::Write));
            match denied {
                Some(why) => out.push(Finding::error(
                    "data-dir",
                    format!("data_dir {shown} does not exist, and {user_name} cannot create it: {why}"),
                    format!("mkdir -p {shown} && {chown}"),
                )),
                None => out.push(Finding::ok("data-dir", format!("data_dir {shown} does not exist yet: fleetboot creates it on first start"))),
            }
        }
        Err(e) => out.push(Finding::error("data-dir", format!("data_dir {shown}: {e}"), "see the error above")),
        Ok(m) if !m.is_dir() => out.push(Finding::error("data-dir", format!("data_dir {shown} is not a directory"), "point data_dir at a directory")),
        Ok(_) => {
            let probe = d.join(format!(".fleetboot-doctor-{}", std::process::id()));
            let written = std::fs::write(&probe, b"doctor").and_then(|()| std::fs::remove_file(&probe));
            let mut fine = true;
            if let Err(e) = written {
                fine = false;
                let fix = if e.raw_os_error() == Some(libc::EROFS) {
                    format!("{shown} is on a read-only filesystem: remount it read-write or move data_dir")
                } else {
                    chown.clone()
                };
                out.push(Finding::error("data-dir", format!("cannot write in data_dir {shown}: {e}"), fix));
            }
            if let Some(u) = user {
                let state = ["fleetboot.db", "fleetboot.db-wal", "fleetboot.db-shm", "images", "overlays"];
                let paths = std::iter::once(d.clone()).chain(state.iter().map(|s| d.join(s)));
                for p in paths.filter(|p| p.exists()) {
                    if let Some(why) = host::denied(u, &p, Access::Write) {
                        fine = false;
                        out.push(Finding::error(
                            "data-dir",
                            format!("{why} (was fleetboot run as another user here?)"),
                            format!("{chown}: the services run as {user_name}"),
                        ));
                    }
                }
            }
            if fine {
                out.push(Finding::ok("data-dir", format!("data_dir {shown} is writable{}", user.map(|u| format!(" by {}", u.name)).unwrap_or_default())));
            }
        }
    }
    let units_installed = ["/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system"]
        .iter()
        .any(|dir| Path::new(dir).join("fleetboot.service").exists());
    if units_installed && !d.starts_with(UNIT_STATE_DIR) {
        out.push(Finding::warning(
            "data-dir",
            format!("data_dir {shown} is outside {UNIT_STATE_DIR}, the only directory the fleetboot systemd units may write (ProtectSystem=strict)"),
            format!("keep data_dir = \"{UNIT_STATE_DIR}\", or add ReadWritePaths={shown} to each unit you run (systemctl edit fleetboot.service)"),
        ));
    }
    if let Some(at) = existing_ancestor(d) {
        match host::free_space(&at) {
            Ok((free, total)) => {
                let mib = free >> 20;
                let summary = format!("{} MiB free of {} MiB under {}", mib, total >> 20, at.display());
                let fix = "free space there or move data_dir: images, overlays and the store live in it";
                if mib < 100 {
                    out.push(Finding::error("disk-space", summary, fix));
                } else if mib < 1024 {
                    out.push(Finding::warning("disk-space", summary, fix));
                } else {
                    out.push(Finding::ok("disk-space", summary));
                }
            }
            Err(e) => out.push(Finding::skipped("disk-space", format!("cannot read free space under {}: {e}", at.display()))),
        }
    }
}

fn store(c: &Config, out: &mut Vec<Finding>) {
    let p = c.db_path();
    if !p.exists() {
        return out.push(Finding::ok("store", format!("{} does not exist yet: created on first start", p.display())));
    }
    match fleetboot_store::ReadOnlyStore::open(&p).and_then(|s| s.leases()) {
        Ok(leases) => out.push(Finding::ok("store", format!("{} opens ({} leases)", p.display(), leases.len()))),
        Err(e) => out.push(Finding::error(
            "store",
            format!("{} cannot be read: {e}", p.display()),
            format!(
                "if it is damaged, stop fleetboot and move it aside (mv {0} {0}.broken): a new store is created at start; its leases and API-made profiles are lost, clients renew their addresses",
                p.display()
            ),
        )),
    }
}

fn network(c: &Config, out: &mut Vec<Finding>) {
    if let (Some(name), Some((major, minor))) = (&c.interface, host::kernel_version()) {
        if (major, minor) < (5, 7) {
            out.push(Finding::warning(
                "network",
                format!("Linux {major}.{minor}: binding sockets to {name} (SO_BINDTODEVICE) needs CAP_NET_RAW before Linux 5.7, and the fleetboot units do not grant it"),
                "systemctl edit fleetboot.service: add CAP_NET_RAW to AmbientCapabilities= and CapabilityBoundingSet=",
            ));
        }
    }
    if c.dhcp.mode != DhcpMode::Off {
        if let Some(max) = host::sysctl_u64("net/core/rmem_max") {
            if max < DHCP_RECV_BUFFER {
                out.push(Finding::warning(
                    "network",
                    format!("net.core.rmem_max is {max}: the DHCP socket asks for {DHCP_RECV_BUFFER} bytes to queue a boot storm's burst, and the units do not grant CAP_NET_ADMIN to exceed the limit"),
                    format!("echo 'net.core.rmem_max = {DHCP_RECV_BUFFER}' > /etc/sysctl.d/60-fleetboot.conf && sysctl --system"),
                ));
            }
        }
    }
    if c.dhcp.mode == DhcpMode::Server {
        let forwarding = host::sysctl_u64("net/ipv4/ip_forward");
        for s in c.dhcp.subnets.iter().filter(|s| s.router == Some(c.address)) {
            if forwarding == Some(0) {
                out.push(Finding::warning(
                    "network",
                    format!("subnet {}/{} names this server ({}) as the clients' router, but net.ipv4.ip_forward = 0", s.network, s.prefix_len, c.address),
                    "booting works, but clients reach nothing beyond their subnet: set the subnet's router to the real gateway, or enable forwarding (sysctl net.ipv4.ip_forward=1, plus NAT if needed)",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_civil_time() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_776_159_000);
        assert_eq!(utc(t), "2026-04-14 09:30:00 UTC");
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn missing_boot_files_name_their_debian_package() {
        let dest = Path::new("/srv/fleetboot/undionly.kpxe");
        let fix = fix_for_missing("undionly.kpxe", dest, "pxe.bios");
        assert!(fix.contains("/usr/lib/ipxe/undionly.kpxe") && fix.contains("ipxe"), "{fix}");
        let fix = fix_for_missing("custom.bin", Path::new("/srv/fleetboot/custom.bin"), "pxe.bios");
        assert!(fix.contains("change pxe.bios"), "{fix}");
    }
}
