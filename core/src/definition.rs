//! Trigger definitions: the JSON a user writes, its validation with JSON
//! paths in every error, and the compiled form the engine runs.

use crate::experiment::{assign, Arm, Assignment, OptimizeSpec, VariantSpec, HOLDOUT, METRICS};
use crate::policy::{Cap, CapSpec, QuietHoursSpec, Schedule, SendWindowSpec};
use crate::predicate::Predicate;
use crate::sender::Sender;
use crate::time::parse_duration;
use crate::tracking::Tracking;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The JSON of `nudge.define_trigger`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub on: EntrySpec,
    /// Postgres interval text; absent means the message is due at once.
    #[serde(default)]
    pub wait: Option<String>,
    #[serde(default)]
    pub unless: Vec<ExitSpec>,
    /// The content; may be left out when `variants` name theirs.
    #[serde(default)]
    pub template: Option<String>,
    /// A predicate on the recipient's profile, checked at entry and at send time.
    #[serde(default)]
    pub audience: Option<Value>,
    /// "after_exit" (default), "once", "every_time" or {"cooldown": "7 days"}.
    #[serde(default)]
    pub reentry: Option<Value>,
    /// Caps of this trigger alone, on top of the global ones.
    #[serde(default)]
    pub cap: Vec<CapSpec>,
    /// Transactional messages bypass every cap and arbitration.
    #[serde(default)]
    pub transactional: bool,
    /// What the message is about, for consent: a user unsubscribed from it
    /// (or from "all") gets none of it. Default "marketing"; transactional
    /// messages have none.
    #[serde(default)]
    pub topic: Option<String>,
    /// Importance when several triggers come due for one user at once.
    #[serde(default)]
    pub priority: i32,
    /// How late is too late: a message decided more than this after its due
    /// time is recorded `expired`, not sent (a backfill of history mails
    /// nobody about the past). Postgres interval text, e.g. "12 hours", or
    /// "never"; absent: 1 day, and never for transactional triggers.
    #[serde(default)]
    pub expire_after: Option<String>,
    /// What a message that loses arbitration does: "suppress" (default) or "defer".
    #[serde(default)]
    pub on_conflict: Option<String>,
    #[serde(default)]
    pub quiet_hours: Option<QuietHoursSpec>,
    #[serde(default)]
    pub send_window: Option<SendWindowSpec>,
    /// A query with `$1` = user id returning one boolean, run as the defining role.
    #[serde(default)]
    pub audience_sql: Option<String>,
    /// Named queries run at send time as the defining role; their rows are
    /// `context.<name>` in the template (one row: an object, several: a list).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// Rendered instead when a context query fails or the template aborts.
    #[serde(default)]
    pub fallback_template: Option<String>,
    /// Arms of an A/B test, each with its template; assignment is a stable
    /// hash of experiment and user.
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
    /// Share of entering users kept as a control group: they go through
    /// every rule and are recorded as held_out instead of being sent.
    #[serde(default)]
    pub holdout: Option<f64>,
    /// Names the experiment (default: the trigger): renaming it reshuffles users.
    #[serde(default)]
    pub experiment: Option<String>,
    /// The conversion that sends and holdouts are measured on.
    #[serde(default)]
    pub goal: Option<GoalSpec>,
    /// Automatic winner: new entries go to a variant once it is significantly best.
    #[serde(default)]
    pub optimize: Option<OptimizeSpec>,
    /// Sender identity: the From and Reply-To of its messages (a mailer's
    /// own From otherwise), and extra headers.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Open and click tracking through the gateway (`tracking_url`).
    #[serde(default)]
    pub track: Option<Tracking>,
    /// A journey of several messages (crate::flow); without it the
    /// definition is one step: `wait`, then `template`.
    #[serde(default)]
    pub steps: Vec<crate::flow::StepSpec>,
    /// For a segment entry: "qualifying_now" starts a journey for everyone in
    /// the segment when the trigger is defined; "none" (default) only for
    /// those who enter it afterwards.
    #[serde(default)]
    pub backfill: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoalSpec {
    pub event: String,
    pub within: String,
    /// A props field of the goal event holding its value (revenue).
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// The entry event; absent for a segment entry.
    #[serde(default)]
    pub event: String,
    /// A segment entry (crate::segment): a predicate on the profile; the
    /// journey starts when the user starts matching it ...
    #[serde(default)]
    pub segment_entered: Option<Value>,
    /// ... or stops matching it.
    #[serde(default)]
    pub segment_exited: Option<Value>,
    /// Events after which a segment's membership is checked again.
    #[serde(default)]
    pub recheck_on: Vec<String>,
    /// An UPDATE that changes this column of a watched source
    /// (`nudge.watch_changes`): the entry event is `<column>_changed`.
    #[serde(default)]
    pub changed: Option<String>,
    #[serde(default, rename = "where")]
    pub filter: Option<Value>,
    #[serde(default)]
    pub key: Option<String>,
    /// Enter only on the min_count-th matching event within `within`
    /// ("viewed 3 times in an hour"); counted per key when there is one.
    #[serde(default)]
    pub min_count: Option<u32>,
    #[serde(default)]
    pub within: Option<String>,
    /// A date entry (crate::date_entry): the props field with the date ...
    #[serde(default)]
    pub date: Option<String>,
    /// ... moved by this interval (may be negative: "-3 days") ...
    #[serde(default)]
    pub offset: Option<String>,
    /// ... at this local time ...
    #[serde(default)]
    pub at: Option<String>,
    /// ... and "year": every year.
    #[serde(default)]
    pub every: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitSpec {
    pub event: String,
    #[serde(default, rename = "where")]
    pub filter: Option<Value>,
    #[serde(default)]
    pub same_key: bool,
}

/// `expire_after` when a non-transactional definition gives none: 1 day.
pub const DEFAULT_EXPIRE_AFTER_US: i64 = 86_400_000_000;

/// The event an UPDATE that changes `column` of a watched source emits.
pub fn changed_event(column: &str) -> String {
    format!("{column}_changed")
}

/// How far ahead a date entry's journey may be due, for sequencing: ten years.
pub const DATE_SPAN_US: i64 = 10 * 366 * 86_400_000_000;

/// A definition ready to run: predicates compiled, the wait in microseconds.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub version: i32,
    pub wait_us: i64,
    pub expire_after_us: Option<i64>,
    pub entry_event: String,
    pub entry_filter: Option<Predicate>,
    pub key_path: Option<Vec<String>>,
    /// (min_count, within) when entry needs repeated events.
    pub entry_count: Option<(u32, i64)>,
    /// Due at a date the entry event carries, instead of after a wait.
    pub date: Option<crate::date_entry::DateEntry>,
    /// Starts journeys on entering (or leaving) a segment, not on an event.
    pub segment: Option<crate::segment::Segment>,
    /// Starts journeys at a date on the profile (with `date`), not on an event.
    pub profile_date: Option<crate::segment::ProfileDate>,
    pub exits: Vec<ExitRule>,
    pub template: String,
    /// The journey's steps; a single-message definition has one.
    pub steps: Vec<crate::flow::FlowStep>,
    pub audience: Option<Predicate>,
    pub reentry: Reentry,
    pub caps: Vec<Cap>,
    pub transactional: bool,
    pub topic: String,
    pub priority: i32,
    pub defer_on_conflict: bool,
    pub schedule: Schedule,
    pub has_audience_sql: bool,
    /// Names of the context queries.
    pub context: Vec<String>,
    pub fallback_template: Option<String>,
    pub arms: Vec<Arm>,
    pub holdout: f64,
    pub experiment: String,
    pub optimize: Option<OptimizeSpec>,
    pub sender: Sender,
    pub track: Tracking,
}

impl Trigger {
    /// Every template the trigger may send: each step's, each arm's, the fallback.
    pub fn templates(&self) -> impl Iterator<Item = &str> {
        self.steps
            .iter()
            .flat_map(|s| {
                std::iter::once(s.template.as_str()).chain(s.variants.values().map(String::as_str))
            })
            .chain(std::iter::once(self.template.as_str()))
            .chain(self.arms.iter().map(|a| a.template.as_str()))
            .chain(self.fallback_template.as_deref())
    }

    /// Why a message due at `due` and decided at `now` is too late to send,
    /// if it is (`expire_after`).
    pub fn expired(&self, due: i64, now: i64) -> Option<String> {
        let limit = self.expire_after_us?;
        (now - due > limit).then(|| {
            format!(
                "expired: decided {} after it was due (expire_after {})",
                crate::time::format_duration(now - due),
                crate::time::format_duration(limit)
            )
        })
    }

    /// The arm of a user: "holdout", a variant's name, or None.
    pub fn arm_of(&self, user: &str) -> Option<String> {
        self.arm_with_winner(user, None)
    }

    /// The arm once `optimize` has picked a winner: the holdout stays, every
    /// other entry goes to the winner.
    pub fn arm_with_winner(&self, user: &str, winner: Option<&str>) -> Option<String> {
        match assign(&self.experiment, user, self.holdout, &self.arms) {
            Assignment::Holdout => Some(HOLDOUT.to_string()),
            Assignment::Variant(a) => Some(winner.unwrap_or(&a.name).to_string()),
            Assignment::Default => None,
        }
    }

    /// The template of an arm (a variant's, else the trigger's).
    pub fn template_of(&self, arm: Option<&str>) -> &str {
        arm.and_then(|a| self.arms.iter().find(|v| v.name == a))
            .map_or(&self.template, |v| &v.template)
    }
}

/// Where a trigger's SQL lives in the definition (and in error messages).
pub const AUDIENCE_SQL: &str = "audience_sql";

pub fn context_part(name: &str) -> String {
    format!("context.{name}")
}

/// Whether a user may start the journey again (per trigger and key).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reentry {
    /// After the previous journey ended (due or exited): the default.
    AfterExit,
    /// Never again, whatever happened to the first journey.
    Once,
    /// Every entry event starts a journey of its own.
    EveryTime,
    /// Only once this long has passed since the previous journey ended.
    Cooldown(i64),
}

impl Reentry {
    fn parse(v: Option<&Value>) -> Result<Reentry, String> {
        match v {
            None => Ok(Reentry::AfterExit),
            Some(Value::String(s)) => match s.as_str() {
                "after_exit" => Ok(Reentry::AfterExit),
                "once" => Ok(Reentry::Once),
                "every_time" => Ok(Reentry::EveryTime),
                other => Err(format!(
                    "reentry: unknown mode {other:?}, expected \"after_exit\", \"once\", \"every_time\" or {{\"cooldown\": \"7 days\"}}"
                )),
            },
            Some(Value::Object(m)) => match (m.len(), m.get("cooldown")) {
                (1, Some(Value::String(d))) => {
                    Ok(Reentry::Cooldown(parse_duration(d).map_err(|e| format!("reentry.cooldown: {e}"))?))
                }
                _ => Err("reentry: expected {\"cooldown\": \"7 days\"}".into()),
            },
            Some(_) => Err("reentry: expected a mode name or {\"cooldown\": \"7 days\"}".into()),
        }
    }
}

struct Policies {
    audience: Option<Predicate>,
    reentry: Reentry,
    caps: Vec<Cap>,
    defer_on_conflict: bool,
    schedule: Schedule,
}

#[derive(Debug, Clone)]
pub struct ExitRule {
    pub event: String,
    pub filter: Option<Predicate>,
    pub same_key: bool,
}

impl ExitRule {
    /// An exit as written at `at` (`unless[0]`, `steps[1].unless[0]`), compiled.
    pub fn compile(x: &ExitSpec, at: &str) -> Result<ExitRule, String> {
        non_empty(&x.event, &format!("{at}.event"))?;
        Ok(ExitRule {
            event: x.event.clone(),
            filter: x
                .filter
                .as_ref()
                .map(|f| Predicate::parse(f, &format!("{at}.where")))
                .transpose()?,
            same_key: x.same_key,
        })
    }

    fn hits(&self, event: &str, props: &Value) -> bool {
        self.event == event && self.filter.as_ref().is_none_or(|p| p.matches(props))
    }
}

impl Definition {
    /// Parses the JSON; an error names the JSON path of what is wrong.
    pub fn parse(v: &Value) -> Result<Definition, String> {
        if !v.is_object() {
            return Err(format!(
                "definition: expected a JSON object with keys on, wait, unless, template, found {}",
                kind(v)
            ));
        }
        let def: Definition = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                format!("definition: {inner}")
            } else {
                format!("{path}: {inner}")
            }
        })?;
        def.check()?;
        Ok(def)
    }

    fn check(&self) -> Result<(), String> {
        match (&self.on.changed, self.on.event.is_empty()) {
            (Some(_), false) => {
                return Err("on.changed: give event or changed, not both (changed: \"plan\" is event \"plan_changed\")".into())
            }
            (Some(c), true) => non_empty(c, "on.changed")?,
            (None, _) if self.segment()?.is_none() && !self.is_profile_date() => {
                non_empty(&self.on.event, "on.event")?
            }
            (None, _) => {}
        }
        if !self.steps.is_empty() {
            for (field, given) in [
                ("wait", self.wait.is_some()),
                ("template", self.template.is_some()),
            ] {
                if given {
                    return Err(format!(
                        "{field}: with steps, each step gives its own {field}"
                    ));
                }
            }
            self.flow()?;
        }
        match &self.template {
            Some(t) => non_empty(t, "template")?,
            None if !self.steps.is_empty() => {}
            None if self.variants.is_empty() => {
                return Err(
                    "template: missing (name a template, or give variants each with theirs)".into(),
                )
            }
            None => {}
        }
        self.wait_us()?;
        self.expire_after_us()?;
        self.topic()?;
        self.sender()?;
        self.policies()?;
        if let Some(q) = &self.audience_sql {
            non_empty(q, AUDIENCE_SQL)?;
        }
        for (name, q) in &self.context {
            let ok = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!(
                    "context.{name}: a context name is letters, digits and _, such as \"cart\""
                ));
            }
            non_empty(q, &context_part(name))?;
        }
        if let Some(f) = &self.fallback_template {
            non_empty(f, "fallback_template")?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            non_empty(&v.name, &format!("variants[{i}].name"))?;
            non_empty(&v.template, &format!("variants[{i}].template"))?;
            if v.name == HOLDOUT || !names.insert(v.name.as_str()) {
                return Err(format!(
                    "variants[{i}].name: {:?} is taken (names are unique and not \"holdout\")",
                    v.name
                ));
            }
            if !(v.weight > 0.0 && v.weight.is_finite()) {
                return Err(format!("variants[{i}].weight: must be a positive number"));
            }
        }
        if let Some(h) = self.holdout {
            if !(0.0..1.0).contains(&h) {
                return Err("holdout: a share from 0 up to (not including) 1, such as 0.1".into());
            }
        }
        if let Some(g) = &self.goal {
            non_empty(&g.event, "goal.event")?;
            parse_duration(&g.within).map_err(|e| format!("goal.within: {e}"))?;
        }
        if let Some(o) = &self.optimize {
            if !METRICS.contains(&o.metric.as_str()) {
                return Err(format!(
                    "optimize.metric: expected one of {}, got {:?}",
                    METRICS.join(", "),
                    o.metric
                ));
            }
            if o.metric == "converted" && self.goal.is_none() {
                return Err("optimize.metric: \"converted\" needs a goal".into());
            }
            if self.variants.len() < 2 {
                return Err("optimize: needs at least two variants".into());
            }
            if !(o.alpha > 0.0 && o.alpha < 0.5) {
                return Err("optimize.alpha: a significance level such as 0.05".into());
            }
        }
        if let Some(k) = &self.on.key {
            key_path(k, "on.key")?;
        }
        self.entry_count()?;
        self.date_entry()?;
        if let Some(f) = &self.on.filter {
            Predicate::parse(f, "on.where")?;
        }
        for (i, x) in self.unless.iter().enumerate() {
            non_empty(&x.event, &format!("unless[{i}].event"))?;
            if let Some(f) = &x.filter {
                Predicate::parse(f, &format!("unless[{i}].where"))?;
            }
            if x.same_key && self.on.key.is_none() {
                return Err(format!(
                    "unless[{i}].same_key: needs on.key, the props field that names the object"
                ));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            if let Some(j) = s.unless.iter().position(|x| x.same_key) {
                if self.on.key.is_none() {
                    return Err(format!(
                        "steps[{i}].unless[{j}].same_key: needs on.key, the props field that names the object"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `on.date` is a profile field, with no entry event.
    fn is_profile_date(&self) -> bool {
        let on = &self.on;
        on.event.is_empty()
            && on.changed.is_none()
            && on
                .date
                .as_deref()
                .and_then(crate::segment::profile_path)
                .is_some()
    }

    fn profile_date(&self) -> Result<Option<crate::segment::ProfileDate>, String> {
        if !self.is_profile_date() {
            return Ok(None);
        }
        refuse(
            &[
                ("where", self.on.filter.is_some()),
                ("key", self.on.key.is_some()),
            ],
            "a date on the profile (one journey per user and date)",
        )?;
        Ok(Some(crate::segment::ProfileDate {
            recheck_on: self.recheck_on_checked()?,
            backfill: self.backfill.as_deref() == Some("qualifying_now"),
        }))
    }

    fn recheck_on_checked(&self) -> Result<Vec<String>, String> {
        for (i, e) in self.on.recheck_on.iter().enumerate() {
            non_empty(e, &format!("on.recheck_on[{i}]"))?;
        }
        Ok(self.on.recheck_on.clone())
    }

    fn segment(&self) -> Result<Option<crate::segment::Segment>, String> {
        let on = &self.on;
        let backfill = match self.backfill.as_deref() {
            None | Some("none") => false,
            Some("qualifying_now") => true,
            Some(other) => {
                return Err(format!(
                    "backfill: expected \"qualifying_now\" or \"none\", got {other:?}"
                ))
            }
        };
        let (pred, on_enter, key) = match (&on.segment_entered, &on.segment_exited) {
            (Some(_), Some(_)) => {
                return Err(
                    "on.segment_exited: give segment_entered or segment_exited, not both".into(),
                )
            }
            (Some(p), None) => (p, true, "on.segment_entered"),
            (None, Some(p)) => (p, false, "on.segment_exited"),
            (None, None) if self.is_profile_date() => return Ok(None),
            (None, None) => {
                if !on.recheck_on.is_empty() {
                    return Err(
                        "on.recheck_on: only with on.segment_entered or on.segment_exited".into(),
                    );
                }
                if self.backfill.is_some() {
                    return Err("backfill: only for a segment entry (on.segment_entered, on.segment_exited) or a date on the profile".into());
                }
                return Ok(None);
            }
        };
        refuse(
            &[
                ("event", !on.event.is_empty()),
                ("changed", on.changed.is_some()),
                ("where", on.filter.is_some()),
                ("key", on.key.is_some()),
                ("min_count", on.min_count.is_some()),
                ("date", on.date.is_some()),
            ],
            &format!("{key} (the journey starts on the segment, not on an event)"),
        )?;
        Ok(Some(crate::segment::Segment {
            predicate: Predicate::parse(pred, key)?,
            on_enter,
            recheck_on: self.recheck_on_checked()?,
            backfill,
        }))
    }

    fn date_entry(&self) -> Result<Option<crate::date_entry::DateEntry>, String> {
        let on = &self.on;
        let Some(date) = &on.date else {
            for (k, given) in [
                ("offset", on.offset.is_some()),
                ("at", on.at.is_some()),
                ("every", on.every.is_some()),
            ] {
                if given {
                    return Err(format!(
                        "on.{k}: needs on.date, the props field with the date"
                    ));
                }
            }
            return Ok(None);
        };
        if self.wait.is_some() {
            return Err("wait: a date entry is due at its date (move it with on.offset)".into());
        }
        if !self.steps.is_empty() && on.every.is_some() {
            return Err("steps: not with on.every in this version (one message a year)".into());
        }
        if on.min_count.is_some() {
            return Err("on.min_count: not with on.date".into());
        }
        // a date on the profile is read from the profile itself
        let date = crate::segment::profile_path(date)
            .filter(|_| self.is_profile_date())
            .unwrap_or(date);
        crate::date_entry::DateEntry::compile(
            date,
            on.offset.as_deref(),
            on.at.as_deref(),
            on.every.as_deref(),
        )
        .map(Some)
    }

    fn entry_count(&self) -> Result<Option<(u32, i64)>, String> {
        match (self.on.min_count, &self.on.within) {
            (None, None) => Ok(None),
            (Some(n), Some(w)) => {
                if n == 0 {
                    return Err("on.min_count: must be at least 1".into());
                }
                let w = parse_duration(w).map_err(|e| format!("on.within: {e}"))?;
                if w == 0 {
                    return Err("on.within: must be longer than zero".into());
                }
                Ok(Some((n, w)))
            }
            _ => Err("on.min_count: give min_count and within together, e.g. \"min_count\": 3, \"within\": \"1 hour\"".into()),
        }
    }

    fn sender(&self) -> Result<Sender, String> {
        Sender::parse(
            self.from.as_deref(),
            self.reply_to.as_deref(),
            &self.headers,
        )
    }

    fn topic(&self) -> Result<String, String> {
        match self.topic.as_deref().map(str::trim) {
            None => Ok(crate::consent::DEFAULT_TOPIC.into()),
            Some("") => Err("topic: must not be empty".into()),
            Some(crate::consent::ALL_TOPICS) => {
                Err("topic: \"all\" is reserved (unsubscribing from it covers every topic)".into())
            }
            Some(t) => Ok(t.into()),
        }
    }

    fn expire_after_us(&self) -> Result<Option<i64>, String> {
        let Some(e) = self.expire_after.as_deref() else {
            // transactional mail (a receipt) is owed however late; the rest
            // is stale after a day: a backfill or a worker that was down for
            // days mails nobody about the past
            return Ok((!self.transactional).then_some(DEFAULT_EXPIRE_AFTER_US));
        };
        if e == "never" {
            return Ok(None);
        }
        match parse_duration(e) {
            Ok(us) if us > 0 => Ok(Some(us)),
            Ok(_) => Err(format!("expire_after: {e:?} must be longer than zero")),
            Err(err) => Err(format!("expire_after: {err} (or \"never\")")),
        }
    }

    fn wait_us(&self) -> Result<i64, String> {
        self.wait.as_deref().map_or(Ok(0), |w| {
            parse_duration(w).map_err(|e| format!("wait: {e}"))
        })
    }

    /// The send-time policies, compiled (and so validated).
    fn policies(&self) -> Result<Policies, String> {
        let on_conflict = match self.on_conflict.as_deref() {
            None | Some("suppress") => false,
            Some("defer") => true,
            Some(other) => {
                return Err(format!(
                    "on_conflict: expected \"suppress\" or \"defer\", got {other:?}"
                ))
            }
        };
        Ok(Policies {
            audience: self
                .audience
                .as_ref()
                .map(|a| Predicate::parse(a, "audience"))
                .transpose()?,
            reentry: Reentry::parse(self.reentry.as_ref())?,
            caps: self
                .cap
                .iter()
                .enumerate()
                .map(|(i, c)| Cap::compile(c, &format!("cap[{i}]"), "this trigger"))
                .collect::<Result<_, _>>()?,
            defer_on_conflict: on_conflict,
            schedule: Schedule::compile(self.quiet_hours.as_ref(), self.send_window.as_ref())?,
        })
    }

    /// The template of a user without an arm: the trigger's, else the first variant's.
    fn content(&self) -> String {
        self.template
            .clone()
            .or_else(|| self.steps.first().map(|s| s.template.clone()))
            .or_else(|| self.variants.first().map(|v| v.template.clone()))
            .unwrap_or_default()
    }

    pub fn compile(&self, name: &str, version: i32) -> Result<Trigger, String> {
        let p = self.policies()?;
        Ok(Trigger {
            audience: p.audience,
            reentry: p.reentry,
            caps: p.caps,
            transactional: self.transactional,
            topic: self.topic()?,
            sender: self.sender()?,
            track: self.track.unwrap_or_default(),
            priority: self.priority,
            defer_on_conflict: p.defer_on_conflict,
            schedule: p.schedule,
            has_audience_sql: self.audience_sql.is_some(),
            context: self.context.keys().cloned().collect(),
            fallback_template: self.fallback_template.clone(),
            arms: self
                .variants
                .iter()
                .map(|v| Arm {
                    name: v.name.clone(),
                    template: v.template.clone(),
                    weight: v.weight,
                })
                .collect(),
            holdout: self.holdout.unwrap_or(0.0),
            experiment: self.experiment.clone().unwrap_or_else(|| name.to_owned()),
            optimize: self.optimize.clone(),
            name: name.to_owned(),
            version,
            // the first message's wait: with steps, the first step's
            wait_us: self.flow()?.first().map_or(0, |s| s.offset_us),
            expire_after_us: self.expire_after_us()?,
            entry_event: match (self.segment()?, &self.on.changed) {
                (Some(_), _) => crate::segment::entry_event(name),
                (None, None) if self.is_profile_date() => crate::segment::entry_event(name),
                (None, Some(column)) => changed_event(column),
                (None, None) => self.on.event.clone(),
            },
            entry_filter: self
                .on
                .filter
                .as_ref()
                .map(|f| Predicate::parse(f, "on.where"))
                .transpose()?,
            key_path: self
                .on
                .key
                .as_deref()
                .map(|k| key_path(k, "on.key"))
                .transpose()?,
            entry_count: self.entry_count()?,
            date: self.date_entry()?,
            segment: self.segment()?,
            profile_date: self.profile_date()?,
            exits: self
                .unless
                .iter()
                .enumerate()
                .map(|(i, x)| ExitRule::compile(x, &format!("unless[{i}]")))
                .collect::<Result<_, String>>()?,
            template: self.content(),
            steps: self.flow()?,
        })
    }

    /// The steps, compiled: `steps`, or the one step of `wait` and `template`.
    fn flow(&self) -> Result<Vec<crate::flow::FlowStep>, String> {
        let arms: BTreeMap<String, String> = self
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.template.clone()))
            .collect();
        if self.steps.is_empty() {
            return Ok(vec![crate::flow::FlowStep::single(
                self.wait_us()?,
                self.content(),
                arms,
            )]);
        }
        let names: Vec<String> = arms.keys().cloned().collect();
        let mut steps = crate::flow::compile(&self.steps, &names)?;
        // a variant's own template is its first message, as without steps
        for (arm, tpl) in arms {
            steps[0].variants.entry(arm).or_insert(tpl);
        }
        Ok(steps)
    }
}

impl Trigger {
    /// The journey key of an event: the `on.key` field of its props as text,
    /// or "" when the trigger has no key (one journey per user) or the field is absent.
    pub fn key_of(&self, props: &Value) -> String {
        let Some(path) = &self.key_path else {
            return String::new();
        };
        match crate::predicate::lookup(props, path) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    }

    pub fn enters(&self, event: &str, props: &Value) -> bool {
        self.dates(event, props) && self.date.as_ref().is_none_or(|d| d.enters(props))
    }

    /// Whether the event is the entry event (its name and `where`), with or
    /// without the date a date entry needs.
    fn dates(&self, event: &str, props: &Value) -> bool {
        event == self.entry_event && self.entry_filter.as_ref().is_none_or(|p| p.matches(props))
    }

    /// The exit rule this event satisfies, if any. `Some(None)` = any key;
    /// `Some(Some(k))` = only the journey with key k.
    pub fn exit_scope(&self, event: &str, props: &Value) -> Option<Option<String>> {
        // a date entry's event moves the journey of its key: it ends the
        // waiting one and, with a date, opens its own; without, it only ends
        if self.date.is_some() && self.dates(event, props) {
            return Some(Some(self.key_of(props)));
        }
        let rule = self.exits.iter().find(|r| r.hits(event, props))?;
        Some(rule.same_key.then(|| self.key_of(props)))
    }

    /// When the first message of a journey anchored at `entered_at` with
    /// these props is due, for a recipient in `tz`: the wait's end, or the
    /// date entry's date.
    pub fn first_due(&self, entered_at: i64, anchor: &Value, tz: chrono_tz::Tz) -> Option<i64> {
        self.step_due(0, entered_at, anchor, tz)
    }

    /// When step `k` is due: the anchor's time plus the step's offset, or,
    /// for a date entry, the date's due time plus it (a step after "three
    /// days before" waits from there).
    pub fn step_due(
        &self,
        k: usize,
        entered_at: i64,
        anchor: &Value,
        tz: chrono_tz::Tz,
    ) -> Option<i64> {
        let Some(d) = &self.date else {
            return Some(self.due_of(k, entered_at));
        };
        let offset = self.steps.get(k).map_or(0, |s| s.offset_us);
        d.due(anchor, tz, entered_at)?
            .checked_add(offset)
            .filter(|due| crate::time::is_event_time(*due))
    }

    /// Whether this event ends the journey at step `k`: one of the journey's
    /// exits or the step's own (`Some(None)` any key, `Some(Some(k))` one key).
    pub fn exit_scope_at(&self, k: usize, event: &str, props: &Value) -> Option<Option<String>> {
        self.exit_scope(event, props).or_else(|| {
            let rule = self
                .steps
                .get(k)?
                .exits
                .iter()
                .find(|r| r.hits(event, props))?;
            Some(rule.same_key.then(|| self.key_of(props)))
        })
    }

    /// Every event name this trigger reads: its entry and its exits (the
    /// journey's and its steps').
    pub fn watched_events(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.entry_event.as_str())
            .chain(self.exits.iter().map(|r| r.event.as_str()))
            .chain(
                self.steps
                    .iter()
                    .flat_map(|s| s.exits.iter().map(|r| r.event.as_str())),
            )
            .chain(self.recheck_on().iter().map(String::as_str))
    }

    /// Whether the profile starts this trigger's journeys (a segment, a
    /// date on the profile): they are checked when profiles are written.
    pub fn watches_profile(&self) -> bool {
        self.segment.is_some() || self.profile_date.is_some()
    }

    /// The events after which a profile-driven entry is checked again.
    pub fn recheck_on(&self) -> &[String] {
        match (&self.segment, &self.profile_date) {
            (Some(s), _) => &s.recheck_on,
            (None, Some(d)) => &d.recheck_on,
            (None, None) => &[],
        }
    }

    /// Whether who qualifies when the trigger is defined starts then.
    pub fn backfills(&self) -> bool {
        self.segment.as_ref().is_some_and(|s| s.backfill)
            || self.profile_date.as_ref().is_some_and(|d| d.backfill)
    }

    /// What the profile says for this trigger: in the segment (or having the
    /// date), and the date. Kept in nudge.segment_members; a change of either
    /// may start a journey.
    pub fn profile_state(&self, profile: Option<&Value>) -> (bool, Option<String>) {
        match &self.segment {
            Some(s) => (s.matches(profile), None),
            None => {
                let date = profile
                    .and_then(|p| self.date.as_ref().filter(|d| d.enters(p))?.value(p))
                    .map(str::to_owned);
                (date.is_some(), date)
            }
        }
    }

    /// Whether a change of the profile state to `member` starts an entry
    /// event: a segment's in its direction; a date's always (set, moved, or
    /// removed, which ends the waiting journey).
    pub fn starts_on_change(&self, member: bool) -> bool {
        self.segment.as_ref().is_none_or(|s| member == s.on_enter)
    }

    /// The anchor-to-last-step span (see crate::flow::span).
    pub fn span_us(&self) -> i64 {
        match self.date {
            // a date may be years away: a waiting journey covers until then
            Some(_) => DATE_SPAN_US,
            None => crate::flow::span(&self.steps),
        }
    }

    /// When step `k` of a journey anchored at `entered_at` is due.
    pub fn due_of(&self, k: usize, entered_at: i64) -> i64 {
        entered_at + self.steps.get(k).map_or(self.wait_us, |s| s.offset_us)
    }

    /// The template of an arm at step `k`.
    pub fn step_template(&self, k: usize, arm: Option<&str>) -> &str {
        self.steps
            .get(k)
            .map_or(self.template_of(arm), |s| s.template_of(arm))
    }
}

fn key_path(k: &str, at: &str) -> Result<Vec<String>, String> {
    let path: Vec<String> = k.split('.').map(str::to_owned).collect();
    if path.iter().any(String::is_empty) {
        return Err(format!(
            "{at}: expected a props field name such as \"cart_id\""
        ));
    }
    Ok(path)
}

/// The first of these `on` keys that is given where it has no meaning.
fn refuse(given: &[(&str, bool)], with: &str) -> Result<(), String> {
    match given.iter().find(|(_, g)| *g) {
        Some((k, _)) => Err(format!("on.{k}: not with {with}")),
        None => Ok(()),
    }
}

fn non_empty(s: &str, at: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err(format!("{at}: must not be empty"))
    } else {
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The watched names that are not known but close to a known one (one edit
/// apart, two for names of 8 characters or more), each with the nearest
/// known name: most likely misspelled. Short names and a name that extends
/// another (`view`, `viewed`) are left alone: they are often meant.
pub fn likely_typos(watched: &[String], known: &[String]) -> Vec<(String, String)> {
    watched
        .iter()
        .filter(|w| !known.contains(w) && w.chars().count() >= 5)
        .filter_map(|w| {
            let lw = w.to_lowercase();
            let reach = if lw.chars().count() >= 8 { 2 } else { 1 };
            known
                .iter()
                .filter(|k| {
                    let lk = k.to_lowercase();
                    lk == lw || !(lk.starts_with(&lw) || lw.starts_with(&lk))
                })
                .map(|k| (edits(&lw, &k.to_lowercase()), k))
                .filter(|(d, _)| *d <= reach)
                .min()
                .map(|(_, k)| (w.clone(), k.clone()))
        })
        .collect()
}

/// Levenshtein distance (insertions, deletions, substitutions).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_two_edits_from_a_known_one_is_a_likely_typo() {
        let known: Vec<String> = ["cart_added", "purchased"].map(String::from).to_vec();
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            likely_typos(
                &w(&["cart_addded", "purchased", "Purchasd", "signed_up"]),
                &known
            ),
            vec![
                ("cart_addded".to_string(), "cart_added".to_string()),
                ("Purchasd".to_string(), "purchased".to_string())
            ]
        );
        assert_eq!(edits("kitten", "sitting"), 3);
        // names that are often meant
        let known: Vec<String> = ["a", "viewed", "signup"].map(String::from).to_vec();
        assert!(
            likely_typos(&w(&["e1", "s", "view", "viewed_product", "signal"]), &known).is_empty()
        );
        assert_eq!(likely_typos(&w(&["sigmup"]), &known).len(), 1);
    }
    use serde_json::json;

    fn cart() -> Value {
        json!({
            "on": {"event": "cart_added", "where": {"value": {"gte": 20}}, "key": "cart_id"},
            "wait": "24 hours",
            "unless": [{"event": "purchased", "same_key": true}, {"event": "checkout_started"}],
            "template": "cart_reminder"
        })
    }

    #[test]
    fn parses_the_design_example() {
        let d = Definition::parse(&cart()).unwrap();
        let t = d.compile("cart", 1).unwrap();
        assert_eq!(t.wait_us, 86_400_000_000);
        assert!(t.enters("cart_added", &json!({"value": 25, "cart_id": "c1"})));
        assert!(!t.enters("cart_added", &json!({"value": 5})));
        assert_eq!(t.key_of(&json!({"cart_id": 7})), "7");
        assert_eq!(
            t.exit_scope("purchased", &json!({"cart_id": "c1"})),
            Some(Some("c1".into()))
        );
        assert_eq!(t.exit_scope("checkout_started", &json!({})), Some(None));
        assert_eq!(t.exit_scope("viewed", &json!({})), None);
    }

    #[test]
    fn policies_compile_and_errors_name_their_path() {
        let mut v = cart();
        v["audience"] = json!({"country": {"in": ["DE", "AT"]}});
        v["reentry"] = json!({"cooldown": "7 days"});
        v["cap"] = json!([{"max": 1, "per": "1 day"}]);
        v["priority"] = json!(5);
        v["on_conflict"] = json!("defer");
        v["quiet_hours"] = json!({"start": "21:00", "end": "08:00"});
        v["send_window"] = json!({"days": ["mon", "fri"]});
        let t = Definition::parse(&v).unwrap().compile("c", 1).unwrap();
        assert_eq!(t.reentry, Reentry::Cooldown(7 * 86_400_000_000));
        assert!(t
            .audience
            .as_ref()
            .unwrap()
            .matches(&json!({"country": "AT"})));
        assert_eq!(
            (t.caps.len(), t.priority, t.defer_on_conflict),
            (1, 5, true)
        );
        assert!(t.schedule.quiet.is_some() && t.schedule.days.is_some());

        for (key, bad, want) in [
            ("reentry", json!("twice"), "reentry: unknown mode \"twice\""),
            (
                "reentry",
                json!({"cooldown": "1 month"}),
                "reentry.cooldown: '1 month': months",
            ),
            (
                "cap",
                json!([{"max": 1, "per": "1 dya"}]),
                "cap[0].per: '1 dya': unknown unit",
            ),
            ("cap", json!([{"max": 1}]), "cap[0]: missing field `per`"),
            (
                "audience",
                json!({"country": {"like": "D%"}}),
                "audience.country: unknown operator `like`",
            ),
            (
                "on_conflict",
                json!("merge"),
                "on_conflict: expected \"suppress\" or \"defer\"",
            ),
            (
                "quiet_hours",
                json!({"start": "21:00"}),
                "quiet_hours: missing field `end`",
            ),
            (
                "send_window",
                json!({"days": ["mon"], "start": "9"}),
                "send_window: give both start and end",
            ),
        ] {
            let mut v = cart();
            v[key] = bad;
            let e = Definition::parse(&v).unwrap_err();
            assert!(e.starts_with(want), "{key}: {e}");
        }
    }

    #[test]
    fn a_message_too_late_expires() {
        let mut v = cart();
        v["expire_after"] = json!("12 hours");
        let t = Definition::parse(&v).unwrap().compile("cart", 1).unwrap();
        let h = 3_600_000_000;
        assert_eq!(t.expired(0, 12 * h), None);
        let why = t.expired(0, 13 * h).unwrap();
        assert!(why.starts_with("expired: decided 13 hours after"), "{why}");
        v["expire_after"] = json!("0 hours");
        assert!(Definition::parse(&v)
            .unwrap_err()
            .starts_with("expire_after:"));
        v["expire_after"] = json!("soon");
        assert!(Definition::parse(&v)
            .unwrap_err()
            .starts_with("expire_after:"));
        // without it: a day, never for transactional mail, "never" on request
        let t = Definition::parse(&cart())
            .unwrap()
            .compile("cart", 1)
            .unwrap();
        assert_eq!(t.expired(0, 24 * h), None);
        assert!(t.expired(0, 25 * h).is_some());
        for (key, value) in [
            ("transactional", json!(true)),
            ("expire_after", json!("never")),
        ] {
            let mut v = cart();
            v[key] = value;
            let t = Definition::parse(&v).unwrap().compile("cart", 1).unwrap();
            assert_eq!(t.expired(0, 1000 * h), None, "{key}");
        }
    }

    #[test]
    fn variants_alone_may_name_the_content() {
        let mut v = cart();
        v.as_object_mut().unwrap().remove("template");
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("template: missing"), "{e}");
        v["variants"] = json!([{"name": "A", "template": "a"}, {"name": "B", "template": "b"}]);
        let t = Definition::parse(&v).unwrap().compile("cart", 1).unwrap();
        assert_eq!(t.template_of(None), "a");
        assert_eq!(t.template_of(Some("B")), "b");
    }

    #[test]
    fn experiments_are_validated() {
        let mut v = cart();
        v["variants"] =
            json!([{"name": "A", "template": "a"}, {"name": "B", "template": "b", "weight": 2}]);
        v["holdout"] = json!(0.1);
        v["goal"] = json!({"event": "purchased", "within": "7 days", "value": "total"});
        let t = Definition::parse(&v).unwrap().compile("cart", 1).unwrap();
        assert_eq!(
            (t.arms.len(), t.holdout, t.experiment.as_str()),
            (2, 0.1, "cart")
        );
        let arm = t.arm_of("u1");
        assert_eq!(arm, t.arm_of("u1"), "stable");
        if let Some(a) = arm.as_deref().filter(|a| *a != "holdout") {
            assert_eq!(t.template_of(Some(a)), a.to_lowercase());
        }
        assert_eq!(t.template_of(None), "cart_reminder");
        for (key, bad, want) in [
            (
                "variants",
                json!([{"name": "A", "template": "a"}, {"name": "A", "template": "b"}]),
                "variants[1].name: \"A\" is taken",
            ),
            (
                "variants",
                json!([{"name": "holdout", "template": "a"}]),
                "variants[0].name: \"holdout\" is taken",
            ),
            (
                "variants",
                json!([{"name": "A", "template": "a", "weight": 0}]),
                "variants[0].weight: must be a positive",
            ),
            ("holdout", json!(1.5), "holdout: a share"),
            (
                "goal",
                json!({"event": "purchased", "within": "a week"}),
                "goal.within: 'a week'",
            ),
        ] {
            let mut v = cart();
            v[key] = bad;
            let e = Definition::parse(&v).unwrap_err();
            assert!(e.starts_with(want), "{key}: {e}");
        }
    }

    #[test]
    fn repeated_entry_is_validated() {
        let mut v = cart();
        v["on"]["min_count"] = json!(3);
        v["on"]["within"] = json!("1 hour");
        assert_eq!(
            Definition::parse(&v)
                .unwrap()
                .compile("c", 1)
                .unwrap()
                .entry_count,
            Some((3, 3_600_000_000))
        );
        v["on"].as_object_mut().unwrap().remove("within");
        assert!(Definition::parse(&v)
            .unwrap_err()
            .starts_with("on.min_count: give min_count and within together"));
    }

    #[test]
    fn errors_name_the_json_path() {
        let mut v = cart();
        v["unless"][0] = json!({"evnt": "purchased"});
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("unless[0].evnt: unknown field `evnt`"), "{e}");

        let mut v = cart();
        v["templte"] = json!("x");
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("templte: unknown field `templte`"), "{e}");

        let mut v = cart();
        v["on"]["where"] = json!({"value": {"between": [1, 2]}});
        let e = Definition::parse(&v).unwrap_err();
        assert!(
            e.starts_with("on.where.value: unknown operator `between`"),
            "{e}"
        );

        let mut v = cart();
        v["on"].as_object_mut().unwrap().remove("key");
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("unless[0].same_key: needs on.key"), "{e}");

        let e = Definition::parse(&json!([1])).unwrap_err();
        assert!(e.starts_with("definition: expected a JSON object"), "{e}");

        let mut v = cart();
        v["wait"] = json!("24 hourz");
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("wait: '24 hourz': unknown unit"), "{e}");

        let mut v = cart();
        v["wait"] = json!(24);
        let e = Definition::parse(&v).unwrap_err();
        assert!(e.starts_with("wait: invalid type"), "{e}");
    }
}
