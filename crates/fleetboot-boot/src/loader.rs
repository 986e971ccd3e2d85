//! The configuration files boot loaders ask for, which fleetboot renders per client
//! instead of reading them from the served tree: the same names over TFTP and HTTP.

use crate::identity::{ClientIdentity, MacAddr};
use crate::ipxe::RenderContext;
use crate::profile::BootPlan;

/// A request for a boot loader's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigRequest {
    /// `grub/grub.cfg`: what every GRUB network image reads first ([`crate::grub::entry`]).
    GrubEntry,
    /// `grub/<mac>.cfg` (`52:54:00:77:00:10` or `52-54-00-...`): one client's GRUB config.
    Grub(MacAddr),
    /// `[DIR/]pxelinux.cfg/01-<mac-hyphen>`: one client's PXELINUX config (DIR is where its
    /// boot file sits; `01` is the Ethernet hardware type).
    Pxelinux(MacAddr),
}

impl ConfigRequest {
    /// The request a file name stands for, if any. Leading separators are ignored (GRUB
    /// asks for `/grub/grub.cfg`).
    pub fn parse(path: &str) -> Option<ConfigRequest> {
        let path = path.trim_start_matches(['/', '\\']);
        if path == "grub/grub.cfg" {
            return Some(ConfigRequest::GrubEntry);
        }
        if let Some(mac) = path.strip_prefix("grub/").and_then(|r| r.strip_suffix(".cfg")) {
            return mac.parse().ok().map(ConfigRequest::Grub);
        }
        let (dir, name) = path.rsplit_once('/')?;
        if dir == "pxelinux.cfg" || dir.ends_with("/pxelinux.cfg") {
            let mac = name.strip_prefix("01-")?;
            if mac.contains(':') {
                return None;
            }
            return mac.parse().ok().map(ConfigRequest::Pxelinux);
        }
        None
    }

    /// The client whose file this is, when the name says.
    pub fn mac(&self) -> Option<MacAddr> {
        match self {
            ConfigRequest::GrubEntry => None,
            ConfigRequest::Grub(m) | ConfigRequest::Pxelinux(m) => Some(*m),
        }
    }

    /// The file's content for `client` (whose MAC is [`ConfigRequest::mac`]) and its plan.
    pub fn render(&self, plan: Option<&BootPlan>, client: &ClientIdentity, ctx: &RenderContext) -> String {
        match self {
            ConfigRequest::GrubEntry => crate::grub::entry(),
            ConfigRequest::Grub(_) => crate::grub::render(plan, client, ctx),
            ConfigRequest::Pxelinux(_) => crate::pxelinux::render(plan, client, ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_loaders_ask_for() {
        let mac: MacAddr = "52:54:00:77:00:10".parse().unwrap();
        assert_eq!(ConfigRequest::parse("/grub/grub.cfg"), Some(ConfigRequest::GrubEntry));
        assert_eq!(ConfigRequest::parse("grub/grub.cfg"), Some(ConfigRequest::GrubEntry));
        assert_eq!(ConfigRequest::parse("/grub/52:54:00:77:00:10.cfg"), Some(ConfigRequest::Grub(mac)));
        assert_eq!(ConfigRequest::parse("grub/52-54-00-77-00-10.cfg"), Some(ConfigRequest::Grub(mac)));
        assert_eq!(ConfigRequest::parse("pxelinux.cfg/01-52-54-00-77-00-10"), Some(ConfigRequest::Pxelinux(mac)));
        assert_eq!(ConfigRequest::parse("bios/pxelinux.cfg/01-52-54-00-77-00-10"), Some(ConfigRequest::Pxelinux(mac)));
        for other in [
            "grub/x86_64-efi/grub.cfg",
            "grub/i386-pc/normal.mod",
            "grub/custom.cfg",
            "pxelinux.cfg/default",
            "pxelinux.cfg/0A4D0064",
            "pxelinux.cfg/6c2a0d1e-7e57-4b00-9000-000000000000",
            "pxelinux.cfg/01-52:54:00:77:00:10",
            "xpxelinux.cfg/01-52-54-00-77-00-10",
            "vmlinuz",
            "",
        ] {
            assert_eq!(ConfigRequest::parse(other), None, "{other}");
        }
    }
}
