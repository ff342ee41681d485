//! Event producers: each commits one event per transaction, for a user of
//! its own (with its profile), so every committed event is owed exactly one
//! message and the user id tells which. They reconnect after errors (the
//! server restarts under them) and count only what committed.

use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// an INSERT into public.orders, a registered source
    Order,
    /// `SELECT nudge.track(...)`
    Track,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Order => "o",
            Kind::Track => "t",
        }
    }

    fn insert_event(
        self,
        t: &mut postgres::Transaction,
        user: &str,
        n: i64,
    ) -> Result<(), postgres::Error> {
        match self {
            Kind::Order => t.execute(
                "INSERT INTO public.orders (customer_id, total) VALUES ($1, $2::bigint % 100 + 1)",
                &[&user, &n],
            ),
            Kind::Track => t.execute(
                "SELECT nudge.track($1, 'soak_ping', jsonb_build_object('n', $2::bigint))",
                &[&user, &n],
            ),
        }
        .map(drop)
    }

    /// Whether the event of `user` is there: how an unknown COMMIT outcome is settled.
    fn exists_sql(self) -> &'static str {
        match self {
            Kind::Order => "SELECT count(*) FROM public.orders WHERE customer_id = $1",
            Kind::Track => "SELECT count(*) FROM nudge.events WHERE user_id = $1",
        }
    }
}

/// What one producer did.
pub struct Outcome {
    pub kind: Kind,
    /// users whose event committed (known at once)
    pub committed: Vec<String>,
    /// users whose COMMIT got no answer: settled by `settle`
    pub unknown: Vec<String>,
    /// attempts that failed before COMMIT (rolled back)
    pub failed: u64,
    /// COMMITs that got no answer, and how many of them had committed
    pub unknown_total: u64,
    pub unknown_committed: u64,
}

pub struct Producers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Outcome>>,
    /// committed so far, for progress lines
    pub committed: Arc<AtomicU64>,
}

impl Producers {
    /// One producer per kind, each at `per_sec` events a second.
    pub fn start(dsn: &str, per_sec: f64) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let handles = [Kind::Order, Kind::Track]
            .into_iter()
            .map(|kind| {
                let (dsn, stop, committed) = (dsn.to_string(), stop.clone(), committed.clone());
                std::thread::spawn(move || produce(&dsn, kind, per_sec, &stop, &committed))
            })
            .collect();
        Producers {
            stop,
            handles,
            committed,
        }
    }

    pub fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("a producer panicked"))
            .collect()
    }
}

fn produce(dsn: &str, kind: Kind, per_sec: f64, stop: &AtomicBool, total: &AtomicU64) -> Outcome {
    let mut out = Outcome {
        kind,
        committed: vec![],
        unknown: vec![],
        failed: 0,
        unknown_total: 0,
        unknown_committed: 0,
    };
    let every = Duration::from_secs_f64(1.0 / per_sec);
    let mut client: Option<Client> = None;
    let mut next = Instant::now();
    // every attempt gets a new user id, so that "does it exist" answers for
    // exactly one attempt
    for n in 0i64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // after an outage, go on at the steady rate instead of catching up
        next = next.max(Instant::now() - every) + every;
        if client.is_none() {
            client = Client::connect(dsn, NoTls).ok();
        }
        let Some(c) = client.as_mut() else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let user = format!("{}{n}", kind.prefix());
        match attempt(c, kind, &user, n) {
            Ok(()) => {
                out.committed.push(user);
                total.fetch_add(1, Ordering::Relaxed);
            }
            Err(Step::Before(_)) => out.failed += 1,
            Err(Step::Commit(_)) => {
                out.unknown.push(user);
                out.unknown_total += 1;
            }
        }
        if client.as_ref().is_some_and(|c| c.is_closed()) {
            client = None;
        }
    }
    out
}

/// Where an attempt failed: before COMMIT it certainly rolled back; at
/// COMMIT the outcome is unknown (the connection may die after the commit).
enum Step {
    Before(#[allow(dead_code)] postgres::Error),
    Commit(#[allow(dead_code)] postgres::Error),
}

fn attempt(c: &mut Client, kind: Kind, user: &str, n: i64) -> Result<(), Step> {
    let mut t = c.transaction().map_err(Step::Before)?;
    t.execute(
        "INSERT INTO nudge.profiles (user_id, email) VALUES ($1, $1 || '@example.com')",
        &[&user],
    )
    .map_err(Step::Before)?;
    kind.insert_event(&mut t, user, n).map_err(Step::Before)?;
    t.commit().map_err(Step::Commit)
}

/// Settles the unknown COMMITs once the server is steady: the users whose
/// event is there after all join the committed ones.
pub fn settle(dsn: &str, outcomes: &mut [Outcome]) {
    let mut c = connect_retrying(dsn);
    for o in outcomes.iter_mut() {
        for user in std::mem::take(&mut o.unknown) {
            let n: i64 = c
                .query_one(o.kind.exists_sql(), &[&user])
                .expect("checking an unknown commit")
                .get(0);
            if n > 0 {
                o.committed.push(user);
                o.unknown_committed += 1;
            } else {
                o.failed += 1;
            }
        }
    }
}

/// A connection, waiting for the server (up to two minutes).
pub fn connect_retrying(dsn: &str) -> Client {
    nudge_integration::wait_for(120, || {
        let mut c = Client::connect(dsn, NoTls).ok()?;
        c.simple_query("SELECT 1").ok()?;
        Some(c)
    })
    .expect("the soak server is not accepting connections")
}
