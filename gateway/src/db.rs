//! The gateway's statements: each request is one call of a pg_nudge
//! function, so the rules (de-duplication, profile merging, consent, what an
//! engagement does) live in the database, the same for every way in.

use crate::ingest::{Event, Profile};
use crate::webhooks::Report;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::error::SqlState;

#[derive(Debug)]
pub enum DbError {
    /// pg_nudge refused the input (SQLSTATE class 22): the client's to fix.
    Refused(String),
    /// Anything else: the client should try again later.
    Unavailable(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            // 22: a value pg_nudge refuses; 54: one too large to index
            Some(db) if ["22", "54"].iter().any(|c| db.code().code().starts_with(c)) => {
                DbError::Refused(db.message().to_owned())
            }
            Some(db) if *db.code() == SqlState::RAISE_EXCEPTION => {
                DbError::Refused(db.message().to_owned())
            }
            Some(db) => DbError::Unavailable(format!("{}: {}", db.code().code(), db.message())),
            None => DbError::Unavailable(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Unavailable(format!("database: {e}"))
    }
}

/// Stores events and profiles in one transaction; returns (stored, replayed).
pub async fn ingest(
    pool: &Pool,
    source: &str,
    events: &[Event],
    profiles: &[Profile],
) -> Result<(i32, i32), DbError> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    let mut counts = (0, 0);
    if !events.is_empty() {
        let ids: Vec<Option<&str>> = events.iter().map(|e| e.id.as_deref()).collect();
        let users: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
        let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        let times: Vec<String> = events.iter().map(|e| e.at.to_rfc3339()).collect();
        let props: Vec<String> = events
            .iter()
            .map(|e| Value::Object(e.props.clone()).to_string())
            .collect();
        let row = tx
            .query_one(
                "SELECT stored, replayed FROM nudge.ingest($1, $2, $3, $4, $5::text[]::timestamptz[], $6::text[]::jsonb[])",
                &[&source, &ids, &users, &names, &times, &props],
            )
            .await?;
        counts = (row.get(0), row.get(1));
    }
    if !profiles.is_empty() {
        let users: Vec<&str> = profiles.iter().map(|p| p.user_id.as_str()).collect();
        let emails: Vec<Option<&str>> = profiles.iter().map(|p| p.email.as_deref()).collect();
        let zones: Vec<Option<&str>> = profiles.iter().map(|p| p.timezone.as_deref()).collect();
        let set: Vec<String> = profiles
            .iter()
            .map(|p| Value::Object(p.set.clone()).to_string())
            .collect();
        let once: Vec<String> = profiles
            .iter()
            .map(|p| Value::Object(p.set_once.clone()).to_string())
            .collect();
        tx.execute(
            "SELECT nudge.identify($1, $2, $3, $4::text[]::jsonb[], $5::text[]::jsonb[])",
            &[&users, &emails, &zones, &set, &once],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(counts)
}

/// Records a provider's reports; returns how many were new.
pub async fn webhook(pool: &Pool, provider: &str, reports: &[Report]) -> Result<usize, DbError> {
    let c = pool.get().await?;
    let stmt = c
        .prepare(
            "SELECT nudge.record_webhook($1, $2, $3, $4, $5::text::timestamptz, $6::text::jsonb, $7)",
        )
        .await?;
    let mut recorded = 0;
    for r in reports {
        let at = r.at.map(|t| t.to_rfc3339());
        let meta = Value::Object(r.meta.clone()).to_string();
        let row = c
            .query_one(
                &stmt,
                &[
                    &provider,
                    &r.id,
                    &r.message_key,
                    &r.kind.name(),
                    &at,
                    &meta,
                    &r.nonce,
                ],
            )
            .await?;
        recorded += usize::from(row.get::<_, &str>(0) == "recorded");
    }
    Ok(recorded)
}

/// One-click unsubscribe: (topic, changed).
pub async fn unsubscribe(pool: &Pool, token: &str) -> Result<(String, bool), DbError> {
    let c = pool.get().await?;
    let row = c
        .query_one(
            "SELECT topic, changed FROM nudge.unsubscribe($1)",
            &[&token],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A click: the URL its token was signed for.
pub async fn follow(pool: &Pool, token: &str) -> Result<String, DbError> {
    let c = pool.get().await?;
    Ok(c.query_one("SELECT nudge.follow($1)", &[&token])
        .await?
        .get(0))
}

/// An open: whether it was the message's first.
pub async fn opened(pool: &Pool, token: &str) -> Result<bool, DbError> {
    let c = pool.get().await?;
    Ok(c.query_one("SELECT nudge.opened($1)", &[&token])
        .await?
        .get(0))
}

pub async fn healthy(pool: &Pool) -> Result<(), DbError> {
    let c = pool.get().await?;
    c.query_one("SELECT 1", &[]).await?;
    Ok(())
}

/// What `/metrics` reports of the database: (name, help, labels, value).
pub async fn gauges(
    pool: &Pool,
) -> Result<Vec<(&'static str, &'static str, Vec<(String, String)>, f64)>, DbError> {
    let c = pool.get().await?;
    let mut out = Vec::new();
    for r in c
        .query("SELECT status, messages, extract(epoch FROM oldest_age)::float8 FROM nudge.outbox_metrics()", &[])
        .await?
    {
        let status: String = r.get(0);
        out.push(("nudge_outbox_messages", "Messages in the outbox by status", vec![("status".into(), status.clone())], r.get::<_, i64>(1) as f64));
        if status == "pending" {
            out.push(("nudge_outbox_oldest_pending_seconds", "Age of the oldest pending message", vec![], r.get::<_, Option<f64>>(2).unwrap_or(0.0)));
        }
    }
    let w = c
        .query_one(
            "SELECT running, passes, messages, errors, coalesce(extract(epoch FROM lag)::float8, 0), queued FROM nudge.worker_status()",
            &[],
        )
        .await?;
    out.push((
        "nudge_worker_running",
        "1 when the background worker runs",
        vec![],
        f64::from(u8::from(w.get::<_, bool>(0))),
    ));
    out.push((
        "nudge_worker_passes_total",
        "Passes the worker made since the server started",
        vec![],
        w.get::<_, i64>(1) as f64,
    ));
    out.push((
        "nudge_worker_messages_total",
        "Messages the worker queued since the server started",
        vec![],
        w.get::<_, i64>(2) as f64,
    ));
    out.push((
        "nudge_worker_errors_total",
        "Passes that failed since the server started",
        vec![],
        w.get::<_, i64>(3) as f64,
    ));
    out.push((
        "nudge_worker_lag_seconds",
        "How long the oldest due journey has waited",
        vec![],
        w.get(4),
    ));
    out.push((
        "nudge_capture_queued",
        "Captured events not yet enrolled",
        vec![],
        w.get::<_, i64>(5) as f64,
    ));
    for r in c
        .query(
            "SELECT trigger, status, count(*) FROM nudge.outbox GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
    {
        out.push((
            "nudge_trigger_messages",
            "Messages in the outbox by trigger and status",
            vec![("trigger".into(), r.get(0)), ("status".into(), r.get(1))],
            r.get::<_, i64>(2) as f64,
        ));
    }
    Ok(out)
}
