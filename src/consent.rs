//! One-click unsubscribe (RFC 8058): `nudge.unsubscribe(token)` is what the
//! gateway's `POST /u/{token}` calls. The token is checked against the
//! database's key (nudge_core::consent); a valid one withdraws the user's
//! consent for the message's topic, once, and records it as the message's
//! engagement. Topics and consent are in docs/reference.md, "Consent".

use crate::privilege::as_extension;
use crate::spi_util::{invalid, run};
use pgrx::prelude::*;

#[pg_extern]
fn unsubscribe(
    token: &str,
) -> TableIterator<
    'static,
    (
        name!(user_id, String),
        name!(topic, String),
        name!(changed, bool),
    ),
> {
    let row = as_extension(|| {
        Spi::connect_mut(|c| {
            let secret = crate::engine::run_due::unsubscribe_secret(c);
            let u = nudge_core::consent::verify(&secret, token)
                .unwrap_or_else(|e| invalid(format!("unsubscribe: {e}")));
            let changed = run(
                c,
                "SELECT nudge._set_subscription($1, $2, 'unsubscribed', 'one-click')",
                &[u.user_id.clone().into(), u.topic.clone().into()],
                "unsubscribing",
            )
            .first()
            .get::<bool>(1)
            .ok()
            .flatten()
            .unwrap_or(false);
            // a repeat (a mail scanner, a second click) records nothing more
            if changed {
                let args = || {
                    [
                        u.message_key.clone().into(),
                        u.user_id.clone().into(),
                        u.topic.clone().into(),
                    ]
                };
                let known = run(
                    c,
                    "SELECT EXISTS (SELECT 1 FROM nudge.outbox WHERE message_key = $1 AND user_id = $2 AND $3::text IS NOT NULL)",
                    &args(),
                    "recording the unsubscribe",
                )
                .first()
                .get::<bool>(1)
                .ok()
                .flatten()
                .unwrap_or(false);
                // the message may be gone (retention): the event still says it
                let record = if known {
                    "SELECT nudge.record_engagement($1, 'unsubscribed', now(),
                                jsonb_build_object('topic', $3::text, 'source', 'one-click'))"
                } else {
                    "INSERT INTO nudge.events (user_id, event, props)
                     VALUES ($2, 'email_unsubscribed',
                             jsonb_build_object('message_key', $1::text, 'topic', $3::text, 'source', 'one-click'))"
                };
                run(c, record, &args(), "recording the unsubscribe");
            }
            (u.user_id, u.topic, changed)
        })
    });
    TableIterator::once(row)
}
