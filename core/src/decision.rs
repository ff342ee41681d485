//! The send-time decision as data. A journey that ends without its message
//! ends by one `Rule` (stored in `enrollments.rule` and `outbox.rule`, read by
//! `trigger_stats` and `explain`), with a readable reason that holds no ids
//! (the row has the user, the key and the message).
//!
//! `screen` is the per-message part of the decision, in the one order that
//! run_due, backtest and preview all use; caps and priority over a batch are
//! `policy::decide`, the holdout comes last (a held-out message takes its
//! cap and arbitration slot, as a sent one would).

use crate::policy::Micros;
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// An exit event came before the message went out.
    Exit,
    /// Decided later than `expire_after` allows.
    Expired,
    Audience,
    AudienceSql,
    /// audience_sql raised an error.
    AudienceSqlError,
    /// The address or user is on the suppression list.
    Suppression,
    /// The user unsubscribed from the trigger's topic, or from all.
    Consent,
    /// The template said `{% abort %}` and there is no fallback.
    Abort,
    Priority,
    Cap,
    Holdout,
    TriggerDropped,
    NoProfile,
    NoEmail,
    ProfileQuery,
    Context,
    Template,
    /// The trigger's stored definition no longer compiles.
    Definition,
    /// Deciding failed with an error the data caused.
    Error,
    /// A lookup failed in a way that may pass: decided again later.
    Retry,
    /// An entry turned away by the trigger's re-entry rule.
    Reentry,
    /// A step's `if` did not hold: the journey went to its `else`.
    Branch,
}

impl Rule {
    pub const ALL: [Rule; 22] = [
        Rule::Exit,
        Rule::Expired,
        Rule::Audience,
        Rule::AudienceSql,
        Rule::AudienceSqlError,
        Rule::Suppression,
        Rule::Consent,
        Rule::Abort,
        Rule::Priority,
        Rule::Cap,
        Rule::Holdout,
        Rule::TriggerDropped,
        Rule::NoProfile,
        Rule::NoEmail,
        Rule::ProfileQuery,
        Rule::Context,
        Rule::Template,
        Rule::Definition,
        Rule::Error,
        Rule::Retry,
        Rule::Reentry,
        Rule::Branch,
    ];

    /// The name stored in the `rule` columns.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Exit => "exit",
            Rule::Expired => "expire_after",
            Rule::Audience => "audience",
            Rule::AudienceSql => "audience_sql",
            Rule::AudienceSqlError => "audience_sql_error",
            Rule::Suppression => "suppression",
            Rule::Consent => "consent",
            Rule::Abort => "abort",
            Rule::Priority => "priority",
            Rule::Cap => "cap",
            Rule::Holdout => "holdout",
            Rule::TriggerDropped => "trigger_dropped",
            Rule::NoProfile => "no_profile",
            Rule::NoEmail => "no_email",
            Rule::ProfileQuery => "profile_query",
            Rule::Context => "context",
            Rule::Template => "template",
            Rule::Definition => "definition",
            Rule::Error => "error",
            Rule::Retry => "retry",
            Rule::Reentry => "reentry",
            Rule::Branch => "branch",
        }
    }

    /// The enrollment state a journey stopped by this rule ends in ("not
    /// entered" for the rules that turn an entry away).
    pub fn state(self) -> &'static str {
        match self {
            Rule::Reentry => "not entered",
            Rule::Branch => "skipped",
            Rule::Exit => "exited",
            Rule::Expired => "expired",
            Rule::Audience
            | Rule::AudienceSql
            | Rule::Suppression
            | Rule::Consent
            | Rule::Abort
            | Rule::Priority
            | Rule::Cap => "suppressed",
            Rule::Holdout => "held_out",
            Rule::TriggerDropped => "cancelled",
            Rule::Retry => "waiting",
            Rule::NoProfile
            | Rule::AudienceSqlError
            | Rule::NoEmail
            | Rule::ProfileQuery
            | Rule::Context
            | Rule::Template
            | Rule::Definition
            | Rule::Error => "failed",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message does not go: the rule, and a reason a person reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Stop {
    pub rule: Rule,
    pub why: String,
}

impl Stop {
    pub fn new(rule: Rule, why: impl Into<String>) -> Stop {
        Stop {
            rule,
            why: why.into(),
        }
    }
}

/// How an address is compared with the suppression list, everywhere
/// (claim compares `lower(btrim(recipient))` with what this gives).
pub fn address_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// How an erased user's address stays on the suppression list: a hash that
/// matches the address and reveals nothing (`nudge._address_hash` in SQL).
pub fn address_hash(email: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(address_key(email).as_bytes());
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The suppression list entries that touch a batch: by address key and by
/// user id, each with the reason it was added for.
#[derive(Debug, Default)]
pub struct Suppressions(HashMap<String, String>);

impl Suppressions {
    pub fn add(&mut self, email: &str, user_id: Option<&str>, reason: &str) {
        // an erased user's `sha256:` hash is lower case: its own key
        self.0.insert(address_key(email), reason.to_owned());
        if let Some(u) = user_id.filter(|u| !u.is_empty()) {
            self.0.insert(format!("\u{1f}{u}"), reason.to_owned());
        }
    }

    pub fn find(&self, email: &str, user_id: &str) -> Option<&str> {
        self.0
            .get(&address_key(email))
            .or_else(|| self.0.get(&address_hash(email)))
            .or_else(|| self.0.get(&format!("\u{1f}{user_id}")))
            .map(String::as_str)
    }
}

/// The profile lookup for one user.
#[derive(Debug, Clone)]
pub enum Profile<'a> {
    Missing,
    Failed(String),
    Found(&'a Value),
}

/// What the per-message checks know about one due journey.
pub struct Facts<'a> {
    pub due_at: Micros,
    /// When it is decided.
    pub now: Micros,
    /// The exit event found between entry and now, if any.
    pub exit: Option<&'a str>,
    /// The first lookup that failed in a way that may pass, when another
    /// attempt is still allowed.
    pub retry: Option<&'a str>,
    pub profile: Profile<'a>,
    /// audience_sql's answer for the user, when the trigger has one:
    /// Ok(true) lets it through.
    pub audience_sql: Option<Result<bool, String>>,
    pub suppressions: &'a Suppressions,
    pub consent: &'a crate::consent::Consent,
}

/// The per-message checks, in order: exit, expiry, a retry, the profile,
/// audience, audience_sql, the address, the suppression list, consent (a
/// transactional message has no topic: it goes to an unsubscribed user, never
/// to a suppressed address). Ok gives the
/// profile and the recipient address (trimmed); rendering, the send schedule,
/// caps, priority and the holdout follow.
pub fn screen<'a>(
    t: &crate::definition::Trigger,
    user_id: &str,
    f: &Facts<'a>,
) -> Result<(&'a Value, String), Stop> {
    if let Some(event) = f.exit {
        return Err(Stop::new(Rule::Exit, format!("exited by {event}")));
    }
    if let Some(why) = t.expired(f.due_at, f.now) {
        return Err(Stop::new(Rule::Expired, why));
    }
    if let Some(why) = f.retry {
        return Err(Stop::new(Rule::Retry, why));
    }
    let profile = match &f.profile {
        Profile::Missing => {
            return Err(Stop::new(
                Rule::NoProfile,
                "no profile (nudge.profiles or the profile query returned no row)",
            ))
        }
        Profile::Failed(e) => {
            return Err(Stop::new(
                Rule::ProfileQuery,
                format!("profile query failed: {e}"),
            ))
        }
        Profile::Found(p) => *p,
    };
    if let Some(why) = t.audience.as_ref().and_then(|a| a.why_not(profile)) {
        return Err(Stop::new(
            Rule::Audience,
            format!("audience: the profile does not match: {why}"),
        ));
    }
    match &f.audience_sql {
        None | Some(Ok(true)) => {}
        Some(Ok(false)) => {
            return Err(Stop::new(
                Rule::AudienceSql,
                "audience_sql: false for this user",
            ))
        }
        Some(Err(e)) => {
            return Err(Stop::new(
                Rule::AudienceSqlError,
                format!("audience_sql failed: {e}"),
            ))
        }
    }
    let recipient = match profile.get("email") {
        Some(Value::String(e)) if !e.trim().is_empty() => e.trim().to_owned(),
        _ => return Err(Stop::new(Rule::NoEmail, "the profile has no email")),
    };
    if let Some(why) = f.suppressions.find(&recipient, user_id) {
        return Err(Stop::new(
            Rule::Suppression,
            format!("on the suppression list: {why}"),
        ));
    }
    if let Some(why) = (!t.transactional)
        .then(|| f.consent.refuses(user_id, &t.topic))
        .flatten()
    {
        return Err(Stop::new(Rule::Consent, why));
    }
    Ok((profile, recipient))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Definition;
    use serde_json::json;

    fn trigger(extra: Value) -> crate::definition::Trigger {
        let mut d = json!({"on": {"event": "a"}, "wait": "1 hour", "template": "t"});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Definition::parse(&d).unwrap().compile("t", 1).unwrap()
    }

    fn facts<'a>(profile: Profile<'a>, s: &'a Suppressions) -> Facts<'a> {
        Facts {
            due_at: 0,
            now: 0,
            exit: None,
            retry: None,
            profile,
            audience_sql: None,
            suppressions: s,
            consent: Box::leak(Box::default()),
        }
    }

    #[test]
    fn every_rule_has_its_own_name_and_a_known_state() {
        let names: std::collections::HashSet<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Rule::ALL.len());
        for r in Rule::ALL {
            assert!([
                "exited",
                "expired",
                "suppressed",
                "held_out",
                "cancelled",
                "waiting",
                "failed",
                "not entered",
                "skipped"
            ]
            .contains(&r.state()));
        }
    }

    #[test]
    fn checks_run_in_one_order_and_name_their_rule() {
        let t = trigger(json!({"audience": {"tier": {"ne": "blocked"}}, "expire_after": "1 hour"}));
        let mut s = Suppressions::default();
        s.add(" Bob@Example.com ", None, "bounce");
        s.add("x@example.com", Some("u9"), "complaint");
        let ok = json!({"email": "ann@example.com", "tier": "gold"});
        let rule = |f: Facts<'_>, user: &str| screen(&t, user, &f).err().map(|s| s.rule);
        assert_eq!(rule(facts(Profile::Found(&ok), &s), "u1"), None);
        assert_eq!(
            screen(&t, "u1", &facts(Profile::Found(&ok), &s)).unwrap().1,
            "ann@example.com"
        );
        // an exit comes before everything, even a late decision
        let late = Facts {
            now: 7_200_000_000,
            exit: Some("purchased"),
            ..facts(Profile::Found(&ok), &s)
        };
        assert_eq!(rule(late, "u1"), Some(Rule::Exit));
        let late = Facts {
            now: 7_200_000_000,
            ..facts(Profile::Found(&ok), &s)
        };
        assert_eq!(rule(late, "u1"), Some(Rule::Expired));
        assert_eq!(
            rule(facts(Profile::Missing, &s), "u1"),
            Some(Rule::NoProfile)
        );
        assert_eq!(
            rule(facts(Profile::Failed("boom".into()), &s), "u1"),
            Some(Rule::ProfileQuery)
        );
        let blocked = json!({"email": "ann@example.com", "tier": "blocked"});
        let stop = screen(&t, "u1", &facts(Profile::Found(&blocked), &s)).unwrap_err();
        assert_eq!(stop.rule, Rule::Audience);
        assert!(
            stop.why.contains(r#"tier: wanted ne "blocked""#),
            "{}",
            stop.why
        );
        let no_sql = Facts {
            audience_sql: Some(Ok(false)),
            ..facts(Profile::Found(&ok), &s)
        };
        assert_eq!(rule(no_sql, "u1"), Some(Rule::AudienceSql));
        let none = json!({"email": "  "});
        assert_eq!(
            rule(facts(Profile::Found(&none), &s), "u1"),
            Some(Rule::NoEmail)
        );
        // the address as the list keeps it, or the user id
        let bob = json!({"email": "bob@EXAMPLE.com"});
        let stop = screen(&t, "u2", &facts(Profile::Found(&bob), &s)).unwrap_err();
        assert_eq!(
            (stop.rule, stop.why.as_str()),
            (Rule::Suppression, "on the suppression list: bounce")
        );
        assert_eq!(
            rule(facts(Profile::Found(&ok), &s), "u9"),
            Some(Rule::Suppression)
        );
        // an erased user's address, kept as its hash only
        let mut erased = Suppressions::default();
        erased.add(&address_hash(" Eve@Example.com"), None, "erased");
        let eve = json!({"email": "eve@example.com"});
        assert_eq!(
            rule(facts(Profile::Found(&eve), &erased), "new-id"),
            Some(Rule::Suppression)
        );
        assert_eq!(
            address_hash("x"),
            "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
        );
        // consent: the trigger's topic or all; transactional mail has no topic
        let mut c = crate::consent::Consent::default();
        c.unsubscribed("u1", "marketing");
        let f = Facts {
            consent: &c,
            ..facts(Profile::Found(&ok), &s)
        };
        assert_eq!(screen(&t, "u1", &f).unwrap_err().rule, Rule::Consent);
        let receipt = trigger(json!({"transactional": true}));
        assert!(screen(&receipt, "u1", &f).is_ok());
        let news = trigger(json!({"topic": "newsletter"}));
        assert!(screen(&news, "u1", &f).is_ok());
        // a transactional message still never goes to a suppressed address
        let f = Facts {
            consent: &c,
            ..facts(Profile::Found(&bob), &s)
        };
        assert_eq!(
            screen(&receipt, "u2", &f).unwrap_err().rule,
            Rule::Suppression
        );
    }
}
