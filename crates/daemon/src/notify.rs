//! systemd's service notification protocol (`sd_notify(3)`), written by hand.
//!
//! A service started with `Type=notify` finds a Unix datagram socket in `NOTIFY_SOCKET`
//! (a path, or an abstract name written with a leading `@`) and sends it newline-separated
//! `KEY=VALUE` lines: `READY=1` once it serves, `STOPPING=1` when it begins to shut down,
//! `STATUS=...` as free text for `systemctl status`, and `WATCHDOG=1` at least once per
//! `WATCHDOG_USEC` microseconds when the unit sets `WatchdogSec=`.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset, so the daemons behave the
//! same outside systemd. Failures are logged and otherwise ignored: a daemon never stops
//! because its supervisor cannot be told something.
//!
//! The daemons' own children never see this socket: the agent starts every node with a
//! cleared environment and a `NOTIFY_SOCKET` of the node's own.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable naming the notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `READY=1`: start-up is complete and the service is serving.
pub fn ready() {
    send_logged("READY=1");
}

/// Sends `STOPPING=1`: the service is shutting down.
pub fn stopping() {
    send_logged("STOPPING=1");
}

/// Sends `STATUS=text`, shown by `systemctl status`; line breaks become spaces.
pub fn status(text: &str) {
    send_logged(&status_line(text));
}

fn status_line(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// Sends `state` (one or more `KEY=VALUE` lines) to `NOTIFY_SOCKET`. Returns `Ok(false)`
/// when the variable is unset or empty (nothing to notify), `Ok(true)` once sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) {
        Some(socket) => send(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends one datagram to the socket a `NOTIFY_SOCKET` value names.
fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = socket_addr(socket)?;
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

fn send_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!("told systemd {state:?}"),
        Ok(false) => {}
        Err(e) => tracing::warn!("{}", describe_error(state, &e)),
    }
}

fn describe_error(state: &str, e: &io::Error) -> String {
    let socket = std::env::var_os(NOTIFY_SOCKET).unwrap_or_default();
    format!(
        "cannot tell systemd {state:?} on {NOTIFY_SOCKET}={}: {e}",
        socket.to_string_lossy()
    )
}

/// The address named by a `NOTIFY_SOCKET` value: an absolute path, or an abstract name
/// written `@name`.
fn socket_addr(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value),
        Some(b'@') => abstract_addr(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unsupported socket address {:?}: expected an absolute path or @abstract-name",
                value.to_string_lossy()
            ),
        )),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on linux",
    ))
}

/// How often systemd expects `WATCHDOG=1`, from the values of `WATCHDOG_USEC` and
/// `WATCHDOG_PID`: `None` when no watchdog is asked for, the value is not a positive
/// number, or the watchdog is meant for another process than `our_pid`.
fn watchdog_timeout(usec: Option<&OsStr>, pid: Option<&OsStr>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// When systemd asked for a watchdog (`WATCHDOG_USEC`, and `WATCHDOG_PID` absent or ours)
/// and `NOTIFY_SOCKET` is set, spawns a task on the current tokio runtime that sends
/// `WATCHDOG=1` every half of the timeout, for as long as the runtime runs. Returns the
/// interval when it did.
pub fn spawn_watchdog() -> Option<Duration> {
    spawn_watchdog_with(|| async { true })
}

/// As [`spawn_watchdog`], but each `WATCHDOG=1` is sent only when `alive` answers true
/// within the interval: a daemon whose core is stuck (or gone) stops the pings, and
/// systemd restarts it.
pub fn spawn_watchdog_with<F, Fut>(alive: F) -> Option<Duration>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let socket = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty())?;
    let usec = std::env::var_os("WATCHDOG_USEC");
    let pid = std::env::var_os("WATCHDOG_PID");
    let timeout = watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())?;
    let every = timeout / 2;
    tracing::debug!(
        "systemd watchdog: {} timeout, pinging every {}",
        humantime::format_duration(timeout),
        humantime::format_duration(every)
    );
    tokio::spawn(watchdog_loop(every, alive, socket));
    Some(every)
}

async fn watchdog_loop<F, Fut>(every: Duration, mut alive: F, socket: std::ffi::OsString)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Log a failure once, not on every tick, and say when it works again.
    let mut failing = false;
    let mut stalled = false;
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(every, alive()).await.unwrap_or(false);
        if !ok {
            if !stalled {
                tracing::error!(
                    "the daemon's core does not answer; no longer pinging the systemd watchdog"
                );
                stalled = true;
            }
            continue;
        }
        if stalled {
            tracing::info!("the daemon's core answers again; pinging the systemd watchdog");
            stalled = false;
        }
        match send(&socket, "WATCHDOG=1") {
            Ok(()) if failing => {
                tracing::info!("systemd watchdog notifications work again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!("{}", describe_error("WATCHDOG=1", &e));
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn watchdog_timeout_follows_usec_and_pid() {
        let us = Some(Duration::from_secs(30));
        assert_eq!(watchdog_timeout(os("30000000"), None, 42), us);
        assert_eq!(watchdog_timeout(os("30000000"), os("42"), 42), us);
        assert_eq!(watchdog_timeout(os("30000000"), os(""), 42), us);
        assert_eq!(watchdog_timeout(os("30000000"), os("41"), 42), None);
        assert_eq!(watchdog_timeout(os("30000000"), os("x"), 42), None);
        assert_eq!(watchdog_timeout(os("0"), None, 42), None);
        assert_eq!(watchdog_timeout(os("soon"), None, 42), None);
        assert_eq!(watchdog_timeout(None, os("42"), 42), None);
    }

    #[test]
    fn socket_addresses_are_paths_or_abstract_names() {
        let a = socket_addr(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = socket_addr(OsStr::new("@drover/notify")).unwrap();
        {
            use std::os::linux::net::SocketAddrExt;
            assert_eq!(a.as_abstract_name(), Some(&b"drover/notify"[..]));
        }
        let err = socket_addr(OsStr::new("relative/path")).unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
        assert!(socket_addr(OsStr::new("vsock:2:1234")).is_err());
    }

    /// Sends to a bound socket, by path and by abstract name.
    #[test]
    fn messages_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let mut recv = |sock: &UnixDatagram| {
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        send(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
        send(path.as_os_str(), &status_line("two\nlines")).unwrap();
        assert_eq!(recv(&sock), "STATUS=two lines");

        let name = format!("drover-notify-test-{}", std::process::id());
        let addr = abstract_addr(name.as_bytes()).unwrap();
        let abstract_sock = UnixDatagram::bind_addr(&addr).unwrap();
        abstract_sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        send(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&abstract_sock), "WATCHDOG=1");

        // Nobody listening: an error to log, not a panic.
        drop(sock);
        assert!(send(path.as_os_str(), "STOPPING=1").is_err());
    }

    /// The pings stop while the daemon's core does not answer, and resume when it does.
    #[test]
    fn watchdog_pings_only_while_the_core_answers() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let every = Duration::from_millis(20);
        let task = rt.spawn(watchdog_loop(
            every,
            move || {
                let ok = flag.load(Ordering::SeqCst);
                async move {
                    if !ok {
                        // A stuck core: no answer within the interval.
                        std::future::pending::<()>().await;
                    }
                    ok
                }
            },
            path.clone().into_os_string(),
        ));
        let runner = std::thread::spawn(move || rt.block_on(task));
        let mut buf = [0u8; 64];
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        alive.store(false, Ordering::SeqCst);
        // Drain what was sent before the core stopped answering; then silence for many
        // intervals.
        sock.set_read_timeout(Some(every * 10)).unwrap();
        let mut silent = false;
        for _ in 0..20 {
            if sock.recv(&mut buf).is_err() {
                silent = true;
                break;
            }
        }
        assert!(silent, "the watchdog kept pinging for a stuck core");
        alive.store(true, Ordering::SeqCst);
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1", "pings resume");
        drop(runner);
    }
}
