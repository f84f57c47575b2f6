//! An error and its causes as the one line a user reads.
//!
//! Errors here name their cause in their own message (`state dir /x: permission
//! denied`), and many also return it as their `source()`. Printing the whole chain
//! (anyhow's `{:#}`) then says the cause twice, or more with errors wrapped in others
//! that repeat it. [`one_line`] adds a cause only when the line does not say it yet.

use std::error::Error;

/// `err` and each of its causes that its line does not already contain, joined by `: `.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose message names its cause, which is also its source.
    #[derive(Debug, thiserror::Error)]
    #[error("state dir {path}: {source}")]
    struct StateDir {
        path: String,
        source: std::io::Error,
    }

    /// An error that wraps another and repeats it.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Transparentish(#[from] StateDir);

    /// An error that says what failed but not why; the cause says why.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Terse(#[source] std::io::Error);

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn a_cause_the_message_names_is_not_repeated() {
        let e = StateDir {
            path: "/x".into(),
            source: io(),
        };
        let io_text = io().to_string();
        assert_eq!(one_line(&e), format!("state dir /x: {io_text}"));
        let wrapped = Transparentish(e);
        assert_eq!(one_line(&wrapped), format!("state dir /x: {io_text}"));
    }

    #[test]
    fn a_cause_the_message_does_not_name_is_added() {
        let io_text = io().to_string();
        assert_eq!(one_line(&Terse(io())), format!("cannot start: {io_text}"));
        assert_eq!(one_line(&io()), io_text);
    }
}
