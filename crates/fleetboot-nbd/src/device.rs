//! What an NBD export is to the transmission machine: a [`BlockDevice`].
//!
//! Two families implement it: the NBD server's exports (a catalog image read-only,
//! [`ImageFile`], or a client's copy-on-write [`crate::overlay::Overlay`] over it) and
//! the streaming agent's local disk (an overlay over the image being received, which falls
//! back to the server for blocks not received yet). Both connection loops hand requests
//! to [`crate::transmission::Responder`], which calls these methods, so a command, flag or
//! error means the same thing on either.
//!
//! Errors are `io::Error`s; [`errno_of`] maps them onto the few error values NBD has.

use crate::blockfile::file_extent;
use crate::proto::errno;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// How WRITE_ZEROES may make its range read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The client allows deallocating (punching holes); false for `NBD_CMD_FLAG_NO_HOLE`.
    pub may_trim: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail at once with `ErrorKind::Unsupported` (ENOTSUP)
    /// unless zeroing is faster than writing zeros, and then change nothing.
    pub fast: bool,
}

/// `base:allocation` extents being collected for one BLOCK_STATUS reply: `(length, flags)`
/// descriptors, neighbours with the same flags merged, at most `max` of them.
#[derive(Debug, Clone, Default)]
pub struct Extents {
    list: Vec<(u32, u32)>,
    max: usize,
    full: bool,
}

impl Extents {
    pub fn new(max: usize) -> Extents {
        Extents {
            list: Vec::new(),
            max: max.max(1),
            full: false,
        }
    }
    /// Starts over with room for `max` descriptors.
    pub fn reset(&mut self, max: usize) {
        self.list.clear();
        self.max = max.max(1);
        self.full = false;
    }
    /// Appends `len` bytes in state `flags`. Returns false (and adds nothing) once `max`
    /// descriptors are there and this one cannot be merged into the last: the caller stops.
    pub fn push(&mut self, len: u32, flags: u32) -> bool {
        if len == 0 {
            return !self.full;
        }
        if let Some(last) = self.list.last_mut() {
            if last.1 == flags {
                if let Some(n) = last.0.checked_add(len) {
                    last.0 = n;
                    return true;
                }
            }
        }
        if self.list.len() >= self.max {
            self.full = true;
            return false;
        }
        self.list.push((len, flags));
        true
    }
    /// No more descriptors fit.
    pub fn is_full(&self) -> bool {
        self.full
    }
    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.list
    }
    /// Bytes described so far.
    pub fn covered(&self) -> u64 {
        self.list.iter().map(|e| e.0 as u64).sum()
    }
}

/// A disk an NBD export serves. Offsets and lengths are checked against [`size`] by the
/// transmission machine before any method is called; implementations check again and fail
/// with `InvalidInput` rather than trust that.
///
/// [`size`]: BlockDevice::size
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes, zeroing and trimming fail with `PermissionDenied` (EPERM).
    fn read_only(&self) -> bool;
    /// The granularity at which writes are cheapest (copy-on-write block size): the
    /// transmission machine cuts WRITE payloads on these boundaries.
    fn block_size(&self) -> u32 {
        4096
    }
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads like [`BlockDevice::read`] only when that needs no wait for the disk (every
    /// byte is in memory): `Ok(false)`, with `buf` in any state, when it would have to wait
    /// or the device cannot tell. Lets the server answer a READ from the page cache on the
    /// thread that has the connection, and take only real disk reads to its I/O threads.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<bool> {
        Ok(false)
    }
    /// Appends to `runs` where the bytes of `[offset, offset+len)` lie, in order, when
    /// every one of them is, right now, a byte of a file in the page cache; false (with
    /// `runs` in any state) otherwise, or when the device cannot tell. Lets a plain-TCP
    /// shell hand the bytes to the kernel with `sendfile(2)`, never copying them through
    /// the server, still without waiting for the disk.
    fn cached_file_runs<'a>(&'a self, _offset: u64, _len: u64, _runs: &mut Vec<FileRun<'a>>) -> bool {
        false
    }
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()>;
    /// The client no longer needs `[offset, offset+len)`: it may read back as anything
    /// until written again. Doing nothing is correct; freeing space is better.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The client will read `[offset, offset+len)` soon (`NBD_CMD_CACHE`): prefetch it if
    /// that helps. Doing nothing is correct.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// `base:allocation` status of `[offset, offset+len)` into `out`, stopping early when it
    /// is full. Flags 0 ("data or unknown") are always correct.
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()>;
}

/// `offset + len` within `size`, or `InvalidInput`.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(e) if e <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "beyond the end of the disk",
        )),
    }
}

/// The NBD error value for a device error.
pub fn errno_of(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        match code {
            libc::EPERM | libc::EACCES | libc::EROFS => return errno::EPERM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => return errno::ENOSPC,
            libc::EINVAL => return errno::EINVAL,
            libc::EOPNOTSUPP => return errno::ENOTSUP,
            _ => return errno::EIO,
        }
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => errno::EPERM,
        io::ErrorKind::StorageFull
        | io::ErrorKind::FileTooLarge
        | io::ErrorKind::QuotaExceeded => errno::ENOSPC,
        io::ErrorKind::InvalidInput => errno::EINVAL,
        io::ErrorKind::Unsupported => errno::ENOTSUP,
        // NBD asks servers not to report ENOMEM; the client can do nothing with it.
        _ => errno::EIO,
    }
}

/// Whether this kernel and file system take `RWF_NOWAIT` reads; cleared at the first
/// refusal so a file system without them costs one failed call, not one per READ.
static NOWAIT_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether reads that do not wait for the disk have worked so far (false once the kernel
/// or a file system refused them).
pub fn nowait_reads_work() -> bool {
    NOWAIT_READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `read_exact_at` with `preadv2(RWF_NOWAIT)`: the kernel copies from the page cache and
/// says `EAGAIN` instead of waiting for the disk. `Ok(false)` when any byte is not cached.
pub fn read_exact_at_cached(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<bool> {
    use std::sync::atomic::Ordering;
    if !NOWAIT_READS.load(Ordering::Relaxed) {
        return Ok(false);
    }
    while !buf.is_empty() {
        match rustix::io::preadv2(file, &mut [io::IoSliceMut::new(buf)], offset, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::AGAIN) => return Ok(false),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                NOWAIT_READS.store(false, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Bytes of a disk that are bytes of a file: `len` bytes of `file` from `offset` on.
#[derive(Debug, Clone, Copy)]
pub struct FileRun<'a> {
    pub file: &'a File,
    pub offset: u64,
    pub len: u64,
}

/// Whether this kernel answers `cachestat(2)` (Linux 6.5 and later); cleared at the first
/// refusal so an older kernel costs one failed call.
static CACHESTAT_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `cachestat(2)`: one number on every Linux architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether every page of `[offset, offset+len)` of `file` is in the page cache, so that
/// reading it (or `sendfile` from it) does not wait for the disk. False when the kernel
/// cannot say.
pub fn range_cached(file: &File, offset: u64, len: u64) -> bool {
    use std::sync::atomic::Ordering;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 || !CACHESTAT_WORKS.load(Ordering::Relaxed) {
        return false;
    }
    const PAGE: u64 = 4096;
    let first = offset / PAGE;
    let last = (offset + len - 1) / PAGE;
    let range = Range { off: first * PAGE, len: (last - first + 1) * PAGE };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live for the call; `file`'s
    // descriptor is open for as long as the borrow.
    let r = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range as *const Range, &mut stat as *mut Stat, 0u32) };
    if r != 0 {
        let e = io::Error::last_os_error().raw_os_error();
        if matches!(e, Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) {
            CACHESTAT_WORKS.store(false, Ordering::Relaxed);
        }
        return false;
    }
    let pages = last - first + 1;
    stat.nr_cache >= pages
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the export is read-only")
}

/// A plain file served read-only: a catalog image without an overlay.
#[derive(Debug)]
pub struct ImageFile {
    file: std::sync::Arc<File>,
    size: u64,
}

impl ImageFile {
    pub fn new(file: std::sync::Arc<File>, size: u64) -> ImageFile {
        ImageFile { file, size }
    }
}

impl BlockDevice for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        check_range(self.size, offset, buf.len() as u64)?;
        read_exact_at_cached(&self.file, offset, buf)
    }
    fn cached_file_runs<'a>(&'a self, offset: u64, len: u64, runs: &mut Vec<FileRun<'a>>) -> bool {
        let fits = offset.checked_add(len).is_some_and(|end| end <= self.size);
        if !fits || !range_cached(&self.file, offset, len) {
            return false;
        }
        runs.push(FileRun { file: &self.file, offset, len });
        true
    }
    fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(read_only_error())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode) -> io::Result<()> {
        Err(read_only_error())
    }
    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        // SAFETY: posix_fadvise on an fd we own; advice only.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        check_range(self.size, offset, len as u64)?;
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let (status, next) = file_extent(&self.file, pos, end);
            if !out.push((next - pos) as u32, status) {
                break;
            }
            pos = next;
        }
        Ok(())
    }
}

/// A disk held in memory: for tests, fuzzing and small scratch exports. Blocks that were
/// never written or were zeroed with trimming allowed read as zeros and report as holes.
#[derive(Debug)]
pub struct MemoryDisk {
    bytes: std::sync::Mutex<Vec<u8>>,
    /// One flag per 4 KiB: written since the disk was made (or zeroed with trimming off).
    allocated: std::sync::Mutex<Vec<bool>>,
    read_only: bool,
    /// Flushes so far.
    pub flushes: std::sync::atomic::AtomicU64,
}

const MEM_BLOCK: u64 = 4096;

impl MemoryDisk {
    pub fn new(size: usize, read_only: bool) -> MemoryDisk {
        MemoryDisk {
            bytes: std::sync::Mutex::new(vec![0; size]),
            allocated: std::sync::Mutex::new(vec![false; (size as u64).div_ceil(MEM_BLOCK) as usize]),
            read_only,
            flushes: Default::default(),
        }
    }
    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.size(), offset, len)
    }
    fn set_allocated(&self, offset: u64, len: u64, v: bool, whole_only: bool) {
        if len == 0 {
            return;
        }
        let mut a = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        let size = self.size();
        let (first, end) = if whole_only {
            let f = offset.div_ceil(MEM_BLOCK);
            let e = if offset + len == size { a.len() as u64 } else { (offset + len) / MEM_BLOCK };
            (f, e)
        } else {
            (offset / MEM_BLOCK, (offset + len - 1) / MEM_BLOCK + 1)
        };
        for b in first..end.min(a.len() as u64) {
            a[b as usize] = v;
        }
    }
}

impl BlockDevice for MemoryDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let b = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read(offset, buf).map(|()| true)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
            [offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        self.set_allocated(offset, data.len() as u64, true, false);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.check_writable(offset, len)?;
        if mode.fast && !mode.may_trim {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "zeroing without holes is a write"));
        }
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
            [offset as usize..(offset + len) as usize]
            .fill(0);
        if mode.may_trim {
            self.set_allocated(offset, len, false, true);
        } else {
            self.set_allocated(offset, len, true, false);
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable(offset, len)?;
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        check_range(self.size(), offset, len as u64)?;
        let a = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / MEM_BLOCK;
            let next = ((b + 1) * MEM_BLOCK).min(end);
            let flags = if a[b as usize] {
                0
            } else {
                crate::proto::state::HOLE | crate::proto::state::ZERO
            };
            if !out.push((next - pos) as u32, flags) {
                break;
            }
            pos = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_stop_when_full() {
        let mut e = Extents::new(2);
        assert!(e.push(10, 0));
        assert!(e.push(5, 0));
        assert!(e.push(7, 3));
        assert!(!e.push(1, 0));
        assert!(e.is_full());
        assert!(e.push(4, 3), "the last descriptor still merges");
        assert_eq!(e.as_slice()[0], (15, 0));
        e.reset(1);
        assert!(e.push(u32::MAX, 0));
        assert!(!e.push(1, 0), "a merge that would overflow needs a new descriptor");
    }

    #[test]
    fn errors_map_onto_nbd_values() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_of(&os(libc::EDQUOT)), errno::ENOSPC);
        assert_eq!(errno_of(&os(libc::EFBIG)), errno::ENOSPC);
        assert_eq!(errno_of(&os(libc::EROFS)), errno::EPERM);
        assert_eq!(errno_of(&os(libc::EBADF)), errno::EIO);
        assert_eq!(errno_of(&os(libc::ENOMEM)), errno::EIO);
        assert_eq!(errno_of(&read_only_error()), errno::EPERM);
        assert_eq!(
            errno_of(&io::Error::from(io::ErrorKind::Unsupported)),
            errno::ENOTSUP
        );
        assert_eq!(errno_of(&io::Error::other("x")), errno::EIO);
    }
}
