//! The shape of a TOML cluster file: which keys exist and what type of value each takes.
//!
//! [`check`] walks a parsed document (with spans) before anything is deserialized, so a
//! file with several wrong keys or wrongly typed values gets every problem reported in one
//! pass, each at the key's own line with its full key path
//! (`nodes.worker-1.port: expected an integer 1-65535, found string "abc"`). Bad entries
//! are removed from the document, so what remains deserializes and can be validated for
//! meaning in the same pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::{
    Issue, NODE_KEYS, ROLE_RESOURCE_KEYS, suggestion, unknown_key_with_suggestion,
};
use crate::config::{MAX_READINESS, MIN_READINESS_TIMEOUT};
use crate::exec;
use crate::resources::{
    ByteSize, LIVENESS_KINDS, MAX_PIDS, MAX_PROBE_FAILURES, PROBE_INTERVAL_RANGE,
    PROBE_TIMEOUT_RANGE, WEIGHT_RANGE,
};

/// Top-level keys of a cluster file.
const TOP_KEYS: &[&str] = &["id", "defaults", "instances", "roles", "nodes"];

/// Restart policies, as spelled in files.
const RESTART: &[&str] = &["never", "on-failure", "always"];

/// Readiness kinds, as spelled in files.
const READINESS: &[&str] = &["start-period", "notify", "tcp"];

/// What a type check found.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// Every problem, each with its line and key path (no file yet).
    pub(crate) issues: Vec<Issue>,
    /// Line of every key path seen (tables and keys).
    pub(crate) lines: BTreeMap<String, usize>,
    /// Key paths whose values were removed for being wrong: problems of meaning below
    /// them are consequences, not news.
    pub(crate) removed: BTreeSet<String>,
}

/// Maps byte offsets to 1-based line numbers.
pub(crate) struct Lines(Vec<usize>);

impl Lines {
    pub(crate) fn new(text: &str) -> Self {
        Self(
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }

    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// The type a key takes.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Str,
    /// An integer within the range.
    Int(i64, i64),
    /// A number (integer or float).
    Number,
    /// A duration string such as `"10s"`.
    Duration,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    StrArray,
    /// An array of integers within the range.
    IntArray(i64, i64),
    /// A table of strings.
    StrTable,
    /// An IP address string.
    Ip,
    /// A CPU number or an array of them.
    Cpus,
    Backoff,
    Readiness,
    /// `true` or `false`.
    Bool,
    /// An octal umask string.
    Umask,
    /// An array of capability names.
    Caps,
    /// A table of rlimits.
    Limits,
    // --- resources and liveness ---
    /// A size: bytes, or a string such as `"512M"`.
    Size,
    /// `memory = { max, high }`.
    Memory,
    /// `liveness = { kind, ... }`.
    Liveness,
}

const PORT: Ty = Ty::Int(1, 65_535);
const CPU_MAX: i64 = 1023;
#[expect(
    clippy::cast_possible_wrap,
    reason = "the kernel limit is far below i64::MAX"
)]
const MAX_PIDS_I64: i64 = MAX_PIDS as i64;

fn node_key_type(key: &str) -> Option<Ty> {
    Some(match key {
        "instance" | "role" | "workdir" | "interface" | "stop_signal" => Ty::Str,
        "command" | "scripts" => Ty::StrArray,
        "env" => Ty::StrTable,
        "port" | "metrics_port" => PORT,
        "cpu_affinity" => Ty::Cpus,
        "restart" => Ty::OneOf(RESTART),
        "backoff" => Ty::Backoff,
        "max_failed_starts" => Ty::Int(0, i64::from(u32::MAX)),
        "success_exit_codes" => Ty::IntArray(i64::from(i32::MIN), i64::from(i32::MAX)),
        "readiness" => Ty::Readiness,
        "stop_timeout" => Ty::Duration,
        // --- resources and liveness ---
        "memory" => Ty::Memory,
        "cpus" => Ty::Number,
        "cpu_weight" | "io_weight" => Ty::Int(i64::from(WEIGHT_RANGE.0), i64::from(WEIGHT_RANGE.1)),
        "pids_max" => Ty::Int(1, MAX_PIDS_I64),
        "watchdog" => Ty::Duration,
        "liveness" => Ty::Liveness,
        _ => return exec_key_type(key),
    })
}

/// The identity, capability and limit keys (see `crate::exec`), which role templates
/// take too.
fn exec_key_type(key: &str) -> Option<Ty> {
    Some(match key {
        "user" | "group" => Ty::Str,
        "supplementary_groups" => Ty::StrArray,
        "umask" => Ty::Umask,
        "capabilities" => Ty::Caps,
        "no_new_privileges" => Ty::Bool,
        "limits" => Ty::Limits,
        _ => return None,
    })
}

/// Keys a `[roles.NAME]` table may hold.
const ROLE_KEYS: &[&str] = &[
    "command",
    "env",
    "user",
    "group",
    "supplementary_groups",
    "umask",
    "capabilities",
    "no_new_privileges",
    "limits",
];

/// Checks the document's keys and value types, removing every bad entry from `doc`.
pub(crate) fn check(doc: &mut DeTable<'_>, lines: &Lines) -> Checked {
    let mut walk = Walk {
        lines,
        out: Checked::default(),
    };
    walk.top(doc);
    walk.out
}

struct Walk<'a> {
    lines: &'a Lines,
    out: Checked,
}

type Entry<'i> = (Spanned<std::borrow::Cow<'i, str>>, Spanned<DeValue<'i>>);

impl Walk<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.lines.line_of(span.start)
    }

    /// Records a problem at `line` for `path`, and marks `path` as removed.
    fn bad(&mut self, line: usize, path: &str, message: String) {
        self.out.issues.push(Issue {
            file: None,
            line: Some(line),
            key: Some(path.to_owned()),
            message,
        });
        self.out.removed.insert(path.to_owned());
    }

    /// Keeps the entries of `table` for which `keep` returns true; `keep` gets the key
    /// path, the key's line and the value.
    fn filter<'i>(
        &mut self,
        table: &mut DeTable<'i>,
        prefix: &str,
        mut keep: impl FnMut(&mut Self, &str, &str, usize, &mut Spanned<DeValue<'i>>) -> bool,
    ) {
        let entries: Vec<Entry<'i>> = std::mem::take(table).into_iter().collect();
        for (key, mut value) in entries {
            let path = join(prefix, key.get_ref());
            let line = self.line(key.span());
            self.out.lines.insert(path.clone(), line);
            if keep(self, &path, key.get_ref(), line, &mut value) {
                table.insert(key, value);
            }
        }
    }

    fn top(&mut self, doc: &mut DeTable<'_>) {
        self.filter(doc, "", |w, path, key, line, value| match key {
            "id" => w.typed(path, line, value.get_ref(), Ty::Str),
            "defaults" => match value.get_mut() {
                DeValue::Table(t) => {
                    w.node_table(t, path, true);
                    true
                }
                other => w.mismatch(path, line, "a table", other),
            },
            "instances" | "roles" | "nodes" => match value.get_mut() {
                DeValue::Table(t) => {
                    w.named_tables(t, path, key);
                    true
                }
                other => w.mismatch(path, line, "a table", other),
            },
            _ => {
                let message = unknown_key_with_suggestion(key, TOP_KEYS.iter().copied());
                w.bad(line, path, message);
                false
            }
        });
    }

    /// `[instances.NAME]`, `[roles.NAME]` or `[nodes.NAME]` tables.
    fn named_tables(&mut self, table: &mut DeTable<'_>, prefix: &str, kind: &str) {
        self.filter(table, prefix, |w, path, _, line, value| {
            let DeValue::Table(t) = value.get_mut() else {
                return w.mismatch(path, line, "a table", value.get_ref());
            };
            match kind {
                "instances" => w.instance(t, path),
                "roles" => w.role(t, path, line),
                _ => w.node_table(t, path, false),
            }
            true
        });
    }

    fn instance(&mut self, table: &mut DeTable<'_>, prefix: &str) {
        self.filter(table, prefix, |w, path, key, line, value| match key {
            "host" => w.typed(path, line, value.get_ref(), Ty::Ip),
            "port" => w.typed(path, line, value.get_ref(), PORT),
            _ => {
                let message = unknown_key_with_suggestion(key, ["host", "port"]);
                w.bad(line, path, message);
                false
            }
        });
    }

    fn role(&mut self, table: &mut DeTable<'_>, prefix: &str, line: usize) {
        self.filter(table, prefix, |w, path, key, line, value| match key {
            "command" => w.typed(path, line, value.get_ref(), Ty::StrArray),
            "env" => w.typed(path, line, value.get_ref(), Ty::StrTable),
            k if ROLE_RESOURCE_KEYS.contains(&k) => match node_key_type(k) {
                Some(ty) => w.node_value(path, line, ty, value),
                None => false,
            },
            _ => match exec_key_type(key) {
                Some(ty) => w.exec_value(path, line, value, ty),
                None => {
                    let known = ROLE_KEYS.iter().chain(ROLE_RESOURCE_KEYS).copied();
                    let message = unknown_key_with_suggestion(key, known);
                    w.bad(line, path, message);
                    false
                }
            },
        });
        let command = join(prefix, "command");
        if !table.contains_key("command") && !self.out.removed.contains(&command) {
            self.out.removed.insert(command);
            self.bad(
                line,
                prefix,
                "missing key 'command': a role template needs a command".to_owned(),
            );
        }
    }

    /// A `[nodes.NAME]` table, or `[defaults]` (where `instance` is not allowed).
    fn node_table(&mut self, table: &mut DeTable<'_>, prefix: &str, defaults: bool) {
        let present: Vec<String> = table.keys().map(|k| k.get_ref().to_string()).collect();
        self.filter(table, prefix, |w, path, key, line, value| {
            let ty = node_key_type(key).filter(|_| !(defaults && key == "instance"));
            let Some(ty) = ty else {
                let known = || {
                    NODE_KEYS
                        .iter()
                        .copied()
                        .filter(|k| !(defaults && *k == "instance"))
                };
                w.bad(line, path, unknown_key_with_suggestion(key, known()));
                // A misspelt key is a missing one: what validation says about the key it
                // was meant to be repeats this problem. Not so when that key is there
                // too: its own problems are its own.
                if let Some(meant) = suggestion(key, known())
                    && !present.iter().any(|p| p == meant)
                {
                    w.out.removed.insert(join(prefix, meant));
                }
                return false;
            };
            w.node_value(path, line, ty, value)
        });
    }

    /// Checks the value of a node key of type `ty`; false when it is to be dropped.
    fn node_value(
        &mut self,
        path: &str,
        line: usize,
        ty: Ty,
        value: &mut Spanned<DeValue<'_>>,
    ) -> bool {
        match (ty, value.get_mut()) {
            (Ty::Backoff, DeValue::Table(t)) => {
                self.backoff(t, path);
                true
            }
            (Ty::Readiness, DeValue::Table(t)) => self.readiness(t, path, line),
            (Ty::Memory, DeValue::Table(t)) => {
                self.memory(t, path);
                true
            }
            (Ty::Liveness, DeValue::Table(t)) => self.liveness(t, path, line),
            (Ty::Backoff | Ty::Readiness | Ty::Memory | Ty::Liveness, other) => {
                self.mismatch(path, line, "a table", other)
            }
            (ty @ (Ty::Caps | Ty::Limits), _) => self.exec_value(path, line, value, ty),
            (ty, other) => self.typed(path, line, other, ty),
        }
    }

    // --- resources and liveness ---

    fn memory(&mut self, table: &mut DeTable<'_>, prefix: &str) {
        const KEYS: [&str; 2] = ["max", "high"];
        self.filter(table, prefix, |w, path, key, line, value| {
            if KEYS.contains(&key) {
                w.typed(path, line, value.get_ref(), Ty::Size)
            } else {
                w.bad(line, path, unknown_key_with_suggestion(key, KEYS));
                false
            }
        });
    }

    /// Checks a liveness table; false when it is unusable (no valid `kind`, or a
    /// required key missing or wrong).
    fn liveness(&mut self, table: &mut DeTable<'_>, prefix: &str, line: usize) -> bool {
        const TIMING: [&str; 3] = ["interval", "timeout", "failures"];
        let kind = table
            .get("kind")
            .and_then(|v| v.get_ref().as_str())
            .filter(|k| LIVENESS_KINDS.contains(k))
            .map(str::to_owned);
        let (own, required): (&[&str], Option<&str>) = match kind.as_deref() {
            Some("http") => (&["port", "path"], Some("port")),
            Some("tcp") => (&["port"], Some("port")),
            Some("exec") => (&["command"], Some("command")),
            _ => (&["port", "path", "command"], None),
        };
        let mut usable = true;
        self.filter(table, prefix, |w, path, key, line, value| {
            if !(key == "kind" || TIMING.contains(&key) || own.contains(&key)) {
                let message = match kind.as_deref() {
                    Some(kind) if ["port", "path", "command"].contains(&key) => {
                        format!("liveness kind '{kind}' takes no '{key}'")
                    }
                    _ => unknown_key_with_suggestion(
                        key,
                        ["kind"].iter().chain(&TIMING).chain(own).copied(),
                    ),
                };
                w.bad(line, path, message);
                return false;
            }
            let ty = match key {
                "kind" => Ty::OneOf(LIVENESS_KINDS),
                "port" => PORT,
                "path" => Ty::Str,
                "command" => Ty::StrArray,
                "failures" => Ty::Int(1, i64::from(MAX_PROBE_FAILURES)),
                _ => Ty::Duration,
            };
            let range = match key {
                "interval" => Some(PROBE_INTERVAL_RANGE),
                "timeout" => Some(PROBE_TIMEOUT_RANGE),
                _ => None,
            };
            let ok = w.typed(path, line, value.get_ref(), ty)
                && range.is_none_or(|(lo, hi)| {
                    w.within(
                        path,
                        line,
                        &format!("liveness.{key}"),
                        value.get_ref(),
                        lo,
                        hi,
                    )
                });
            if !ok && (key == "kind" || Some(key) == required) {
                usable = false;
            }
            ok
        });
        if !usable {
            self.out.removed.insert(prefix.to_owned());
            return false;
        }
        let missing = match (kind.as_deref(), required) {
            (None, _) => Some(format!(
                "missing key 'kind' (one of {})",
                quoted_list(LIVENESS_KINDS)
            )),
            (Some(k), Some(r)) if !table.contains_key(r) => {
                Some(format!("missing key '{r}': a '{k}' probe needs one"))
            }
            _ => None,
        };
        if let Some(message) = missing {
            self.bad(line, prefix, message);
            return false;
        }
        true
    }

    fn backoff(&mut self, table: &mut DeTable<'_>, prefix: &str) {
        const KEYS: [&str; 4] = ["initial", "multiplier", "max", "reset_after"];
        self.filter(table, prefix, |w, path, key, line, value| match key {
            "initial" | "max" | "reset_after" => w.typed(path, line, value.get_ref(), Ty::Duration),
            "multiplier" => w.typed(path, line, value.get_ref(), Ty::Number),
            _ => {
                w.bad(line, path, unknown_key_with_suggestion(key, KEYS));
                false
            }
        });
    }

    /// Checks a readiness table; false when it is unusable (no valid `kind`, or a tcp
    /// probe without a port).
    fn readiness(&mut self, table: &mut DeTable<'_>, prefix: &str, line: usize) -> bool {
        let kind = table
            .get("kind")
            .and_then(|v| v.get_ref().as_str())
            .filter(|k| READINESS.contains(k))
            .map(str::to_owned);
        let allowed: &[&str] = match kind.as_deref() {
            Some("start-period") => &["kind", "period"],
            Some("notify") => &["kind", "timeout"],
            Some("tcp") => &["kind", "port", "timeout"],
            _ => &["kind", "period", "port", "timeout"],
        };
        let mut usable = true;
        self.filter(table, prefix, |w, path, key, line, value| {
            if !allowed.contains(&key) {
                let message = match kind.as_deref() {
                    Some(kind) if ["period", "port", "timeout"].contains(&key) => {
                        format!("readiness kind '{kind}' takes no '{key}'")
                    }
                    _ => unknown_key_with_suggestion(key, allowed.iter().copied()),
                };
                w.bad(line, path, message);
                return false;
            }
            let ok = match key {
                "kind" => w.typed(path, line, value.get_ref(), Ty::OneOf(READINESS)),
                "port" => w.typed(path, line, value.get_ref(), PORT),
                _ => {
                    let lo = if key == "period" {
                        std::time::Duration::ZERO
                    } else {
                        MIN_READINESS_TIMEOUT
                    };
                    w.typed(path, line, value.get_ref(), Ty::Duration)
                        && w.within(
                            path,
                            line,
                            &format!("readiness.{key}"),
                            value.get_ref(),
                            lo,
                            MAX_READINESS,
                        )
                }
            };
            if !ok && (key == "kind" || key == "port") {
                usable = false;
            }
            ok
        });
        if !usable {
            self.out.removed.insert(prefix.to_owned());
            return false;
        }
        let missing = match kind.as_deref() {
            None => Some("kind"),
            Some("tcp") if !table.contains_key("port") => Some("port"),
            _ => None,
        };
        if let Some(missing) = missing {
            let what = if missing == "kind" {
                format!("one of {}", quoted_list(READINESS))
            } else {
                "the port to probe".to_owned()
            };
            self.bad(line, prefix, format!("missing key '{missing}' ({what})"));
            return false;
        }
        true
    }

    /// Checks a value of an identity, capability or limit key: capabilities one by one
    /// and limits each at its own line, so that one bad name drops only itself.
    fn exec_value(
        &mut self,
        path: &str,
        line: usize,
        value: &mut Spanned<DeValue<'_>>,
        ty: Ty,
    ) -> bool {
        match (ty, value.get_mut()) {
            (Ty::Caps, DeValue::Array(a)) => {
                let mut ok = true;
                for v in a.iter() {
                    let line = self.line(v.span());
                    match v.get_ref() {
                        DeValue::String(name) if exec::capability_number(name).is_some() => {}
                        DeValue::String(name) => {
                            self.bad(line, path, exec::unknown_capability(name));
                            ok = false;
                        }
                        other => {
                            let message =
                                format!("expected a capability name, found {}", describe(other));
                            self.bad(line, path, message);
                            ok = false;
                        }
                    }
                }
                ok
            }
            (Ty::Caps, other) => self.mismatch(
                path,
                line,
                "an array of capability names such as [\"CAP_NET_RAW\"]",
                other,
            ),
            (Ty::Limits, DeValue::Table(t)) => {
                self.limits(t, path);
                true
            }
            (Ty::Limits, other) => self.mismatch(path, line, "a table of limits", other),
            (ty, other) => self.typed(path, line, other, ty),
        }
    }

    fn limits(&mut self, table: &mut DeTable<'_>, prefix: &str) {
        let names = || exec::LIMITS.iter().map(|(n, _)| *n);
        self.filter(table, prefix, |w, path, key, line, value| {
            let Some((_, bytes)) = exec::LIMITS.iter().find(|(n, _)| *n == key) else {
                let message = unknown_key_with_suggestion(key, names())
                    .replace("unknown key", "unknown limit");
                w.bad(line, path, message);
                return false;
            };
            let parsed = match value.get_ref() {
                DeValue::String(s) => exec::Limit::parse(s, *bytes).map(|_| ()),
                v => match integer(v) {
                    Some(n) if n >= 0 => Ok(()),
                    _ => Err(format!(
                        "expected a number, {}\"unlimited\" or \"SOFT:HARD\", found {}",
                        if *bytes {
                            "a size such as \"64M\", "
                        } else {
                            ""
                        },
                        describe(v)
                    )),
                },
            };
            match parsed {
                Ok(()) => true,
                Err(why) => {
                    w.bad(line, path, format!("limit {key}: {why}"));
                    false
                }
            }
        });
    }

    /// Checks a duration already known to parse against `lo..=hi`, in the words the
    /// checks of meaning use, so that a bound is reported even when the table holding
    /// it is unusable for another reason (and, dropped here, not twice).
    fn within(
        &mut self,
        path: &str,
        line: usize,
        what: &str,
        value: &DeValue<'_>,
        lo: std::time::Duration,
        hi: std::time::Duration,
    ) -> bool {
        let Some(d) = value
            .as_str()
            .and_then(|s| humantime::parse_duration(s).ok())
        else {
            return true;
        };
        match crate::config::duration_out_of_range(what, d, lo, hi) {
            Some(message) => {
                self.bad(line, path, message);
                false
            }
            None => true,
        }
    }

    /// Reports a value that is not what the key takes; always false (drop the entry).
    fn mismatch(&mut self, path: &str, line: usize, expected: &str, found: &DeValue<'_>) -> bool {
        self.bad(
            line,
            path,
            format!("expected {expected}, found {}", describe(found)),
        );
        false
    }

    /// Checks `value` against `ty`; false (with an issue) when it does not fit.
    fn typed(&mut self, path: &str, line: usize, value: &DeValue<'_>, ty: Ty) -> bool {
        // A table of strings (`env`) has its entries' lines too: a problem with one
        // entry is told at its own line, and one merged from `[defaults]` there.
        if matches!(ty, Ty::StrTable)
            && let DeValue::Table(t) = value
        {
            for key in t.keys() {
                let at = self.line(key.span());
                self.out.lines.insert(join(path, key.get_ref()), at);
            }
        }
        match fits(value, ty) {
            Ok(()) => true,
            Err(expected) => {
                let message = format!("expected {expected}, found {}", found(value, ty));
                self.bad(line, path, message);
                false
            }
        }
    }
}

/// `Ok` when `value` is of type `ty`, else what was expected.
fn fits(value: &DeValue<'_>, ty: Ty) -> Result<(), String> {
    let ok = match (ty, value) {
        (Ty::Str, DeValue::String(_)) => true,
        (Ty::Int(lo, hi), v) => integer(v).is_some_and(|n| (lo..=hi).contains(&n)),
        (Ty::Number, DeValue::Integer(_)) => true,
        (Ty::Number, DeValue::Float(f)) => f.as_str().parse::<f64>().is_ok(),
        (Ty::Duration, DeValue::String(s)) => humantime::parse_duration(s).is_ok(),
        (Ty::OneOf(options), DeValue::String(s)) => options.contains(&s.as_ref()),
        (Ty::StrArray, DeValue::Array(a)) => a.iter().all(|v| v.get_ref().is_str()),
        (Ty::IntArray(lo, hi), DeValue::Array(a)) => a
            .iter()
            .all(|v| integer(v.get_ref()).is_some_and(|n| (lo..=hi).contains(&n))),
        (Ty::StrTable, DeValue::Table(t)) => t.values().all(|v| v.get_ref().is_str()),
        (Ty::Ip, DeValue::String(s)) => s.parse::<IpAddr>().is_ok(),
        (Ty::Cpus, DeValue::Array(a)) => a
            .iter()
            .all(|v| integer(v.get_ref()).is_some_and(|n| (0..=CPU_MAX).contains(&n))),
        (Ty::Cpus, v) => integer(v).is_some_and(|n| (0..=CPU_MAX).contains(&n)),
        (Ty::Bool, DeValue::Boolean(_)) => true,
        (Ty::Umask, DeValue::String(s)) => exec::Umask::parse(s).is_ok(),
        (Ty::Size, DeValue::String(s)) => ByteSize::parse(s).is_some(),
        (Ty::Size, v) => integer(v).is_some_and(|n| n >= 0),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(match ty {
        Ty::Str => "a string".to_owned(),
        Ty::Int(lo, hi) if hi == i64::from(u32::MAX) => format!("an integer {lo} or more"),
        Ty::Int(lo, hi) => format!("an integer {lo}-{hi}"),
        Ty::Number => "a number".to_owned(),
        Ty::Duration => "a duration such as \"10s\" or \"250ms\"".to_owned(),
        Ty::OneOf(options) => format!("one of {}", quoted_list(options)),
        Ty::StrArray => "an array of strings".to_owned(),
        Ty::IntArray(..) => "an array of integers".to_owned(),
        Ty::StrTable => "a table of strings".to_owned(),
        Ty::Ip => "an IP address".to_owned(),
        Ty::Cpus => format!("a CPU number 0-{CPU_MAX} or an array of them"),
        Ty::Backoff | Ty::Readiness | Ty::Limits | Ty::Memory | Ty::Liveness => {
            "a table".to_owned()
        }
        Ty::Bool => "true or false".to_owned(),
        Ty::Umask => "an octal umask string such as \"0027\" (0000-0777)".to_owned(),
        Ty::Caps => "an array of capability names".to_owned(),
        Ty::Size => "a size such as \"512M\" or \"4G\" (K, M, G, T) or bytes".to_owned(),
    })
}

fn integer(value: &DeValue<'_>) -> Option<i64> {
    let DeValue::Integer(i) = value else {
        return None;
    };
    i64::from_str_radix(i.as_str(), i.radix()).ok()
}

/// The value as an error message shows it: its type and, for scalars, the value.
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => {
            let shown: String = s.chars().take(40).collect();
            let more = if shown.len() < s.len() { "..." } else { "" };
            format!("string \"{}{more}\"", shown.escape_default())
        }
        DeValue::Integer(i) => format!("integer {i}"),
        DeValue::Float(f) => format!("float {f}"),
        DeValue::Boolean(b) => format!("boolean {b}"),
        DeValue::Datetime(d) => format!("datetime {d}"),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// The type of the elements of an array or table type.
fn element_type(ty: Ty) -> Option<Ty> {
    match ty {
        Ty::StrArray | Ty::StrTable => Some(Ty::Str),
        Ty::IntArray(lo, hi) => Some(Ty::Int(lo, hi)),
        Ty::Cpus => Some(Ty::Int(0, CPU_MAX)),
        _ => None,
    }
}

/// What was found instead of `ty`: the first element that does not fit, for an array or
/// table whose elements are wrong.
fn found(value: &DeValue<'_>, ty: Ty) -> String {
    let Some(element) = element_type(ty) else {
        return describe(value);
    };
    let bad = |v: &DeValue<'_>| fits(v, element).is_err();
    match value {
        DeValue::Array(a) => match a.iter().find(|v| bad(v.get_ref())) {
            Some(v) => format!("{} in the array", describe(v.get_ref())),
            None => describe(value),
        },
        DeValue::Table(t) if matches!(ty, Ty::StrTable) => {
            match t.iter().find(|(_, v)| bad(v.get_ref())) {
                Some((k, v)) => format!("{} for '{}'", describe(v.get_ref()), k.get_ref()),
                None => describe(value),
            }
        }
        _ => describe(value),
    }
}

fn quoted_list(options: &[&str]) -> String {
    options
        .iter()
        .map(|o| format!("\"{o}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}
