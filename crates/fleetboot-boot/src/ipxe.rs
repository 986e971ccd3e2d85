//! iPXE scripts rendered per client from its boot plan.

use crate::identity::{Arch, ClientIdentity};
use crate::profile::{BootPlan, Disk};

/// Where the client fetches files named by a relative path in its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBase {
    /// `http://10.77.0.1:8080/files` or `tftp://10.77.0.1`.
    pub url: String,
}

impl FileBase {
    pub fn resolve(&self, path: &str) -> String {
        if path.contains("://") {
            path.to_string()
        } else {
            format!("{}/{}", self.url.trim_end_matches('/'), path)
        }
    }
}

/// Everything rendering needs to know about the server: where files come from, and the
/// services a plan's disk is reached through. Filled by the server from its config; no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderContext {
    pub files: FileBase,
    /// `http://10.77.0.1:8080` when the HTTP service runs (sanboot reads `/images/NAME`).
    pub http_url: Option<String>,
    /// `10.77.0.1:10809` when the NBD service runs (a Linux plan's `disk`).
    pub nbd_addr: Option<String>,
    /// `tftp://10.77.0.1` when the TFTP service runs: GRUB fetches the plan's files from
    /// there, whatever `files` says (the network images Debian signs have no HTTP).
    pub tftp_url: Option<String>,
    /// The capability a client's own disk export carries (`IMAGE@MAC~CAPABILITY`), when
    /// this rendering is for that client alone and its address proves nothing to the NBD
    /// service (ProxyDHCP: another server hands out the addresses). Never set for
    /// renderings anyone may fetch.
    pub disk_capability: Option<String>,
}

impl RenderContext {
    /// Files only: plans that need HTTP images or NBD render an error script.
    pub fn files_only(files: FileBase) -> RenderContext {
        RenderContext { files, http_url: None, nbd_addr: None, tftp_url: None, disk_capability: None }
    }
}

/// The NBD URL of a plan's disk for a client: `nbd://ADDR:PORT/IMAGE@MAC` (or `/IMAGE`
/// for a shared, read-only disk).
pub fn disk_url(disk: &Disk, client: &ClientIdentity, nbd_addr: &str) -> String {
    format!("nbd://{nbd_addr}/{}", disk.export_for(&client.mac))
}

/// The export name a client opens its disk with: [`Disk::export_for`], and for the
/// client's own overlay the capability of `ctx` after the MAC (`IMAGE@MAC~CAPABILITY`).
/// A shared, read-only disk is a catalog image and carries none.
pub fn disk_export(disk: &Disk, client: &ClientIdentity, ctx: &RenderContext) -> String {
    let export = disk.export_for(&client.mac);
    match (&disk.overlay, &ctx.disk_capability) {
        (crate::profile::DiskOverlay::Client, Some(cap)) => format!("{export}~{cap}"),
        _ => export,
    }
}

fn refuse(why: &str) -> String {
    format!("#!ipxe\necho fleetboot: {why}\nexit 1\n")
}

/// Expands the placeholders an operator may use in a command line or script:
/// `{mac}` (52:54:00:..), `{mac_hyphen}` (52-54-00-..), `{uuid}`, `{arch}`, `{group}`.
pub fn expand(template: &str, c: &ClientIdentity) -> String {
    template
        .replace("{mac}", &c.mac.to_string())
        .replace("{mac_hyphen}", &c.mac.hyphenated())
        .replace("{uuid}", c.uuid.as_deref().unwrap_or(""))
        .replace("{arch}", &c.arch.map(|a| a.name()).unwrap_or_default())
        .replace("{group}", c.group.as_deref().unwrap_or(""))
}

/// The iPXE script for a client. `None` plan means no profile matched: the script says so
/// on the client's console and exits, so the firmware moves on to its next boot device.
pub fn render_script(plan: Option<&BootPlan>, client: &ClientIdentity, base: &FileBase) -> String {
    render(plan, client, &RenderContext::files_only(base.clone()))
}

/// The kernel command line of a Linux plan for a client: placeholders expanded and, with
/// a `disk`, `fleetboot.disk=nbd://ADDR:PORT/EXPORT` appended unless the command line
/// places `{disk_url}` (or `{disk_export}`, the bare export name) itself. `Err` says why the
/// plan cannot boot (the NBD service is off). Shared by every boot loader's renderer.
pub fn linux_cmdline(cmdline: &str, disk: Option<&Disk>, client: &ClientIdentity, ctx: &RenderContext) -> Result<String, String> {
    let mut cmdline = expand(cmdline, client);
    if let Some(d) = disk {
        let Some(nbd) = &ctx.nbd_addr else {
            return Err(format!("the profile attaches disk {} but the NBD service is off", d.image));
        };
        let export = disk_export(d, client, ctx);
        let url = format!("nbd://{nbd}/{export}");
        if cmdline.contains("{disk_url}") || cmdline.contains("{disk_export}") {
            cmdline = cmdline.replace("{disk_url}", &url).replace("{disk_export}", &export);
        } else {
            cmdline = format!("{cmdline} fleetboot.disk={url}").trim_start().to_string();
        }
    }
    Ok(cmdline)
}

/// Whether the client is UEFI firmware (or iPXE running on it): its kernel's EFI stub may
/// only find initrds that the command line names.
pub fn is_efi(client: &ClientIdentity) -> bool {
    client.arch.is_some_and(|a| a != Arch::Bios)
}

/// The names iPXE registers a plan's initrds under: the last path segment of each, made
/// unique with an index prefix when two share one.
pub fn initrd_names(initrd: &[String]) -> Vec<String> {
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let names: Vec<String> = initrd.iter().map(|p| base(p)).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let clash = n.is_empty() || names.iter().filter(|m| *m == n).count() > 1;
            if clash { format!("{i}-{n}") } else { n.clone() }
        })
        .collect()
}

/// [`render_script`] with the server's services known. A Linux plan's command line comes
/// from [`linux_cmdline`]. For UEFI clients each initrd is named on the kernel command line
/// (`initrd=NAME`): the kernel's EFI stub, loaded by iPXE builds without the LoadFile2
/// initrd protocol (Debian's 2019 build), finds an initrd only that way; with newer builds
/// the stub takes LoadFile2 first and the names are harmless.
pub fn render(plan: Option<&BootPlan>, client: &ClientIdentity, ctx: &RenderContext) -> String {
    let base = &ctx.files;
    match plan {
        None => refuse(&format!("no boot profile matches {}", client.mac)),
        Some(BootPlan::Linux { kernel, initrd, cmdline, disk, .. }) => {
            let mut cmdline = match linux_cmdline(cmdline, disk.as_ref(), client, ctx) {
                Ok(c) => c,
                Err(why) => return refuse(&why),
            };
            let names = initrd_names(initrd);
            if is_efi(client) && !initrd.is_empty() {
                let named: Vec<String> = names.iter().map(|n| format!("initrd={n}")).collect();
                cmdline = format!("{} {cmdline}", named.join(" ")).trim_end().to_string();
            }
            let mut s = String::from("#!ipxe\n");
            s.push_str(&format!("kernel {} {}\n", base.resolve(kernel), cmdline).replace(" \n", "\n"));
            for (i, name) in initrd.iter().zip(&names) {
                let url = base.resolve(i);
                if url.rsplit('/').next() == Some(name.as_str()) {
                    s.push_str(&format!("initrd {url}\n"));
                } else {
                    s.push_str(&format!("initrd --name {name} {url}\n"));
                }
            }
            s.push_str("boot\n");
            s
        }
        Some(BootPlan::BootFile { path }) => format!("#!ipxe\nchain {}\n", base.resolve(path)),
        Some(BootPlan::Sanboot { image }) => match &ctx.http_url {
            Some(http) => format!("#!ipxe\nsanboot {}/images/{image}\n", http.trim_end_matches('/')),
            None => refuse(&format!("sanboot of {image} needs the HTTP service")),
        },
        Some(BootPlan::Script { script }) => {
            let mut s = expand(script, client);
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_plan_renders_urls_and_placeholders() {
        let c = ClientIdentity { mac: "52:54:00:77:00:10".parse().unwrap(), ..Default::default() };
        let plan = BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec!["initrd.gz".into(), "http://other/x.img".into()],
            cmdline: "console=ttyS0 id={mac_hyphen}".into(),
            disk: None,
            loader: None,
        };
        let base = FileBase { url: "http://10.77.0.1:8080/files/".into() };
        assert_eq!(
            render_script(Some(&plan), &c, &base),
            "#!ipxe\nkernel http://10.77.0.1:8080/files/vmlinuz console=ttyS0 id=52-54-00-77-00-10\n\
             initrd http://10.77.0.1:8080/files/initrd.gz\ninitrd http://other/x.img\nboot\n"
        );
    }

    fn ctx() -> RenderContext {
        RenderContext {
            files: FileBase { url: "http://10.77.0.1:8080/files".into() },
            http_url: Some("http://10.77.0.1:8080".into()),
            nbd_addr: Some("10.77.0.1:10809".into()),
            tftp_url: None,
            disk_capability: None,
        }
    }

    #[test]
    fn a_disk_lands_on_the_kernel_command_line() {
        use crate::profile::DiskOverlay;
        let c = ClientIdentity { mac: "52:54:00:77:00:10".parse().unwrap(), ..Default::default() };
        let plan = |cmdline: &str, overlay| BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec![],
            cmdline: cmdline.into(),
            disk: Some(Disk { image: "root:2".into(), overlay }),
            loader: None,
        };
        assert_eq!(
            render(Some(&plan("console=ttyS0", DiskOverlay::Client)), &c, &ctx()),
            "#!ipxe\nkernel http://10.77.0.1:8080/files/vmlinuz console=ttyS0 \
             fleetboot.disk=nbd://10.77.0.1:10809/root:2@52-54-00-77-00-10\nboot\n"
        );
        let s = render(Some(&plan("", DiskOverlay::Shared)), &c, &ctx());
        assert!(s.contains("vmlinuz fleetboot.disk=nbd://10.77.0.1:10809/root:2\n"), "{s}");
        let s = render(Some(&plan("root=/dev/nbd0 nbdroot={disk_url} x={disk_export}", DiskOverlay::Client)), &c, &ctx());
        assert!(
            s.contains("nbdroot=nbd://10.77.0.1:10809/root:2@52-54-00-77-00-10 x=root:2@52-54-00-77-00-10\n"),
            "{s}"
        );
        assert!(!s.contains("fleetboot.disk="), "{s}");
        // Without the NBD service the client is told why instead of booting diskless.
        let s = render(Some(&plan("", DiskOverlay::Client)), &c, &RenderContext { nbd_addr: None, ..ctx() });
        assert!(s.contains("NBD service is off") && s.contains("exit 1"), "{s}");
    }

    #[test]
    fn a_clients_own_disk_carries_the_capability_it_was_rendered_with() {
        use crate::profile::DiskOverlay;
        let c = ClientIdentity { mac: "52:54:00:77:00:10".parse().unwrap(), ..Default::default() };
        let plan = |cmdline: &str, overlay| BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec![],
            cmdline: cmdline.into(),
            disk: Some(Disk { image: "root:2".into(), overlay }),
            loader: None,
        };
        let with_cap = RenderContext { disk_capability: Some("1800000000.abc_-".into()), ..ctx() };
        let s = render(Some(&plan("", DiskOverlay::Client)), &c, &with_cap);
        assert!(s.contains(" fleetboot.disk=nbd://10.77.0.1:10809/root:2@52-54-00-77-00-10~1800000000.abc_-\n"), "{s}");
        let s = render(Some(&plan("nbdroot={disk_url} x={disk_export}", DiskOverlay::Client)), &c, &with_cap);
        assert!(
            s.contains("nbdroot=nbd://10.77.0.1:10809/root:2@52-54-00-77-00-10~1800000000.abc_- x=root:2@52-54-00-77-00-10~1800000000.abc_-\n"),
            "{s}"
        );
        // A catalog image is no client's own: no capability rides on it.
        let s = render(Some(&plan("", DiskOverlay::Shared)), &c, &with_cap);
        assert!(s.contains("fleetboot.disk=nbd://10.77.0.1:10809/root:2\n"), "{s}");
    }

    #[test]
    fn sanboot_reads_the_image_over_http() {
        let c = ClientIdentity::default();
        let plan = BootPlan::Sanboot { image: "win11:3".into() };
        assert_eq!(render(Some(&plan), &c, &ctx()), "#!ipxe\nsanboot http://10.77.0.1:8080/images/win11:3\n");
        let s = render(Some(&plan), &c, &RenderContext::files_only(FileBase { url: "tftp://x".into() }));
        assert!(s.contains("needs the HTTP service") && s.contains("exit 1"), "{s}");
    }

    #[test]
    fn efi_clients_get_their_initrds_named_on_the_command_line() {
        let plan = BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec!["initrd.gz".into(), "a/extra.img".into(), "b/extra.img".into()],
            cmdline: "console=ttyS0".into(),
            disk: None,
            loader: None,
        };
        let base = FileBase { url: "tftp://10.77.0.1".into() };
        let efi = ClientIdentity { arch: Some(Arch::UefiX64), ..Default::default() };
        assert_eq!(
            render_script(Some(&plan), &efi, &base),
            "#!ipxe\nkernel tftp://10.77.0.1/vmlinuz initrd=initrd.gz initrd=1-extra.img initrd=2-extra.img console=ttyS0\n\
             initrd tftp://10.77.0.1/initrd.gz\ninitrd --name 1-extra.img tftp://10.77.0.1/a/extra.img\n\
             initrd --name 2-extra.img tftp://10.77.0.1/b/extra.img\nboot\n"
        );
        // BIOS (and a client whose architecture is unknown) boot as before.
        for c in [ClientIdentity { arch: Some(Arch::Bios), ..Default::default() }, ClientIdentity::default()] {
            let s = render_script(Some(&plan), &c, &base);
            assert!(s.starts_with("#!ipxe\nkernel tftp://10.77.0.1/vmlinuz console=ttyS0\n"), "{s}");
            assert!(!s.contains("initrd="), "{s}");
        }
        let arm = ClientIdentity { arch: Some(Arch::Arm64), ..Default::default() };
        assert!(render_script(Some(&plan), &arm, &base).contains(" initrd=initrd.gz "));
    }

    #[test]
    fn no_profile_exits() {
        let s = render_script(None, &ClientIdentity::default(), &FileBase { url: "tftp://x".into() });
        assert!(s.starts_with("#!ipxe\n") && s.contains("exit 1"));
    }
}
