//! A scanner that matches a part's source the way liquid's grammar does
//! (liquid-core's grammar.pest; each method quotes the rule it follows).

use super::MAX_NESTING;

/// liquid's WHITESPACE: a space or a newline (not a tab).
pub(super) fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r')
}

/// A filter chain the scanner matched.
pub(super) struct Chain {
    /// Just after its last value, filter name or argument.
    pub(super) end: usize,
    pub(super) filters: usize,
    pub(super) raw: bool,
}

/// A `{{ }}` the scanner matched.
pub(super) struct Output {
    pub(super) end: usize,
    pub(super) chain: Chain,
}

/// A `{% %}` the scanner matched.
pub(super) struct TagMatch<'s> {
    pub(super) end: usize,
    pub(super) name: &'s str,
    pub(super) tokens: usize,
    pub(super) conditions: usize,
    pub(super) most_filters: usize,
}

pub(super) struct Scanner<'s> {
    pub(super) s: &'s [u8],
    /// Where a variable's `[ ]` indexes went deeper than [`MAX_NESTING`]
    /// (liquid's parser recurses per level).
    pub(super) too_deep: Option<usize>,
}

impl<'s> Scanner<'s> {
    fn byte(&self, p: usize) -> Option<u8> {
        self.s.get(p).copied()
    }

    fn at(&self, p: usize, text: &str) -> bool {
        self.s
            .get(p..)
            .is_some_and(|rest| rest.starts_with(text.as_bytes()))
    }

    /// After `WHITESPACE*` from `p`.
    fn blanks(&self, mut p: usize) -> usize {
        while self.byte(p).is_some_and(is_blank) {
            p += 1;
        }
        p
    }

    fn text(&self, from: usize, to: usize) -> &'s str {
        std::str::from_utf8(&self.s[from..to]).unwrap_or("")
    }

    // Identifier = @{ (ASCII_ALPHA | "_" | NON_WHITESPACE_CONTROL_HYPHEN)
    //                 ~ (ASCII_ALPHANUMERIC | "_" | NON_WHITESPACE_CONTROL_HYPHEN)* }
    fn ident_char(&self, p: usize, first: bool) -> bool {
        match self.byte(p) {
            Some(b) if b.is_ascii_alphabetic() || b == b'_' => true,
            Some(b) if b.is_ascii_digit() => !first,
            Some(b'-') => !self.at(p, "-}}") && !self.at(p, "-%}"),
            _ => false,
        }
    }

    fn identifier(&self, p: usize) -> Option<usize> {
        if !self.ident_char(p, true) {
            return None;
        }
        let mut q = p + 1;
        while self.ident_char(q, false) {
            q += 1;
        }
        Some(q)
    }

    fn digits(&self, mut p: usize) -> usize {
        while self.byte(p).is_some_and(|b| b.is_ascii_digit()) {
            p += 1;
        }
        p
    }

    // Literal = { NilLiteral | EmptyLiteral | BlankLiteral | StringLiteral
    //             | FloatLiteral | IntegerLiteral | BooleanLiteral }
    // (the keywords match as prefixes: `nilly` is `nil` then `ly`)
    fn literal(&self, p: usize) -> Option<usize> {
        for keyword in ["nil", "null", "empty", "blank", "true", "false"] {
            if self.at(p, keyword) {
                return Some(p + keyword.len());
            }
        }
        if let Some(quote @ (b'"' | b'\'')) = self.byte(p) {
            if let Some(i) = self.s[p + 1..].iter().position(|&b| b == quote) {
                return Some(p + 1 + i + 1);
            }
            return None;
        }
        let mut q = p;
        if matches!(self.byte(q), Some(b'+' | b'-')) {
            q += 1;
        }
        let int_end = self.digits(q);
        if int_end == q {
            return None;
        }
        if self.byte(int_end) == Some(b'.') {
            let frac_end = self.digits(int_end + 1);
            if frac_end > int_end + 1 {
                return Some(frac_end);
            }
        }
        Some(int_end)
    }

    // Value = { Literal | Variable }
    fn value(&mut self, p: usize, depth: usize) -> Option<usize> {
        self.literal(p).or_else(|| self.variable(p, depth))
    }

    // Variable = ${ Identifier ~ ( ("." ~ Identifier)
    //             | ("[" ~ WHITESPACE* ~ Value ~ WHITESPACE* ~ "]") )* }
    fn variable(&mut self, p: usize, depth: usize) -> Option<usize> {
        let mut q = self.identifier(p)?;
        loop {
            if self.byte(q) == Some(b'.') {
                if let Some(r) = self.identifier(q + 1) {
                    q = r;
                    continue;
                }
            }
            if self.byte(q) == Some(b'[') {
                if depth >= MAX_NESTING {
                    self.too_deep.get_or_insert(q);
                    return None;
                }
                let r = self.blanks(q + 1);
                if let Some(r) = self.value(r, depth + 1) {
                    let r = self.blanks(r);
                    if self.byte(r) == Some(b']') {
                        q = r + 1;
                        continue;
                    }
                }
            }
            return Some(q);
        }
    }

    // FilterChain = { Value ~ ("|" ~ Filter)* }, with implicit whitespace
    fn filter_chain(&mut self, p: usize) -> Option<Chain> {
        let mut chain = Chain {
            end: self.value(p, 0)?,
            filters: 0,
            raw: false,
        };
        loop {
            let r = self.blanks(chain.end);
            if self.byte(r) != Some(b'|') {
                break;
            }
            let r = self.blanks(r + 1);
            let Some((end, name)) = self.filter(r) else {
                break;
            };
            chain.end = end;
            chain.filters += 1;
            chain.raw |= name == "raw";
        }
        Some(chain)
    }

    // Filter = { Identifier ~ (":" ~ FilterArgument ~ ("," ~ FilterArgument)*)? }
    fn filter(&mut self, p: usize) -> Option<(usize, &'s str)> {
        let name_end = self.identifier(p)?;
        let mut end = name_end;
        let r = self.blanks(end);
        if self.byte(r) == Some(b':') {
            let r = self.blanks(r + 1);
            if let Some(a) = self.filter_argument(r) {
                end = a;
                loop {
                    let r = self.blanks(end);
                    if self.byte(r) == Some(b',') {
                        let r = self.blanks(r + 1);
                        if let Some(a) = self.filter_argument(r) {
                            end = a;
                            continue;
                        }
                    }
                    break;
                }
            }
        }
        Some((end, self.text(p, name_end)))
    }

    // FilterArgument = _{ KeywordFilterArgument | PositionalFilterArgument }
    // KeywordFilterArgument = { Identifier ~ ":" ~ Value }
    fn filter_argument(&mut self, p: usize) -> Option<usize> {
        if let Some(i) = self.identifier(p) {
            let r = self.blanks(i);
            if self.byte(r) == Some(b':') {
                let r = self.blanks(r + 1);
                if let Some(v) = self.value(r, 0) {
                    return Some(v);
                }
            }
        }
        self.value(p, 0)
    }

    // Range = { "(" ~ Value ~ ".." ~ Value ~ ")" }
    fn range(&mut self, p: usize) -> Option<usize> {
        if self.byte(p) != Some(b'(') {
            return None;
        }
        let r = self.blanks(p + 1);
        let r = self.value(r, 0)?;
        let r = self.blanks(r);
        if !self.at(r, "..") {
            return None;
        }
        let r = self.blanks(r + 2);
        let r = self.value(r, 0)?;
        let r = self.blanks(r);
        (self.byte(r) == Some(b')')).then_some(r + 1)
    }

    // Expression = { ExpressionStart ~ WHITESPACE* ~ ExpressionInner
    //                ~ WHITESPACE* ~ ExpressionEnd }
    // ExpressionStart = _{ (WHITESPACE* ~ "{{-") | "{{" }
    // ExpressionEnd = _{ ("-}}" ~ WHITESPACE*) | "}}" }
    pub(super) fn expression(&mut self, p: usize) -> Option<Output> {
        let b = self.blanks(p);
        let q = if self.at(b, "{{-") {
            b + 3
        } else if self.at(p, "{{") {
            p + 2
        } else {
            return None;
        };
        let q = self.blanks(q);
        let chain = self.filter_chain(q)?;
        let r = self.blanks(chain.end);
        let end = if self.at(r, "-}}") {
            self.blanks(r + 3)
        } else if self.at(r, "}}") {
            r + 2
        } else {
            return None;
        };
        Some(Output { end, chain })
    }

    // Tag = { TagStart ~ WHITESPACE* ~ TagInner ~ WHITESPACE* ~ TagEnd }
    // TagInner = !{ Identifier ~ TagToken* }
    // TagToken = _{ Range | FilterChain | DoubleCharSymbol | SingleCharSymbol }
    pub(super) fn tag(&mut self, p: usize) -> Option<TagMatch<'s>> {
        let b = self.blanks(p);
        let q = if self.at(b, "{%-") {
            b + 3
        } else if self.at(p, "{%") {
            p + 2
        } else {
            return None;
        };
        let q = self.blanks(q);
        let name_end = self.identifier(q)?;
        let mut tag = TagMatch {
            end: name_end,
            name: self.text(q, name_end),
            tokens: 0,
            conditions: 0,
            most_filters: 0,
        };
        loop {
            let r = self.blanks(tag.end);
            let end = if let Some(end) = self.range(r) {
                end
            } else if let Some(chain) = self.filter_chain(r) {
                if matches!(self.text(r, chain.end), "and" | "or") {
                    tag.conditions += 1;
                }
                tag.most_filters = tag.most_filters.max(chain.filters);
                chain.end
            } else if ["==", "!=", "<>", ">=", "<="].iter().any(|s| self.at(r, s)) {
                r + 2
            } else if matches!(self.byte(r), Some(b'>' | b'<' | b'=' | b',' | b':')) {
                r + 1
            } else {
                break;
            };
            tag.end = end;
            tag.tokens += 1;
        }
        let r = self.blanks(tag.end);
        tag.end = if self.at(r, "-%}") {
            self.blanks(r + 3)
        } else if self.at(r, "%}") {
            r + 2
        } else {
            return None;
        };
        Some(tag)
    }

    // Raw = @{ (!(TagStart | ExpressionStart) ~ ANY)+ }: where the text from
    // `p` ends (`p` itself if an element may start there).
    pub(super) fn text_end(&self, p: usize) -> usize {
        let mut q = p;
        while let Some(b) = self.byte(q) {
            if b == b'{' && (self.at(q, "{{") || self.at(q, "{%")) {
                break;
            }
            if is_blank(b) {
                // every blank of a run looks ahead to the same place
                let r = self.blanks(q);
                if self.at(r, "{{-") || self.at(r, "{%-") {
                    break;
                }
                q = r;
                continue;
            }
            q += 1;
        }
        q
    }
}
