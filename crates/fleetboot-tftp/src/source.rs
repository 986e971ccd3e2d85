//! Block sources a shell wraps around a file: [`ReadAhead`] (large reads, so a block costs
//! a copy rather than a system call) and [`Netascii`] (RFC 1350 netascii converted block by
//! block, never the whole file in memory). Both are generic over any [`BlockSource`], so they
//! do no I/O of their own and are tested and fuzzed over byte slices.

use crate::server::BlockSource;
use std::collections::VecDeque;
use std::io;

/// The smallest read a [`ReadAhead`] makes.
const FIRST_READ: usize = 8 << 10;

/// Reads ahead of the blocks asked for, in chunks that grow from 8 KiB to `max_chunk` as a
/// transfer moves on: a transfer that never gets past its first block (a spoofed request)
/// holds 8 KiB, a running one reads `max_chunk` at a time. Blocks are asked for in order; a
/// go-back-N resend steps back at most a window, usually still inside the chunk.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    /// Offset of `buf[0]` in the source.
    start: u64,
    next_chunk: usize,
    max_chunk: usize,
}

impl<S: BlockSource> ReadAhead<S> {
    pub fn new(inner: S, max_chunk: usize) -> ReadAhead<S> {
        let max_chunk = max_chunk.max(FIRST_READ);
        ReadAhead { inner, buf: Vec::new(), start: 0, next_chunk: FIRST_READ, max_chunk }
    }

    /// Bytes held in memory now.
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: BlockSource> BlockSource for ReadAhead<S> {
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> io::Result<usize> {
        let end = self.start + self.buf.len() as u64;
        if offset < self.start || offset >= end {
            let chunk = self.next_chunk.max(out.len());
            self.next_chunk = (self.next_chunk * 2).min(self.max_chunk);
            self.buf.resize(chunk, 0);
            let mut filled = 0;
            // One read may return less than asked (a pipe, a signal): fill what the source has.
            while filled < chunk {
                match self.inner.read_at(offset + filled as u64, &mut self.buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.buf.clear();
                        return Err(e);
                    }
                }
            }
            self.buf.truncate(filled);
            self.start = offset;
        }
        let from = usize::try_from(offset - self.start).unwrap_or(usize::MAX).min(self.buf.len());
        let n = out.len().min(self.buf.len() - from);
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        Ok(n)
    }
}

/// The length of `data` in netascii: every LF becomes CR LF, every CR becomes CR NUL.
pub fn netascii_len(data: &[u8]) -> u64 {
    data.len() as u64 + data.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64
}

/// `data` converted to netascii in one piece (for small in-memory texts and for tests).
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// Source bytes converted per step; checkpoints fall on multiples of it.
const STEP: usize = 4096;
/// A checkpoint every this many source bytes.
const CHECKPOINT_EVERY: u64 = 64 << 10;
/// Checkpoints kept: a resend steps back at most a window (64 blocks of at most 64 KiB),
/// which this covers; anything older restarts from the beginning of the file.
const CHECKPOINTS: usize = 80;

/// A source served in netascii (RFC 1350: CR LF line ends, a bare CR as CR NUL), converted
/// as the blocks are asked for. Offsets are in the converted text; a read after the last
/// one continues where it stopped, a read before it (a resend) restarts from the nearest
/// checkpoint at or before it. Memory: one conversion step and a few checkpoints.
#[derive(Debug)]
pub struct Netascii<S> {
    inner: S,
    /// Length of the source (not converted).
    source_len: u64,
    /// The next source byte to convert, the converted offset it starts at, and the byte
    /// still owed from the last expansion (the second half of CR LF or CR NUL).
    src_off: u64,
    conv_off: u64,
    owed: Option<u8>,
    /// (source offset, converted offset) at step boundaries where nothing was owed.
    checkpoints: VecDeque<(u64, u64)>,
    step: Vec<u8>,
}

impl<S: BlockSource> Netascii<S> {
    /// Wraps `inner`, whose unconverted length is `source_len`.
    pub fn new(inner: S, source_len: u64) -> Netascii<S> {
        Netascii {
            inner,
            source_len,
            src_off: 0,
            conv_off: 0,
            owed: None,
            checkpoints: VecDeque::new(),
            step: Vec::with_capacity(STEP),
        }
    }

    /// The converted length, counted in one pass over the source (a step at a time).
    /// The source may end early (a file truncated since it was opened): the count is of
    /// what it has.
    pub fn converted_len(&mut self) -> io::Result<u64> {
        let mut buf = vec![0u8; STEP];
        let (mut off, mut len) = (0u64, 0u64);
        while off < self.source_len {
            let want = (self.source_len - off).min(STEP as u64) as usize;
            let n = read_some(&mut self.inner, off, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            len += netascii_len(&buf[..n]);
            off += n as u64;
        }
        Ok(len)
    }

    /// Moves the cursor back to the newest checkpoint at or before `offset`.
    fn rewind(&mut self, offset: u64) {
        while self.checkpoints.back().is_some_and(|&(_, c)| c > offset) {
            self.checkpoints.pop_back();
        }
        let (s, c) = self.checkpoints.back().copied().unwrap_or((0, 0));
        (self.src_off, self.conv_off, self.owed) = (s, c, None);
    }

    /// Converts `want` bytes from the cursor into `out` (with `None`, only advances the
    /// cursor); returns how many converted bytes there were (fewer at the end).
    fn convert(&mut self, mut out: Option<&mut [u8]>, want: u64) -> io::Result<u64> {
        let mut done = 0u64;
        while done < want {
            if let Some(b) = self.owed.take() {
                if let Some(o) = out.as_deref_mut() {
                    o[done as usize] = b;
                }
                done += 1;
                self.conv_off += 1;
                continue;
            }
            if self.src_off >= self.source_len {
                break;
            }
            if self.src_off.is_multiple_of(CHECKPOINT_EVERY) && self.checkpoints.back().is_none_or(|&(s, _)| s < self.src_off) {
                if self.checkpoints.len() == CHECKPOINTS {
                    self.checkpoints.pop_front();
                }
                self.checkpoints.push_back((self.src_off, self.conv_off));
            }
            // Up to the next step boundary, so checkpoints land on multiples of STEP.
            let to_boundary = STEP - (self.src_off % STEP as u64) as usize;
            let room = (want - done).min(to_boundary as u64).min(self.source_len - self.src_off) as usize;
            self.step.resize(room, 0);
            let n = read_some(&mut self.inner, self.src_off, &mut self.step)?;
            if n == 0 {
                break; // the source ended early; the transfer notices the short read
            }
            // Each source byte gives one or two converted bytes; stop where `want` is met.
            let mut used = 0;
            while used < n && done < want {
                let b = self.step[used];
                let (first, second) = match b {
                    b'\n' => (b'\r', Some(b'\n')),
                    b'\r' => (b'\r', Some(0)),
                    _ => (b, None),
                };
                if let Some(o) = out.as_deref_mut() {
                    o[done as usize] = first;
                }
                done += 1;
                self.conv_off += 1;
                used += 1;
                if let Some(s) = second {
                    if done < want {
                        if let Some(o) = out.as_deref_mut() {
                            o[done as usize] = s;
                        }
                        done += 1;
                        self.conv_off += 1;
                    } else {
                        self.owed = Some(s);
                    }
                }
            }
            self.src_off += used as u64;
        }
        Ok(done)
    }
}

impl<S: BlockSource> BlockSource for Netascii<S> {
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> io::Result<usize> {
        if offset < self.conv_off {
            self.rewind(offset);
        }
        if offset > self.conv_off {
            let skip = offset - self.conv_off;
            if self.convert(None, skip)? < skip {
                return Ok(0);
            }
        }
        let want = out.len() as u64;
        let n = self.convert(Some(out), want)?;
        Ok(n as usize)
    }
}

/// One read, retried on EINTR.
fn read_some<S: BlockSource + ?Sized>(s: &mut S, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read_at(offset, buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A source that returns at most `max` bytes per read and counts its reads.
    struct Dribble<'a> {
        data: &'a [u8],
        max: usize,
        reads: usize,
    }

    impl BlockSource for Dribble<'_> {
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = buf.len().min(self.max);
            let mut s = self.data;
            s.read_at(offset, &mut buf[..n])
        }
    }

    #[test]
    fn netascii_line_ends() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
        assert_eq!(netascii_len(b"a\nb\rc"), 7);
    }

    #[test]
    fn read_ahead_grows_from_a_small_first_read() {
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = ReadAhead::new(data.as_slice(), 256 << 10);
        let mut block = vec![0u8; 1468];
        assert_eq!(r.read_at(0, &mut block).unwrap(), 1468);
        assert_eq!(r.buffered(), FIRST_READ, "a transfer at its first block holds one small chunk");
        let mut off = 0u64;
        while off < data.len() as u64 {
            let n = r.read_at(off, &mut block).unwrap();
            assert_eq!(&block[..n], &data[off as usize..off as usize + n]);
            off += n as u64;
        }
        assert!(r.buffered() <= 256 << 10);
        assert_eq!(r.read_at(off, &mut block).unwrap(), 0);
    }

    #[test]
    fn read_ahead_serves_any_offset_from_a_dribbling_source() {
        let data: Vec<u8> = (0..(600 << 10)).map(|i| (i * 13 % 253) as u8).collect();
        let mut r = ReadAhead::new(Dribble { data: &data, max: 1000, reads: 0 }, 256 << 10);
        let mut buf = vec![0u8; 1468];
        for off in [0usize, 1468, (256 << 10) - 100, (256 << 10) + 5, 3000, data.len() - 10, data.len()] {
            let n = r.read_at(off as u64, &mut buf).unwrap();
            let want = &data[off..(off + 1468).min(data.len())];
            assert_eq!(&buf[..n], &want[..n], "offset {off}");
            assert!(n > 0 || off == data.len());
        }
    }

    /// Reads `conv` in blocks of `blk` through a `Netascii` over `data`, stepping back
    /// `back` blocks every `every` blocks (a go-back-N resend).
    fn read_blocks(data: &[u8], blk: usize, back: u64, every: u64) -> Vec<u8> {
        let mut n = Netascii::new(Dribble { data, max: 777, reads: 0 }, data.len() as u64);
        let total = n.converted_len().unwrap();
        let mut out = Vec::new();
        let mut idx = 0u64;
        let mut buf = vec![0u8; blk];
        let mut stepped = std::collections::HashSet::new();
        loop {
            let off = idx * blk as u64;
            let got = n.read_at(off, &mut buf).unwrap();
            if out.len() as u64 == off {
                out.extend_from_slice(&buf[..got]);
            } else {
                let at = off as usize;
                assert_eq!(&out[at..at + got], &buf[..got], "a resend of block {idx} differs");
            }
            if got < blk {
                break;
            }
            if every > 0 && idx % every == every - 1 && stepped.insert(idx) {
                idx = idx.saturating_sub(back);
            } else {
                idx += 1;
            }
        }
        assert_eq!(out.len() as u64, total);
        out
    }

    #[test]
    fn netascii_streamed_equals_converted_whole() {
        let mut text = Vec::new();
        for i in 0..40_000u32 {
            text.extend_from_slice(format!("line {i}\n").as_bytes());
            if i % 7 == 0 {
                text.push(b'\r');
            }
        }
        let want = to_netascii(&text);
        for blk in [8usize, 512, 1468, 4096, 65464] {
            assert_eq!(read_blocks(&text, blk, 0, 0), want, "blksize {blk}");
            assert_eq!(read_blocks(&text, blk, 5, 9), want, "blksize {blk} with resends");
        }
        // All line ends: every byte doubles, and a block can end inside an expansion.
        let crlf = b"\n\r".repeat(10_000);
        assert_eq!(read_blocks(&crlf, 513, 3, 4), to_netascii(&crlf));
        assert_eq!(read_blocks(&[], 512, 0, 0), Vec::<u8>::new());
    }

    #[test]
    fn netascii_reads_far_back_restart_from_the_top() {
        let text = b"ab\ncd\r".repeat(100_000);
        let want = to_netascii(&text);
        let mut n = Netascii::new(text.as_slice(), text.len() as u64);
        let mut buf = vec![0u8; 1000];
        let end = want.len() as u64 - 1000;
        assert_eq!(n.read_at(end, &mut buf).unwrap(), 1000);
        assert_eq!(&buf[..], &want[end as usize..]);
        assert_eq!(n.read_at(3, &mut buf).unwrap(), 1000);
        assert_eq!(&buf[..], &want[3..1003]);
        assert!(n.checkpoints.len() <= CHECKPOINTS);
    }

    #[test]
    fn netascii_source_shorter_than_announced_reads_short() {
        let text = b"abc\ndef\n";
        let mut n = Netascii::new(&text[..4], 8);
        let mut buf = [0u8; 16];
        assert_eq!(n.read_at(0, &mut buf).unwrap(), 5);
        assert_eq!(n.read_at(100, &mut buf).unwrap(), 0);
    }

    proptest! {
        #[test]
        fn netascii_any_reads_match(data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..20_000),
                                    reads in proptest::collection::vec((0u64..45_000, 1usize..3000), 1..40)) {
            let want = to_netascii(&data);
            let mut n = Netascii::new(Dribble { data: &data, max: 333, reads: 0 }, data.len() as u64);
            prop_assert_eq!(n.converted_len().unwrap(), want.len() as u64);
            for (off, len) in reads {
                let mut buf = vec![0u8; len];
                let got = n.read_at(off, &mut buf).unwrap();
                let start = (off as usize).min(want.len());
                let expect = &want[start..(start + len).min(want.len())];
                prop_assert_eq!(&buf[..got], expect);
            }
        }
    }
}
