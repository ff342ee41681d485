//! The mailer processes: a supervisor thread restarts any that exits (killed
//! by a fault, or ended by a lost database connection, which nudge-mailer
//! treats as fatal), until the soak stops them with SIGTERM.

use nudge_integration::mailer_bin;
use std::fs::OpenOptions;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lease of a claimed batch: short, so that a killed mailer's batch comes
/// back within the soak.
pub const LEASE_SECS: u64 = 10;

struct Mailer {
    /// the --consumer name; its threads claim as `name/0`, `name/1`, …
    name: String,
    child: Option<Child>,
    exited_at: Option<Instant>,
}

#[derive(Default, Debug)]
pub struct Tally {
    pub started: u32,
    /// exits the soak did not cause (a lost database connection, mostly)
    pub exits_on_their_own: u32,
    pub killed: u32,
}

struct State {
    mailers: Vec<Mailer>,
    tally: Tally,
}

pub struct Mailers {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    supervisor: Option<JoinHandle<()>>,
}

impl Mailers {
    pub fn start(dsn: &str, smtp_port: u16, names: &[&str], log_dir: &str) -> Mailers {
        let state = Arc::new(Mutex::new(State {
            mailers: names
                .iter()
                .map(|n| Mailer {
                    name: n.to_string(),
                    child: None,
                    exited_at: None,
                })
                .collect(),
            tally: Tally::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let supervisor = {
            let (state, stop) = (state.clone(), stop.clone());
            let (dsn, log_dir) = (dsn.to_string(), log_dir.to_string());
            std::thread::spawn(move || supervise(&state, &stop, &dsn, smtp_port, &log_dir))
        };
        Mailers {
            state,
            stop,
            supervisor: Some(supervisor),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.mailers.iter().map(|m| m.name.clone()).collect()
    }

    /// kill -9 of mailer `i` if it runs; the supervisor starts a new one.
    pub fn kill(&self, i: usize) -> bool {
        let mut s = self.state.lock().unwrap();
        let Some(mut child) = s.mailers[i].child.take() else {
            return false;
        };
        let _ = child.kill();
        let _ = child.wait();
        s.mailers[i].exited_at = Some(Instant::now());
        s.tally.killed += 1;
        true
    }

    /// SIGTERM to every mailer (each hands its unsent batch back and exits);
    /// kill -9 after 30 s.
    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.supervisor.take() {
            t.join().expect("the mailer supervisor panicked");
        }
        let mut s = self.state.lock().unwrap();
        for m in &mut s.mailers {
            if let Some(mut child) = m.child.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let gone = nudge_integration::wait_for(30, || child.try_wait().ok().flatten());
                if gone.is_none() {
                    eprintln!(
                        "soak: mailer {} ignored SIGTERM for 30 s; killing it",
                        m.name
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        std::mem::take(&mut s.tally)
    }
}

impl Drop for Mailers {
    /// On a panic: no mailer outlives the soak.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            for m in &mut s.mailers {
                if let Some(mut child) = m.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

fn supervise(state: &Mutex<State>, stop: &AtomicBool, dsn: &str, smtp_port: u16, log_dir: &str) {
    while !stop.load(Ordering::Relaxed) {
        {
            let mut s = state.lock().unwrap();
            let State { mailers, tally } = &mut *s;
            for m in mailers.iter_mut() {
                if let Some(child) = m.child.as_mut() {
                    if child.try_wait().ok().flatten().is_some() {
                        m.child = None;
                        m.exited_at = Some(Instant::now());
                        tally.exits_on_their_own += 1;
                    }
                }
                // a second's pause, so that a mailer that cannot connect yet
                // (the server is restarting) is not respawned in a tight loop
                let rested = m
                    .exited_at
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                if m.child.is_none() && rested {
                    m.child = Some(spawn(dsn, smtp_port, &m.name, log_dir));
                    tally.started += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(dsn: &str, smtp_port: u16, name: &str, log_dir: &str) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{log_dir}/mailer-{name}.log"))
        .expect("mailer log file");
    Command::new(mailer_bin())
        .args(["--database-url", dsn])
        .args(["--smtp-port", &smtp_port.to_string()])
        .args(["--poll-ms", "200", "--batch", "10"])
        .args(["--lease", &LEASE_SECS.to_string(), "--consumer", name])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the nudge-mailer binary (cargo build -p nudge-mailer)")
}
