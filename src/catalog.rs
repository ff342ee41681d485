//! Reads trigger definitions and templates. Definitions are small and read
//! once per batch, so nothing is cached across statements: a redefinition is
//! seen by the very next statement, in every backend.

use crate::spi_util::or_raise;
use nudge_core::definition::{Definition, Trigger};
use nudge_core::render::Template;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use std::collections::HashMap;

pub struct LiveTrigger {
    pub trigger: Trigger,
    pub active: bool,
}

/// The current version of every trigger (active or paused).
pub fn live_triggers(c: &SpiClient<'_>) -> Vec<LiveTrigger> {
    let rows = or_raise(
        c.select(
            "SELECT t.name, t.version, t.status = 'active', v.definition
               FROM nudge.triggers t
               JOIN nudge.trigger_versions v ON v.trigger = t.name AND v.version = t.version
              ORDER BY t.name",
            None,
            &[],
        ),
        "reading triggers",
    );
    let mut out = Vec::new();
    for row in rows {
        let name: String = row.get(1).ok().flatten().unwrap_or_default();
        let version: i32 = row.get(2).ok().flatten().unwrap_or_default();
        let active: bool = row.get(3).ok().flatten().unwrap_or(false);
        let def: Option<JsonB> = row.get(4).ok().flatten();
        // Definitions are validated when defined; one that no longer compiles
        // (an older build's format) is skipped, never allowed to stop the rest.
        match def
            .ok_or("no definition".to_string())
            .and_then(|d| compile(&name, version, &d.0))
        {
            Ok(trigger) => out.push(LiveTrigger { trigger, active }),
            Err(e) => warning!("pg_nudge: trigger {name} v{version} skipped: {e}"),
        }
    }
    out
}

pub fn compile(name: &str, version: i32, def: &serde_json::Value) -> Result<Trigger, String> {
    Definition::parse(def)?.compile(name, version)
}

/// The named templates, parsed. A template that fails to parse is reported
/// per name so that only the messages using it fail.
pub fn templates(
    c: &SpiClient<'_>,
    names: Vec<String>,
) -> HashMap<String, Result<Template, String>> {
    let rows = or_raise(
        c.select(
            "SELECT name, subject, html, text_body FROM nudge.templates WHERE name = ANY($1)",
            None,
            &[names.into()],
        ),
        "reading templates",
    );
    let mut out = HashMap::new();
    for row in rows {
        let name: String = row.get(1).ok().flatten().unwrap_or_default();
        let subject: String = row.get(2).ok().flatten().unwrap_or_default();
        let html: String = row.get(3).ok().flatten().unwrap_or_default();
        let text: Option<String> = row.get(4).ok().flatten();
        out.insert(name, Template::parse(&subject, &html, text.as_deref()));
    }
    out
}
