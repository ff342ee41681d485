//! Automatic winners (`optimize`): which variant new entries go to, and the
//! periodic check that picks one. Every change of allocation is a row of
//! `nudge.allocations`, so the history of an experiment can be read back.

use crate::spi_util::{or_raise, run};
use nudge_core::definition::Trigger;
use nudge_core::experiment::{winner, ArmStats};
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use std::collections::HashMap;

/// The current winner of each of these triggers' experiments, if any.
pub fn winners(c: &SpiClient<'_>, triggers: Vec<&Trigger>) -> HashMap<String, String> {
    if triggers.is_empty() {
        return HashMap::new();
    }
    let (names, experiments): (Vec<String>, Vec<String>) = triggers
        .iter()
        .map(|t| (t.name.clone(), t.experiment.clone()))
        .unzip();
    run(c, "SELECT DISTINCT ON (a.trigger) a.trigger, a.winner
               FROM nudge.allocations a
               JOIN unnest($1::text[], $2::text[]) AS x(trigger, experiment) USING (trigger, experiment)
              ORDER BY a.trigger, a.at DESC", &[names.into(), experiments.into()], "reading experiment winners")
    .filter_map(|r| Some((r.get::<String>(1).ok().flatten()?, r.get::<String>(2).ok().flatten()?)))
    .collect()
}

/// Checks every active trigger that optimizes and has no winner yet; records
/// the winners it finds. Returns (trigger, winner) of the new allocations.
pub fn evaluate(c: &mut SpiClient<'_>) -> Vec<(String, String)> {
    let triggers: Vec<Trigger> = crate::catalog::live_triggers(c)
        .triggers
        .iter()
        .filter(|l| l.active && l.trigger.optimize.is_some())
        .map(|l| l.trigger.clone())
        .collect();
    let decided = winners(c, triggers.iter().collect());
    let mut changes = vec![];
    for t in triggers.iter().filter(|t| !decided.contains_key(&t.name)) {
        let o = t.optimize.as_ref().expect("filtered on optimize");
        let column = match o.metric.as_str() {
            "opened" => "opened",
            "clicked" => "clicked",
            _ => "converted",
        };
        let names: Vec<String> = t.arms.iter().map(|a| a.name.clone()).collect();
        let arms: Vec<ArmStats> = or_raise(
            c.select(
                // over a journey's steps: each arm's messages, and what they did
                &format!("SELECT arm, sum(sent)::bigint, sum({column})::bigint FROM nudge.trigger_stats()
                           WHERE trigger = $1 AND arm = ANY ($2) GROUP BY arm"),
                None,
                &[t.name.clone().into(), names.clone().into()],
            ),
            "measuring experiment arms",
        )
        .map(|r| ArmStats {
            name: r.get::<String>(1).ok().flatten().unwrap_or_default(),
            sent: r.get::<i64>(2).ok().flatten().unwrap_or(0).max(0) as u64,
            hits: r.get::<i64>(3).ok().flatten().unwrap_or(0).max(0) as u64,
        })
        .collect();
        // an arm with no message yet has no row: it has no evidence either
        if arms.len() < names.len() {
            continue;
        }
        let Some(best) = winner(&arms, o.min_per_arm, o.alpha) else {
            continue;
        };
        let evidence = serde_json::json!({
            "metric": o.metric,
            "min_per_arm": o.min_per_arm,
            "alpha": o.alpha,
            "arms": arms.iter().map(|a| serde_json::json!({"arm": a.name, "sent": a.sent, o.metric.clone(): a.hits})).collect::<Vec<_>>(),
        });
        run(c, "INSERT INTO nudge.allocations (trigger, experiment, winner, evidence) VALUES ($1, $2, $3, $4)", &[t.name.clone().into(), t.experiment.clone().into(), best.name.clone().into(), JsonB(evidence).into()], "recording the winner");
        changes.push((t.name.clone(), best.name.clone()));
    }
    changes
}
