//! Names of instances and nodes.
//!
//! A name becomes a directory under the agent's state dir, a certificate SAN and a key in
//! JSON output, so it is restricted to a safe alphabet: ASCII letters, digits, `.`, `_` and
//! `-`, starting with a letter or digit, at most [`MAX_LEN`] bytes. That rules out path
//! traversal (`..`, `/`) and whitespace by construction.

/// The longest name accepted.
pub const MAX_LEN: usize = 64;

/// Checks a name, returning why it is not acceptable.
pub fn check(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("name is empty".to_owned());
    };
    if name.len() > MAX_LEN {
        return Err(format!("name is longer than {MAX_LEN} bytes"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "name '{}' must start with an ASCII letter or digit",
            name.escape_default()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name '{}' contains '{}'; allowed are ASCII letters, digits, '.', '_' and '-'",
            name.escape_default(),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// The host part of a `HOST:PORT` or `[IPV6]:PORT` address: a host name or IPv4
/// address of letters, digits, `.`, `-` and `_`, or an IPv6 address in brackets, and a
/// port from 1. None for anything else, such as an IPv6 address out of brackets.
pub fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok().then_some(v6),
        None => (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        .then_some(host),
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_usual_names() {
        for n in ["agent-1", "worker-01", "a", "m.x_y", "0abc"] {
            assert_eq!(check(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_unsafe_names() {
        for n in ["", "-x", "..", "a/b", "a b", "../etc", "é", ".hidden"] {
            assert!(check(n).is_err(), "{n:?} should be rejected");
        }
        assert!(check(&"a".repeat(65)).is_err());
        // Said as what it is, and escaped as the other message is.
        assert_eq!(
            check("ünï-node").unwrap_err(),
            "name '\\u{fc}n\\u{ef}-node' must start with an ASCII letter or digit"
        );
    }
}
