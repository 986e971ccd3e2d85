//! Interfaces by name, index and address (`getifaddrs(3)`).

use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A network interface of this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its index (what `SO_BINDTODEVICE` by index, `ip_mreqn` and IPv6 scopes use).
    pub index: u32,
    /// Its IPv4 addresses, primary first.
    pub ipv4: Vec<Ipv4Addr>,
    /// Its IPv6 addresses.
    pub ipv6: Vec<Ipv6Addr>,
}

impl Interface {
    /// The first (primary) IPv4 address, if it has one.
    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4.first().copied()
    }

    /// Whether `addr` is one of its addresses.
    pub fn has(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4.contains(&a),
            IpAddr::V6(a) => self.ipv6.contains(&a),
        }
    }
}

/// Every interface of this network namespace, in the kernel's order, with its addresses.
pub fn interfaces() -> io::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, valid until freeifaddrs;
        // ifa_name is a NUL-terminated string; ifa_addr, when non-null, points to a
        // sockaddr whose family says which sockaddr_* it is.
        let (name, addr) = unsafe {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let addr = if ifa.ifa_addr.is_null() {
                None
            } else {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            (name, addr)
        };
        let i = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                let index = interface_index(&name).unwrap_or(0);
                out.push(Interface { name, index, ipv4: Vec::new(), ipv6: Vec::new() });
                out.len() - 1
            }
        };
        match addr {
            Some(IpAddr::V4(a)) if !out[i].ipv4.contains(&a) => out[i].ipv4.push(a),
            Some(IpAddr::V6(a)) if !out[i].ipv6.contains(&a) => out[i].ipv6.push(a),
            _ => {}
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface named `spec` (`eth0`), or the one that has the address `spec`.
pub fn interface(spec: &str) -> io::Result<Interface> {
    let all = interfaces()?;
    let found = match spec.parse::<IpAddr>() {
        Ok(a) => all.into_iter().find(|i| i.has(a)),
        Err(_) => all.into_iter().find(|i| i.name == spec),
    };
    found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {spec:?}")))
}

/// The index of the interface named `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} holds a NUL")))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface named {name:?}"))),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_by_name_by_address_and_index() {
        let lo = interface("lo").unwrap();
        assert!(lo.index > 0);
        assert_eq!(lo.first_ipv4(), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(interface("127.0.0.1").unwrap().name, "lo");
        assert_eq!(interface_index("lo").unwrap(), lo.index);
        assert!(interfaces().unwrap().iter().any(|i| i.name == "lo"));
        assert_eq!(interface("no-such-if0").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(interface_index("no-such-if0").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(interface_index("a\0b").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
