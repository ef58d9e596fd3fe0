//! A tokenizer for Metal Shading Language (C++-shaped) source, for the translator.
//!
//! Every byte of the input belongs to exactly one token, so concatenating the tokens gives
//! the source back; the translator replaces some tokens and keeps all others (whitespace,
//! comments, string literals, preprocessor lines) as they are, which keeps line numbers.

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Spaces, tabs and newlines.
    Space,
    /// `// ...` or `/* ... */`.
    Comment,
    /// A whole preprocessor line (`#...` up to an unescaped newline, which it excludes).
    Directive,
    /// An identifier or keyword.
    Ident,
    /// A preprocessing number (`1`, `0x1F`, `1.5e-3f`, `2u`).
    Number,
    /// A string or character literal.
    Literal,
    /// An operator or punctuator (`::`, `->`, `+=`, `[`, ...).
    Punct,
}

/// One token: its kind, text and the 1-based line it starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token<'a> {
    pub(crate) kind: Kind,
    pub(crate) text: &'a str,
    pub(crate) line: usize,
}

impl Token<'_> {
    /// True for spaces and comments, which carry no meaning for the translator.
    pub(crate) fn is_trivia(&self) -> bool {
        matches!(self.kind, Kind::Space | Kind::Comment)
    }

    /// True if this is the punctuator `p`.
    pub(crate) fn is_punct(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }

    /// True if this is the identifier `name`.
    pub(crate) fn is_ident(&self, name: &str) -> bool {
        self.kind == Kind::Ident && self.text == name
    }
}

/// Three- and two-character punctuators, longest first.
const PUNCTS: [&str; 24] = [
    "<<=", ">>=", "...", "->", "::", "++", "--", "<<", ">>", "<=", ">=", "==", "!=", "&&", "||",
    "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "##",
];

/// Splits `src` into tokens, with lines counted from `first_line`.
pub(crate) fn tokenize(src: &str, first_line: usize) -> Vec<Token<'_>> {
    let bytes = src.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut line = first_line;
    // True while only whitespace has been seen since the last newline: a `#` there starts
    // a directive.
    let mut line_start = true;
    while i < bytes.len() {
        let start = i;
        let c = bytes[i];
        let kind = if c == b' ' || c == b'\t' || c == b'\r' || c == b'\n' || c == 0x0c {
            while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\r' | b'\n' | 0x0c) {
                i += 1;
            }
            Kind::Space
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            Kind::Comment
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(bytes.len());
            Kind::Comment
        } else if c == b'#' && line_start {
            while i < bytes.len() && bytes[i] != b'\n' {
                if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'\n') {
                    i += 2;
                } else if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'\r') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            i = i.min(bytes.len());
            Kind::Directive
        } else if c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 {
            while i < bytes.len()
                && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric() || bytes[i] >= 0x80)
            {
                i += 1;
            }
            Kind::Ident
        } else if c.is_ascii_digit()
            || (c == b'.' && bytes.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            i += 1;
            while i < bytes.len() {
                let d = bytes[i];
                if matches!(d, b'e' | b'E' | b'p' | b'P')
                    && matches!(bytes.get(i + 1), Some(b'+') | Some(b'-'))
                {
                    i += 2;
                } else if d.is_ascii_alphanumeric()
                    || d == b'.'
                    || d == b'_'
                    || (d == b'\'' && bytes.get(i + 1).is_some_and(|x| x.is_ascii_alphanumeric()))
                {
                    // Digits, suffixes and C++14 digit separators (`1'000`).
                    i += 1;
                } else {
                    break;
                }
            }
            Kind::Number
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != c && bytes[i] != b'\n' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            Kind::Literal
        } else {
            let rest = &src[i..];
            let len = PUNCTS.iter().find(|p| rest.starts_with(*p)).map_or_else(
                || rest.chars().next().map_or(1, char::len_utf8),
                |p| p.len(),
            );
            i += len;
            Kind::Punct
        };
        // Multi-byte characters only appear inside identifiers, literals, comments or as a
        // single punctuator, so `i` is always on a character boundary here.
        let text = &src[start..i];
        tokens.push(Token { kind, text, line });
        let newlines = text.bytes().filter(|&b| b == b'\n').count();
        line += newlines;
        line_start = match kind {
            Kind::Space => line_start || newlines > 0,
            Kind::Comment => line_start && newlines == 0 || text.ends_with('\n'),
            _ => false,
        };
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<(Kind, &str)> {
        tokenize(src, 1)
            .into_iter()
            .filter(|t| t.kind != Kind::Space)
            .map(|t| (t.kind, t.text))
            .collect()
    }

    #[test]
    fn tokens_cover_the_source_exactly() {
        let src = "#include <x>\n  a->b += 1.5e-3f; // c\n/* d\n e */ \"s\\\"t\" 'c' x::y >>= 0x1Fu;\n#define M(a) \\\n  a\n";
        let toks = tokenize(src, 1);
        let joined: String = toks.iter().map(|t| t.text).collect();
        assert_eq!(joined, src);
    }

    #[test]
    fn kinds_and_lines() {
        let src = "uint e = thread_position_in_grid.x;\n  #if defined(X)\nout[e] = 1.0f;";
        let toks = tokenize(src, 1);
        let dir = toks.iter().find(|t| t.kind == Kind::Directive).unwrap();
        assert_eq!(dir.text, "#if defined(X)");
        assert_eq!(dir.line, 2);
        let num = toks.iter().find(|t| t.text == "1.0f").unwrap();
        assert_eq!((num.kind, num.line), (Kind::Number, 3));
        assert_eq!(
            kinds("a.xy->z::w"),
            vec![
                (Kind::Ident, "a"),
                (Kind::Punct, "."),
                (Kind::Ident, "xy"),
                (Kind::Punct, "->"),
                (Kind::Ident, "z"),
                (Kind::Punct, "::"),
                (Kind::Ident, "w"),
            ]
        );
    }

    #[test]
    fn numbers_keep_exponents_and_suffixes() {
        assert_eq!(
            kinds("1e+5 .5 2.f 0x1p-3 7u 1.0h"),
            vec![
                (Kind::Number, "1e+5"),
                (Kind::Number, ".5"),
                (Kind::Number, "2.f"),
                (Kind::Number, "0x1p-3"),
                (Kind::Number, "7u"),
                (Kind::Number, "1.0h"),
            ]
        );
    }

    #[test]
    fn hash_inside_a_line_is_not_a_directive() {
        let toks = kinds("a # b\n# pragma once");
        assert_eq!(toks[1], (Kind::Punct, "#"));
        assert_eq!(toks[3], (Kind::Directive, "# pragma once"));
    }

    #[test]
    fn directives_continue_over_escaped_newlines() {
        let toks = tokenize("#define A \\\n  1\nint x;", 1);
        assert_eq!(toks[0].text, "#define A \\\n  1");
        let x = toks.iter().find(|t| t.text == "x").unwrap();
        assert_eq!(x.line, 3);
    }
}
