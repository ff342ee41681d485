//! Journeys that start when a user starts (or stops) matching a predicate on
//! their profile: "became a VIP", "lifetime value passed 500". Membership is
//! checked when the user's profile is written or one of the trigger's
//! `recheck_on` events arrives, never by scanning everyone; a journey starts
//! on the change of membership, once. See docs/reference.md, "Segment entry".

use crate::predicate::Predicate;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Segment {
    pub predicate: Predicate,
    /// true: a journey starts on entering the segment; false: on leaving it.
    pub on_enter: bool,
    /// Events after which the user's membership is checked again (a profile
    /// query may read what they change), besides writes of `nudge.profiles`.
    pub recheck_on: Vec<String>,
    /// Whether the users in the segment when the trigger is defined start a
    /// journey then ("backfill": "qualifying_now").
    pub backfill: bool,
}

/// A date on the profile (`"on": {"date": "profile.birthday"}`): a journey
/// starts when the date is set or changed (moving the waiting one), and a
/// removed date ends it. Checked when segments are.
#[derive(Debug, Clone)]
pub struct ProfileDate {
    pub recheck_on: Vec<String>,
    pub backfill: bool,
}

/// The props path of a profile date (`profile.birthday`), if it is one.
pub fn profile_path(date: &str) -> Option<&str> {
    date.strip_prefix("profile.").filter(|p| !p.is_empty())
}

/// The name of the event a segment trigger's journeys enter with: not a name
/// an application's event has (it holds a colon and the trigger's name).
pub fn entry_event(trigger: &str) -> String {
    format!("segment:{trigger}")
}

impl Segment {
    pub fn matches(&self, profile: Option<&Value>) -> bool {
        profile.is_some_and(|p| self.predicate.matches(p))
    }

    /// Whether a change of membership from `before` (None: never recorded,
    /// which is outside) to `now` starts a journey.
    pub fn starts(&self, before: Option<bool>, now: bool) -> bool {
        let before = before.unwrap_or(false);
        before != now && now == self.on_enter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vip(on_enter: bool) -> Segment {
        Segment {
            predicate: Predicate::parse(&json!({"ltv": {"gte": 500}}), "on.segment_entered")
                .unwrap(),
            on_enter,
            recheck_on: vec![],
            backfill: false,
        }
    }

    #[test]
    fn a_journey_starts_on_the_change_only() {
        let s = vip(true);
        assert!(s.matches(Some(&json!({"ltv": 600}))));
        assert!(!s.matches(Some(&json!({"ltv": 100}))));
        assert!(!s.matches(None));
        assert!(s.starts(None, true));
        assert!(s.starts(Some(false), true));
        assert!(
            !s.starts(Some(true), true),
            "still inside: no second journey"
        );
        assert!(!s.starts(Some(true), false));
        let left = vip(false);
        assert!(left.starts(Some(true), false));
        assert!(!left.starts(None, false), "never inside: did not leave");
    }
}
