//! iPXE scripts rendered per client from its boot plan.

use crate::identity::ClientIdentity;
use crate::profile::BootPlan;

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
    match plan {
        None => format!("#!ipxe\necho fleetboot: no boot profile matches {}\nexit 1\n", client.mac),
        Some(BootPlan::Linux { kernel, initrd, cmdline }) => {
            let mut s = String::from("#!ipxe\n");
            let cmdline = expand(cmdline, client);
            s.push_str(&format!("kernel {} {}\n", base.resolve(kernel), cmdline).replace(" \n", "\n"));
            for i in initrd {
                s.push_str(&format!("initrd {}\n", base.resolve(i)));
            }
            s.push_str("boot\n");
            s
        }
        Some(BootPlan::BootFile { path }) => format!("#!ipxe\nchain {}\n", base.resolve(path)),
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
        };
        let base = FileBase { url: "http://10.77.0.1:8080/files/".into() };
        assert_eq!(
            render_script(Some(&plan), &c, &base),
            "#!ipxe\nkernel http://10.77.0.1:8080/files/vmlinuz console=ttyS0 id=52-54-00-77-00-10\n\
             initrd http://10.77.0.1:8080/files/initrd.gz\ninitrd http://other/x.img\nboot\n"
        );
    }

    #[test]
    fn no_profile_exits() {
        let s = render_script(None, &ClientIdentity::default(), &FileBase { url: "tftp://x".into() });
        assert!(s.starts_with("#!ipxe\n") && s.contains("exit 1"));
    }
}
