//! `fleetboot token create|list|revoke`: the API tokens of a server, in its store.
//!
//! A token is shown once (or written to a file with mode 0600) and never stored: the store
//! keeps its SHA-256. A running server sees a new or revoked token at its next request.
//! Every change is in the audit log, by actor `local:<user>`.

use crate::config::Config;
use crate::serve::admin::token_writes;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use fleetboot_auth::{token, Role, TokenHash};
use fleetboot_store::{AuditEntry, Store, TokenRecord, Write};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it once (or write it to --output, mode 0600).
    Create {
        /// `read`: read the API and /metrics; `admin`: also change profiles, images...
        #[arg(long)]
        role: Role,
        /// A name to tell it by in `token list` and the audit log. Default: ROLE-N.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, short)]
        config: PathBuf,
        /// Write the token to this new file (mode 0600) instead of printing it.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// List the tokens (never the tokens themselves): id, name, role, created, revoked.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name or id: requests carrying it are refused from now on.
    Revoke {
        /// The token's name or id.
        token: String,
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Who runs the command, for the audit log.
pub(crate) fn local_actor() -> String {
    let user = std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        // SAFETY: getuid(2) cannot fail and touches no memory.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }));
    format!("local:{user}")
}

/// Live tokens a store holds at most: every request is checked against all of them.
pub const MAX_LIVE_TOKENS: usize = 1000;

fn store(config: &Config) -> Result<Store> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    Store::open(&config.db_path()).with_context(|| format!("opening the store of {}", config.data_dir.display()))
}

/// A token name: what the audit log and `token list` show. Kept to characters that need
/// no quoting anywhere.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        && !name.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        bail!("token name {name:?}: use 1-64 letters, digits and - _ . @ (not only digits: those are ids)");
    }
    Ok(())
}

pub fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create { role, name, config, output } => create(&Config::load(&config)?, role, name, output.as_deref()).map(|_| ()),
        TokenCommand::List { config, json } => list(&Config::load(&config)?, json),
        TokenCommand::Revoke { token, config } => revoke(&Config::load(&config)?, &token).map(|_| ()),
    }
}

/// Makes a token for `config`'s server; its record. The secret goes to `output` (a new
/// file, 0600) or standard output.
pub fn create(config: &Config, role: Role, name: Option<String>, output: Option<&Path>) -> Result<TokenRecord> {
    let store = store(config)?;
    let existing = store.tokens()?;
    let name = name.unwrap_or_else(|| {
        (existing.len() + 1..).map(|n| format!("{role}-{n}")).find(|n| !existing.iter().any(|t| &t.name == n)).expect("unbounded")
    });
    check_name(&name)?;
    if existing.iter().any(|t| t.name == name && t.revoked_ms.is_none()) {
        bail!("a token named {name:?} exists; revoke it first or pick another name");
    }
    if existing.iter().filter(|t| t.revoked_ms.is_none()).count() >= MAX_LIVE_TOKENS {
        bail!("{MAX_LIVE_TOKENS} tokens are live already; revoke some first");
    }
    if let Some(path) = output {
        if path.exists() {
            bail!("{} exists; the token goes to a new file only", path.display());
        }
    }
    let t = token::generate()?;
    store.write_blocking(token_writes(&name, role, &t.hash, &local_actor()))?;
    let hex = t.hash.to_hex();
    let Some(record) = store.tokens()?.into_iter().find(|r| r.sha256 == hex) else {
        bail!("the token was not stored (another live token named {name:?} appeared meanwhile)");
    };
    match output {
        Some(path) => {
            fleetboot_auth::secret::create_new(path, &format!("{}\n", t.secret))?;
            eprintln!("token {name:?} (role {role}, id {}) written to {}", record.id, path.display());
        }
        None => {
            println!("{}", t.secret);
            eprintln!("token {name:?} (role {role}, id {}): shown this once, keep it now", record.id);
        }
    }
    Ok(record)
}

fn list(config: &Config, json: bool) -> Result<()> {
    let tokens = store(config)?.tokens()?;
    if json {
        let v: Vec<_> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({"id": t.id, "name": t.name, "role": t.role, "created_ms": t.created_ms, "revoked_ms": t.revoked_ms})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if tokens.is_empty() {
        println!("no tokens (fleetboot token create --role admin --config FILE)");
        return Ok(());
    }
    println!("{:>4}  {:<24} {:<6} {:<21} REVOKED", "ID", "NAME", "ROLE", "CREATED");
    for t in &tokens {
        let revoked = t.revoked_ms.map(crate::audit_cli::format_utc).unwrap_or_else(|| "-".into());
        println!("{:>4}  {:<24} {:<6} {:<21} {revoked}", t.id, t.name, t.role, crate::audit_cli::format_utc(t.created_ms));
    }
    Ok(())
}

/// Revokes the live token named (or numbered) `which`. The bootstrap token's file goes
/// with it.
pub fn revoke(config: &Config, which: &str) -> Result<TokenRecord> {
    let store = store(config)?;
    let tokens = store.tokens()?;
    let live = |t: &&TokenRecord| t.revoked_ms.is_none();
    let found = match which.parse::<i64>() {
        Ok(id) => tokens.iter().find(|t| t.id == id),
        Err(_) => tokens.iter().filter(live).find(|t| t.name == which),
    };
    let Some(t) = found else { bail!("no live token {which:?} (see `fleetboot token list`)") };
    if t.revoked_ms.is_some() {
        bail!("token {:?} (id {}) is revoked already", t.name, t.id);
    }
    let now = crate::serve::shared::now_ms();
    let state = |revoked: bool| serde_json::json!({"name": t.name, "role": t.role, "revoked": revoked}).to_string();
    store.write_blocking(vec![
        Write::RevokeToken { id: t.id, at_ms: now },
        Write::Audit(AuditEntry {
            id: 0,
            ts_ms: now,
            actor: local_actor(),
            actor_id: None,
            action: "token.revoke".into(),
            target: format!("token/{}", t.name),
            before: Some(state(false)),
            after: Some(state(true)),
            remote: None,
        }),
    ])?;
    let bootstrap = config.bootstrap_token_path();
    if let Ok(text) = std::fs::read_to_string(&bootstrap) {
        if TokenHash::of(text.trim()).to_hex() == t.sha256 {
            std::fs::remove_file(&bootstrap).with_context(|| format!("removing {}", bootstrap.display()))?;
            eprintln!("removed {}", bootstrap.display());
        }
    }
    eprintln!("token {:?} (id {}) revoked", t.name, t.id);
    Ok(t.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("ci-deploy.1@lab").is_ok());
        for bad in ["", "12", "a b", "x/y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
