//! The parse-time limits, which [`scan`](super::scan::scan) applies to a
//! part's source before liquid parses it, so that neither liquid's parser nor
//! its renderer can run for long or overflow the stack: [`MAX_BLANK_WORK`],
//! [`MAX_NESTING`], [`MAX_CONDITION_TERMS`] and [`MAX_FILTERS_PER_CHAIN`].

use super::grammar::{is_blank, Chain, TagMatch};
use super::{MAX_BLANK_WORK, MAX_CONDITION_TERMS, MAX_FILTERS_PER_CHAIN, MAX_NESTING};

/// Fails, with the offset at which the bound was passed, when the runs of
/// blanks of `s` add up to more than [`MAX_BLANK_WORK`].
pub(super) fn check_blank_work(s: &[u8]) -> Result<(), (usize, String)> {
    // liquid's parser looks ahead over a whole run of blanks at each of its
    // positions
    let mut work = 0u64;
    let mut run = 0u64;
    for (i, &b) in s.iter().chain(std::iter::once(&b'.')).enumerate() {
        if is_blank(b) {
            run += 1;
            continue;
        }
        work = work.saturating_add(run * run);
        run = 0;
        if work > MAX_BLANK_WORK {
            return Err((
                i,
                "too many consecutive spaces and blank lines for the template parser; \
                 shorten the runs of blank space"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The error when the scanner found a variable indexed deeper than
/// [`MAX_NESTING`].
pub(super) fn too_deep_message() -> String {
    format!("a variable is indexed more than {MAX_NESTING} levels deep")
}

/// Fails when a `{{ }}` output's filter chain is longer than
/// [`MAX_FILTERS_PER_CHAIN`].
pub(super) fn check_output(chain: &Chain) -> Result<(), String> {
    if chain.filters > MAX_FILTERS_PER_CHAIN {
        return Err(format!(
            "more than {MAX_FILTERS_PER_CHAIN} filters in one output"
        ));
    }
    Ok(())
}

/// Fails when a `{% %}` tag has a filter chain longer than
/// [`MAX_FILTERS_PER_CHAIN`] or more than [`MAX_CONDITION_TERMS`] `and`/`or`.
pub(super) fn check_tag(tag: &TagMatch<'_>) -> Result<(), String> {
    if tag.most_filters > MAX_FILTERS_PER_CHAIN {
        return Err(format!(
            "more than {MAX_FILTERS_PER_CHAIN} filters in one tag"
        ));
    }
    if tag.conditions > MAX_CONDITION_TERMS {
        return Err(format!(
            "more than {MAX_CONDITION_TERMS} `and`/`or` in one tag"
        ));
    }
    Ok(())
}

/// How deep the blocks open at some point of a part are nested; at most
/// [`MAX_NESTING`].
#[derive(Default)]
pub(super) struct Nesting {
    /// The open blocks, each with how many levels it holds (`elsif` adds one).
    blocks: Vec<usize>,
    depth: usize,
}

impl Nesting {
    /// Follows a tag outside `{% raw %}` (other than `{% raw %}` itself);
    /// fails when blocks are now nested more than [`MAX_NESTING`] deep.
    pub(super) fn tag(&mut self, name: &str) -> Result<(), String> {
        match name {
            "if" | "unless" | "case" | "for" | "tablerow" | "capture" | "comment" | "ifchanged" => {
                self.blocks.push(1);
                self.depth += 1;
            }
            "elsif" => {
                if let Some(levels) = self.blocks.last_mut() {
                    *levels += 1;
                    self.depth += 1;
                }
            }
            name if name.starts_with("end") => self.depth -= self.blocks.pop().unwrap_or(0),
            _ => {}
        }
        if self.depth > MAX_NESTING {
            return Err(format!(
                "blocks nested more than {MAX_NESTING} deep \
                 (each elsif counts as one more)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::render::Template;

    #[test]
    fn parse_time_limits() {
        let nested = |n: usize| "{% if x %}".repeat(n) + &"{% endif %}".repeat(n);
        assert!(Template::parse("s", &nested(10), None).is_ok());
        let e = Template::parse("s", &format!("\n{}", nested(60)), None)
            .err()
            .unwrap();
        assert!(
            e.starts_with("html: line 2: blocks nested more than 50 deep"),
            "{e}"
        );
        let elsifs = format!("{{% if a %}}{}{{% endif %}}", "{% elsif a %}".repeat(60));
        assert!(Template::parse("s", &elsifs, None).is_err());
        let ifs = "{% if a %}{% endif %}".repeat(1000);
        assert!(Template::parse("s", &ifs, None).is_ok());
        let index = format!("{{{{ {}x{} }}}}", "a[".repeat(60), "]".repeat(60));
        let e = Template::parse(&index, "x", None).err().unwrap();
        assert!(
            e.starts_with("subject: line 1: a variable is indexed more than 50"),
            "{e}"
        );
        let ands = format!("{{% if a{} %}}{{% endif %}}", " and a".repeat(200));
        let e = Template::parse("s", &ands, None).err().unwrap();
        assert!(e.contains("more than 100 `and`/`or`"), "{e}");
        let chain = format!("{{{{ a{} }}}}", " | append: a".repeat(40));
        let e = Template::parse("s", &chain, None).err().unwrap();
        assert!(e.contains("more than 30 filters"), "{e}");
        let blank = format!("a{}b", " ".repeat(5000));
        let e = Template::parse("s", &blank, None).err().unwrap();
        assert!(
            e.starts_with("html: line 1: too many consecutive spaces"),
            "{e}"
        );
        let indented = "  <p>\n    {{ x }}\n  </p>\n".repeat(2000);
        assert!(Template::parse("s", &indented, None).is_ok());
    }
}
