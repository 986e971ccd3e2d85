//! The operator's view of the origin, mounted under `/api/origin` of the operators' API
//! (`admin.listen`: a token with role `read` to look, `admin` to prestage; audited):
//!
//! - `GET /api/origin`: the origin key, every cache (what it holds in which state, the
//!   bytes sent to it, what it reported of itself) and every published version;
//! - `POST /api/origin/prestage` `{"cache": "branch1", "object": "vmlinuz"}`: the cache
//!   fetches the object and holds it pinned (the newest version, and each new one).

use super::{lock, Origin};
use crate::serve::shared::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// The routes, for a server whose origin may start after its HTTP service.
pub fn service(shared: &Arc<Shared>) -> Router {
    Router::new().route("/", get(show)).route("/prestage", post(prestage)).with_state(shared.clone())
}

// The error is the 404 itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn origin_of(shared: &Arc<Shared>) -> Result<Arc<Origin>, Response> {
    super::of(shared).ok_or_else(|| (StatusCode::NOT_FOUND, Json(json!({"error": "this server has no [origin] section"}))).into_response())
}

async fn show(State(shared): State<Arc<Shared>>) -> Response {
    let o = match origin_of(&shared) {
        Ok(o) => o,
        Err(r) => return r,
    };
    Json(o.status()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrestageBody {
    cache: String,
    object: String,
}

async fn prestage(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let o = match origin_of(&shared) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let bad = |m: String| (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": m}))).into_response();
    let req: PrestageBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    if o.cache_cfg(&req.cache).is_none() {
        return bad(format!("cache: {:?} is not listed in [[origin.cache]]", req.cache));
    }
    let name = match fleetboot_cache::config::prestage_object(&req.object) {
        Ok(n) => n,
        Err(e) => return bad(format!("object: {e}")),
    };
    let v = match o.refresh(&name).await {
        Ok(v) => v,
        Err(e) => return bad(format!("object: {name}: {e:#}")),
    };
    lock(&o.prestaged).entry(req.cache.clone()).or_default().insert(name.clone());
    o.bump();
    tracing::info!(cache = req.cache, name, version = v.version, "prestage requested");
    (StatusCode::ACCEPTED, Json(json!({"cache": req.cache, "object": name, "version": v.version}))).into_response()
}

impl Origin {
    /// What `GET /api/origin` shows.
    pub fn status(&self) -> serde_json::Value {
        let table = lock(&self.table);
        let peers = lock(&self.peers);
        let caches: Vec<_> = self
            .cfg
            .caches
            .iter()
            .map(|c| {
                let holdings: Vec<_> = table.of_cache(&c.name).collect();
                json!({
                    "name": c.name,
                    "url": c.url,
                    "holdings": holdings,
                    "stats": peers.get(&c.name).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let objects = lock(&self.objects);
        let mut names: Vec<&String> = objects.names().collect();
        names.sort();
        let published: Vec<_> = names
            .into_iter()
            .map(|n| {
                let versions: Vec<_> = objects
                    .published(n)
                    .into_iter()
                    .map(|p| {
                        let v = objects.version(n, p.version);
                        json!({"version": p.version, "sha256": p.sha256, "size": v.map(|v| v.size), "available": v.is_some_and(|v| v.path.is_some())})
                    })
                    .collect();
                json!({"name": n, "versions": versions})
            })
            .collect();
        json!({
            "key": self.public_key(),
            "listen": self.local.to_string(),
            "seq": *self.seq.borrow(),
            "chunk_size": self.cfg.chunk_size,
            "caches": caches,
            "objects": published,
        })
    }
}
