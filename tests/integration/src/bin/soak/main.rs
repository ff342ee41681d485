//! `make soak`: pg_nudge under faults for SOAK_MINUTES (default 10; SOAK_SECONDS
//! overrides it for quick runs). Not part of `make test`.
//!
//! On a cluster of its own (/tmp/pg_nudge-soak, port 28830, the worker
//! preloaded) two producers commit events steadily (inserts into a source
//! table and nudge.track), each owed exactly one message sent at once; two
//! nudge-mailer processes deliver them to a real SMTP server; meanwhile the
//! worker is killed, mailers are killed, the server restarts and user SQL
//! times out. Then it drains, counts and checks: every committed event's
//! message arrived, none twice except those in flight when their mailer was
//! cut off, nothing stuck. Exits 1 when a check fails.
//!
//! SOAK_SEED repeats a run's fault schedule; SOAK_RATE is events per second
//! (default 14, half each kind); SOAK_DRAIN_SECONDS bounds the drain (240).

mod cluster;
mod faults;
mod mailers;
mod producers;
mod report;

use cluster::Cluster;
use faults::Injector;
use mailers::Mailers;
use nudge_integration::{wait_for, SmtpServer};
use postgres::{Client, NoTls};
use producers::{connect_retrying, Producers};
use std::time::{Duration, Instant};

const DIR: &str = "/tmp/pg_nudge-soak";
const LOG_DIR: &str = "/tmp/pg_nudge-soak-logs";
const PORT: u16 = 28830;
const DB: &str = "nudge_soak";
const WORKER: &str = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_nudge worker'";

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {v:?}")),
    )
}

fn main() {
    let run = Duration::from_secs(
        env_num("SOAK_SECONDS").unwrap_or_else(|| 60 * env_num("SOAK_MINUTES").unwrap_or(10)),
    );
    let seed = env_num("SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    let rate = env_num("SOAK_RATE").unwrap_or(14).max(2) as f64;
    let drain_limit = env_num("SOAK_DRAIN_SECONDS").unwrap_or(240);
    println!(
        "soak: {}s of load and faults, {rate} events/s, seed {seed} (SOAK_SEED={seed} repeats the fault schedule)",
        run.as_secs()
    );

    let cluster = Cluster::start(
        DIR,
        PORT,
        &[
            "shared_preload_libraries=pg_nudge",
            &format!("nudge.database={DB}"),
            "nudge.naptime=200",
            // kill -9 of the worker makes every backend restart: say why in the log
            "log_min_messages=log",
        ],
    );
    let dsn = cluster.dsn(DB);
    create_database(&cluster);
    setup(&dsn);
    let _ = std::fs::remove_dir_all(LOG_DIR);
    std::fs::create_dir_all(LOG_DIR).expect("mailer log directory");
    let smtp = SmtpServer::start("soak");
    let mailers = Mailers::start(&dsn, smtp.port, &["m1", "m2"], LOG_DIR);
    let producers = Producers::start(&dsn, rate / 2.0);

    let mut injector = Injector::new(&cluster, &mailers, &dsn, seed);
    run_faults(&mut injector, &producers, &smtp, run);
    let injected = std::mem::take(&mut injector.done);
    let started = injector.started;

    let mut outcomes = producers.stop();
    faults::set_slow(&dsn, false);
    producers::settle(&dsn, &mut outcomes);
    let drain = drain(&dsn, drain_limit);
    let tally = mailers.stop();

    let r = report::collect(&dsn, &smtp, &outcomes, injected, tally, &cluster);
    println!(
        "\n== pg_nudge soak: {}s of faults, then {} ({:.0}s in all), seed {seed} ==",
        run.as_secs(),
        match drain {
            Some(d) => format!("drained in {}s", d.as_secs()),
            None => format!("NOT drained within {drain_limit}s"),
        },
        started.elapsed().as_secs_f64()
    );
    let ok = r.print() && drain.is_some();
    if drain.is_none() {
        println!("CHECK drained within {drain_limit}s: FAIL");
    }
    println!(
        "logs: {DIR}/server.log, {LOG_DIR}/mailer-*.log\nRESULT: {}",
        if ok { "PASS" } else { "FAIL" }
    );
    // stop mailers (done), the SMTP server and the cluster before exiting
    drop(smtp);
    drop(cluster);
    std::process::exit(if ok { 0 } else { 1 });
}

/// CREATE DATABASE and CREATE EXTENSION, retried for a minute: the
/// extension may be reinstalled under us for a moment.
fn create_database(cluster: &Cluster) {
    let mut admin = connect_retrying(&cluster.dsn("postgres"));
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .expect("CREATE DATABASE");
    let created = wait_for(60, || {
        let mut c = Client::connect(&cluster.dsn(DB), NoTls).ok()?;
        match c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_nudge") {
            Ok(()) => Some(()),
            Err(e) => {
                eprintln!("soak: CREATE EXTENSION: {e} (retrying)");
                std::thread::sleep(Duration::from_secs(2));
                None
            }
        }
    });
    created.expect("CREATE EXTENSION pg_nudge kept failing");
}

/// The source table, the flag the slow context query reads, profiles come
/// with each event; two triggers that send at once, one event per user, so
/// that each committed event is owed exactly one message.
fn setup(dsn: &str) {
    let mut c = connect_retrying(dsn);
    c.batch_execute(&format!(
        r#"CREATE TABLE public.orders (id bigserial PRIMARY KEY, customer_id text NOT NULL,
                                      placed_at timestamptz NOT NULL DEFAULT now(), total numeric);
           CREATE TABLE public.soak_flags (slow boolean NOT NULL);
           INSERT INTO public.soak_flags VALUES (false);
           SELECT nudge.add_source('public.orders', 'customer_id', time_column => 'placed_at',
                                   event_name => 'order_placed');
           SELECT nudge.define_template('soak', 'Hello {{{{ user_id }}}}',
             '<p>order {{{{ event.total }}}}, ping {{{{ event.n }}}}, slow {{{{ context.flag.slow }}}}</p>', 'hi');
           SELECT nudge.define_trigger('soak_orders', '{{"on": {{"event": "order_placed"}}, "template": "soak"}}');
           -- the slow fault: this query sleeps 2 s per user while the flag is set
           SELECT nudge.define_trigger('soak_pings', '{{"on": {{"event": "soak_ping"}}, "template": "soak",
             "context": {{"flag": "SELECT f.slow, $1 AS user_id FROM public.soak_flags f CROSS JOIN LATERAL pg_sleep(CASE WHEN f.slow THEN 2 ELSE 0 END) s"}}}}');
           ALTER DATABASE {DB} SET nudge.user_sql_timeout = 500;
           -- a timed-out lookup is retried with these (as nudge.fail is): short
           -- delays, and enough attempts to outlast a slow window (up to 8 s)
           ALTER DATABASE {DB} SET nudge.retry_base_seconds = 1;
           ALTER DATABASE {DB} SET nudge.retry_max_seconds = 5;
           ALTER DATABASE {DB} SET nudge.max_attempts = 10;"#
    ))
    .expect("setting up the soak database");
    // The worker connected before ALTER DATABASE and so runs without those
    // settings: end it, the postmaster starts it again with them.
    let pid = wait_for(30, || c.query_opt(WORKER, &[]).ok().flatten())
        .expect("the pg_nudge worker is not running")
        .get::<_, i32>(0);
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    wait_for(30, || {
        let now = c.query_opt(WORKER, &[]).ok().flatten()?;
        (now.get::<_, i32>(0) != pid).then_some(())
    })
    .expect("the pg_nudge worker did not come back");
}

/// Faults at random intervals until `run` has passed, with a progress line
/// every 15 seconds.
fn run_faults(inj: &mut Injector, producers: &Producers, smtp: &SmtpServer, run: Duration) {
    let until = inj.started + run;
    let mut next_fault = Instant::now() + inj.next_pause();
    let mut next_progress = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
        if Instant::now() >= next_fault {
            inj.inject_one();
            next_fault = Instant::now() + inj.next_pause();
        }
        if Instant::now() >= next_progress {
            progress(inj, producers, smtp);
            next_progress = Instant::now() + Duration::from_secs(15);
        }
    }
}

fn progress(inj: &Injector, producers: &Producers, smtp: &SmtpServer) {
    let committed = producers
        .committed
        .load(std::sync::atomic::Ordering::Relaxed);
    let db = Client::connect(inj.dsn, NoTls).ok().and_then(|mut c| {
        c.query_one(
            "SELECT (SELECT count(*) FROM nudge.outbox), (SELECT count(*) FROM nudge.outbox WHERE status = 'sent'),
                    (SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting')",
            &[],
        )
        .ok()
    });
    let db = db.map_or("server not answering".into(), |r| {
        format!(
            "outbox {} (sent {}), waiting {}",
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2)
        )
    });
    println!(
        "[{:>5}s] committed {committed}, {db}, received {}",
        inj.started.elapsed().as_secs(),
        smtp.message_ids().len()
    );
}

/// Waits until no enrollment waits and every outbox row is sent (or dead:
/// that will not change); returns how long it took, or None after `limit` s.
fn drain(dsn: &str, limit: u64) -> Option<Duration> {
    let start = Instant::now();
    println!("draining (up to {limit}s)…");
    while start.elapsed() < Duration::from_secs(limit) {
        let left = Client::connect(dsn, NoTls).ok().and_then(|mut c| {
            c.query_one(
                "SELECT (SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting')
                      + (SELECT count(*) FROM nudge.outbox WHERE status IN ('pending', 'claimed'))
                      + (SELECT count(*) FROM nudge.capture_queue)",
                &[],
            )
            .ok()
        });
        if left.is_some_and(|r| r.get::<_, i64>(0) == 0) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    None
}
