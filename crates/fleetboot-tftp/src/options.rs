//! Which options of a read request the server accepts and acknowledges in its OACK: RFC 2347
//! (option acknowledgement), 2348 (blksize), 2349 (timeout, tsize) and 7440 (windowsize).
//!
//! Options the server does not understand, or values outside the RFC ranges, are left out
//! of the OACK: the client then uses the RFC 1350 default for them. Only if nothing at all is
//! acknowledged is there no OACK, and the transfer is a plain RFC 1350 one.

use crate::server::TransferConfig;

pub const DEFAULT_BLKSIZE: u16 = 512;
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;

/// What a read transfer runs with: the options the server accepted, and their OACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedOptions {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout the client asked for, in seconds (RFC 2349).
    pub timeout: Option<u8>,
    /// File size announced to the client (RFC 2349).
    pub tsize: Option<u64>,
    /// The OACK's options in the client's order; empty means send no OACK.
    pub oack: Vec<(String, String)>,
}

impl Default for AcceptedOptions {
    fn default() -> Self {
        AcceptedOptions {
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            timeout: None,
            tsize: None,
            oack: Vec::new(),
        }
    }
}

impl AcceptedOptions {
    pub fn sends_oack(&self) -> bool {
        !self.oack.is_empty()
    }
}

/// Accepts the options of a read request within `config`'s limits (keys already lowercased
/// by the codec). When an
/// option appears twice, the first one counts.
pub fn accept(
    request: &[(String, String)],
    file_len: u64,
    config: &TransferConfig,
) -> AcceptedOptions {
    let mut n = AcceptedOptions::default();
    if config.ignore_options {
        return n;
    }
    let max_blksize = config.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
    let max_windowsize = config.max_windowsize.max(1);
    let mut seen = [false; 4];
    for (key, value) in request {
        let slot = match key.as_str() {
            "blksize" => 0,
            "tsize" => 1,
            "timeout" => 2,
            "windowsize" => 3,
            _ => continue,
        };
        if std::mem::replace(&mut seen[slot], true) {
            continue;
        }
        let reply = match slot {
            0 => match value.parse::<u32>() {
                Ok(v) if v >= u32::from(MIN_BLKSIZE) => {
                    n.blksize = v.min(u32::from(max_blksize)) as u16;
                    n.blksize.to_string()
                }
                _ => continue,
            },
            // A client sends tsize=0 in a read request; any number is taken as the question.
            1 => match value.parse::<u64>() {
                Ok(_) => {
                    n.tsize = Some(file_len);
                    file_len.to_string()
                }
                Err(_) => continue,
            },
            // The server must echo the timeout unchanged or leave it out.
            2 => match value.parse::<u8>() {
                Ok(v) if v >= 1 => {
                    n.timeout = Some(v);
                    v.to_string()
                }
                _ => continue,
            },
            _ => match value.parse::<u16>() {
                Ok(v) if v >= 1 => {
                    n.windowsize = v.min(max_windowsize);
                    n.windowsize.to_string()
                }
                _ => continue,
            },
        };
        n.oack.push((key.clone(), reply));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_options_no_oack() {
        let n = accept(&[], 100, &TransferConfig::default());
        assert_eq!(n, AcceptedOptions::default());
        assert!(!n.sends_oack());
    }

    #[test]
    fn firmware_request() {
        let n = accept(
            &opts(&[("blksize", "1432"), ("tsize", "0")]),
            4242,
            &TransferConfig::default(),
        );
        assert_eq!(n.blksize, 1432);
        assert_eq!(n.tsize, Some(4242));
        assert_eq!(n.oack, opts(&[("blksize", "1432"), ("tsize", "4242")]));
    }

    #[test]
    fn clamps_to_server_limits() {
        let req = opts(&[
            ("windowsize", "1000"),
            ("blksize", "65464"),
            ("timeout", "3"),
        ]);
        let n = accept(&req, 0, &TransferConfig::default());
        assert_eq!((n.blksize, n.windowsize, n.timeout), (1468, 64, Some(3)));
        assert_eq!(
            n.oack,
            opts(&[("windowsize", "64"), ("blksize", "1468"), ("timeout", "3")])
        );
        let huge = accept(
            &opts(&[("blksize", "99999999")]),
            0,
            &TransferConfig::default(),
        );
        assert_eq!(huge.blksize, 1468);
    }

    #[test]
    fn invalid_and_unknown_options_are_left_out() {
        let req = opts(&[
            ("blksize", "7"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("windowsize", "0"),
            ("tsize", "x"),
            ("multicast", ""),
        ]);
        let n = accept(&req, 10, &TransferConfig::default());
        assert_eq!(n, AcceptedOptions::default());
    }

    #[test]
    fn first_occurrence_wins() {
        let n = accept(
            &opts(&[("blksize", "1024"), ("blksize", "8")]),
            0,
            &TransferConfig::default(),
        );
        assert_eq!(n.blksize, 1024);
        assert_eq!(n.oack.len(), 1);
    }

    #[test]
    fn quirk_ignores_everything() {
        let cfg = TransferConfig {
            ignore_options: true,
            ..TransferConfig::default()
        };
        assert_eq!(
            accept(&opts(&[("blksize", "1432")]), 1, &cfg),
            AcceptedOptions::default()
        );
    }
}
