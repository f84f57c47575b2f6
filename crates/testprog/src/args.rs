//! Hand-written command-line parsing for `drover-testprog`.
//!
//! Every error names the flag it is about, so a test that passes a wrong
//! flag learns which one from the message (the program exits with code 2).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// The text printed by `--help`.
pub(crate) const USAGE: &str = "\
usage: drover-testprog [FLAGS]

A real test process with configurable behaviour. With no flags it idles forever.
Durations are an integer with an optional suffix: ms, s or m (a bare number is seconds).

  --ready-after DUR       after DUR send READY=1 to $NOTIFY_SOCKET (never without this flag)
  --status TEXT           send STATUS=TEXT to $NOTIFY_SOCKET at start
  --listen ADDR           listen on TCP ADDR (e.g. 127.0.0.1:7000); each connection gets
                          \"drover-testprog\\n\" and is closed
  --listen-after DUR      bind the --listen socket only after DUR
  --exit-after DUR        exit after DUR with the --exit-code
  --exit-code N           exit code for --exit-after (default 0) or --crash-at-start (default 3)
  --crash-at-start        print \"testprog: crashing at start as asked\" to stderr and exit at once
  --ignore-sigterm        ignore SIGTERM (SIGKILL still works)
  --term-exit-code N      on SIGTERM exit cleanly with code N (default: die of SIGTERM)
  --spawn-children N      start N copies of this program running --sleep-forever (not waited on)
  --setsid                the --spawn-children children start their own session
  --children-file PATH    write the children's PIDs there, one per line (atomically)
  --sleep-forever         idle forever (the default behaviour)
  --own-session           call setsid() at startup (used for --setsid children)
  --stdout-rate N         write N lines per second to stdout
  --stderr-rate N         write N lines per second to stderr
  --lines N               stop writing after N lines per stream (and keep running)
  --print TEXT            print TEXT to stdout at start (repeatable)
  --eprint TEXT           print TEXT to stderr at start (repeatable)
  --value NAME=JSON       answer JSON for NAME in value queries (repeatable)
  --raw-socket            at start, open a raw IPv4 ICMP socket (needs CAP_NET_RAW) and
                          print \"raw socket: ok\" or \"raw socket: <error>\" to stdout
  --read-file PATH        at start, read PATH and print \"read PATH: ok\" or
                          \"read PATH: <error>\" to stdout (repeatable)
  --alloc-mib N           allocate N MiB at start and write to all of it
  --fork-until-fail       start sleeping copies until a fork fails; print how many
  --watchdog              send WATCHDOG=1 at a quarter of $WATCHDOG_USEC; print whether
                          $WATCHDOG_PID is this process
  --http ADDR             answer HTTP requests on TCP ADDR with 200 OK
  --hang-after DUR        after DUR stop the watchdog pings, leave HTTP requests
                          unanswered and close the --listen socket
  --check-http ADDR       only GET / on ADDR: exit 0 on a 200 answer, 1 otherwise
  -h, --help              print this help

If $DROVER_QUERY_SOCKET is set, a value query server listens on that unix stream
socket: a client writes {\"id\": \"NAME\"} and a newline, and gets back {\"value\": JSON}
or {\"error\": MESSAGE} and a newline. Built-in ids: pid, node, args, env.VAR,
file.PATH.
";

/// What the command line asks for.
#[derive(Debug, Default)]
pub(crate) struct Config {
    pub(crate) ready_after: Option<Duration>,
    pub(crate) status: Option<String>,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) listen_after: Option<Duration>,
    pub(crate) exit_after: Option<Duration>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) crash_at_start: bool,
    pub(crate) raw_socket: bool,
    pub(crate) read_files: Vec<PathBuf>,
    pub(crate) ignore_sigterm: bool,
    pub(crate) term_exit_code: Option<i32>,
    pub(crate) spawn_children: Option<u32>,
    pub(crate) setsid: bool,
    pub(crate) children_file: Option<PathBuf>,
    pub(crate) sleep_forever: bool,
    pub(crate) own_session: bool,
    pub(crate) stdout_rate: Option<u32>,
    pub(crate) stderr_rate: Option<u32>,
    pub(crate) lines: Option<u64>,
    pub(crate) print: Vec<String>,
    pub(crate) eprint: Vec<String>,
    pub(crate) values: BTreeMap<String, Value>,
    pub(crate) alloc_mib: Option<u64>,
    pub(crate) fork_until_fail: bool,
    pub(crate) watchdog: bool,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) hang_after: Option<Duration>,
    pub(crate) check_http: Option<SocketAddr>,
}

/// The outcome of a successful parse.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// Run with this configuration.
    Run(Box<Config>),
    /// `--help` was given.
    Help,
}

/// A command-line error; its message names the offending flag or argument.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(message: impl Into<String>) -> ArgError {
    ArgError(message.into())
}

/// Parses the arguments that follow the program name.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, ArgError> {
    let mut config = Config::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|raw| err(format!("argument {raw:?} is not valid UTF-8")))?;
        // `--flag=value` is accepted as well as `--flag value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || -> Result<String, ArgError> {
            match &inline {
                Some(value) => Ok(value.clone()),
                None => args
                    .next()
                    .ok_or_else(|| err(format!("{flag} needs a value")))?
                    .into_string()
                    .map_err(|raw| err(format!("{flag}: value {raw:?} is not valid UTF-8"))),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--ready-after" => {
                set_once(&mut config.ready_after, &flag, duration(&flag, &value()?)?)?
            }
            "--status" => set_once(&mut config.status, &flag, value()?)?,
            "--listen" => {
                let raw = value()?;
                let addr = raw.parse().map_err(|_| {
                    err(format!(
                        "{flag}: '{raw}' is not a socket address like 127.0.0.1:7000"
                    ))
                })?;
                set_once(&mut config.listen, &flag, addr)?;
            }
            "--http" | "--check-http" => {
                let raw = value()?;
                let addr = raw.parse().map_err(|_| {
                    err(format!(
                        "{flag}: '{raw}' is not a socket address like 127.0.0.1:7000"
                    ))
                })?;
                let slot = if flag == "--http" {
                    &mut config.http
                } else {
                    &mut config.check_http
                };
                set_once(slot, &flag, addr)?;
            }
            "--alloc-mib" => set_once(&mut config.alloc_mib, &flag, number(&flag, &value()?)?)?,
            "--hang-after" => set_once(&mut config.hang_after, &flag, duration(&flag, &value()?)?)?,
            "--listen-after" => {
                set_once(&mut config.listen_after, &flag, duration(&flag, &value()?)?)?
            }
            "--exit-after" => set_once(&mut config.exit_after, &flag, duration(&flag, &value()?)?)?,
            "--exit-code" => set_once(&mut config.exit_code, &flag, exit_code(&flag, &value()?)?)?,
            "--term-exit-code" => set_once(
                &mut config.term_exit_code,
                &flag,
                exit_code(&flag, &value()?)?,
            )?,
            "--spawn-children" => {
                set_once(&mut config.spawn_children, &flag, number(&flag, &value()?)?)?
            }
            "--children-file" => {
                set_once(&mut config.children_file, &flag, PathBuf::from(value()?))?
            }
            "--stdout-rate" => set_once(&mut config.stdout_rate, &flag, number(&flag, &value()?)?)?,
            "--stderr-rate" => set_once(&mut config.stderr_rate, &flag, number(&flag, &value()?)?)?,
            "--lines" => set_once(&mut config.lines, &flag, number(&flag, &value()?)?)?,
            "--print" => config.print.push(value()?),
            "--read-file" => config.read_files.push(PathBuf::from(value()?)),
            "--eprint" => config.eprint.push(value()?),
            "--value" => {
                let raw = value()?;
                let (name, json) = raw
                    .split_once('=')
                    .ok_or_else(|| err(format!("{flag}: '{raw}' is not NAME=JSON")))?;
                if name.is_empty() {
                    return Err(err(format!("{flag}: '{raw}' has an empty NAME")));
                }
                let json: Value = serde_json::from_str(json).map_err(|e| {
                    err(format!(
                        "{flag}: '{json}' for '{name}' is not valid JSON: {e}"
                    ))
                })?;
                if config.values.insert(name.to_owned(), json).is_some() {
                    return Err(err(format!("{flag}: '{name}' is given more than once")));
                }
            }
            "--crash-at-start" | "--ignore-sigterm" | "--setsid" | "--sleep-forever"
            | "--own-session" | "--raw-socket" | "--fork-until-fail" | "--watchdog" => {
                if inline.is_some() {
                    return Err(err(format!("{flag} takes no value")));
                }
                let switch = match flag.as_str() {
                    "--crash-at-start" => &mut config.crash_at_start,
                    "--ignore-sigterm" => &mut config.ignore_sigterm,
                    "--setsid" => &mut config.setsid,
                    "--sleep-forever" => &mut config.sleep_forever,
                    "--raw-socket" => &mut config.raw_socket,
                    "--fork-until-fail" => &mut config.fork_until_fail,
                    "--watchdog" => &mut config.watchdog,
                    _ => &mut config.own_session,
                };
                *switch = true;
            }
            _ if flag.starts_with('-') => return Err(err(format!("unknown flag '{flag}'"))),
            _ => {
                return Err(err(format!(
                    "unexpected argument '{flag}' (all arguments are flags)"
                )));
            }
        }
    }
    validate(&config)?;
    Ok(Parsed::Run(Box::new(config)))
}

/// Rejects flags that would have no effect or that contradict each other.
fn validate(config: &Config) -> Result<(), ArgError> {
    if config.listen_after.is_some() && config.listen.is_none() {
        return Err(err("--listen-after needs --listen"));
    }
    if config.exit_code.is_some() && config.exit_after.is_none() && !config.crash_at_start {
        return Err(err("--exit-code needs --exit-after or --crash-at-start"));
    }
    if config.term_exit_code.is_some() && config.ignore_sigterm {
        return Err(err("--term-exit-code conflicts with --ignore-sigterm"));
    }
    if config.setsid && config.spawn_children.is_none() {
        return Err(err("--setsid needs --spawn-children"));
    }
    if config.children_file.is_some() && config.spawn_children.is_none() {
        return Err(err("--children-file needs --spawn-children"));
    }
    if config.lines.is_some() && config.stdout_rate.is_none() && config.stderr_rate.is_none() {
        return Err(err("--lines needs --stdout-rate or --stderr-rate"));
    }
    if config.sleep_forever && config.exit_after.is_some() {
        return Err(err("--sleep-forever conflicts with --exit-after"));
    }
    if config.sleep_forever && config.crash_at_start {
        return Err(err("--sleep-forever conflicts with --crash-at-start"));
    }
    Ok(())
}

fn set_once<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), ArgError> {
    if slot.replace(value).is_some() {
        return Err(err(format!("{flag} is given more than once")));
    }
    Ok(())
}

fn number<T: std::str::FromStr>(flag: &str, raw: &str) -> Result<T, ArgError> {
    raw.parse()
        .map_err(|_| err(format!("{flag}: '{raw}' is not a non-negative integer")))
}

fn exit_code(flag: &str, raw: &str) -> Result<i32, ArgError> {
    match raw.parse::<u8>() {
        Ok(code) => Ok(i32::from(code)),
        Err(_) => Err(err(format!(
            "{flag}: '{raw}' is not an exit code (0 to 255)"
        ))),
    }
}

fn duration(flag: &str, raw: &str) -> Result<Duration, ArgError> {
    parse_duration(raw).map_err(|message| err(format!("{flag}: {message}")))
}

/// Parses `500ms`, `2s`, `1m` or a bare number of seconds such as `0` or `5`.
pub(crate) fn parse_duration(raw: &str) -> Result<Duration, String> {
    let (digits, millis_per_unit) = if let Some(digits) = raw.strip_suffix("ms") {
        (digits, 1)
    } else if let Some(digits) = raw.strip_suffix('s') {
        (digits, 1_000)
    } else if let Some(digits) = raw.strip_suffix('m') {
        (digits, 60_000)
    } else {
        (raw, 1_000)
    };
    let bad =
        || format!("'{raw}' is not a duration like 500ms, 2s, 1m or a bare number of seconds");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u64 = digits.parse().map_err(|_| bad())?;
    count
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{raw}' is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, ArgError> {
        match parse(args.iter().map(OsString::from))? {
            Parsed::Run(config) => Ok(*config),
            Parsed::Help => panic!("unexpected help"),
        }
    }

    fn error(args: &[&str]) -> String {
        run(args).expect_err("should fail").to_string()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in [
            "",
            "ms",
            "s",
            "-1",
            "1.5s",
            "1h",
            "2 s",
            "x",
            "99999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn no_flags_is_default() {
        let config = run(&[]).unwrap();
        assert!(config.exit_after.is_none() && !config.crash_at_start && config.values.is_empty());
    }

    #[test]
    fn full_command_line() {
        let config = run(&[
            "--ready-after=250ms",
            "--status",
            "starting up",
            "--listen",
            "127.0.0.1:7000",
            "--listen-after",
            "1s",
            "--exit-after",
            "2m",
            "--exit-code",
            "4",
            "--spawn-children",
            "2",
            "--setsid",
            "--children-file",
            "/tmp/kids",
            "--stdout-rate",
            "10",
            "--lines",
            "5",
            "--value",
            "a={\"b\":[1,2]}",
            "--value=c=\"d=e\"",
            "--print",
            "x",
            "--print",
            "y",
        ])
        .unwrap();
        assert_eq!(config.ready_after, Some(Duration::from_millis(250)));
        assert_eq!(config.status.as_deref(), Some("starting up"));
        assert_eq!(config.listen, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(config.exit_after, Some(Duration::from_secs(120)));
        assert_eq!(config.exit_code, Some(4));
        assert_eq!(config.spawn_children, Some(2));
        assert!(config.setsid);
        assert_eq!(config.values["a"], serde_json::json!({"b": [1, 2]}));
        assert_eq!(config.values["c"], serde_json::json!("d=e"));
        assert_eq!(config.print, ["x", "y"]);
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(error(&["--bogus"]), "unknown flag '--bogus'");
        assert_eq!(error(&["--exit-after"]), "--exit-after needs a value");
        assert!(error(&["--exit-after", "5x"]).starts_with("--exit-after: '5x'"));
        assert!(error(&["--exit-code", "256", "--exit-after", "1"]).starts_with("--exit-code:"));
        assert!(error(&["--value", "a"]).starts_with("--value:"));
        assert!(error(&["--value", "a={"]).starts_with("--value:"));
        assert!(error(&["--listen", "nowhere"]).starts_with("--listen:"));
        assert!(error(&["--setsid=yes"]).starts_with("--setsid"));
        assert!(error(&["--status", "a", "--status", "b"]).starts_with("--status"));
        assert!(error(&["stray"]).contains("'stray'"));
        assert!(error(&["--listen-after", "1s"]).starts_with("--listen-after"));
        assert!(error(&["--exit-code", "1"]).starts_with("--exit-code"));
        assert!(
            error(&["--ignore-sigterm", "--term-exit-code", "0"]).starts_with("--term-exit-code")
        );
        assert!(error(&["--setsid"]).starts_with("--setsid"));
        assert!(error(&["--lines", "3"]).starts_with("--lines"));
    }

    #[test]
    fn help() {
        assert!(matches!(
            parse([OsString::from("--help")]),
            Ok(Parsed::Help)
        ));
    }
}
