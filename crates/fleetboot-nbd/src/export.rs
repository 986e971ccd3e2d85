//! Export names → catalog images and overlays.
//!
//! An export name is `IMAGE`, `IMAGE:VERSION`, `IMAGE@MAC` or `IMAGE:VERSION@MAC`
//! (MAC as `52-54-00-77-00-10`, `52:54:00:77:00:10` or `525400770010`), optionally
//! followed by `~CAPABILITY` after the MAC (see [`ExportName::capability`]):
//! - without a MAC the export is the shared image, read-only (writes fail with EPERM);
//! - with a MAC the client gets its own copy-on-write overlay, keyed by (image content,
//!   MAC, mode) — the MAC comes from the export name the boot plan gives the client, never
//!   from who connects first. Whether the peer may act as that client is the server's
//!   [`crate::access::Access`]; once the overlay is open, it belongs to the address that
//!   opened it until its last connection closes (another host cannot join it). All
//!   connections of one client share one overlay, so a FLUSH
//!   on any of them covers the writes of all of them and `NBD_FLAG_CAN_MULTI_CONN` is
//!   honest. The overlay is released when the client's last connection closes: a standard
//!   overlay is then gone, a private one is flushed and kept under
//!   `<data_dir>/overlays/private/<sha256>/<mac>/`.
//!
//! A private overlay belongs to one image *content* (SHA-256): importing a new version under
//! the same name gives clients that ask for `IMAGE` a fresh overlay over the new version,
//! and leaves the old one for `IMAGE:OLDVERSION`.

use crate::device::{BlockDevice, ImageFile};
use crate::handshake::{ExportInfo, LookupError};
use crate::overlay::{self, Overlay, OverlayMode};
use fleetboot_boot::MacAddr;
use fleetboot_images::{Catalog, Error as CatalogError, ImageRef, ImageVersion};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How [`Exports`] makes overlays.
#[derive(Debug, Clone)]
pub struct ExportsConfig {
    /// Overlays live under `<data_dir>/overlays/`.
    pub data_dir: PathBuf,
    /// The overlay mode of images not named in `modes`.
    pub default_mode: OverlayMode,
    /// Per image name overrides of the mode.
    pub modes: HashMap<String, OverlayMode>,
    /// Copy-on-write block size of new overlays (a power of two, 512 B..4 MiB). Changing it
    /// makes existing private overlays unreadable (their map records the block size).
    pub block_size: u32,
    /// At most this many bytes of blocks a client writes into its overlay (one image, one
    /// MAC); writes that would map more fail with ENOSPC. `None`: the image's size.
    pub overlay_quota: Option<u64>,
}

impl ExportsConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ExportsConfig {
        ExportsConfig {
            data_dir: data_dir.into(),
            default_mode: OverlayMode::Standard,
            modes: HashMap::new(),
            block_size: overlay::DEFAULT_BLOCK_SIZE,
            overlay_quota: None,
        }
    }
}

/// The longest capability an export name may carry.
pub const MAX_CAPABILITY_LEN: usize = 256;

/// A parsed export name.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportName {
    pub image: ImageRef,
    /// The client's MAC, normalized to `aa-bb-cc-dd-ee-ff`.
    pub client: Option<String>,
    /// `IMAGE@MAC~CAPABILITY`: a token the boot plan handed the client, for networks where
    /// the address a client connects from proves nothing about it (ProxyDHCP, where
    /// another server hands out addresses). 1 to [`MAX_CAPABILITY_LEN`] characters of
    /// `A-Z a-z 0-9 . _ -`; what it proves is the [`crate::access::ClientAuthority`]'s
    /// business. Never shown by `Display` or `Debug`: it works like a password.
    pub capability: Option<String>,
}

impl std::fmt::Debug for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportName")
            .field("image", &self.image)
            .field("client", &self.client)
            .field("capability", &self.capability.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

fn capability_ok(c: &str) -> bool {
    (1..=MAX_CAPABILITY_LEN).contains(&c.len())
        && c.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ExportName {
    /// Parses a name a client sent. Error messages never repeat a capability.
    pub fn parse(s: &str) -> Result<ExportName, String> {
        let (img, client, capability) = match s.rsplit_once('@') {
            Some((i, rest)) => {
                let (m, cap) = match rest.split_once('~') {
                    Some((m, c)) if capability_ok(c) => (m, Some(c.to_string())),
                    Some(_) => return Err(format!("bad capability in the export name for image {i:?}")),
                    None => (rest, None),
                };
                let mac = normalize_mac(m).ok_or_else(|| format!("bad MAC {m:?} in the export name for image {i:?}"))?;
                (i, Some(mac), cap)
            }
            None => (s, None, None),
        };
        let image = ImageRef::parse(img).map_err(|e| e.to_string())?;
        Ok(ExportName { image, client, capability })
    }

    /// The client's MAC, for a client's overlay export.
    pub fn mac(&self) -> Option<MacAddr> {
        self.client.as_deref().and_then(|m| m.parse().ok())
    }
}

/// `IMAGE[:VERSION][@MAC]`: the capability is left out.
impl std::fmt::Display for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.client {
            Some(m) => write!(f, "{}@{}", self.image, m),
            None => write!(f, "{}", self.image),
        }
    }
}

/// `52:54:00:77:00:10`, `52-54-00-77-00-10` or `525400770010` → `52-54-00-77-00-10`.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    let seps = s.len() - hex.len();
    if hex.len() != 12 || !(seps == 0 || seps == 5) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(
        (0..6)
            .map(|i| &h[i * 2..i * 2 + 2])
            .collect::<Vec<_>>()
            .join("-"),
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OverlayKey {
    sha256: String,
    mac: String,
    mode: OverlayMode,
}

#[derive(Debug)]
struct SharedOverlay {
    overlay: Arc<Overlay>,
    conns: usize,
    /// The address that opened it: the only one that may join it while it is live.
    holder: IpAddr,
}

/// One connection's export: released (and a client's last release closes its overlay) on drop.
#[derive(Debug)]
pub struct Export {
    pub name: ExportName,
    pub image: ImageVersion,
    /// The image read-only, or the client's overlay over it.
    pub disk: Arc<dyn BlockDevice>,
    release: Option<(Arc<Exports>, OverlayKey)>,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some((exports, key)) = self.release.take() {
            exports.release(&key);
        }
    }
}

/// Observes the reads clients make of catalog images, in the order the server handles
/// them: sector-sequence learning (`docs/protocols.md`) records the blocks a booting client reads.
/// Called on the connection's task for every successful READ: keep it cheap (append to a
/// buffer under a short lock).
pub trait ReadRecorder: Send + Sync + std::fmt::Debug {
    /// A client of `image` read `len` bytes at `offset` (through its overlay or not).
    fn record_read(&self, image: &ImageVersion, offset: u64, len: u32);
}

/// The catalog's images as NBD exports, with the live overlays.
#[derive(Debug)]
pub struct Exports {
    catalog: Catalog,
    cfg: ExportsConfig,
    overlays: Mutex<HashMap<OverlayKey, SharedOverlay>>,
    recorder: std::sync::RwLock<Option<Arc<dyn ReadRecorder>>>,
}

fn catalog_error(name: &ExportName, e: CatalogError) -> LookupError {
    match e {
        CatalogError::NotFound(_) | CatalogError::InvalidRef(_) | CatalogError::InvalidName(_) => {
            LookupError::Unknown(format!("no export {:?}", name.to_string()))
        }
        e => LookupError::Failed(e.to_string()),
    }
}

impl Exports {
    pub fn new(catalog: Catalog, cfg: ExportsConfig) -> io::Result<Arc<Exports>> {
        overlay::create_dir_durably(&cfg.data_dir.join("overlays").join("private"))?;
        overlay::create_dir_durably(&cfg.data_dir.join("overlays").join("standard"))?;
        Ok(Arc::new(Exports {
            catalog,
            cfg,
            overlays: Mutex::new(HashMap::new()),
            recorder: std::sync::RwLock::new(None),
        }))
    }

    /// Installs (or with `None` removes) the [`ReadRecorder`]; connections opened from now
    /// on report their reads to it.
    pub fn set_read_recorder(&self, recorder: Option<Arc<dyn ReadRecorder>>) {
        *self.recorder.write().unwrap_or_else(|e| e.into_inner()) = recorder;
    }

    /// The installed [`ReadRecorder`].
    pub fn read_recorder(&self) -> Option<Arc<dyn ReadRecorder>> {
        self.recorder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn config(&self) -> &ExportsConfig {
        &self.cfg
    }

    /// The overlay mode of an image name.
    pub fn mode_for(&self, image: &str) -> OverlayMode {
        self.cfg
            .modes
            .get(image)
            .copied()
            .unwrap_or(self.cfg.default_mode)
    }

    /// Where the private overlay of (image content, MAC) lives.
    pub fn private_dir(&self, sha256: &str, mac: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("overlays")
            .join("private")
            .join(sha256)
            .join(mac)
    }

    /// Every image as `NAME` and `NAME:VERSION`, for `NBD_OPT_LIST`.
    pub fn list(&self) -> Vec<(String, String)> {
        let Ok(images) = self.catalog.list() else {
            return Vec::new();
        };
        let mut v = Vec::new();
        let mut latest: HashMap<&str, &ImageVersion> = HashMap::new();
        for i in &images {
            latest.insert(&i.name, i);
        }
        let mut names: Vec<_> = latest.into_iter().collect();
        names.sort_by_key(|(n, _)| *n);
        for (n, i) in names {
            v.push((
                n.to_string(),
                format!("{} (latest, {} bytes)", i.reference(), i.size),
            ));
        }
        for i in &images {
            v.push((
                i.reference(),
                format!("{} bytes, sha256 {}", i.size, i.sha256),
            ));
        }
        v
    }

    fn info(name: &ExportName, image: &ImageVersion) -> ExportInfo {
        ExportInfo {
            size: image.size,
            read_only: name.client.is_none(),
            // Read-only data never changes; a client's connections share one overlay.
            multi_conn: true,
            description: format!("{} sha256:{}", image.reference(), image.sha256),
        }
    }

    /// Describes an export without opening it (`NBD_OPT_INFO`, meta context options).
    pub fn describe(&self, en: &ExportName) -> Result<ExportInfo, LookupError> {
        let image = self
            .catalog
            .resolve_ref(&en.image)
            .map_err(|e| catalog_error(en, e))?;
        Ok(Self::info(en, &image))
    }

    /// Opens an export for one connection from `peer`. A client's overlay is created on
    /// the first open; while it is live, only `peer`'s address may open it again. Whether
    /// `peer` may act as the client at all is for the caller to check first
    /// ([`crate::access::Access`]).
    pub fn open(self: &Arc<Self>, en: &ExportName, peer: IpAddr) -> Result<(Export, ExportInfo), LookupError> {
        let version = self
            .catalog
            .resolve_ref(&en.image)
            .map_err(|e| catalog_error(en, e))?;
        let img = self
            .catalog
            .open_version(version)
            .map_err(|e| catalog_error(en, e))?;
        let info = Self::info(en, &img.version);
        let base: Arc<dyn BlockDevice> = Arc::new(ImageFile::new(Arc::new(img.file), img.size));
        let Some(mac) = en.client.clone() else {
            let export = Export {
                name: en.clone(),
                image: img.version,
                disk: base,
                release: None,
            };
            return Ok((export, info));
        };
        let mode = self.mode_for(&en.image.name);
        let key = OverlayKey {
            sha256: img.version.sha256.clone(),
            mac: mac.clone(),
            mode,
        };
        let overlay = {
            let mut live = self.overlays.lock().unwrap();
            if let Some(s) = live.get_mut(&key) {
                if s.holder != peer {
                    return Err(LookupError::Policy(format!(
                        "the overlay of {en} is in use by another host"
                    )));
                }
                s.conns += 1;
                s.overlay.clone()
            } else {
                let ov = match mode {
                    OverlayMode::Standard => Overlay::standard(
                        base,
                        self.cfg.block_size,
                        &self.cfg.data_dir.join("overlays").join("standard"),
                    ),
                    OverlayMode::Private => Overlay::private(
                        base,
                        self.cfg.block_size,
                        &self.private_dir(&key.sha256, &mac),
                    ),
                }
                .map_err(|e| LookupError::Failed(format!("overlay for {en}: {e}")))?
                .with_quota(self.cfg.overlay_quota);
                let ov = Arc::new(ov);
                tracing::info!(export = %en, %mode, %peer, mapped_blocks = ov.mapped_blocks(), "overlay opened");
                live.insert(
                    key.clone(),
                    SharedOverlay {
                        overlay: ov.clone(),
                        conns: 1,
                        holder: peer,
                    },
                );
                ov
            }
        };
        let export = Export {
            name: en.clone(),
            image: img.version,
            disk: overlay,
            release: Some((self.clone(), key)),
        };
        Ok((export, info))
    }

    fn release(&self, key: &OverlayKey) {
        let mut live = self.overlays.lock().unwrap();
        let Some(s) = live.get_mut(key) else { return };
        s.conns -= 1;
        if s.conns > 0 {
            return;
        }
        let s = live.remove(key).expect("present");
        // Closed under the lock, so a reconnect cannot open the same private overlay twice.
        if let Err(e) = s.overlay.close() {
            tracing::error!(mac = %key.mac, sha256 = %key.sha256, error = %e, "closing overlay");
        }
        tracing::info!(mac = %key.mac, sha256 = %key.sha256, mode = %key.mode, "overlay released");
    }

    /// Live overlays: (image sha256, MAC, mode, connections, mapped blocks).
    pub fn live_overlays(&self) -> Vec<(String, String, OverlayMode, usize, u64)> {
        let live = self.overlays.lock().unwrap();
        live.iter()
            .map(|(k, s)| {
                (
                    k.sha256.clone(),
                    k.mac.clone(),
                    k.mode,
                    s.conns,
                    s.overlay.mapped_blocks(),
                )
            })
            .collect()
    }

    /// Deletes the private overlay of `image` (NAME or NAME:VERSION) for `mac`: the client
    /// starts over from the image. Refused while the client is connected. Returns whether
    /// there was one.
    pub fn discard_private(&self, image: &str, mac: &str) -> io::Result<bool> {
        let mac = normalize_mac(mac)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad MAC"))?;
        let v = self
            .catalog
            .resolve(image)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
        let live = self.overlays.lock().unwrap();
        let key = OverlayKey {
            sha256: v.sha256.clone(),
            mac: mac.clone(),
            mode: OverlayMode::Private,
        };
        if live.contains_key(&key) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the client is connected",
            ));
        }
        let dir = self.private_dir(&v.sha256, &mac);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        let e = ExportName::parse("deb:2@52:54:00:77:00:1A").unwrap();
        assert_eq!(
            e.image,
            ImageRef {
                name: "deb".into(),
                version: Some(2)
            }
        );
        assert_eq!(e.client.as_deref(), Some("52-54-00-77-00-1a"));
        assert_eq!(e.to_string(), "deb:2@52-54-00-77-00-1a");
        assert_eq!(ExportName::parse("deb").unwrap().client, None);
        assert_eq!(
            ExportName::parse("deb@525400770010")
                .unwrap()
                .client
                .as_deref(),
            Some("52-54-00-77-00-10")
        );
        for bad in [
            "",
            "@52-54-00-77-00-10",
            "deb@",
            "deb@52-54-00-77-00",
            "deb@zz-54-00-77-00-10",
            "deb:0",
            "d/b",
            "deb@52-5400-77-00-10",
            "deb~abc",
            "deb@52-54-00-77-00-10~",
            "deb@52-54-00-77-00-10~a/b",
            "deb@52-54-00-77-00-10~a~b",
            "deb@52-54-00-77-00-10~a@b",
        ] {
            assert!(ExportName::parse(bad).is_err(), "{bad}");
        }
        let long = format!("deb@52-54-00-77-00-10~{}", "x".repeat(MAX_CAPABILITY_LEN + 1));
        assert!(ExportName::parse(&long).is_err());
    }

    #[test]
    fn a_capability_rides_after_the_mac_and_is_never_shown() {
        let e = ExportName::parse("deb:3@52-54-00-77-00-1a~1767225600.Zm9vYmFy-_x").unwrap();
        assert_eq!(e.client.as_deref(), Some("52-54-00-77-00-1a"));
        assert_eq!(e.mac(), Some("52:54:00:77:00:1a".parse().unwrap()));
        assert_eq!(e.capability.as_deref(), Some("1767225600.Zm9vYmFy-_x"));
        assert_eq!(e.to_string(), "deb:3@52-54-00-77-00-1a");
        assert!(!format!("{e:?}").contains("Zm9v"), "{e:?}");
        let err = ExportName::parse("deb@zz-54-00-77-00-10~secret123").unwrap_err();
        assert!(!err.contains("secret123"), "{err}");
        let err = ExportName::parse("deb@52-54-00-77-00-10~secret/123").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }
}
