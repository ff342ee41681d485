//! After the drain: what was owed (one message per committed event), what
//! the outbox holds, what the SMTP server received; the checks.

use crate::cluster::Cluster;
use crate::faults::{Fault, Injected};
use crate::mailers::Tally;
use crate::producers::{connect_retrying, Kind, Outcome};
use nudge_integration::{outbox_uniqueness, SmtpServer};
use std::collections::{BTreeMap, HashMap, HashSet};

struct OutboxRow {
    id: i64,
    user_id: String,
    status: String,
}

struct Enrollment {
    state: String,
    reason: String,
    /// waiting and due more than a minute ago
    stuck: bool,
}

pub struct Report {
    outcomes_line: String,
    expected: HashSet<String>,
    /// message_key -> its row
    outbox: HashMap<String, OutboxRow>,
    /// user -> enrollments (several only if something went wrong)
    enrollments: HashMap<String, Vec<Enrollment>>,
    /// Message-ID's key -> deliveries
    received: HashMap<String, usize>,
    deliveries: usize,
    uniqueness: (i64, i64, i64),
    injected: Injected,
    tally: Tally,
    worker_errors: i64,
    crashes_logged: usize,
}

pub fn collect(
    dsn: &str,
    smtp: &SmtpServer,
    outcomes: &[Outcome],
    injected: Injected,
    tally: Tally,
    cluster: &Cluster,
) -> Report {
    let mut c = connect_retrying(dsn);
    let outbox = c
        .query(
            "SELECT message_key, id, user_id, status FROM nudge.outbox",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let row = OutboxRow {
                id: r.get(1),
                user_id: r.get(2),
                status: r.get(3),
            };
            (r.get(0), row)
        })
        .collect();
    let mut enrollments: HashMap<String, Vec<Enrollment>> = HashMap::new();
    for r in c
        .query(
            "SELECT user_id, state, coalesce(reason, ''),
                    state = 'waiting' AND due_at < now() - interval '1 minute'
               FROM nudge.enrollments",
            &[],
        )
        .unwrap()
    {
        enrollments.entry(r.get(0)).or_default().push(Enrollment {
            state: r.get(1),
            reason: r.get(2),
            stuck: r.get(3),
        });
    }
    let ids = smtp.message_ids();
    let mut received: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let key = id.trim_start_matches('<').trim_end_matches("@pg_nudge>");
        *received.entry(key.to_string()).or_default() += 1;
    }
    let worker_errors = c
        .query_one("SELECT errors FROM nudge.worker_status()", &[])
        .unwrap()
        .get(0);
    Report {
        outcomes_line: outcomes_line(outcomes),
        expected: outcomes
            .iter()
            .flat_map(|o| o.committed.iter().cloned())
            .collect(),
        outbox,
        enrollments,
        received,
        deliveries: ids.len(),
        uniqueness: outbox_uniqueness(&mut c),
        injected,
        tally,
        worker_errors,
        crashes_logged: cluster.log_lines("terminated by signal 9").len(),
    }
}

fn outcomes_line(outcomes: &[Outcome]) -> String {
    let n = |k: Kind| {
        outcomes
            .iter()
            .filter(|o| o.kind == k)
            .map(|o| o.committed.len())
            .sum::<usize>()
    };
    let sum = |f: fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    format!(
        "{} (orders {}, track {}); {} rolled back; {} COMMITs unanswered, {} of them had committed",
        n(Kind::Order) + n(Kind::Track),
        n(Kind::Order),
        n(Kind::Track),
        sum(|o| o.failed),
        sum(|o| o.unknown_total),
        sum(|o| o.unknown_committed),
    )
}

/// "n × what" lines, most frequent first.
fn tally_of<'a>(items: impl Iterator<Item = String> + 'a) -> Vec<String> {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for i in items {
        *m.entry(i).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.into_iter()
        .map(|(what, n)| format!("{n} × {what}"))
        .collect()
}

fn short(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 110 {
        format!("{}…", s.chars().take(110).collect::<String>())
    } else {
        s
    }
}

impl Report {
    /// Why an expected user's message never arrived.
    fn lost_cause(&self, user: &str) -> String {
        let row = self.outbox.values().find(|r| r.user_id == user);
        match (row, self.enrollments.get(user)) {
            (Some(r), _) => format!("outbox {}, never received", r.status),
            (None, None) => "no enrollment".into(),
            (None, Some(es)) => es
                .iter()
                .map(|e| short(&format!("enrollment {}: {}", e.state, e.reason)))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// Prints the figures and the checks; true when every check passes.
    pub fn print(&self) -> bool {
        let delivered: HashSet<&str> = self
            .received
            .keys()
            .filter_map(|k| self.outbox.get(k).map(|r| r.user_id.as_str()))
            .collect();
        let mut lost: Vec<&String> = self
            .expected
            .iter()
            .filter(|u| !delivered.contains(u.as_str()))
            .collect();
        lost.sort();
        let unexpected: Vec<String> = self
            .received
            .keys()
            .filter(|k| {
                self.outbox
                    .get(*k)
                    .is_none_or(|r| !self.expected.contains(&r.user_id))
            })
            .cloned()
            .collect();
        let (mut dup_in_flight, mut dup_other) = (vec![], vec![]);
        for (key, n) in self.received.iter().filter(|(_, n)| **n > 1) {
            let fault = self
                .outbox
                .get(key)
                .and_then(|r| self.injected.in_flight.get(&r.id));
            match fault {
                Some(f) => dup_in_flight.push((*f, n - 1)),
                None => dup_other.push((key.clone(), n - 1)),
            }
        }
        let stuck_waiting = self
            .enrollments
            .values()
            .flatten()
            .filter(|e| e.stuck)
            .count();
        let unsent: Vec<String> = self
            .outbox
            .values()
            .filter(|r| r.status != "sent")
            .map(|r| r.status.clone())
            .collect();

        println!("events committed     {}", self.outcomes_line);
        println!("expected messages    {}", self.expected.len());
        println!(
            "outbox rows          {} ({})",
            self.outbox.len(),
            tally_of(self.outbox.values().map(|r| r.status.clone())).join(", ")
        );
        let states = self.enrollments.values().flatten();
        println!(
            "enrollments          {}",
            tally_of(states.map(|e| e.state.clone())).join(", ")
        );
        let not_sent = self
            .enrollments
            .values()
            .flatten()
            .filter(|e| e.state != "sent");
        for line in tally_of(not_sent.map(|e| short(&format!("{}: {}", e.state, e.reason)))) {
            println!("  {line}");
        }
        println!(
            "SMTP received        {} deliveries, {} distinct Message-IDs",
            self.deliveries,
            self.received.len()
        );
        let faults: Vec<String> = self
            .injected
            .counts
            .iter()
            .map(|(f, n)| format!("{} {n}", f.name()))
            .collect();
        let skipped: Vec<String> = self
            .injected
            .skipped
            .iter()
            .map(|(f, n)| format!("{} {n}", f.name()))
            .collect();
        println!(
            "faults injected      {}{}",
            faults.join(", "),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" (skipped: {})", skipped.join(", "))
            }
        );
        println!(
            "in flight at faults  {} messages",
            self.injected.in_flight.len()
        );
        println!(
            "mailers              {} started, {} killed, {} exited on their own (lost connection)",
            self.tally.started, self.tally.killed, self.tally.exits_on_their_own
        );
        println!(
            "worker               {} batch errors (worker_status), {} processes killed by signal 9 (server log)",
            self.worker_errors, self.crashes_logged
        );

        let mut ok = true;
        let mut check = |name: &str, n: usize, detail: Vec<String>, must_be_zero: bool| {
            let pass = !must_be_zero || n == 0;
            ok &= pass;
            let verdict = if !must_be_zero {
                "info"
            } else if pass {
                "ok"
            } else {
                "FAIL"
            };
            println!("CHECK {name:<28} {n:>6}  {verdict}");
            for d in detail.iter().take(8) {
                println!("        {d}");
            }
        };
        check(
            "lost",
            lost.len(),
            tally_of(lost.iter().map(|u| self.lost_cause(u))),
            true,
        );
        let samples: Vec<String> = lost.iter().take(5).map(|u| u.to_string()).collect();
        if !samples.is_empty() {
            println!("        e.g. users {}", samples.join(", "));
        }
        check(
            "duplicates, in flight",
            dup_in_flight.iter().map(|d| d.1).sum(),
            tally_of(
                dup_in_flight
                    .iter()
                    .map(|(f, _)| format!("in flight at {}", Fault::name(*f))),
            ),
            false,
        );
        check(
            "duplicates, other",
            dup_other.iter().map(|d| d.1).sum(),
            dup_other
                .iter()
                .map(|(k, n)| format!("{k}: {n} extra"))
                .collect(),
            true,
        );
        let (rows, keys, enrollments) = self.uniqueness;
        check(
            "outbox duplicates",
            (rows - keys.min(enrollments)) as usize,
            vec![format!(
                "rows {rows}, distinct keys {keys}, distinct enrollments {enrollments}"
            )],
            true,
        );
        check(
            "unexpected messages",
            unexpected.len(),
            unexpected.clone(),
            true,
        );
        check("stuck waiting enrollments", stuck_waiting, vec![], true);
        check(
            "outbox rows not sent",
            unsent.len(),
            tally_of(unsent.into_iter()),
            true,
        );
        ok
    }
}
