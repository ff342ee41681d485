//! Assembling one message: the template context, the rendered parts, and the
//! fallback template when a context query failed or the template aborted.
//! Shared by run_due and preview, so that a preview is what would be sent.

use nudge_core::render::{RenderError, Rendered, Template};
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
    /// Not sent on purpose (the template aborted and there is no fallback).
    Suppressed(String),
    Failed(String),
}

pub struct Inputs<'a> {
    pub trigger: &'a str,
    pub user_id: &'a str,
    pub message_key: &'a str,
    pub anchor: &'a Value,
    /// The profile lookup's answer: None = no such user, Err = the lookup failed.
    pub profile: Option<&'a Result<Value, crate::isolate::Failure>>,
    /// `context.<name>` values, and the first context query that failed.
    pub context: Map<String, Value>,
    pub context_error: Option<String>,
}

/// A template by name as the catalog returned it: missing or unparseable is an Err.
pub type Loaded<'a> = Result<&'a Template, String>;

pub fn compose(main: Loaded<'_>, fallback: Option<Loaded<'_>>, i: Inputs<'_>) -> Composed {
    let profile = match i.profile {
        None => {
            return Composed::Failed(format!(
                "no profile for user {:?} (nudge.profiles or the profile query returned no row)",
                i.user_id
            ))
        }
        Some(Err(e)) => {
            return Composed::Failed(format!(
                "profile query failed for user {:?}: {e}",
                i.user_id
            ))
        }
        Some(Ok(p)) => p,
    };
    let recipient = match profile.get("email") {
        Some(Value::String(e)) if !e.trim().is_empty() => e.trim().to_owned(),
        _ => return Composed::Failed(format!("profile of user {:?} has no email", i.user_id)),
    };
    let vars = json!({
        "event": i.anchor,
        "profile": profile,
        "context": i.context,
        "user_id": i.user_id,
        "trigger": i.trigger,
        "message_key": i.message_key,
    });
    let use_fallback = |why: String, otherwise: Composed| match &fallback {
        None => otherwise,
        Some(Err(e)) => Composed::Failed(format!("{why}; fallback_template: {e}")),
        Some(Ok(t)) => match t.render(&vars) {
            Ok(rendered) => Composed::Message {
                message: Message {
                    recipient: recipient.clone(),
                    rendered,
                },
                note: Some(format!("fallback_template used: {why}")),
            },
            Err(e) => Composed::Failed(format!("{why}; fallback_template: {e}")),
        },
    };
    if let Some(e) = &i.context_error {
        return use_fallback(e.clone(), Composed::Failed(e.clone()));
    }
    let main = match main {
        Ok(t) => t,
        Err(e) => return Composed::Failed(e),
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
            use_fallback(why.clone(), Composed::Suppressed(why))
        }
        Err(e) => Composed::Failed(e.to_string()),
    }
}
