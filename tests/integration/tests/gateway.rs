//! nudge-gateway against a real server: real HTTP requests, the vendors'
//! official Python SDKs, signatures made by independent code (openssl for
//! SNS, the p256 and hmac crates for SendGrid and Mailgun), and a login role
//! that holds only nudge_writer and nudge_mailer.

use base64::Engine;
use nudge_integration::{connect, count, dsn, fresh_db, wait_for};
use postgres::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const KEY: &str = "wk_test_1";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn gateway_bin() -> PathBuf {
    std::env::var_os("NUDGE_GATEWAY")
        .map(Into::into)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/nudge-gateway")
        })
}

/// A database of its own and the role the gateway logs in as.
fn setup(name: &str) -> (String, String) {
    let db = fresh_db(name);
    let role = format!("{name}_gw");
    let mut admin = connect(&dsn());
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN IN ROLE nudge_writer, nudge_mailer"
        ))
        .unwrap();
    let as_gateway = format!("{db} user={role}");
    (db, as_gateway)
}

struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    fn start(database_url: &str, args: &[&str]) -> Gateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(gateway_bin())
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                database_url,
            ])
            .args(["--write-keys", KEY])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start nudge-gateway (`make integration` builds it)");
        let base = format!("http://127.0.0.1:{port}");
        let g = Gateway { child, base };
        wait_for(30, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .expect("the gateway listens");
        g
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// (status, body) of a POST, whatever the status.
    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut req = ureq::post(&self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        reply(req.send_bytes(body))
    }

    fn get(&self, path: &str) -> (u16, String) {
        reply(ureq::get(&self.url(path)).call())
    }
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(res) => (res.status(), res.into_string().unwrap()),
        Err(ureq::Error::Status(code, res)) => (code, res.into_string().unwrap()),
        Err(e) => panic!("no HTTP reply: {e}"),
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sdk(name: &str, base: &str, key: &str) -> std::process::Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/sdks.py"))
        .args([name, base, key])
        .output()
        .expect("python3")
}

fn text(c: &mut Client, sql: &str) -> String {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn the_segment_amplitude_and_mixpanel_sdks_land_events_and_profiles() {
    let (db, as_gateway) = setup("nudge_it_gw_sdks");
    let g = Gateway::start(&as_gateway, &[]);
    let mut c = connect(&db);
    for name in ["segment", "amplitude", "mixpanel"] {
        let out = sdk(name, &g.base, KEY);
        assert!(
            out.status.success(),
            "{name} SDK: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let user = format!("{name}-u1");
        // sent twice with one id: stored once, at the client's time, with its properties
        assert_eq!(
            text(
                &mut c,
                &format!(
                    "SELECT string_agg(occurred_at AT TIME ZONE 'UTC' || ' ' || (props->>'cart') || ' ' || (props->>'total'), '; ')
                       FROM nudge.events WHERE user_id = '{user}' AND event = 'cart_added'"
                )
            ),
            "2026-01-01 10:00:00 c1 42",
            "{name}"
        );
        assert_eq!(
            text(
                &mut c,
                &format!("SELECT email || ' ' || (attrs->>'plan') FROM nudge.profiles WHERE user_id = '{user}'")
            ),
            format!("{user}@example.com pro"),
            "{name}"
        );
    }
    // what each protocol carries beyond that
    assert_eq!(
        text(
            &mut c,
            "SELECT timezone FROM nudge.profiles WHERE user_id = 'segment-u1'"
        ),
        "Europe/Paris"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.events WHERE user_id = 'segment-u1' AND event = 'page_viewed' AND props->>'name' = 'Pricing'"),
        1
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT attrs->>'first_seen' FROM nudge.profiles WHERE user_id = 'amplitude-u1'"
        ),
        "ad"
    );
    assert_eq!(
        text(&mut c, "SELECT (occurred_at AT TIME ZONE 'UTC')::text FROM nudge.events WHERE user_id = 'mixpanel-u1' AND event = 'purchased'"),
        "2025-12-31 10:00:00"
    );
    // anonymous visitors are not stored: pg_nudge mails known users
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.events WHERE user_id LIKE '%anon%'"
        ),
        0
    );
    // a wrong key: the SDK reports the refusal, nothing lands
    let before = count(&mut c, "SELECT count(*) FROM nudge.events");
    let out = sdk("segment", &g.base, "not-a-key");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("write key is not one this gateway takes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.events"), before);
}

#[test]
fn a_bad_request_gets_a_4xx_that_names_the_problem_and_stores_nothing() {
    let (db, as_gateway) = setup("nudge_it_gw_bad");
    let g = Gateway::start(&as_gateway, &["--max-events", "3", "--max-body", "20000"]);
    let mut c = connect(&db);
    let auth = format!("Basic {}", B64.encode(format!("{KEY}:")));
    let json = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/batch", r#"{"batch": [{"type": "track", "userId": "u", "event": "x"}, {"type": "track", "userId": "u"}]}"#.into(),
         400, "batch[1].event: a track call names its event"),
        ("/v1/track", r#"{"userId": "u", "event": "x", "timestamp": "last tuesday"}"#.into(), 400, "timestamp: \\\"last tuesday\\\" is not an ISO 8601 time"),
        ("/v1/batch", r#"{"batch": [{}, {}, {}, {}]}"#.into(), 400, "4 events in one request; at most 3"),
        ("/v1/batch", format!(r#"{{"batch": [{{"type": "track", "userId": "u", "event": "x", "properties": {{"p": "{}"}}}}]}}"#, "x".repeat(25000)), 413, ""),
        ("/v1/identify", r#"{"userId": "u", "traits": {"timezone": "Mars/Olympus"}}"#.into(), 400, "'Mars/Olympus' is not a time zone"),
        ("/v1/track", "{not json".into(), 400, "body: not JSON"),
        ("/2/httpapi", format!(r#"{{"api_key": "{KEY}", "events": [{{"user_id": "u", "event_type": "x", "time": "noon"}}]}}"#), 400, "events[0].time: a time is a number"),
        ("/2/httpapi", r#"{"api_key": "nope", "events": []}"#.into(), 401, "not one this gateway takes"),
        ("/v1/track", format!(r#"{{"userId": "u", "event": "x", "messageId": "{}"}}"#, "m".repeat(3000)), 400, "item 1: the id has 3000 characters"),
    ];
    for (path, body, status, says) in cases {
        let (got, reply) = g.post(path, &json, body.as_bytes());
        assert_eq!(got, status, "{path} {body:.80}: {reply}");
        assert!(reply.contains(says), "{path}: {reply}");
    }
    // no key at all
    let (got, reply) = g.post(
        "/v1/track",
        &[("Content-Type", "application/json")],
        br#"{"userId": "u", "event": "x"}"#,
    );
    assert_eq!(
        (got, reply.contains("a write key is required")),
        (401, true),
        "{reply}"
    );
    let (got, reply) = g.post("/track", &[], b"data=%7B%22event%22%3A%22x%22%2C%22properties%22%3A%7B%22token%22%3A%22nope%22%2C%22distinct_id%22%3A%22u%22%7D%7D");
    assert_eq!(got, 401, "{reply}");
    assert!(reply.contains("\"status\":0"), "{reply}");
    // /import takes a server key by HTTP Basic only, not a token in the record
    let import = format!(
        r#"[{{"event": "x", "properties": {{"token": "{KEY}", "distinct_id": "u", "time": 1767261600}}}}]"#
    );
    let (got, reply) = g.post(
        "/import",
        &[("Content-Type", "application/json")],
        import.as_bytes(),
    );
    assert_eq!(got, 401, "{reply}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.events"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM nudge.profiles"), 0);
    // and in SQL: a writer cannot write into a webhook's ledger
    let e = c
        .query_one("SELECT * FROM nudge.ingest('webhook:sendgrid', ARRAY['sg-1'], ARRAY['u'], ARRAY['x'], ARRAY[now()], ARRAY['{}'::jsonb])", &[])
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
}

#[test]
fn a_public_key_sends_events_but_changes_no_profile_and_a_batch_merges_a_users_traits() {
    let (db, as_gateway) = setup("nudge_it_gw_public");
    let g = Gateway::start(&as_gateway, &["--public-keys", "browser-key"]);
    let mut c = connect(&db);
    let basic = |k: &str| format!("Basic {}", B64.encode(format!("{k}:")));
    let batch = br#"{"batch": [
        {"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}},
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "track", "userId": "u1", "event": "viewed", "messageId": "p1"}]}"#;
    let browser = basic("browser-key");
    let (status, reply) = g.post(
        "/v1/batch",
        &[
            ("Authorization", &browser),
            ("Content-Type", "application/json"),
        ],
        batch,
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.events WHERE user_id = 'u1'"
        ),
        1
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM nudge.profiles"),
        0,
        "a browser's key set a profile"
    );
    let server = basic(KEY);
    let (status, reply) = g.post(
        "/v1/batch",
        &[
            ("Authorization", &server),
            ("Content-Type", "application/json"),
        ],
        batch,
    );
    assert_eq!(status, 200, "{reply}");
    // both identifies of the batch apply, in order; the event was a replay
    assert_eq!(
        text(
            &mut c,
            "SELECT email || ' ' || (attrs->>'plan') FROM nudge.profiles WHERE user_id = 'u1'"
        ),
        "u1@example.com pro"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM nudge.events WHERE user_id = 'u1'"
        ),
        1
    );
}

/// One message in the outbox of a database the gateway serves; returns its key.
fn one_message(c: &mut Client) -> String {
    c.batch_execute(
        r#"SELECT nudge.define_template('t', 'News', '<p>news</p>');
           SELECT nudge.define_trigger('news', '{"on": {"event": "read"}, "template": "t"}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
           SELECT nudge.track('u1', 'read', '{}', now() - interval '1 minute');
           SELECT nudge.run_due();"#,
    )
    .unwrap();
    text(c, "SELECT message_key FROM nudge.outbox")
}

fn engagement(c: &mut Client) -> String {
    text(
        c,
        "SELECT concat_ws(',', CASE WHEN delivered_at IS NOT NULL THEN 'delivered' END,
                              CASE WHEN opened_at IS NOT NULL THEN 'opened' END,
                              CASE WHEN bounced_at IS NOT NULL THEN 'bounced' END,
                              CASE WHEN complained_at IS NOT NULL THEN 'complained' END)
                    || ' events=' || (SELECT count(*) FROM nudge.events WHERE event LIKE 'email_%')
                    || ' suppressed=' || (SELECT count(*) FROM nudge.suppressions)
           FROM nudge.outbox",
    )
}

fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}");
    out.stdout
}

/// An SNS message signed (SignatureVersion 1, SHA1withRSA) with `key`.
fn sns_message(key: &Path, cert_url: &str, fields: &[(&str, String)]) -> Vec<u8> {
    // AWS's rule: the signed fields by name, in byte order, each as "name\nvalue\n"
    let mut sorted: Vec<&(&str, String)> = fields.iter().collect();
    sorted.sort_by_key(|(k, _)| *k);
    let mut signed = String::new();
    for (k, v) in sorted {
        if [
            "Message",
            "MessageId",
            "Subject",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        ]
        .contains(k)
        {
            signed.push_str(&format!("{k}\n{v}\n"));
        }
    }
    let sig = openssl(
        &["dgst", "-sha1", "-sign", key.to_str().unwrap()],
        signed.as_bytes(),
    );
    let mut body = serde_json::Map::new();
    for (k, v) in fields {
        body.insert((*k).into(), v.clone().into());
    }
    body.insert("SignatureVersion".into(), "1".into());
    body.insert("Signature".into(), B64.encode(sig).into());
    body.insert("SigningCertURL".into(), cert_url.into());
    serde_json::to_vec(&body).unwrap()
}

#[test]
fn each_provider_webhook_is_taken_only_with_a_valid_signature_and_a_replay_changes_nothing() {
    use hmac::Mac;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    let (db, as_gateway) = setup("nudge_it_gw_hooks");
    let mut c = connect(&db);
    let key = one_message(&mut c);

    // SNS's certificate in a trust store, and a second key that is not SNS's
    let store = std::env::temp_dir().join("nudge_it_gw_sns");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(store.join("certs")).unwrap();
    let (sns_key, other_key) = (store.join("sns.key"), store.join("other.key"));
    for k in [&sns_key, &other_key] {
        openssl(&["genrsa", "-out", k.to_str().unwrap(), "2048"], b"");
    }
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            sns_key.to_str().unwrap(),
            "-subj",
            "/CN=sns.amazonaws.com",
            "-days",
            "2",
            "-out",
            store
                .join("certs/SimpleNotificationService-test.pem")
                .to_str()
                .unwrap(),
        ],
        b"",
    );
    let sendgrid = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let sendgrid_public = B64.encode(
        sendgrid
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes(),
    );
    let g = Gateway::start(
        &as_gateway,
        &[
            "--sendgrid-public-key",
            &sendgrid_public,
            "--mailgun-signing-key",
            "mg-signing-key",
            "--postmark-credentials",
            "hook:pm-secret",
            "--sns-certs",
            store.join("certs").to_str().unwrap(),
            "--sns-topics",
            "arn:aws:sns:us-east-1:1:ses",
        ],
    );

    // Postmark: HTTP Basic credentials (Postmark signs nothing)
    let delivery = format!(
        r#"{{"RecordType": "Delivery", "MessageID": "pm-1", "DeliveredAt": "2026-01-01T10:00:00Z", "Metadata": {{"nudge_message_key": "{key}"}}}}"#
    );
    let wrong = format!("Basic {}", B64.encode("hook:guess"));
    assert_eq!(
        g.post(
            "/webhooks/postmark",
            &[("Authorization", &wrong)],
            delivery.as_bytes()
        )
        .0,
        401
    );
    assert_eq!(
        g.post("/webhooks/postmark", &[], delivery.as_bytes()).0,
        401
    );
    assert_eq!(engagement(&mut c), " events=0 suppressed=0");
    let right = format!("Basic {}", B64.encode("hook:pm-secret"));
    assert_eq!(
        g.post(
            "/webhooks/postmark",
            &[("Authorization", &right)],
            delivery.as_bytes()
        ),
        (200, "1 of 1 recorded\n".into())
    );

    // SendGrid: ECDSA over timestamp + body, the timestamp recent
    let events = format!(
        r#"[{{"event": "open", "sg_event_id": "sg-1", "timestamp": 1767261600, "nudge_message_key": "{key}"}}]"#
    );
    let sign = |ts: &str, body: &str| {
        let sig: p256::ecdsa::Signature = sendgrid.sign(format!("{ts}{body}").as_bytes());
        B64.encode(sig.to_der().as_bytes())
    };
    let now = unix_now();
    let (ts, ts_later, ts_old) = (
        now.to_string(),
        (now + 1).to_string(),
        (now - 3600).to_string(),
    );
    let good = sign(&ts, &events);
    let forged = sign(&ts, &events.replace("open", "spamreport"));
    let stale = sign(&ts_old, &events);
    // another body; another time under the same signature; a true signature from an hour ago
    for (sig, at) in [
        (forged.as_str(), ts.as_str()),
        (good.as_str(), ts_later.as_str()),
        (stale.as_str(), ts_old.as_str()),
    ] {
        let (status, _) = g.post(
            "/webhooks/sendgrid",
            &[
                ("X-Twilio-Email-Event-Webhook-Signature", sig),
                ("X-Twilio-Email-Event-Webhook-Timestamp", at),
            ],
            events.as_bytes(),
        );
        assert_eq!(status, 401);
    }
    assert_eq!(engagement(&mut c), "delivered events=1 suppressed=0");
    let headers = [
        ("X-Twilio-Email-Event-Webhook-Signature", good.as_str()),
        ("X-Twilio-Email-Event-Webhook-Timestamp", ts.as_str()),
    ];
    assert_eq!(
        g.post("/webhooks/sendgrid", &headers, events.as_bytes()).0,
        200
    );
    // the same report again: answered, not recorded twice
    assert_eq!(
        g.post("/webhooks/sendgrid", &headers, events.as_bytes()),
        (200, "0 of 1 recorded\n".into())
    );
    assert_eq!(engagement(&mut c), "delivered,opened events=2 suppressed=0");

    // Mailgun: HMAC-SHA256 of timestamp + token; the event itself is not signed
    let mailgun = |signing_key: &str, ts: i64, token: &str, id: &str, event: &str| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(signing_key.as_bytes()).unwrap();
        mac.update(format!("{ts}{token}").as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        format!(
            r#"{{"signature": {{"timestamp": "{ts}", "token": "{token}", "signature": "{sig}"}},
                    "event-data": {{"id": "{id}", "event": "{event}", "severity": "permanent", "timestamp": 1767261600.5,
                                    "user-variables": {{"nudge_message_key": "{key}"}}}}}}"#
        )
    };
    let post_mailgun = |body: String| g.post("/webhooks/mailgun", &[], body.as_bytes());
    assert_eq!(
        post_mailgun(mailgun("guessed", now, "tok-1", "mg-1", "failed")).0,
        401
    );
    assert_eq!(
        post_mailgun(mailgun(
            "mg-signing-key",
            now - 3600,
            "tok-0",
            "mg-0",
            "failed"
        ))
        .0,
        401
    );
    assert_eq!(engagement(&mut c), "delivered,opened events=2 suppressed=0");
    assert_eq!(
        post_mailgun(mailgun("mg-signing-key", now, "tok-1", "mg-1", "failed")).0,
        200
    );
    assert_eq!(
        engagement(&mut c),
        "delivered,opened,bounced events=3 suppressed=1"
    );
    // a captured timestamp, token and signature around another event: the token was used
    assert_eq!(
        post_mailgun(mailgun(
            "mg-signing-key",
            now,
            "tok-1",
            "mg-forged",
            "complained"
        )),
        (200, "0 of 1 recorded\n".into())
    );
    assert_eq!(
        engagement(&mut c),
        "delivered,opened,bounced events=3 suppressed=1"
    );

    // SES through SNS: RSA under a certificate from the trust store, from one of our topics
    let cert_url = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
    let complaint = format!(
        r#"{{"eventType": "Complaint", "complaint": {{"timestamp": "2026-01-01T11:00:00Z"}}, "mail": {{"tags": {{"nudge_message_key": ["{key}"]}}}}}}"#
    );
    let fields = |id: &str, topic: &str| {
        vec![
            ("Type", "Notification".to_owned()),
            ("MessageId", id.to_owned()),
            ("TopicArn", topic.to_owned()),
            ("Message", complaint.clone()),
            ("Timestamp", "2026-01-01T11:00:01.000Z".to_owned()),
        ]
    };
    let ours = "arn:aws:sns:us-east-1:1:ses";
    let by_other = sns_message(&other_key, cert_url, &fields("sns-1", ours));
    let elsewhere = sns_message(
        &sns_key,
        "https://sns.us-east-1.amazonaws.com.example.org/SimpleNotificationService-test.pem",
        &fields("sns-1", ours),
    );
    let not_stored = sns_message(
        &sns_key,
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-other.pem",
        &fields("sns-1", ours),
    );
    // SNS signs any account's topic: a topic that is not ours proves nothing
    let other_topic = sns_message(
        &sns_key,
        cert_url,
        &fields("sns-1", "arn:aws:sns:us-east-1:666:someone-elses"),
    );
    for (body, why) in [
        (&by_other, "does not match"),
        (&elsewhere, "not an SNS host"),
        (&not_stored, "not in the trust store"),
        (&other_topic, "not a topic this gateway takes"),
    ] {
        let (status, reply) = g.post("/webhooks/ses", &[], body);
        assert_eq!(status, 401, "{reply}");
        assert!(reply.contains(why), "{reply}");
    }
    assert_eq!(
        engagement(&mut c),
        "delivered,opened,bounced events=3 suppressed=1"
    );
    let signed = sns_message(&sns_key, cert_url, &fields("sns-1", ours));
    assert_eq!(
        g.post("/webhooks/ses", &[], &signed),
        (200, "1 of 1 recorded\n".into())
    );
    assert_eq!(
        g.post("/webhooks/ses", &[], &signed),
        (200, "0 of 1 recorded\n".into())
    );
    assert_eq!(
        engagement(&mut c),
        "delivered,opened,bounced,complained events=4 suppressed=1"
    );
    // a subscription request: verified, then left to the operator to confirm
    let confirm = sns_message(
        &sns_key,
        cert_url,
        &[
            ("Type", "SubscriptionConfirmation".to_owned()),
            ("MessageId", "sns-2".to_owned()),
            ("Token", "t".to_owned()),
            ("TopicArn", ours.to_owned()),
            ("Message", "You have chosen to subscribe".to_owned()),
            (
                "SubscribeURL",
                "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription".to_owned(),
            ),
            ("Timestamp", "2026-01-01T11:00:01.000Z".to_owned()),
        ],
    );
    assert_eq!(g.post("/webhooks/ses", &[], &confirm).0, 200);
    let tampered = String::from_utf8(confirm)
        .unwrap()
        .replace("sns.us-east-1.amazonaws.com/?", "evil.example/?");
    assert_eq!(g.post("/webhooks/ses", &[], tampered.as_bytes()).0, 401);

    // a provider that is not configured, and one that is not a provider
    let bare = Gateway::start(&as_gateway, &[]);
    assert_eq!(
        bare.post(
            "/webhooks/mailgun",
            &[],
            mailgun("mg-signing-key", now, "tok-9", "mg-9", "failed").as_bytes()
        )
        .0,
        404
    );
    assert_eq!(bare.post("/webhooks/mandrill", &[], b"{}").0, 404);
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn an_unsubscribe_through_the_gateway_stops_the_next_message_of_that_topic() {
    let (db, as_gateway) = setup("nudge_it_gw_unsub");
    let g = Gateway::start(&as_gateway, &[]);
    let mut c = connect(&db);
    c.batch_execute(&format!(
        r#"SELECT nudge.configure('{{"unsubscribe_url": "{}"}}');
           SELECT nudge.define_template('t', 'News', '<p>news</p>');
           SELECT nudge.define_trigger('news', '{{"on": {{"event": "read"}}, "topic": "newsletter", "reentry": "every_time", "template": "t"}}');
           SELECT nudge.define_trigger('receipt', '{{"on": {{"event": "read"}}, "transactional": true, "template": "t"}}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
           SELECT nudge.track('u1', 'read', '{{}}', now() - interval '2 minutes');
           SELECT nudge.run_due();"#,
        g.base
    ))
    .unwrap();
    let (link, post): (String, String) = {
        let r = c
            .query_one(
                "SELECT headers->>'List-Unsubscribe', headers->>'List-Unsubscribe-Post' FROM nudge.outbox WHERE trigger = 'news'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(post, "List-Unsubscribe=One-Click");
    let url = link
        .strip_prefix('<')
        .and_then(|l| l.strip_suffix('>'))
        .unwrap_or_else(|| panic!("{link}"));
    let path = url.strip_prefix(&g.base).unwrap_or_else(|| panic!("{url}"));
    let subscribed = |c: &mut Client| {
        count(c, "SELECT count(*) FROM nudge.subscriptions WHERE user_id = 'u1' AND topic = 'newsletter' AND status = 'unsubscribed'")
    };
    // a mail scanner following the link changes nothing
    let (status, page) = g.get(path);
    assert_eq!(status, 200);
    assert!(page.contains("method=\"post\""), "{page}");
    assert_eq!(subscribed(&mut c), 0);
    // the one-click POST (RFC 8058's body)
    let (status, page) = g.post(
        path,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"List-Unsubscribe=One-Click",
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("emails about newsletter"), "{page}");
    assert_eq!(subscribed(&mut c), 1);
    // a forged token is refused and changes nothing
    let forged = format!("{}x", path);
    assert_eq!(g.post(&forged, &[], b"").0, 400);
    // the next message of that topic is stopped; the receipt still goes
    c.batch_execute(
        "SELECT nudge.track('u1', 'read', '{}', now() - interval '1 minute'); SELECT nudge.run_due();",
    )
    .unwrap();
    assert_eq!(
        text(&mut c, "SELECT string_agg(trigger || ':' || coalesce(rule, '-'), ' ' ORDER BY entered_at, trigger) FROM nudge.enrollments"),
        "news:- receipt:- news:consent receipt:-"
    );
}

#[test]
fn metrics_report_the_outbox_the_worker_and_the_gateway_and_healthz_the_database() {
    let (db, as_gateway) = setup("nudge_it_gw_metrics");
    let mut c = connect(&db);
    one_message(&mut c);
    let g = Gateway::start(&as_gateway, &[]);
    assert_eq!(g.get("/healthz"), (200, "ok\n".into()));
    let (status, text) = g.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "nudge_outbox_messages{status=\"pending\"} 1",
        "nudge_trigger_messages{trigger=\"news\",status=\"pending\"} 1",
        "nudge_gateway_requests_total{route=\"/healthz\",status=\"200\"} 1",
        "nudge_worker_running ",
        "nudge_outbox_oldest_pending_seconds ",
        "nudge_gateway_request_seconds_bucket{",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    // no database: healthz says so, the gateway stays up
    let down = Gateway::start("host=127.0.0.1 port=1 user=postgres connect_timeout=2", &[]);
    let (status, reply) = down.get("/healthz");
    assert_eq!(status, 503, "{reply}");
    assert_eq!(down.get("/metrics").0, 200);
}

#[test]
fn tracked_clicks_redirect_only_where_pg_nudge_signed_and_the_triggers_sender_reaches_the_smtp_server(
) {
    let (db, as_gateway) = setup("nudge_it_gw_track");
    let g = Gateway::start(&as_gateway, &[]);
    let mut c = connect(&db);
    c.batch_execute(&format!(
        r#"SELECT nudge.configure('{{"tracking_url": "{}"}}');
           SELECT nudge.define_template('t', 'Your cart', '<html><body><p><a href="https://shop.example/cart?a=1&amp;b=2">Back to your cart</a></p></body></html>');
           SELECT nudge.define_trigger('cart', '{{"on": {{"event": "cart_added"}}, "template": "t",
               "from": "Trailhead <hello@shop.example>", "reply_to": "care@shop.example",
               "headers": {{"X-Campaign": "cart"}}, "track": {{"opens": true, "clicks": true}}}}');
           INSERT INTO nudge.profiles (user_id, email) VALUES ('u1', 'u1@example.com');
           SELECT nudge.track('u1', 'cart_added', '{{}}', now() - interval '1 minute');
           SELECT nudge.run_due();"#,
        g.base
    ))
    .unwrap();
    let html = text(&mut c, "SELECT html FROM nudge.outbox");
    let token_after = |path: &str| {
        html.split(&format!("{}/{path}/", g.base))
            .nth(1)
            .unwrap_or_else(|| panic!("no /{path}/ link in {html}"))
            .split('"')
            .next()
            .unwrap()
            .to_owned()
    };
    let (click, open) = (token_after("c"), token_after("o"));
    assert!(!html.contains("href=\"https://shop.example"), "{html}");

    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let res = agent.get(&g.url(&format!("/c/{click}"))).call().unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(
        res.header("Location"),
        Some("https://shop.example/cart?a=1&b=2")
    );
    // the same token with another URL in it: no redirect, nothing recorded
    let (payload, mac) = click.split_once('.').unwrap();
    let forged_payload = {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let text = String::from_utf8(raw)
            .unwrap()
            .replace("https://shop.example", "https://evil.example");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    };
    match agent
        .get(&g.url(&format!("/c/{forged_payload}.{mac}")))
        .call()
    {
        Err(ureq::Error::Status(400, res)) => assert_eq!(res.header("Location"), None),
        other => panic!(
            "a forged click was answered: {:?}",
            other.map(|r| r.status())
        ),
    }
    for _ in 0..2 {
        let res = agent.get(&g.url(&format!("/o/{open}"))).call().unwrap();
        assert_eq!(res.content_type(), "image/gif");
    }
    assert_eq!(
        text(
            &mut c,
            "SELECT (clicked_at IS NOT NULL) || ' ' || (opened_at IS NOT NULL)
                    || ' ' || (SELECT string_agg(event || coalesce(':' || (props->>'url'), ''), ',' ORDER BY event)
                                 FROM nudge.events WHERE event LIKE 'email_%')
               FROM nudge.outbox"
        ),
        "true true email_clicked:https://shop.example/cart?a=1&b=2,email_opened"
    );

    // the trigger's sender, as the SMTP server receives it
    let smtp = nudge_integration::SmtpServer::start("gw_track");
    c.batch_execute(
        "UPDATE nudge.outbox SET status = 'pending', available_at = now(), checked_at = now()",
    )
    .unwrap();
    let status = Command::new(nudge_integration::mailer_bin())
        .args([
            "--database-url",
            &db,
            "--smtp-port",
            &smtp.port.to_string(),
            "--once",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let received = smtp.messages();
    assert_eq!(received.len(), 1);
    for header in [
        "From: Trailhead <hello@shop.example>",
        "Reply-To: care@shop.example",
        "X-Campaign: cart",
    ] {
        assert!(
            received[0].contains(header),
            "no {header:?} in:\n{}",
            received[0]
        );
    }
}
