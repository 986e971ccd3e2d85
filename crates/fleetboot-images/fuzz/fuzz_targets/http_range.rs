//! The `Range` header of any HTTP request for a boot file or image, as a client sends it.
//!
//! Input: eight bytes of file length, then the header value. Whatever it holds, nothing
//! may panic and an accepted range lies inside the file.

#![no_main]

use fleetboot_images::range::byte_range;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((len, header)) = input.split_first_chunk::<8>() else { return };
    let len = u64::from_le_bytes(*len) >> (len[0] & 63);
    let Ok(header) = std::str::from_utf8(header) else { return };
    if let Some(Ok((first, last))) = byte_range(header, len) {
        assert!(first <= last && last < len, "{header:?} of {len} bytes gave {first}-{last}");
    }
});
