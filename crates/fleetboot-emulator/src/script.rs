//! The part of iPXE's script language a boot needs: which images to fetch.
//!
//! `kernel`/`imgfetch`/`module`/`initrd` fetch an image, `chain` fetches one and hands
//! control to it (if it is a script, it runs next), `boot` ends the script, `exit` ends it
//! without booting. Everything else (`echo`, `sleep`, `set`, `dhcp`, ...) is skipped.
//! `${mac}`, `${mac:hexhyp}`, `${ip}`, `${next-server}` and `${uuid}` are expanded; any
//! other variable fails the client (the emulator would fetch the wrong thing).

/// One image the script fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The script command (`kernel`, `initrd`, `chain`, ...).
    pub command: String,
    /// As written (after variable expansion); relative to the script's URL when it has no
    /// scheme.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    pub fetches: Vec<Fetch>,
    /// Set when the script ran `exit` before booting anything: its `echo` lines.
    pub exit: Option<String>,
    /// The last fetch was a `chain`: if that image is a script, it runs next.
    pub chains: bool,
}

/// Values for the variables a script may use.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    pub mac: String,
    pub mac_hyphen: String,
    pub ip: String,
    pub next_server: String,
    pub uuid: String,
}

/// Does this image look like an iPXE script?
pub fn is_script(data: &[u8]) -> bool {
    data.starts_with(b"#!ipxe")
}

fn expand(s: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated variable in {s:?}"))?;
        let name = &after[..end];
        let name = name.strip_prefix("net0/").unwrap_or(name);
        let name = name.strip_prefix("netX/").unwrap_or(name);
        out.push_str(match name {
            "mac" => &vars.mac,
            "mac:hexhyp" => &vars.mac_hyphen,
            "ip" => &vars.ip,
            "next-server" => &vars.next_server,
            "uuid" => &vars.uuid,
            other => return Err(format!("unsupported script variable ${{{other}}}")),
        });
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Options of the image commands that take a value (`--name NAME`, `--timeout MS`).
fn takes_value(opt: &str) -> bool {
    matches!(opt, "-n" | "--name" | "-t" | "--timeout")
}

pub fn parse(text: &str, vars: &Vars) -> Result<Script, String> {
    let mut script = Script::default();
    let mut echoes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(':') {
            continue;
        }
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or_default();
        match command {
            "kernel" | "imgfetch" | "fetch" | "module" | "initrd" | "chain" | "imgexec" => {
                let mut url = None;
                while let Some(w) = words.next() {
                    if w.starts_with('-') {
                        if takes_value(w) {
                            words.next();
                        }
                        continue;
                    }
                    url = Some(w);
                    break;
                }
                let url =
                    url.ok_or_else(|| format!("line {}: {command} without an image", n + 1))?;
                script.fetches.push(Fetch {
                    command: command.to_string(),
                    url: expand(url, vars).map_err(|e| format!("line {}: {e}", n + 1))?,
                });
                if matches!(command, "chain" | "imgexec") {
                    script.chains = true;
                    return Ok(script);
                }
            }
            "boot" | "imgboot" => return Ok(script),
            "exit" => {
                if script.fetches.is_empty() {
                    script.exit = Some(if echoes.is_empty() {
                        "the script exits without booting".into()
                    } else {
                        echoes.join(" / ")
                    });
                }
                return Ok(script);
            }
            "echo" => echoes.push(line["echo".len()..].trim().to_string()),
            _ => {}
        }
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars {
            mac: "02:fb:ee:00:00:01".into(),
            mac_hyphen: "02-fb-ee-00-00-01".into(),
            ip: "10.77.0.100".into(),
            next_server: "10.77.0.1".into(),
            uuid: "u".into(),
        }
    }

    #[test]
    fn fleetboot_linux_script() {
        let s = "#!ipxe\nkernel http://10.77.0.1:8080/files/vmlinuz console=ttyS0 id=02-fb\n\
                 initrd http://10.77.0.1:8080/files/initrd.gz\nboot\n";
        let p = parse(s, &vars()).unwrap();
        assert_eq!(
            p.fetches,
            [
                Fetch {
                    command: "kernel".into(),
                    url: "http://10.77.0.1:8080/files/vmlinuz".into()
                },
                Fetch {
                    command: "initrd".into(),
                    url: "http://10.77.0.1:8080/files/initrd.gz".into()
                }
            ]
        );
        assert!(!p.chains && p.exit.is_none());
    }

    #[test]
    fn options_variables_chain_and_exit() {
        let s = "#!ipxe\necho hi\ninitrd --name x -t 100 tftp://${next-server}/i-${mac:hexhyp}\n\
                 chain boot.ipxe\nkernel never\n";
        let p = parse(s, &vars()).unwrap();
        assert_eq!(p.fetches[0].url, "tftp://10.77.0.1/i-02-fb-ee-00-00-01");
        assert_eq!(p.fetches[1].url, "boot.ipxe");
        assert_eq!(p.fetches.len(), 2);
        assert!(p.chains);
        let p = parse(
            "#!ipxe\necho fleetboot: no boot profile matches x\nexit 1\n",
            &vars(),
        )
        .unwrap();
        assert_eq!(
            p.exit.as_deref(),
            Some("fleetboot: no boot profile matches x")
        );
        assert!(parse("kernel ${platform}/k", &vars()).is_err());
        assert!(parse("kernel --name", &vars()).is_err());
        assert!(is_script(b"#!ipxe\n") && !is_script(b"\x7fELF"));
    }
}
