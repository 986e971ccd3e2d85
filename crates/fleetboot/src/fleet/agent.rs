//! `fleetboot agent node`: the node agent's shell around `fleetboot_fleet::agent::Agent`.
//!
//! Local storage (`--storage DIR`, the node's persistent disk):
//! `node.key` (the node's identity, generated at first boot, 0600), `master.pub` (the
//! master's key, pinned at first contact), `installed.json` (the stored set) and
//! `blobs/<sha256>`. Test-mode packages go to `--volatile DIR` (memory: a tmpfs on a real
//! node), which each boot empties first — so they are gone after a reboot.
//!
//! One run is one boot; `--boots N` re-runs after a reboot request, as a node would.
//!
//! Masters: the agent knows one or more master URLs (`--master URL`, repeated or a comma
//! list). It asks the one that answered last; on a connection failure, or a master silent
//! for [`MASTER_SILENCE`], it tries the next, and a backup master's
//! `503 {"not_master": true, "master": URL}` sends it to that URL.
//! Only a reply signed with the pinned master key is believed, whichever URL gave it: a
//! forged redirect can cost a retry, not a false plan.

use anyhow::{bail, Context, Result};
use fleetboot_fleet::agent::{Action, Agent, AgentConfig, BootSummary, Local, RunItem};
use fleetboot_fleet::blobs::copy_hashing;
use fleetboot_fleet::protocol::{blob_body, nonce, Envelope, Identity, Installed, KeyPair, SignedReply, MAX_BODY};
use fleetboot_fleet::Sha256;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct NodeAgentOptions {
    /// The masters' URLs, `http://HOST:PORT`, in the order to try them.
    pub masters: Vec<String>,
    /// The master that answered last (shared by the boots of one node).
    pub current: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    pub storage: PathBuf,
    pub volatile: PathBuf,
    pub identity: Identity,
    pub features: Vec<String>,
    pub stay: bool,
    pub heartbeat_ms: u64,
    /// Pin this master key instead of trusting the first master that answers.
    pub master_key: Option<String>,
    /// Execute each package's `run` file with /bin/sh (else only print its marker).
    pub exec: bool,
    pub quiet: bool,
    /// Set by the emulator to end a staying agent at its next wait.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootOutcome {
    pub reboot: bool,
    pub summary: BootSummary,
}

/// How long a master may stay silent — no reply yet, or a download stalled — before the
/// agent gives up on it and asks the next one. A hung or frozen master still accepts
/// connections (the kernel queues them), so without this an agent would wait out the
/// whole request's timeout on it while a backup has long taken over (within 10 s).
const MASTER_SILENCE: Duration = Duration::from_secs(15);

fn now_ms() -> u64 {
    super::db::now_ms()
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn node_key(storage: &Path) -> Result<KeyPair> {
    let p = storage.join("node.key");
    if let Ok(t) = std::fs::read_to_string(&p) {
        return KeyPair::from_hex(&t).with_context(|| format!("{}: not a node key", p.display()));
    }
    let k = KeyPair::generate().context("the OS random number generator failed")?;
    write_atomic(&p, k.secret_hex().as_bytes(), 0o600)?;
    Ok(k)
}

/// The stored set with every file re-hashed (a missing file hashes as empty).
fn read_local(storage: &Path, pinned: Option<&str>) -> Result<Local> {
    let mut stored: Vec<Installed> = match std::fs::read(storage.join("installed.json")) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "installed.json is unreadable: booting as a pristine node");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    for item in &mut stored {
        for f in &mut item.files {
            let (sha, size) = fleetboot_fleet::blobs::hash_file(&storage.join("blobs").join(f.sha256.as_str())).unwrap_or((Sha256::of(b""), 0));
            f.sha256 = sha;
            f.size = size;
        }
    }
    let master_key = match pinned {
        Some(k) => Some(k.to_string()),
        None => std::fs::read_to_string(storage.join("master.pub")).ok().map(|s| s.trim().to_string()),
    };
    Ok(Local { stored, master_key })
}

struct Shell<'a> {
    opts: &'a NodeAgentOptions,
    http: ureq::Agent,
    key: KeyPair,
}

/// What one master said to a request.
enum Answer {
    Served(ureq::http::Response<ureq::Body>),
    /// A backup: ask this URL (the current master) instead, if it named one.
    NotMaster(Option<String>),
}

impl Shell<'_> {
    /// The URLs to try: the one that answered last, then the configured ones.
    fn candidates(&self) -> std::collections::VecDeque<String> {
        let mut out: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        if let Some(c) = self.opts.current.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            out.push_back(c);
        }
        for m in &self.opts.masters {
            if !out.contains(m) {
                out.push_back(m.clone());
            }
        }
        out
    }

    /// Sends a request to the masters in turn until one serves it (not a backup, not
    /// unreachable); each master once at most.
    fn ask(&self, what: &str, request: impl Fn(&str) -> Result<ureq::http::Response<ureq::Body>>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut queue = self.candidates();
        let mut tried: Vec<String> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        while let Some(url) = queue.pop_front() {
            let url = url.trim_end_matches('/').to_string();
            if tried.contains(&url) || tried.len() >= self.opts.masters.len() + 4 {
                continue;
            }
            tried.push(url.clone());
            let answer = request(&url).map(|mut r| {
                if r.status() == 503 {
                    let text = r.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        if v["not_master"] == true {
                            return Answer::NotMaster(v["master"].as_str().map(str::to_string));
                        }
                    }
                    // Some other 503 (the master could not record the exchange): served.
                    return Answer::Served(ureq::http::Response::builder().status(503).body(ureq::Body::builder().data(text)).unwrap_or(r));
                }
                Answer::Served(r)
            });
            match answer {
                Ok(Answer::Served(r)) => {
                    *self.opts.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(url);
                    return Ok(r);
                }
                Ok(Answer::NotMaster(next)) => {
                    errors.push(format!("{url}: a backup master"));
                    if let Some(n) = next {
                        queue.push_front(n);
                    }
                }
                Err(e) => errors.push(format!("{url}: {e:#}")),
            }
        }
        bail!("no master served {what}: {}", errors.join("; "))
    }

    fn send(&self, body: String) -> Result<(SignedReply, String)> {
        let n = nonce();
        let env = Envelope::sign(&self.key, self.opts.identity.mac, now_ms(), n.clone(), body);
        let payload = serde_json::to_string(&env)?;
        let mut resp = self.ask("the request", |url| {
            Ok(self.http.post(format!("{url}/fleet/v1/exchange")).header("content-type", "application/json").send(payload.as_str())?)
        })?;
        let text = resp.body_mut().with_config().limit(MAX_BODY as u64 + 4096).read_to_string()?;
        let reply: SignedReply = serde_json::from_str(&text).with_context(|| format!("HTTP {}: not a signed reply", resp.status()))?;
        Ok((reply, n))
    }

    fn fetch(&self, sha: &Sha256, size: u64, dir: &Path) -> Result<(Sha256, u64)> {
        let mut resp = self.ask(&format!("blob {sha}"), |url| {
            let env = Envelope::sign(&self.key, self.opts.identity.mac, now_ms(), nonce(), blob_body(sha));
            Ok(self.http.get(format!("{url}/fleet/v1/blobs/{sha}")).header("x-fleet-auth", env.to_header()).call()?)
        })?;
        if resp.status() != 200 {
            let text = resp.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
            bail!("HTTP {}: {}", resp.status(), text.trim());
        }
        std::fs::create_dir_all(dir)?;
        let part = dir.join(format!("{sha}.part"));
        let mut f = std::fs::File::create(&part)?;
        let mut body = resp.body_mut().with_config().limit(size + 1).reader();
        let got = copy_hashing(&mut body, &mut f, size + 1);
        let (actual, n) = match got {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e.into());
            }
        };
        f.sync_all()?;
        if actual == *sha {
            std::fs::rename(&part, dir.join(sha.as_str()))?;
        } else {
            let _ = std::fs::remove_file(&part);
        }
        Ok((actual, n))
    }

    fn store(&self, set: &[Installed]) -> Result<()> {
        write_atomic(&self.opts.storage.join("installed.json"), serde_json::to_string_pretty(set)?.as_bytes(), 0o644)?;
        let keep: std::collections::BTreeSet<&str> = set.iter().flat_map(|i| i.files.iter().map(|f| f.sha256.as_str())).collect();
        if let Ok(rd) = std::fs::read_dir(self.opts.storage.join("blobs")) {
            for e in rd.flatten() {
                if !e.file_name().to_str().is_some_and(|n| keep.contains(n)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn blob_path(&self, sha: &Sha256) -> PathBuf {
        let v = self.opts.volatile.join("blobs").join(sha.as_str());
        if v.exists() {
            v
        } else {
            self.opts.storage.join("blobs").join(sha.as_str())
        }
    }

    fn run(&self, items: &[RunItem]) -> Result<()> {
        for i in items {
            let volatile = i.files.iter().any(|f| self.opts.volatile.join("blobs").join(f.sha256.as_str()).exists());
            if !self.opts.quiet {
                println!("fleetboot-agent: run {} {} ({}{})", i.name, i.version, i.kind, if volatile { ", test" } else { "" });
            }
            if self.opts.exec {
                for f in i.files.iter().filter(|f| f.path == "run" || f.path.ends_with("/run")) {
                    let status = std::process::Command::new("/bin/sh").arg(self.blob_path(&f.sha256)).arg(&i.name).arg(i.version.to_string()).status()?;
                    if !status.success() {
                        tracing::warn!(package = %i.name, %status, "package run script failed");
                    }
                }
            }
        }
        Ok(())
    }
}

/// One boot of the node.
pub fn boot(opts: &NodeAgentOptions) -> Result<BootOutcome> {
    std::fs::create_dir_all(opts.storage.join("blobs")).with_context(|| format!("creating {}", opts.storage.display()))?;
    // Memory does not survive a reboot.
    let _ = std::fs::remove_dir_all(&opts.volatile);
    std::fs::create_dir_all(opts.volatile.join("blobs")).with_context(|| format!("creating {}", opts.volatile.display()))?;
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_recv_response(Some(MASTER_SILENCE))
        .timeout_per_read(Some(MASTER_SILENCE))
        .http_status_as_error(false)
        .build()
        .into();
    let shell = Shell { opts, http, key: node_key(&opts.storage)? };
    let local = read_local(&opts.storage, opts.master_key.as_deref())?;
    let mut cfg = AgentConfig::new(opts.identity.clone());
    cfg.features = opts.features.clone();
    cfg.stay = opts.stay;
    cfg.heartbeat_ms = opts.heartbeat_ms;
    let (mut agent, mut actions) = Agent::boot(cfg, local);
    let mut reboot = false;
    while !actions.is_empty() {
        let action = actions.remove(0);
        let more = match action {
            Action::Send(msg) => match shell.send(serde_json::to_string(&msg)?) {
                Ok((reply, n)) => agent.on_reply(&reply, &n, now_ms()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "master unreachable");
                    agent.on_transport_error(&format!("{e:#}"), now_ms())
                }
            },
            Action::Fetch { file, volatile } => {
                let dir = if volatile { opts.volatile.join("blobs") } else { opts.storage.join("blobs") };
                let got = shell.fetch(&file.sha256, file.size, &dir).map_err(|e| format!("{e:#}"));
                agent.on_fetched(&file.sha256, got, now_ms())
            }
            Action::Store(set) => {
                shell.store(&set)?;
                vec![]
            }
            Action::PinMasterKey(k) => {
                write_atomic(&opts.storage.join("master.pub"), k.as_bytes(), 0o644)?;
                vec![]
            }
            Action::Run(items) => {
                shell.run(&items)?;
                vec![]
            }
            Action::Wipe => {
                let _ = std::fs::remove_file(opts.storage.join("installed.json"));
                let _ = std::fs::remove_dir_all(opts.storage.join("blobs"));
                vec![]
            }
            Action::Reboot => {
                reboot = true;
                vec![]
            }
            Action::Wait { until_ms } => {
                while now_ms() < until_ms {
                    if opts.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
                        return Ok(BootOutcome { reboot: false, summary: agent.summary.clone() });
                    }
                    std::thread::sleep(Duration::from_millis(until_ms.saturating_sub(now_ms()).min(100)));
                }
                agent.on_timer(now_ms())
            }
            Action::Exit { ok, reason } => {
                if !ok {
                    bail!("this boot failed: {reason}");
                }
                vec![]
            }
        };
        actions.extend(more);
    }
    Ok(BootOutcome { reboot, summary: agent.summary.clone() })
}

/// Boots until a boot ends without asking for a reboot, at most `max_boots` times.
pub fn run(opts: &NodeAgentOptions, max_boots: usize, json: bool) -> Result<()> {
    for i in 1..=max_boots.max(1) {
        let out = boot(opts)?;
        if json {
            println!("{}", serde_json::to_string(&out)?);
        } else if !opts.quiet {
            let s = &out.summary;
            println!(
                "fleetboot-agent: boot {i}: {} — fetched {} files, {} bytes{}",
                s.verdict.map(|v| format!("{v:?}").to_lowercase()).unwrap_or_else(|| "no plan".into()),
                s.fetched_files,
                s.fetched_bytes,
                if out.reboot { "; reboot" } else { "" }
            );
        }
        if !out.reboot {
            return Ok(());
        }
    }
    Ok(())
}
