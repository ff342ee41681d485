//! The routes: each handler reads its protocol's request, checks the key or
//! signature, and makes one database call. Replies are in each protocol's
//! own shape, so that its SDK reads them.

use crate::config::Config;
use crate::db::{self, DbError};
use crate::ingest::{amplitude, mixpanel, segment, Batch, Invalid, Limits};
use crate::metrics::Metrics;
use crate::pages;
use crate::webhooks::{mailgun, postmark, sendgrid, ses, Refused, Report};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use chrono::Utc;
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

pub struct Gateway {
    pub cfg: Config,
    pub pool: Pool,
    pub metrics: Metrics,
    pub sendgrid_key: Option<p256::ecdsa::VerifyingKey>,
    pub sns_certs: Option<ses::Certs>,
}

type App = State<Arc<Gateway>>;

pub fn router(g: Arc<Gateway>) -> Router {
    let max_body = g.cfg.max_body;
    Router::new()
        .route("/v1/{call}", post(segment_call))
        .route("/2/httpapi", post(amplitude_call))
        .route("/track", post(mixpanel_track))
        .route("/import", post(mixpanel_import))
        .route("/engage", post(mixpanel_engage))
        .route("/webhooks/{provider}", post(webhook))
        .route("/u/{token}", get(unsubscribe_page).post(unsubscribe))
        .route("/c/{token}", get(click))
        .route("/o/{token}", get(open))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(Arc::clone(&g), measure))
        .with_state(g)
}

async fn measure(State(g): App, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let started = Instant::now();
    let res = next.run(req).await;
    g.metrics.request(
        &route,
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    res
}

fn limits(g: &Gateway) -> Limits {
    Limits {
        max_event: g.cfg.max_event,
        max_events: g.cfg.max_events,
    }
}

/// The body, un-gzipped when the client says so (Segment's SDK may), within
/// the same limit as a plain one.
fn body_bytes(
    g: &Gateway,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, (StatusCode, String)> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .take(g.cfg.max_body as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: not gzip: {e}")))?;
    if out.len() > g.cfg.max_body {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: more than {} bytes once unzipped", g.cfg.max_body),
        ));
    }
    Ok(out)
}

fn json_body(bytes: &[u8]) -> Result<Value, (StatusCode, String)> {
    serde_json::from_slice(bytes)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: not JSON: {e}")))
}

/// HTTP Basic's user name (Segment's write key, Mixpanel's API secret).
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.strip_prefix("Basic ")?.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.as_str(), |(u, _)| u)
            .to_owned(),
    )
}

/// Whose key a request carries: a server's may set profiles, a public one
/// (readable in any browser or app) only send events.
#[derive(Clone, Copy, PartialEq)]
enum Trust {
    Server,
    Public,
}

fn key_ok(g: &Gateway, key: Option<&str>) -> Result<Trust, (StatusCode, String)> {
    if g.cfg.write_keys.is_empty() && g.cfg.public_keys.is_empty() {
        return Err((
            StatusCode::UNAUTHORIZED,
            "this gateway takes no events: no write key is configured (--write-keys)".into(),
        ));
    }
    match key {
        Some(k) if g.cfg.write_keys.contains(k) => Ok(Trust::Server),
        Some(k) if g.cfg.public_keys.contains(k) => Ok(Trust::Public),
        Some(_) => Err((
            StatusCode::UNAUTHORIZED,
            "the write key is not one this gateway takes".into(),
        )),
        None => Err((StatusCode::UNAUTHORIZED, "a write key is required".into())),
    }
}

/// A public key's profile updates are dropped, not refused: the events of
/// the same batch still count, and an SDK would retry a refused batch.
fn trusted(mut b: Batch, trust: Trust) -> Batch {
    if trust == Trust::Public {
        b.ignored += b.profiles.len();
        b.profiles.clear();
    }
    b
}

/// Stores a parsed batch; (stored, replayed) or the error as a status and text.
async fn store(g: &Gateway, source: &str, b: Batch) -> Result<(i32, i32), (StatusCode, String)> {
    b.check_lengths().map_err(invalid)?;
    let (stored, replayed) = db::ingest(&g.pool, source, &b.events, &b.profiles)
        .await
        .map_err(|e| match e {
            DbError::Refused(m) => (StatusCode::BAD_REQUEST, m),
            DbError::Unavailable(m) => {
                eprintln!("nudge-gateway: {source}: {m}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unavailable; try again".into(),
                )
            }
        })?;
    g.metrics.counted(source, "stored", stored as usize);
    g.metrics.counted(source, "replayed", replayed as usize);
    g.metrics.counted(source, "ignored", b.ignored);
    g.metrics.counted(source, "profiles", b.profiles.len());
    Ok((stored, replayed))
}

fn invalid(e: Invalid) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, e.0)
}

// --- Segment ---

async fn segment_call(
    State(g): App,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let bytes = body_bytes(&g, &headers, body)?;
        let v = json_body(&bytes)?;
        let key = basic_user(&headers)
            .or_else(|| v.get("writeKey").and_then(Value::as_str).map(str::to_owned));
        let trust = key_ok(&g, key.as_deref())?;
        let b = segment::parse(&call, &v, &limits(&g), Utc::now()).map_err(invalid)?;
        store(&g, "segment", trusted(b, trust)).await
    }
    .await;
    match result {
        Ok(_) => Json(json!({"success": true})).into_response(),
        Err((status, message)) => {
            (status, Json(json!({"success": false, "error": message}))).into_response()
        }
    }
}

// --- Amplitude ---

async fn amplitude_call(State(g): App, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let bytes = body_bytes(&g, &headers, body)?;
        let v = json_body(&bytes)?;
        let trust = key_ok(&g, v.get("api_key").and_then(Value::as_str))?;
        let b = trusted(
            amplitude::parse(&v, &limits(&g), Utc::now()).map_err(invalid)?,
            trust,
        );
        let n = b.events.len() + b.profiles.len();
        store(&g, "amplitude", b).await.map(|_| (n, bytes.len()))
    }
    .await;
    match result {
        Ok((n, size)) => Json(json!({
            "code": 200, "events_ingested": n, "payload_size_bytes": size,
            "server_upload_time": Utc::now().timestamp_millis()
        }))
        .into_response(),
        Err((status, message)) => (
            status,
            Json(json!({"code": status.as_u16(), "error": message})),
        )
            .into_response(),
    }
}

// --- Mixpanel ---

enum Mixpanel {
    Events,
    Import,
    Profiles,
}

async fn mixpanel_track(state: App, headers: HeaderMap, body: Bytes) -> Response {
    mixpanel_call(state, Mixpanel::Events, headers, body).await
}

async fn mixpanel_import(state: App, headers: HeaderMap, body: Bytes) -> Response {
    mixpanel_call(state, Mixpanel::Import, headers, body).await
}

async fn mixpanel_engage(state: App, headers: HeaderMap, body: Bytes) -> Response {
    mixpanel_call(state, Mixpanel::Profiles, headers, body).await
}

async fn mixpanel_call(
    State(g): App,
    endpoint: Mixpanel,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let bytes = body_bytes(&g, &headers, body)?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/x-www-form-urlencoded");
        let records = mixpanel::records(content_type, &bytes).map_err(invalid)?;
        let (b, tokens) = match endpoint {
            Mixpanel::Profiles => mixpanel::profiles(&records, &limits(&g)),
            _ => mixpanel::events(&records, &limits(&g), Utc::now()),
        }
        .map_err(invalid)?;
        // /import takes only a server's secret, by HTTP Basic, as Mixpanel's
        // does; /track and /engage name the project token in every record
        let trust = if matches!(endpoint, Mixpanel::Import) {
            match key_ok(&g, basic_user(&headers).as_deref())? {
                Trust::Server => Trust::Server,
                Trust::Public => {
                    return Err((
                        StatusCode::UNAUTHORIZED,
                        "/import takes a server key (--write-keys), not a public token".into(),
                    ))
                }
            }
        } else {
            let mut trust = Trust::Server;
            for t in &tokens {
                if key_ok(&g, t.as_deref())? == Trust::Public {
                    trust = Trust::Public;
                }
            }
            trust
        };
        let b = trusted(b, trust);
        store(&g, "mixpanel", b).await
    }
    .await;
    match result {
        Ok(_) => Json(json!({"status": 1, "error": null})).into_response(),
        Err((status, message)) => {
            (status, Json(json!({"status": 0, "error": message}))).into_response()
        }
    }
}

// --- provider webhooks ---

async fn webhook(
    State(g): App,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let reports: Result<Vec<Report>, Refused> = match provider.as_str() {
        "sendgrid" => sendgrid::verify(
            g.sendgrid_key.as_ref(),
            header_text(sendgrid::SIGNATURE),
            header_text(sendgrid::TIMESTAMP),
            &body,
            g.cfg.webhook_max_age,
        )
        .and_then(|v| sendgrid::reports(&v)),
        "mailgun" => mailgun::verify(
            g.cfg.mailgun_signing_key.as_deref(),
            &body,
            g.cfg.webhook_max_age,
        )
        .and_then(|v| mailgun::report(&v))
        .map(|r| r.into_iter().collect()),
        "postmark" => postmark::verify(
            g.cfg.postmark_credentials.as_deref(),
            header_text("authorization"),
            &body,
        )
        .and_then(|v| postmark::report(&v))
        .map(|r| r.into_iter().collect()),
        "ses" => match ses::verify(g.sns_certs.as_ref(), &g.cfg.sns_topics, &body) {
            Ok(ses::Sns::Confirm {
                topic,
                subscribe_url,
            }) => {
                // verified; confirming reaches AWS, which is the operator's to do
                eprintln!("nudge-gateway: SNS asks to confirm the subscription to {topic}: visit {subscribe_url}");
                return (
                    StatusCode::OK,
                    "subscription request verified; confirm it at its SubscribeURL\n",
                )
                    .into_response();
            }
            Ok(ses::Sns::Notification { id, message }) => {
                ses::report(&id, &message).map(|r| r.into_iter().collect())
            }
            Ok(ses::Sns::Other) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
        _ => Err(Refused::NotConfigured),
    };
    let reports = match reports {
        Ok(r) => r,
        Err(Refused::NotConfigured) => {
            return (
                StatusCode::NOT_FOUND,
                format!("no webhook {provider:?} is configured here\n"),
            )
                .into_response()
        }
        Err(Refused::Unsigned(why)) => {
            g.metrics.counted(&provider, "refused", 1);
            return (StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response();
        }
        Err(Refused::Invalid(why)) => {
            return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
        }
    };
    match db::webhook(&g.pool, &provider, &reports).await {
        Ok(recorded) => {
            g.metrics.counted(&provider, "stored", recorded);
            g.metrics
                .counted(&provider, "replayed", reports.len() - recorded);
            (
                StatusCode::OK,
                format!("{recorded} of {} recorded\n", reports.len()),
            )
                .into_response()
        }
        // the provider retries what we do not take
        Err(DbError::Refused(m) | DbError::Unavailable(m)) => {
            eprintln!("nudge-gateway: webhook {provider}: {m}");
            (StatusCode::SERVICE_UNAVAILABLE, "not recorded; try again\n").into_response()
        }
    }
}

// --- one-click unsubscribe (RFC 8058) ---

/// A mail scanner that follows links must not unsubscribe anyone: GET only
/// shows the button.
async fn unsubscribe_page() -> Html<String> {
    Html(pages::confirm())
}

async fn unsubscribe(State(g): App, Path(token): Path<String>) -> Response {
    match db::unsubscribe(&g.pool, &token).await {
        Ok((topic, _)) => {
            g.metrics.counted("unsubscribe", "stored", 1);
            Html(pages::done(&topic)).into_response()
        }
        Err(DbError::Refused(m)) => {
            (StatusCode::BAD_REQUEST, Html(pages::refused(&m))).into_response()
        }
        Err(DbError::Unavailable(m)) => {
            eprintln!("nudge-gateway: unsubscribe: {m}");
            (StatusCode::SERVICE_UNAVAILABLE, Html(pages::unavailable())).into_response()
        }
    }
}

// --- open and click tracking ---

/// Redirects only to a URL pg_nudge signed: no open redirect.
async fn click(State(g): App, Path(token): Path<String>) -> Response {
    match db::follow(&g.pool, &token).await {
        Ok(url) => {
            g.metrics.counted("click", "stored", 1);
            (
                StatusCode::FOUND,
                [
                    (header::LOCATION, location(&url)),
                    (header::CACHE_CONTROL, "no-store".to_owned()),
                ],
            )
                .into_response()
        }
        Err(DbError::Refused(m)) => {
            (StatusCode::BAD_REQUEST, Html(pages::refused(&m))).into_response()
        }
        Err(DbError::Unavailable(m)) => {
            eprintln!("nudge-gateway: click: {m}");
            (StatusCode::SERVICE_UNAVAILABLE, Html(pages::unavailable())).into_response()
        }
    }
}

/// A URL as a Location header holds it: what is not visible ASCII (`grün`,
/// a space) percent-encoded as UTF-8, as a browser would send it.
fn location(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for c in url.chars() {
        if c.is_ascii_graphic() {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// The smallest transparent GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// The pixel comes back whatever happened: a mail client shows no broken image.
async fn open(State(g): App, Path(token): Path<String>) -> Response {
    match db::opened(&g.pool, &token).await {
        Ok(first) => g
            .metrics
            .counted("open", if first { "stored" } else { "replayed" }, 1),
        Err(DbError::Refused(_)) => g.metrics.counted("open", "refused", 1),
        Err(DbError::Unavailable(m)) => eprintln!("nudge-gateway: open: {m}"),
    }
    (
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PIXEL,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_location_is_visible_ascii() {
        assert_eq!(
            super::location("https://shop.example/grün?q=a b"),
            "https://shop.example/gr%C3%BCn?q=a%20b"
        );
    }
}

// --- operations ---

async fn metrics(State(g): App) -> Response {
    let db = match db::gauges(&g.pool).await {
        Ok(d) => d,
        Err(DbError::Refused(m) | DbError::Unavailable(m)) => {
            eprintln!("nudge-gateway: metrics: {m}");
            Vec::new()
        }
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        g.metrics.render(&db),
    )
        .into_response()
}

async fn healthz(State(g): App) -> Response {
    match db::healthy(&g.pool).await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(DbError::Refused(m) | DbError::Unavailable(m)) => {
            // the error stays in the log: it may name hosts and roles
            eprintln!("nudge-gateway: healthz: {m}");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}
