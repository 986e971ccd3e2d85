//! `fleetboot-streamd`: the streaming shells as a small standalone tool for the lab, the
//! end-to-end tests and `scripts/bench-multicast.sh` (operators use `fleetboot stream
//! serve` and `fleetboot agent stream`, which call the same library).
//!
//! ```text
//! fleetboot-streamd send    --file IMG --iface IF [--group G:PORT] [--rate B/s]
//!                           [--receivers N] [--solicit SECS] [--sha256 HEX] [--lockstep]
//!                           [--site-secret-file F] [--hash-cache DIR]
//! fleetboot-streamd receive --iface IF --sha256 HEX --out DIR [--group G:PORT]
//!                           [--site-secret-file F]
//! ```
//!
//! Both need the site secret: a 0600 file of 64 hex digits, or `FLEETBOOT_STREAM_SECRET`.
//!
//! The receiver checks the received file against `--sha256`: hashed while the image
//! arrives (read back from the cache file in order), so the check at the end costs only
//! what came last. `RUST_LOG=fleetboot_streamd=debug` shows where a session's time went:
//! the sender's phases and repair rounds, each receiver's completion with the sync and
//! the hash it still took.
//!
//! Each prints one `key=value` summary line on stdout at the end. The receiver's counts
//! what it dropped and why: `bad_signature` (ANNOUNCE, MANIFEST, DONE or ROLE not signed
//! by the sender), `bad_block` (blocks of hash groups whose signed hash did not match:
//! some block of the group was forged or misplaced, the whole group is fetched again;
//! `bad_group` such groups), `conflicting` (a second, different block for a position whose
//! group was still pending), `pending_overflow` (blocks of incomplete groups dropped for
//! want of memory, fetched again), `unverified` (a block ahead of every manifest chunk
//! sent; `ahead_of_chunk` counts blocks kept while their lost chunk was asked for again),
//! `early_dropped` (datagrams that came before REGISTERED, the session key, once 1 MiB of
//! them was kept; `early_kept` counts those kept and checked when it came), `bad_tag` (a
//! datagram without the site or session key), `wrong_session`, `absurd`, `malformed`.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fleetboot_streamd::cache::Cache;
use fleetboot_streamd::net;
use fleetboot_streamd::receiver::{run_receiver, ReceiveSpec};
use fleetboot_streamd::secret;
use fleetboot_streamd::sender::{image_id, run_session, SessionSpec};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "fleetboot-streamd",
    about = "fleetboot multicast streaming (lab tool)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one session of a raw image file.
    Send {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        iface: String,
        #[arg(long)]
        group: Option<SocketAddrV4>,
        /// Rate cap in bytes per second.
        #[arg(long, default_value_t = 50_000_000)]
        rate: u64,
        /// Start once this many receivers registered.
        #[arg(long, default_value_t = 1)]
        receivers: u32,
        /// Solicitation window in seconds (extended until `receivers` registered).
        #[arg(long, default_value_t = 30.0)]
        solicit: f64,
        /// The image's SHA-256 (computed when absent).
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long, default_value_t = 1450)]
        block_size: u16,
        #[arg(long)]
        lockstep: bool,
        /// The site secret's file (else FLEETBOOT_STREAM_SECRET).
        #[arg(long)]
        site_secret_file: Option<PathBuf>,
        /// The sender's ed25519 signing key (mode 0600), created on first use; its
        /// public half is written beside it (`.pub`) for the receivers.
        #[arg(long)]
        signing_key_file: PathBuf,
        /// Keep the image's block hashes in this directory, so the next session of the
        /// same, unchanged file does not hash it again.
        #[arg(long)]
        hash_cache: Option<PathBuf>,
    },
    /// Create the sender's signing key (mode 0600) unless it exists, write its public
    /// half beside it (`.pub`) and print that: what receivers are given.
    Keygen {
        #[arg(long)]
        signing_key_file: PathBuf,
    },
    /// Receive one image into a cache directory.
    Receive {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        group: Option<SocketAddrV4>,
        /// Give up after this many seconds without hearing anything.
        #[arg(long, default_value_t = 60)]
        idle_timeout: u64,
        /// The site secret's file (else FLEETBOOT_STREAM_SECRET).
        #[arg(long)]
        site_secret_file: Option<PathBuf>,
        /// The sender's public key file (its `.pub`; else FLEETBOOT_STREAM_SENDER_KEY).
        #[arg(long)]
        sender_key_file: Option<PathBuf>,
    },
}

fn sha256_file(p: &std::path::Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let stop = AtomicBool::new(false);
    match Cli::parse().cmd {
        Cmd::Send {
            file,
            iface,
            group,
            rate,
            receivers,
            solicit,
            sha256,
            block_size,
            lockstep,
            site_secret_file,
            signing_key_file,
            hash_cache,
        } => {
            let site_secret = secret::resolve(site_secret_file.as_deref(), None)?;
            let signing_key = secret::load_signing_key(&signing_key_file, true)?;
            let sha256 = match sha256 {
                Some(s) => s,
                None => sha256_file(&file)?,
            };
            let id = image_id(&sha256)?;
            let size = std::fs::metadata(&file)?.len();
            let spec = SessionSpec {
                path: file,
                group: group.unwrap_or(SocketAddrV4::new(
                    net::default_group(&id),
                    net::DEFAULT_PORT,
                )),
                sha256,
                size,
                iface: net::resolve_iface(&iface)?,
                ttl: 1,
                block_size,
                rate,
                solicit: Duration::from_secs_f64(solicit),
                min_receivers: receivers,
                start_at: Some(receivers),
                order: Vec::new(),
                append_remaining: true,
                lockstep,
                site_secret,
                signing_key: Some(signing_key),
                ack_every: 16,
                send_buffer: 4 << 20,
                recv_buffer: 4 << 20,
                hash_cache,
            };
            let r = run_session(&spec, &stop, &mut |s| {
                let st = s.stats();
                eprintln!(
                    "phase={:?} data={} fec={} repairs={}+{} bytes={}",
                    s.phase(),
                    st.data_sent,
                    st.fec_sent,
                    st.repair_multicast,
                    st.repair_unicast,
                    st.bytes_sent
                );
            })?;
            println!(
                "session={:08x} elapsed_ms={} bytes_sent={} image_size={} ratio={:.4} receivers={} complete={} data={} fec={} fec_uc={} repair_mc={} repair_uc={} rounds={} reads={} sequential_reads={} file_reads={} hashes={} hashing_ms={}",
                r.session_id,
                r.elapsed.as_millis(),
                r.bytes_sent,
                r.image_size,
                r.bytes_sent as f64 / r.image_size as f64,
                r.receivers,
                r.complete_receivers,
                r.stats.data_sent,
                r.stats.fec_sent,
                r.stats.fec_unicast,
                r.stats.repair_multicast,
                r.stats.repair_unicast,
                r.stats.rounds,
                r.reads,
                r.sequential_reads,
                r.file_reads,
                r.hashes.as_str(),
                r.hashing.as_millis(),
            );
            if r.complete_receivers < r.receivers {
                bail!(
                    "{} of {} receivers incomplete",
                    r.receivers - r.complete_receivers,
                    r.receivers
                );
            }
        }
        Cmd::Keygen { signing_key_file } => {
            let k = secret::load_signing_key(&signing_key_file, true)?;
            let hex: String = k.verifying_key().to_bytes().iter().map(|b| format!("{b:02x}")).collect();
            println!("{hex}");
        }
        Cmd::Receive {
            iface,
            sha256,
            out,
            group,
            idle_timeout,
            site_secret_file,
            sender_key_file,
        } => {
            let id = image_id(&sha256)?;
            let mut spec = ReceiveSpec::new(
                net::resolve_iface(&iface)?,
                group.unwrap_or(SocketAddrV4::new(
                    net::default_group(&id),
                    net::DEFAULT_PORT,
                )),
                id,
            );
            spec.idle_timeout = Duration::from_secs(idle_timeout);
            spec.site_secret = secret::resolve(site_secret_file.as_deref(), None)?;
            spec.sender_key = Some(secret::resolve_public_key(sender_key_file.as_deref())?);
            // The file's SHA-256 as it fills: checking it at the end then costs only the
            // last blocks, not a second pass over the image.
            spec.hash_image = true;
            let name = sha256.clone();
            let (r, cache) = run_receiver(
                &spec,
                &stop,
                &mut |size, bs| Ok(Arc::new(Cache::open(&out, &name, size, bs as u32)?)),
                &mut |p| eprintln!("received {}/{} {:?}", p.blocks, p.total, p.state),
            )?;
            let cache = cache.context("no cache")?;
            let got = match r.sha256.clone() {
                Some(h) => h,
                None => sha256_file(cache.path())?,
            };
            println!(
                "state={:?} elapsed_ms={} blocks={} bytes_received={} data={} repairs={} fec_recovered={} duplicates={} overflow={} \
                 bad_signature={} bad_block={} bad_group={} conflicting={} pending_overflow={} unverified={} ahead_of_chunk={} early_kept={} early_dropped={} bad_tag={} wrong_session={} \
                 absurd={} malformed={} sha256_ok={}",
                r.state,
                r.elapsed.as_millis(),
                r.blocks,
                r.bytes_received,
                r.stats.data_accepted,
                r.stats.repairs_accepted,
                r.stats.fec_recovered,
                r.stats.duplicates,
                r.stats.cache_overflow,
                r.stats.bad_signature,
                r.stats.bad_block,
                r.stats.bad_group,
                r.stats.conflicting,
                r.stats.pending_overflow,
                r.stats.unverified,
                r.stats.ahead_of_chunk,
                r.stats.early_kept,
                r.stats.early_dropped,
                r.stats.forged,
                r.stats.wrong_session,
                r.stats.absurd,
                r.stats.malformed,
                got == sha256
            );
            if got != sha256 {
                bail!("image SHA-256 mismatch: got {got}, want {sha256}");
            }
        }
    }
    Ok(())
}
