//! Amplitude's HTTP V2 API (`POST /2/httpapi`): `{api_key, events: [...]}`,
//! times in milliseconds, `$identify` events and `user_properties` for profiles.

use super::{epoch_time, id_text, object, profile_from, Batch, EpochUnit, Event, Invalid, Limits};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub fn parse(body: &Value, limits: &Limits, now: DateTime<Utc>) -> Result<Batch, Invalid> {
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| Invalid("events: should be an array of events".into()))?;
    let mut out = Batch::default();
    for (path, e) in limits.items("events", events)? {
        let at = |f: &str| format!("{path}.{f}");
        let name = e
            .get("event_type")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Invalid(format!("{}: missing", at("event_type"))))?;
        let user = id_text(e.get("user_id"));
        if user.is_none() && id_text(e.get("device_id")).is_none() {
            return Err(Invalid(format!(
                "{}: an event needs user_id or device_id",
                at("user_id")
            )));
        }
        let time = match e.get("time") {
            None | Some(Value::Null) => now,
            Some(t) => epoch_time(&at("time"), t, EpochUnit::Millis)?,
        };
        let user_props = object(&at("user_properties"), e.get("user_properties"))?;
        let Some(user_id) = user else {
            out.ignored += 1;
            continue;
        };
        if !user_props.is_empty() {
            out.profiles.push(profile_of(
                &at("user_properties"),
                user_id.clone(),
                user_props,
            )?);
        }
        if name == "$identify" || name == "$groupidentify" {
            continue;
        }
        out.events.push(Event {
            id: id_text(e.get("insert_id")),
            user_id,
            name: name.to_owned(),
            at: time,
            props: object(&at("event_properties"), e.get("event_properties"))?,
        });
    }
    Ok(out)
}

/// `{"$set": {...}, "$setOnce": {...}}`; keys without `$` are sets too.
/// Other operations ($add, $append, $unset, ...) are left out.
fn profile_of(
    path: &str,
    user_id: String,
    props: Map<String, Value>,
) -> Result<super::Profile, Invalid> {
    let mut set = Map::new();
    let mut once = Map::new();
    for (k, v) in props {
        match k.as_str() {
            "$set" => set.extend(object(&format!("{path}.$set"), Some(&v))?),
            "$setOnce" => once.extend(object(&format!("{path}.$setOnce"), Some(&v))?),
            op if op.starts_with('$') => {}
            _ => {
                set.insert(k, v);
            }
        }
    }
    Ok(profile_from(user_id, set, once))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        max_event: 1000,
        max_events: 10,
    };

    #[test]
    fn events_and_identifies() {
        let b = parse(
            &json!({"api_key": "k", "events": [
                {"event_type": "cart_added", "user_id": "u1", "time": 1767261600000i64,
                 "insert_id": "i1", "event_properties": {"cart": "c1"}},
                {"event_type": "$identify", "user_id": "u1",
                 "user_properties": {"$set": {"email": "a@x.example"}, "$setOnce": {"first": "ad"}}},
                {"event_type": "viewed", "device_id": "device-1"}
            ]}),
            &LIMITS,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].at.to_rfc3339(), "2026-01-01T10:00:00+00:00");
        assert_eq!(b.profiles[0].email.as_deref(), Some("a@x.example"));
        assert_eq!(
            Value::Object(b.profiles[0].set_once.clone()),
            json!({"first": "ad"})
        );
        assert_eq!(b.ignored, 1);
    }

    #[test]
    fn names_the_part_that_is_wrong() {
        let e = |body: Value| parse(&body, &LIMITS, Utc::now()).unwrap_err().0;
        assert_eq!(
            e(json!({"events": [{"user_id": "u"}]})),
            "events[0].event_type: missing"
        );
        assert!(
            e(json!({"events": [{"event_type": "x", "user_id": "u", "time": "now"}]}))
                .starts_with("events[0].time: a time is a number")
        );
        assert!(e(json!({"event": []})).starts_with("events: "));
    }
}
