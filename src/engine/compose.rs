//! Assembling one message: the template context, the rendered parts, and the
//! fallback template when a context query failed or the template aborted.
//! Shared by run_due and preview, so that a preview is what would be sent.

use nudge_core::decision::{Rule, Stop};
use nudge_core::render::{RenderError, Rendered, Template};
use nudge_core::tracking::{self, Tracking};
use serde_json::{json, Map, Value};

pub struct Message {
    pub recipient: String,
    pub rendered: Rendered,
}

pub enum Composed {
    /// `note` says why the fallback template was used, when it was.
    Message {
        message: Message,
        note: Option<String>,
    },
    /// Not sent: the template aborted without a fallback (rule `abort`), a
    /// context query or the template failed.
    Stopped(Stop),
}

pub struct Inputs<'a> {
    pub trigger: &'a str,
    pub user_id: &'a str,
    pub message_key: &'a str,
    pub anchor: &'a Value,
    /// The profile and its address, as `decision::screen` let them through.
    pub profile: &'a Value,
    pub recipient: String,
    /// `context.<name>` values, and the first context query that failed.
    pub context: Map<String, Value>,
    pub context_error: Option<String>,
    /// The one-click unsubscribe link, when one is configured.
    pub unsubscribe_url: Option<String>,
    /// Open and click tracking, when the trigger asks and a base is configured.
    pub links: Option<Links<'a>>,
}

pub struct Links<'a> {
    pub base: &'a str,
    pub secret: &'a [u8],
    pub track: Tracking,
}

/// A template by name as the catalog returned it: missing or unparseable is an Err.
pub type Loaded<'a> = Result<&'a Template, String>;

pub fn compose(main: Loaded<'_>, fallback: Option<Loaded<'_>>, i: Inputs<'_>) -> Composed {
    let (links, message_key) = (
        i.links.as_ref().map(|l| (l.base, l.secret, l.track)),
        i.message_key,
    );
    // only a tracked message pays for these: the unsubscribe link it must
    // keep, and the origins written in either template that may render
    let (unsubscribe, origins) = match links {
        Some(_) => (
            i.unsubscribe_url.clone(),
            [
                main.as_ref().ok(),
                fallback.as_ref().and_then(|f| f.as_ref().ok()),
            ]
            .into_iter()
            .flatten()
            .flat_map(|t| t.link_origins().iter().cloned())
            .collect(),
        ),
        None => (None, Vec::new()),
    };
    match render(main, fallback, i) {
        // what was rendered, its links pointed at the gateway
        Composed::Message { mut message, note } => match links {
            Some((base, secret, track)) => {
                let rewrite = tracking::Rewrite {
                    base,
                    secret,
                    message_key,
                    origins: &origins,
                    unsubscribe: unsubscribe.as_deref(),
                };
                match tracking::rewrite(&message.rendered.html, &rewrite, track) {
                    Ok(html) => {
                        message.rendered.html = html;
                        Composed::Message { message, note }
                    }
                    Err(e) => Composed::Stopped(Stop::new(Rule::Template, e)),
                }
            }
            None => Composed::Message { message, note },
        },
        stopped => stopped,
    }
}

fn render(main: Loaded<'_>, fallback: Option<Loaded<'_>>, i: Inputs<'_>) -> Composed {
    let recipient = i.recipient;
    let vars = json!({
        "event": i.anchor,
        "profile": i.profile,
        "context": i.context,
        "user_id": i.user_id,
        "trigger": i.trigger,
        "message_key": i.message_key,
        "unsubscribe_url": i.unsubscribe_url.unwrap_or_default(),
    });
    let failed = |rule: Rule, why: String| Composed::Stopped(Stop::new(rule, why));
    let use_fallback = |why: String, otherwise: Composed| match &fallback {
        None => otherwise,
        Some(Err(e)) => failed(Rule::Template, format!("{why}; fallback_template: {e}")),
        Some(Ok(t)) => match t.render(&vars) {
            Ok(rendered) => Composed::Message {
                message: Message {
                    recipient: recipient.clone(),
                    rendered,
                },
                note: Some(format!("fallback_template used: {why}")),
            },
            Err(e) => failed(Rule::Template, format!("{why}; fallback_template: {e}")),
        },
    };
    if let Some(e) = &i.context_error {
        return use_fallback(e.clone(), failed(Rule::Context, e.clone()));
    }
    let main = match main {
        Ok(t) => t,
        Err(e) => return failed(Rule::Template, e),
    };
    match main.render(&vars) {
        Ok(rendered) => Composed::Message {
            message: Message {
                recipient,
                rendered,
            },
            note: None,
        },
        Err(RenderError::Aborted(reason)) => {
            let why = format!("aborted by the template: {reason}");
            use_fallback(why.clone(), failed(Rule::Abort, why))
        }
        Err(e) => failed(Rule::Template, e.to_string()),
    }
}
