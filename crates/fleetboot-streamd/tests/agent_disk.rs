//! The agent's local disk on loopback, against fleetboot's real NBD server (in process):
//! reads before the stream fetch by unicast, reads of received blocks stay local, writes
//! stay in the overlay, and the local NBD export speaks the same NBD as the server (our
//! client, `qemu-img` and `nbdinfo` through it; a missing tool is a skip through the one
//! gate, a failure under FLEETBOOT_REQUIRE_E2E=1).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fleetboot_images::{Catalog, ImportOptions};
use fleetboot_lab::gate::tools_ready;
use fleetboot_nbd::proto::{cmd, cmdflags, errno};
use fleetboot_nbd::{BlockDevice, Exports, ExportsConfig};
use fleetboot_streamd::agent::{serve_local, AgentDisk};
use fleetboot_streamd::cache::Cache;
use fleetboot_streamd::nbd_client::NbdClient;
use fleetboot_streamd::sender::SessionSpec;
use fleetboot_streamd::sequence::Recorder;

const SIZE: usize = 3 << 20;

/// Pseudo-random bytes, with zeros in `[ZEROS, ZEROS + 1 MiB)`.
fn image() -> Vec<u8> {
    (0..SIZE)
        .map(|i| {
            if (ZEROS..ZEROS + (1 << 20)).contains(&i) {
                0
            } else {
                (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1] | 1
            }
        })
        .collect()
}

const ZEROS: usize = 1 << 20;

struct Server {
    dir: tempfile::TempDir,
    catalog: Catalog,
    exports: Arc<Exports>,
    addr: SocketAddr,
    sha: String,
    _rt: tokio::runtime::Runtime,
}

fn server(img: &[u8]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("img.raw");
    std::fs::write(&src, img).unwrap();
    let catalog = Catalog::open_dir(dir.path()).unwrap();
    let v = catalog
        .import(
            &src,
            &ImportOptions {
                name: Some("img".into()),
                format: Some("raw".into()),
            },
            &mut |_| {},
        )
        .unwrap();
    let exports = Exports::new(catalog.clone(), ExportsConfig::new(dir.path())).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(fleetboot_nbd::serve(l, exports.clone(), fleetboot_nbd::ServerOptions::new(fleetboot_nbd::Access::open_to_all())));
    Server {
        dir,
        catalog,
        exports,
        addr,
        sha: v.sha256,
        _rt: rt,
    }
}

#[test]
fn reads_fetch_then_stay_local_and_writes_stay_in_the_overlay() {
    let img = image();
    let s = server(&img);
    let addr = s.addr.to_string();
    let c = NbdClient::connect(&addr, "img").unwrap();
    assert_eq!(c.size, SIZE as u64);
    assert_eq!(c.sha256().as_deref(), Some(s.sha.as_str()));
    let dir = tempfile::tempdir().unwrap();
    let disk = AgentDisk::new(SIZE as u64, &addr, "img", Some(c), dir.path()).unwrap();

    // Before the stream: straight from the server.
    let mut b = vec![0u8; 10_000];
    disk.read(12_345, &mut b).unwrap();
    assert_eq!(b, img[12_345..22_345]);
    assert_eq!(disk.stats.reads_fetched.load(Ordering::Relaxed), 1);

    // The stream's cache attached, some blocks "received".
    let cache = Arc::new(Cache::open(dir.path(), &s.sha, SIZE as u64, 1450).unwrap());
    for blk in 0..100u32 {
        let o = blk as usize * 1450;
        cache.put_block(blk, &img[o..o + 1450]).unwrap();
    }
    disk.set_cache(cache.clone());
    disk.read(1000, &mut b).unwrap();
    assert_eq!(b, img[1000..11_000]);
    assert_eq!(disk.stats.reads_local.load(Ordering::Relaxed), 1);
    // A miss fetches whole blocks and keeps them.
    let before = cache.present();
    disk.read(2_000_000, &mut b).unwrap();
    assert_eq!(b, img[2_000_000..2_010_000]);
    assert!(cache.present() > before);
    assert!(cache.has_range(2_000_000, 10_000));
    assert_eq!(disk.stats.reads_fetched.load(Ordering::Relaxed), 2);
    // Now local.
    disk.read(2_000_000, &mut b).unwrap();
    assert_eq!(disk.stats.reads_local.load(Ordering::Relaxed), 2);

    // Writes: partial chunks keep the image's bytes around them.
    disk.write(5000, &[0xAA; 100]).unwrap();
    disk.write(3 * 4096, &[0xBB; 4096]).unwrap();
    let mut all = vec![0u8; 20_000];
    disk.read(0, &mut all).unwrap();
    let mut want = img[..20_000].to_vec();
    want[5000..5100].fill(0xAA);
    want[3 * 4096..4 * 4096].fill(0xBB);
    assert_eq!(all, want);
    disk.flush().unwrap();
    // The cache never sees overlay writes.
    let mut cb = vec![0u8; 100];
    cache.read_at(5000, &mut cb).unwrap();
    assert_eq!(cb, img[5000..5100]);

    // Through the local NBD export.
    let disk = Arc::new(disk);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = l.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (d2, s2) = (disk.clone(), stop.clone());
    let t = std::thread::spawn(move || serve_local(l, d2, "img".into(), s2));
    let mut lc = NbdClient::connect(&local, "img").unwrap();
    assert_eq!(lc.size, SIZE as u64);
    let mut got = vec![0u8; SIZE];
    lc.read(0, &mut got).unwrap();
    let mut want = img.clone();
    want[5000..5100].fill(0xAA);
    want[3 * 4096..4 * 4096].fill(0xBB);
    assert!(got == want, "local export content");
    lc.disconnect();
    assert!(NbdClient::connect(&local, "other").is_err());
    if tools_ready("agent_disk: qemu-img convert of the local export", &["qemu-img"]) {
        let uri = format!("nbd://{local}/img");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(dir.path().join("copy.raw"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read(dir.path().join("copy.raw")).unwrap() == want);
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn the_server_learns_the_read_order_and_sessions_stream_by_it() {
    let img = image();
    let s = server(&img);
    let rec = Arc::new(Recorder::new(s.catalog.root(), 1450));
    s.exports.set_read_recorder(Some(rec.clone()));
    let mut c = NbdClient::connect(&s.addr.to_string(), "img").unwrap();
    let mut b = vec![0u8; 4096];
    // A "boot": the superblock, then a run, then back to the start.
    c.read(2_000_000, &mut b).unwrap();
    c.read(2_004_096, &mut b).unwrap();
    c.read(0, &mut b).unwrap();
    c.read(2_000_000, &mut b).unwrap();
    c.disconnect();
    // A read is recorded before its reply leaves the server: no waiting.
    let st = rec.stats();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].1.reads, 4);
    assert_eq!(st[0].1.sequential, 1);
    assert_eq!(st[0].1.random(), 3);
    let want: Vec<u32> = (2_000_000 / 1450..=(2_008_192 - 1) / 1450)
        .chain(0..=(4095 / 1450))
        .collect();
    assert_eq!(rec.recorded(&s.sha), want);
    let files = rec.store_all().unwrap();
    assert_eq!(files.len(), 1);
    assert!(rec.store_all().unwrap().is_empty(), "nothing new");
    // The next session streams in that order first, then the rest.
    let lo = fleetboot_streamd::net::resolve_iface("lo").unwrap();
    let spec = SessionSpec::for_image(&s.catalog, "img", lo, None).unwrap();
    assert_eq!(spec.order, want);
    assert!(spec.append_remaining);
    // With a sequence in place, a second recorder only counts.
    let rec2 = Arc::new(Recorder::new(s.catalog.root(), 1450));
    s.exports.set_read_recorder(Some(rec2.clone()));
    let mut c = NbdClient::connect(&s.addr.to_string(), "img").unwrap();
    c.read(8192, &mut b).unwrap();
    c.disconnect();
    assert!(rec2.recorded(&s.sha).is_empty());
    assert_eq!(rec2.stats()[0].1.reads, 1);
    assert!(rec2.store_all().unwrap().is_empty());
    let _ = &s.dir;
}

/// The local export answers like fleetboot's NBD server, because it is the same machine:
/// flags and ranges are checked (EINVAL, ENOSPC), TRIM frees overlay blocks, CACHE fetches
/// into the cache without counting as a read, and BLOCK_STATUS reports received blocks of
/// zeros and zeroed overlay blocks as holes.
#[test]
fn the_local_export_speaks_the_servers_nbd() {
    let img = image();
    let s = server(&img);
    let addr = s.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(AgentDisk::new(SIZE as u64, &addr, "img", None, dir.path()).unwrap());
    let cache = Arc::new(Cache::open(dir.path(), &s.sha, SIZE as u64, 1450).unwrap());
    disk.set_cache(cache.clone());
    // The stream delivered the zero MiB (and the blocks either side of it).
    let (a, b) = cache.block_range(ZEROS as u64, 1 << 20);
    for blk in a..=b {
        let o = blk as usize * 1450;
        cache.put_block(blk, &img[o..(o + 1450).min(SIZE)]).unwrap();
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = l.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (d2, s2) = (disk.clone(), stop.clone());
    let t = std::thread::spawn(move || serve_local(l, d2, "img".into(), s2));

    let mut c = NbdClient::connect(&local, "img").unwrap();
    let size = SIZE as u64;
    let mut buf = vec![0u8; 4096];
    assert_eq!(c.command(cmd::READ, 0x8000, 0, 10, &[], None).unwrap(), errno::EINVAL);
    assert_eq!(c.command(cmd::READ, cmdflags::REQ_ONE, 0, 10, &[], None).unwrap(), errno::EINVAL);
    assert_eq!(c.command(cmd::READ, 0, size, 1, &[], None).unwrap(), errno::EINVAL);
    assert_eq!(c.command(cmd::WRITE, 0, size - 2, 4, &[1, 2, 3, 4], None).unwrap(), errno::ENOSPC);
    assert_eq!(c.command(cmd::TRIM, 0, size, 1, &[], None).unwrap(), errno::EINVAL);
    assert_eq!(c.command(42, 0, 0, 0, &[], None).unwrap(), errno::EINVAL);
    // Without structured replies there is no BLOCK_STATUS.
    assert_eq!(c.command(cmd::BLOCK_STATUS, 0, 0, 4096, &[], None).unwrap(), errno::EINVAL);
    // CACHE pulls blocks into the cache; no read is counted.
    assert!(!cache.has_range(0, 8192));
    assert_eq!(c.command(cmd::CACHE, 0, 0, 8192, &[], None).unwrap(), 0);
    assert!(cache.has_range(0, 8192));
    assert_eq!(disk.stats.reads.load(Ordering::Relaxed), 0);
    // Write, then TRIM the whole overlay block: it reads back as zeros (TRIM may discard).
    assert_eq!(c.command(cmd::WRITE, cmdflags::FUA, 8192, 4096, &[0xEE; 4096], None).unwrap(), 0);
    assert_eq!(c.command(cmd::READ, 0, 8192, 4096, &[], Some(&mut buf)).unwrap(), 0);
    assert!(buf.iter().all(|b| *b == 0xEE), "the write reads back");
    assert_eq!(c.command(cmd::TRIM, 0, 8192, 4096, &[], None).unwrap(), 0);
    assert_eq!(c.command(cmd::READ, 0, 8192, 4096, &[], Some(&mut buf)).unwrap(), 0);
    assert!(buf.iter().all(|b| *b == 0), "a trimmed overlay block is a hole");
    // WRITE_ZEROES over image data (NO_HOLE refuses FAST_ZERO: it would be a write).
    assert_eq!(c.command(cmd::WRITE_ZEROES, 0, 65536, 8192, &[], None).unwrap(), 0);
    assert_eq!(
        c.command(cmd::WRITE_ZEROES, cmdflags::NO_HOLE | cmdflags::FAST_ZERO, 0, 4096, &[], None).unwrap(),
        errno::ENOTSUP
    );
    assert_eq!(c.command(cmd::FLUSH, 0, 0, 0, &[], None).unwrap(), 0);
    // CACHE of the whole disk (fetched a megabyte at a time) fills the cache, except the
    // blocks that lie wholly in what the overlay holds: nothing will read them from there.
    assert_eq!(c.command(cmd::CACHE, 0, 0, SIZE as u32, &[], None).unwrap(), 0);
    assert!(cache.has_range(0, 8192) && cache.has_range(12288, 65536 - 12288));
    assert!(cache.has_range(73728, size - 73728));
    assert!(!cache.has(6) && !cache.has(7), "inside the overlay's [8192, 12288)");
    assert_eq!(disk.stats.reads_fetched.load(Ordering::Relaxed), 0);
    c.disconnect();

    if tools_ready("agent_disk: nbdinfo --map of the local export", &["nbdinfo"]) {
        let out = std::process::Command::new("nbdinfo")
            .args(["--map", &format!("nbd://{local}/img")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let map = String::from_utf8_lossy(&out.stdout).into_owned();
        let holes: Vec<(u64, u64)> = map
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 3 && f[2] == "3")
            .map(|f| (f[0].parse().unwrap(), f[1].parse().unwrap()))
            .collect();
        // The trimmed block, the zeroed blocks, and the received zero MiB are holes;
        // nothing else is. (The zero MiB's hole is what the file system made of its
        // whole cache blocks: it may start and end up to a block and a page inside.)
        assert!(holes.contains(&(8192, 4096)), "{map}");
        assert!(holes.contains(&(65536, 8192)), "{map}");
        assert_eq!(holes.len(), 3, "{map}");
        let (start, len) = holes[2];
        let (zs, ze) = (ZEROS as u64, ZEROS as u64 + (1 << 20));
        let slack = 1450 + 4096;
        assert!(start >= zs && start < zs + slack, "{map}");
        assert!(start + len <= ze && start + len > ze - slack, "{map}");
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}
