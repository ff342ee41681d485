//! The soak's own PostgreSQL cluster: started with scripts/cluster.sh,
//! restarted with pg_ctl (a fault), stopped when dropped, also on a panic.

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Cluster {
    pub dir: String,
    pub port: u16,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as the postgres user when we are root (PostgreSQL refuses
/// root), as cluster.sh does.
fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn pg_bin(name: &str) -> String {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config");
    format!("{}/{name}", String::from_utf8_lossy(&out.stdout).trim())
}

impl Cluster {
    /// Starts a fresh cluster in `dir` (whatever was there is removed).
    pub fn start(dir: &str, port: u16, options: &[&str]) -> Cluster {
        let status = Command::new(repo_root().join("scripts/cluster.sh"))
            .args(["start", dir, &port.to_string()])
            .args(options)
            .status()
            .expect("scripts/cluster.sh");
        assert!(status.success(), "scripts/cluster.sh start failed");
        Cluster {
            dir: dir.to_string(),
            port,
        }
    }

    /// A DSN for `db`. connect_timeout: a connection attempt during a restart
    /// must fail, not hang.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=5",
            self.port
        )
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the postmaster
    /// keeps the options it was started with (postmaster.opts).
    pub fn restart(&self) -> Result<(), String> {
        let status = as_postgres(&pg_bin("pg_ctl"))
            .args(["-D", &self.dir, "-l", &format!("{}/server.log", self.dir)])
            .args(["-m", "fast", "-w", "-t", "120", "restart"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("pg_ctl restart: {status}"))
    }

    /// Lines of the server log that mention `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(format!("{}/server.log", self.dir))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/cluster.sh"))
            .args(["stop", &self.dir])
            .status();
    }
}
