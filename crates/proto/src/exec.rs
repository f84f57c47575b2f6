//! What a node's process is made of besides its command: the user and groups it runs
//! as, its umask, its capabilities and its resource limits (rlimits).
//!
//! These are node keys of a cluster file, a roles file's templates and `[defaults]`,
//! and INI node sections:
//!
//! ```toml
//! [nodes.worker-1]
//! user = "zeek"                          # a name or a numeric id, resolved on the agent's host
//! group = "zeek"                         # default: the user's primary group
//! supplementary_groups = ["pcap"]        # default: none
//! umask = "0027"                         # octal
//! capabilities = ["CAP_NET_RAW", "CAP_NET_ADMIN"]
//! no_new_privileges = true
//! limits = { nofile = 65536, core = "unlimited", memlock = "64M", nproc = "512:1024" }
//! ```
//!
//! `capabilities` present (even empty) cuts the node's bounding set to the list and, for
//! a node running as an ordinary user, raises them as ambient capabilities, so the
//! program has them without file capabilities. A limit is a number, `"unlimited"`, a
//! size with a `K`/`M`/`G`/`T` suffix (powers of 1024) for the limits counted in bytes,
//! or `"SOFT:HARD"` of those.
//!
//! This module only names and checks the settings; the agent resolves the names and
//! applies them in the child before exec.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Linux capability names and numbers (`linux/capability.h`), which are the same on
/// every architecture.
pub const CAPABILITIES: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

/// The number of a capability named `CAP_NET_RAW` (any case, `CAP_` optional).
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .find(|(n, _)| *n == full)
        .map(|(_, v)| *v)
}

/// The name of capability `number`, if it has one.
pub fn capability_name(number: u32) -> Option<&'static str> {
    CAPABILITIES
        .iter()
        .find(|(_, v)| *v == number)
        .map(|(n, _)| *n)
}

/// "unknown capability 'x'", with the closest name as a suggestion.
pub fn unknown_capability(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    match crate::config::suggestion(&upper, CAPABILITIES.iter().map(|(n, _)| *n)) {
        Some(s) => format!("unknown capability '{name}' (did you mean '{s}'?)"),
        None => format!("unknown capability '{name}'"),
    }
}

/// The rlimits a node may set (the `RLIMIT_` names, lower-case), and whether each is
/// counted in bytes (and so takes size suffixes).
pub const LIMITS: &[(&str, bool)] = &[
    ("as", true),
    ("core", true),
    ("cpu", false),
    ("data", true),
    ("fsize", true),
    ("locks", false),
    ("memlock", true),
    ("msgqueue", true),
    ("nice", false),
    ("nofile", false),
    ("nproc", false),
    ("rss", true),
    ("rtprio", false),
    ("rttime", false),
    ("sigpending", false),
    ("stack", true),
];

/// A soft and a hard limit; `None` is unlimited (`RLIM_INFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The limit enforced.
    pub soft: Option<u64>,
    /// The ceiling up to which the process may raise `soft` itself.
    pub hard: Option<u64>,
}

impl Limit {
    /// Parses `65536`, `unlimited`, `64M` (when `bytes`) or `SOFT:HARD` of those.
    pub fn parse(text: &str, bytes: bool) -> Result<Self, String> {
        let one = |t: &str| parse_one(t.trim(), bytes);
        let limit = match text.split_once(':') {
            Some((soft, hard)) => Self {
                soft: one(soft)?,
                hard: one(hard)?,
            },
            None => {
                let v = one(text)?;
                Self { soft: v, hard: v }
            }
        };
        if let (Some(s), Some(h)) = (limit.soft, limit.hard)
            && s > h
        {
            return Err(format!("soft limit {s} is above hard limit {h}"));
        }
        if limit.soft.is_none() && limit.hard.is_some() {
            return Err("an unlimited soft limit is above a finite hard limit".to_owned());
        }
        Ok(limit)
    }
}

fn parse_one(text: &str, bytes: bool) -> Result<Option<u64>, String> {
    if text.eq_ignore_ascii_case("unlimited") || text.eq_ignore_ascii_case("infinity") {
        return Ok(None);
    }
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c))
            if bytes
                && c.is_ascii_alphabetic()
                && i > 0
                && text[..i].bytes().all(|b| b.is_ascii_digit()) =>
        {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in '{text}': use K, M, G or T")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        if bytes {
            format!(
                "'{text}' is not a limit: expected a number, a size such as \"64M\", or \"unlimited\""
            )
        } else {
            format!("'{text}' is not a limit: expected a number or \"unlimited\"")
        }
    })?;
    let v = n
        .checked_mul(1u64 << shift)
        .filter(|v| *v < u64::MAX)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    Ok(Some(v))
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        if self.soft == self.hard {
            f.write_str(&show(self.soft))
        } else {
            write!(f, "{}:{}", show(self.soft), show(self.hard))
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.soft, self.hard) {
            (Some(v), Some(h)) if v == h && i64::try_from(v).is_ok() => {
                s.serialize_i64(i64::try_from(v).unwrap_or_default())
            }
            _ => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Self {
                soft: Some(n),
                hard: Some(n),
            }),
            // Suffixes are checked per limit by validation, which knows which are bytes.
            Raw::Text(t) => Self::parse(&t, true).map_err(serde::de::Error::custom),
        }
    }
}

/// A file mode creation mask, written in octal (`"0027"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Umask(pub u32);

impl Umask {
    /// Parses 1 to 4 octal digits, at most `0777`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("umask '{text}' is not an octal mask such as \"0027\" (0000-0777)");
        if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        let v = u32::from_str_radix(text, 8).map_err(|_| bad())?;
        if v > 0o777 {
            return Err(bad());
        }
        Ok(Self(v))
    }
}

impl Serialize for Umask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Umask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The settings of this module of one node or role template, for checking and merging.
#[derive(Debug, Clone, Copy)]
pub struct ExecRef<'a> {
    /// `user`.
    pub user: Option<&'a str>,
    /// `group`.
    pub group: Option<&'a str>,
    /// `supplementary_groups`.
    pub supplementary_groups: &'a [String],
    /// `capabilities`.
    pub capabilities: Option<&'a [String]>,
    /// `limits`.
    pub limits: &'a BTreeMap<String, Limit>,
}

/// Problems of meaning in `e`, as (key below `prefix`, message). Types and unknown keys
/// of files are the schema's business; this catches what any source may get wrong.
pub fn check(e: ExecRef<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in [("user", e.user), ("group", e.group)] {
        if let Some(v) = value
            && let Err(why) = check_account(v)
        {
            out.push((
                key.to_owned(),
                format!("{key} '{}' {why}", v.escape_default()),
            ));
        }
    }
    for g in e.supplementary_groups {
        if let Err(why) = check_account(g) {
            out.push((
                "supplementary_groups".to_owned(),
                format!("group '{}' {why}", g.escape_default()),
            ));
        }
    }
    if e.supplementary_groups.len() > 64 {
        out.push((
            "supplementary_groups".to_owned(),
            "more than 64 supplementary groups".to_owned(),
        ));
    }
    for cap in e.capabilities.unwrap_or_default() {
        if capability_number(cap).is_none() {
            out.push(("capabilities".to_owned(), unknown_capability(cap)));
        }
    }
    for (name, limit) in e.limits {
        match LIMITS.iter().find(|(n, _)| n == name) {
            None => out.push((
                format!("limits.{name}"),
                crate::config::unknown_key_with_suggestion(name, LIMITS.iter().map(|(n, _)| *n))
                    .replace("unknown key", "unknown limit"),
            )),
            Some((_, bytes)) => {
                if let Err(why) = Limit::parse(&limit.to_string(), *bytes) {
                    out.push((format!("limits.{name}"), why));
                }
            }
        }
    }
    out
}

/// A user or group: a name as `useradd` allows, or a numeric id.
fn check_account(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("is empty");
    }
    if v.len() > 256 {
        return Err("is too long");
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u32>()
            .ok()
            .filter(|id| *id != u32::MAX)
            .map(|_| ())
            .ok_or("is not a valid numeric id");
    }
    if v.starts_with('-')
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ':' | '/' | ','))
    {
        return Err("is not a valid name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_in_every_form() {
        let l = |soft, hard| Limit { soft, hard };
        assert_eq!(
            Limit::parse("65536", false),
            Ok(l(Some(65536), Some(65536)))
        );
        assert_eq!(Limit::parse("unlimited", true), Ok(l(None, None)));
        assert_eq!(
            Limit::parse("64M", true),
            Ok(l(Some(64 << 20), Some(64 << 20)))
        );
        assert_eq!(Limit::parse("1k:2K", true), Ok(l(Some(1024), Some(2048))));
        assert_eq!(Limit::parse("10:unlimited", false), Ok(l(Some(10), None)));
        for bad in ["", "x", "-1", "64M", "1:", "2:1", "unlimited:5", "1.5"] {
            assert!(Limit::parse(bad, false).is_err(), "{bad}");
        }
        assert!(Limit::parse("64Q", true).unwrap_err().contains("suffix"));
        assert!(
            Limit::parse("99999999999T", true)
                .unwrap_err()
                .contains("too large")
        );
        for text in ["65536", "unlimited", "1024:2048", "10:unlimited"] {
            assert_eq!(Limit::parse(text, false).unwrap().to_string(), text);
        }
    }

    #[test]
    fn umasks_are_octal() {
        assert_eq!(Umask::parse("0027"), Ok(Umask(0o27)));
        assert_eq!(Umask::parse("777"), Ok(Umask(0o777)));
        for bad in ["", "8", "0o27", "1000", "00000", "-1", "27 "] {
            assert!(Umask::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capabilities_by_any_spelling() {
        assert_eq!(capability_number("CAP_NET_RAW"), Some(13));
        assert_eq!(capability_number("net_admin"), Some(12));
        assert_eq!(capability_number("CAP_NOPE"), None);
        assert_eq!(capability_name(40), Some("CAP_CHECKPOINT_RESTORE"));
        assert_eq!(
            unknown_capability("CAP_NET_RAWW"),
            "unknown capability 'CAP_NET_RAWW' (did you mean 'CAP_NET_RAW'?)"
        );
    }

    #[test]
    fn accounts_are_names_or_ids() {
        for ok in ["zeek", "nobody", "65534", "0", "www-data", "a.b_c$"] {
            assert!(check_account(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a:b", "-x", "4294967295", "99999999999", "a/b"] {
            assert!(check_account(bad).is_err(), "{bad}");
        }
    }
}
