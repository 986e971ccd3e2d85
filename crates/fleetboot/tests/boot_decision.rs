//! Every service makes the same boot decision for a client: the boot file in its DHCP ACK,
//! the script TFTP serves as `boot/<mac>.ipxe` and the script HTTP serves at
//! `/boot/<mac>.ipxe` all follow the one profile its identity (MAC, architecture, iPXE or
//! not, group) selects — over real UDP and TCP on loopback against `fleetboot serve`'s
//! services running in this process, with the script fetched both ways after DHCP (from the
//! address the client leased: scripts go to their client only) and, with
//! `pxe.transport = "tftp"`, the ACK pointing at TFTP instead of HTTP.
//!
//! Each profile renders a marker naming itself and the identity it was rendered for
//! (`arch={arch} group={group}`), so a service that selected with a different identity
//! (say, without the architecture DHCP saw) shows up as a different marker or profile.

mod loopback;

use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::ClientConfig;
use loopback::Loopback;

const SECTIONS: &str = r##"
[[dhcp.subnet]]
network = "127.0.0.0/8"
range = ["127.77.0.10", "127.77.0.250"]

[pxe]
transport = "TRANSPORT"
bios = "undionly.kpxe"
uefi_x64 = "ipxe.efi"
arm64 = "ipxe-arm64.efi"

[[client]]
mac = "52:54:00:77:00:05"
group = "lab"

[[profile]]
name = "uefi-linux"
priority = 10
match = { arch = ["uefi-x64"] }
boot = { kind = "linux", kernel = "uefi-vmlinuz", cmdline = "profile=uefi-linux arch={arch} group={group}" }

[[profile]]
name = "lab-group"
priority = 20
match = { group = ["lab"] }
boot = { kind = "script", script = "#!ipxe\necho profile=lab-group arch={arch} group={group}" }

[[profile]]
name = "rack"
priority = 30
match = { mac = ["52:54:00:aa:*"] }
boot = { kind = "boot_file", path = "rack.efi" }

[[profile]]
name = "arm"
priority = 40
match = { arch = ["arm64"] }
boot = { kind = "boot_file", path = "arm.efi" }

[[profile]]
name = "default"
priority = 1000
match = { mac = ["52:54:00:77:*"] }
boot = { kind = "script", script = "#!ipxe\necho profile=default arch={arch} group={group}" }
"##;

/// One client: who it is, and what an operator reading the profiles expects it to boot.
struct Case {
    mac: &'static str,
    /// Option 93.
    arch: u16,
    ipxe: bool,
    /// The profile it selects, `None` when none matches.
    profile: Option<&'static str>,
    /// A line of the script that only that profile, rendered for this identity, has.
    marker: &'static str,
}

const CASES: &[Case] = &[
    Case { mac: "52:54:00:77:00:01", arch: 0, ipxe: true, profile: Some("default"), marker: "echo profile=default arch=bios group=" },
    Case { mac: "52:54:00:77:00:02", arch: 7, ipxe: true, profile: Some("uefi-linux"), marker: "uefi-vmlinuz profile=uefi-linux arch=uefi-x64 group=" },
    Case { mac: "52:54:00:77:00:03", arch: 7, ipxe: false, profile: Some("uefi-linux"), marker: "uefi-vmlinuz profile=uefi-linux arch=uefi-x64 group=" },
    Case { mac: "52:54:00:aa:00:04", arch: 0, ipxe: false, profile: Some("rack"), marker: "rack.efi" },
    Case { mac: "52:54:00:77:00:05", arch: 0, ipxe: true, profile: Some("lab-group"), marker: "echo profile=lab-group arch=bios group=lab" },
    Case { mac: "52:54:00:77:00:06", arch: 11, ipxe: false, profile: Some("arm"), marker: "arm.efi" },
    Case { mac: "52:54:00:bb:00:07", arch: 0, ipxe: true, profile: None, marker: "no boot profile matches 52:54:00:bb:00:07" },
];

/// What the DHCP ACK must name: the script (by URL or TFTP path) for iPXE, the plan's own
/// boot file for a boot_file plan, else the iPXE build for the ROM's architecture.
fn expected_boot_file(c: &Case, transport: &str, http: std::net::SocketAddr) -> Option<String> {
    let mac: MacAddr = c.mac.parse().unwrap();
    let profile = c.profile?;
    if c.ipxe {
        let script = format!("boot/{}.ipxe", mac.hyphenated());
        return Some(match transport {
            "http" => format!("http://127.0.0.1:{}/{script}", http.port()),
            _ => script,
        });
    }
    Some(match (profile, c.arch) {
        ("rack", _) => "rack.efi".into(),
        ("arm", _) => "arm.efi".into(),
        (_, 7) => "ipxe.efi".into(),
        (_, 11) => "ipxe-arm64.efi".into(),
        _ => "undionly.kpxe".into(),
    })
}

async fn same_decision_everywhere(transport: &str) {
    let lb = Loopback::start(&format!("decision-{transport}"), "server", &SECTIONS.replace("TRANSPORT", transport)).await;
    let markers: Vec<&str> = CASES.iter().map(|c| c.marker).collect();
    for c in CASES {
        let mac: MacAddr = c.mac.parse().unwrap();
        let mut client = if c.ipxe { ClientConfig::ipxe(mac, [7; 16]) } else { ClientConfig::pxe(mac, [7; 16]) };
        client.arch = c.arch;
        let ack = lb.dhcp(client).await;
        assert_eq!(
            ack.boot_file,
            expected_boot_file(c, transport, lb.http()),
            "{} ({transport}): DHCP's boot file does not follow profile {:?}",
            c.mac,
            c.profile
        );

        let name = format!("boot/{}.ipxe", mac.hyphenated());
        let me = ack.ip.into();
        let by_tftp = String::from_utf8(lb.tftp_get_from(me, &name).await.unwrap_or_else(|e| panic!("TFTP {name}: {e}"))).unwrap();
        let (status, by_http) = lb.http_get_from(me, &format!("/{name}")).await;
        assert_eq!(status, 200, "HTTP /{name}");
        let by_http = String::from_utf8(by_http).unwrap();
        for (service, script) in [("TFTP", &by_tftp), ("HTTP", &by_http)] {
            assert!(
                script.contains(c.marker),
                "{} ({transport}): {service} served a script of another decision than profile {:?} for this \
                 identity (wanted {:?}):\n{script}",
                c.mac,
                c.profile,
                c.marker
            );
            let others: Vec<_> = markers.iter().filter(|m| **m != c.marker && script.contains(**m)).collect();
            assert!(others.is_empty(), "{} ({transport}): {service}'s script also has {others:?}", c.mac);
        }
        assert_eq!(by_tftp, by_http, "{} ({transport}): TFTP and HTTP serve different scripts", c.mac);
    }
    lb.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_tftp_and_http_make_one_decision_with_http_scripts() {
    same_decision_everywhere("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_tftp_and_http_make_one_decision_with_tftp_scripts() {
    same_decision_everywhere("tftp").await;
}
