//! Who is booting: the facts a client tells about itself in its DHCP request.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet hardware address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `52-54-00-77-00-10`: the form iPXE calls `${mac:hexhyp}`, safe in file names and URLs.
    pub fn hyphenated(&self) -> String {
        let b = self.0;
        format!("{:02x}-{:02x}-{:02x}-{:02x}-{:02x}-{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (want six hex octets separated by ':' or '-'): {0:?}")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(BadMac(s.to_string()));
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Client system architecture, from DHCP option 93 (RFC 4578 / IANA "Processor Architecture Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// 0: x86 BIOS (legacy PXE).
    Bios,
    /// 6: x86 UEFI (32-bit).
    UefiIa32,
    /// 7 and 9: x64 UEFI.
    UefiX64,
    /// 11: ARM 64-bit UEFI.
    Arm64,
    /// 16: x64 UEFI HTTP Boot (the firmware fetches a URL itself).
    UefiHttpX64,
    /// 19: ARM 64-bit UEFI HTTP Boot.
    UefiHttpArm64,
    /// Any other code; kept so a profile or trace can still name it.
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Arch {
        match code {
            0 => Arch::Bios,
            6 => Arch::UefiIa32,
            7 | 9 => Arch::UefiX64,
            11 => Arch::Arm64,
            16 => Arch::UefiHttpX64,
            19 => Arch::UefiHttpArm64,
            c => Arch::Other(c),
        }
    }

    pub fn code(&self) -> u16 {
        match self {
            Arch::Bios => 0,
            Arch::UefiIa32 => 6,
            Arch::UefiX64 => 7,
            Arch::Arm64 => 11,
            Arch::UefiHttpX64 => 16,
            Arch::UefiHttpArm64 => 19,
            Arch::Other(c) => *c,
        }
    }

    /// UEFI HTTP Boot clients need a URL as their boot file and `HTTPClient` in option 60.
    pub fn is_http_boot(&self) -> bool {
        matches!(self, Arch::UefiHttpX64 | Arch::UefiHttpArm64)
    }

    /// The name operators write in profiles (`bios`, `uefi-x64`, ...).
    pub fn name(&self) -> String {
        match self {
            Arch::Bios => "bios".into(),
            Arch::UefiIa32 => "uefi-ia32".into(),
            Arch::UefiX64 => "uefi-x64".into(),
            Arch::Arm64 => "arm64".into(),
            Arch::UefiHttpX64 => "uefi-http-x64".into(),
            Arch::UefiHttpArm64 => "uefi-http-arm64".into(),
            Arch::Other(c) => format!("arch-{c}"),
        }
    }

    pub fn from_name(s: &str) -> Option<Arch> {
        Some(match s {
            "bios" => Arch::Bios,
            "uefi-ia32" => Arch::UefiIa32,
            "uefi-x64" => Arch::UefiX64,
            "arm64" => Arch::Arm64,
            "uefi-http-x64" => Arch::UefiHttpX64,
            "uefi-http-arm64" => Arch::UefiHttpArm64,
            other => Arch::Other(other.strip_prefix("arch-")?.parse().ok()?),
        })
    }
}

/// Everything fleetboot knows about a booting client, gathered from its DHCP request
/// (and from the operator's client list, for `group`). Boot profiles match on it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub mac: MacAddr,
    /// Option 97 (client machine identifier), as the canonical UUID string.
    pub uuid: Option<String>,
    /// Option 93, when present.
    pub arch: Option<Arch>,
    /// Option 60 (vendor class), e.g. `PXEClient:Arch:00000:UNDI:002001`.
    pub vendor_class: Option<String>,
    /// Option 77 (user class), e.g. `iPXE`.
    pub user_class: Option<String>,
    /// Is the client iPXE already (option 77 `iPXE` or option 175 present)?
    pub is_ipxe: bool,
    /// Is the client PXE firmware (option 60 starting with `PXEClient` or `HTTPClient`)?
    pub is_pxe: bool,
    /// Operator-assigned group, from the client list in the config.
    pub group: Option<String>,
}

/// Renders the 16 bytes of option 97 (after its type byte) as a UUID string. PXE encodes
/// the first three fields little-endian (SMBIOS order), which is what QEMU's `-uuid` shows.
pub fn format_pxe_uuid(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn mac_round_trips(b in any::<[u8; 6]>()) {
            let m = MacAddr(b);
            prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
            prop_assert_eq!(m.hyphenated().parse::<MacAddr>().unwrap(), m);
        }

        #[test]
        fn arch_code_round_trips(c in any::<u16>()) {
            let a = Arch::from_code(c);
            prop_assert_eq!(Arch::from_code(a.code()), a);
            prop_assert_eq!(Arch::from_name(&a.name()), Some(a));
        }
    }

    #[test]
    fn bad_macs_are_refused() {
        for s in ["", "52:54:00:77:00", "52:54:00:77:00:1", "zz:54:00:77:00:10", "52:54:00:77:00:10:11"] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
    }
}
