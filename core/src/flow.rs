//! Journeys of several steps: each step waits, may branch, and sends a
//! message. A step's due time is fixed by the anchor's time and the
//! definition alone (event time), so live passes, a bulk load and a backtest
//! agree on it whatever happened in between; see docs/reference.md, "Steps".

use crate::decision::Rule;
use crate::definition::ExitSpec;
use crate::predicate::Predicate;
use crate::time::parse_duration;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One step of `steps`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Defaults to the step's number ("1", "2", ...).
    #[serde(default)]
    pub name: Option<String>,
    /// From the previous step's due time (the anchor for the first step).
    #[serde(default)]
    pub wait: Option<String>,
    /// From the anchor, instead of `wait`.
    #[serde(default)]
    pub at: Option<String>,
    pub template: String,
    /// A variant's own template for this step; the others send `template`.
    #[serde(default)]
    pub variants: BTreeMap<String, String>,
    /// When the step comes due: send only if this holds.
    #[serde(default, rename = "if")]
    pub when: Option<Value>,
    /// Where a journey goes when `if` does not hold: a later step's name, or
    /// "end". Defaults to the next step.
    #[serde(default, rename = "else")]
    pub otherwise: Option<String>,
    /// Exits of this step alone, on top of the journey's `unless`.
    #[serde(default)]
    pub unless: Vec<ExitSpec>,
}

/// Where a journey goes after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Step(usize),
    End,
}

/// A step, compiled.
#[derive(Debug, Clone)]
pub struct FlowStep {
    pub name: String,
    /// Due time relative to the anchor.
    pub offset_us: i64,
    pub template: String,
    pub variants: BTreeMap<String, String>,
    pub when: Option<Predicate>,
    /// Where the journey goes when `when` does not hold.
    pub otherwise: Next,
    pub exits: Vec<crate::definition::ExitRule>,
}

impl FlowStep {
    /// The single step of a definition without `steps`.
    pub fn single(offset_us: i64, template: String, variants: BTreeMap<String, String>) -> Self {
        FlowStep {
            name: "1".into(),
            offset_us,
            template,
            variants,
            when: None,
            otherwise: Next::End,
            exits: vec![],
        }
    }

    pub fn template_of(&self, arm: Option<&str>) -> &str {
        arm.and_then(|a| self.variants.get(a))
            .map_or(&self.template, String::as_str)
    }
}

/// What a step's engagement facts are called in a branch: `steps.<name>.<fact>`.
pub const FACTS: [&str; 4] = ["sent", "delivered", "opened", "clicked"];

/// Compiles `steps`; errors name the JSON path. `variants` are the
/// definition's arm names, which a step's `variants` must use.
pub fn compile(specs: &[StepSpec], arms: &[String]) -> Result<Vec<FlowStep>, String> {
    if specs.is_empty() {
        return Err("steps: give at least one step".into());
    }
    let names: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| s.name.clone().unwrap_or_else(|| (i + 1).to_string()))
        .collect();
    for (i, n) in names.iter().enumerate() {
        let at = format!("steps[{i}].name");
        if n.trim().is_empty() || n == "end" || n.contains('.') {
            return Err(format!(
                "{at}: {n:?} is not a step name (not empty, not \"end\", no dots)"
            ));
        }
        if names[..i].contains(n) {
            return Err(format!("{at}: {n:?} names an earlier step too"));
        }
    }
    let mut out: Vec<FlowStep> = Vec::with_capacity(specs.len());
    let mut offset = 0i64;
    for (i, s) in specs.iter().enumerate() {
        let here = |f: &str| format!("steps[{i}].{f}");
        offset = match (&s.wait, &s.at) {
            (Some(_), Some(_)) => return Err(format!("{}: give wait or at, not both", here("at"))),
            (Some(w), None) => {
                offset + parse_duration(w).map_err(|e| format!("{}: {e}", here("wait")))?
            }
            (None, Some(a)) => {
                let at = parse_duration(a).map_err(|e| format!("{}: {e}", here("at")))?;
                if at < offset {
                    return Err(format!(
                        "{}: {a:?} from the anchor comes before the previous step",
                        here("at")
                    ));
                }
                at
            }
            (None, None) => offset,
        };
        if s.template.trim().is_empty() {
            return Err(format!("{}: must not be empty", here("template")));
        }
        for (arm, tpl) in &s.variants {
            if !arms.contains(arm) {
                return Err(format!(
                    "{}: {arm:?} is not one of the definition's variants",
                    here(&format!("variants.{arm}"))
                ));
            }
            if tpl.trim().is_empty() {
                return Err(format!(
                    "{}: must not be empty",
                    here(&format!("variants.{arm}"))
                ));
            }
        }
        let when = s
            .when
            .as_ref()
            .map(|w| Predicate::parse(w, &here("if")))
            .transpose()?;
        if let Some(p) = &when {
            check_paths(p, &names[..i], &here("if"))?;
        }
        let otherwise = match s.otherwise.as_deref() {
            None if s.when.is_some() || i + 1 < specs.len() => next_of(i, specs.len()),
            None => Next::End,
            Some(_) if s.when.is_none() => {
                return Err(format!("{}: needs an if", here("else")));
            }
            Some("end") => Next::End,
            Some(n) => match names.iter().position(|x| x == n) {
                Some(j) if j > i => Next::Step(j),
                Some(_) => {
                    return Err(format!(
                        "{}: {n:?} is not a later step (a journey only goes forward)",
                        here("else")
                    ))
                }
                None => {
                    return Err(format!(
                        "{}: no step named {n:?} (or \"end\")",
                        here("else")
                    ))
                }
            },
        };
        let exits = s
            .unless
            .iter()
            .enumerate()
            .map(|(j, x)| crate::definition::ExitRule::compile(x, &here(&format!("unless[{j}]"))))
            .collect::<Result<_, _>>()?;
        out.push(FlowStep {
            name: names[i].clone(),
            offset_us: offset,
            template: s.template.clone(),
            variants: s.variants.clone(),
            when,
            otherwise,
            exits,
        });
    }
    Ok(out)
}

fn next_of(i: usize, n: usize) -> Next {
    if i + 1 < n {
        Next::Step(i + 1)
    } else {
        Next::End
    }
}

/// A branch reads the profile, the anchor event, and engagement with the
/// journey's earlier steps: anything else is a typo that would never match.
fn check_paths(p: &Predicate, earlier: &[String], at: &str) -> Result<(), String> {
    match p {
        Predicate::All(ps) | Predicate::Any(ps) => {
            ps.iter().try_for_each(|p| check_paths(p, earlier, at))
        }
        Predicate::Not(p) => check_paths(p, earlier, at),
        Predicate::Field { path, .. } => {
            let shown = path.join(".");
            match path.first().map(String::as_str) {
                Some("profile" | "event") if path.len() > 1 => Ok(()),
                Some("steps") => match (path.get(1), path.get(2), path.len()) {
                    (Some(step), Some(fact), 3)
                        if earlier.contains(step) && FACTS.contains(&fact.as_str()) =>
                    {
                        Ok(())
                    }
                    (Some(step), _, _) if !earlier.contains(step) => Err(format!(
                        "{at}.{shown}: {step:?} is not an earlier step of this journey"
                    )),
                    _ => Err(format!(
                        "{at}.{shown}: expected steps.<earlier step>.<{}>",
                        FACTS.join("|")
                    )),
                },
                _ => Err(format!(
                    "{at}.{shown}: a branch reads profile.<field>, event.<field> or steps.<earlier step>.<{}>",
                    FACTS.join("|")
                )),
            }
        }
    }
}

/// What a journey's earlier step did, as a branch reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Engagement {
    pub sent: bool,
    pub delivered: bool,
    pub opened: bool,
    pub clicked: bool,
}

/// The document a branch is tested on.
pub fn branch_doc(profile: &Value, anchor: &Value, steps: &BTreeMap<String, Engagement>) -> Value {
    let mut s = Map::new();
    for (name, e) in steps {
        s.insert(
            name.clone(),
            serde_json::json!({"sent": e.sent, "delivered": e.delivered, "opened": e.opened, "clicked": e.clicked}),
        );
    }
    serde_json::json!({"profile": profile, "event": anchor, "steps": Value::Object(s)})
}

/// A step's branch, when it comes due: `None` to send it, else where the
/// journey goes instead and why.
pub fn branch(steps: &[FlowStep], k: usize, doc: &Value) -> Option<(Next, String)> {
    let s = steps.get(k)?;
    let p = s.when.as_ref()?;
    if p.matches(doc) {
        return None;
    }
    let to = match s.otherwise {
        Next::Step(j) if j < steps.len() => format!("step {}", steps[j].name),
        _ => "the end".to_string(),
    };
    Some((
        s.otherwise,
        format!("branch: step {}'s if did not hold; to {to}", s.name),
    ))
}

/// How a step ended, as the next step's rule reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepEnd {
    Sent,
    HeldOut,
    Branched(Next),
    Stopped(Rule),
}

/// Where the journey goes after step `k` ended so. A rule about this one
/// message (a cap, priority, a stale due time, the template) skips it and
/// the journey goes on; a rule about the person or the journey (an exit,
/// unsubscribed, suppressed, out of the audience, no address) ends it.
pub fn after(steps: &[FlowStep], k: usize, end: StepEnd) -> Next {
    match end {
        StepEnd::Branched(to) => to,
        StepEnd::Sent | StepEnd::HeldOut => next_of(k, steps.len()),
        StepEnd::Stopped(rule) if message_rule(rule) => next_of(k, steps.len()),
        StepEnd::Stopped(_) => Next::End,
    }
}

fn message_rule(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::Cap | Rule::Priority | Rule::Expired | Rule::Abort | Rule::Template | Rule::Context
    )
}

/// The journey spans from its anchor to its last step's due time: entries
/// in that span join it, exits close it.
pub fn span(steps: &[FlowStep]) -> i64 {
    steps.iter().map(|s| s.offset_us).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H: i64 = 3_600_000_000;

    fn specs(v: Value) -> Vec<StepSpec> {
        serde_json::from_value(v).unwrap()
    }

    fn cart() -> Vec<FlowStep> {
        compile(
            &specs(json!([
                {"name": "reminder", "wait": "1 hour", "template": "c1"},
                {"name": "nudge", "wait": "1 day", "template": "c2",
                 "if": {"steps.reminder.opened": {"eq": true}}, "else": "discount"},
                {"name": "discount", "wait": "2 days", "template": "c3"}
            ])),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn offsets_add_up_from_the_anchor() {
        let s = cart();
        let offsets: Vec<i64> = s.iter().map(|s| s.offset_us).collect();
        assert_eq!(offsets, vec![H, 25 * H, 73 * H]);
        assert_eq!(span(&s), 73 * H);
        let at = compile(
            &specs(json!([{"wait": "1 hour", "template": "a"}, {"at": "3 days", "template": "b"}])),
            &[],
        )
        .unwrap();
        assert_eq!((at[0].name.as_str(), at[1].offset_us), ("1", 72 * H));
    }

    #[test]
    fn a_branch_sends_or_goes_to_its_else() {
        let s = cart();
        let mut eng = BTreeMap::new();
        eng.insert(
            "reminder".to_string(),
            Engagement {
                sent: true,
                opened: true,
                ..Default::default()
            },
        );
        let opened = branch_doc(&json!({}), &json!({}), &eng);
        assert_eq!(branch(&s, 1, &opened), None);
        eng.get_mut("reminder").unwrap().opened = false;
        let not = branch_doc(&json!({}), &json!({}), &eng);
        let (to, why) = branch(&s, 1, &not).unwrap();
        assert_eq!(to, Next::Step(2));
        assert!(why.contains("to step discount"), "{why}");
        // no if: always sends
        assert_eq!(branch(&s, 0, &not), None);
    }

    #[test]
    fn message_rules_skip_a_step_and_person_rules_end_the_journey() {
        let s = cart();
        assert_eq!(after(&s, 0, StepEnd::Sent), Next::Step(1));
        assert_eq!(after(&s, 0, StepEnd::Stopped(Rule::Cap)), Next::Step(1));
        assert_eq!(after(&s, 0, StepEnd::HeldOut), Next::Step(1));
        assert_eq!(after(&s, 0, StepEnd::Stopped(Rule::Consent)), Next::End);
        assert_eq!(after(&s, 0, StepEnd::Stopped(Rule::Exit)), Next::End);
        assert_eq!(after(&s, 1, StepEnd::Branched(Next::End)), Next::End);
        assert_eq!(after(&s, 2, StepEnd::Sent), Next::End);
    }

    #[test]
    fn errors_name_the_step_and_what_is_wrong() {
        let err = |v: Value| compile(&specs(v), &["B".to_string()]).unwrap_err();
        assert!(err(json!([])).starts_with("steps:"));
        assert_eq!(
            err(json!([{"name": "a", "template": "x"}, {"name": "a", "template": "y"}])),
            "steps[1].name: \"a\" names an earlier step too"
        );
        assert!(err(json!([{"template": "x", "if": {"steps.later.opened": {"eq": true}}}, {"name": "later", "template": "y"}]))
            .starts_with("steps[0].if.steps.later.opened: \"later\" is not an earlier step"));
        assert!(err(
            json!([{"template": "x"}, {"template": "y", "if": {"steps.1.read": {"eq": true}}}])
        )
        .contains("expected steps.<earlier step>.<sent|delivered|opened|clicked>"));
        assert!(
            err(json!([{"template": "x"}, {"template": "y", "if": {"plan": {"eq": 1}}}]))
                .starts_with("steps[1].if.plan: a branch reads profile.")
        );
        assert!(err(json!([{"name": "a", "template": "x"}, {"name": "b", "template": "y", "if": {"profile.vip": {"eq": true}}, "else": "a"}]))
            .contains("steps[1].else: \"a\" is not a later step"));
        assert!(err(json!([{"template": "x", "else": "end"}]))
            .starts_with("steps[0].else: needs an if"));
        assert!(err(
            json!([{"wait": "2 days", "template": "x"}, {"at": "1 day", "template": "y"}])
        )
        .starts_with("steps[1].at: \"1 day\" from the anchor comes before"));
        assert!(err(json!([{"wait": "soon", "template": "x"}])).starts_with("steps[0].wait:"));
        assert!(err(json!([{"template": "x", "variants": {"C": "z"}}]))
            .starts_with("steps[0].variants.C: \"C\" is not one of"));
    }

    #[test]
    fn a_step_variant_overrides_the_step_template() {
        let s = compile(
            &specs(json!([{"template": "x", "variants": {"B": "xb"}}])),
            &["A".to_string(), "B".to_string()],
        )
        .unwrap();
        assert_eq!(s[0].template_of(Some("B")), "xb");
        assert_eq!(s[0].template_of(Some("A")), "x");
        assert_eq!(s[0].template_of(None), "x");
    }
}
