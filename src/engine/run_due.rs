//! run_due: one evaluation pass. Claims due enrollments (SKIP LOCKED),
//! re-checks exits against every event source, renders, and writes the
//! outbox, the enrollments and the journal with one statement each.

use crate::catalog::{live_triggers, templates};
use crate::engine::compose::{compose, Composed, Inputs, Links, Loaded};
use crate::isolate;
use crate::spi_util::{distinct, micros, run, ts};
use nudge_core::consent::{self, Consent};
use nudge_core::decision::{self, Facts, Profile, Rule, Stop, Suppressions};
use nudge_core::definition::Trigger;
use nudge_core::definition::{context_part, AUDIENCE_SQL};
use nudge_core::experiment::HOLDOUT;
use nudge_core::flow::{self, Next, StepEnd};
use nudge_core::policy::{self, Candidate, Micros, Sent, Settings, Upcoming, Verdict};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

#[derive(Clone)]
pub(super) struct Due {
    pub id: i64,
    pub trigger: String,
    pub user_id: String,
    pub key: String,
    pub entered_at: TimestampWithTimeZone,
    pub due_at: TimestampWithTimeZone,
    pub anchor: Value,
    pub message_key: String,
    /// The experiment arm drawn at entry.
    pub variant: Option<String>,
    /// Earlier passes that met a transient failure for it.
    pub attempts: i32,
    /// The journey's step this enrollment is (nudge_core::flow).
    pub step: usize,
}

enum Outcome {
    /// Written to the outbox to go at `at`; `note` says why it goes later
    /// than due or with the fallback template.
    Sent { at: Micros, note: Option<String> },
    /// In the control group: everything passed, nothing is written.
    HeldOut { at: Micros },
    /// Ended without its message by a rule; an exit carries the exit
    /// event's time.
    Stopped(Stop, Option<TimestampWithTimeZone>),
    /// A lookup failed in a way that may pass (a timeout): still waiting, due again at `at`.
    Retry { at: Micros, why: String },
    /// The step's `if` did not hold: no message, the journey goes to `to`.
    Branched { to: Next, why: String },
}

impl Outcome {
    /// How the step ended, for where the journey goes next (None: not yet).
    fn step_end(&self) -> Option<StepEnd> {
        Some(match self {
            Outcome::Sent { .. } => StepEnd::Sent,
            Outcome::HeldOut { .. } => StepEnd::HeldOut,
            Outcome::Stopped(stop, _) => StepEnd::Stopped(stop.rule),
            Outcome::Branched { to, .. } => StepEnd::Branched(*to),
            Outcome::Retry { .. } => return None,
        })
    }
}

/// What one pass did: enrollments taken, messages written, and how the
/// others ended (or were left waiting for a retry).
#[derive(Clone, Copy, Default)]
pub struct Pass {
    pub claimed: usize,
    pub written: i32,
    pub failed: i32,
    pub retried: i32,
    pub suppressed: i32,
    pub exited: i32,
    pub held_out: i32,
    pub expired: i32,
}

impl std::ops::Add for Pass {
    type Output = Pass;
    fn add(self, o: Pass) -> Pass {
        Pass {
            claimed: self.claimed + o.claimed,
            written: self.written + o.written,
            failed: self.failed + o.failed,
            retried: self.retried + o.retried,
            suppressed: self.suppressed + o.suppressed,
            exited: self.exited + o.exited,
            held_out: self.held_out + o.held_out,
            expired: self.expired + o.expired,
        }
    }
}

pub fn run_due(as_of: TimestampWithTimeZone, max_messages: i32) -> Pass {
    require_current_schema();
    Spi::connect_mut(|c| {
        // held messages first: a failure there must not stop the deciding
        if let Err(e) = isolate::subtransaction(|| super::recheck::held_messages(c)) {
            warning!("pg_nudge: re-checking held messages failed: {e}");
        }
        // `claimed` counts the batch taken, with the journeys left for a
        // later pass (a user's earlier message elsewhere): a full batch tells
        // the worker there is more to do
        let (due, claimed) = claim_due(c, as_of, max_messages);
        if due.is_empty() {
            return Pass {
                claimed,
                ..Pass::default()
            };
        }
        // One statement per step for the whole batch; only when that fails
        // is each enrollment decided alone, so that the one whose data the
        // database refuses is set aside with the error and the rest go on.
        let pass = match isolate::subtransaction(|| decide(c, due.clone(), as_of)) {
            Ok(pass) => pass,
            Err(e) => {
                warning!(
                    "pg_nudge: deciding a batch of {} failed, deciding one by one: {e}",
                    due.len()
                );
                // the batch's slots, in order, before deciding one by one
                // (each in its own order would deadlock with another pass)
                lock_for_deciding(c, distinct(due.iter().map(|d| d.user_id.clone())));
                due.into_iter()
                    .fold(Pass::default(), |p, d| p + decide_alone(c, d, as_of))
            }
        };
        let written = pass.written;
        if written > 0 {
            // One wake-up per batch, never one per message.
            run(
                c,
                "SELECT pg_notify('nudge_outbox', $1::text)",
                &[written.into()],
                "notifying",
            );
        }
        Pass { claimed, ..pass }
    })
}

/// A journey's next step is made when this one is decided, and may come due
/// before the user's other messages of the batch: caps and priority would
/// weigh those without it, which a live engine (deciding each message when
/// it came due) never does. They are left waiting for a later pass, which
/// sees the step. (A zero wait makes the next step due at the same
/// instant: what is due then is decided now.)
fn before_next_steps(due: Vec<Due>, triggers: &HashMap<String, Trigger>) -> Vec<Due> {
    // per user: (row, when its next step comes due) of the rows that have one
    let mut next: HashMap<&str, Vec<(i64, Micros)>> = HashMap::new();
    for d in &due {
        let t = &triggers[&d.trigger];
        if d.step + 1 < t.steps.len() {
            // the steps are as far apart as their offsets, from this row's
            // due time (never before it, whatever a retry or a new version did)
            let gap = t.steps[d.step + 1].offset_us - t.steps[d.step].offset_us;
            let at = micros(d.due_at).saturating_add(gap.max(0));
            next.entry(d.user_id.as_str()).or_default().push((d.id, at));
        }
    }
    if next.is_empty() {
        return due;
    }
    // a row waits only for another row's next step: the user's earliest row
    // is never held back, so every pass makes progress
    let held: HashSet<i64> = due
        .iter()
        .filter(|d| {
            next.get(d.user_id.as_str()).is_some_and(|ns| {
                ns.iter()
                    .any(|(id, at)| *id != d.id && *at < micros(d.due_at))
            })
        })
        .map(|d| d.id)
        .collect();
    due.into_iter().filter(|d| !held.contains(&d.id)).collect()
}

/// The live triggers that compile, by name.
pub(super) fn triggers_by_name(c: &SpiClient<'_>) -> HashMap<String, Trigger> {
    live_triggers(c)
        .triggers
        .iter()
        .map(|l| (l.trigger.name.clone(), l.trigger.clone()))
        .collect()
}

/// The library is the server's, the schema each database's: between
/// installing a new version and `ALTER EXTENSION pg_nudge UPDATE`, deciding
/// against the old schema would fail every message (and set it aside).
/// Nothing is decided until the update; capture goes on.
fn require_current_schema() {
    let installed: Option<String> = crate::spi_util::one(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_nudge'",
        &[],
        "reading the installed version",
    );
    let library = env!("CARGO_PKG_VERSION");
    if installed.as_deref() != Some(library) {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_nudge: this database has pg_nudge {}, the server's library is {library}",
                installed.as_deref().unwrap_or("(none)")
            ),
            "Run ALTER EXTENSION pg_nudge UPDATE; until then no message is decided here."
        );
    }
}

/// Decides one enrollment in a subtransaction of its own; if that fails
/// too, it is recorded as failed with the error (and never retried: the
/// same data would fail the same way).
fn decide_alone(c: &mut SpiClient<'_>, d: Due, as_of: TimestampWithTimeZone) -> Pass {
    match isolate::subtransaction(|| decide(c, vec![d.clone()], as_of)) {
        Ok(pass) => pass,
        Err(f) => {
            let why = Stop::new(
                Rule::Error,
                format!("set aside: deciding this message failed: {f}"),
            );
            if let Err(e) = isolate::subtransaction(|| {
                record(
                    c,
                    &[d.clone()],
                    vec![Outcome::Stopped(why, None)],
                    &HashMap::new(),
                    &HashMap::new(),
                )
            }) {
                warning!("pg_nudge: enrollment {} could not be set aside: {e}", d.id);
            }
            Pass {
                failed: 1,
                ..Pass::default()
            }
        }
    }
}

/// Decides a batch of claimed enrollments: writes their messages and
/// outcomes (`claimed` is left to the caller).
fn decide(c: &mut SpiClient<'_>, due: Vec<Due>, as_of: TimestampWithTimeZone) -> Pass {
    let triggers = triggers_by_name(c);
    // A trigger whose stored definition no longer compiles was skipped by
    // live_triggers (with a warning): its due enrollments fail, with the
    // reason, instead of failing the pass for everyone, again and again.
    let (due, orphans): (Vec<Due>, Vec<Due>) = due
        .into_iter()
        .partition(|d| triggers.contains_key(&d.trigger));
    let due = before_next_steps(due, &triggers);
    let mut pass = Pass::default();
    if !orphans.is_empty() {
        let why = || {
            Outcome::Stopped(
                Stop::new(
                    Rule::Definition,
                    "the trigger's definition does not compile (see the server log)",
                ),
                None,
            )
        };
        pass = record(
            c,
            &orphans,
            orphans.iter().map(|_| why()).collect(),
            &triggers,
            &HashMap::new(),
        );
    }
    if due.is_empty() {
        return pass;
    }
    let exits = exits_at_send_time(c, &due, &triggers);
    let users: Vec<String> = distinct(due.iter().map(|d| d.user_id.clone()));
    let profiles = profiles_of(c, users.clone());
    let tpls = templates(
        c,
        distinct(
            triggers
                .values()
                .flat_map(|t| t.templates().map(str::to_owned)),
        ),
    );
    let settings = settings(c);
    // the recipients' zones, for the due times of date entries' steps
    let zones: HashMap<String, nudge_core::policy::Tz> = due
        .iter()
        .filter(|d| triggers[&d.trigger].date.is_some())
        .map(|d| {
            let p = profile_of(&profiles, &d.user_id);
            let tz = policy::profile_zone(p, settings.default_timezone.as_deref());
            (d.user_id.clone(), tz)
        })
        .collect();
    let engagement = engagement_of(c, &due, &triggers, &zones);
    let suppressed = suppressions(c, users.clone(), &profiles);
    let consent = consent_of(c, users);
    let secret = unsubscribe_secret(c);
    let answers = user_sql_answers(c, &due, &exits, &triggers);

    let backoff = crate::settings::backoff();

    // First the per-message checks; what survives them is a candidate.
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(due.len());
    let mut ready: Vec<(
        usize,
        (crate::engine::compose::Message, Headers),
        Micros,
        Option<String>,
    )> = vec![];
    for (i, d) in due.iter().enumerate() {
        let t = &triggers[&d.trigger];
        let profile = profiles.get(&d.user_id);
        let retry = transient_failure(t, &d.user_id, profile, &answers).and_then(|why| {
            let delay = backoff.delay_us(d.attempts + 1, jitter(d.id))?;
            Some((why, micros(as_of) + delay))
        });
        let answer = |part: &str| {
            answers
                .get(&(t.name.clone(), part.to_string()))
                .and_then(|a| a.get(&d.user_id))
        };
        let facts = Facts {
            due_at: micros(d.due_at),
            now: micros(as_of),
            exit: exits.get(&i).map(|(_, event)| event.as_str()),
            retry: retry.as_ref().map(|(why, _)| why.as_str()),
            profile: profile_fact(profile),
            audience_sql: audience_sql_fact(t, answer(AUDIENCE_SQL)),
            suppressions: &suppressed,
            consent: &consent,
        };
        // a trigger redefined with fewer steps: this one is gone
        if d.step >= t.steps.len() {
            let why = Stop::new(
                Rule::Definition,
                format!(
                    "step {} is no longer in the trigger's definition (v{} has {})",
                    d.step + 1,
                    t.version,
                    t.steps.len()
                ),
            );
            outcomes.push(Some(Outcome::Stopped(why, None)));
            continue;
        }
        // a step's branch, unless an exit ended the journey first, or a
        // lookup it may read failed (retried, or failed, by screen below)
        if !exits.contains_key(&i) && retry.is_none() && !matches!(profile, Some(Err(_))) {
            let doc = flow::branch_doc(
                profile_of(&profiles, &d.user_id).unwrap_or(&Value::Null),
                &d.anchor,
                engagement.get(&i).unwrap_or(&Default::default()),
            );
            if let Some((to, why)) = flow::branch(&t.steps, d.step, &doc) {
                outcomes.push(Some(Outcome::Branched { to, why }));
                continue;
            }
        }
        let (profile, recipient) = match decision::screen(t, &d.user_id, &facts) {
            Ok(ok) => ok,
            Err(stop) if stop.rule == Rule::Retry => {
                let (why, at) = retry.expect("a retry was allowed");
                outcomes.push(Some(Outcome::Retry { at, why }));
                continue;
            }
            Err(stop) => {
                let exited_at = exits.get(&i).map(|(at, _)| *at);
                outcomes.push(Some(Outcome::Stopped(stop, exited_at)));
                continue;
            }
        };
        let (context, context_error) = context_of(t, &d.user_id, &answers);
        // a message with a topic carries its one-click unsubscribe link
        let (mut headers, unsubscribe_url): (Headers, _) = if t.transactional {
            (vec![], None)
        } else {
            let token = consent::token(&secret, &d.message_key, &d.user_id, &t.topic);
            let (h, link) = consent::headers(
                settings.unsubscribe_url.as_deref(),
                settings.unsubscribe_mailto.as_deref(),
                &token,
            );
            (
                h.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                link,
            )
        };
        headers.extend(t.sender.outbox_headers());
        let composed = compose(
            loaded(&tpls, t.step_template(d.step, d.variant.as_deref())),
            t.fallback_template.as_deref().map(|f| loaded(&tpls, f)),
            Inputs {
                trigger: &t.name,
                user_id: &d.user_id,
                message_key: &d.message_key,
                anchor: &d.anchor,
                profile,
                recipient,
                context,
                context_error,
                unsubscribe_url,
                links: settings
                    .tracking_base()
                    .filter(|_| t.track.any())
                    .map(|base| Links {
                        base,
                        secret: &secret,
                        track: t.track,
                    }),
            },
        );
        let (m, fallback_note) = match composed {
            Composed::Message { message, note } => (message, note),
            Composed::Stopped(stop) => {
                outcomes.push(Some(Outcome::Stopped(stop, None)));
                continue;
            }
        };
        // Quiet hours and send windows move the message, never drop it.
        let due_us = micros(d.due_at);
        let tz = policy::zone(
            profile.get("timezone").and_then(Value::as_str),
            settings.default_timezone.as_deref(),
        );
        let send_at = t.schedule.next_allowed(due_us, tz);
        let moved = (send_at > due_us).then(|| {
            format!(
                "deferred to {} by the send schedule",
                policy::local_text(send_at, tz)
            )
        });
        let moved = match (fallback_note, moved) {
            (Some(f), Some(m)) => Some(format!("{f}; {m}")),
            (f, m) => f.or(m),
        };
        ready.push((i, (m, headers), send_at, moved));
        outcomes.push(None);
    }

    // Then caps and priority, over the batch and what the outbox already holds.
    let candidates: Vec<Candidate<'_>> = ready
        .iter()
        .map(|(i, _, send_at, _)| {
            let (d, t) = (&due[*i], &triggers[&due[*i].trigger]);
            Candidate {
                user: &d.user_id,
                key: &d.key,
                trigger: &t.name,
                priority: t.priority,
                entered_at: micros(d.entered_at),
                due_at: micros(d.due_at),
                send_at: *send_at,
                transactional: t.transactional,
                defer_on_conflict: t.defer_on_conflict,
                caps: &t.caps,
            }
        })
        .collect();
    lock_for_deciding(c, distinct(candidates.iter().map(|c| c.user.to_owned())));
    let sent = recent_messages(c, &candidates, &settings, &triggers);
    let mut ahead = upcoming(c, &due, &candidates, &settings, &triggers, &profiles);
    // the batch's journeys that stopped before caps and priority were, for a
    // live engine deciding the earlier ones, still on their way
    let in_batch: HashSet<usize> = ready.iter().map(|r| r.0).collect();
    ahead.extend(
        due.iter()
            .enumerate()
            .filter(|(i, _)| !in_batch.contains(i))
            .filter_map(|(i, d)| {
                let t = triggers.get(&d.trigger).filter(|t| !t.transactional)?;
                Some(Upcoming {
                    user: d.user_id.clone(),
                    trigger: t.name.clone(),
                    priority: t.priority,
                    entered_at: micros(d.entered_at),
                    due_at: micros(d.due_at),
                    // an exit found at send time ended it then
                    exited_at: exits.get(&i).map(|(at, _)| micros(*at)),
                    send_at: t.schedule.send_time(
                        micros(d.due_at),
                        profile_of(&profiles, &d.user_id),
                        settings.default_timezone.as_deref(),
                    ),
                })
            }),
    );
    let verdicts = policy::decide(&candidates, &sent, &ahead, &settings);
    drop(candidates);
    let mut out = OutboxRows::default();
    for ((i, m, _, moved), verdict) in ready.into_iter().zip(verdicts) {
        let (d, t) = (&due[i], &triggers[&due[i].trigger]);
        let held_out = d.variant.as_deref() == Some(HOLDOUT);
        outcomes[i] = Some(match verdict {
            Verdict::Send { at } | Verdict::Defer { at, .. } if held_out => Outcome::HeldOut { at },
            Verdict::Send { at } => {
                out.push(d, t, m, at);
                Outcome::Sent { at, note: moved }
            }
            Verdict::Defer { at, reason } => {
                out.push(d, t, m, at);
                Outcome::Sent {
                    at,
                    note: Some(format!("deferred: {reason}")),
                }
            }
            Verdict::Suppress(stop) => Outcome::Stopped(stop, None),
        });
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| o.expect("every enrollment has an outcome"))
        .collect();
    let written = out.insert(c);
    pass + record(c, &due, outcomes, &triggers, &zones)
        + Pass {
            written,
            ..Pass::default()
        }
}

pub fn loaded<'a>(
    tpls: &'a HashMap<String, Result<nudge_core::render::Template, String>>,
    name: &str,
) -> Loaded<'a> {
    match tpls.get(name) {
        None => Err(format!("template {name:?} does not exist")),
        Some(Err(e)) => Err(format!("template {name:?} does not parse: {e}")),
        Some(Ok(t)) => Ok(t),
    }
}

/// Answers of the batch's audience and context queries: one call per query
/// for all the users due for its trigger, as the role that defined it.
/// (trigger, part) -> user -> answer.
pub type Answers =
    HashMap<(String, String), HashMap<String, Result<Value, crate::isolate::Failure>>>;

fn user_sql_answers(
    c: &SpiClient<'_>,
    due: &[Due],
    exits: &HashMap<usize, (TimestampWithTimeZone, String)>,
    triggers: &HashMap<String, Trigger>,
) -> Answers {
    let wanted = triggers
        .values()
        .map(|t| {
            let users = distinct(
                due.iter()
                    .enumerate()
                    .filter(|(i, d)| d.trigger == t.name && !exits.contains_key(i))
                    .map(|(_, d)| d.user_id.clone()),
            );
            (t, users)
        })
        .collect();
    answers_for(c, wanted)
}

/// Runs the audience and context queries of these triggers for these users.
pub fn answers_for(c: &SpiClient<'_>, wanted: Vec<(&Trigger, Vec<String>)>) -> Answers {
    let wanted: Vec<(&Trigger, Vec<String>)> = wanted
        .into_iter()
        .filter(|(t, users)| (t.has_audience_sql || !t.context.is_empty()) && !users.is_empty())
        .collect();
    if wanted.is_empty() {
        return HashMap::new();
    }
    let registry = crate::user_sql::registry(
        c,
        wanted
            .iter()
            .map(|(t, _)| (t.name.clone(), t.version))
            .collect(),
    );
    let mut out = HashMap::new();
    for ((trigger, part), function) in registry {
        if let Some((_, users)) = wanted.iter().find(|(t, _)| t.name == trigger) {
            out.insert((trigger, part), crate::user_sql::call(c, &function, users));
        }
    }
    out
}

/// The first lookup for this message (profile, audience_sql, context) that
/// failed in a way that may pass if tried again later.
fn transient_failure(
    t: &Trigger,
    user: &str,
    profile: Option<&Result<Value, crate::isolate::Failure>>,
    answers: &Answers,
) -> Option<String> {
    if let Some(Err(f)) = profile {
        if f.transient {
            return Some(format!("profile query: {f}"));
        }
    }
    let parts = std::iter::once(AUDIENCE_SQL.to_string())
        .filter(|_| t.has_audience_sql)
        .chain(t.context.iter().map(|n| context_part(n)));
    for part in parts {
        if let Some(Err(f)) = answers
            .get(&(t.name.clone(), part.clone()))
            .and_then(|a| a.get(user))
        {
            if f.transient {
                return Some(format!("{part}: {f}"));
            }
        }
    }
    None
}

/// A fixed point in [0, 1) per enrollment, so that retries of a batch that
/// failed together spread out, and the same enrollment always gets the same.
fn jitter(id: i64) -> f64 {
    ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

/// The `context` of one message, and the first of its queries that failed.
pub fn context_of(
    t: &Trigger,
    user: &str,
    answers: &Answers,
) -> (serde_json::Map<String, Value>, Option<String>) {
    let mut context = serde_json::Map::new();
    let mut error = None;
    for name in &t.context {
        match answers
            .get(&(t.name.clone(), context_part(name)))
            .and_then(|a| a.get(user))
        {
            Some(Ok(v)) => {
                context.insert(name.clone(), v.clone());
            }
            Some(Err(e)) => {
                error.get_or_insert(format!("context.{name} failed: {e}"));
            }
            None => {
                context.insert(name.clone(), Value::Null);
            }
        }
    }
    (context, error)
}

/// The database-wide policy settings (nudge.configure); validated when set.
pub fn settings(c: &SpiClient<'_>) -> Settings {
    let v = run(
        c,
        "SELECT coalesce(jsonb_object_agg(name, value), '{}') FROM nudge.settings",
        &[],
        "reading settings",
    )
    .first()
    .get::<JsonB>(1)
    .ok()
    .flatten()
    .map_or(Value::Null, |j| j.0);
    Settings::parse(&v).map(|(_, s)| s).unwrap_or_else(|e| {
        warning!("pg_nudge: ignoring invalid settings: {e}");
        Settings::default()
    })
}

/// Caps and priority weigh what the outbox already holds for a user: two
/// passes deciding for one user at once would each miss the other's new
/// message (a 1-per-day cap sent 2). Each pass takes its users' slots (a
/// fixed number of hashed keys, so a batch of any size holds a bounded number
/// of locks) in one order, until it commits; a class apart from capture's,
/// so an application's open transaction never waits on a pass or the reverse.
fn lock_for_deciding(c: &mut SpiClient<'_>, users: Vec<String>) {
    run(
        c,
        "SELECT count(pg_advisory_xact_lock($1, h))
           FROM (SELECT DISTINCT hashtext(u) & ($3 - 1) AS h FROM unnest($2::text[]) u ORDER BY 1) s",
        &[
            crate::citus::lock_class(DECIDE_LOCK_CLASS).into(),
            users.into(),
            super::capture::USER_LOCK_SLOTS.into(),
        ],
        "locking users for caps and priority",
    );
}

const DECIDE_LOCK_CLASS: i32 = 0x6e75_6469;

/// The candidates' users' non-transactional messages in the outbox that a
/// cap or the arbitration window can still see, in one query.
fn recent_messages(
    c: &SpiClient<'_>,
    candidates: &[Candidate<'_>],
    settings: &Settings,
    triggers: &HashMap<String, Trigger>,
) -> Vec<Sent> {
    let reach = settings
        .caps
        .iter()
        .chain(candidates.iter().flat_map(|c| c.caps.iter()))
        .map(|cap| cap.per_us)
        // same-instant arbitration still looks at the outbox (at that instant)
        .chain(std::iter::once(
            settings
                .arbitration_us
                .max(Micros::from(settings.same_instant_only)),
        ))
        .max()
        .unwrap_or(0);
    let Some(earliest) = candidates.iter().map(|c| c.send_at).min() else {
        return vec![];
    };
    if reach == 0 {
        return vec![];
    }
    let users = distinct(candidates.iter().map(|c| c.user.to_owned()));
    // a message counts at its scheduled time, which claiming leaves alone
    // a held-out message took its slot as a sent one would, in every pass
    let (held_triggers, held_priority): (Vec<String>, Vec<i32>) = triggers
        .values()
        .filter(|t| t.holdout > 0.0 && !t.transactional)
        .map(|t| (t.name.clone(), t.priority))
        .unzip();
    let rows = run(c, "SELECT o.user_id, o.trigger, o.priority, o.scheduled_at, coalesce(e.key, ''), coalesce(e.entered_at, o.created_at)
               FROM nudge.outbox o
               LEFT JOIN nudge.enrollments e ON e.user_id = o.user_id AND e.id = o.enrollment_id
              WHERE o.user_id = ANY ($1) AND NOT o.transactional AND o.status NOT IN ('dead', 'cancelled')
                AND o.scheduled_at > $2
             UNION ALL
             SELECT e.user_id, e.trigger, h.priority, e.sent_at, e.key, e.entered_at
               FROM nudge.enrollments e
               JOIN unnest($3::text[], $4::int[]) AS h(trigger, priority) ON h.trigger = e.trigger
              WHERE e.user_id = ANY ($1) AND e.state = 'held_out' AND e.sent_at > $2",
        &[users.into(), ts(earliest - reach).into(), held_triggers.into(), held_priority.into()],
        "reading recent messages");
    rows.map(|r| {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        let t = |i| {
            micros(
                r.get::<TimestampWithTimeZone>(i)
                    .ok()
                    .flatten()
                    .expect("not null"),
            )
        };
        Sent {
            user: s(1),
            trigger: s(2),
            priority: r.get(3).ok().flatten().unwrap_or(0),
            at: t(4),
            key: s(5),
            entered_at: t(6),
        }
    })
    .collect()
}

fn profile_of<'a>(
    profiles: &'a HashMap<String, Result<Value, crate::isolate::Failure>>,
    user: &str,
) -> Option<&'a Value> {
    profiles.get(user).and_then(|p| p.as_ref().ok())
}

/// The candidates' users' journeys outside the batch that a candidate may
/// lose to (`policy::Upcoming`): waiting ones, and ones that exited after the
/// earliest candidate came due, due to go within the window of a candidate.
fn upcoming(
    c: &SpiClient<'_>,
    due: &[Due],
    candidates: &[Candidate<'_>],
    settings: &Settings,
    triggers: &HashMap<String, Trigger>,
    profiles: &HashMap<String, Result<Value, crate::isolate::Failure>>,
) -> Vec<Upcoming> {
    let (Some(first_due), Some(last_due), Some(last_send)) = (
        candidates.iter().map(|c| c.due_at).min(),
        candidates.iter().map(|c| c.due_at).max(),
        candidates.iter().map(|c| c.send_at).max(),
    ) else {
        return vec![];
    };
    let users = distinct(candidates.iter().map(|c| c.user.to_owned()));
    // the batch's own journeys are candidates already: left out here, by id,
    // in a hash set (an anti join on the array ran in n × m, 165 ms a batch)
    let in_batch: HashSet<i64> = due.iter().map(|d| d.id).collect();
    let rows = run(
        c,
        "SELECT e.user_id, e.trigger, e.entered_at, e.due_at, e.exited_at, e.id
           FROM nudge.enrollments e
          WHERE e.user_id = ANY ($1) AND e.due_at > $2 AND e.due_at <= $3
            AND e.entered_at <= $4 AND (e.state = 'waiting' OR e.exited_at > $2)
            -- a paused trigger's journey goes nowhere until it is resumed
            AND e.trigger IN (SELECT name FROM nudge.triggers WHERE status = 'active')",
        &[
            users.into(),
            ts(first_due).into(),
            ts(last_send + settings.arbitration_us).into(),
            ts(last_due).into(),
        ],
        "reading the journeys on their way",
    );
    rows.filter_map(|r| {
        if in_batch.contains(&r.get::<i64>(6).ok().flatten()?) {
            return None;
        }
        let user: String = r.get(1).ok().flatten()?;
        let t = triggers.get(&r.get::<String>(2).ok().flatten()?)?;
        if t.transactional {
            return None;
        }
        let at = |i| r.get::<TimestampWithTimeZone>(i).ok().flatten().map(micros);
        let due_at = at(4)?;
        let send_at = t.schedule.send_time(
            due_at,
            profile_of(profiles, &user),
            settings.default_timezone.as_deref(),
        );
        Some(Upcoming {
            user,
            trigger: t.name.clone(),
            priority: t.priority,
            entered_at: at(3)?,
            due_at,
            exited_at: at(5),
            send_at,
        })
    })
    .collect()
}

/// Suppressions that touch this batch, by address and by user id.
pub fn suppressions(
    c: &SpiClient<'_>,
    users: Vec<String>,
    profiles: &HashMap<String, Result<Value, crate::isolate::Failure>>,
) -> Suppressions {
    let emails: Vec<String> = profiles
        .values()
        .filter_map(|p| p.as_ref().ok()?.get("email").and_then(Value::as_str))
        .flat_map(|e| [decision::address_key(e), decision::address_hash(e)])
        .collect();
    let rows = run(
        c,
        "SELECT email, user_id, reason FROM nudge.suppressions
              WHERE email = ANY ($1) OR user_id = ANY ($2)",
        &[emails.into(), users.into()],
        "reading suppressions",
    );
    let mut out = Suppressions::default();
    for r in rows {
        let s = |i| r.get::<String>(i).ok().flatten();
        out.add(
            &s(1).unwrap_or_default(),
            s(2).as_deref(),
            &s(3).unwrap_or_default(),
        );
    }
    out
}

/// A profile lookup as `decision::screen` takes it.
pub fn profile_fact(lookup: Option<&Result<Value, crate::isolate::Failure>>) -> Profile<'_> {
    match lookup {
        None => Profile::Missing,
        Some(Err(f)) => Profile::Failed(f.to_string()),
        Some(Ok(p)) => Profile::Found(p),
    }
}

/// A trigger's audience_sql answer for a user as `decision::screen` takes it:
/// None when the trigger has none; anything but `true` keeps the user out.
pub fn audience_sql_fact(
    t: &Trigger,
    answer: Option<&Result<Value, crate::isolate::Failure>>,
) -> Option<Result<bool, String>> {
    t.has_audience_sql.then(|| match answer {
        Some(Ok(Value::Bool(true))) => Ok(true),
        Some(Err(f)) => Err(f.to_string()),
        _ => Ok(false),
    })
}

/// The topics the batch's users unsubscribed from.
pub fn consent_of(c: &SpiClient<'_>, users: Vec<String>) -> Consent {
    let mut out = Consent::default();
    for r in run(
        c,
        "SELECT user_id, topic FROM nudge.subscriptions WHERE user_id = ANY ($1) AND status = 'unsubscribed'",
        &[users.into()],
        "reading consent",
    ) {
        let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
        out.unsubscribed(&s(1), &s(2));
    }
    out
}

/// The key that signs unsubscribe links, made on first use (a restored
/// dump brings the old one back, and the links in mail already sent work).
pub fn unsubscribe_secret(c: &SpiClient<'_>) -> Vec<u8> {
    let read = || {
        run(
            c,
            "SELECT value FROM nudge.secrets WHERE name = 'unsubscribe'",
            &[],
            "reading the unsubscribe key",
        )
        .first()
        .get::<Vec<u8>>(1)
        .ok()
        .flatten()
    };
    if let Some(key) = read() {
        return key;
    }
    // two first passes at once: one key wins, and the loser's INSERT waits for
    // it; a statement of its own then sees it (a statement's snapshot that
    // began before the winner committed would not)
    run(
        c,
        "INSERT INTO nudge.secrets (name, value)
         VALUES ('unsubscribe', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
         ON CONFLICT (name) DO NOTHING",
        &[],
        "making the unsubscribe key",
    );
    read().expect("the unsubscribe key was just made")
}

fn claim_due(c: &mut SpiClient<'_>, as_of: TimestampWithTimeZone, max: i32) -> (Vec<Due>, usize) {
    let rows = run(
        c,
        "WITH b AS (
             SELECT e.id, e.trigger, e.user_id, e.key, e.entered_at, e.due_at, e.anchor,
                    'nm_' || md5(e.trigger || chr(31) || e.user_id || chr(31) || e.key || chr(31)
                                 || extract(epoch FROM e.entered_at)::text
                                 -- a later step's message is its own (the first keeps its old key)
                                 || CASE WHEN e.step > 0 THEN chr(31) || e.step ELSE '' END),
                    e.variant, e.attempts, e.step
               FROM nudge.enrollments e
              WHERE e.state = 'waiting' AND e.due_at <= $1
                -- a filter that no index can take (IS TRUE), so that the plan
                -- walks enrollments_due in due order even when the statistics
                -- are stale, as they are right after a bulk load
                AND (e.trigger = ANY (ARRAY(SELECT name FROM nudge.triggers WHERE status = 'active'))) IS TRUE
              ORDER BY e.due_at
              LIMIT $2
                FOR UPDATE OF e SKIP LOCKED),
          -- the batch's users' other due messages that the limit cut off:
          -- taken too, so that a user's messages up to the batch's last due
          -- time are decided together, as one pass would
          more AS (
             SELECT e.id, e.trigger, e.user_id, e.key, e.entered_at, e.due_at, e.anchor,
                    'nm_' || md5(e.trigger || chr(31) || e.user_id || chr(31) || e.key || chr(31)
                                 || extract(epoch FROM e.entered_at)::text
                                 -- a later step's message is its own (the first keeps its old key)
                                 || CASE WHEN e.step > 0 THEN chr(31) || e.step ELSE '' END),
                    e.variant, e.attempts, e.step
               FROM nudge.enrollments e
              WHERE e.user_id IN (SELECT user_id FROM b) AND e.state = 'waiting'
                AND e.due_at <= (SELECT max(due_at) FROM b)
                AND e.trigger IN (SELECT name FROM nudge.triggers WHERE status = 'active')
                AND NOT EXISTS (SELECT 1 FROM b WHERE b.id = e.id)
                FOR UPDATE OF e SKIP LOCKED),
          a AS (SELECT * FROM b UNION ALL SELECT * FROM more),
          -- and in due order: a message whose user has an earlier (or
          -- same-instant) one in another pass's hands waits for a later
          -- pass, which sees what that one became
          -- (one index probe per message, LIMIT 1 keeping it one: as an anti
          -- join the planner hashed every waiting journey, 110 ms a pass)
          mine AS (SELECT a.user_id, array_agg(a.id) AS ids FROM a GROUP BY a.user_id),
          k AS (
             SELECT a.* FROM a
               JOIN mine ON mine.user_id = a.user_id
               LEFT JOIN LATERAL (
                    SELECT 1 AS held FROM nudge.enrollments o
                     WHERE o.user_id = a.user_id AND o.state = 'waiting' AND o.due_at <= a.due_at
                       AND o.id <> ALL (mine.ids)
                       AND o.trigger IN (SELECT name FROM nudge.triggers WHERE status = 'active')
                     LIMIT 1) other ON true
              WHERE other.held IS NULL)
         SELECT *, (SELECT count(*) FROM b) FROM k
         ORDER BY 6",
        &[as_of.into(), max.max(0).into()],
        "claiming due enrollments",
    );
    let mut locked = 0;
    let due = rows
        .map(|r| {
            locked = r.get::<i64>(12).ok().flatten().unwrap_or_default() as usize;
            let s = |i| r.get::<String>(i).ok().flatten().unwrap_or_default();
            Due {
                id: r.get(1).ok().flatten().unwrap_or_default(),
                trigger: s(2),
                user_id: s(3),
                key: s(4),
                entered_at: r.get(5).ok().flatten().expect("entered_at is NOT NULL"),
                due_at: r.get(6).ok().flatten().expect("due_at is NOT NULL"),
                anchor: r
                    .get::<JsonB>(7)
                    .ok()
                    .flatten()
                    .map_or(Value::Null, |j| j.0),
                message_key: s(8),
                variant: r.get::<String>(9).ok().flatten(),
                attempts: r.get::<i32>(10).ok().flatten().unwrap_or_default(),
                step: r.get::<i32>(11).ok().flatten().unwrap_or_default().max(0) as usize,
            }
        })
        .collect();
    (due, locked)
}

/// The first exit event of each due enrollment in [entered_at, due_at),
/// read from every registered source in one query: this catches exits that
/// were loaded without the capture trigger (COPY with triggers disabled,
/// rows that predate add_source).
pub(super) fn exits_at_send_time(
    c: &SpiClient<'_>,
    due: &[Due],
    triggers: &HashMap<String, nudge_core::definition::Trigger>,
) -> HashMap<usize, (TimestampWithTimeZone, String)> {
    let mut idx = vec![];
    let mut users = vec![];
    let mut from = vec![];
    let mut to = vec![];
    let mut names = HashSet::new();
    for (i, d) in due.iter().enumerate() {
        let t = &triggers[&d.trigger];
        let step_exits = t.steps.get(d.step).map_or(&[][..], |s| s.exits.as_slice());
        // a date entry's own event, later, moved the journey
        let moves = t.date.as_ref().map(|_| t.entry_event.clone());
        if t.exits.is_empty() && step_exits.is_empty() && moves.is_none() {
            continue;
        }
        names.extend(t.exits.iter().chain(step_exits).map(|x| x.event.clone()));
        names.extend(moves);
        idx.push(i as i32);
        users.push(d.user_id.clone());
        from.push(d.entered_at);
        to.push(d.due_at);
    }
    let mut found = HashMap::new();
    if idx.is_empty() {
        return found;
    }
    // each owner's sources apart: the earliest hit of every group wins
    let args = [
        idx.into(),
        users.into(),
        from.into(),
        to.into(),
        names.into_iter().collect::<Vec<_>>().into(),
    ];
    crate::spi_util::run_per_owner(
        c,
        "SELECT b.i, a.event, a.props, a.occurred_at
           FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS b(i, user_id, f, t)
           JOIN nudge.all_events a
             ON a.user_id = b.user_id AND a.occurred_at >= b.f AND a.occurred_at < b.t
          WHERE a.event = ANY ($5)
          ORDER BY b.i, a.occurred_at",
        &args,
        "re-checking exit events",
        |rows| {
            for r in rows {
                let i = r.get::<i32>(1).ok().flatten().unwrap_or_default() as usize;
                let at: TimestampWithTimeZone = r.get(4).ok().flatten().expect("occurred_at");
                if found
                    .get(&i)
                    .is_some_and(|(t, _): &(TimestampWithTimeZone, String)| micros(*t) <= micros(at))
                {
                    continue;
                }
                let event: String = r.get(2).ok().flatten().unwrap_or_default();
                let props = r
                    .get::<JsonB>(3)
                    .ok()
                    .flatten()
                    .map_or(Value::Null, |j| j.0);
                let d = &due[i];
                // the anchor itself (an event that enters and exits) does not
                // end its own journey
                if micros(at) == micros(d.entered_at) && triggers[&d.trigger].enters(&event, &props) {
                    continue;
                }
                let hit = match triggers[&d.trigger].exit_scope_at(d.step, &event, &props) {
                    Some(None) => true,
                    Some(Some(k)) => k == d.key,
                    None => false,
                };
                if hit {
                    found.insert(i, (at, event));
                }
            }
        },
    );
    found
}

/// Engagement with earlier steps, for the batch's steps that branch on it.
fn engagement_of(
    c: &SpiClient<'_>,
    due: &[Due],
    triggers: &HashMap<String, Trigger>,
    zones: &HashMap<String, nudge_core::policy::Tz>,
) -> HashMap<usize, std::collections::BTreeMap<String, nudge_core::flow::Engagement>> {
    let at: Vec<super::engagement::At<'_>> = due
        .iter()
        .map(|d| super::engagement::At {
            trigger: &triggers[&d.trigger],
            stored_as: &d.trigger,
            user: &d.user_id,
            key: &d.key,
            entered_at: micros(d.entered_at),
            step: d.step,
            anchor: &d.anchor,
            tz: zones
                .get(&d.user_id)
                .copied()
                .unwrap_or(nudge_core::policy::Tz::UTC),
        })
        .collect();
    super::engagement::engagement(c, &at)
}

/// Profiles of these users: the query given to set_profile_query, run as
/// the role that set it, or else the built-in table. One statement for the
/// batch; a user whose lookup raises an error gets `Err`, the others their
/// profile; a user without one is absent.
pub fn profiles_of(
    c: &SpiClient<'_>,
    users: Vec<String>,
) -> HashMap<String, Result<Value, crate::isolate::Failure>> {
    if let Some(f) = crate::user_sql::profile_function(c) {
        return crate::user_sql::call(c, &f, &users)
            .into_iter()
            .filter(|(_, p)| !matches!(p, Ok(Value::Null)))
            .collect();
    }
    isolate::per_user(&users, crate::settings::user_sql_budget(), |some| {
        run(
            c,
            "SELECT p.user_id, p.attrs || jsonb_strip_nulls(jsonb_build_object('email', p.email, 'timezone', p.timezone))
               FROM nudge.profiles p WHERE p.user_id = ANY ($1)",
            &[some.to_vec().into()],
            "reading profiles",
        )
        .filter_map(|r| {
            let u: String = r.get(1).ok().flatten()?;
            let p: JsonB = r.get(2).ok().flatten()?;
            Some((u, p.0))
        })
        .collect()
    })
}

#[derive(Default)]
struct OutboxRows {
    key: Vec<String>,
    trigger: Vec<String>,
    version: Vec<i32>,
    enrollment: Vec<i64>,
    user: Vec<String>,
    recipient: Vec<String>,
    subject: Vec<String>,
    html: Vec<String>,
    text: Vec<Option<String>>,
    available: Vec<TimestampWithTimeZone>,
    priority: Vec<i32>,
    transactional: Vec<bool>,
    variant: Vec<Option<String>>,
    topic: Vec<Option<String>>,
    headers: Vec<JsonB>,
}

/// Extra headers of a message (the unsubscribe ones), besides its Message-ID.
type Headers = Vec<(String, String)>;

impl OutboxRows {
    fn push(
        &mut self,
        d: &Due,
        t: &Trigger,
        (m, headers): (crate::engine::compose::Message, Headers),
        at: Micros,
    ) {
        let mut h = serde_json::Map::new();
        h.insert(
            "Message-ID".into(),
            Value::String(format!("<{}@pg_nudge>", d.message_key)),
        );
        for (name, value) in headers {
            h.insert(name, Value::String(value));
        }
        self.headers.push(JsonB(Value::Object(h)));
        self.topic.push((!t.transactional).then(|| t.topic.clone()));
        self.key.push(d.message_key.clone());
        self.trigger.push(d.trigger.clone());
        self.version.push(t.version);
        self.enrollment.push(d.id);
        self.user.push(d.user_id.clone());
        self.recipient.push(m.recipient);
        self.subject.push(m.rendered.subject);
        self.html.push(m.rendered.html);
        self.text.push(m.rendered.text);
        self.available.push(ts(at));
        self.priority.push(t.priority);
        self.transactional.push(t.transactional);
        self.variant.push(d.variant.clone());
    }

    /// One INSERT for the batch; the unique message_key makes a repeat a no-op.
    fn insert(self, c: &mut SpiClient<'_>) -> i32 {
        if self.key.is_empty() {
            return 0;
        }
        let rows = run(c, "INSERT INTO nudge.outbox (id, message_key, trigger, trigger_version, enrollment_id, user_id,
                                           recipient, subject, html, text_body, available_at, scheduled_at,
                                           priority, transactional, variant, topic, headers)
                 SELECT nextval('nudge.outbox_id_seq'), k, t, v, e, u, r, s, h, x, a, a, p, tx, va, tp, hd
                   FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::text[], $6::text[],
                               $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::int[], $12::bool[],
                               $13::text[], $14::text[], $15::jsonb[])
                     AS m(k, t, v, e, u, r, s, h, x, a, p, tx, va, tp, hd)
                 ON CONFLICT (message_key, user_id) DO NOTHING
                 RETURNING 1", &[
                    self.key.into(),
                    self.trigger.into(),
                    self.version.into(),
                    self.enrollment.into(),
                    self.user.into(),
                    self.recipient.into(),
                    self.subject.into(),
                    self.html.into(),
                    self.text.into(),
                    self.available.into(),
                    self.priority.into(),
                    self.transactional.into(),
                    self.variant.into(),
                    self.topic.into(),
                    self.headers.into(),
                ], "writing the outbox");
        rows.len() as i32
    }
}

/// Writes each enrollment's outcome, its rule and reason (nudge.explain
/// and trigger_stats read them from there); counts them.
fn record(
    c: &mut SpiClient<'_>,
    due: &[Due],
    outcomes: Vec<Outcome>,
    triggers: &HashMap<String, Trigger>,
    zones: &HashMap<String, nudge_core::policy::Tz>,
) -> Pass {
    let n = due.len();
    // the journeys' next steps, and next year's journey of a yearly date:
    // (index, step, entered_at, due_at)
    let next: Vec<(usize, usize, Micros, Micros)> = due
        .iter()
        .zip(&outcomes)
        .enumerate()
        .filter_map(|(i, (d, o))| {
            let t = triggers.get(&d.trigger)?;
            let end = o.step_end()?;
            let entered = micros(d.entered_at);
            match flow::after(&t.steps, d.step, end) {
                Next::Step(k) => {
                    let tz = zones
                        .get(&d.user_id)
                        .copied()
                        .unwrap_or(nudge_core::policy::Tz::UTC);
                    Some((i, k, entered, t.step_due(k, entered, &d.anchor, tz)?))
                }
                Next::End => {
                    let date = t.date.as_ref().filter(|d| d.every_year)?;
                    if end == StepEnd::Stopped(Rule::Exit) {
                        return None;
                    }
                    let tz = zones
                        .get(&d.user_id)
                        .copied()
                        .unwrap_or(nudge_core::policy::Tz::UTC);
                    // from this year's date, however late this pass decided it
                    let this = date.due(&d.anchor, tz, entered)?;
                    Some((i, 0, this, date.due(&d.anchor, tz, this)?))
                }
            }
        })
        .collect();
    let (mut states, mut rules, mut reasons, mut keys) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut exited, mut sent) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut retries: Vec<(usize, Micros)> = vec![];
    for (i, (d, o)) in due.iter().zip(outcomes).enumerate() {
        let message = Some(d.message_key.clone());
        // state, rule, reason, message key, exited_at, sent_at
        let (state, rule, reason, key, exit, went) = match o {
            Outcome::Retry { at, why } => {
                retries.push((i, at));
                let why = format!(
                    "retrying at {} (attempt {} failed): {why}",
                    nudge_core::time::format_pg_utc(at),
                    d.attempts + 1
                );
                ("waiting", Some(Rule::Retry), why, None, None, None)
            }
            Outcome::Sent { at, note } => {
                let why = match note {
                    None => format!("message {}", d.message_key),
                    Some(n) => format!("message {}; {n}", d.message_key),
                };
                ("sent", None, why, message, None, Some(ts(at)))
            }
            Outcome::Branched { why, .. } => ("skipped", Some(Rule::Branch), why, None, None, None),
            Outcome::HeldOut { at } => {
                let why = format!(
                    "held out (control group): would have gone at {}",
                    nudge_core::time::format_pg_utc(at)
                );
                (
                    "held_out",
                    Some(Rule::Holdout),
                    why,
                    None,
                    None,
                    Some(ts(at)),
                )
            }
            Outcome::Stopped(stop, exit) => {
                let state = stop.rule.state();
                let why = match (stop.rule, state) {
                    (Rule::Exit, _) => format!("{} (found at send time)", stop.why),
                    (_, "failed") if d.attempts > 0 => {
                        format!("{} (after {} attempts)", stop.why, d.attempts + 1)
                    }
                    _ => stop.why,
                };
                (state, Some(stop.rule), why, None, exit, None)
            }
        };
        states.push(state.to_string());
        rules.push(rule.map(|r| r.name().to_string()));
        reasons.push(Some(reason));
        keys.push(key);
        exited.push(exit);
        sent.push(went);
    }
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    let users: Vec<String> = due.iter().map(|d| d.user_id.clone()).collect();
    let mut retry_at: Vec<Option<TimestampWithTimeZone>> = vec![None; n];
    for (i, at) in &retries {
        retry_at[*i] = Some(ts(*at));
    }
    run(c, "UPDATE nudge.enrollments e
                SET state = u.state, rule = u.rule, reason = u.reason, message_key = u.message_key,
                    exited_at = coalesce(u.exited_at, e.exited_at), sent_at = u.sent_at, updated_at = now(),
                    due_at = coalesce(u.retry_at, e.due_at),
                    attempts = e.attempts + (u.retry_at IS NOT NULL)::int
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                           $7::timestamptz[], $8::timestamptz[], $9::text[])
                 AS u(id, user_id, state, reason, message_key, exited_at, sent_at, retry_at, rule)
              WHERE e.user_id = u.user_id AND e.id = u.id", &[
                ids.clone().into(),
                users.clone().into(),
                states.clone().into(),
                reasons.clone().into(),
                keys.into(),
                exited.into(),
                sent.into(),
                retry_at.into(),
                rules.into(),
            ], "recording outcomes");
    if !next.is_empty() {
        // the next step is an enrollment of its own, waiting from now on: the
        // journey's anchor, arm and entry are its; a repeat pass adds nothing
        let ids: Vec<i64> = next.iter().map(|(i, _, _, _)| due[*i].id).collect();
        let users: Vec<String> = next
            .iter()
            .map(|(i, _, _, _)| due[*i].user_id.clone())
            .collect();
        let steps: Vec<i32> = next.iter().map(|(_, k, _, _)| *k as i32).collect();
        let entered: Vec<TimestampWithTimeZone> = next.iter().map(|(_, _, e, _)| ts(*e)).collect();
        let at: Vec<TimestampWithTimeZone> = next.iter().map(|(_, _, _, at)| ts(*at)).collect();
        let versions: Vec<i32> = next
            .iter()
            .map(|(i, _, _, _)| triggers[&due[*i].trigger].version)
            .collect();
        // (an exit that capture saw after this step's due time is carried on:
        // it ends the step it falls before)
        run(c, "INSERT INTO nudge.enrollments (id, trigger, trigger_version, user_id, key, entered_at, due_at, anchor,
                                              anchor_event, coalesced, last_entry_at, variant, step, exited_at)
                SELECT nextval('nudge.enrollments_id_seq'), e.trigger, n.version, e.user_id, e.key, n.entered_at, n.due_at, e.anchor,
                       e.anchor_event, e.coalesced, greatest(e.last_entry_at, n.entered_at), e.variant, n.step,
                       CASE WHEN n.step > 0 THEN e.exited_at END
                  FROM unnest($1::bigint[], $2::text[], $3::int[], $4::timestamptz[], $5::int[], $6::timestamptz[])
                    AS n(id, user_id, step, due_at, version, entered_at)
                  JOIN nudge.enrollments e ON e.user_id = n.user_id AND e.id = n.id
                 -- next year's date, unless a later event moved or ended the journey
                 WHERE n.step > 0 OR e.exited_at IS NULL
                ON CONFLICT DO NOTHING",
            &[ids.into(), users.into(), steps.into(), at.into(), versions.into(), entered.into()],
            "starting the journeys' next steps");
    }
    if !retries.is_empty() {
        // a retry leaves the enrollment waiting, where explain does not read
        // its reason: the journal keeps each attempt's failure
        let pick = |v: &[String]| {
            retries
                .iter()
                .map(|(i, _)| v[*i].clone())
                .collect::<Vec<_>>()
        };
        let trig: Vec<String> = due.iter().map(|d| d.trigger.clone()).collect();
        let why: Vec<String> = reasons
            .iter()
            .map(|r| r.clone().unwrap_or_default())
            .collect();
        let rid: Vec<i64> = retries.iter().map(|(i, _)| due[*i].id).collect();
        run(c, "INSERT INTO nudge.journal (id, user_id, trigger, enrollment_id, at, step, detail, rule)
                SELECT nextval('nudge.journal_id_seq'), u.user_id, u.trigger, u.id, now(), 'retry', u.detail, 'retry'
                  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS u(user_id, trigger, id, detail)",
            &[pick(&users).into(), pick(&trig).into(), rid.into(), pick(&why).into()],
            "journaling retries");
    }
    // The other outcomes need no journal line: nudge.explain reads them from
    // the enrollment (state and reason), which the UPDATE has just written.
    let n = |state: &str| states.iter().filter(|s| *s == state).count() as i32;
    Pass {
        failed: n("failed"),
        retried: retries.len() as i32,
        suppressed: n("suppressed") + n("skipped"),
        exited: n("exited"),
        held_out: n("held_out"),
        expired: n("expired"),
        ..Pass::default()
    }
}
