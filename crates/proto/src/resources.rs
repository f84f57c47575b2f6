//! A node's resource budget (memory, CPU, pids, I/O: enforced through cgroups) and its
//! liveness checks (a systemd-style watchdog and probes), with their bounds.
//!
//! These are the values of the `memory`, `cpus`, `cpu_weight`, `pids_max`, `io_weight`,
//! `watchdog` and `liveness` keys of a node or role template. Sizes are bytes, given as
//! an integer or as a string with a binary suffix (`"512M"`, `"4G"`: K, M, G, T are
//! powers of 1024, as systemd reads them).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A number of bytes; written with the largest binary suffix that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"4G"`, `"512M"`, `"64K"`, `"1T"`, `"4096"` (optionally with `B` or `iB`
    /// after the suffix); `None` for anything else or an overflow.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = s[..digits].parse().ok()?;
        let unit = s[digits..].trim_start();
        let unit = unit
            .strip_suffix("iB")
            .or_else(|| unit.strip_suffix('B'))
            .unwrap_or(unit);
        let shift = match unit.to_ascii_uppercase().as_str() {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return None,
        };
        n.checked_mul(1u64 << shift).map(Self)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            let scale = 1u64 << shift;
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Self(n)),
            Raw::Str(s) => Self::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size '{s}': expected bytes or a number with K, M, G or T"
                ))
            }),
        }
    }
}

/// `memory = { max = "4G", high = "3G" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    /// The hard limit: past it the kernel reclaims, then OOM-kills within the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<ByteSize>,
    /// The throttle point: past it the node is reclaimed from and slowed down (cgroup
    /// v2 `memory.high`; v1 has only the weaker soft limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<ByteSize>,
}

/// A liveness probe: a node that fails it `failures` times in a row is restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Liveness {
    /// `GET path` on the loopback address and this port answers with a 2xx or 3xx status.
    Http {
        /// The port.
        port: u16,
        /// The path requested.
        #[serde(default = "default_path")]
        path: String,
        /// How often.
        #[serde(with = "humantime_serde", default = "default_interval")]
        interval: Duration,
        /// How long one attempt may take.
        #[serde(with = "humantime_serde", default = "default_timeout")]
        timeout: Duration,
        /// Failed attempts in a row that make the node unhealthy.
        #[serde(default = "default_failures")]
        failures: u32,
    },
    /// A TCP connection to this port on the loopback address succeeds.
    Tcp {
        /// The port.
        port: u16,
        /// How often.
        #[serde(with = "humantime_serde", default = "default_interval")]
        interval: Duration,
        /// How long one attempt may take.
        #[serde(with = "humantime_serde", default = "default_timeout")]
        timeout: Duration,
        /// Failed attempts in a row that make the node unhealthy.
        #[serde(default = "default_failures")]
        failures: u32,
    },
    /// This command exits with status 0.
    Exec {
        /// argv of the check; run in the node's working directory.
        command: Vec<String>,
        /// How often.
        #[serde(with = "humantime_serde", default = "default_interval")]
        interval: Duration,
        /// How long one attempt may take (then it is killed and counts as failed).
        #[serde(with = "humantime_serde", default = "default_timeout")]
        timeout: Duration,
        /// Failed attempts in a row that make the node unhealthy.
        #[serde(default = "default_failures")]
        failures: u32,
    },
}

fn default_path() -> String {
    "/".to_owned()
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_failures() -> u32 {
    3
}

impl Liveness {
    /// The kind as spelled in files.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http { .. } => "http",
            Self::Tcp { .. } => "tcp",
            Self::Exec { .. } => "exec",
        }
    }

    /// `(interval, timeout, failures)`.
    pub fn timing(&self) -> (Duration, Duration, u32) {
        match self {
            Self::Http {
                interval,
                timeout,
                failures,
                ..
            }
            | Self::Tcp {
                interval,
                timeout,
                failures,
                ..
            }
            | Self::Exec {
                interval,
                timeout,
                failures,
                ..
            } => (*interval, *timeout, *failures),
        }
    }
}

/// Liveness kinds, as spelled in files.
pub const LIVENESS_KINDS: &[&str] = &["http", "tcp", "exec"];

/// Smallest `memory.max` / `memory.high`: less cannot hold a program's first pages.
pub const MIN_MEMORY: u64 = 1 << 20;
/// Smallest `cpus` (the kernel's smallest quota, 1 ms per 100 ms period).
pub const MIN_CPUS: f64 = 0.01;
/// Largest `cpus`.
pub const MAX_CPUS: f64 = 4096.0;
/// Range of `cpu_weight` and `io_weight` (cgroup v2's; 100 is the default).
pub const WEIGHT_RANGE: (u32, u32) = (1, 10_000);
/// Largest `pids_max` (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4_194_304;
/// Bounds of `watchdog`.
pub const WATCHDOG_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Bounds of a probe's `interval`.
pub const PROBE_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Bounds of a probe's `timeout`.
pub const PROBE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(3600));
/// Largest probe `failures`.
pub const MAX_PROBE_FAILURES: u32 = 100;

/// What is wrong with one resource or liveness setting: the key below the node (or
/// role) and the message.
pub type Problem = (String, String);

/// Checks the resource and liveness settings of one node or role template.
pub fn check(
    memory: Option<&Memory>,
    cpus: Option<f64>,
    cpu_weight: Option<u32>,
    pids_max: Option<u64>,
    io_weight: Option<u32>,
    watchdog: Option<Duration>,
    liveness: Option<&Liveness>,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key: &str, message: String| out.push((key.to_owned(), message));
    if let Some(m) = memory {
        for (key, v) in [("memory.max", m.max), ("memory.high", m.high)] {
            if let Some(v) = v
                && v.0 < MIN_MEMORY
            {
                bad(
                    key,
                    format!("{key} {v} is too small: at least {}", ByteSize(MIN_MEMORY)),
                );
            }
        }
        if let (Some(max), Some(high)) = (m.max, m.high)
            && high > max
        {
            bad(
                "memory.high",
                format!("memory.high {high} is above memory.max {max}"),
            );
        }
    }
    if let Some(c) = cpus
        && !(c.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&c))
    {
        bad(
            "cpus",
            format!("cpus {c} is out of range: allowed {MIN_CPUS} to {MAX_CPUS}"),
        );
    }
    let (lo, hi) = WEIGHT_RANGE;
    for (key, w) in [("cpu_weight", cpu_weight), ("io_weight", io_weight)] {
        if let Some(w) = w
            && !(lo..=hi).contains(&w)
        {
            bad(
                key,
                format!("{key} {w} is out of range: allowed {lo} to {hi}"),
            );
        }
    }
    if let Some(p) = pids_max
        && !(1..=MAX_PIDS).contains(&p)
    {
        bad(
            "pids_max",
            format!("pids_max {p} is out of range: allowed 1 to {MAX_PIDS}"),
        );
    }
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let mut within = |key: &str, d: Duration, (lo, hi): (Duration, Duration)| {
        if !(lo..=hi).contains(&d) {
            bad(
                key,
                format!(
                    "{key} {} is out of range: allowed {} to {}",
                    show(d),
                    show(lo),
                    show(hi)
                ),
            );
        }
    };
    if let Some(w) = watchdog {
        within("watchdog", w, WATCHDOG_RANGE);
    }
    if let Some(l) = liveness {
        let (interval, timeout, failures) = l.timing();
        within("liveness.interval", interval, PROBE_INTERVAL_RANGE);
        within("liveness.timeout", timeout, PROBE_TIMEOUT_RANGE);
        if !(1..=MAX_PROBE_FAILURES).contains(&failures) {
            out.push((
                "liveness.failures".to_owned(),
                format!(
                    "liveness.failures {failures} is out of range: allowed 1 to {MAX_PROBE_FAILURES}"
                ),
            ));
        }
        match l {
            Liveness::Http { port: 0, .. } | Liveness::Tcp { port: 0, .. } => out.push((
                "liveness.port".to_owned(),
                "liveness.port must be 1-65535".to_owned(),
            )),
            Liveness::Http { path, .. }
                if !path.starts_with('/') || path.chars().any(char::is_whitespace) =>
            {
                out.push((
                    "liveness.path".to_owned(),
                    format!("liveness.path '{path}' must start with '/' and hold no white space"),
                ));
            }
            Liveness::Exec { command, .. }
                if command.first().is_none_or(String::is_empty)
                    || command.iter().any(|a| a.contains('\0')) =>
            {
                out.push((
                    "liveness.command".to_owned(),
                    "liveness.command needs a program and no NUL bytes".to_owned(),
                ));
            }
            _ => {}
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        for (text, bytes) in [
            ("4G", 4u64 << 30),
            ("512M", 512 << 20),
            ("64k", 64 << 10),
            ("1T", 1 << 40),
            ("4096", 4096),
            ("3GiB", 3 << 30),
            ("10MB", 10 << 20),
            ("2 G", 2 << 30),
        ] {
            assert_eq!(ByteSize::parse(text), Some(ByteSize(bytes)), "{text}");
        }
        for bad in [
            "",
            "G",
            "4X",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert_eq!(ByteSize::parse(bad), None, "{bad}");
        }
        assert_eq!(ByteSize(4 << 30).to_string(), "4G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        let back: ByteSize = serde_json::from_str("\"1536M\"").unwrap();
        assert_eq!(back, ByteSize(1536 << 20));
        let int: ByteSize = serde_json::from_str("1048576").unwrap();
        assert_eq!(int, ByteSize(1 << 20));
        let e = serde_json::from_str::<ByteSize>("\"lots\"").unwrap_err();
        assert!(e.to_string().contains("invalid size 'lots'"), "{e}");
    }

    #[test]
    fn bounds_are_checked() {
        let m = Memory {
            max: Some(ByteSize(512)),
            high: Some(ByteSize(2 << 20)),
        };
        let probe = Liveness::Exec {
            command: vec![String::new()],
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
            failures: 0,
        };
        let p = check(
            Some(&m),
            Some(0.0),
            Some(0),
            Some(0),
            Some(10_001),
            Some(Duration::ZERO),
            Some(&probe),
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cpu_weight",
                "cpus",
                "io_weight",
                "liveness.command",
                "liveness.failures",
                "liveness.interval",
                "memory.high",
                "memory.max",
                "pids_max",
                "watchdog"
            ]
        );
        assert!(
            p.iter()
                .any(|(_, m)| m == "memory.high 2M is above memory.max 512")
        );
        assert!(check(None, Some(1.5), Some(100), Some(64), None, None, None).is_empty());
    }
}
