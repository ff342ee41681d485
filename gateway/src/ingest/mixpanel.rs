//! Mixpanel's ingestion API: `/track` and `/import` take events, `/engage`
//! profile updates; each is one object or an array, posted as JSON or as the
//! form field `data` (plain or base64 JSON, as older libraries send it).

use super::{epoch_time, id_text, object, profile_from, Batch, EpochUnit, Event, Invalid, Limits};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::Value;

/// The records of a request body, whichever way they came.
pub fn records(content_type: &str, body: &[u8]) -> Result<Vec<Value>, Invalid> {
    let json: Value = if content_type.starts_with("application/json") {
        serde_json::from_slice(body).map_err(|e| Invalid(format!("body: not JSON: {e}")))?
    } else {
        let data = form_urlencoded::parse(body)
            .find(|(k, _)| k == "data")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| Invalid("data: missing (the form field that holds the JSON)".into()))?;
        let text = data.trim_start();
        if text.starts_with('{') || text.starts_with('[') {
            serde_json::from_str(text)
        } else {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| Invalid("data: neither JSON nor base64 JSON".into()))?;
            serde_json::from_slice(&raw)
        }
        .map_err(|e| Invalid(format!("data: not JSON: {e}")))?
    };
    Ok(match json {
        Value::Array(items) => items,
        one => vec![one],
    })
}

/// Events, and the project token each one names.
pub fn events(
    records: &[Value],
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<(Batch, Vec<Option<String>>), Invalid> {
    let mut out = Batch::default();
    let mut tokens = Vec::with_capacity(records.len());
    for (path, r) in limits.items("data", records)? {
        let name = r
            .get("event")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Invalid(format!("{path}.event: missing")))?;
        let mut props = object(&format!("{path}.properties"), r.get("properties"))?;
        tokens.push(
            props
                .remove("token")
                .and_then(|t| t.as_str().map(str::to_owned)),
        );
        let user = id_text(props.get("distinct_id"))
            .ok_or_else(|| Invalid(format!("{path}.properties.distinct_id: missing")))?;
        let time = match props.remove("time") {
            None | Some(Value::Null) => now,
            Some(t) => epoch_time(
                &format!("{path}.properties.time"),
                &t,
                EpochUnit::SecondsOrMillis,
            )?,
        };
        let id = id_text(props.get("$insert_id"));
        for k in ["distinct_id", "$insert_id", "mp_lib", "$lib_version"] {
            props.remove(k);
        }
        // $device:… ids are Mixpanel's anonymous visitors
        if user.starts_with("$device:") {
            out.ignored += 1;
            continue;
        }
        out.events.push(Event {
            id,
            user_id: user,
            name: name.to_owned(),
            at: time,
            props,
        });
    }
    Ok((out, tokens))
}

/// Profile updates (`$set`, `$set_once`; other operations are left out), and
/// the project token each one names.
pub fn profiles(
    records: &[Value],
    limits: &Limits,
) -> Result<(Batch, Vec<Option<String>>), Invalid> {
    let mut out = Batch::default();
    let mut tokens = Vec::with_capacity(records.len());
    for (path, r) in limits.items("data", records)? {
        tokens.push(r.get("$token").and_then(Value::as_str).map(str::to_owned));
        let user = id_text(r.get("$distinct_id"))
            .ok_or_else(|| Invalid(format!("{path}.$distinct_id: missing")))?;
        let set = object(&format!("{path}.$set"), r.get("$set"))?;
        let once = object(&format!("{path}.$set_once"), r.get("$set_once"))?;
        if set.is_empty() && once.is_empty() {
            out.ignored += 1;
            continue;
        }
        out.profiles.push(profile_from(user, set, once));
    }
    Ok((out, tokens))
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
    fn form_data_plain_or_base64() {
        let json = r#"{"event":"cart_added","properties":{"token":"T","distinct_id":"u1","time":1767261600,"$insert_id":"i1","cart":"c"}}"#;
        let plain: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("data", json)
            .append_pair("verbose", "1")
            .finish();
        let b64: String = form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "data",
                &base64::engine::general_purpose::STANDARD.encode(json),
            )
            .finish();
        for body in [plain, b64] {
            let r = records("application/x-www-form-urlencoded", body.as_bytes()).unwrap();
            let (b, tokens) = events(&r, &LIMITS, Utc::now()).unwrap();
            assert_eq!(tokens, vec![Some("T".to_owned())]);
            assert_eq!(b.events[0].id.as_deref(), Some("i1"));
            assert_eq!(b.events[0].at.to_rfc3339(), "2026-01-01T10:00:00+00:00");
            assert_eq!(
                Value::Object(b.events[0].props.clone()),
                json!({"cart": "c"})
            );
        }
    }

    #[test]
    fn engage_sets_profiles() {
        let r = records(
            "application/json",
            br#"[{"$token":"T","$distinct_id":"u1","$set":{"$email":"a@x.example","plan":"pro"}}]"#,
        )
        .unwrap();
        let (b, _) = profiles(&r, &LIMITS).unwrap();
        assert_eq!(b.profiles[0].email.as_deref(), Some("a@x.example"));
    }

    #[test]
    fn names_the_part_that_is_wrong() {
        let r = records("application/json", br#"[{"event":"x","properties":{}}]"#).unwrap();
        assert_eq!(
            events(&r, &LIMITS, Utc::now()).unwrap_err().0,
            "data[0].properties.distinct_id: missing"
        );
        assert!(records("text/plain", b"verbose=1")
            .unwrap_err()
            .0
            .starts_with("data: missing"));
    }
}
