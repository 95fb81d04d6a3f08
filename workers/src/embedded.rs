//! A private PostgreSQL cluster for `longshore dev` and the test suite on machines that
//! have PostgreSQL installed but not running: `initdb` + `pg_ctl` from PATH or
//! `/usr/lib/postgresql/*/bin`, run as the `postgres` user when we are root (initdb
//! refuses root). Listens on 127.0.0.1 on a free port, trust auth. `fsync=off`: a
//! development cluster survives a crash of PostgreSQL (the OS keeps what was written)
//! but not of the machine. `synchronous_commit` stays on, so every acknowledged commit
//! survives a PostgreSQL crash (RELIABILITY row 9).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

/// Why the private cluster did not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// PostgreSQL's server binaries are not installed.
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL or set DATABASE_URL"
    )]
    NoBinaries,
    /// A command (`initdb`, `pg_ctl start`, …) exited with an error.
    #[error("{step} failed: {detail}")]
    Command {
        /// Which command.
        step: String,
        /// What it wrote to stderr.
        detail: String,
    },
    /// A file operation or starting a command failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A running private cluster. Dropping it does not stop it; call [`Embedded::stop`].
#[derive(Debug)]
pub struct Embedded {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Embedded {
    /// Starts (creating if needed) the cluster in `data_dir`; reuses one already running.
    pub fn start(data_dir: &Path) -> Result<Embedded, EmbeddedError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedError::NoBinaries)?;
        let as_postgres = is_root();
        std::fs::create_dir_all(data_dir)?;
        let data_dir = data_dir.canonicalize()?;
        let e = Embedded {
            port: 0,
            data_dir,
            bin_dir,
            as_postgres,
        };
        if as_postgres {
            e.run(
                "chown",
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(&e.data_dir),
            )?;
            // The postgres user must be able to reach the directory.
            let _ = Command::new("chmod")
                .arg("o+x")
                .args(ancestors(&e.data_dir))
                .status();
        }
        if !e.data_dir.join("PG_VERSION").exists() {
            info!(dir = %e.data_dir.display(), "creating a private PostgreSQL cluster");
            let mut c = e.pg_command("initdb");
            c.arg("-D").arg(&e.data_dir).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]);
            e.run("initdb", &mut c)?;
        }
        let port_file = e.data_dir.join("longshore.port");
        if let Ok(p) = std::fs::read_to_string(&port_file)
            && let Ok(port) = p.trim().parse::<u16>()
        {
            let running = Embedded {
                port,
                ..e.clone_paths()
            };
            if running.is_running() {
                return Ok(running);
            }
        }
        let port = free_port()?;
        e.pg_ctl("pg_ctl start", &["-o", &e.server_opts(port), "start"])?;
        std::fs::write(&port_file, port.to_string())?;
        info!(port, dir = %e.data_dir.display(), "private PostgreSQL started");
        Ok(Embedded { port, ..e })
    }

    fn server_opts(&self, port: u16) -> String {
        format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=300 -c fsync=off -c full_page_writes=off",
            self.data_dir.display()
        )
    }

    fn clone_paths(&self) -> Embedded {
        Embedded {
            data_dir: self.data_dir.clone(),
            bin_dir: self.bin_dir.clone(),
            port: self.port,
            as_postgres: self.as_postgres,
        }
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `pg_ctl status` says it runs and its port takes a connection.
    pub fn is_running(&self) -> bool {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(&self.data_dir).arg("status");
        c.output().map(|o| o.status.success()).unwrap_or(false)
            && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Restarts the cluster (`pg_ctl restart -m fast`), keeping its port: every
    /// connection is cut, as in a server restart in production.
    pub fn restart(&self) -> Result<(), EmbeddedError> {
        self.pg_ctl("pg_ctl restart", &["-m", "fast", "restart"])
    }

    /// Crashes the cluster (`pg_ctl stop -m immediate`: no shutdown checkpoint; the
    /// next start runs crash recovery), for fault tests.
    pub fn crash(&self) -> Result<(), EmbeddedError> {
        self.pg_ctl("pg_ctl stop -m immediate", &["-m", "immediate", "stop"])
    }

    /// Starts a stopped or crashed cluster again on the same port.
    pub fn start_again(&self) -> Result<(), EmbeddedError> {
        let opts = self.server_opts(self.port);
        self.pg_ctl("pg_ctl start", &["-o", &opts, "start"])
    }

    /// The postmaster and its children (for SIGSTOP/SIGCONT fault tests).
    pub fn server_pids(&self) -> Vec<i32> {
        let Ok(pidfile) = std::fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return Vec::new();
        };
        let Some(pm) = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return Vec::new();
        };
        let children = Command::new("pgrep")
            .args(["-P", &pm.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        std::iter::once(pm)
            .chain(children.lines().filter_map(|l| l.trim().parse().ok()))
            .collect()
    }

    /// Stops the cluster (`pg_ctl stop -m fast`).
    pub fn stop(&self) -> Result<(), EmbeddedError> {
        self.pg_ctl("pg_ctl stop", &["-m", "fast", "stop"])?;
        info!("private PostgreSQL stopped");
        Ok(())
    }

    /// `pg_ctl -D <data> -l <log> -w <args>`. With `-l` a (re)started postmaster writes
    /// to the log file, not to our pipes, which `output()` would otherwise wait on
    /// forever.
    fn pg_ctl(&self, step: &str, args: &[&str]) -> Result<(), EmbeddedError> {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.data_dir.join("server.log"))
            .arg("-w")
            .args(args);
        self.run(step, &mut c)
    }

    /// A command for a server binary, run as `postgres` when we are root.
    pub fn pg_command(&self, bin: &str) -> Command {
        let path = self.bin_dir.join(bin);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, step: &str, c: &mut Command) -> Result<(), EmbeddedError> {
        let out = c.output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(EmbeddedError::Command {
                step: step.to_string(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

fn ancestors(p: &Path) -> Vec<PathBuf> {
    p.ancestors()
        .skip(1)
        .filter(|a| a.parent().is_some())
        .map(Path::to_path_buf)
        .collect()
}

/// `initdb`'s directory: PATH first, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Whether something accepts TCP connections at 127.0.0.1:5432.
pub fn local_server_listening() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5432".parse().expect("valid addr"),
        std::time::Duration::from_millis(300),
    )
    .is_ok()
}
