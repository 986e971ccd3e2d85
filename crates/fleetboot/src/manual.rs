//! Man pages and shell completions, generated from the command line definition itself
//! (`Cli::command()` in `main.rs`), so every subcommand and option appears in them as soon
//! as it exists. `fleetboot manual --out DIR` (hidden) writes them; the Debian package
//! build runs it (`packaging/build-deb.sh`).
//!
//! Layout under DIR: `man1/fleetboot.1`, `man1/fleetboot-<sub>.1`,
//! `man1/fleetboot-<sub>-<subsub>.1`, ...; `completions/fleetboot.bash`,
//! `completions/_fleetboot` (zsh), `completions/fleetboot.fish`.

use anyhow::{Context, Result};
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// `fleetboot manual`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ManualArgs {
    /// Where to write `man1/` and `completions/`.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes a man page per visible command and subcommand and the bash, zsh and fish
/// completions of `cli` under `out`; returns the files written.
pub fn generate(mut cli: clap::Command, out: &Path) -> Result<Vec<PathBuf>> {
    cli.build();
    let man = out.join("man1");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut written = Vec::new();
    let source = format!("{} {}", cli.get_name(), cli.get_version().unwrap_or_default());
    man_pages(&cli, &man, source.trim(), &mut written)?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    let name = cli.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cli, &name, &completions)
            .with_context(|| format!("writing {shell} completions"))?;
        written.push(path);
    }
    Ok(written)
}

/// `cmd`'s page, then its visible subcommands' (named `parent-child`, as `man
/// fleetboot-image-import` expects).
fn man_pages(cmd: &clap::Command, dir: &Path, source: &str, written: &mut Vec<PathBuf>) -> Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(source.to_string())
        .manual("fleetboot manual")
        .render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        man_pages(sub, dir, source, written)?;
    }
    Ok(())
}
