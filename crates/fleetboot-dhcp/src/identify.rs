//! From a DHCP request to the [`ClientIdentity`] boot profiles match on.

use crate::codec::DhcpMessage;
use fleetboot_boot::{format_pxe_uuid, Arch, ClientIdentity};

/// Gathers what the client says about itself. `group` is left `None`: it comes from the
/// operator's client list, which the caller holds.
pub fn identify(msg: &DhcpMessage) -> ClientIdentity {
    let vendor_class = msg.vendor_class();
    let user_classes = msg.user_classes();
    let is_pxe = vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with("PXEClient") || v.starts_with("HTTPClient"));
    let is_ipxe = msg.has_ipxe_encap() || user_classes.iter().any(|c| c == "iPXE");
    ClientIdentity {
        mac: msg.mac(),
        uuid: msg.client_uuid().map(|u| format_pxe_uuid(&u)),
        arch: msg.client_arch().map(Arch::from_code),
        vendor_class,
        user_class: (!user_classes.is_empty()).then(|| user_classes.join(",")),
        is_ipxe,
        is_pxe,
        group: None,
    }
}

/// Does the client boot over HTTP (UEFI HTTP Boot), needing a URL and `HTTPClient` in option 60?
pub fn is_http_client(id: &ClientIdentity) -> bool {
    id.vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with("HTTPClient"))
        || id.arch.is_some_and(|a| a.is_http_boot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::opt;
    use fleetboot_boot::MacAddr;

    #[test]
    fn ipxe_firmware_request() {
        let mut m = DhcpMessage::default();
        m.set_mac(MacAddr([0x52, 0x54, 0, 0x77, 0, 0x10]));
        m.set_option(
            opt::VENDOR_CLASS,
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        );
        m.set_option(opt::CLIENT_ARCH, vec![0, 0]);
        m.set_option(opt::USER_CLASS, b"iPXE".to_vec());
        let mut uuid = vec![0];
        uuid.extend(1..=16u8);
        m.set_option(opt::CLIENT_UUID, uuid);
        let id = identify(&m);
        assert_eq!(id.mac.to_string(), "52:54:00:77:00:10");
        assert_eq!(id.arch, Some(Arch::Bios));
        assert!(id.is_pxe && id.is_ipxe);
        assert_eq!(id.user_class.as_deref(), Some("iPXE"));
        assert_eq!(
            id.uuid.as_deref(),
            Some("04030201-0605-0807-090a-0b0c0d0e0f10")
        );
        assert!(!is_http_client(&id));
    }

    #[test]
    fn plain_client() {
        let mut m = DhcpMessage::default();
        m.set_option(opt::VENDOR_CLASS, b"MSFT 5.0".to_vec());
        let id = identify(&m);
        assert!(!id.is_pxe && !id.is_ipxe && id.uuid.is_none() && id.arch.is_none());
        m.set_option(opt::IPXE_ENCAP, vec![]);
        assert!(identify(&m).is_ipxe);
        m.set_option(
            opt::VENDOR_CLASS,
            b"HTTPClient:Arch:00016:UNDI:003001".to_vec(),
        );
        let id = identify(&m);
        assert!(id.is_pxe && is_http_client(&id));
    }
}
