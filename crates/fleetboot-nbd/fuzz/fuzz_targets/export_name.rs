//! Export names as clients send them: `IMAGE[:VERSION][@MAC[~CAPABILITY]]` through
//! `fleetboot_nbd::ExportName::parse`.
//!
//! Checked: nothing panics; an accepted name has a valid image name and a MAC in the one
//! normalized form (which names its private overlay directory); a capability only ever
//! follows a MAC and holds only URL-safe characters; the name shown (without the
//! capability) parses back to the same image and client; neither what is shown nor any
//! error message changes when only the capability does (so none of them quotes it).

#![no_main]

use fleetboot_nbd::export::MAX_CAPABILITY_LEN;
use fleetboot_nbd::ExportName;
use libfuzzer_sys::fuzz_target;

/// `cap` with every letter and digit changed to the next one (`z` → `a`): still valid or
/// invalid in the same way, but different wherever it could be quoted.
fn rotated(cap: &str) -> String {
    cap.chars()
        .map(|c| match c {
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            c if c.is_ascii_alphanumeric() => (c as u8 + 1) as char,
            c => c,
        })
        .collect()
}

/// The name with what stands where a capability goes (after `~`, after the last `@`)
/// rotated, or `None` when there is no such part.
fn with_other_capability(s: &str) -> Option<(String, String)> {
    let (_, cap) = s.rsplit_once('@').and_then(|(_, rest)| rest.split_once('~'))?;
    Some((cap.to_string(), format!("{}{}", &s[..s.len() - cap.len()], rotated(cap))))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // Nothing shown — Display, Debug or an error — depends on the capability's characters
    // (which may also stand in the image name or the MAC by chance, or be made by an
    // escape of the Debug format: comparing with a different capability tells them apart).
    let other = with_other_capability(s);
    match ExportName::parse(s) {
        Ok(e) => {
            assert!(fleetboot_images::validate_name(&e.image.name).is_ok());
            assert!(e.image.version != Some(0));
            if let Some(mac) = &e.client {
                assert_eq!(mac.len(), 17);
                assert!(mac.bytes().enumerate().all(|(i, b)| if i % 3 == 2 { b == b'-' } else { b.is_ascii_hexdigit() && !b.is_ascii_uppercase() }));
                assert!(e.mac().is_some());
            } else {
                assert!(e.capability.is_none(), "a capability without a MAC");
            }
            if let Some(c) = &e.capability {
                assert!(!c.is_empty() && c.len() <= MAX_CAPABILITY_LEN);
                assert!(c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
                assert!(!e.to_string().contains('~'));
                let (cap, other) = other.expect("a capability stands after the last @ and ~");
                assert_eq!(&cap, c, "the capability is what follows the ~ after the last @");
                let o = ExportName::parse(&other).expect("another capability parses the same");
                assert_eq!((e.to_string(), format!("{e:?}")), (o.to_string(), format!("{o:?}")), "what is shown depends on the capability");
            }
            let shown = e.to_string();
            let again = ExportName::parse(&shown).expect("what is shown parses");
            assert_eq!((again.image, again.client), (e.image, e.client));
        }
        Err(msg) => {
            if let Some((_, other)) = other {
                match ExportName::parse(&other) {
                    Err(m) => assert_eq!(msg, m, "the error depends on the capability"),
                    Ok(_) => panic!("another capability made {s:?} valid"),
                }
            }
        }
    }
});
