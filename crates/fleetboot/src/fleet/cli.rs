//! `fleetboot node|class|package|bundle|fleet ...`: the master's databases from the command
//! line. They work on the store and the blob directory directly (like `fleetboot image`);
//! a running master sees each change at its next exchange (it polls the store's revision).

use super::db::{self, config_write};
use crate::config::Config;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fleetboot_fleet::bundle::{self, SigningKey, Trust};
use fleetboot_fleet::master::{Campaign, Stage};
use fleetboot_fleet::protocol::Identity;
use fleetboot_fleet::select::{self, Want};
use fleetboot_fleet::{Change, Class, FleetDb, Node, Pin, Version};
use fleetboot_store::Store;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct Common {
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Every node: configuration, last report, verification.
    List(Common),
    Show {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Add a node (or replace its configuration).
    Add {
        name: String,
        #[arg(long)]
        mac: fleetboot_boot::MacAddr,
        #[arg(long = "type")]
        node_type: String,
        #[arg(long)]
        arch: String,
        #[arg(long)]
        class: Option<String>,
        #[arg(long)]
        location: Option<String>,
        /// Choose packages by these features (repeatable).
        #[arg(long = "feature")]
        features: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Change a node's configuration.
    Set {
        name: String,
        #[arg(long)]
        class: Option<String>,
        /// NAME=VERSION, NAME=latest or NAME=none (repeatable): overrides its class.
        #[arg(long = "package", value_name = "NAME=PIN")]
        packages: Vec<String>,
        /// Replace the node's features (repeatable; --no-features clears them).
        #[arg(long = "feature")]
        features: Vec<String>,
        #[arg(long)]
        no_features: bool,
        /// Test mode: run NAME at VERSION without storing it (repeatable).
        #[arg(long = "test", value_name = "NAME=VERSION")]
        test: Vec<String>,
        /// Leave test mode.
        #[arg(long)]
        no_test: bool,
        #[command(flatten)]
        common: Common,
    },
    Remove {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Accept the key the node presented (fleet.enroll = "approve").
    Approve {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Forget the node's key: its next first contact enrolls again (a reinstalled node).
    ForgetKey {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum ClassCommand {
    List(Common),
    /// Create or change a class.
    Set {
        name: String,
        /// The boot image (by name); default: chosen by node type.
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        image_version: Option<Pin>,
        /// NAME=VERSION or NAME=latest (repeatable): the preferred version of a package.
        #[arg(long = "package", value_name = "NAME=PIN")]
        packages: Vec<String>,
        /// Drop a package from the class (repeatable).
        #[arg(long = "unset", value_name = "NAME")]
        unset: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    Remove {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum PackageCommand {
    /// Every version of every image and package (or of NAME).
    List {
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Prefer VERSION of NAME again (in CLASS, or in every class and node that names it);
    /// nodes return to it at their next verification.
    Rollback {
        name: String,
        #[arg(long)]
        to: Version,
        #[arg(long)]
        class: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Forget a version and, once nothing refers to them, its blobs.
    Prune {
        name: String,
        version: Version,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Make a bundle from DIR/bundle.toml and the files it names.
    Build {
        dir: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
        /// Sign with this key (a file made by `bundle keygen`).
        #[arg(long)]
        sign_key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make a signing key pair: PREFIX.key (secret) and PREFIX.pub (for fleet.trusted_bundle_keys).
    Keygen {
        #[arg(long, short)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Install a bundle: every hash, the signature, every dependency and every node's
    /// selection are checked first; then all of it is imported at once, or nothing.
    Import {
        file: PathBuf,
        /// Check only; import nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Prepare all nodes now: reset each (or each of CLASS), serve it, wait until all are
    /// stored (or the deadline), then a warm boot in which nodes only validate.
    Prepare {
        #[arg(long)]
        class: Option<String>,
        /// Seconds each stage may take.
        #[arg(long, default_value_t = 600)]
        deadline: u64,
        /// Start it and return without showing progress.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        common: Common,
    },
    /// The prepare campaigns and where each node stands.
    Status(Common),
    /// Load test: N emulated nodes (real agents, each with its own storage directory and
    /// key, in threads of this process) boot pristine, then go through a prepare campaign
    /// and its warm boot against a running master; prints bytes per node, verification
    /// rate and the master's CPU time.
    Emulate(super::emulate::EmulateArgs),
    /// The master's record of verifications (newest last).
    Verifications {
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        common: Common,
    },
}

/// `fleetboot agent node`.
#[derive(Args)]
pub struct AgentNodeArgs {
    /// The masters' URLs (http://HOST:PORT): repeated or a comma list; the agent tries
    /// the next when one is unreachable, and follows a backup to the current master.
    #[arg(long, value_delimiter = ',', required = true)]
    pub master: Vec<String>,
    /// Local persistent storage.
    #[arg(long)]
    pub storage: PathBuf,
    /// Volatile memory for test packages (emptied at every boot). Default: STORAGE/../volatile.
    #[arg(long)]
    pub volatile: Option<PathBuf>,
    #[arg(long)]
    pub mac: fleetboot_boot::MacAddr,
    #[arg(long = "type")]
    pub node_type: String,
    #[arg(long)]
    pub arch: String,
    #[arg(long)]
    pub location: Option<String>,
    /// Ask for packages by these features (repeatable).
    #[arg(long = "feature")]
    pub features: Vec<String>,
    /// Keep running: heartbeat and obey the master's orders.
    #[arg(long)]
    pub stay: bool,
    #[arg(long, default_value_t = 10)]
    pub heartbeat: u64,
    /// The master's public key (default: trust the first master that answers).
    #[arg(long)]
    pub master_key: Option<String>,
    /// Run each package's `run` file with /bin/sh.
    #[arg(long)]
    pub exec: bool,
    /// Boot again after a reboot request, up to this many boots in all.
    #[arg(long, default_value_t = 1)]
    pub boots: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run_agent(a: AgentNodeArgs) -> Result<()> {
    let volatile = a.volatile.clone().unwrap_or_else(|| a.storage.with_extension("volatile"));
    let opts = super::agent::NodeAgentOptions {
        masters: a.master.iter().map(|m| m.trim().trim_end_matches('/').to_string()).filter(|m| !m.is_empty()).collect(),
        current: Default::default(),
        storage: a.storage,
        volatile,
        identity: Identity { mac: a.mac, uuid: None, node_type: a.node_type, arch: a.arch, location: a.location },
        features: a.features,
        stay: a.stay,
        heartbeat_ms: a.heartbeat.max(1) * 1000,
        master_key: a.master_key,
        exec: a.exec,
        quiet: a.json,
        stop: None,
    };
    super::agent::run(&opts, a.boots, a.json)
}

fn open_store(config: &Path) -> Result<(Config, Store)> {
    let c = Config::load(config)?;
    std::fs::create_dir_all(&c.data_dir).with_context(|| format!("creating data_dir {}", c.data_dir.display()))?;
    let s = c.open_store()?;
    Ok((c, s))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The store writes of operator changes, each with its audit entry (in one transaction).
fn with_audit(db: &FleetDb, changes: &[Change]) -> Vec<fleetboot_store::Write> {
    let actor = crate::token_cli::local_actor();
    changes.iter().flat_map(|c| [config_write(c, None), db::change_audit(db, c, &actor)]).collect()
}

/// Applies operator changes after checking them and every node's selection.
fn commit(store: &Store, db: &FleetDb, changes: Vec<Change>) -> Result<FleetDb> {
    let mut after = db.clone();
    for c in &changes {
        after.apply(c).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut problems = Vec::new();
    for n in after.nodes.values() {
        if let Err(e) = select::select(&after, n, Want::Configured) {
            problems.push(e.to_string());
        }
        if let Err(e) = select::select_test(&after, n, Want::Configured) {
            problems.push(format!("{e} (test mode)"));
        }
    }
    if !problems.is_empty() {
        bail!("refused; after this change {} node(s) could not be served:\n  {}", problems.len(), problems.join("\n  "));
    }
    store.write_blocking(with_audit(db, &changes))?;
    Ok(after)
}

fn pin_pair(s: &str, what: &str) -> Result<(String, Pin)> {
    let (k, v) = s.split_once('=').with_context(|| format!("{what}: want NAME=VERSION, NAME=latest or NAME=none, got {s:?}"))?;
    fleetboot_fleet::model::validate_name(what, k).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((k.to_string(), v.parse().map_err(|e| anyhow::anyhow!("{what}: {e}"))?))
}

fn node_of<'a>(db: &'a FleetDb, name: &str) -> Result<&'a Node> {
    db.nodes.get(name).with_context(|| format!("no node named {name:?}"))
}

fn node_view(store: &Store, db: &FleetDb, n: &Node) -> serde_json::Value {
    let state: fleetboot_fleet::master::NodeState =
        store.fleet_node_state(&n.name).ok().flatten().and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
    serde_json::json!({
        "config": n,
        "state": state,
        "selection": select::select(db, n, Want::Configured)
            .map(|s| s.all().map(|c| format!("{} {}", c.name, c.version)).collect::<Vec<_>>())
            .map_err(|e| e.to_string()),
    })
}

pub fn run_node(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::List(c) => {
            let (_, store) = open_store(&c.config)?;
            let db = db::load(&store)?.db;
            let views: Vec<_> = db.nodes.values().map(|n| node_view(&store, &db, n)).collect();
            if c.json {
                return print_json(&views);
            }
            println!("{:<20} {:<18} {:<12} {:<8} {:<14} {:<10} {:<10} LAST VERIFICATION", "NODE", "MAC", "TYPE", "ARCH", "CLASS", "KEY", "PHASE");
            for (n, v) in db.nodes.values().zip(&views) {
                let lv = &v["state"]["last_verification"];
                println!(
                    "{:<20} {:<18} {:<12} {:<8} {:<14} {:<10} {:<10} {}",
                    n.name,
                    n.mac,
                    n.node_type,
                    n.arch,
                    n.class.as_deref().unwrap_or("-"),
                    if n.key.is_some() { "enrolled" } else if v["state"]["pending_key"].is_string() { "pending" } else { "-" },
                    v["state"]["phase"].as_str().unwrap_or("unknown"),
                    lv["result"].as_str().map(|r| format!("{r} ({} files fetched)", lv["fetch_files"])).unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        NodeCommand::Show { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let v = node_view(&store, &db, node_of(&db, &name)?);
            if common.json {
                return print_json(&v);
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        NodeCommand::Add { name, mac, node_type, arch, class, location, features, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let node = Node {
                name,
                mac,
                uuid: None,
                node_type,
                arch,
                location,
                class,
                features,
                image: None,
                image_version: Pin::Latest,
                packages: BTreeMap::new(),
                test: None,
                key: db.node_by_mac(&mac).and_then(|n| n.key.clone()),
            };
            if let Some(c) = &node.class {
                if !db.classes.contains_key(c) {
                    bail!("--class: {c:?} does not exist");
                }
            }
            commit(&store, &db, vec![Change::PutNode(node.clone())])?;
            if common.json {
                return print_json(&node);
            }
            println!("node {} ({}) saved", node.name, node.mac);
            Ok(())
        }
        NodeCommand::Set { name, class, packages, features, no_features, test, no_test, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let mut n = node_of(&db, &name)?.clone();
            if let Some(c) = class {
                if !db.classes.contains_key(&c) {
                    bail!("--class: {c:?} does not exist");
                }
                n.class = Some(c);
            }
            for p in &packages {
                let (k, v) = pin_pair(p, "--package")?;
                n.packages.insert(k, v);
            }
            if no_features {
                n.features.clear();
            }
            if !features.is_empty() {
                n.features = features;
            }
            if no_test {
                n.test = None;
            }
            if !test.is_empty() {
                let mut t = fleetboot_fleet::model::TestMode::default();
                for s in &test {
                    let (k, v) = s.split_once('=').with_context(|| format!("--test: want NAME=VERSION, got {s:?}"))?;
                    t.packages.insert(k.to_string(), v.parse().map_err(|e| anyhow::anyhow!("--test: {e}"))?);
                }
                n.test = Some(t);
            }
            commit(&store, &db, vec![Change::PutNode(n.clone())])?;
            if common.json {
                return print_json(&n);
            }
            println!("node {} saved", n.name);
            Ok(())
        }
        NodeCommand::Remove { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            node_of(&db, &name)?;
            commit(&store, &db, vec![Change::RemoveNode { name: name.clone() }])?;
            if common.json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("node {name} removed");
            Ok(())
        }
        NodeCommand::Approve { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let mut n = node_of(&db, &name)?.clone();
            let state: fleetboot_fleet::master::NodeState =
                store.fleet_node_state(&name)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
            let key = state.pending_key.with_context(|| format!("node {name} has presented no key yet (has its agent contacted the master?)"))?;
            n.key = Some(key.clone());
            commit(&store, &db, vec![Change::PutNode(n)])?;
            if common.json {
                return print_json(&serde_json::json!({ "node": name, "key": key }));
            }
            println!("node {name}: key {key} approved");
            Ok(())
        }
        NodeCommand::ForgetKey { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let mut n = node_of(&db, &name)?.clone();
            n.key = None;
            commit(&store, &db, vec![Change::PutNode(n)])?;
            if common.json {
                return print_json(&serde_json::json!({ "node": name, "key": null }));
            }
            println!("node {name}: key forgotten; the next key it presents enrolls it");
            Ok(())
        }
    }
}

pub fn run_class(cmd: ClassCommand) -> Result<()> {
    match cmd {
        ClassCommand::List(c) => {
            let (_, store) = open_store(&c.config)?;
            let db = db::load(&store)?.db;
            if c.json {
                return print_json(&db.classes.values().collect::<Vec<_>>());
            }
            for cl in db.classes.values() {
                let pk: Vec<String> = cl.packages.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let members = db.nodes.values().filter(|n| n.class.as_deref() == Some(&cl.name)).count();
                println!("{:<20} image={:<20} {} node(s)  {}", cl.name, cl.image.as_deref().unwrap_or("(by type)"), members, pk.join(" "));
            }
            Ok(())
        }
        ClassCommand::Set { name, image, image_version, packages, unset, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let mut c = db.classes.get(&name).cloned().unwrap_or(Class { name: name.clone(), ..Class::default() });
            if image.is_some() {
                c.image = image;
            }
            if let Some(v) = image_version {
                c.image_version = v;
            }
            for p in &packages {
                let (k, v) = pin_pair(p, "--package")?;
                c.packages.insert(k, v);
            }
            for u in &unset {
                c.packages.remove(u);
            }
            commit(&store, &db, vec![Change::PutClass(c.clone())])?;
            if common.json {
                return print_json(&c);
            }
            println!("class {name} saved");
            Ok(())
        }
        ClassCommand::Remove { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            commit(&store, &db, vec![Change::RemoveClass { name: name.clone() }])?;
            if common.json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("class {name} removed");
            Ok(())
        }
    }
}

pub fn run_package(cmd: PackageCommand) -> Result<()> {
    match cmd {
        PackageCommand::List { name, common } => {
            let (_, store) = open_store(&common.config)?;
            let loaded = db::load(&store)?;
            let list: Vec<_> = loaded.db.all_packages().filter(|p| name.as_ref().is_none_or(|n| *n == p.name)).collect();
            if common.json {
                return print_json(&list);
            }
            println!("{:<8} {:<24} {:<12} {:<20} {:<24} DEPENDS", "KIND", "NAME", "VERSION", "ARCH", "PROVIDES");
            for p in list {
                let arches: Vec<&str> = p.builds.iter().map(|b| b.arch.as_str()).collect();
                let deps: Vec<String> = p.depends.iter().map(|d| format!("{} {}", d.name, d.version)).collect();
                println!("{:<8} {:<24} {:<12} {:<20} {:<24} {}", p.kind.to_string(), p.name, p.version.to_string(), arches.join(","), p.provides.join(","), deps.join("; "));
            }
            Ok(())
        }
        PackageCommand::Rollback { name, to, class, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            if db.package(&name, &to).is_none() {
                let have: Vec<String> = db.versions(&name).map(|p| p.version.to_string()).collect();
                bail!("--to: {name} {to} is not in the package database (versions: {})", if have.is_empty() { "none".into() } else { have.join(", ") });
            }
            let pin = Pin::Exactly(to.clone());
            let mut changes = Vec::new();
            let is_image = db.versions(&name).any(|p| p.kind == fleetboot_fleet::Kind::Image);
            for c in db.classes.values().filter(|c| class.as_ref().is_none_or(|x| *x == c.name)) {
                let mut c2 = c.clone();
                if is_image && c.image.as_deref() == Some(name.as_str()) {
                    c2.image_version = pin.clone();
                } else if is_image && class.is_some() {
                    c2.image = Some(name.clone());
                    c2.image_version = pin.clone();
                } else if c.packages.contains_key(&name) || class.is_some() {
                    c2.packages.insert(name.clone(), pin.clone());
                }
                if c2 != *c {
                    changes.push(Change::PutClass(c2));
                }
            }
            if let Some(c) = &class {
                if !db.classes.contains_key(c) {
                    bail!("--class: {c:?} does not exist");
                }
            } else {
                for n in db.nodes.values().filter(|n| matches!(n.packages.get(&name), Some(Pin::Exactly(_) | Pin::Latest))) {
                    let mut n2 = n.clone();
                    n2.packages.insert(name.clone(), pin.clone());
                    changes.push(Change::PutNode(n2));
                }
            }
            if changes.is_empty() {
                bail!("{name}: no class{} names it; nothing to roll back", class.map(|c| format!(" {c}")).unwrap_or_default());
            }
            let n = changes.len();
            commit(&store, &db, changes)?;
            if common.json {
                return print_json(&serde_json::json!({ "package": name, "to": to, "changed": n }));
            }
            println!("{name} {to} preferred in {n} class(es)/node(s); nodes return to it at their next verification");
            Ok(())
        }
        PackageCommand::Prune { name, version, common } => {
            let (config, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            let after = commit(&store, &db, vec![Change::PrunePackage { name: name.clone(), version: version.clone() }])?;
            let blobs = super::service::blob_store(&config.data_dir)?;
            let (n, bytes) = blobs.collect(&after.referenced_blobs())?;
            if common.json {
                return print_json(&serde_json::json!({ "pruned": format!("{name} {version}"), "blobs_removed": n, "bytes_freed": bytes }));
            }
            println!("{name} {version} pruned; {n} blob(s), {bytes} bytes freed");
            Ok(())
        }
    }
}

pub fn run_bundle(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Build { dir, out, sign_key, json } => {
            let key = match sign_key {
                Some(p) => Some(SigningKey::from_hex(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
                    .with_context(|| format!("{}: not a signing key (64 hex digits)", p.display()))?),
                None => None,
            };
            let built = bundle::build(&dir, &out, key.as_ref())?;
            if json {
                return print_json(&built);
            }
            println!(
                "{}: {} package version(s), {} class(es), {} node(s), {} blob(s), {} bytes{}",
                out.display(),
                built.packages,
                built.classes,
                built.nodes,
                built.blobs,
                built.bytes,
                built.signed_by.map(|k| format!(", signed by {k}")).unwrap_or_default()
            );
            Ok(())
        }
        BundleCommand::Keygen { out, json } => {
            let k = SigningKey::generate().context("the OS random number generator failed")?;
            let secret = out.with_extension("key");
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secret).with_context(|| format!("creating {}", secret.display()))?;
            std::io::Write::write_all(&mut f, k.to_hex().as_bytes())?;
            std::fs::write(out.with_extension("pub"), k.public_hex())?;
            if json {
                return print_json(&serde_json::json!({ "secret": secret, "public": out.with_extension("pub"), "key": k.public_hex() }));
            }
            println!("{} (secret) and {}: public key {}", secret.display(), out.with_extension("pub").display(), k.public_hex());
            Ok(())
        }
        BundleCommand::Import { file, dry_run, common } => {
            let (config, store) = open_store(&common.config)?;
            let fleet = config.fleet.clone().unwrap_or_default();
            let blobs = super::service::blob_store(&config.data_dir)?;
            let db = db::load(&store)?.db;
            let opened = bundle::open(&file, &blobs, &Trust { keys: fleet.trusted_bundle_keys.clone() }).with_context(|| format!("bundle {}", file.display()))?;
            let plan = bundle::plan(&db, &opened).with_context(|| format!("bundle {}", file.display()))?;
            if !dry_run {
                // Blobs first: the database never names a blob that is not in place.
                opened.commit_blobs(&blobs)?;
                store.write_blocking(with_audit(&db, &plan.changes))?;
            }
            if common.json {
                let mut v = serde_json::to_value(&plan)?;
                v["imported"] = serde_json::json!(!dry_run);
                return print_json(&v);
            }
            println!(
                "{}{}: {} new package version(s) [{}], {} unchanged, {} class(es), {} node(s); {} node(s) checked; {} new blob(s), {} bytes{}",
                if dry_run { "dry run, nothing imported — " } else { "imported " },
                file.display(),
                plan.new_packages.len(),
                plan.new_packages.join(", "),
                plan.unchanged_packages.len(),
                plan.classes.len(),
                plan.nodes.len(),
                plan.nodes_checked,
                plan.new_blobs,
                plan.new_bytes,
                plan.signed_by.as_ref().map(|k| format!("; signed by {k}")).unwrap_or_else(|| "; unsigned".into())
            );
            Ok(())
        }
    }
}

fn campaigns(store: &Store) -> Result<Vec<Campaign>> {
    Ok(db::load(store)?.campaigns)
}

fn progress_line(c: &Campaign) -> String {
    let total = c.nodes.len().max(1);
    let mut parts = Vec::new();
    for (state, n) in c.tally() {
        let filled = n * 20 / total;
        parts.push(format!("{state:<14} [{}{}] {n}/{total}", "#".repeat(filled), ".".repeat(20 - filled)));
    }
    format!("{} {:?}\n  {}", c.spec.id, c.stage, parts.join("\n  "))
}

pub fn run_fleet(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Prepare { class, deadline, no_wait, common } => {
            let (_, store) = open_store(&common.config)?;
            let db = db::load(&store)?.db;
            if let Some(c) = &class {
                if !db.classes.contains_key(c) {
                    bail!("--class: {c:?} does not exist");
                }
            }
            let spec = super::service::new_campaign(class, deadline);
            let audit = fleetboot_store::Write::Audit(fleetboot_store::AuditEntry {
                id: 0,
                ts_ms: db::now_ms(),
                actor: crate::token_cli::local_actor(),
                actor_id: None,
                action: "fleet.prepare".into(),
                target: format!("fleet/campaign/{}", spec.id),
                before: None,
                after: serde_json::to_string(&spec).ok(),
                remote: None,
            });
            store.write_blocking(vec![db::campaign_spec_write(&spec), audit])?;
            if no_wait {
                if common.json {
                    return print_json(&spec);
                }
                println!("campaign {} started", spec.id);
                return Ok(());
            }
            // Each stage may take `deadline`; the master reports the rest. Wait a little
            // longer than both for the master's last word.
            let give_up = std::time::Instant::now() + std::time::Duration::from_secs(deadline.saturating_mul(2) + 30);
            let mut last = String::new();
            loop {
                let c = campaigns(&store)?.into_iter().find(|c| c.spec.id == spec.id);
                if let Some(c) = &c {
                    let line = progress_line(c);
                    if line != last && !common.json {
                        println!("{line}");
                        last = line;
                    }
                    if c.stage == Stage::Done {
                        if common.json {
                            return print_json(c);
                        }
                        let bad: Vec<_> = c.nodes.iter().filter(|(_, s)| !matches!(s, fleetboot_fleet::master::PrepState::Validated)).collect();
                        for (n, s) in &bad {
                            println!("  {n}: {s:?}");
                        }
                        return Ok(());
                    }
                }
                if std::time::Instant::now() > give_up {
                    bail!("campaign {}: no master has finished it (is `fleetboot master` running on this store?)", spec.id);
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        FleetCommand::Emulate(args) => super::emulate::run(args),
        FleetCommand::Status(common) => {
            let (_, store) = open_store(&common.config)?;
            let cs = campaigns(&store)?;
            if common.json {
                return print_json(&cs);
            }
            for c in &cs {
                println!("{}", progress_line(c));
            }
            Ok(())
        }
        FleetCommand::Verifications { node, limit, common } => {
            let (_, store) = open_store(&common.config)?;
            let v = store.fleet_verifications(node.as_deref(), limit)?;
            if common.json {
                let out: Vec<_> = v
                    .iter()
                    .map(|r| serde_json::json!({"ts_ms": r.ts_ms, "node": r.node, "result": r.result, "epoch": r.epoch,
                        "detail": serde_json::from_str::<serde_json::Value>(&r.detail).unwrap_or_default()}))
                    .collect();
                return print_json(&out);
            }
            for r in &v {
                println!("{} {:<20} {:<8} {}", crate::trace::format_ms(r.ts_ms), r.node, r.result, r.detail);
            }
            Ok(())
        }
    }
}

/// `fleetboot master`: run the provisioning master (`--config F`), or look at the
/// fleet's masters (`status`).
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MasterArgs {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<MasterCommand>,
}

#[derive(Subcommand)]
pub enum MasterCommand {
    /// Who is master (name, URL, since, lease expiry), the epoch, and each master's and
    /// backup's replication lag (configuration revisions behind, blobs missing).
    Status(Common),
}

/// What `fleetboot master status` shows, from the store.
pub fn master_status(status: &fleetboot_store::cluster::ClusterStatus, ttl_ms: u64) -> serde_json::Value {
    let lease = &status.lease;
    let now = lease.now_ms;
    let holder = lease.holder.as_ref();
    let master = holder.filter(|_| lease.is_held()).map(|h| {
        serde_json::json!({
            "name": h.name, "instance": h.instance, "url": h.url, "since_ms": h.since_ms,
            "expires_ms": h.expires_ms, "expires_in_ms": h.expires_ms.saturating_sub(now),
        })
    });
    let replicas: Vec<_> = status
        .replicas
        .iter()
        .map(|r| {
            let holds = holder.is_some_and(|h| h.instance == r.report.instance) && lease.is_held();
            let seen_ago = now.saturating_sub(r.seen_ms);
            serde_json::json!({
                "name": r.report.name, "instance": r.report.instance, "url": r.report.url,
                "role": r.report.role, "holds_lease": holds,
                "loaded_rev": r.report.loaded_rev,
                "revisions_behind": status.config_rev.saturating_sub(r.report.loaded_rev),
                "blobs_wanted": r.report.blobs_wanted, "blobs_missing": r.report.blobs_missing,
                "bytes_missing": r.report.bytes_missing,
                "seen_ms": r.seen_ms, "seen_ago_ms": seen_ago,
                // Not heard from for three heartbeats: stopped, or cut off from the store.
                "stale": seen_ago > ttl_ms,
            })
        })
        .collect();
    serde_json::json!({
        "epoch": lease.epoch,
        "config_rev": status.config_rev,
        "now_ms": now,
        "master": master,
        "last_holder": holder.map(|h| serde_json::json!({"name": h.name, "instance": h.instance, "url": h.url, "expires_ms": h.expires_ms})),
        "replicas": replicas,
    })
}

pub fn run_master_status(common: Common) -> Result<()> {
    let (config, store) = open_store(&common.config)?;
    let ttl = config.fleet.as_ref().map(|f| f.lease_ttl_ms).unwrap_or(6000);
    let v = master_status(&store.cluster_status()?, ttl);
    if common.json {
        return print_json(&v);
    }
    match v["master"].as_object() {
        Some(m) => println!(
            "master: {} at {} (epoch {}), since {}, lease expires in {} ms",
            m["name"].as_str().unwrap_or(""),
            m["url"].as_str().unwrap_or(""),
            v["epoch"],
            crate::trace::format_ms(m["since_ms"].as_u64().unwrap_or(0)),
            m["expires_in_ms"]
        ),
        None => println!("master: none (epoch {}; the lease is free or expired: a backup takes it after its wait)", v["epoch"]),
    }
    println!("configuration revision {}", v["config_rev"]);
    println!("{:<16} {:<8} {:>12} {:>14} {:>10}  url", "name", "role", "revs behind", "blobs missing", "seen ago");
    for r in v["replicas"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<8} {:>12} {:>14} {:>9}s  {}{}",
            r["name"].as_str().unwrap_or(""),
            r["role"].as_str().unwrap_or(""),
            r["revisions_behind"].to_string(),
            format!("{}/{}", r["blobs_missing"], r["blobs_wanted"]),
            r["seen_ago_ms"].as_u64().unwrap_or(0) / 1000,
            r["url"].as_str().unwrap_or(""),
            if r["stale"] == true { "  (stale)" } else { "" }
        );
    }
    Ok(())
}

pub fn run_master(args: MasterArgs) -> Result<()> {
    match (args.command, args.config) {
        (Some(MasterCommand::Status(common)), _) => run_master_status(common),
        (None, Some(config)) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(super::service::run_standalone(Config::load(&config)?))
        }
        (None, None) => bail!("fleetboot master: --config FILE to run the master, or `fleetboot master status --config FILE`"),
    }
}

#[cfg(test)]
mod tests {
    use fleetboot_store::cluster::{ClusterStatus, MasterHolder, MasterLease, ReplicaReport, ReplicaRow};

    fn row(name: &str, instance: &str, role: &str, loaded_rev: u64, missing: u64, seen_ms: u64) -> ReplicaRow {
        ReplicaRow {
            report: ReplicaReport {
                name: name.into(),
                instance: instance.into(),
                url: format!("http://{name}"),
                role: role.into(),
                loaded_rev,
                blobs_wanted: 4,
                blobs_missing: missing,
                bytes_missing: missing * 10,
            },
            seen_ms,
        }
    }

    #[test]
    fn status_shows_the_master_and_each_backups_lag() {
        let holder = MasterHolder { name: "m2".into(), instance: "m2-1".into(), url: "http://m2".into(), expires_ms: 12_000, since_ms: 5_000 };
        let status = ClusterStatus {
            lease: MasterLease { holder: Some(holder), epoch: 7, now_ms: 10_000, mine: false, taken: false },
            config_rev: 9,
            replicas: vec![row("m1", "m1-9", "backup", 7, 2, 9_500), row("m2", "m2-1", "master", 9, 0, 9_900), row("m3", "m3-1", "backup", 9, 0, 1_000)],
        };
        let v = super::master_status(&status, 6000);
        assert_eq!((v["epoch"].as_u64(), v["master"]["name"].as_str(), v["master"]["expires_in_ms"].as_u64()), (Some(7), Some("m2"), Some(2000)));
        let r = v["replicas"].as_array().unwrap();
        assert_eq!((r[0]["revisions_behind"].as_u64(), r[0]["blobs_missing"].as_u64(), r[0]["holds_lease"].as_bool()), (Some(2), Some(2), Some(false)));
        assert_eq!((r[1]["revisions_behind"].as_u64(), r[1]["holds_lease"].as_bool()), (Some(0), Some(true)));
        assert_eq!((r[0]["stale"].as_bool(), r[2]["stale"].as_bool()), (Some(false), Some(true)), "m3 has not reported for 9 s");
        // An expired lease: no master, the last holder still named.
        let expired = ClusterStatus { lease: MasterLease { now_ms: 13_000, ..status.lease.clone() }, ..status };
        let v = super::master_status(&expired, 6000);
        assert!(v["master"].is_null());
        assert_eq!(v["last_holder"]["name"], "m2");
        assert_eq!(v["replicas"][1]["holds_lease"], false);
    }
}
