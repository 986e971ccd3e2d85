//! Edge boot caches on loopback, in this process, no root: an origin (`fleetboot serve`
//! with `[origin]`) and a cache (`fleetboot cache`) with every port picked by the OS,
//! clients speaking HTTP to the cache. Counts decide (bytes the origin sent, chunks found
//! corrupt, states in both tables); timeouts only stop a hung test.

use fleetboot::config::Config;
use fleetboot::serve::Server;
use fleetboot_cache::keys::{from_seed, public_hex, secret_hex};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 64 << 10;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("fleetboot-cache-lo-{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("root")).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// A free loopback port (bound and released: the cache binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Lab {
    dir: Dir,
    origin: Option<Server>,
    origin_addr: SocketAddr,
    /// The origin's view (what `GET /api/origin` on the operators' listener shows).
    origin_view: std::sync::Arc<fleetboot::origin::Origin>,
    origin_key: String,
    cache_cfg: Config,
    cache: Option<fleetboot::cache::Running>,
}

impl Lab {
    /// An origin serving `files` from its root, and a cache (`cache_extra` appended to its
    /// `[cache]` section) listed in it.
    async fn start(name: &str, files: &[(&str, Vec<u8>)], cache_extra: &str, origin_extra: &str) -> Lab {
        let dir = Dir::new(name);
        for (f, bytes) in files {
            std::fs::write(dir.0.join("root").join(f), bytes).unwrap();
        }
        let cache_key = from_seed([name.len() as u8; 32]);
        let key_path = dir.0.join("cache-data/cache/cache.key");
        std::fs::create_dir_all(key_path.parent().unwrap()).unwrap();
        std::fs::write(&key_path, secret_hex(&cache_key)).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cache_http = free_port();
        let origin_text = format!(
            "data_dir = {data:?}\n[server]\naddress = \"127.0.0.1\"\nroot = {root:?}\n[dhcp]\nmode = \"off\"\n\
             [tftp]\nenabled = false\n[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [origin]\nlisten = \"127.0.0.1:0\"\nchunk_size = \"64K\"\nrescan_interval_s = 1\n{origin_extra}\n\
             [[origin.cache]]\nname = \"branch1\"\nkey = \"{key}\"\nurl = \"http://127.0.0.1:{cache_http}\"\n\
             [[profile]]\nname = \"all\"\nboot = {{ kind = \"linux\", kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"x\" }}\n",
            data = dir.0.join("origin-data"),
            root = dir.0.join("root"),
            key = public_hex(&cache_key.verifying_key()),
        );
        let origin = Server::start(Config::parse(&origin_text, &dir.0).unwrap()).await.unwrap();
        let o = fleetboot::origin::of(origin.shared()).expect("an origin");
        let (origin_addr, origin_key) = (o.local_addr(), o.public_key());
        let origin_view = o;
        let cache_text = format!(
            "data_dir = {data:?}\n[server]\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n\
             [http]\nlisten = \"127.0.0.1:{cache_http}\"\n\
             [cache]\nname = \"branch1\"\norigin = \"http://{origin_addr}\"\norigin_key = \"{origin_key}\"\n\
             api_listen = \"127.0.0.1:0\"\norigin_timeout_ms = 1000\n{cache_extra}\n",
            data = dir.0.join("cache-data"),
        );
        let cache_cfg = Config::parse(&cache_text, &dir.0).unwrap();
        let cache = fleetboot::cache::start(cache_cfg.clone()).await.unwrap();
        Lab { dir, origin: Some(origin), origin_addr, origin_view, origin_key, cache_cfg, cache: Some(cache) }
    }

    fn cache(&self) -> &fleetboot::cache::Running {
        self.cache.as_ref().unwrap()
    }

    fn http(&self) -> SocketAddr {
        self.cache().addrs.http.unwrap()
    }

    async fn restart_cache(&mut self) {
        self.cache.take().unwrap().shutdown().await.unwrap();
        self.cache = Some(fleetboot::cache::start(self.cache_cfg.clone()).await.unwrap());
    }

    async fn stop_origin(&mut self) {
        self.origin.take().unwrap().shutdown().await.unwrap();
    }

    fn status(&self) -> serde_json::Value {
        self.cache().cache.status()
    }

    /// Object bytes the origin sent to the cache.
    async fn origin_object_bytes(&self) -> u64 {
        let v = self.origin_view.status();
        v["caches"][0]["stats"]["bytes_objects"].as_u64().unwrap()
    }

    async fn origin_state(&self, name: &str, version: u64) -> Option<String> {
        let v = self.origin_view.status();
        v["caches"][0]["holdings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name && h["version"] == version)
            .map(|h| h["state"].as_str().unwrap().to_string())
    }
}

/// One HTTP/1.0 GET: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
        let status = String::from_utf8_lossy(&all[..split]).split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, all[split + 4..].to_vec())
    })
    .await
    .expect("a GET hung")
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

fn corrupt(path: &Path, offsets: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    for &o in offsets {
        let mut b = [0u8];
        f.read_exact_at(&mut b, o).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, o).unwrap();
    }
}

fn data_file(dir: &Path) -> PathBuf {
    let objects = dir.join("cache-data/cache/objects");
    std::fs::read_dir(&objects)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("an object on disk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_misses_cost_one_fill_and_every_client_gets_the_exact_bytes() {
    let kernel = data(1, 40 * CHUNK + 123);
    let lab = Lab::start("single-flight", &[("vmlinuz", kernel.clone())], "", "").await;
    let want = sha(&kernel);
    let gets: Vec<_> = (0..20).map(|_| tokio::spawn(get(lab.http(), "/files/vmlinuz"))).collect();
    for g in gets {
        let (status, body) = g.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(sha(&body), want);
    }
    // One fill: the origin sent the object once, whatever the number of clients.
    assert_eq!(lab.origin_object_bytes().await, kernel.len() as u64);
    let s = lab.status();
    assert_eq!((s["hits"].as_u64().unwrap() + s["misses"].as_u64().unwrap()), 20);
    assert_eq!(s["bytes_served"].as_u64().unwrap(), 20 * kernel.len() as u64);
    eventually("the origin sees the object verified", async || lab.origin_state("files/vmlinuz", 1).await.as_deref() == Some("verified")).await;
    // Warm: nothing more crosses.
    for _ in 0..5 {
        let (_, body) = get(lab.http(), "/files/vmlinuz").await;
        assert_eq!(sha(&body), want);
    }
    assert_eq!(lab.origin_object_bytes().await, kernel.len() as u64);
    assert!(lab.status()["hits"].as_u64().unwrap() >= 5);
    // A range read comes from the verified chunks too.
    let (_, part) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(part.len(), kernel.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_corrupted_on_disk_are_detected_and_fetched_again() {
    let kernel = data(2, 30 * CHUNK);
    let mut lab = Lab::start("disk-corruption", &[("vmlinuz", kernel.clone())], "", "").await;
    let (_, body) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(sha(&body), sha(&kernel));
    let before = lab.origin_object_bytes().await;
    // Five chunks damaged while the cache is down (its memory holds nothing then).
    lab.cache.take().unwrap().shutdown().await.unwrap();
    let damaged = [0u64, 3, 7, 8, 29];
    corrupt(&data_file(&lab.dir.0), &damaged.map(|c| c * CHUNK as u64 + 1000));
    lab.cache = Some(fleetboot::cache::start(lab.cache_cfg.clone()).await.unwrap());
    let (status, body) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(status, 200);
    assert_eq!(sha(&body), sha(&kernel), "no damaged byte reached the client");
    let s = lab.status();
    assert_eq!(s["corrupt_chunks_disk"], 5);
    assert_eq!(lab.origin_object_bytes().await - before, 5 * CHUNK as u64, "only the damaged chunks crossed again");
    // Damage while running is found by a scrub.
    corrupt(&data_file(&lab.dir.0), &[12 * CHUNK as u64]);
    assert_eq!(lab.cache().cache.objects.scrub().await, 1);
    let (_, body) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(sha(&body), sha(&kernel));
    lab.restart_cache().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_moves_only_changed_chunks_and_clients_get_it_once_verified() {
    let mut kernel = data(3, 32 * CHUNK);
    let lab = Lab::start("update", &[("vmlinuz", kernel.clone()), ("initrd.gz", data(4, 3 * CHUNK))], "", "").await;
    let mac = "52:54:00:00:00:01";
    let (_, script) = get(lab.http(), &format!("/boot/{}.ipxe", mac.replace(':', "-"))).await;
    let script = String::from_utf8(script).unwrap();
    assert!(script.contains(&format!("http://127.0.0.1:{}/files/vmlinuz", lab.http().port())), "{script}");
    let (_, body) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(sha(&body), sha(&kernel));
    eventually("v1 verified at the origin", async || lab.origin_state("files/vmlinuz", 1).await.as_deref() == Some("verified")).await;
    let before = lab.origin_object_bytes().await;
    // Two chunks change at the origin.
    kernel[5 * CHUNK + 10] ^= 1;
    kernel[20 * CHUNK + 10] ^= 1;
    std::fs::write(lab.dir.0.join("root/vmlinuz"), &kernel).unwrap();
    // The rescan publishes v2, the cache is told, fetches it (two chunks) and reports it.
    eventually("v2 verified at the origin", async || lab.origin_state("files/vmlinuz", 2).await.as_deref() == Some("verified")).await;
    assert_eq!(lab.origin_object_bytes().await - before, 2 * CHUNK as u64, "only the changed chunks crossed");
    assert_eq!(lab.status()["bytes_adopted"].as_u64().unwrap(), 30 * CHUNK as u64);
    // Clients now get v2.
    let (_, script2) = get(lab.http(), &format!("/boot/{}.ipxe", mac.replace(':', "-"))).await;
    assert!(!script2.is_empty());
    let (_, body) = get(lab.http(), "/files/vmlinuz").await;
    assert_eq!(sha(&body), sha(&kernel));
    eventually("v1 stale at the origin", async || lab.origin_state("files/vmlinuz", 1).await.as_deref() == Some("stale")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_origin_down_known_clients_boot_and_others_are_told_why() {
    let mut lab = Lab::start("offline", &[("vmlinuz", data(5, 4 * CHUNK)), ("initrd.gz", data(6, CHUNK))], "", "").await;
    let known = "52-54-00-00-00-0a";
    let (_, script) = get(lab.http(), &format!("/boot/{known}.ipxe")).await;
    assert!(String::from_utf8_lossy(&script).contains("kernel "));
    for f in ["vmlinuz", "initrd.gz"] {
        assert_eq!(get(lab.http(), &format!("/files/{f}")).await.0, 200);
    }
    eventually("both verified", async || lab.cache().cache.objects.holdings().iter().filter(|h| h.state == fleetboot_cache::State::Verified).count() == 2).await;
    lab.stop_origin().await;
    let (status, script) = get(lab.http(), &format!("/boot/{known}.ipxe")).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&script).contains("kernel "), "the image map's script");
    assert_eq!(get(lab.http(), "/files/vmlinuz").await.0, 200);
    let (_, refused) = get(lab.http(), "/boot/52-54-00-00-00-0b.ipxe").await;
    let refused = String::from_utf8(refused).unwrap();
    assert!(refused.contains("is not in this cache's image map and the origin is unreachable"), "{refused}");
    assert!(refused.contains("exit"));
    let s = lab.status();
    assert_eq!((s["plans_from_map"].as_u64(), s["refusals"].as_u64()), (Some(1), Some(1)));
    let trace = lab.cache().cache.status();
    assert!(trace["origin_down"].is_string());
    // The refusal is in the client's trace at the cache.
    let api = lab.cache().addrs.api.unwrap();
    eventually("the refusal is in the trace", async || {
        let (_, t) = get(api, "/api/trace/52-54-00-00-00-0b").await;
        String::from_utf8_lossy(&t).contains("CACHE-REFUSED")
    })
    .await;
    let _ = &lab.origin_key;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disk_limit_evicts_the_least_recently_used_unpinned_object() {
    let lab = Lab::start(
        "lru",
        &[("a", data(7, 20 * CHUNK)), ("b", data(8, 20 * CHUNK)), ("c", data(9, 20 * CHUNK))],
        "max_size = \"3M\"",
        "",
    )
    .await;
    for f in ["a", "b"] {
        assert_eq!(get(lab.http(), &format!("/files/{f}")).await.0, 200);
    }
    eventually("a and b verified", async || lab.status()["objects"].as_array().unwrap().iter().filter(|o| o["state"] == "verified").count() == 2).await;
    assert_eq!(get(lab.http(), "/files/a").await.0, 200); // a is now the more recently used
    let (status, body) = get(lab.http(), "/files/c").await;
    assert_eq!((status, sha(&body)), (200, sha(&data(9, 20 * CHUNK))));
    let names: Vec<String> = lab.status()["objects"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec!["files/a", "files/c"], "b, least recently used, went");
    assert_eq!(lab.status()["evictions"], 1);
    eventually("the origin sees b evicted", async || lab.origin_state("files/b", 1).await.as_deref() == Some("evicted")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_and_forged_origins_are_refused() {
    let lab = Lab::start("auth", &[("vmlinuz", data(10, CHUNK))], "", "").await;
    // No signature, or a key the origin does not list: refused.
    let (status, _) = get(lab.origin_addr, "/cache/v1/plan/52-54-00-00-00-01").await;
    assert_eq!(status, 401);
    // A cache that trusts another origin key serves nothing the real origin signed.
    let wrong = public_hex(&from_seed([99; 32]).verifying_key());
    let text = format!(
        "data_dir = {data:?}\n[server]\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[cache]\nname = \"branch1\"\norigin = \"http://{o}\"\norigin_key = \"{wrong}\"\napi_listen = \"127.0.0.1:0\"\n",
        data = lab.dir.0.join("cache-data"),
        o = lab.origin_addr,
    );
    // (the first cache must go: they share a data directory)
    let mut lab = lab;
    lab.cache.take().unwrap().shutdown().await.unwrap();
    let fooled = fleetboot::cache::start(Config::parse(&text, &lab.dir.0).unwrap()).await.unwrap();
    let (status, body) = get(fooled.addrs.http.unwrap(), "/files/vmlinuz").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("signature"), "{}", String::from_utf8_lossy(&body));
    fooled.shutdown().await.unwrap();
}
