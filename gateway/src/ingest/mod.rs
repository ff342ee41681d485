//! What the analytics protocols carry, as pg_nudge stores it: events
//! (`nudge.ingest`) and profile updates (`nudge.identify`). Each protocol's
//! module turns its payload into these, or says which part of it is wrong.

pub mod amplitude;
pub mod mixpanel;
pub mod segment;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The sender's id for it (messageId, insert_id, $insert_id): a second
    /// delivery with the same id is dropped.
    pub id: Option<String>,
    pub user_id: String,
    pub name: String,
    pub at: DateTime<Utc>,
    pub props: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    pub user_id: String,
    pub email: Option<String>,
    pub timezone: Option<String>,
    pub set: Map<String, Value>,
    pub set_once: Map<String, Value>,
}

/// A payload split into what to store; `ignored` counts what the protocol
/// allows but pg_nudge has no use for (anonymous calls, aliases, groups).
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub profiles: Vec<Profile>,
    pub ignored: usize,
}

/// Longest user id, event name or sender's id taken: longer ones are
/// mistakes (a whole JSON document as an id), and an index has a limit.
pub const MAX_ID: usize = 255;

impl Batch {
    pub fn check_lengths(&self) -> Result<(), Invalid> {
        let too_long = |what: &str, n: usize, v: &str| {
            (v.chars().count() > MAX_ID).then(|| {
                Invalid(format!(
                    "item {}: {what} has {} characters; at most {MAX_ID} are taken",
                    n + 1,
                    v.chars().count()
                ))
            })
        };
        for (n, e) in self.events.iter().enumerate() {
            let checks = [
                too_long("the user id", n, &e.user_id),
                too_long("the event name", n, &e.name),
                e.id.as_deref().and_then(|id| too_long("the id", n, id)),
            ];
            if let Some(bad) = checks.into_iter().flatten().next() {
                return Err(bad);
            }
        }
        for (n, p) in self.profiles.iter().enumerate() {
            if let Some(bad) = too_long("the user id", n, &p.user_id) {
                return Err(bad);
            }
        }
        Ok(())
    }
}

/// The request is wrong: the text names the part (`batch[3].timestamp`).
#[derive(Debug, PartialEq)]
pub struct Invalid(pub String);

pub struct Limits {
    pub max_event: usize,
    pub max_events: usize,
}

impl Limits {
    pub fn check_count(&self, n: usize) -> Result<(), Invalid> {
        if n > self.max_events {
            return Err(Invalid(format!(
                "{n} events in one request; at most {} are taken",
                self.max_events
            )));
        }
        Ok(())
    }

    pub fn check_size(&self, path: &str, v: &Value) -> Result<(), Invalid> {
        let size = v.to_string().len();
        if size > self.max_event {
            return Err(Invalid(format!(
                "{path}: {size} bytes; an event may have at most {}",
                self.max_event
            )));
        }
        Ok(())
    }
}

impl Limits {
    /// The items of a request's list with their paths (`events[3]`), each
    /// checked to be an object within the size limit, the list within the count.
    pub fn items<'a>(
        &self,
        list: &str,
        items: &'a [Value],
    ) -> Result<Vec<(String, &'a Value)>, Invalid> {
        self.check_count(items.len())?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = format!("{list}[{i}]");
                if !v.is_object() {
                    return Err(Invalid(format!(
                        "{path}: should be an object, got {}",
                        kind(v)
                    )));
                }
                self.check_size(&path, v)?;
                Ok((path, v))
            })
            .collect()
    }
}

/// An ISO 8601 time with an offset, as the SDKs send it.
pub fn iso_time(path: &str, v: &Value) -> Result<DateTime<Utc>, Invalid> {
    let text = v
        .as_str()
        .ok_or_else(|| Invalid(format!("{path}: a time is a string, got {v}")))?;
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Invalid(format!("{path}: {text:?} is not an ISO 8601 time: {e}")))
}

/// Seconds (with a fraction) or milliseconds since 1970: Mixpanel has sent both.
pub fn epoch_time(path: &str, v: &Value, unit: EpochUnit) -> Result<DateTime<Utc>, Invalid> {
    let n = v
        .as_f64()
        .ok_or_else(|| Invalid(format!("{path}: a time is a number, got {v}")))?;
    let ms = match unit {
        EpochUnit::Millis => n,
        EpochUnit::SecondsOrMillis if n.abs() >= 1e11 => n,
        EpochUnit::SecondsOrMillis => n * 1000.0,
    };
    Utc.timestamp_millis_opt(ms as i64)
        .single()
        .filter(|t| in_range(t))
        .ok_or_else(|| Invalid(format!("{path}: {n} is not a time pg_nudge takes")))
}

#[derive(Clone, Copy)]
pub enum EpochUnit {
    Millis,
    SecondsOrMillis,
}

/// pg_nudge keeps event times between 1900 and 9999.
pub fn in_range(t: &DateTime<Utc>) -> bool {
    (1900..=9999).contains(&chrono::Datelike::year(t))
}

pub fn checked(path: &str, t: DateTime<Utc>) -> Result<DateTime<Utc>, Invalid> {
    if in_range(&t) {
        Ok(t)
    } else {
        Err(Invalid(format!(
            "{path}: {t} is outside 1900-9999, the times pg_nudge takes"
        )))
    }
}

/// A user id may arrive as a string or a number.
pub fn id_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn object<'a>(path: &str, v: Option<&'a Value>) -> Result<Map<String, Value>, Invalid> {
    match v {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(other) => Err(Invalid(format!(
            "{path}: should be an object, got {}",
            kind(other)
        ))),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Takes `email` and `timezone` out of a set of traits: they are columns of
/// the profile, the rest are its attributes.
pub fn profile_from(
    user_id: String,
    mut set: Map<String, Value>,
    set_once: Map<String, Value>,
) -> Profile {
    let mut text = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| set.remove(*k))
            .and_then(|v| v.as_str().map(str::to_owned))
    };
    let email = text(&["email", "$email"]);
    let timezone = text(&["timezone", "$timezone"]);
    Profile {
        user_id,
        email,
        timezone,
        set,
        set_once,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_in_the_forms_sdks_send() {
        let t = iso_time("t", &json!("2026-03-01T10:00:00.5+01:00")).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-03-01T09:00:00.500+00:00");
        let s = epoch_time("t", &json!(1772355600.25), EpochUnit::SecondsOrMillis).unwrap();
        let ms = epoch_time("t", &json!(1772355600250i64), EpochUnit::SecondsOrMillis).unwrap();
        assert_eq!(s, ms);
        assert!(iso_time("batch[2].timestamp", &json!("yesterday"))
            .unwrap_err()
            .0
            .starts_with("batch[2].timestamp: \"yesterday\""));
        assert!(epoch_time("t", &json!(1e18), EpochUnit::Millis).is_err());
    }

    #[test]
    fn email_and_timezone_are_columns() {
        let p = profile_from(
            "u".into(),
            json!({"email": "a@x.example", "timezone": "Europe/Paris", "plan": "pro"})
                .as_object()
                .unwrap()
                .clone(),
            Map::new(),
        );
        assert_eq!(p.email.as_deref(), Some("a@x.example"));
        assert_eq!(p.timezone.as_deref(), Some("Europe/Paris"));
        assert_eq!(Value::Object(p.set), json!({"plan": "pro"}));
    }
}
