//! `fleetboot stream serve` and `fleetboot agent stream`: synchronized multicast streaming
//! (`docs/protocols.md`). The shells live in `fleetboot-streamd`; this module is only the CLI.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Subcommand)]
pub enum StreamCommand {
    /// Stream catalog images by multicast: one `[[stream.session]]` per image in the
    /// config's `[stream]` section (the catalog is data_dir/images). The site secret comes
    /// from `stream.site_secret_file` or FLEETBOOT_STREAM_SECRET; without either, one is
    /// created in data_dir/stream/site.secret (0600) for the receivers to copy.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// The provisioning agent of a node: boot from local storage, verified by the master
    /// (pristine: fetch, store, reboot). See `fleetboot agent node --help`.
    Node(crate::fleet::cli::AgentNodeArgs),
    /// Join an image's multicast session, receive it into a local cache and serve it
    /// meanwhile as a local NBD disk (misses are read from the server at once; writes
    /// stay in a local overlay).
    Stream {
        /// The server's NBD address (HOST:PORT; port 10809 when omitted).
        #[arg(long)]
        server: String,
        /// The image: NAME or NAME:VERSION.
        #[arg(long)]
        image: String,
        /// The interface to receive on (name or IPv4 address).
        #[arg(long)]
        interface: String,
        /// The cache directory.
        #[arg(long)]
        cache: PathBuf,
        /// Where the local NBD disk listens.
        #[arg(long, default_value = "127.0.0.1:10810")]
        nbd_listen: String,
        /// The session's group (default: derived from the image digest).
        #[arg(long)]
        group: Option<SocketAddrV4>,
        /// The file holding the server's site secret (64 hex digits, mode 0600; the
        /// server's data_dir/stream/site.secret unless it names another). Without it,
        /// FLEETBOOT_STREAM_SECRET. Never on the command line.
        #[arg(long)]
        site_secret_file: Option<PathBuf>,
        /// The file holding the stream sender's public key (a copy of the server's
        /// data_dir/stream/sender.pub, or the `.pub` beside stream.signing_key_file). Without
        /// it, FLEETBOOT_STREAM_SENDER_KEY; without either the agent does not start: only
        /// blocks the sender signed enter the cache.
        #[arg(long)]
        sender_key_file: Option<PathBuf>,
        /// Exit once the image is complete instead of serving until interrupted.
        #[arg(long)]
        exit_when_complete: bool,
    },
}

/// SIGINT/SIGTERM set the returned flag.
fn stop_on_signals() -> Arc<AtomicBool> {
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::Relaxed) {
            f2.store(true, Ordering::Relaxed);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    });
    flag
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// The `[stream]` section of a config, its images found in the catalog; the images as the
/// sessions name them (for the dashboard) and the data directory.
fn sessions(path: &std::path::Path) -> Result<(fleetboot_streamd::config::StreamSessions, Vec<String>, PathBuf, String)> {
    let config = crate::config::Config::load(path)?;
    let stream = config
        .stream
        .as_ref()
        .with_context(|| format!("config {}: no [stream] section", path.display()))?;
    // Config::parse fills stream.interface in from server.interface, or refuses the file.
    let name = stream.interface.as_deref().context("stream.interface")?;
    let iface = fleetboot_streamd::net::resolve_iface(name)
        .with_context(|| format!("config {}: stream.interface: {name:?}", path.display()))?;
    let catalog = fleetboot_images::Catalog::open_dir(&config.data_dir)
        .with_context(|| format!("opening the image catalog in {}", config.data_dir.display()))?;
    let resolved = stream
        .resolve(&catalog, &iface, &config.data_dir)
        .map_err(|e| anyhow::anyhow!("config {}: stream.{e}", path.display()))?;
    let images = stream.sessions.iter().map(|s| s.image.clone()).collect();
    Ok((resolved, images, config.data_dir.clone(), config.address.to_string()))
}

/// What a sender is doing, in the dashboard's words.
fn state_of(phase: fleetboot_stream::Phase) -> &'static str {
    use fleetboot_stream::Phase;
    match phase {
        Phase::Soliciting => "announcing",
        Phase::Streaming => "sending",
        Phase::LockStep => "lock-step",
        Phase::Repairing => "repairing",
        Phase::Finished => "done",
    }
}

/// The sessions' live figures, gathered from their threads for one status report.
type Live = Arc<std::sync::Mutex<Vec<Option<crate::status::StreamLive>>>>;

/// One session's figures as its sender has them now.
fn live_of(image: &str, spec: &fleetboot_streamd::sender::SessionSpec, snd: &fleetboot_stream::Sender) -> crate::status::StreamLive {
    let st = snd.stats();
    crate::status::StreamLive {
        image: image.to_string(),
        session: format!("{:08x}", snd.session_id()),
        group: spec.group.to_string(),
        state: state_of(snd.phase()).into(),
        receivers: st.registered,
        complete: snd.receivers().filter(|r| r.complete).count() as u32,
        repairs: st.repair_multicast + st.repair_unicast,
        rounds: st.rounds,
        bytes_sent: st.bytes_sent,
        image_size: spec.size,
    }
}

/// Serves the sessions like `fleetboot_streamd::sender::serve_config` (one thread each;
/// with `repeat`, a new session when one ends, until `stop`) and reports each session's
/// figures about once a second to `data_dir/status` for the dashboard (`crate::status`).
fn serve_reporting(
    cfg: &fleetboot_streamd::config::StreamSessions,
    images: &[String],
    data_dir: &std::path::Path,
    server: String,
    stop: Arc<AtomicBool>,
) -> Vec<Result<fleetboot_streamd::sender::SessionReport, fleetboot_streamd::StreamdError>> {
    let live: Live = Arc::new(std::sync::Mutex::new(vec![None; cfg.sessions.len()]));
    let reporter = {
        let (live, stop, data_dir) = (live.clone(), stop.clone(), data_dir.to_path_buf());
        std::thread::Builder::new()
            .name("stream-status".into())
            .spawn(move || {
                let mut writer = crate::status::Writer::new(&data_dir, "stream", server);
                let publish = |w: &mut crate::status::Writer, now| {
                    let streams = live.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().cloned().collect();
                    w.publish(now, streams, Vec::new());
                };
                while !stop.load(Ordering::Relaxed) {
                    publish(&mut writer, std::time::Instant::now());
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                // The last figures (a session's end) are written even if they came within
                // the second after the previous write.
                publish(&mut writer, std::time::Instant::now() + crate::status::WRITE_EVERY);
            })
            .expect("spawning the status thread")
    };
    let mut all = Vec::new();
    loop {
        let handles: Vec<_> = cfg
            .sessions
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let (spec, stop, live) = (spec.clone(), stop.clone(), live.clone());
                let image = images.get(i).cloned().unwrap_or_else(|| spec.sha256.chars().take(12).collect());
                std::thread::Builder::new()
                    .name(format!("stream-{}", spec.group))
                    .spawn(move || {
                        fleetboot_streamd::sender::run_session(&spec, &stop, &mut |snd| {
                            live.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(live_of(&image, &spec, snd));
                        })
                    })
                    .expect("spawning a session thread")
            })
            .collect();
        let reports: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(fleetboot_streamd::StreamdError::Socket("session thread panicked".into()))))
            .collect();
        for r in &reports {
            match r {
                Ok(r) => tracing::info!(
                    session = format_args!("{:08x}", r.session_id),
                    receivers = r.receivers,
                    complete = r.complete_receivers,
                    ratio = r.bytes_sent as f64 / r.image_size as f64,
                    "session report"
                ),
                Err(fleetboot_streamd::StreamdError::Stopped) => {}
                Err(e) => tracing::error!(error = %e, "session failed"),
            }
        }
        all.extend(reports);
        if !cfg.repeat || stop.load(Ordering::Relaxed) {
            break;
        }
        // A session whose socket cannot even open would spin: pause between rounds.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    all
}

pub fn run_stream(cmd: StreamCommand) -> Result<()> {
    init_logs();
    match cmd {
        StreamCommand::Serve { config } => {
            let (cfg, images, data_dir, server) = sessions(&config)?;
            let stop = stop_on_signals();
            let reports = serve_reporting(&cfg, &images, &data_dir, server, stop);
            let failed = reports
                .iter()
                .filter(|r| {
                    !matches!(r, Err(fleetboot_streamd::StreamdError::Stopped))
                        && r.as_ref()
                            .map_or(true, |r| r.complete_receivers < r.receivers)
                })
                .count();
            if failed > 0 {
                bail!("{failed} session(s) failed or left receivers incomplete");
            }
            Ok(())
        }
    }
}

pub fn run_agent(cmd: AgentCommand) -> Result<()> {
    init_logs();
    match cmd {
        AgentCommand::Node(args) => crate::fleet::cli::run_agent(args),
        AgentCommand::Stream {
            server,
            image,
            interface,
            cache,
            nbd_listen,
            group,
            site_secret_file,
            sender_key_file,
            exit_when_complete,
        } => {
            let server = if server.contains(':') {
                server
            } else {
                format!("{server}:10809")
            };
            let site_secret = fleetboot_streamd::secret::resolve(site_secret_file.as_deref(), None)?;
            let sender_key =
                fleetboot_streamd::secret::resolve_public_key(sender_key_file.as_deref())?;
            let cfg = fleetboot_streamd::agent::AgentConfig {
                server,
                image,
                interface,
                cache,
                nbd_listen,
                group,
                site_secret,
                sender_key,
                progress: true,
            };
            let stop = stop_on_signals();
            let r =
                fleetboot_streamd::agent::run_agent(&cfg, stop, exit_when_complete, &mut |a| {
                    println!("agent: local NBD disk at nbd://{a}/{}", cfg.image);
                })?;
            println!(
                "agent: {} ({} bytes) verified={} in {:.1}s; disk reads {} (local {}, fetched {}, {} KiB by unicast)",
                r.sha256,
                r.size,
                r.verified,
                r.elapsed.as_secs_f64(),
                r.reads,
                r.reads_local,
                r.reads_fetched,
                r.bytes_fetched >> 10
            );
            Ok(())
        }
    }
}

/// Sector-sequence learning on the NBD service: images without a sequence
/// learn one from the reads of their clients (stored every 10 s as
/// `images/sequences/<sha256>.seq`); `fleetboot stream serve` streams by it.
pub fn learn_sequences(
    exports: &fleetboot_nbd::Exports,
) -> Arc<fleetboot_streamd::sequence::Recorder> {
    fleetboot_streamd::sequence::install(
        exports,
        1450,
        std::time::Duration::from_secs(10),
        Arc::new(AtomicBool::new(false)),
    )
}
