//! `fleetboot doctor --config F`: the mistakes operators make when they set up a boot
//! server, each checked on this host and reported with how to fix it.
//!
//! Each check yields [`Finding`]s: `ok`, `warning` (fleetboot runs, but something will
//! bite), `error` (a service will not start, or clients will not boot) or `skipped` (this
//! run could not tell: not root, no interface named...). The command exits non-zero when
//! any finding is an error. `--json` prints the same findings for tools.
//!
//! The checks, in order: the config loads; the interface exists, is up and has
//! `server.address` (and an MTU that fits TFTP's block size); the ports each configured
//! service binds are free (naming the process that holds one); another DHCP server answers
//! on the segment (one DHCPDISCOVER on `server.interface`, skipped with `--no-dhcp-probe`);
//! each firmware's boot file and each profile's files exist under `server.root`, readable
//! by the service's user; the clock (NTP state, and not before this build); `data_dir`
//! (writable by the service's user, inside what the systemd units let it write, free
//! space); the store opens; kernel and sysctl settings the services depend on.

mod checks;
pub mod host;
pub mod probe;

use crate::config::Config;
use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;

/// `fleetboot doctor`'s arguments.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The config file the services run with.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print the findings as JSON ({"findings": [{check, status, summary, fix}], "errors", "warnings"}).
    #[arg(long)]
    pub json: bool,
    /// Do not send the DHCPDISCOVER that looks for other DHCP servers on server.interface.
    #[arg(long)]
    pub no_dhcp_probe: bool,
    /// How long to listen for answers to that DHCPDISCOVER, in seconds.
    #[arg(long, default_value_t = 3)]
    pub probe_wait: u64,
    /// The account the services run as (the packaged systemd units use `fleetboot`): files
    /// and directories are checked against its permissions when it exists.
    #[arg(long, default_value = "fleetboot")]
    pub service_user: String,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skipped,
    Warning,
    Error,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skipped => "skipped",
            Status::Warning => "WARNING",
            Status::Error => "ERROR",
        }
    }
}

/// One thing the doctor looked at.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// Which check: `config`, `interface`, `port`, `dhcp-servers`, `boot-file`,
    /// `firmware`, `root`, `clock`, `data-dir`, `disk-space`, `store`, `network`.
    pub check: &'static str,
    pub status: Status,
    /// What was found, naming the file, port, address or process.
    pub summary: String,
    /// What to do about it (for warnings and errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, summary: impl Into<String>) -> Finding {
        Finding { check, status: Status::Ok, summary: summary.into(), fix: None }
    }
    pub fn skipped(check: &'static str, summary: impl Into<String>) -> Finding {
        Finding { check, status: Status::Skipped, summary: summary.into(), fix: None }
    }
    pub fn warning(check: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { check, status: Status::Warning, summary: summary.into(), fix: Some(fix.into()) }
    }
    pub fn error(check: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { check, status: Status::Error, summary: summary.into(), fix: Some(fix.into()) }
    }
}

/// What the checks need besides the config.
#[derive(Debug, Clone)]
pub struct Options {
    pub probe_dhcp: bool,
    pub probe_wait: Duration,
    pub service_user: String,
}

/// Every check against the config at `path`, in order. A config that does not load is
/// the one finding.
pub fn examine(path: &std::path::Path, options: &Options) -> Vec<Finding> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::error(
                "config",
                e.to_string(),
                "correct the key named above (fleetboot check-config --config FILE checks it alone)",
            )]
        }
    };
    let mut out = vec![Finding::ok("config", format!("{} is valid", path.display()))];
    checks::all(&config, options, &mut out);
    out
}

/// `fleetboot doctor`: prints the findings and exits with status 1 when any is an error
/// (they were the message; an error value would only repeat the count).
pub fn run(args: DoctorArgs) -> Result<()> {
    let options = Options {
        probe_dhcp: !args.no_dhcp_probe,
        probe_wait: Duration::from_secs(args.probe_wait),
        service_user: args.service_user.clone(),
    };
    let findings = examine(&args.config, &options);
    let count = |s| findings.iter().filter(|f| f.status == s).count();
    let (errors, warnings) = (count(Status::Error), count(Status::Warning));
    if args.json {
        let doc = serde_json::json!({"config": args.config, "findings": findings, "errors": errors, "warnings": warnings});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render(&findings));
        println!("{errors} error(s), {warnings} warning(s)");
    }
    if errors > 0 {
        use std::io::Write;
        std::io::stdout().flush()?;
        std::process::exit(1);
    }
    Ok(())
}

/// The findings as the terminal shows them: one line each, the fix indented below.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!("{:<8} {:<13} {}\n", f.status.label(), f.check, f.summary));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("{:<8} {:<13} fix: {fix}\n", "", ""));
        }
    }
    s
}
