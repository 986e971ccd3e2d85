//! Export names as clients send them: `IMAGE[:VERSION][@MAC[~CAPABILITY]]` through
//! `fleetboot_nbd::ExportName::parse`.
//!
//! Checked: nothing panics; an accepted name has a valid image name and a MAC in the one
//! normalized form (which names its private overlay directory); a capability only ever
//! follows a MAC and holds only URL-safe characters; the name shown (without the
//! capability) parses back to the same image and client; neither what is shown nor any
//! error message repeats the capability.

#![no_main]

use fleetboot_nbd::export::MAX_CAPABILITY_LEN;
use fleetboot_nbd::ExportName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
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
                // The same characters may stand in the image name or the MAC by chance:
                // what is shown holds them no more often than the name without them does.
                // (Short ones may also be part of what Debug writes for a hidden one.)
                if c.len() >= 8 {
                    let bare = ExportName { capability: None, ..e.clone() };
                    let (shown, without) = (format!("{e:?}"), format!("{bare:?}"));
                    assert!(shown.matches(c.as_str()).count() <= without.matches(c.as_str()).count(), "Debug shows the capability: {shown}");
                }
            }
            let shown = e.to_string();
            let again = ExportName::parse(&shown).expect("what is shown parses");
            assert_eq!((again.image, again.client), (e.image, e.client));
        }
        Err(msg) => {
            // What follows `~` after the last `@` is where a capability goes.
            // The error may quote the rest of the name (a bad MAC, say), which can hold
            // the same characters by chance: it must not show them more often than that.
            if let Some((_, cap)) = s.rsplit_once('@').and_then(|(_, rest)| rest.split_once('~')) {
                if cap.len() >= 8 {
                    let rest = &s[..s.len() - cap.len()];
                    assert!(msg.matches(cap).count() <= rest.matches(cap).count(), "the error repeats the capability: {msg}");
                }
            }
        }
    }
});
