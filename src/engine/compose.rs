//! Assembling one message: the template context and the rendered parts.
//! Shared by run_due and preview, so that a preview is what would be sent.

use nudge_core::render::{Rendered, Template};
use serde_json::{json, Value};

pub struct Message {
    pub recipient: String,
    pub rendered: Rendered,
}

pub struct Inputs<'a> {
    pub trigger: &'a str,
    pub user_id: &'a str,
    pub message_key: &'a str,
    pub anchor: &'a Value,
    /// The profile lookup's answer: None = no such user, Err = the lookup failed.
    pub profile: Option<&'a Result<Value, String>>,
}

pub fn compose(template: &Template, i: &Inputs<'_>) -> Result<Message, String> {
    let profile = match i.profile {
        None => {
            return Err(format!(
                "no profile for user {:?} (nudge.profiles or the profile query returned no row)",
                i.user_id
            ))
        }
        Some(Err(e)) => {
            return Err(format!(
                "profile query failed for user {:?}: {e}",
                i.user_id
            ))
        }
        Some(Ok(p)) => p,
    };
    let recipient = match profile.get("email") {
        Some(Value::String(e)) if !e.trim().is_empty() => e.trim().to_owned(),
        _ => return Err(format!("profile of user {:?} has no email", i.user_id)),
    };
    let context = json!({
        "event": i.anchor,
        "profile": profile,
        "user_id": i.user_id,
        "trigger": i.trigger,
        "message_key": i.message_key,
    });
    let rendered = template
        .render(&context)
        .map_err(|e| format!("render failed: {e}"))?;
    Ok(Message {
        recipient,
        rendered,
    })
}
