//! drover-daemon: the plumbing the daemon binaries share.
//!
//! Config files (`--config FILE.toml`, whose keys mirror the long flags), logging to
//! stderr with `RUST_LOG` filtering, the async runtime, SIGTERM/SIGINT turned into a
//! cancellation token, SIGHUP and watched files as reload requests ([`reload`]), and
//! systemd's notification protocol ([`notify`]). The daemons'
//! libraries do not use this crate; only their thin `main.rs` do.

pub mod notify;
pub mod reload;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Reads a TOML config file into `T` (whose fields are all optional, as the flags they
/// mirror); errors name the file, the line and the key. Every bad key is reported in
/// one pass, sorted by line, so that a file is mended in one go.
pub fn load_config_file<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    load_config_file_checked(path, |_, _| None)
}

/// As [`load_config_file`], with `check` asked about each key whose value has the right
/// type: what is wrong with it (out of range, not one of the names it may be), reported
/// with every other bad key at the key's own line.
pub fn load_config_file_checked<T: DeserializeOwned>(
    path: &Path,
    check: impl Fn(&str, &toml::Value) -> Option<String>,
) -> anyhow::Result<T> {
    use std::io::Read;
    // A settings file is a few lines; reading a device named by mistake must end.
    const MAX: u64 = 1 << 20;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX,
        "config file {} is larger than {MAX} bytes: not a settings file",
        path.display()
    );
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let whole: toml::Table = toml::from_str(&text).map_err(|e| match e.span() {
        Some(s) => anyhow::anyhow!(
            "{}:{}: {}",
            path.display(),
            line_of(s.start),
            e.message().trim_end()
        ),
        None => anyhow::anyhow!("{}: {}", path.display(), e.message().trim_end()),
    })?;
    // Where each key is written; the file parsed above, so this parses too.
    let lines: std::collections::BTreeMap<String, usize> = toml::de::DeTable::parse(&text)
        .map(|doc| {
            doc.get_ref()
                .iter()
                .map(|(k, _)| (k.get_ref().to_string(), line_of(k.span().start)))
                .collect()
        })
        .unwrap_or_default();
    // Each key on its own: serde stops at the first error, which would hide the others.
    let mut errors: Vec<(usize, String)> = whole
        .iter()
        .filter_map(|(key, value)| {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            let line = lines.get(key).copied().unwrap_or(0);
            match toml::Value::Table(one).try_into::<T>() {
                Err(e) => Some((line, format!("{key}: {}", e.message().trim_end()))),
                Ok(_) => check(key, value).map(|why| (line, format!("{key}: {why}"))),
            }
        })
        .collect();
    if !errors.is_empty() {
        errors.sort();
        let all: Vec<String> = errors
            .into_iter()
            .map(|(line, e)| format!("{}:{line}: {e}", path.display()))
            .collect();
        anyhow::bail!("{}", all.join("\n"));
    }
    toml::Value::Table(whole)
        .try_into()
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message().trim_end()))
}

/// The error for a setting given nowhere.
pub fn missing(flag: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "missing --{flag} (or DROVER_{}, or `{}` in the --config file)",
        flag.to_uppercase().replace('-', "_"),
        flag.replace('-', "_")
    )
}

/// Serde helper: `Option<Duration>` from a humane string such as `"10s"`.
pub mod humantime_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Deserializes `"250ms"`, `"10s"`, `"1m"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// The longest duration a daemon setting takes: ten years, far beyond any timeout or
/// retention, and far from where adding it to a clock reading or multiplying it a few
/// times would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Reads a duration setting (`"10s"`, `"250ms"`, `"1m"`), of at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration such as \"10s\" or \"250ms\" ({e})"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "'{s}' is longer than the longest duration a setting takes ({} days)",
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(d)
}

/// The shortest keep-alive interval: shorter ones would have the daemons spend their
/// time on keep-alives.
pub const MIN_KEEP_ALIVE: Duration = Duration::from_millis(100);

/// Checks that keep-alives are not so frequent that they are all the daemons do.
pub fn check_keep_alive(keep_alive: Duration) -> Result<(), String> {
    if keep_alive < MIN_KEEP_ALIVE {
        return Err(format!(
            "keep-alive ({}) must be at least {}",
            humantime::format_duration(keep_alive),
            humantime::format_duration(MIN_KEEP_ALIVE)
        ));
    }
    Ok(())
}

/// A duration setting's value, for the checks of [`load_config_file_checked`] (which
/// see only values of the right type).
pub fn duration_value(v: &toml::Value) -> Option<Duration> {
    v.as_str().and_then(|s| parse_duration(s).ok())
}

/// Checks that keep-alives are sent well within the idle timeout, and not so often
/// that they are all the daemons do.
pub fn check_liveness(keep_alive: Duration, idle_timeout: Duration) -> anyhow::Result<()> {
    check_keep_alive(keep_alive).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        keep_alive < idle_timeout,
        "keep-alive ({}) must be shorter than the idle timeout ({})",
        humantime::format_duration(keep_alive),
        humantime::format_duration(idle_timeout)
    );
    Ok(())
}

/// Smallest size at which a node's output file may be rotated: below a page, rotation
/// would outrun the writes it bounds.
pub const MIN_LOG_MAX_BYTES: u64 = 4096;
/// Largest rotation size (1 TiB).
pub const MAX_LOG_MAX_BYTES: u64 = 1 << 40;
/// Most rotated files kept per stream.
pub const MAX_LOG_KEEP: u32 = 1000;

/// Reads a size flag (`--log-max-bytes`, `--audit-max-bytes`): bytes, or a number with
/// a K, M, G or T suffix (powers of 1024), as sizes in cluster files.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    drover_proto::resources::ByteSize::parse(s)
        .map(|b| b.0)
        .ok_or_else(|| format!("'{s}' is not a size: bytes, or a number with K, M, G or T (powers of 1024), such as 10M"))
}

/// Checks the bounds of node log rotation (`--log-max-bytes`, `--log-keep`).
pub fn check_log_limits(max_bytes: u64, keep: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (MIN_LOG_MAX_BYTES..=MAX_LOG_MAX_BYTES).contains(&max_bytes),
        "log_max_bytes {max_bytes} is out of range: allowed {MIN_LOG_MAX_BYTES} (4 KiB) to \
         {MAX_LOG_MAX_BYTES} (1 TiB)"
    );
    anyhow::ensure!(
        keep <= MAX_LOG_KEEP,
        "log_keep {keep} is out of range: allowed 0 to {MAX_LOG_KEEP}"
    );
    Ok(())
}

/// What is logged unless `RUST_LOG` says otherwise. A controller restarted on its
/// address is presented address-validation tokens its previous process issued, which
/// QUIC refuses as it should, with a warning per connection that tells an operator
/// nothing.
const DEFAULT_LOG_FILTER: &str = "info,quinn_proto::bloom_token_log=error";

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); colour only on a terminal
/// and never when `NO_COLOR` is set.
///
/// A line that cannot be written is dropped: the subscriber's default is to report the
/// failure with `eprintln!`, which panics when stderr is the broken pipe itself (the
/// `ssh` session or `| logger` the daemon was started from went away), and a daemon
/// must not end because nobody reads its log.
pub fn init_logging() {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
}

/// Runs a daemon: logging, a runtime, a shutdown token cancelled by SIGTERM or SIGINT.
/// Returns the process exit code; errors are logged as one line.
///
/// Under systemd (`NOTIFY_SOCKET` set) it also pings the watchdog when the unit asks for
/// one, and sends `STOPPING=1` on SIGTERM or SIGINT, before it cancels the token.
/// `READY=1` is the daemon's own to send ([`notify::ready`]), once it serves.
pub fn main<F, Fut>(body: F) -> std::process::ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run(body, true)
}

/// As [`main`], for a daemon that pings the systemd watchdog itself, from its core
/// ([`notify::spawn_watchdog_with`]), so that a stuck core stops the pings.
pub fn main_with_own_watchdog<F, Fut>(body: F) -> std::process::ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run(body, false)
}

fn run<F, Fut>(body: F, watchdog: bool) -> std::process::ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_logging();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                // SIGHUP asks for a reload; until the daemon listens for it, it must not
                // end the process (its default action). The handler stays installed.
                let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                if watchdog {
                    notify::spawn_watchdog();
                }
                body(shutdown).await
            })
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", drover_proto::error_text::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    // Before the token: a daemon that stops at once may end the runtime, and this task
    // with it, before another task would get to run.
    notify::stopping();
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[serde(default, with = "humantime_opt")]
        idle_timeout: Option<Duration>,
    }

    #[test]
    fn config_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "idle_timeout = \"5s\"\nbogus = 1\n").unwrap();
        let err = load_config_file::<T>(&p).unwrap_err().to_string();
        assert!(
            err.contains("c.toml:2: bogus: unknown field `bogus`"),
            "{err}"
        );
        std::fs::write(&p, "idle_timeout = \"5s\"\n").unwrap();
        let t: T = load_config_file(&p).unwrap();
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(5)));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only the errors of reading it are looked at")]
    struct Many {
        keep: Option<u32>,
        name: Option<String>,
        #[serde(default, with = "humantime_opt")]
        idle_timeout: Option<Duration>,
    }

    #[test]
    fn every_bad_key_is_named_at_its_line_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "# settings\nname = \"a\"\nkeep = \"five\"\ncolour = 1\nidle_timeout = \"soon\"\n\nkeep2 = -1\n",
        )
        .unwrap();
        let err = load_config_file::<Many>(&p).unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        let at = |n: usize, key: &str| format!("{}:{n}: {key}: ", p.display());
        assert_eq!(lines.len(), 4, "{err}");
        assert!(lines[0].starts_with(&at(3, "keep")), "{err}");
        assert!(lines[1].starts_with(&at(4, "colour")), "{err}");
        assert!(lines[2].starts_with(&at(5, "idle_timeout")), "{err}");
        assert!(lines[2].contains("soon"), "{err}");
        assert!(lines[3].starts_with(&at(7, "keep2")), "{err}");
        // A syntax error is one line, where it is.
        std::fs::write(&p, "name = \"a\"\nkeep = \n").unwrap();
        let err = load_config_file::<Many>(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2: ", p.display())), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn log_limits_name_the_setting_and_the_range() {
        check_log_limits(MIN_LOG_MAX_BYTES, 0).unwrap();
        check_log_limits(MAX_LOG_MAX_BYTES, MAX_LOG_KEEP).unwrap();
        for bytes in [0, 1, MIN_LOG_MAX_BYTES - 1, MAX_LOG_MAX_BYTES + 1, u64::MAX] {
            let err = check_log_limits(bytes, 5).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "log_max_bytes {bytes} is out of range: allowed 4096"
                )),
                "{err}"
            );
        }
        let err = check_log_limits(MIN_LOG_MAX_BYTES, MAX_LOG_KEEP + 1)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "log_keep 1001 is out of range: allowed 0 to 1000");
    }

    #[test]
    fn liveness_check() {
        assert!(check_liveness(Duration::from_secs(2), Duration::from_secs(10)).is_ok());
        assert!(check_liveness(Duration::from_secs(10), Duration::from_secs(10)).is_err());
        assert!(check_liveness(Duration::ZERO, Duration::from_secs(10)).is_err());
        assert!(check_liveness(Duration::from_millis(100), Duration::from_secs(10)).is_ok());
        assert!(parse_duration("3650days").is_ok());
        let err = parse_duration("5000000000000000000s").unwrap_err();
        assert!(
            err.contains("longer than the longest duration a setting takes"),
            "{err}"
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .starts_with("'soon' is not a duration")
        );
    }
}
