//! nudge-mailer: LISTENs on `nudge_outbox` (polling as a fallback), claims a
//! batch, sends each message over SMTP, acks or fails it. On SIGTERM it
//! finishes the message in flight, hands the rest of its batch back
//! (`nudge.release`) and exits; a mailer that dies instead leaves its batch to
//! come back when the lease ends.

mod config;
mod envelope;
mod smtp;

use config::Config;
use envelope::Row;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use smtp::Smtp;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = Config::from_args(&args, |k| std::env::var(k).ok()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).expect("signal handler");
    }
    let threads: Vec<_> = (0..cfg.concurrency)
        .map(|i| {
            let cfg = cfg.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || run(&cfg, i, &stop))
        })
        .collect();
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok(n)) => eprintln!("nudge-mailer: thread done, {n} messages sent"),
            Ok(Err(e)) => {
                eprintln!("nudge-mailer: {e}");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    std::process::exit(i32::from(failed));
}

/// One worker thread: its own SMTP transport, and a database session that
/// is opened again (with backoff) whenever the server goes away: a restart
/// or a crash of the server must not need a supervisor to bring mail back.
/// What was claimed but not sent when the session died comes back when its
/// lease ends; what was sent but not acked is acked by the next session, so a
/// server restart between the two does not send it twice.
fn run(cfg: &Config, thread: usize, stop: &AtomicBool) -> Result<u64, String> {
    let mut smtp = Smtp::new(cfg)?;
    let consumer = format!("{}/{thread}", cfg.consumer);
    let mut sent = 0u64;
    let mut owed = Owed::default();
    let mut backoff = RECONNECT_MIN;
    while !stop.load(Ordering::Relaxed) {
        let before = sent;
        match session(cfg, &mut smtp, &consumer, stop, &mut sent, &mut owed) {
            Ok(()) => break,
            Err(e) if cfg.once => return Err(e),
            Err(e) => {
                if sent > before {
                    backoff = RECONNECT_MIN;
                }
                eprintln!(
                    "nudge-mailer {consumer}: {e}; connecting again in {:.1}s",
                    backoff.as_secs_f64()
                );
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
    Ok(sent)
}

const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Acks for messages the SMTP server accepted, not yet recorded.
#[derive(Default)]
struct Owed(Vec<(i64, String)>);

impl Owed {
    /// Records what is owed, oldest first; stops at the first database error
    /// and keeps the rest for the next session. An ack that did commit before
    /// the connection died is harmless to repeat (`ack` returns false).
    /// An ack the server refuses (the message was deleted, or its lease ran
    /// out and another mailer failed it) is dropped with a line on stderr:
    /// only a lost connection keeps it owed.
    fn settle(&mut self, db: &mut Client) -> Result<(), String> {
        while let Some((id, provider_id)) = self.0.first() {
            match db.execute("SELECT nudge.ack($1, $2)", &[id, provider_id]) {
                Ok(_) => {}
                // ack's own refusal (RAISE: unknown, or not claimed)
                Err(e) if e.code() == Some(&postgres::error::SqlState::RAISE_EXCEPTION) => {
                    eprintln!("nudge-mailer: message {id} was sent but its ack was refused: {e}");
                }
                Err(e) => return Err(format!("ack: {e}")),
            }
            self.0.remove(0);
        }
        Ok(())
    }
}

/// Claims and sends until stopped (Ok) or the database fails (Err).
fn session(
    cfg: &Config,
    smtp: &mut Smtp,
    consumer: &str,
    stop: &AtomicBool,
    sent: &mut u64,
    owed: &mut Owed,
) -> Result<(), String> {
    let mut db = Client::connect(&cfg.database_url, NoTls).map_err(|e| format!("database: {e}"))?;
    owed.settle(&mut db)?;
    db.batch_execute("LISTEN nudge_outbox")
        .map_err(|e| format!("LISTEN: {e}"))?;
    let pause = (cfg.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate));
    while !stop.load(Ordering::Relaxed) {
        let batch = claim(&mut db, cfg, consumer)?;
        if batch.is_empty() {
            if cfg.once {
                break;
            }
            wait_for_work(&mut db, cfg.poll, stop);
            continue;
        }
        let mut left: Vec<i64> = batch.iter().map(|r| r.id).collect();
        for row in &batch {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let started = Instant::now();
            deliver(&mut db, smtp, cfg, row, owed)?;
            *sent += 1;
            left.retain(|id| *id != row.id);
            if let Some(p) = pause {
                std::thread::sleep(p.saturating_sub(started.elapsed()));
            }
        }
        if !left.is_empty() {
            db.execute("SELECT nudge.release($1)", &[&left])
                .map_err(|e| format!("release: {e}"))?;
        }
    }
    Ok(())
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
}

fn claim(db: &mut Client, cfg: &Config, consumer: &str) -> Result<Vec<Row>, String> {
    let rows = db
        .query(
            "SELECT id, message_key, recipient, subject, html, text_body, headers::text
               FROM nudge.claim($1, make_interval(secs => $2), $3)",
            &[&cfg.batch, &cfg.lease.as_secs_f64(), &consumer],
        )
        .map_err(|e| format!("claim: {e}"))?;
    Ok(rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            message_key: r.get(1),
            recipient: r.get(2),
            subject: r.get(3),
            html: r.get(4),
            text_body: r.get(5),
            headers: serde_json::from_str(r.get::<_, &str>(6)).unwrap_or(serde_json::Value::Null),
        })
        .collect())
}

/// Sends one message and records the outcome. A database error ends the
/// session (`run` connects again); an SMTP error is the message's (`nudge.fail`, retried or dead).
fn deliver(
    db: &mut Client,
    smtp: &mut Smtp,
    cfg: &Config,
    row: &Row,
    owed: &mut Owed,
) -> Result<(), String> {
    let outcome = envelope::build(row, &cfg.from)
        .map_err(|e| (e, true))
        .and_then(|m| smtp.send(&m).map_err(|f| (f.text, f.permanent)));
    match outcome {
        Ok(resp) => {
            let provider_id = resp.message().collect::<Vec<_>>().join(" ");
            owed.0.push((row.id, provider_id));
            owed.settle(db)?;
        }
        Err((error, permanent)) => {
            eprintln!(
                "nudge-mailer: message {} ({}): {error}",
                row.id, row.message_key
            );
            db.execute(
                "SELECT nudge.fail($1, $2, $3)",
                &[&row.id, &error, &permanent],
            )
            .map_err(|e| format!("fail: {e}"))?;
        }
    }
    Ok(())
}

/// Sleeps until a NOTIFY arrives, the poll interval passes, or we are stopped.
fn wait_for_work(db: &mut Client, poll: Duration, stop: &AtomicBool) {
    let until = Instant::now() + poll;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let slice = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        let mut n = db.notifications();
        if n.timeout_iter(slice).next().ok().flatten().is_some() {
            // drain the rest: one claim serves them all
            while n.iter().next().ok().flatten().is_some() {}
            return;
        }
    }
}
