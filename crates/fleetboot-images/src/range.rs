//! The `Range` header of an HTTP request for an image or boot file: one byte range,
//! parsed once for every listener that serves files (HTTP boot and `/images/`, the edge
//! cache).
//!
//! Following RFC 9110 §14: a header that is not a single well-formed `bytes=` range is
//! ignored (the whole file is sent, status 200); a well-formed range that lies outside the
//! file cannot be satisfied (status 416). A range running past the end is cut at it.

/// A range that is well formed but lies outside the file (answer 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The inclusive byte range `(first, last)` that `header` (the `Range` value) asks of a
/// file of `len` bytes; `None` when the header is to be ignored. Several ranges are
/// ignored too: clients then get the whole file instead of a multipart answer.
pub fn byte_range(header: &str, len: u64) -> Option<Result<(u64, u64), Unsatisfiable>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 || len == 0 {
                return Some(Err(Unsatisfiable));
            }
            (len.saturating_sub(n), len - 1)
        }
        (first, "") => (first.parse().ok()?, len.saturating_sub(1)),
        (first, last) => (first.parse().ok()?, last.parse::<u64>().ok()?.min(len.saturating_sub(1))),
    };
    Some(if first > last || first >= len { Err(Unsatisfiable) } else { Ok((first, last)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_ranges_suffixes_and_what_is_ignored() {
        assert_eq!(byte_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Some(Ok((0, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Some(Ok((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Some(Err(Unsatisfiable)));
        assert_eq!(byte_range("bytes=-0", 100), Some(Err(Unsatisfiable)));
        assert_eq!(byte_range("bytes=0-0", 0), Some(Err(Unsatisfiable)));
        assert_eq!(byte_range("bytes=9-3", 100), Some(Err(Unsatisfiable)));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
        assert_eq!(byte_range("bytes=-x", 100), None);
        assert_eq!(byte_range("bytes=18446744073709551616-", 100), None);
    }

    proptest! {
        /// Whatever the header, an accepted range lies inside the file.
        #[test]
        fn an_accepted_range_lies_inside_the_file(header in ".{0,40}", len in 0u64..1 << 40) {
            if let Some(Ok((first, last))) = byte_range(&header, len) {
                prop_assert!(first <= last && last < len);
            }
        }

        /// Well-formed ranges inside the file come back as asked.
        #[test]
        fn ranges_inside_the_file_are_taken_as_asked(len in 1u64..1 << 40, a in 0u64..1 << 40, b in 0u64..1 << 40) {
            let (first, last) = (a.min(b) % len, a.max(b) % len);
            let (first, last) = (first.min(last), first.max(last));
            prop_assert_eq!(byte_range(&format!("bytes={first}-{last}"), len), Some(Ok((first, last))));
        }
    }
}
