//! Predicates over JSON documents: `{"field": {"op": value}}`, combined with
//! `all`, `any` and `not`. Fields are dotted paths into the document.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Contains(Value),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    All(Vec<Predicate>),
    Any(Vec<Predicate>),
    Not(Box<Predicate>),
    Field { path: Vec<String>, op: Op },
}

pub const OPS: &str = "eq, ne, gt, gte, lt, lte, in, contains, exists";

impl Predicate {
    /// Compiles a predicate; an error names the JSON path below `at`.
    pub fn parse(v: &Value, at: &str) -> Result<Predicate, String> {
        let obj = v.as_object().ok_or_else(|| {
            format!("{at}: expected an object such as {{\"field\": {{\"eq\": 1}}}}")
        })?;
        if obj.is_empty() {
            return Err(format!("{at}: empty predicate"));
        }
        let mut parts = Vec::with_capacity(obj.len());
        for (k, sub) in obj {
            let here = format!("{at}.{k}");
            let p = match k.as_str() {
                "all" | "any" => {
                    let items = sub
                        .as_array()
                        .ok_or_else(|| format!("{here}: expected an array of predicates"))?;
                    let list = items
                        .iter()
                        .enumerate()
                        .map(|(i, p)| Predicate::parse(p, &format!("{here}[{i}]")))
                        .collect::<Result<Vec<_>, _>>()?;
                    if k == "all" {
                        Predicate::All(list)
                    } else {
                        Predicate::Any(list)
                    }
                }
                "not" => Predicate::Not(Box::new(Predicate::parse(sub, &here)?)),
                field => Predicate::parse_field(field, sub, &here)?,
            };
            parts.push(p);
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Predicate::All(parts)
        })
    }

    fn parse_field(field: &str, ops: &Value, at: &str) -> Result<Predicate, String> {
        let path: Vec<String> = field.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{at}: empty segment in field path"));
        }
        let ops = ops
            .as_object()
            .ok_or_else(|| format!("{at}: expected an object of operators ({OPS})"))?;
        if ops.is_empty() {
            return Err(format!("{at}: no operator given ({OPS})"));
        }
        let mut parts = Vec::new();
        for (name, arg) in ops {
            let here = format!("{at}.{name}");
            let op = match name.as_str() {
                "eq" => Op::Eq(arg.clone()),
                "ne" => Op::Ne(arg.clone()),
                "gt" | "gte" | "lt" | "lte" => {
                    if !(arg.is_number() || arg.is_string()) {
                        return Err(format!("{here}: expected a number or a string"));
                    }
                    match name.as_str() {
                        "gt" => Op::Gt(arg.clone()),
                        "gte" => Op::Gte(arg.clone()),
                        "lt" => Op::Lt(arg.clone()),
                        _ => Op::Lte(arg.clone()),
                    }
                }
                "in" => Op::In(
                    arg.as_array()
                        .ok_or_else(|| format!("{here}: expected an array"))?
                        .clone(),
                ),
                "contains" => Op::Contains(arg.clone()),
                "exists" => Op::Exists(
                    arg.as_bool()
                        .ok_or_else(|| format!("{here}: expected true or false"))?,
                ),
                other => {
                    return Err(format!(
                        "{at}: unknown operator `{other}`, expected one of {OPS}"
                    ))
                }
            };
            parts.push(Predicate::Field {
                path: path.clone(),
                op,
            });
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Predicate::All(parts)
        })
    }

    /// Why `doc` does not match, naming the first condition that failed
    /// (`tier: wanted ne "blocked"`, `country missing, wanted eq "DE"`);
    /// None when it matches. The document's value is left out: reasons are
    /// stored and shown, and a profile holds personal data.
    pub fn why_not(&self, doc: &Value) -> Option<String> {
        match self {
            Predicate::All(ps) => ps.iter().find_map(|p| p.why_not(doc)),
            Predicate::Any(ps) => {
                let all: Option<Vec<String>> = ps.iter().map(|p| p.why_not(doc)).collect();
                all.map(|w| format!("none of: {}", w.join("; ")))
            }
            Predicate::Not(p) => p
                .matches(doc)
                .then(|| format!("not ({}) matched", p.describe())),
            Predicate::Field { path, op } => {
                let v = lookup(doc, path);
                (!op.test(v)).then(|| match v {
                    None => format!("{} missing, wanted {}", path.join("."), op.describe()),
                    Some(_) => format!("{}: wanted {}", path.join("."), op.describe()),
                })
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Predicate::All(ps) => ps
                .iter()
                .map(Predicate::describe)
                .collect::<Vec<_>>()
                .join(" and "),
            Predicate::Any(ps) => ps
                .iter()
                .map(Predicate::describe)
                .collect::<Vec<_>>()
                .join(" or "),
            Predicate::Not(p) => format!("not ({})", p.describe()),
            Predicate::Field { path, op } => format!("{} {}", path.join("."), op.describe()),
        }
    }

    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Predicate::All(ps) => ps.iter().all(|p| p.matches(doc)),
            Predicate::Any(ps) => ps.iter().any(|p| p.matches(doc)),
            Predicate::Not(p) => !p.matches(doc),
            Predicate::Field { path, op } => op.test(lookup(doc, path)),
        }
    }
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Eq(v) => format!("eq {v}"),
            Op::Ne(v) => format!("ne {v}"),
            Op::Gt(v) => format!("gt {v}"),
            Op::Gte(v) => format!("gte {v}"),
            Op::Lt(v) => format!("lt {v}"),
            Op::Lte(v) => format!("lte {v}"),
            Op::In(v) => format!("in {}", Value::Array(v.clone())),
            Op::Contains(v) => format!("contains {v}"),
            Op::Exists(b) => format!("exists {b}"),
        }
    }
}

/// Follows a dotted path; `None` when any step is missing.
pub fn lookup<'a, S: AsRef<str>>(doc: &'a Value, path: &[S]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(seg.as_ref())?,
            Value::Array(a) => a.get(seg.as_ref().parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Equality that treats 20 and 20.0 as the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Op {
    fn test(&self, v: Option<&Value>) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Exists(want) => v.is_some_and(|v| !v.is_null()) == *want,
            Op::Ne(x) => !v.is_some_and(|v| same(v, x)),
            _ => {
                let Some(v) = v else { return false };
                match self {
                    Op::Eq(x) => same(v, x),
                    Op::Gt(x) => order(v, x) == Some(Greater),
                    Op::Gte(x) => matches!(order(v, x), Some(Greater | Equal)),
                    Op::Lt(x) => order(v, x) == Some(Less),
                    Op::Lte(x) => matches!(order(v, x), Some(Less | Equal)),
                    Op::In(xs) => xs.iter().any(|x| same(v, x)),
                    Op::Contains(x) => match (v, x) {
                        (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
                        (Value::Array(items), x) => items.iter().any(|i| same(i, x)),
                        _ => false,
                    },
                    Op::Ne(_) | Op::Exists(_) => unreachable!("handled above"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Predicate {
        Predicate::parse(&v, "where").unwrap()
    }

    #[test]
    fn why_not_names_the_field_that_failed() {
        let doc = json!({"tier": "blocked", "age": 30});
        let q = p(json!({"age": {"gte": 18}, "tier": {"ne": "blocked"}}));
        assert_eq!(q.why_not(&doc).unwrap(), r#"tier: wanted ne "blocked""#);
        assert_eq!(
            p(json!({"country": {"eq": "DE"}})).why_not(&doc).unwrap(),
            r#"country missing, wanted eq "DE""#
        );
        assert!(p(json!({"age": {"gt": 1}})).why_not(&doc).is_none());
        let any = p(json!({"any": [{"age": {"lt": 18}}, {"tier": {"eq": "gold"}}]}));
        assert!(any
            .why_not(&doc)
            .unwrap()
            .starts_with("none of: age: wanted lt 18"));
        // the profile's values stay out of the reason
        let mail = p(json!({"email": {"contains": "@corp.com"}}));
        let why = mail
            .why_not(&json!({"email": "alice@private.example"}))
            .unwrap();
        assert!(!why.contains("alice"), "{why}");
        let not = p(json!({"not": {"age": {"gt": 1}}}));
        assert_eq!(not.why_not(&doc).unwrap(), "not (age gt 1) matched");
        for (q, d) in [(q, &doc), (any, &json!({"age": 3}))] {
            assert_eq!(q.why_not(d).is_none(), q.matches(d));
        }
    }

    #[test]
    fn comparisons() {
        let doc = json!({"value": 25, "cat": "shoes", "tags": ["sale"], "a": {"b": 1.0}});
        assert!(p(json!({"value": {"gte": 20}})).matches(&doc));
        assert!(!p(json!({"value": {"gt": 25}})).matches(&doc));
        assert!(p(json!({"value": {"lte": 25, "gt": 24}})).matches(&doc));
        assert!(p(json!({"cat": {"in": ["shoes", "hats"]}})).matches(&doc));
        assert!(p(json!({"cat": {"contains": "hoe"}})).matches(&doc));
        assert!(p(json!({"tags": {"contains": "sale"}})).matches(&doc));
        assert!(p(json!({"a.b": {"eq": 1}})).matches(&doc));
        assert!(p(json!({"missing": {"exists": false}})).matches(&doc));
        assert!(p(json!({"missing": {"ne": 3}})).matches(&doc));
        assert!(!p(json!({"missing": {"eq": 3}})).matches(&doc));
        assert!(
            !p(json!({"cat": {"gt": 3}})).matches(&doc),
            "mismatched types never compare"
        );
    }

    #[test]
    fn combinators() {
        let doc = json!({"x": 1, "y": 2});
        assert!(p(json!({"any": [{"x": {"eq": 5}}, {"y": {"eq": 2}}]})).matches(&doc));
        assert!(!p(json!({"all": [{"x": {"eq": 5}}, {"y": {"eq": 2}}]})).matches(&doc));
        assert!(p(json!({"not": {"x": {"eq": 5}}})).matches(&doc));
    }

    #[test]
    fn errors_name_the_path() {
        let e = Predicate::parse(&json!({"any": [{"x": {"gte": [1]}}]}), "on.where").unwrap_err();
        assert_eq!(e, "on.where.any[0].x.gte: expected a number or a string");
        let e = Predicate::parse(&json!({"x": {"like": 1}}), "on.where").unwrap_err();
        assert!(e.starts_with("on.where.x: unknown operator `like`"), "{e}");
        assert!(Predicate::parse(&json!([1]), "w").is_err());
    }
}
