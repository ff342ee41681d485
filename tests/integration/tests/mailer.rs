//! The reference mailer against a real SMTP server: concurrent mailers,
//! a mailer killed mid-batch, a mailer stopped with SIGTERM.

use nudge_integration::{connect, count, fresh_db, mailer_bin, wait_for, SmtpServer};
use postgres::Client;
use std::collections::HashSet;
use std::process::{Child, Command};

fn outbox_with(db: &str, n: i32) -> Client {
    let mut c = connect(db);
    c.batch_execute(&format!(
        r#"SELECT nudge.define_template('t', 'Hello {{{{ user_id }}}}', '<p>hi</p>', 'hi');
           SELECT nudge.define_trigger('at_once', '{{"on": {{"event": "ping"}}, "template": "t"}}');
           INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, {n}) i;
           INSERT INTO nudge.events (user_id, event, occurred_at) SELECT 'u' || i, 'ping', now() - interval '1 minute' FROM generate_series(1, {n}) i;
           SELECT nudge.run_due(now(), 100000);"#
    ))
    .unwrap();
    c
}

fn mailer(db: &str, smtp: &SmtpServer, extra: &[&str]) -> Child {
    Command::new(mailer_bin())
        .args([
            "--database-url",
            db,
            "--smtp-port",
            &smtp.port.to_string(),
            "--poll-ms",
            "200",
        ])
        .args(extra)
        .spawn()
        .expect("the nudge-mailer binary (cargo build -p nudge-mailer)")
}

fn keys(c: &mut Client) -> HashSet<String> {
    c.query(
        "SELECT '<' || message_key || '@pg_nudge>' FROM nudge.outbox",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn two_mailers_deliver_every_message_exactly_once() {
    let db = fresh_db("nudge_it_mail_two");
    let mut c = outbox_with(&db, 300);
    let smtp = SmtpServer::start("two");
    let mut a = mailer(&db, &smtp, &["--once", "--batch", "7", "--consumer", "a"]);
    let mut b = mailer(&db, &smtp, &["--once", "--batch", "7", "--consumer", "b"]);
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'"
        ),
        300
    );
    let received = smtp.message_ids();
    assert_eq!(received.len(), 300, "each message delivered once");
    assert_eq!(
        received.iter().cloned().collect::<HashSet<_>>(),
        keys(&mut c)
    );
    // both took part
    let consumers = count(
        &mut c,
        "SELECT count(DISTINCT split_part(claimed_by, '/', 1)) FROM nudge.outbox",
    );
    assert_eq!(consumers, 2);
}

#[test]
fn a_mailer_killed_mid_batch_loses_nothing() {
    let db = fresh_db("nudge_it_mail_kill");
    let mut c = outbox_with(&db, 120);
    let smtp = SmtpServer::start("kill");
    // Slow, with big batches and a short lease, so that the kill lands mid-batch.
    let mut a = mailer(
        &db,
        &smtp,
        &[
            "--batch",
            "60",
            "--lease",
            "2",
            "--rate",
            "40",
            "--consumer",
            "a",
        ],
    );
    wait_for(30, || (smtp.message_ids().len() >= 5).then_some(())).expect("a started delivering");
    signal(&a, "-KILL");
    a.wait().unwrap();
    let claimed_by_a = count(
        &mut c,
        "SELECT count(*) FROM nudge.outbox WHERE status = 'claimed'",
    );
    assert!(claimed_by_a > 0, "a died holding a claimed batch");
    let mut b = mailer(&db, &smtp, &["--batch", "10", "--consumer", "b"]);
    let all = wait_for(60, || {
        (count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'",
        ) == 120)
            .then_some(())
    });
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success(), "b stops cleanly on SIGTERM");
    assert!(all.is_some(), "every message was sent in the end");
    let received = smtp.message_ids();
    let distinct: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(distinct, keys(&mut c), "nothing lost");
    // at-least-once: only the message in flight when a died can arrive twice
    assert!(
        received.len() <= 121,
        "{} deliveries for 120 messages",
        received.len()
    );
}

#[test]
fn sigterm_hands_the_unsent_rest_of_the_batch_back() {
    let db = fresh_db("nudge_it_mail_term");
    let mut c = outbox_with(&db, 60);
    let smtp = SmtpServer::start("term");
    let mut m = mailer(
        &db,
        &smtp,
        &["--batch", "60", "--rate", "20", "--consumer", "m"],
    );
    wait_for(30, || (smtp.message_ids().len() >= 3).then_some(())).expect("delivering");
    signal(&m, "-TERM");
    assert!(m.wait().unwrap().success());
    let sent = count(
        &mut c,
        "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'",
    );
    assert!(sent < 60, "stopped mid-batch");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'claimed'"
        ),
        0,
        "the rest was released"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'pending' AND available_at <= now()"
        ),
        60 - sent
    );
    assert_eq!(
        smtp.message_ids().len() as i64,
        sent,
        "everything delivered was acked"
    );
}

/// A server restart or crash cuts every connection: the mailer connects
/// again and goes on sending, with no supervisor to restart it.
#[test]
fn a_mailer_whose_connection_is_cut_connects_again() {
    let db = fresh_db("nudge_it_mail_cut");
    let mut c = outbox_with(&db, 0);
    let smtp = SmtpServer::start("cut");
    let mut m = mailer(&db, &smtp, &["--consumer", "cut"]);
    let listening = wait_for(20, || {
        (count(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()") > 0).then_some(())
    });
    assert!(listening.is_some(), "the mailer did not connect");
    c.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) SELECT 'v' || i, 'v' || i || '@example.com' FROM generate_series(1, 20) i;
         INSERT INTO nudge.events (user_id, event, occurred_at) SELECT 'v' || i, 'ping', now() - interval '1 minute' FROM generate_series(1, 20) i;
         SELECT nudge.run_due(now(), 1000);",
    )
    .unwrap();
    // every message is taken up by the connection the mailer opened again
    let claimed = wait_for(30, || {
        (count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE claimed_by = 'cut/0'",
        ) == 20)
            .then_some(())
    });
    let alive = m.try_wait().unwrap().is_none();
    signal(&m, "-TERM");
    let _ = m.wait();
    assert!(alive, "the mailer exited when its connection was cut");
    assert!(
        claimed.is_some(),
        "the mailer did not take up every message after the cut"
    );
}

/// The database goes away after the SMTP server took a message and before
/// its ack committed: the next session acks it, so it is not sent again
/// when its lease ends.
#[test]
fn a_message_sent_before_the_cut_is_acked_by_the_next_session() {
    let db = fresh_db("nudge_it_mail_owed");
    let mut c = outbox_with(&db, 1);
    let smtp = SmtpServer::start("owed");
    // the mailer's ack hangs while public.hold has a row
    c.batch_execute(
        "CREATE TABLE public.hold (x int); INSERT INTO public.hold VALUES (1);
         CREATE FUNCTION public.slow_ack() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.status = 'sent' AND EXISTS (SELECT FROM public.hold) THEN PERFORM pg_sleep(60); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow_ack BEFORE UPDATE ON nudge.outbox FOR EACH ROW EXECUTE FUNCTION public.slow_ack();",
    )
    .unwrap();
    let mut m = mailer(&db, &smtp, &["--lease", "2", "--consumer", "owed"]);
    let acking = wait_for(30, || {
        (count(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT nudge.ack(%' AND wait_event = 'PgSleep'",
        ) == 1)
            .then_some(())
    });
    assert!(acking.is_some(), "the mailer did not reach its ack");
    assert_eq!(smtp.message_ids().len(), 1, "sent before the ack");
    c.batch_execute(
        "DELETE FROM public.hold;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT nudge.ack(%';",
    )
    .unwrap();
    let sent = wait_for(20, || {
        (count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'",
        ) == 1)
            .then_some(())
    });
    // well past the lease: a message left claimed would have gone again
    std::thread::sleep(std::time::Duration::from_secs(4));
    signal(&m, "-TERM");
    let _ = m.wait();
    assert!(sent.is_some(), "the owed ack was not recorded");
    assert_eq!(smtp.message_ids().len(), 1, "delivered twice");
}

/// RFC 8058 end to end: the message as the SMTP server received it carries
/// the one-click headers the row holds, and the token in its link
/// unsubscribes its recipient from its topic, once.
#[test]
fn a_delivered_message_carries_a_working_one_click_unsubscribe() {
    let db = fresh_db("nudge_it_mail_unsub");
    let mut c = connect(&db);
    c.batch_execute(
        r#"SELECT nudge.configure('{"unsubscribe_url": "https://mail.shop.example"}');
           SELECT nudge.define_template('t', 'News', '<p>news</p>', 'news');
           SELECT nudge.define_trigger('news', '{"on": {"event": "read"}, "topic": "newsletter", "template": "t"}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
           SELECT nudge.track('u1', 'read', '{}', now() - interval '1 minute');
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    let smtp = SmtpServer::start("unsub");
    assert!(mailer(&db, &smtp, &["--once"]).wait().unwrap().success());
    let received = smtp.messages();
    assert_eq!(received.len(), 1);
    // the header block, folded lines joined
    let head = received[0]
        .split("\n\n")
        .next()
        .unwrap()
        .replace("\n ", " ")
        .replace("\n\t", " ");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name} header in:\n{head}"))
    };
    assert_eq!(
        header("List-Unsubscribe-Post"),
        "List-Unsubscribe=One-Click"
    );
    let link = header("List-Unsubscribe");
    let token = link
        .strip_prefix("<https://mail.shop.example/u/")
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or_else(|| panic!("not an https link: {link}"));
    let unsubscribed = |c: &mut Client| -> bool {
        c.query_one("SELECT changed FROM nudge.unsubscribe($1)", &[&token])
            .unwrap()
            .get(0)
    };
    assert!(unsubscribed(&mut c));
    assert!(!unsubscribed(&mut c), "a second click changes nothing");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.subscriptions WHERE user_id = 'u1' AND topic = 'newsletter' AND status = 'unsubscribed'"),
        1
    );
}

#[test]
fn a_server_that_refuses_the_session_marks_no_message_dead() {
    let db = fresh_db("nudge_it_mail_refused");
    let mut c = outbox_with(&db, 3);
    // a server that greets with 554 and hangs up: a 5xx, but not about a message
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::Write;
            let mut s = stream;
            let _ = s.write_all(b"554 5.7.1 no service for you\r\n");
        }
    });
    let status = Command::new(mailer_bin())
        .args([
            "--database-url",
            &db,
            "--smtp-port",
            &port.to_string(),
            "--once",
            "--batch",
            "10",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'pending' AND attempts = 1 AND last_error LIKE 'connecting to the SMTP server%'"
        ),
        3,
        "every message is kept for a later try"
    );
}
