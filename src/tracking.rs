//! Open and click tracking: `nudge.follow(token)` and `nudge.opened(token)`
//! are what the gateway's `GET /c/{token}` and `GET /o/{token}` call. The
//! token is checked against the database's key (nudge_core::tracking); a
//! click records `clicked` with its URL (once per message and URL) and gives
//! the URL back to redirect to, an open records `opened` once per message. Tracking is in
//! docs/reference.md, "Sender identity and tracking".

use crate::privilege::as_extension;
use crate::spi_util::{invalid, run};
use nudge_core::tracking::{self, Link};
use pgrx::prelude::*;

fn link(token: &str, what: &str) -> Link {
    as_extension(|| {
        Spi::connect_mut(|c| {
            let secret = crate::engine::run_due::unsubscribe_secret(c);
            tracking::verify(&secret, token).unwrap_or_else(|e| invalid(format!("{what}: {e}")))
        })
    })
}

/// The URL a click token was made for. The click is recorded when its
/// message is still in the outbox (erased or expired ones redirect all the same).
#[pg_extern]
fn follow(token: &str) -> String {
    let Link::Click { message_key, url } = link(token, "follow") else {
        invalid("follow: this is an open token, not a click token")
    };
    as_extension(|| {
        Spi::connect_mut(|c| {
            // a link followed again (or a token replayed) adds nothing
            run(
                c,
                "SELECT nudge.record_engagement(o.message_key, 'clicked', now(), jsonb_build_object('url', $2::text))
                   FROM nudge.outbox o
                  WHERE o.message_key = $1
                    AND NOT EXISTS (SELECT 1 FROM nudge.events e
                                     WHERE e.user_id = o.user_id AND e.event = 'email_clicked'
                                       AND e.props->>'message_key' = $1 AND e.props->>'url' = $2)",
                &[message_key.clone().into(), url.clone().into()],
                "recording the click",
            );
        })
    });
    url
}

/// Records the message's first open; true when this call recorded it.
#[pg_extern]
fn opened(token: &str) -> bool {
    let Link::Open { message_key } = link(token, "opened") else {
        invalid("opened: this is a click token, not an open token")
    };
    as_extension(|| {
        Spi::connect_mut(|c| {
            // mail clients load the pixel again at every view: the first counts
            run(
                c,
                "SELECT nudge.record_engagement(o.message_key, 'opened', now())
                   FROM nudge.outbox o WHERE o.message_key = $1 AND o.opened_at IS NULL",
                &[message_key.into()],
                "recording the open",
            )
            .len()
                > 0
        })
    })
}
