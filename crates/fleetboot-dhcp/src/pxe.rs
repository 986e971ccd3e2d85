//! PXE vendor options (option 43 when option 60 is `PXEClient`, PXE spec 2.1 §2.4.5) and
//! iPXE's encapsulated option 175.

use crate::codec::{opt, DecodeError, DhcpMessage, MessageType};
use std::net::Ipv4Addr;
use std::time::Duration;

/// fleetboot's option 43 sub-option in a *wait packet* (a DHCPACK without a boot file from
/// a negotiator clearing a multicast group, `docs/protocols.md`): how long the client should wait
/// before asking again, in milliseconds (u32, big-endian). It sits in the vendor range of
/// option 43 (128-254): PXE ROMs that do not know it see an ACK without a boot file and
/// retransmit their REQUEST on their own schedule; fleetboot-aware clients wait as told.
pub const SUB_WAIT_MS: u8 = 0xB0;

/// How long a wait packet asks the client to wait; `None` for anything else (the real
/// answer, or a DHCPACK that is not a wait packet).
pub fn wait_period(m: &DhcpMessage) -> Option<Duration> {
    if m.message_type() != Some(MessageType::Ack) || !m.file.is_empty() {
        return None;
    }
    let p = PxeOptions::decode(m.option(opt::VENDOR_SPECIFIC)?).ok()?;
    let (_, v) = p.other.iter().find(|(c, _)| *c == SUB_WAIT_MS)?;
    let ms = u32::from_be_bytes(v.as_slice().try_into().ok()?);
    Some(Duration::from_millis(u64::from(ms)))
}

/// Option 43 sub-option codes.
pub mod sub {
    pub const MTFTP_IP: u8 = 1;
    pub const MTFTP_CPORT: u8 = 2;
    pub const MTFTP_SPORT: u8 = 3;
    pub const MTFTP_TMOUT: u8 = 4;
    pub const MTFTP_DELAY: u8 = 5;
    pub const DISCOVERY_CONTROL: u8 = 6;
    pub const DISCOVERY_MCAST_ADDR: u8 = 7;
    pub const BOOT_SERVERS: u8 = 8;
    pub const BOOT_MENU: u8 = 9;
    pub const MENU_PROMPT: u8 = 10;
    pub const BOOT_ITEM: u8 = 71;
    pub const END: u8 = 255;
}

/// Discovery control bits (sub-option 6).
pub mod discovery {
    /// Do not broadcast boot server discovery.
    pub const NO_BROADCAST: u8 = 1;
    /// Do not multicast boot server discovery.
    pub const NO_MULTICAST: u8 = 2;
    /// Only accept replies from servers in sub-option 8.
    pub const ONLY_LISTED: u8 = 4;
    /// A boot file in this offer is downloaded at once, without discovery or menu.
    pub const USE_BOOTFILE: u8 = 8;
}

/// Sub-option 8 entry: servers of one boot server type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootServer {
    pub server_type: u16,
    pub addrs: Vec<Ipv4Addr>,
}

/// Sub-option 9 entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuItem {
    pub server_type: u16,
    pub description: String,
}

/// Sub-option 10. `timeout` is seconds; 0 selects the first item at once, 255 waits for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuPrompt {
    pub timeout: u8,
    pub prompt: String,
}

/// Sub-option 71: which menu item (boot server type) and layer the client asks for or gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootItem {
    pub server_type: u16,
    pub layer: u16,
}

/// The PXE sub-options of option 43. Unknown sub-options are kept in `other`, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PxeOptions {
    pub mtftp_ip: Option<Ipv4Addr>,
    pub mtftp_client_port: Option<u16>,
    pub mtftp_server_port: Option<u16>,
    /// Seconds a client listens before opening an MTFTP transfer itself.
    pub mtftp_timeout: Option<u8>,
    /// Seconds a client waits before reopening an MTFTP transfer.
    pub mtftp_delay: Option<u8>,
    pub discovery_control: Option<u8>,
    pub discovery_mcast_addr: Option<Ipv4Addr>,
    pub boot_servers: Vec<BootServer>,
    pub boot_menu: Vec<MenuItem>,
    pub menu_prompt: Option<MenuPrompt>,
    pub boot_item: Option<BootItem>,
    pub other: Vec<(u8, Vec<u8>)>,
}

fn put(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    let n = value.len().min(255);
    out.push(code);
    out.push(n as u8);
    out.extend_from_slice(&value[..n]);
}

/// Appends items to a sub-option value while it stays within 255 bytes: a sub-option
/// cannot be longer, and dropping whole entries keeps the rest readable.
fn put_list<T>(out: &mut Vec<u8>, code: u8, items: &[T], enc: impl Fn(&T) -> Vec<u8>) {
    if items.is_empty() {
        return;
    }
    let mut value = Vec::new();
    for item in items {
        let e = enc(item);
        if value.len() + e.len() > 255 {
            break;
        }
        value.extend(e);
    }
    put(out, code, &value);
}

fn text(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(255)]
}

impl PxeOptions {
    /// Encodes the sub-options followed by the PXE end marker (255).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(ip) = self.mtftp_ip {
            put(&mut out, sub::MTFTP_IP, &ip.octets());
        }
        if let Some(p) = self.mtftp_client_port {
            put(&mut out, sub::MTFTP_CPORT, &p.to_be_bytes());
        }
        if let Some(p) = self.mtftp_server_port {
            put(&mut out, sub::MTFTP_SPORT, &p.to_be_bytes());
        }
        if let Some(t) = self.mtftp_timeout {
            put(&mut out, sub::MTFTP_TMOUT, &[t]);
        }
        if let Some(d) = self.mtftp_delay {
            put(&mut out, sub::MTFTP_DELAY, &[d]);
        }
        if let Some(c) = self.discovery_control {
            put(&mut out, sub::DISCOVERY_CONTROL, &[c]);
        }
        if let Some(ip) = self.discovery_mcast_addr {
            put(&mut out, sub::DISCOVERY_MCAST_ADDR, &ip.octets());
        }
        put_list(&mut out, sub::BOOT_SERVERS, &self.boot_servers, |s| {
            let addrs = &s.addrs[..s.addrs.len().min(63)];
            let mut e = s.server_type.to_be_bytes().to_vec();
            e.push(addrs.len() as u8);
            addrs.iter().for_each(|a| e.extend_from_slice(&a.octets()));
            e
        });
        put_list(&mut out, sub::BOOT_MENU, &self.boot_menu, |m| {
            let d = text(&m.description);
            let mut e = m.server_type.to_be_bytes().to_vec();
            e.push(d.len() as u8);
            e.extend_from_slice(d);
            e
        });
        if let Some(p) = &self.menu_prompt {
            let mut v = vec![p.timeout];
            v.extend_from_slice(text(&p.prompt));
            put(&mut out, sub::MENU_PROMPT, &v);
        }
        if let Some(b) = self.boot_item {
            let mut v = b.server_type.to_be_bytes().to_vec();
            v.extend_from_slice(&b.layer.to_be_bytes());
            put(&mut out, sub::BOOT_ITEM, &v);
        }
        for (code, v) in &self.other {
            if !matches!(*code, 0 | sub::END) {
                put(&mut out, *code, v);
            }
        }
        out.push(sub::END);
        out
    }

    /// Decodes option 43's value. Never panics; a sub-option whose length does not fit its
    /// type is an error rather than silently misread.
    pub fn decode(b: &[u8]) -> Result<PxeOptions, DecodeError> {
        let mut p = PxeOptions::default();
        let mut i = 0;
        while i < b.len() {
            let code = b[i];
            if code == 0 {
                i += 1;
                continue;
            }
            if code == sub::END {
                break;
            }
            let Some(&len) = b.get(i + 1) else {
                return Err(DecodeError::Truncated {
                    code,
                    needed: 1,
                    left: 0,
                });
            };
            let start = i + 2;
            let end = start + len as usize;
            let Some(v) = b.get(start..end) else {
                return Err(DecodeError::Truncated {
                    code,
                    needed: len as usize,
                    left: b.len() - start,
                });
            };
            let bad = || DecodeError::BadSubOption { code, len: v.len() };
            match code {
                sub::MTFTP_IP | sub::DISCOVERY_MCAST_ADDR => {
                    let ip: [u8; 4] = v.try_into().map_err(|_| bad())?;
                    if code == sub::MTFTP_IP {
                        p.mtftp_ip = Some(ip.into());
                    } else {
                        p.discovery_mcast_addr = Some(ip.into());
                    }
                }
                sub::MTFTP_CPORT | sub::MTFTP_SPORT => {
                    let port = u16::from_be_bytes(v.try_into().map_err(|_| bad())?);
                    if code == sub::MTFTP_CPORT {
                        p.mtftp_client_port = Some(port);
                    } else {
                        p.mtftp_server_port = Some(port);
                    }
                }
                sub::MTFTP_TMOUT | sub::MTFTP_DELAY | sub::DISCOVERY_CONTROL => {
                    let &[x] = v else { return Err(bad()) };
                    match code {
                        sub::MTFTP_TMOUT => p.mtftp_timeout = Some(x),
                        sub::MTFTP_DELAY => p.mtftp_delay = Some(x),
                        _ => p.discovery_control = Some(x),
                    }
                }
                sub::BOOT_SERVERS => {
                    let mut r = v;
                    while !r.is_empty() {
                        let [t0, t1, n, rest @ ..] = r else {
                            return Err(bad());
                        };
                        let need = *n as usize * 4;
                        if rest.len() < need {
                            return Err(bad());
                        }
                        let addrs = rest[..need]
                            .chunks_exact(4)
                            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                            .collect();
                        p.boot_servers.push(BootServer {
                            server_type: u16::from_be_bytes([*t0, *t1]),
                            addrs,
                        });
                        r = &rest[need..];
                    }
                }
                sub::BOOT_MENU => {
                    let mut r = v;
                    while !r.is_empty() {
                        let [t0, t1, n, rest @ ..] = r else {
                            return Err(bad());
                        };
                        let Some(desc) = rest.get(..*n as usize) else {
                            return Err(bad());
                        };
                        p.boot_menu.push(MenuItem {
                            server_type: u16::from_be_bytes([*t0, *t1]),
                            description: String::from_utf8_lossy(desc).into_owned(),
                        });
                        r = &rest[*n as usize..];
                    }
                }
                sub::MENU_PROMPT => {
                    let [timeout, prompt @ ..] = v else {
                        return Err(bad());
                    };
                    p.menu_prompt = Some(MenuPrompt {
                        timeout: *timeout,
                        prompt: String::from_utf8_lossy(prompt).into_owned(),
                    });
                }
                sub::BOOT_ITEM => {
                    let &[a, b, c, d] = v else { return Err(bad()) };
                    p.boot_item = Some(BootItem {
                        server_type: u16::from_be_bytes([a, b]),
                        layer: u16::from_be_bytes([c, d]),
                    });
                }
                _ => p.other.push((code, v.to_vec())),
            }
            i = end;
        }
        Ok(p)
    }
}

/// iPXE's encapsulated option 175 sub-option 176: "do not wait for ProxyDHCP offers".
pub const IPXE_NO_PXEDHCP: u8 = 176;

/// The value of option 175 as a server sends it to iPXE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpxeOptions {
    /// Sub-option 176 = 1: iPXE otherwise waits ~3 s for ProxyDHCP offers on every boot.
    pub no_pxedhcp: bool,
}

impl IpxeOptions {
    /// Encodes the sub-options the way dnsmasq's `encap:175` does (no end marker; iPXE
    /// stops at the end of the option).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.no_pxedhcp {
            out.extend_from_slice(&[IPXE_NO_PXEDHCP, 1, 1]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ip() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    prop_compose! {
        fn arb_pxe()(
            mtftp_ip in proptest::option::of(arb_ip()),
            mtftp_client_port in any::<Option<u16>>(),
            mtftp_server_port in any::<Option<u16>>(),
            mtftp_timeout in any::<Option<u8>>(),
            mtftp_delay in any::<Option<u8>>(),
            discovery_control in any::<Option<u8>>(),
            discovery_mcast_addr in proptest::option::of(arb_ip()),
            boot_servers in proptest::collection::vec(
                (any::<u16>(), proptest::collection::vec(arb_ip(), 0..5))
                    .prop_map(|(server_type, addrs)| BootServer { server_type, addrs }), 0..4),
            boot_menu in proptest::collection::vec(
                (any::<u16>(), "[ -~]{0,30}")
                    .prop_map(|(server_type, description)| MenuItem { server_type, description }), 0..4),
            menu_prompt in proptest::option::of((any::<u8>(), "[ -~]{0,60}")
                .prop_map(|(timeout, prompt)| MenuPrompt { timeout, prompt })),
            boot_item in proptest::option::of((any::<u16>(), any::<u16>())
                .prop_map(|(server_type, layer)| BootItem { server_type, layer })),
            other in proptest::collection::vec(
                ((11u8..=70).prop_union(72u8..=254), proptest::collection::vec(any::<u8>(), 0..40)), 0..3),
        ) -> PxeOptions {
            PxeOptions { mtftp_ip, mtftp_client_port, mtftp_server_port, mtftp_timeout,
                mtftp_delay, discovery_control, discovery_mcast_addr, boot_servers, boot_menu,
                menu_prompt, boot_item, other }
        }
    }

    proptest! {
        #[test]
        fn round_trips(p in arb_pxe()) {
            prop_assert_eq!(PxeOptions::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = PxeOptions::decode(&b);
        }
    }

    #[test]
    fn discovery_control_bytes() {
        let p = PxeOptions {
            discovery_control: Some(discovery::USE_BOOTFILE),
            ..Default::default()
        };
        assert_eq!(p.encode(), [6, 1, 8, 255]);
    }

    #[test]
    fn oversized_lists_drop_whole_entries() {
        let p = PxeOptions {
            boot_menu: (0..20)
                .map(|i| MenuItem {
                    server_type: i,
                    description: "x".repeat(20),
                })
                .collect(),
            ..Default::default()
        };
        let back = PxeOptions::decode(&p.encode()).unwrap();
        assert_eq!(back.boot_menu.len(), 255 / 23);
        assert_eq!(back.boot_menu[..], p.boot_menu[..back.boot_menu.len()]);
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(PxeOptions::decode(&[6, 2, 8, 8, 255]).is_err());
        assert!(PxeOptions::decode(&[8, 3, 0, 1, 2]).is_err());
        assert!(PxeOptions::decode(&[71, 9, 0]).is_err());
    }

    #[test]
    fn ipxe_no_pxedhcp() {
        assert_eq!(IpxeOptions { no_pxedhcp: true }.encode(), [176, 1, 1]);
    }
}
