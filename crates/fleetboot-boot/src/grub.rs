//! GRUB configurations rendered per client from its boot plan, for GRUB network images:
//! Debian's signed `grubnetx64.efi` (loaded by shim under Secure Boot), its arm64 twin and
//! the i386-pc image `grub-mknetdir` builds.
//!
//! All of them read `$prefix/grub.cfg` with the prefix `/grub` on the server they were
//! loaded from. fleetboot answers that name with [`entry`], the same for every client: it
//! sends GRUB on to `$prefix/<its MAC>.cfg` ([`render`]), so the per-client file is found by
//! what GRUB itself knows, behind ProxyDHCP and relays as well as on a flat network.

use crate::identity::ClientIdentity;
use crate::ipxe::{linux_cmdline, RenderContext};
use crate::profile::BootPlan;

/// `grub/grub.cfg`: the configuration every GRUB network image reads first.
pub fn entry() -> String {
    "# fleetboot: each client reads its own configuration, named by its MAC address\n\
     if [ -n \"${net_default_mac}\" ]; then\n\
     \tconfigfile \"${prefix}/${net_default_mac}.cfg\"\n\
     fi\n\
     echo \"fleetboot: GRUB did not say which network interface it booted from\"\n\
     sleep 5\n\
     exit 1\n"
        .to_string()
}

/// A URL (`http://HOST[:PORT]/PATH`, `tftp://HOST/PATH`) as a GRUB file name,
/// `(http,HOST[:PORT])/PATH`. `None` for schemes GRUB cannot fetch.
pub fn grub_path(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "tftp") {
        return None;
    }
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, p),
        None => (rest, ""),
    };
    if host.is_empty() {
        return None;
    }
    Some(format!("({scheme},{host})/{path}"))
}

/// One word of a GRUB command line: quoted when GRUB's parser would otherwise change it
/// (`$`, quotes, `;`, braces, spaces ...). Inside single quotes nothing is special, and a
/// single quote itself is written `'\''`.
pub fn grub_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"._,:/=@+%-()".contains(&b));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

fn refuse(client: &ClientIdentity, why: &str) -> String {
    format!(
        "# fleetboot: {}\necho {}\nsleep 5\nexit 1\n",
        client.mac,
        grub_word(&format!("fleetboot: {why}"))
    )
}

/// The GRUB configuration of a client. `None` plan means no profile matched: GRUB says so
/// and exits, so the firmware moves on to its next boot option.
pub fn render(plan: Option<&BootPlan>, client: &ClientIdentity, ctx: &RenderContext) -> String {
    let file = |p: &str| {
        let url = match &ctx.tftp_url {
            Some(tftp) if !p.contains("://") => crate::ipxe::FileBase { url: tftp.clone() }.resolve(p),
            _ => ctx.files.resolve(p),
        };
        grub_path(&url).ok_or_else(|| format!("GRUB cannot fetch {url} (http:// and tftp:// only)"))
    };
    let head = format!("# fleetboot: {}, rendered from its boot profile\nset timeout=0\n", client.mac);
    match plan {
        None => refuse(client, &format!("no boot profile matches {}", client.mac)),
        Some(BootPlan::Linux { kernel, initrd, cmdline, disk, .. }) => {
            let cmdline = match linux_cmdline(cmdline, disk.as_ref(), client, ctx) {
                Ok(c) => c,
                Err(why) => return refuse(client, &why),
            };
            let kernel = match file(kernel) {
                Ok(k) => k,
                Err(why) => return refuse(client, &why),
            };
            let mut initrds = Vec::new();
            for i in initrd {
                match file(i) {
                    Ok(p) => initrds.push(p),
                    Err(why) => return refuse(client, &why),
                }
            }
            let mut s = head;
            s.push_str(&format!("echo {}\n", grub_word(&format!("fleetboot: loading {kernel}"))));
            let mut line = format!("linux {kernel}");
            for w in cmdline.split_whitespace() {
                line.push(' ');
                line.push_str(&grub_word(w));
            }
            // Stop at the first file that does not load (a signature refused under Secure
            // Boot, a missing initrd) instead of booting without it.
            s.push_str(&format!("if {line}; then\n"));
            if initrds.is_empty() {
                s.push_str("\tboot\n");
            } else {
                s.push_str(&format!("\tif initrd {}; then\n\t\tboot\n\tfi\n", initrds.join(" ")));
            }
            s.push_str("fi\n");
            s.push_str(&format!("echo {}\nsleep 5\nexit 1\n", grub_word("fleetboot: the kernel or an initrd did not load")));
            s
        }
        Some(BootPlan::BootFile { path }) => match file(path) {
            Ok(p) => format!("{head}chainloader {p}\nboot\n"),
            Err(why) => refuse(client, &why),
        },
        Some(BootPlan::Sanboot { image }) => {
            refuse(client, &format!("the profile boots disk image {image} with iPXE's sanboot, which GRUB cannot do"))
        }
        Some(BootPlan::Script { .. }) => refuse(client, "the profile is an iPXE script, which GRUB cannot run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipxe::FileBase;
    use crate::profile::{Disk, DiskOverlay};

    fn client() -> ClientIdentity {
        ClientIdentity { mac: "52:54:00:77:00:10".parse().unwrap(), ..Default::default() }
    }

    fn ctx(files: &str) -> RenderContext {
        RenderContext {
            files: FileBase { url: files.into() },
            http_url: Some("http://10.77.0.1:8080".into()),
            nbd_addr: Some("10.77.0.1:10809".into()),
            tftp_url: None,
            disk_capability: None,
        }
    }

    fn linux(cmdline: &str, disk: Option<Disk>) -> BootPlan {
        BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec!["initrd.gz".into(), "tftp://10.77.0.9/extra.img".into()],
            cmdline: cmdline.into(),
            disk,
            loader: Some("shimx64.efi".into()),
        }
    }

    #[test]
    fn linux_plan_over_http_and_tftp() {
        let plan = linux("console=ttyS0 id={mac_hyphen}", None);
        assert_eq!(
            render(Some(&plan), &client(), &ctx("http://10.77.0.1:8080/files")),
            "# fleetboot: 52:54:00:77:00:10, rendered from its boot profile\nset timeout=0\n\
             echo 'fleetboot: loading (http,10.77.0.1:8080)/files/vmlinuz'\n\
             if linux (http,10.77.0.1:8080)/files/vmlinuz console=ttyS0 id=52-54-00-77-00-10; then\n\
             \tif initrd (http,10.77.0.1:8080)/files/initrd.gz (tftp,10.77.0.9)/extra.img; then\n\t\tboot\n\tfi\nfi\n\
             echo 'fleetboot: the kernel or an initrd did not load'\nsleep 5\nexit 1\n"
        );
        let s = render(Some(&plan), &client(), &ctx("tftp://10.77.0.1"));
        assert!(s.contains("\nif linux (tftp,10.77.0.1)/vmlinuz console=ttyS0 "), "{s}");
        assert!(s.contains("\tif initrd (tftp,10.77.0.1)/initrd.gz (tftp,10.77.0.9)/extra.img; then\n"), "{s}");
        // With the TFTP service known, the served files come over TFTP even when iPXE
        // clients use HTTP: the GRUB images Debian signs cannot fetch http://.
        let both = RenderContext { tftp_url: Some("tftp://10.77.0.1".into()), ..ctx("http://10.77.0.1:8080/files") };
        let s = render(Some(&plan), &client(), &both);
        assert!(s.contains("\nif linux (tftp,10.77.0.1)/vmlinuz console=ttyS0 "), "{s}");
        assert!(s.contains("\tif initrd (tftp,10.77.0.1)/initrd.gz (tftp,10.77.0.9)/extra.img; then\n"), "{s}");
    }

    #[test]
    fn disks_and_words_grub_would_change() {
        let d = Disk { image: "root:2".into(), overlay: DiskOverlay::Client };
        let plan = linux("quiet msg=\"a b\" x=$y", Some(d));
        let s = render(Some(&plan), &client(), &ctx("tftp://10.77.0.1"));
        assert!(
            s.contains("vmlinuz quiet 'msg=\"a' 'b\"' 'x=$y' fleetboot.disk=nbd://10.77.0.1:10809/root:2@52-54-00-77-00-10; then\n"),
            "{s}"
        );
        assert_eq!(grub_word("it's"), "'it'\\''s'");
        let off = RenderContext { nbd_addr: None, ..ctx("tftp://10.77.0.1") };
        let s = render(Some(&plan), &client(), &off);
        assert!(s.contains("NBD service is off") && s.contains("exit 1") && !s.contains("linux "), "{s}");
    }

    #[test]
    fn what_grub_cannot_boot_is_refused_on_its_console() {
        for plan in [
            BootPlan::Sanboot { image: "win".into() },
            BootPlan::Script { script: "#!ipxe\nshell".into() },
            BootPlan::Linux { kernel: "nfs://x/k".into(), initrd: vec![], cmdline: String::new(), disk: None, loader: None },
        ] {
            let s = render(Some(&plan), &client(), &ctx("tftp://10.77.0.1"));
            assert!(s.contains("echo 'fleetboot: ") && s.ends_with("exit 1\n") && !s.contains("boot\n") && !s.contains("linux "), "{s}");
        }
        let s = render(None, &client(), &ctx("tftp://10.77.0.1"));
        assert!(s.contains("no boot profile matches 52:54:00:77:00:10"), "{s}");
        let s = render(Some(&BootPlan::BootFile { path: "memtest.efi".into() }), &client(), &ctx("tftp://10.77.0.1"));
        assert!(s.ends_with("chainloader (tftp,10.77.0.1)/memtest.efi\nboot\n"), "{s}");
    }

    #[test]
    fn the_entry_sends_grub_to_its_own_file() {
        let e = entry();
        assert!(e.contains("configfile \"${prefix}/${net_default_mac}.cfg\""), "{e}");
        assert_eq!(grub_path("http://h:81/a/b"), Some("(http,h:81)/a/b".into()));
        assert_eq!(grub_path("nbd://h/a"), None);
        assert_eq!(grub_path("vmlinuz"), None);
    }
}
