//! pg_nudge on a Citus cluster (docs/citus.md): a coordinator and two worker
//! nodes on this machine, started by `make test-citus`
//! (scripts/citus-cluster.sh), which names the coordinator in
//! NUDGE_CITUS_DSN. Databases: `shop` (the one the nodes' workers serve),
//! `replay` and `claims` (no worker: time moves only by run_due(as_of)).

use postgres::{Client, NoTls};
use std::collections::BTreeSet;

fn cluster(db: &str) -> Client {
    let dsn = std::env::var("NUDGE_CITUS_DSN")
        .expect("NUDGE_CITUS_DSN names the coordinator (make test-citus starts a cluster)");
    Client::connect(&format!("{dsn} dbname={db}"), NoTls).unwrap()
}

/// pg_nudge created anew and distributed, 4 shards over the two nodes.
fn distributed(c: &mut Client) {
    c.batch_execute(
        "DROP EXTENSION IF EXISTS pg_nudge CASCADE;
         CREATE EXTENSION pg_nudge;
         SET citus.shard_count = 4;",
    )
    .unwrap();
    let tables: Vec<(String, String)> = c
        .query("SELECT table_name, kind FROM nudge.distribute()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(tables.contains(&("nudge.outbox".into(), "distributed by user_id".into())));
    assert!(tables.contains(&("nudge.triggers".into(), "reference".into())));
    // co-located: one shard of each per hash range, on the same node
    let colocations: i64 = c
        .query_one(
            "SELECT count(DISTINCT colocationid) FROM pg_dist_partition
              WHERE logicalrelid::regclass::text = ANY (nudge._per_user_tables())",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(colocations, 1);
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The node group that holds the shard of a message's user.
const NODE_OF_USER: &str = "(SELECT p.groupid FROM pg_dist_placement p
       WHERE p.shardid = get_shard_id_for_distribution_column('nudge.outbox', o.user_id))";

#[test]
#[ignore = "needs a Citus cluster: make test-citus"]
fn the_foundation_scenario_runs_on_the_node_of_each_user() {
    let mut c = cluster("shop");
    distributed(&mut c);
    c.batch_execute(
        r#"
        INSERT INTO nudge.profiles (user_id, email, attrs)
        SELECT 'u' || i, 'u' || i || '@example.com', jsonb_build_object('first_name', 'N' || i)
          FROM generate_series(1, 40) i;
        SELECT nudge.define_template('cart_reminder', 'Your cart {{ event.cart_id }}, {{ profile.first_name }}',
                                     '<p>{{ event.cart_id }}</p>');
        SELECT nudge.define_trigger('cart_abandonment', '{
          "on": {"event": "cart_added", "key": "cart_id"}, "wait": "24 hours",
          "unless": [{"event": "purchased", "same_key": true}], "template": "cart_reminder"}');
        "#,
    )
    .unwrap();
    // (a transaction of its own: on a cluster, a trigger defined in the same
    // transaction is not seen by the nodes' other connections; docs/citus.md)
    c.batch_execute(
        r#"
        -- carts of yesterday: due now, for the nodes' workers to write
        SELECT nudge.track('u' || i, 'cart_added', jsonb_build_object('cart_id', 'c' || i), now() - interval '25 hours')
          FROM generate_series(1, 40) i;
        -- a third bought their cart in time; one unsubscribed after the cart
        SELECT nudge.track('u' || i, 'purchased', jsonb_build_object('cart_id', 'c' || i), now() - interval '20 hours')
          FROM generate_series(1, 40) i WHERE i % 3 = 0;
        "#,
    )
    .unwrap();
    // capture ran on the nodes, in the inserting transaction
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.enrollments"), 40);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE state = 'exited'"
        ),
        13
    );
    // the workers of the nodes write the 27 messages by themselves
    let mut written = 0;
    for _ in 0..300 {
        written = count(&mut c, "SELECT count(*) FROM nudge.outbox");
        if written >= 27 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(written, 27);
    // each message was written on the node that holds its user: ids drawn on
    // a node are in that node's range (group << 48)
    let misplaced = count(
        &mut c,
        &format!(
            "WITH o AS MATERIALIZED (SELECT id, user_id FROM nudge.outbox)
             SELECT count(*) FROM o WHERE o.id >> 48 <> {NODE_OF_USER}"
        ),
    );
    assert_eq!(misplaced, 0);
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT id >> 48) FROM nudge.outbox"),
        2,
        "both nodes did work"
    );
    let subject: String = c
        .query_one("SELECT subject FROM nudge.outbox WHERE user_id = 'u1'", &[])
        .unwrap()
        .get(0);
    assert_eq!(subject, "Your cart c1, N1");

    // an unsubscribe after the message was written: it never goes out
    c.batch_execute("SELECT nudge.unsubscribe('u1', 'all')")
        .unwrap();
    // delivery from the coordinator: claim, ack by id
    let mut claimed = vec![];
    loop {
        let batch: Vec<(i64, String)> = c
            .query(
                "SELECT id, user_id FROM nudge.claim(10, '5 minutes', 'test')",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if batch.is_empty() {
            break;
        }
        claimed.extend(batch);
    }
    assert_eq!(claimed.len(), 26);
    assert!(!claimed.iter().any(|(_, u)| u == "u1"));
    // the rest of the protocol by id, from the coordinator: a temporary
    // failure goes back to pending, a release too, a batch is acked at once
    let (failed, released) = (claimed.pop().unwrap().0, claimed.pop().unwrap().0);
    let status: String = c
        .query_one("SELECT nudge.fail($1, '451 later')", &[&failed])
        .unwrap()
        .get(0);
    assert_eq!(status, "pending");
    assert_eq!(
        c.query_one("SELECT nudge.release(ARRAY[$1::bigint])", &[&released])
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let (batch, one_by_one) = claimed.split_at(10);
    let batch: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        c.query_one("SELECT nudge.ack_many($1)", &[&batch])
            .unwrap()
            .get::<_, i32>(0),
        10
    );
    let claimed = one_by_one.to_vec();
    for (id, _) in &claimed {
        let acked: bool = c
            .query_one("SELECT nudge.ack($1, 'provider')", &[id])
            .unwrap()
            .get(0);
        assert!(acked);
        let again: bool = c
            .query_one("SELECT nudge.ack($1, 'provider')", &[id])
            .unwrap()
            .get(0);
        assert!(!again, "a second ack of {id} is a no-op");
    }
    let metrics: Vec<(String, i64)> = c
        .query("SELECT status, messages FROM nudge.outbox_metrics()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(metrics.contains(&("sent".into(), 24)), "{metrics:?}");
    assert!(metrics.contains(&("pending".into(), 2)), "{metrics:?}");
    assert!(metrics.contains(&("cancelled".into(), 1)), "{metrics:?}");
    let state: String = c
        .query_one(
            "SELECT state FROM nudge.enrollments WHERE user_id = 'u1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "suppressed");
    // a mailer on a worker node claims that node's messages (the released one
    // is claimable at once; the failed one waits for its backoff)
    let coordinator = std::env::var("NUDGE_CITUS_DSN").unwrap();
    let node = coordinator.replace("port=28850", "port=28851");
    let mut n = Client::connect(&format!("{node} dbname=shop"), NoTls).unwrap();
    let on_node: Vec<i64> = n
        .query("SELECT id FROM nudge.claim(10)", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let group: i64 = n
        .query_one("SELECT groupid::bigint FROM pg_dist_local_group", &[])
        .unwrap()
        .get(0);
    assert!(on_node.iter().all(|id| id >> 48 == group), "{on_node:?}");
    // an event tracked on a worker node takes an id of that node's range
    // (the coordinator's are below 2^48): no duplicate key with the
    // coordinator's events
    let id: i64 = n
        .query_one("SELECT nudge.track('w1', 'page_viewed')", &[])
        .unwrap()
        .get(0);
    assert_eq!(id >> 48, group);
    assert_eq!(on_node.len(), usize::from(released >> 48 == group));

    // what does not run on a cluster yet is refused, and changes nothing
    let refused = |c: &mut Client, sql: &str| match c.batch_execute(sql) {
        Err(e) => e.code().map(|s| s.code().to_owned()),
        Ok(()) => None,
    };
    c.batch_execute("CREATE TABLE orders (customer text, cart_id text, at timestamptz)")
        .unwrap();
    // a source of one's own must be distributed by its user column,
    // co-located with nudge.events
    let add_orders = "SELECT nudge.add_source('orders', 'customer', time_column => 'at', event_name => 'purchased')";
    assert_eq!(refused(&mut c, add_orders).as_deref(), Some("0A000"));
    assert_eq!(
        refused(
            &mut c,
            r#"SELECT nudge.define_trigger('vip', '{"on": {"event": "cart_added"}, "wait": "1 hour",
                 "audience_sql": "SELECT true", "template": "cart_reminder"}')"#
        )
        .as_deref(),
        Some("0A000")
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.triggers"), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.sources"), 1);

    // distributed co-located, its inserts are captured on the node of each
    // user's shard, in the inserting transaction: orders close carts
    c.batch_execute(
        "SELECT create_distributed_table('orders', 'customer', colocate_with => 'nudge.events')",
    )
    .unwrap();
    c.batch_execute(add_orders).unwrap();
    assert_eq!(
        count(&mut n, "SELECT count(*) FROM nudge.sources"),
        2,
        "registered on the node too"
    );
    // (one transaction: the nodes' workers would otherwise remind the carts
    // before the orders come)
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) SELECT 'v' || i, 'v' || i || '@example.com' FROM generate_series(1, 10) i;
         SELECT nudge.track('v' || i, 'cart_added', jsonb_build_object('cart_id', 'k' || i), now() - interval '25 hours')
           FROM generate_series(1, 10) i;
         INSERT INTO orders SELECT 'v' || i, 'k' || i, now() - interval '20 hours' FROM generate_series(1, 5) i;",
    )
    .unwrap();
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.enrollments WHERE user_id LIKE 'v%' AND state = 'exited'"
        ),
        5
    );
    let mut reminded = 0;
    for _ in 0..300 {
        reminded = count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE user_id LIKE 'v%'",
        );
        if reminded >= 5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        reminded, 5,
        "the nodes' workers remind the five who did not buy"
    );
    // run again (after adding a node, say) with a source of one's own: fine
    c.batch_execute("SELECT count(*) FROM nudge.distribute()")
        .unwrap();
    assert_eq!(count(&mut n, "SELECT count(*) FROM nudge.sources"), 2);
    // a node that does not know the source (a drop_source half done): the
    // inserts into its shards go on, uncaptured; distribute registers it again
    n.batch_execute("SELECT nudge._source_here('public.orders', NULL, NULL, NULL, NULL, NULL)")
        .unwrap();
    c.batch_execute(
        "INSERT INTO orders SELECT 'v' || i, 'k' || i, now() FROM generate_series(1, 10) i",
    )
    .unwrap();
    c.batch_execute("SELECT count(*) FROM nudge.distribute()")
        .unwrap();
    assert_eq!(count(&mut n, "SELECT count(*) FROM nudge.sources"), 2);
    c.batch_execute("SELECT nudge.drop_source('orders')")
        .unwrap();
    assert_eq!(
        count(&mut n, "SELECT count(*) FROM nudge.sources"),
        1,
        "and unregistered there"
    );
    c.batch_execute("INSERT INTO orders VALUES ('v9', 'k9', now())")
        .unwrap();

    // measured in plain SQL, over the whole cluster
    let stats = c
        .query_one(
            "SELECT entered, exited, suppressed, sent FROM nudge.trigger_stats WHERE trigger = 'cart_abandonment'",
            &[],
        )
        .unwrap();
    let stats: (i64, i64, i64, i64) = (stats.get(0), stats.get(1), stats.get(2), stats.get(3));
    assert_eq!(stats, (50, 18, 1, 31));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.compare_arms()"),
        0
    );

    // explain reads a user's journey from the cluster
    assert!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.explain('cart_abandonment', 'u2') WHERE step = 'sent'"
        ) == 1
    );
}

/// A month of events for 40 users, in time order (user, event, props, seconds).
fn history() -> Vec<(String, String, String, i64)> {
    let mut rng = nudge_integration::Rng::new(7);
    let mut out = vec![];
    let mut t = 0;
    for _ in 0..400 {
        t += rng.below(6000) as i64;
        let user = format!("{}", rng.below(40));
        let cart = format!("c{}", rng.below(3));
        let (event, props) = match rng.below(10) {
            0..=6 => ("cart_added", format!(r#"{{"cart_id": "{cart}"}}"#)),
            _ => ("purchased", format!(r#"{{"cart_id": "{cart}"}}"#)),
        };
        out.push((user, event.to_string(), props, t));
    }
    out
}

const START: &str = "2026-01-01 00:00:00+00";

/// What a run wrote, for users of `prefix`, without the prefix.
fn outcome(c: &mut Client, prefix: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let strip = |s: String| s.replacen(prefix, "", 1);
    let messages = c
        .query(
            "SELECT trigger || ' ' || user_id || ' ' || subject || ' ' || extract(epoch FROM available_at)::text
               FROM nudge.outbox WHERE user_id LIKE $1 || '%'",
            &[&prefix],
        )
        .unwrap()
        .into_iter()
        .map(|r| strip(r.get(0)))
        .collect();
    let journeys = c
        .query(
            "SELECT trigger || ' ' || user_id || ' ' || key || ' ' || extract(epoch FROM entered_at)::text
                    || ' ' || state || ' ' || coalesced::text || ' '
                    -- a message key is made of the user id
                    || regexp_replace(coalesce(reason, ''), 'nm_[0-9a-f]+', 'nm_')
               FROM nudge.enrollments WHERE user_id LIKE $1 || '%'",
            &[&prefix],
        )
        .unwrap()
        .into_iter()
        .map(|r| strip(r.get(0)))
        .collect();
    (messages, journeys)
}

/// Event-time equivalence on a cluster: the month loaded in one statement
/// (captured on each node, one statement per shard) and lived through event
/// by event, with caps and priority deciding between two triggers, write the
/// same journeys and messages.
#[test]
#[ignore = "needs a Citus cluster: make test-citus"]
fn a_month_loaded_at_once_sends_what_living_through_it_sends_on_a_cluster() {
    let mut c = cluster("replay");
    distributed(&mut c);
    c.batch_execute(
        r#"
        SET timezone = 'UTC';
        SELECT nudge.configure('{"caps": [{"max": 1, "per": "12 hours"}]}');
        SELECT nudge.define_template('cart', 'Cart {{ event.cart_id }}', '<p>{{ event.cart_id }}</p>');
        SELECT nudge.define_template('thanks', 'Thanks for {{ event.cart_id }}', '<p>thanks</p>');
        SELECT nudge.define_trigger('cart_abandon', '{"expire_after": "never", "on": {"event": "cart_added", "key": "cart_id"},
            "wait": "2 hours", "priority": 10, "unless": [{"event": "purchased", "same_key": true}], "template": "cart"}');
        SELECT nudge.define_trigger('post_purchase', '{"expire_after": "never", "on": {"event": "purchased"}, "wait": "3 hours",
            "template": "thanks"}');
        -- entry on the second cart within six hours: capture reads the
        -- user's history (every source's events) on the node
        SELECT nudge.define_trigger('keen', '{"expire_after": "never", "on": {"event": "cart_added", "min_count": 2, "within": "6 hours"},
            "wait": "1 hour", "priority": 5, "template": "cart"}');
        INSERT INTO nudge.profiles (user_id, email)
        SELECT p || i, p || i || '@example.com' FROM generate_series(0, 39) i, unnest(ARRAY['bulk', 'live']) p;
        "#,
    )
    .unwrap();
    let events = history();
    let end = (events.last().unwrap().3 + 86_400) as f64;

    nudge_integration::load_at_once(&mut c, &events, START, "bulk");
    let bulk_written: i32 = c
        .query_one(
            "SELECT nudge.run_due($1::text::timestamptz + $2 * interval '1 second', 100000)",
            &[&START, &end],
        )
        .unwrap()
        .get(0);

    let live_written = nudge_integration::live_through(&mut c, &events, START, end, "live");

    let (bulk_msgs, bulk_journeys) = outcome(&mut c, "bulk");
    let (live_msgs, live_journeys) = outcome(&mut c, "live");
    assert!(bulk_msgs.len() > 40, "plenty sent: {}", bulk_msgs.len());
    assert!(bulk_journeys.iter().any(|j| j.contains(" exited ")));
    assert!(
        bulk_journeys.iter().any(|j| j.contains(" suppressed ")),
        "the cap held some back"
    );
    assert!(
        bulk_journeys.iter().any(|j| j.starts_with("keen ")),
        "the second cart within six hours entered"
    );
    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
        a.symmetric_difference(b)
            .take(6)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        diff(&bulk_msgs, &live_msgs).is_empty(),
        "messages differ: {:#?}",
        diff(&bulk_msgs, &live_msgs)
    );
    assert!(
        diff(&bulk_journeys, &live_journeys).is_empty(),
        "journeys differ: {:#?}",
        diff(&bulk_journeys, &live_journeys)
    );
    assert_eq!(bulk_written, live_written);
    assert_eq!(bulk_written as usize, bulk_msgs.len());
}

/// Mailers claiming from the coordinator at once: every message is handed
/// out once, and acknowledged once.
#[test]
#[ignore = "needs a Citus cluster: make test-citus"]
fn concurrent_claims_from_the_coordinator_hand_out_each_message_once() {
    let mut c = cluster("claims");
    distributed(&mut c);
    c.batch_execute(
        r#"
        SELECT nudge.define_template('hello', 'Hello', '<p>hi</p>');
        SELECT nudge.define_trigger('hello', '{"on": {"event": "signed_up"}, "wait": "1 minute", "template": "hello"}');
        INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(1, 300) i;
        "#,
    )
    .unwrap();
    c.batch_execute("INSERT INTO nudge.events (user_id, event) SELECT 'u' || i, 'signed_up' FROM generate_series(1, 300) i")
        .unwrap();
    let written: i32 = c
        .query_one(
            "SELECT nudge.run_due(now() + interval '2 minutes', 100000)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(written, 300);
    // run_due wrote them with as_of ahead: make them claimable now
    c.batch_execute("UPDATE nudge.outbox SET available_at = now() - interval '1 second'")
        .unwrap();
    let dsn = std::env::var("NUDGE_CITUS_DSN").unwrap();
    let mailers: Vec<_> = (0..4)
        .map(|m| {
            let dsn = dsn.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&format!("{dsn} dbname=claims"), NoTls).unwrap();
                let mut mine = vec![];
                loop {
                    let ids: Vec<i64> = c
                        .query(
                            "SELECT id FROM nudge.claim(8, '10 minutes', $1)",
                            &[&format!("m{m}")],
                        )
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    if ids.is_empty() {
                        break;
                    }
                    for id in &ids {
                        let first: bool =
                            c.query_one("SELECT nudge.ack($1)", &[id]).unwrap().get(0);
                        assert!(first, "message {id} was acknowledged before");
                    }
                    mine.extend(ids);
                }
                mine
            })
        })
        .collect();
    let mut all = vec![];
    for m in mailers {
        all.extend(m.join().unwrap());
    }
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 300, "each message claimed once");
    assert_eq!(distinct.len(), 300);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'"
        ),
        300
    );

    // priority holds across a node's shard groups: a batch of one per node
    // brings the one urgent message, wherever it is, before older mail
    c.batch_execute(
        r#"SELECT nudge.define_trigger('urgent', '{"on": {"event": "password_reset"}, "wait": "1 minute",
            "priority": 100, "transactional": true, "template": "hello"}')"#,
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(301, 400) i;
         INSERT INTO nudge.events (user_id, event, occurred_at)
         SELECT 'u' || i, 'signed_up', now() - interval '1 hour' FROM generate_series(301, 400) i;
         -- for a user of the last shard group of its node: the node's first
         -- groups are full of older mail
         INSERT INTO nudge.events (user_id, event, occurred_at)
         SELECT x.u, 'password_reset', now() - interval '2 minutes'
           FROM (SELECT 'u' || i AS u FROM generate_series(301, 400) i) x
           JOIN pg_dist_shard s ON s.shardid = get_shard_id_for_distribution_column('nudge.events', x.u)
           JOIN pg_dist_placement p ON p.shardid = s.shardid
          WHERE s.shardminvalue::bigint = (
                SELECT max(s2.shardminvalue::bigint) FROM pg_dist_shard s2
                  JOIN pg_dist_placement p2 ON p2.shardid = s2.shardid
                 WHERE s2.logicalrelid = 'nudge.events'::regclass AND p2.groupid = p.groupid)
          LIMIT 1;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT nudge.run_due(now(), 100000)::bigint"),
        101
    );
    let first: Vec<String> = c
        .query("SELECT trigger FROM nudge.claim(2)", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(first.contains(&"urgent".to_string()), "{first:?}");

    // a backtest from the coordinator replays every node's users, merged
    let rows: Vec<(String, i64, Vec<String>)> = c
        .query(
            r#"SELECT outcome, journeys, sample_users FROM nudge.backtest(
                   '{"on": {"event": "signed_up"}, "wait": "1 minute", "template": "hello"}',
                   now() - interval '1 day', now() + interval '1 day', 'hello')"#,
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let sent = rows.iter().find(|r| r.0 == "sent").expect("sent journeys");
    assert_eq!(sent.1, 400, "{rows:?}");
    assert_eq!(sent.2.len(), 5, "samples pooled from the nodes");
}
