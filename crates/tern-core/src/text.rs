//! Showing untrusted text: every string that came from outside (an entry name, a device id,
//! a field of a document, a server's error message) is passed through [`shown`] before it
//! goes into an error, a log line, an audit row or a terminal.
//!
//! Two things can go wrong when such a string is echoed whole: its size (a 1 GiB "name"
//! becomes a 1 GiB error line, HTTP body or database row) and its content (escape
//! sequences that rewrite the operator's terminal, bidirectional-override characters that
//! make the text read differently from what it is). [`shown`] bounds the first and escapes
//! the second; the result is one line of printable text that names what it came from.

/// How many characters of an untrusted string are shown by default.
pub const SHOWN_CHARS: usize = 120;

/// Whether `c` is escaped: C0 and C1 controls, DEL, and the invisible characters that change
/// how text is displayed (bidirectional marks, overrides and isolates, zero-width and line or
/// paragraph separators, the soft hyphen, variation selectors, tag characters, interlinear
/// annotation marks, the byte-order mark).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
                | '\u{e0100}'..='\u{e01ef}'
        )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => {
            use std::fmt::Write;
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `s` with control and display-altering characters escaped (`\n`, `\u{1b}`), whole.
/// For text that is already bounded (a final error line); otherwise use [`shown`].
pub fn escaped(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// At most `max` characters of `s`, escaped as [`escaped`] does; a shortened string ends
/// with `…(N bytes)`, its whole length.
pub fn shown_max(s: &str, max: usize) -> String {
    cut(s, max, s.len())
}

fn cut(s: &str, max: usize, total: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len().min(max * 4 + 32));
    for (n, c) in s.chars().enumerate() {
        if n >= max {
            let _ = write!(out, "…({total} bytes)");
            return out;
        }
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    if total > s.len() {
        let _ = write!(out, "…({total} bytes)");
    }
    out
}

/// [`shown_max`] with [`SHOWN_CHARS`].
pub fn shown(s: &str) -> String {
    shown_max(s, SHOWN_CHARS)
}

/// Bytes that should be text (a tar entry name): valid UTF-8 is [`shown`]; other bytes
/// appear as `\xNN`.
pub fn shown_bytes(b: &[u8]) -> String {
    use std::fmt::Write;
    let head = &b[..b.len().min(SHOWN_CHARS * 4)];
    let mut text = String::new();
    for chunk in head.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    // The escapes of invalid bytes are themselves printable: only the text is cut.
    cut(&text, SHOWN_CHARS, b.len().max(text.len()))
}

/// An error and its causes on one line (`outer: inner: innermost`), shortened to `max`
/// characters and escaped: causes often quote what a file, a document or a peer said.
pub fn error_chain(e: &dyn std::error::Error, max: usize) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    shown_max(&s, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(
            shown("payloads/board-a/rootfs-1.2.0.img"),
            "payloads/board-a/rootfs-1.2.0.img"
        );
        assert_eq!(escaped("héllo wörld"), "héllo wörld");
    }

    #[test]
    fn controls_and_bidi_are_escaped() {
        assert_eq!(shown("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(shown("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(shown("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(shown("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
        assert_eq!(escaped("\u{feff}bom"), "\\u{feff}bom");
        assert_eq!(escaped("a\u{e0041}\u{ad}b"), "a\\u{e0041}\\u{ad}b");
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        let long = "a".repeat(10_000);
        let s = shown(&long);
        assert_eq!(s, format!("{}…(10000 bytes)", "a".repeat(SHOWN_CHARS)));
        assert_eq!(shown_max("abcdef", 3), "abc…(6 bytes)");
        assert_eq!(shown_max("abc", 3), "abc");
    }

    #[test]
    fn bytes_that_are_not_utf8() {
        assert_eq!(shown_bytes(b"ok\xff\xfe/x"), "ok\\xff\\xfe/x");
        let long = vec![b'z'; 1 << 20];
        let s = shown_bytes(&long);
        assert_eq!(s, format!("{}…({} bytes)", "z".repeat(SHOWN_CHARS), 1 << 20));
    }
}
