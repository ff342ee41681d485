//! The fault injector: at random intervals, one of four faults, drawn from
//! a shuffled bag so that even a short run sees each kind.
//!
//! Before a fault that cuts mailers off (a killed mailer; a crash or restart
//! of the server, which ends every connection) it notes the outbox rows
//! claimed at that moment: those are "in flight", the only messages
//! at-least-once delivery may send twice.

use crate::cluster::Cluster;
use crate::mailers::{Mailers, LEASE_SECS};
use crate::producers::connect_retrying;
use nudge_integration::Rng;
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of the pg_nudge worker: the postmaster restarts every backend
    WorkerKill,
    /// kill -9 of one mailer
    MailerKill,
    /// pg_ctl restart -m fast
    Restart,
    /// user SQL (a context query) sleeps past nudge.user_sql_timeout for a while
    SlowSql,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "kill -9 worker",
            Fault::MailerKill => "kill -9 mailer",
            Fault::Restart => "server restart",
            Fault::SlowSql => "slow user SQL",
        }
    }
}

const ALL: [Fault; 4] = [
    Fault::WorkerKill,
    Fault::MailerKill,
    Fault::Restart,
    Fault::SlowSql,
];

#[derive(Default)]
pub struct Injected {
    pub counts: BTreeMap<Fault, u32>,
    /// faults that could not be injected (e.g. no worker running at the moment)
    pub skipped: BTreeMap<Fault, u32>,
    /// outbox id -> the fault it was in flight at
    pub in_flight: HashMap<i64, Fault>,
}

pub struct Injector<'a> {
    pub cluster: &'a Cluster,
    pub mailers: &'a Mailers,
    pub dsn: &'a str,
    pub rng: Rng,
    pub started: Instant,
    bag: Vec<Fault>,
    pub done: Injected,
}

impl<'a> Injector<'a> {
    pub fn new(cluster: &'a Cluster, mailers: &'a Mailers, dsn: &'a str, seed: u64) -> Self {
        Injector {
            cluster,
            mailers,
            dsn,
            rng: Rng::new(seed),
            started: Instant::now(),
            bag: vec![],
            done: Injected::default(),
        }
    }

    /// Seconds until the next fault: 15 to 40.
    pub fn next_pause(&mut self) -> Duration {
        Duration::from_secs(15 + self.rng.below(26))
    }

    /// Injects the next fault of the bag and records it.
    pub fn inject_one(&mut self) {
        if self.bag.is_empty() {
            self.bag = ALL.to_vec();
            // Fisher-Yates with our seeded generator
            for i in (1..self.bag.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                self.bag.swap(i, j);
            }
        }
        let fault = self.bag.pop().unwrap();
        let result = match fault {
            Fault::WorkerKill => self.kill_worker(),
            Fault::MailerKill => self.kill_mailer(),
            Fault::Restart => self.restart_server(),
            Fault::SlowSql => self.slow_window(),
        };
        let at = self.started.elapsed().as_secs();
        match result {
            Ok(what) => {
                *self.done.counts.entry(fault).or_default() += 1;
                println!("[{at:>5}s] fault: {}: {what}", fault.name());
            }
            Err(why) => {
                *self.done.skipped.entry(fault).or_default() += 1;
                println!("[{at:>5}s] fault skipped: {}: {why}", fault.name());
            }
        }
    }

    fn kill_worker(&mut self) -> Result<String, String> {
        let mut c = connect_retrying(self.dsn);
        let pid: i32 = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker'",
                &[],
            )
            .map_err(|e| e.to_string())?
            .ok_or("no pg_nudge worker running")?
            .get(0);
        let t0 = db_now(&mut c)?;
        drop(c);
        kill9(pid)?;
        // the postmaster ends every backend, recovers, and starts them again
        let n = self.note_in_flight(Fault::WorkerKill, &t0, None);
        Ok(format!("pid {pid}; {n} messages in flight"))
    }

    fn kill_mailer(&mut self) -> Result<String, String> {
        let names = self.mailers.names();
        let i = self.rng.below(names.len() as u64) as usize;
        let t0 = db_now(&mut connect_retrying(self.dsn))?;
        if !self.mailers.kill(i) {
            return Err(format!("mailer {} was not running", names[i]));
        }
        let n = self.note_in_flight(Fault::MailerKill, &t0, Some(&names[i]));
        Ok(format!("{}; {n} messages in flight", names[i]))
    }

    fn restart_server(&mut self) -> Result<String, String> {
        let t0 = db_now(&mut connect_retrying(self.dsn))?;
        let started = Instant::now();
        self.cluster.restart()?;
        let n = self.note_in_flight(Fault::Restart, &t0, None);
        Ok(format!(
            "took {:.1}s; {n} messages in flight",
            started.elapsed().as_secs_f64()
        ))
    }

    /// Sets the flag that makes the context query sleep 2 s (past the 500 ms
    /// timeout) for 3 to 8 seconds, then clears it.
    fn slow_window(&mut self) -> Result<String, String> {
        let secs = 3 + self.rng.below(6);
        set_slow(self.dsn, true);
        std::thread::sleep(Duration::from_secs(secs));
        set_slow(self.dsn, false);
        Ok(format!("{secs}s"))
    }

    /// Records the rows claimed before `t0` that are still claimed (by
    /// `mailer`'s threads, or anyone's): their mailer was cut off at the
    /// fault. A claim made after t0 has a lease ending after t0 + lease, so
    /// the restarted mailers' new claims are not counted.
    fn note_in_flight(&mut self, fault: Fault, t0: &str, mailer: Option<&str>) -> usize {
        let mut c = connect_retrying(self.dsn);
        let rows = c
            .query(
                "SELECT id FROM nudge.outbox
                  WHERE status = 'claimed'
                    AND available_at <= $1::text::timestamptz + make_interval(secs => $2)
                    AND ($3::text IS NULL OR claimed_by LIKE $3 || '/%')",
                &[&t0, &(LEASE_SECS as f64), &mailer],
            )
            .expect("reading claimed messages");
        for r in &rows {
            self.done.in_flight.entry(r.get(0)).or_insert(fault);
        }
        rows.len()
    }
}

fn db_now(c: &mut Client) -> Result<String, String> {
    c.query_one("SELECT now()::text", &[])
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
}

fn kill9(pid: i32) -> Result<(), String> {
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    ok.then_some(())
        .ok_or_else(|| format!("kill -9 {pid} failed"))
}

/// Sets the slow flag, retrying until the server takes it: a flag left on
/// would fail every message after the soak.
pub fn set_slow(dsn: &str, slow: bool) {
    let set = nudge_integration::wait_for(120, || {
        let mut c = Client::connect(dsn, NoTls).ok()?;
        c.execute("UPDATE public.soak_flags SET slow = $1", &[&slow])
            .ok()
    });
    set.expect("could not set public.soak_flags");
}
