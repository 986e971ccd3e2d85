//! The cache's status API (`cache.api_listen`, loopback by default) and its command line.
//!
//! - `GET /api/cache`: objects and their states, hits and misses, bytes from the origin
//!   and served, corruption found, the image map's size, the origin link;
//! - `POST /api/cache/scrub`: re-reads every held chunk from disk and checks it;
//! - `GET /api/trace/{mac}`: a client's boot trace at this cache.
//!
//! `fleetboot cache status|scrub --config F` call it; `fleetboot cache key` prints this
//! cache's public key (for the origin's `[[origin.cache]] key`), `fleetboot cache
//! origin-key` an origin's (for `cache.origin_key`).

use super::Cache;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub fn router(cache: Arc<Cache>) -> Router {
    Router::new()
        .route("/api/cache", get(|State(c): State<Arc<Cache>>| async move { Json(c.status()) }))
        .route("/api/cache/scrub", post(scrub))
        .route("/api/trace/{mac}", get(trace))
        .with_state(cache)
}

pub async fn serve(cache: Arc<Cache>, listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "cache status API listening");
    // Accept errors (out of descriptors) are counted and logged at most every few seconds.
    axum::serve(crate::serve::accept::Accepting::new(listener, "cache_api"), router(cache))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn scrub(State(c): State<Arc<Cache>>) -> Response {
    let corrupt = c.objects.scrub().await;
    Json(json!({"corrupt_chunks": corrupt})).into_response()
}

async fn trace(State(c): State<Arc<Cache>>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<fleetboot_boot::MacAddr>() else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": format!("{mac:?} is not a MAC address")}))).into_response();
    };
    match c.store.trace(&mac.to_string(), 1000) {
        Ok(evs) => Json(evs.iter().map(|e| json!({"ts_ms": e.ts_ms, "mac": e.mac, "kind": e.kind, "detail": e.detail})).collect::<Vec<_>>()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))).into_response(),
    }
}

/// `fleetboot cache`: run a cache, or ask one.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: Option<CacheCommand>,
    /// Run the cache of this config (its [cache] section).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// The running cache's objects, states, hits and misses, bytes from the origin and served.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the whole status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read every object of the running cache from disk and check every chunk.
    Scrub {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print this cache's public key (created on first use), for the origin's
    /// [[origin.cache]] key.
    Key {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print an origin's public key (created on first use), for the caches' origin_key.
    OriginKey {
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub fn run(args: CacheArgs) -> Result<()> {
    match (args.command, args.config) {
        (None, Some(config)) => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(super::run(config))
        }
        (None, None) => bail!("fleetboot cache --config FILE runs a cache; see --help for status, scrub, key, origin-key"),
        (Some(CacheCommand::Status { config, json }), _) => {
            let status: serde_json::Value = serde_json::from_slice(&call(&Config::load(&config)?, "GET", "/api/cache")?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        (Some(CacheCommand::Scrub { config }), _) => {
            let out: serde_json::Value = serde_json::from_slice(&call(&Config::load(&config)?, "POST", "/api/cache/scrub")?)?;
            println!("corrupt chunks found (and fetched again): {}", out["corrupt_chunks"]);
            Ok(())
        }
        (Some(CacheCommand::Key { config }), _) => {
            let config = Config::load(&config)?;
            let cfg = config.cache.context("the config has no [cache] section")?;
            let path = cfg.key_file.unwrap_or_else(|| config.data_dir.join("cache").join("cache.key"));
            println!("{}", fleetboot_cache::keys::public_hex(&super::keyfile::load_or_create(&path)?.verifying_key()));
            Ok(())
        }
        (Some(CacheCommand::OriginKey { config }), _) => {
            let config = Config::load(&config)?;
            let cfg = config.origin.context("the config has no [origin] section")?;
            let path = cfg.key_file.unwrap_or_else(|| config.data_dir.join("origin").join("origin.key"));
            println!("{}", fleetboot_cache::keys::public_hex(&super::keyfile::load_or_create(&path)?.verifying_key()));
            Ok(())
        }
    }
}

/// One request to the running cache's API; the body of a 200.
fn call(config: &Config, method: &str, path: &str) -> Result<Vec<u8>> {
    let cfg = config.cache.as_ref().context("the config has no [cache] section")?;
    let mut addr = cfg.api_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to the cache's API at {addr} (is `fleetboot cache` running?)"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").context("no answer from the cache's API")?;
    let head = String::from_utf8_lossy(&reply[..split]);
    if head.split_whitespace().nth(1).is_none_or(|s| s != "200") {
        bail!("the cache's API answered: {}", head.lines().next().unwrap_or_default());
    }
    Ok(reply[split + 4..].to_vec())
}

fn print_status(s: &serde_json::Value) {
    let mb = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    println!("cache {} — origin {} ({})", s["name"].as_str().unwrap_or("?"), s["origin"].as_str().unwrap_or("?"), match s["origin_down"].as_str() {
        Some(why) => format!("unreachable: {why}"),
        None => "reachable".into(),
    });
    println!(
        "disk {:.1} of {:.1} MiB; hits {} misses {}; from origin {:.1} MiB (objects), served {:.1} MiB; copied locally {:.1} MiB",
        mb(&s["used_bytes"]),
        mb(&s["max_bytes"]),
        s["hits"],
        s["misses"],
        mb(&s["bytes_from_origin"]),
        mb(&s["bytes_served"]),
        mb(&s["bytes_adopted"])
    );
    println!(
        "corrupt chunks: {} on the wire, {} on disk; evictions {}; image map {} clients; scripts {} from the origin, {} from the map, {} refused",
        s["corrupt_chunks_wire"], s["corrupt_chunks_disk"], s["evictions"], s["image_map_clients"], s["plans_from_origin"], s["plans_from_map"], s["refusals"]
    );
    println!("{:<40} {:>7} {:>9} {:>12} {:>7} {:>13}", "OBJECT", "VERSION", "STATE", "SIZE", "PINNED", "CHUNKS");
    for o in s["objects"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>7} {:>9} {:>12} {:>7} {:>13}",
            o["name"].as_str().unwrap_or("?"),
            o["version"],
            o["state"].as_str().unwrap_or("?"),
            o["size"],
            if o["pinned"].as_bool() == Some(true) { "yes" } else { "" },
            format!("{}/{}", o["held_chunks"], o["chunks"])
        );
    }
}
