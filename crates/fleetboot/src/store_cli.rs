//! `fleetboot store migrate|check`: the store's schema, for operators who apply upgrades
//! by hand (`store.migrate = "manual"`) or want to know a database is reachable and current
//! before starting servers on it.

use crate::config::Config;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Apply the schema migrations this fleetboot has and the store lacks.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Connect, print which store and schema version it is; exit non-zero unless the
    /// schema is the one this fleetboot needs. Changes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub fn run(command: StoreCommand) -> Result<()> {
    match command {
        StoreCommand::Migrate { config } => migrate(&config),
        StoreCommand::Check { config } => check(&config),
    }
}

fn describe(config: &Config) -> String {
    match &config.store.backend {
        fleetboot_store::config::Backend::Sqlite => format!("sqlite {}", config.db_path().display()),
        fleetboot_store::config::Backend::Postgres(pg) => format!("postgresql {}", pg.url),
    }
}

fn migrate(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    if !config.store.is_shared() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    }
    let (before, after) = fleetboot_store::Store::migrate(&config.store, &config.db_path())
        .with_context(|| format!("migrating {}", describe(&config)))?;
    if before == after {
        println!("{}: schema version {after}, nothing to do", describe(&config));
    } else {
        println!("{}: schema version {before} -> {after}", describe(&config));
    }
    Ok(())
}

fn check(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    let v = fleetboot_store::Store::schema_version(&config.store, &config.db_path())
        .with_context(|| format!("reaching {}", describe(&config)))?;
    println!("{}: schema version {} (this fleetboot needs {})", describe(&config), v.current, v.latest);
    match v.current.cmp(&v.latest) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => anyhow::bail!("the schema is behind: run `fleetboot store migrate --config {}`", path.display()),
        std::cmp::Ordering::Greater => anyhow::bail!("the schema is newer than this fleetboot knows: upgrade fleetboot"),
    }
}
