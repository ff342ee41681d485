//! Scanning a part's source: where the html part's outputs are, and the
//! parse-time limits.
//!
//! The scanner splits the source into elements exactly as liquid's grammar
//! does (liquid-core's grammar.pest, a PEG: `{{ }}` outputs, `{% %}` tags and
//! the text between them, with the same lookaheads, literals and implicit
//! whitespace), so that it finds the same `{{ }}` outputs and the same
//! `{% raw %}` blocks as the parser that runs after it. Appending
//! ` | escape_once` to a valid filter chain keeps it valid, and the text is
//! inserted on the chain's own line, so line numbers in later errors do not
//! move.

use super::grammar::Scanner;
use super::parse_limits::{check_blank_work, check_output, check_tag, too_deep_message, Nesting};

/// What scanning a part's source found.
pub(super) struct Scan {
    /// The end of the filter chain of every `{{ }}` outside `{% raw %}` whose
    /// chain does not name `raw`, in order: where ` | escape_once` goes.
    pub(super) outputs: Vec<usize>,
}

pub(super) struct ScanError {
    pub(super) line: usize,
    pub(super) message: String,
}

/// Scans a part: finds its outputs and enforces the parse-time limits.
pub(super) fn scan(source: &str) -> Result<Scan, ScanError> {
    let s = source.as_bytes();
    let line = |at: usize| 1 + s[..at.min(s.len())].iter().filter(|&&b| b == b'\n').count();
    let error = |at: usize, message: String| ScanError {
        line: line(at),
        message,
    };

    check_blank_work(s).map_err(|(at, message)| error(at, message))?;

    let mut scanner = Scanner { s, too_deep: None };
    let too_deep = |at: usize| error(at, too_deep_message());
    let mut outputs = Vec::new();
    let mut in_raw = false;
    let mut nesting = Nesting::default();
    let mut p = 0;
    while p < s.len() {
        if let Some(output) = scanner.expression(p) {
            if let Some(at) = scanner.too_deep {
                return Err(too_deep(at));
            }
            if !in_raw {
                check_output(&output.chain).map_err(|message| error(p, message))?;
                if !output.chain.raw {
                    outputs.push(output.chain.end);
                }
            }
            p = output.end;
            continue;
        }
        if let Some(at) = scanner.too_deep {
            return Err(too_deep(at));
        }
        if let Some(tag) = scanner.tag(p) {
            if let Some(at) = scanner.too_deep {
                return Err(too_deep(at));
            }
            if in_raw {
                in_raw = !(tag.name == "endraw" && tag.tokens == 0);
            } else {
                check_tag(&tag).map_err(|message| error(p, message))?;
                if tag.name == "raw" && tag.tokens == 0 {
                    in_raw = true;
                } else {
                    nesting.tag(tag.name).map_err(|message| error(p, message))?;
                }
            }
            p = tag.end;
            continue;
        }
        if let Some(at) = scanner.too_deep {
            return Err(too_deep(at));
        }
        let q = scanner.text_end(p);
        // not an element: liquid takes one character as invalid liquid
        p = if q > p { q } else { p + 1 };
    }
    Ok(Scan { outputs })
}
