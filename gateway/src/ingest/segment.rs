//! Segment's HTTP tracking API (`/v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/batch`, ...): the spec at
//! segment.com/docs/connections/sources/catalog/libraries/server/http-api.

use super::{id_text, iso_time, kind, object, profile_from, Batch, Event, Invalid, Limits};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// One call (`call` is the path's last part) or a batch (`call` = "batch").
pub fn parse(
    call: &str,
    body: &Value,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<Batch, Invalid> {
    let mut out = Batch::default();
    if call == "batch" {
        let items = body
            .get("batch")
            .and_then(Value::as_array)
            .ok_or_else(|| Invalid("batch: should be an array of calls".into()))?;
        limits.check_count(items.len())?;
        for (i, item) in items.iter().enumerate() {
            let path = format!("batch[{i}]");
            let call = item.get("type").and_then(Value::as_str).ok_or_else(|| {
                Invalid(format!("{path}.type: missing (track, identify, page, ...)"))
            })?;
            one(&path, call, item, limits, now, &mut out)?;
        }
    } else {
        one("", call, body, limits, now, &mut out)?;
    }
    Ok(out)
}

fn one(
    path: &str,
    call: &str,
    msg: &Value,
    limits: &Limits,
    now: DateTime<Utc>,
    out: &mut Batch,
) -> Result<(), Invalid> {
    let at = |field: &str| format!("{path}{}{field}", if path.is_empty() { "" } else { "." });
    if !msg.is_object() {
        return Err(Invalid(format!(
            "{}: should be an object, got {}",
            at("call"),
            kind(msg)
        )));
    }
    limits.check_size(if path.is_empty() { "the call" } else { path }, msg)?;
    let user = id_text(msg.get("userId"));
    if user.is_none() && id_text(msg.get("anonymousId")).is_none() {
        return Err(Invalid(format!(
            "{}: a call needs userId or anonymousId",
            at("userId")
        )));
    }
    let time = match msg.get("timestamp") {
        None | Some(Value::Null) => now,
        Some(t) => super::checked(&at("timestamp"), iso_time(&at("timestamp"), t)?)?,
    };
    let id = id_text(msg.get("messageId"));
    // pg_nudge mails known users: an anonymous visitor's calls wait for identify
    let Some(user_id) = user else {
        out.ignored += 1;
        return Ok(());
    };
    match call {
        "track" => {
            let name = msg
                .get("event")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
                .ok_or_else(|| Invalid(format!("{}: a track call names its event", at("event"))))?;
            out.events.push(Event {
                id,
                user_id,
                name: name.to_owned(),
                at: time,
                props: object(&at("properties"), msg.get("properties"))?,
            });
        }
        "page" | "screen" => {
            let mut props = object(&at("properties"), msg.get("properties"))?;
            if let Some(name) = msg.get("name").filter(|n| !n.is_null()) {
                props.insert("name".into(), name.clone());
            }
            out.events.push(Event {
                id,
                user_id,
                name: format!("{call}_viewed"),
                at: time,
                props,
            });
        }
        "identify" => {
            let mut traits = object(&at("traits"), msg.get("traits"))?;
            if !traits.contains_key("timezone") {
                if let Some(tz) = msg.pointer("/context/timezone").filter(|v| v.is_string()) {
                    traits.insert("timezone".into(), tz.clone());
                }
            }
            out.profiles.push(profile_from(user_id, traits, Map::new()));
        }
        "alias" | "group" => out.ignored += 1,
        other => {
            return Err(Invalid(format!(
                "{}: {other:?} is not a Segment call (track, identify, page, screen, alias, group)",
                at("type")
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        max_event: 1000,
        max_events: 3,
    };

    #[test]
    fn a_batch_of_calls() {
        let now = Utc::now();
        let b = parse(
            "batch",
            &json!({"batch": [
                {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m1",
                 "timestamp": "2026-01-01T10:00:00Z", "properties": {"total": 3}},
                {"type": "identify", "userId": "u1", "traits": {"email": "a@x.example", "plan": "pro"},
                 "context": {"timezone": "Europe/Paris"}},
                {"type": "track", "anonymousId": "anon", "event": "Viewed"}
            ]}),
            &LIMITS,
            now,
        )
        .unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].name, "Order Completed");
        assert_eq!(b.events[0].id.as_deref(), Some("m1"));
        assert_eq!(b.profiles[0].timezone.as_deref(), Some("Europe/Paris"));
        assert_eq!(b.ignored, 1);
    }

    #[test]
    fn names_the_part_that_is_wrong() {
        let now = Utc::now();
        let e = |body: Value| parse("batch", &body, &LIMITS, now).unwrap_err().0;
        assert_eq!(
            e(json!({"batch": [{"type": "track", "userId": "u"}]})),
            "batch[0].event: a track call names its event"
        );
        assert!(e(
            json!({"batch": [{"type": "track", "userId": "u", "event": "x", "timestamp": "soon"}]})
        )
        .starts_with("batch[0].timestamp: \"soon\""));
        assert!(e(json!({"batch": [{"type": "track", "event": "x"}]}))
            .contains("userId or anonymousId"));
        assert!(e(json!({"batch": [{}, {}, {}, {}]})).contains("at most 3"));
        assert!(e(
            json!({"batch": [{"type": "track", "userId": "u", "event": "x",
                                      "properties": {"big": "x".repeat(2000)}}]})
        )
        .starts_with("batch[0]: "));
        assert!(
            e(json!({"batch": [{"type": "merge", "userId": "u"}]})).contains("not a Segment call")
        );
        assert_eq!(
            parse(
                "track",
                &json!({"userId": "u", "event": "x", "properties": [1]}),
                &LIMITS,
                now
            )
            .unwrap_err()
            .0,
            "properties: should be an object, got an array"
        );
    }
}
