//! `fleetboot fleet emulate`: many nodes against one master, for load tests. Each emulated
//! node is the real agent shell (its own storage directory, key and HTTP connection) on a
//! thread; the master is a separate process, measured from outside.

use super::agent::{self, NodeAgentOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use fleetboot_fleet::protocol::Identity;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct EmulateArgs {
    /// The master's URL for its agents (http://HOST:PORT).
    #[arg(long)]
    pub master: String,
    /// The master's operator API, its `[admin]` listener (where the emulation reads
    /// counters and starts the prepare campaign).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub admin: String,
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Where the nodes' storage directories go (created; emptied first).
    #[arg(long)]
    pub work: PathBuf,
    /// MAC of node 0; node i gets this plus i.
    #[arg(long, default_value = "52:54:00:aa:00:00")]
    pub mac_base: fleetboot_boot::MacAddr,
    #[arg(long = "type", default_value = "linecard")]
    pub node_type: String,
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    #[arg(long, default_value_t = 2)]
    pub heartbeat: u64,
    /// Seconds each campaign stage may take.
    #[arg(long, default_value_t = 300)]
    pub deadline: u64,
    /// A file holding a token for the master's operator routes (a `read` token is not
    /// enough: the emulation starts a prepare campaign). Default: the environment's
    /// FLEETBOOT_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The master's pid, to report its CPU time (from /proc).
    #[arg(long)]
    pub master_pid: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// The operator token: from `--token-file`, else FLEETBOOT_TOKEN (never the command line,
/// where every user of the host could read it).
fn operator_token(file: Option<&std::path::Path>) -> Result<String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading the token file {}", f.display()))?,
        None => std::env::var("FLEETBOOT_TOKEN")
            .context("the master's operator routes need a token: --token-file FILE (e.g. the master's data_dir/admin.token) or FLEETBOOT_TOKEN")?,
    };
    Ok(token.trim().to_string())
}

fn get_json(http: &ureq::Agent, url: &str, token: &str) -> Result<Value> {
    let mut r = http.get(url).header("authorization", format!("Bearer {token}")).call()?;
    Ok(serde_json::from_str(&r.body_mut().read_to_string()?)?)
}

fn mac_plus(base: fleetboot_boot::MacAddr, i: usize) -> fleetboot_boot::MacAddr {
    let mut n = 0u64;
    for b in base.0 {
        n = (n << 8) | b as u64;
    }
    n += i as u64;
    let mut out = [0u8; 6];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (n >> (8 * (5 - k))) as u8;
    }
    fleetboot_boot::MacAddr(out)
}

#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    image_bytes: u64,
    package_bytes: u64,
    verifications: u64,
    matches: u64,
    cpu: Option<f64>,
}

pub fn run(a: EmulateArgs) -> Result<()> {
    if a.agents == 0 || a.agents > 5000 {
        bail!("--agents: 1 to 5000");
    }
    let master = a.master.trim_end_matches('/').to_string();
    let admin = a.admin.trim_end_matches('/').to_string();
    let token = operator_token(a.token_file.as_deref())?;
    let http: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).with_context(|| format!("creating {}", a.work.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let snap = |http: &ureq::Agent| -> Result<Snap> {
        let v = get_json(http, &format!("{admin}/api/fleet/counters"), &token)?;
        let t = &v["total"];
        Ok(Snap {
            at: Instant::now(),
            image_bytes: t["image_bytes"].as_u64().unwrap_or(0),
            package_bytes: t["package_bytes"].as_u64().unwrap_or(0),
            verifications: t["verifications"].as_u64().unwrap_or(0),
            matches: t["matches"].as_u64().unwrap_or(0),
            cpu: a.master_pid.and_then(cpu_seconds),
        })
    };
    let s0 = snap(&http)?;
    let mut threads = Vec::new();
    for i in 0..a.agents {
        let opts = NodeAgentOptions {
            masters: vec![master.clone()],
            current: Default::default(),
            storage: a.work.join(format!("node{i}")),
            volatile: a.work.join(format!("node{i}.volatile")),
            identity: Identity { mac: mac_plus(a.mac_base, i), uuid: None, node_type: a.node_type.clone(), arch: a.arch.clone(), location: Some(format!("slot{i}")) },
            features: vec![],
            stay: true,
            heartbeat_ms: a.heartbeat * 1000,
            master_key: None,
            exec: false,
            quiet: true,
            stop: Some(stop.clone()),
        };
        let (stop, failed) = (stop.clone(), failed.clone());
        threads.push(std::thread::Builder::new().stack_size(256 << 10).name(format!("node{i}")).spawn(move || {
            // Boots until told to stop: each reboot the master orders is a new boot.
            while !stop.load(Ordering::Relaxed) {
                match agent::boot(&opts) {
                    Ok(o) if o.reboot => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(node = i, error = %format!("{e:#}"), "emulated node failed");
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        })?);
    }
    let give_up = Instant::now() + Duration::from_secs(a.deadline * 3);
    let result = (|| -> Result<Value> {
        // Stage 0: every node boots pristine, stores, reboots and is verified.
        let s1 = loop {
            let s = snap(&http)?;
            if s.matches - s0.matches >= a.agents as u64 {
                break s;
            }
            if Instant::now() > give_up || failed.load(Ordering::Relaxed) > 0 {
                bail!("{} of {} nodes verified after their pristine boot; {} failed", s.matches - s0.matches, a.agents, failed.load(Ordering::Relaxed));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut r = http.post(format!("{admin}/api/fleet/prepare")).header("content-type", "application/json").header("authorization", format!("Bearer {token}")).send(json!({"deadline_s": a.deadline}).to_string())?;
        let spec: Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
        let id = spec["id"].as_str().context("the master did not start a campaign")?.to_string();
        let s2 = s1;
        let mut warm: Option<Snap> = None;
        let (done, campaign) = loop {
            let cs = get_json(&http, &format!("{admin}/api/fleet/campaigns"), &token)?;
            let c = cs.as_array().and_then(|v| v.iter().find(|c| c["campaign"]["spec"]["id"] == id.as_str())).cloned();
            if let Some(c) = c {
                match c["campaign"]["stage"].as_str() {
                    Some("warm_boot") if warm.is_none() => warm = Some(snap(&http)?),
                    Some("done") => {
                        if warm.is_none() {
                            warm = Some(snap(&http)?);
                        }
                        break (snap(&http)?, c);
                    }
                    _ => {}
                }
            }
            if Instant::now() > give_up {
                bail!("campaign {id} did not finish");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let w = warm.unwrap_or(done);
        let n = a.agents as f64;
        let secs = |x: &Snap, y: &Snap| y.at.duration_since(x.at).as_secs_f64();
        let cpu = |x: &Snap, y: &Snap| match (x.cpu, y.cpu) {
            (Some(a), Some(b)) => json!(b - a),
            _ => Value::Null,
        };
        Ok(json!({
            "agents": a.agents,
            "pristine": {
                "seconds": secs(&s0, &s1),
                "bytes_per_node": ((s1.image_bytes + s1.package_bytes) - (s0.image_bytes + s0.package_bytes)) as f64 / n,
                "master_cpu_s": cpu(&s0, &s1),
            },
            "prepare": {
                "seconds": secs(&s2, &w),
                "image_bytes_per_node": (w.image_bytes - s2.image_bytes) as f64 / n,
                "package_bytes_per_node": (w.package_bytes - s2.package_bytes) as f64 / n,
                "master_cpu_s": cpu(&s2, &w),
            },
            "warm_boot": {
                "seconds": secs(&w, &done),
                "bytes_per_node": ((done.image_bytes + done.package_bytes) - (w.image_bytes + w.package_bytes)) as f64 / n,
                "verifications": done.verifications - w.verifications,
                "verifications_per_s": (done.verifications - w.verifications) as f64 / secs(&w, &done).max(1e-3),
                "master_cpu_s": cpu(&w, &done),
                // What bounds the rate a master sustains, whatever the heartbeat spreads.
                "master_cpu_ms_per_node": match (w.cpu, done.cpu) {
                    (Some(x), Some(y)) => json!((y - x) * 1000.0 / n),
                    _ => Value::Null,
                },
            },
            "tally": campaign["tally"],
        }))
    })();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} emulated nodes", a.agents);
        for stage in ["pristine", "prepare", "warm_boot"] {
            println!("  {stage:<10} {}", report[stage]);
        }
        println!("  tally      {}", report["tally"]);
    }
    let validated = report["tally"]["validated"].as_u64().unwrap_or(0);
    if validated != a.agents as u64 {
        bail!("{validated} of {} nodes validated in the warm boot", a.agents);
    }
    Ok(())
}
