//! Outbox consumers for `make bench`: C threads, each with its own connection,
//! claim B messages (every column comes back to the client, as a mailer needs
//! them), then ack them, for S seconds. Prints messages acknowledged per second.
//!
//!     nudge-bench outbox DSN nudge|queue CONSUMERS BATCH SECONDS
//!
//! `nudge` is pg_nudge's protocol (nudge.claim / nudge.ack); `queue` is the
//! minimal hand-written SKIP LOCKED queue of bench/queue.sql that a user would
//! otherwise write: same payload, claim by visibility timeout, ack by DELETE.
use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NUDGE_CLAIM: &str = "SELECT id, user_id, recipient, subject, html, text_body, headers::text FROM nudge.claim($1, '5 minutes', 'bench')";
const NUDGE_ACK: &str = "SELECT nudge.ack_many($1::bigint[])";
const QUEUE_CLAIM: &str = "WITH c AS (SELECT id FROM bench.queue WHERE vt <= now() ORDER BY id LIMIT $1::int FOR UPDATE SKIP LOCKED)
    UPDATE bench.queue q SET vt = now() + interval '5 minutes', read_ct = read_ct + 1 FROM c WHERE q.id = c.id
    RETURNING q.id, q.user_id, q.recipient, q.subject, q.html, q.text_body, q.headers::text";
const QUEUE_ACK: &str = "DELETE FROM bench.queue WHERE id = ANY($1)";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 || args[1] != "outbox" {
        eprintln!("usage: nudge-bench outbox DSN nudge|queue CONSUMERS BATCH SECONDS");
        std::process::exit(2);
    }
    let (dsn, system) = (args[2].clone(), args[3].clone());
    let consumers: usize = args[4].parse().expect("CONSUMERS");
    let batch: i32 = args[5].parse().expect("BATCH");
    let seconds: f64 = args[6].parse().expect("SECONDS");
    let (claim, ack) = match system.as_str() {
        "nudge" => (NUDGE_CLAIM, NUDGE_ACK),
        "queue" => (QUEUE_CLAIM, QUEUE_ACK),
        other => panic!("unknown system {other}"),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(std::sync::Barrier::new(consumers + 1));
    let threads: Vec<_> = (0..consumers)
        .map(|_| {
            let (dsn, stop, done, ready) = (dsn.clone(), stop.clone(), done.clone(), ready.clone());
            std::thread::spawn(move || {
                let mut db = Client::connect(&dsn, NoTls).expect("connect");
                let claim = db.prepare(claim).expect("prepare claim");
                let ack = db.prepare(ack).expect("prepare ack");
                ready.wait();
                while !stop.load(Ordering::Relaxed) {
                    let rows = db.query(&claim, &[&batch]).expect("claim");
                    if rows.is_empty() {
                        panic!("the queue ran dry: fill it with more messages");
                    }
                    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                    // touch the payload as a mailer would
                    let bytes: usize = rows.iter().map(|r| r.get::<_, &str>(4).len()).sum();
                    assert!(bytes > 0);
                    db.execute(&ack, &[&ids]).expect("ack");
                    done.fetch_add(ids.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("consumer thread");
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.0}");
}
