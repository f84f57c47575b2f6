//! Text a node wrote (its output, its `STATUS=`), made safe to show on a terminal.
//!
//! A node's output can carry any bytes: a program that logs what it saw on the network
//! logs whatever a stranger sent it. Written to a terminal as they are, escape sequences
//! among them move the cursor, rewrite lines already shown, set the window title or, on
//! some terminals, make the terminal type an answer into the shell; a carriage return
//! hides what came before it on the line; bidirectional overrides make text read other
//! than it is. Shown to a person, such characters are written out instead (`\x1b`,
//! `\x0d`, `\u{202e}`). A tab stays a tab.
//!
//! Where the text goes to a pipe or a file, `drover logs` writes it as the node wrote it;
//! `--raw` does so on a terminal too.

use std::borrow::Cow;
use std::io::IsTerminal;

/// Whether `c` is written out rather than shown: control characters (C0, DEL and C1)
/// other than tab, and the bidirectional embeddings, overrides and isolates.
fn hidden(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A JSON value's text with every character [`hidden`] would keep from view as a JSON
/// escape (`\u009b`): the same value to a JSON reader, harmless on a terminal. serde
/// escapes the C0 controls; C1 controls and bidirectional overrides it writes raw.
pub fn json_line(value: &impl serde::Serialize) -> serde_json::Result<String> {
    let text = serde_json::to_string(value)?;
    if !text.chars().any(hidden) {
        return Ok(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `text` with every character [`hidden`] would keep from view written out: `\x1b` for
/// an ASCII one, `\u{9b}` for another. Borrowed when there is none.
pub fn visible(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !hidden(c) {
            out.push(c);
        } else if c.is_ascii() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    Cow::Owned(out)
}

/// Where node output is written out (see the module docs) rather than passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escapes {
    /// For lines printed to stdout.
    pub stdout: bool,
    /// For lines printed to stderr.
    pub stderr: bool,
}

impl Escapes {
    /// For each stream that is a terminal, unless `raw`.
    pub fn for_terminals(raw: bool) -> Self {
        Self {
            stdout: !raw && std::io::stdout().is_terminal(),
            stderr: !raw && std::io::stderr().is_terminal(),
        }
    }

    /// Passes everything on.
    pub const RAW: Self = Self {
        stdout: false,
        stderr: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_escape_what_a_terminal_would_act_on_and_read_back_the_same() {
        let value = serde_json::json!({"node": "w1\u{202e}\u{9b}2J\u{1b}[0m", "plain": "é"});
        let line = json_line(&value).unwrap();
        assert!(!line.chars().any(hidden), "{line}");
        assert!(
            line.contains(r"\u202e") && line.contains(r"\u009b"),
            "{line}"
        );
        assert!(line.contains('é'), "other text stays as it is: {line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn plain_text_is_borrowed_as_it_is() {
        for text in ["", "plain", "tab\there", "é ü 日本 🙂", r"a \x1b already"] {
            assert!(
                matches!(visible(text), Cow::Borrowed(t) if t == text),
                "{text:?}"
            );
        }
    }

    #[test]
    fn control_characters_and_overrides_are_written_out() {
        assert_eq!(
            visible("\x1b[2J\x1b]0;owned\x07"),
            r"\x1b[2J\x1b]0;owned\x07"
        );
        assert_eq!(visible("done\rnot done"), r"done\x0dnot done");
        assert_eq!(visible("nul\0del\x7f"), r"nul\x00del\x7f");
        assert_eq!(visible("csi\u{9b}2J"), r"csi\u{9b}2J");
        assert_eq!(visible("user\u{202e}gnp.exe"), r"user\u{202e}gnp.exe");
        assert_eq!(visible("\u{2066}x\u{2069}"), r"\u{2066}x\u{2069}");
        // What is shown has no character a terminal acts on.
        let shown = visible("\x1b\x08\x0b\x0c\n\u{85}\u{202d}");
        assert!(!shown.chars().any(hidden), "{shown:?}");
    }

    #[test]
    fn raw_passes_everything_on() {
        assert_eq!(Escapes::for_terminals(true), Escapes::RAW);
    }
}
