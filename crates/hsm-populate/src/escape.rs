//! Names made safe to print: a file name may hold any byte but `/` and NUL, and printed raw
//! a newline forges a line of output and an escape sequence drives the terminal (retitles
//! it, clears it, hides text). What populate and publish print goes through these.

use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether `c` must not reach a terminal as itself: C0 and C1 controls, DEL, and the
/// Unicode formatting characters that reorder or hide text (bidirectional overrides and
/// isolates, zero-width marks, line and paragraph separators).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// A file name or path for people: printable characters as themselves, `\` as `\\`, and
/// everything else escaped (`\n`, `\t`, `\x1b`, `\u{202e}`; bytes that are not UTF-8 as
/// `\xff`). Different names never print the same.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if unsafe_char(c) => push_char(&mut out, c),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`escape_bytes`] of a path.
pub fn escape_path(path: &Path) -> String {
    escape_bytes(path.as_os_str().as_bytes())
}

/// A message for people: its control and formatting characters escaped as in
/// [`escape_bytes`], its backslashes left alone (names inside it are escaped already).
pub fn escape_text(text: &str) -> String {
    if !text.chars().any(unsafe_char) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            push_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_odd_bytes_are_escaped() {
        assert_eq!(escape_bytes(b"plain name.txt"), "plain name.txt");
        assert_eq!(
            escape_bytes(b"a\nFAKE: ok\x1b]0;t\x07\x1b[2J"),
            "a\\nFAKE: ok\\x1b]0;t\\x07\\x1b[2J"
        );
        assert_eq!(escape_bytes(b"bad\xffname"), "bad\\xffname");
        assert_eq!(
            escape_bytes("\u{202e}txt.exe".as_bytes()),
            "\\u{202e}txt.exe"
        );
        assert_eq!(escape_bytes("caf\u{e9}\u{85}".as_bytes()), "caf\u{e9}\\x85");
        // A backslash is doubled, so no name prints like an escaped other one.
        assert_eq!(escape_bytes(b"a\\nb"), "a\\\\nb");
        assert_ne!(escape_bytes(b"a\\nb"), escape_bytes(b"a\nb"));
        assert_eq!(
            escape_text("open a\\\\b: x\ny\x1b"),
            "open a\\\\b: x\\ny\\x1b"
        );
    }
}
