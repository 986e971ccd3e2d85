//! A private PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary
//! directory (as the `postgres` user when run as root), its own socket directory and
//! port, no TCP unless asked (and then only on the address given: loopback, or a lab
//! namespace's), stopped and removed when dropped. Nothing is left running on the host.
//!
//! ```no_run
//! let pg = fleetboot_store::testing::PgCluster::start(Default::default()).unwrap();
//! let url = pg.url(); // postgresql://fleetboot@%2Ftmp%2F...%2Fsock:PORT/fleetboot
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// `listen_addresses`: empty (the default) for the Unix socket only.
    pub listen: String,
    /// Run the server inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Require this password over TCP (scram-sha-256); the socket stays `trust`.
    pub password: Option<String>,
    /// Serve TLS with a certificate for `listen` signed by a throwaway CA
    /// ([`PgCluster::ca_file`]).
    pub tls: bool,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
}

pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    opts: PgOptions,
    running: bool,
}

/// Where Debian puts the server binaries (`/usr/lib/postgresql/VERSION/bin`), newest first;
/// else `PATH`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn find(name: &str) -> Option<PathBuf> {
    if let Some(d) = bin_dir() {
        return Some(d.join(name));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why a cluster cannot be started here, if it cannot (no PostgreSQL installed, no
/// `postgres` user to run it as root).
pub fn unavailable() -> Option<String> {
    if find("initdb").is_none() || find("pg_ctl").is_none() {
        return Some("PostgreSQL's initdb/pg_ctl are not installed (scripts/setup.sh installs postgresql)".into());
    }
    if is_root() && Command::new("id").arg("postgres").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("no postgres user to run PostgreSQL as".into());
    }
    None
}

fn free_port() -> u16 {
    // A port for the socket's name; with TCP it is bound on `listen` only. Collisions with
    // another cluster on the same socket directory cannot happen: each has its own.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().expect("a bound port").port()
}

fn check(what: &str, out: std::io::Result<Output>) -> Result<Output, String> {
    let out = out.map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{what}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

impl PgCluster {
    pub fn start(opts: PgOptions) -> Result<PgCluster, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        let bin = find("initdb").and_then(|p| p.parent().map(Path::to_path_buf)).ok_or("no initdb")?;
        let base = std::env::temp_dir().join(format!("fleetboot-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(base.join("sock")).map_err(|e| format!("{}: {e}", base.display()))?;
        let mut c = PgCluster { dir: base, port: free_port(), bin, opts, running: false };
        c.chown_all()?;
        let mut args = vec![
            "-D".to_string(),
            c.data().display().to_string(),
            "-U".into(),
            "fleetboot".into(),
            "-E".into(),
            "UTF8".into(),
            "--no-sync".into(),
            "--auth-local=trust".into(),
        ];
        if let Some(pw) = &c.opts.password {
            let f = c.dir.join("pwfile");
            std::fs::write(&f, pw).map_err(|e| e.to_string())?;
            c.chown(&f)?;
            args.extend(["--auth-host=scram-sha-256".into(), format!("--pwfile={}", f.display())]);
        } else {
            args.push("--auth-host=trust".into());
        }
        check("initdb", c.as_postgres("initdb", &args).output())?;
        if c.opts.tls {
            c.make_certificates()?;
        }
        c.pg_ctl_start()?;
        check(
            "createdb",
            c.as_postgres("createdb", &["-h".into(), c.socket_dir().display().to_string(), "-p".into(), c.port.to_string(), "-U".into(), "fleetboot".into(), "fleetboot".into()])
                .output(),
        )?;
        Ok(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The throwaway CA that signed the server's certificate (with `tls`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Over the Unix socket, as the `fleetboot` superuser, database `fleetboot`.
    pub fn url(&self) -> String {
        let sock = self.socket_dir().display().to_string().replace('/', "%2F");
        format!("postgresql://fleetboot@{sock}:{}/fleetboot", self.port)
    }

    /// Over TCP to `host` (one of `listen`).
    pub fn tcp_url(&self, host: &str, query: &str) -> String {
        let q = if query.is_empty() { String::new() } else { format!("?{query}") };
        format!("postgresql://fleetboot@{host}:{}/fleetboot{q}", self.port)
    }

    fn postgres_ids() -> Option<(u32, u32)> {
        let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
        let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some((uid, gid))
    }

    fn chown(&self, p: &Path) -> Result<(), String> {
        if !is_root() {
            return Ok(());
        }
        let (uid, gid) = PgCluster::postgres_ids().ok_or("no postgres user")?;
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))
    }

    fn chown_all(&self) -> Result<(), String> {
        self.chown(&self.dir)?;
        self.chown(&self.socket_dir())
    }

    /// `BIN args` as the postgres user (when root), inside the namespace if one is set.
    fn as_postgres(&self, bin: &str, args: &[String]) -> Command {
        let exe = self.bin.join(bin);
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.opts.netns {
            argv.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
        }
        if is_root() {
            argv.extend(["runuser".into(), "-u".into(), "postgres".into(), "--".into()]);
        }
        argv.push(exe.display().to_string());
        argv.extend(args.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(&self.dir).stdin(std::process::Stdio::null());
        cmd
    }

    fn make_certificates(&self) -> Result<(), String> {
        let d = &self.dir;
        let host = self.opts.listen.split(',').next().unwrap_or("127.0.0.1").trim().to_string();
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(_) => format!("subjectAltName=IP:{host}"),
            Err(_) => format!("subjectAltName=DNS:{host}"),
        };
        let run = |args: &[&str]| check("openssl", Command::new("openssl").args(args).current_dir(d).output()).map(drop);
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=fleetboot test CA"])?;
        run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", &format!("/CN={host}")])?;
        std::fs::write(d.join("ext.cnf"), format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n{san}\n")).map_err(|e| e.to_string())?;
        run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"])?;
        for f in ["server.key", "server.pem", "ca.pem"] {
            self.chown(&d.join(f))?;
        }
        std::fs::set_permissions(d.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let mut o = format!(
            "-k {} -p {} -c listen_addresses='{}' -c max_connections=200",
            self.socket_dir().display(),
            self.port,
            self.opts.listen
        );
        if self.opts.tls {
            o += &format!(" -c ssl=on -c ssl_cert_file={}/server.pem -c ssl_key_file={}/server.key", self.dir.display(), self.dir.display());
        }
        for (k, v) in &self.opts.settings {
            o += &format!(" -c {k}={v}");
        }
        let log = self.dir.join("postgres.log");
        check(
            "pg_ctl start",
            self.as_postgres("pg_ctl", &["-D".into(), self.data().display().to_string(), "-l".into(), log.display().to_string(), "-w".into(), "-t".into(), "60".into(), "-o".into(), o, "start".into()])
                .output(),
        )?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m MODE`: `immediate` is a crash (no checkpoint; committed
    /// transactions survive through the WAL), `fast` a clean shutdown.
    pub fn stop(&mut self, mode: &str) -> Result<(), String> {
        let r = check(
            "pg_ctl stop",
            self.as_postgres("pg_ctl", &["-D".into(), self.data().display().to_string(), "-m".into(), mode.into(), "-w".into(), "-t".into(), "60".into(), "stop".into()])
                .output(),
        );
        self.running = false;
        r.map(drop)
    }

    /// Starts a stopped cluster again on the same port and data.
    pub fn start_again(&mut self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Stops (`mode`), waits `down`, starts again.
    pub fn restart(&mut self, mode: &str, down: Duration) -> Result<(), String> {
        self.stop(mode)?;
        std::thread::sleep(down);
        self.start_again()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop("immediate");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `test` can start a private cluster here: true, or the reason printed and false
/// (a skip), or a panic under `FLEETBOOT_REQUIRE_E2E=1` — the rule of every fleetboot
/// end-to-end gate, so CI can never go green by skipping.
pub fn ready(test: &str) -> bool {
    let Some(why) = unavailable() else { return true };
    let msg = format!("{test}: cannot run here: {why}");
    if std::env::var("FLEETBOOT_REQUIRE_E2E").is_ok_and(|v| v == "1") {
        panic!("{msg} (FLEETBOOT_REQUIRE_E2E=1 makes that a failure)");
    }
    eprintln!("{msg}; skipped (set FLEETBOOT_REQUIRE_E2E=1 to make this a failure)");
    false
}
