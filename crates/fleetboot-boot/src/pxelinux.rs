//! PXELINUX configurations rendered per client from its boot plan.
//!
//! PXELINUX (`pxelinux.0`, or `lpxelinux.0`, which also fetches `http://` URLs) looks for
//! `pxelinux.cfg/<uuid>`, then `pxelinux.cfg/01-<mac-hyphen>`, then names made from its IP
//! address, then `pxelinux.cfg/default`, next to its own boot file. fleetboot answers the
//! `01-<mac>` name ([`crate::loader::ConfigRequest::Pxelinux`]) with [`render`].

use crate::identity::ClientIdentity;
use crate::ipxe::{linux_cmdline, RenderContext};
use crate::profile::BootPlan;

/// A plan's file as PXELINUX names it: a URL as is (lpxelinux.0 fetches `http://`), a file
/// on this TFTP server as `::PATH` (from the top of the served tree, wherever the boot file
/// itself sits).
pub fn pxelinux_path(ctx: &RenderContext, path: &str) -> String {
    let url = ctx.files.resolve(path);
    match url.strip_prefix("tftp://").and_then(|r| r.split_once('/')) {
        Some((_, p)) if ctx.files.url.starts_with("tftp://") && !path.contains("://") => format!("::{p}"),
        _ => url,
    }
}

fn refuse(client: &ClientIdentity, why: &str) -> String {
    // LOCALBOOT -1 hands control back to the firmware, which tries its next boot device.
    let why = why.replace(['\n', '\r'], " ");
    format!(
        "# fleetboot: {}\nSAY fleetboot: {why}\nDEFAULT fleetboot-refused\nPROMPT 0\nTIMEOUT 0\n\
         LABEL fleetboot-refused\n  LOCALBOOT -1\n",
        client.mac
    )
}

/// The PXELINUX configuration of a client. `None` plan means no profile matched.
pub fn render(plan: Option<&BootPlan>, client: &ClientIdentity, ctx: &RenderContext) -> String {
    let head = format!(
        "# fleetboot: {}, rendered from its boot profile\nDEFAULT fleetboot\nPROMPT 0\nTIMEOUT 0\n\
         LABEL fleetboot\n",
        client.mac
    );
    match plan {
        None => refuse(client, &format!("no boot profile matches {}", client.mac)),
        Some(BootPlan::Linux { kernel, initrd, cmdline, disk, .. }) => {
            let cmdline = match linux_cmdline(cmdline, disk.as_ref(), client, ctx) {
                Ok(c) => c,
                Err(why) => return refuse(client, &why),
            };
            let mut s = head;
            s.push_str(&format!("  KERNEL {}\n", pxelinux_path(ctx, kernel)));
            if !initrd.is_empty() {
                let list: Vec<String> = initrd.iter().map(|i| pxelinux_path(ctx, i)).collect();
                s.push_str(&format!("  INITRD {}\n", list.join(",")));
            }
            if !cmdline.is_empty() {
                s.push_str(&format!("  APPEND {cmdline}\n"));
            }
            s
        }
        Some(BootPlan::BootFile { path }) => format!("{head}  KERNEL {}\n", pxelinux_path(ctx, path)),
        Some(BootPlan::Sanboot { image }) => {
            refuse(client, &format!("the profile boots disk image {image} with iPXE's sanboot, which PXELINUX cannot do"))
        }
        Some(BootPlan::Script { .. }) => refuse(client, "the profile is an iPXE script, which PXELINUX cannot run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipxe::FileBase;

    fn client() -> ClientIdentity {
        ClientIdentity { mac: "52:54:00:77:00:10".parse().unwrap(), ..Default::default() }
    }

    fn ctx(files: &str) -> RenderContext {
        RenderContext { files: FileBase { url: files.into() }, http_url: None, nbd_addr: None, tftp_url: None, disk_capability: None }
    }

    fn plan() -> BootPlan {
        BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec!["initrd.gz".into(), "http://10.77.0.9/extra.img".into()],
            cmdline: "console=ttyS0 id={mac_hyphen}".into(),
            disk: None,
            loader: Some("lpxelinux.0".into()),
        }
    }

    #[test]
    fn linux_plan_over_http_and_tftp() {
        assert_eq!(
            render(Some(&plan()), &client(), &ctx("http://10.77.0.1:8080/files")),
            "# fleetboot: 52:54:00:77:00:10, rendered from its boot profile\nDEFAULT fleetboot\nPROMPT 0\n\
             TIMEOUT 0\nLABEL fleetboot\n  KERNEL http://10.77.0.1:8080/files/vmlinuz\n\
             \x20 INITRD http://10.77.0.1:8080/files/initrd.gz,http://10.77.0.9/extra.img\n\
             \x20 APPEND console=ttyS0 id=52-54-00-77-00-10\n"
        );
        let s = render(Some(&plan()), &client(), &ctx("tftp://10.77.0.1"));
        assert!(s.contains("  KERNEL ::vmlinuz\n  INITRD ::initrd.gz,http://10.77.0.9/extra.img\n"), "{s}");
    }

    #[test]
    fn what_pxelinux_cannot_boot_goes_back_to_the_firmware() {
        for p in [Some(BootPlan::Sanboot { image: "w".into() }), Some(BootPlan::Script { script: "#!ipxe".into() }), None] {
            let s = render(p.as_ref(), &client(), &ctx("tftp://10.77.0.1"));
            assert!(s.contains("SAY fleetboot: ") && s.contains("LOCALBOOT -1") && !s.contains("KERNEL"), "{s}");
        }
        let s = render(Some(&BootPlan::BootFile { path: "memtest.0".into() }), &client(), &ctx("tftp://10.77.0.1"));
        assert!(s.ends_with("  KERNEL ::memtest.0\n"), "{s}");
    }
}
