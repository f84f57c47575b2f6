//! `drover-testprog`: a real test process with configurable behaviour.
//!
//! drover's tests, benchmarks and demos run this program in place of real
//! services. It is not a mock: it is an ordinary process that becomes ready,
//! listens, writes output, ignores signals, forks children or exits as its
//! flags ask. Run `drover-testprog --help` for the full list of flags.
//!
//! # Flags
//!
//! Durations (`DUR`) are an integer with an optional suffix `ms`, `s` or `m`;
//! a bare number is seconds (`500ms`, `2s`, `1m`, `0`). Bad arguments exit
//! with code 2 and a message naming the flag. Both `--flag value` and
//! `--flag=value` are accepted.
//!
//! - `--ready-after DUR`: after `DUR`, send `READY=1\nSTATUS=ready\n` as one
//!   datagram to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//!   namespace). Without this flag READY is never sent.
//! - `--status TEXT`: send `STATUS=TEXT\n` to `$NOTIFY_SOCKET` at start.
//! - `--listen ADDR` and `--listen-after DUR`: bind a TCP listener on `ADDR`
//!   (after `DUR`); each connection gets `drover-testprog\n` and is closed.
//! - `--exit-after DUR` and `--exit-code N` (default 0): exit with `N` after `DUR`.
//! - `--crash-at-start`: write `testprog: crashing at start as asked` to
//!   stderr and exit at once with code 3 (or `--exit-code`).
//! - `--ignore-sigterm`: ignore SIGTERM. Otherwise SIGTERM keeps (or gets
//!   back, if inherited as ignored) its default action, or with
//!   `--term-exit-code N` makes the program exit cleanly with code `N`.
//! - `--spawn-children N`, `--setsid`, `--children-file PATH`: start `N`
//!   copies of this program running `--sleep-forever` (in a new session each
//!   with `--setsid`, done by passing them `--own-session`), write their PIDs
//!   one per line to `PATH` atomically, and never wait on them.
//! - `--sleep-forever`: idle forever (also the behaviour with no flags).
//! - `--own-session`: call `setsid()` at startup.
//! - `--stdout-rate N`, `--stderr-rate N`, `--lines N`: write `N` lines per
//!   second, `testprog <pid> stdout line <seq>` (`seq` from 1), up to
//!   `--lines` per stream; writing stops quietly on `EPIPE`.
//! - `--print TEXT`, `--eprint TEXT`: print a line at start (repeatable).
//! - `--value NAME=JSON`: a value to answer in value queries (repeatable).
//! - `--alloc-mib N`: allocate `N` MiB at start and write to all of it.
//! - `--fork-until-fail`: start sleeping copies until a fork fails, then print
//!   `testprog: forked <n> children, then: <error>`.
//! - `--watchdog`: send `WATCHDOG=1` at a quarter of `$WATCHDOG_USEC`, and print
//!   whether `$WATCHDOG_PID` is this process.
//! - `--http ADDR`: answer HTTP requests with `200 OK`.
//! - `--hang-after DUR`: after `DUR`, stop the watchdog pings, leave HTTP requests
//!   unanswered and close the `--listen` socket.
//! - `--check-http ADDR`: only `GET /` on `ADDR`; exit 0 on `200`, 1 otherwise.
//!
//! The main thread sleeps until `--exit-after` or forever, without waking up
//! periodically.
//!
//! # Value query protocol
//!
//! If `$DROVER_QUERY_SOCKET` is set to a filesystem path, the program binds a
//! unix stream socket there (replacing a stale socket) and serves each
//! connection as follows:
//!
//! 1. The client writes one line of JSON, `{"id": "<name>"}\n`.
//! 2. The server answers one line, `{"value": <json>}\n` or
//!    `{"error": "<message>"}\n`, and closes the connection.
//!
//! Built-in ids: `pid` (a number), `node` (`$DROVER_NODE` or `null`), `args`
//! (the argv strings), `env.<VAR>` (`$VAR` or `null`), `file.<PATH>` (the file's
//! text, relative to the working directory, or `null`). `--value` entries take
//! precedence over built-ins. An unknown id gets
//! `{"error": "unknown identifier '<id>'"}`; a malformed request gets
//! `{"error": "bad request: ..."}`; a client silent for 5 s gets a
//! `bad request` error. Connections are served concurrently. The full text
//! is in `QUERY-PROTOCOL.md` beside this crate's `Cargo.toml`.

mod args;
mod children;
mod health;
mod notify;
mod output;
mod query;

use std::fmt::Display;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::exit;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{SigHandler, SigSet, Signal, signal};

use crate::args::{Config, Parsed};
use crate::output::Stream;

fn main() {
    let config = match args::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{}", args::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("drover-testprog: {e}");
            eprintln!("drover-testprog: run 'drover-testprog --help' for the flags");
            exit(2);
        }
    };
    run(&config)
}

/// Reports a failure to do what the flags ask, and exits with code 1.
fn fail(what: impl Display) -> ! {
    eprintln!("drover-testprog: {what}");
    exit(1)
}

fn run(config: &Config) -> ! {
    if let Some(addr) = config.check_http {
        health::check_http(addr);
    }
    if config.own_session
        && let Err(e) = nix::unistd::setsid()
    {
        fail(format_args!("--own-session: setsid failed: {e}"));
    }
    if config.crash_at_start {
        eprintln!("testprog: crashing at start as asked");
        exit(config.exit_code.unwrap_or(3));
    }
    // Before any thread exists, so that a blocked SIGTERM is blocked in all.
    setup_sigterm(config);

    if let Some(status) = &config.status {
        notify::notify(&format!("STATUS={status}\n"));
    }
    for line in &config.print {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
    if config.raw_socket {
        let raw = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::empty(),
            nix::sys::socket::SockProtocol::Icmp,
        );
        let text = match raw {
            Ok(_) => "raw socket: ok".to_owned(),
            Err(e) => format!("raw socket: {}", e.desc().to_lowercase()),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}").and_then(|()| out.flush());
    }
    for path in &config.read_files {
        let text = match std::fs::read(path) {
            Ok(_) => format!("read {}: ok", path.display()),
            Err(e) => format!("read {}: {}", path.display(), e.kind()),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}").and_then(|()| out.flush());
    }
    for line in &config.eprint {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
    if let Some(path) = std::env::var_os(query::QUERY_SOCKET).filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        if let Err(e) = query::serve(&path, config.values.clone()) {
            fail(format_args!(
                "cannot serve queries on {}: {e}",
                path.display()
            ));
        }
    }
    if let Some(count) = config.spawn_children
        && let Err(e) = children::spawn(count, config.setsid, config.children_file.as_deref())
    {
        fail(format_args!("--spawn-children: {e}"));
    }
    if let Some(addr) = config.listen {
        listen(addr, config.listen_after, config.hang_after.is_some());
    }
    if let Some(mib) = config.alloc_mib {
        health::allocate(mib);
    }
    if config.fork_until_fail {
        health::fork_until_fail();
    }
    if config.watchdog {
        health::ping_watchdog();
    }
    if let Some(addr) = config.http {
        health::serve_http(addr);
    }
    if let Some(delay) = config.hang_after {
        health::hang_after(delay);
    }
    if let Some(delay) = config.ready_after {
        spawn_thread("ready", move || {
            thread::sleep(delay);
            notify::notify("READY=1\nSTATUS=ready\n");
        });
    }
    for (stream, rate) in [
        (Stream::Stdout, config.stdout_rate),
        (Stream::Stderr, config.stderr_rate),
    ] {
        if let Some(rate) = rate
            && let Err(e) = output::start(stream, rate, config.lines)
        {
            fail(format_args!("cannot start the {stream:?} writer: {e}"));
        }
    }

    match config.exit_after {
        Some(delay) => {
            thread::sleep(delay);
            exit(config.exit_code.unwrap_or(0))
        }
        None => loop {
            thread::park();
        },
    }
}

/// Applies `--ignore-sigterm` / `--term-exit-code`, or restores the default
/// action (our parent may have left SIGTERM ignored, which exec keeps).
fn setup_sigterm(config: &Config) {
    if let Some(code) = config.term_exit_code {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        if let Err(e) = set.thread_block() {
            fail(format_args!("--term-exit-code: cannot block SIGTERM: {e}"));
        }
        // Threads inherit the mask, so SIGTERM stays pending until this
        // thread takes it.
        spawn_thread("sigterm", move || {
            loop {
                if let Ok(Signal::SIGTERM) = set.wait() {
                    exit(code);
                }
            }
        });
        return;
    }
    let handler = if config.ignore_sigterm {
        SigHandler::SigIgn
    } else {
        SigHandler::SigDfl
    };
    // SAFETY: SIG_IGN and SIG_DFL install no handler code, so there is no
    // async-signal-safety requirement to uphold.
    if let Err(e) = unsafe { signal(Signal::SIGTERM, handler) } {
        fail(format_args!("cannot set the SIGTERM disposition: {e}"));
    }
}

/// Binds `addr` (after `delay`, in the background; at once otherwise, so the
/// port is open before any READY) and answers each connection; with `may_hang`, closes
/// the socket once the program hangs (polling, so only then).
fn listen(addr: SocketAddr, delay: Option<Duration>, may_hang: bool) {
    let bind = move || match TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => fail(format_args!("--listen: cannot listen on {addr}: {e}")),
    };
    let serve = move |listener: TcpListener| {
        if may_hang {
            let _ = listener.set_nonblocking(true);
        }
        for connection in listener.incoming() {
            if may_hang && health::hung() {
                drop(listener);
                return;
            }
            match connection {
                Ok(mut stream) => {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = stream.write_all(b"drover-testprog\n");
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    eprintln!("drover-testprog: accept on {addr} failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    };
    match delay {
        None => {
            let listener = bind();
            spawn_thread("listener", move || serve(listener));
        }
        Some(delay) => spawn_thread("listener", move || {
            thread::sleep(delay);
            serve(bind());
        }),
    }
}

fn spawn_thread(name: &str, body: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(name.to_owned()).spawn(body) {
        fail(format_args!("cannot start the {name} thread: {e}"));
    }
}
