//! Ctrl-C, `kill`, a closed terminal: the client closes its connection before it dies.
//!
//! A client that just dies sends nothing more over UDP, so the controller would learn
//! of it only after the connection's idle timeout, and go on serving it until then: a
//! `logs -f` or `monitor --logs` holds a follow on the node's agent, which serves a
//! bounded number of them. On SIGINT, SIGTERM or SIGHUP a thread of its own closes the
//! connection (waiting at most [`CLOSE_WAIT`] for the close packet to leave), then the
//! process dies of the signal as it would have without any of this, so a shell loop
//! around `drover` still stops on Ctrl-C. A signal the client was started with ignored
//! (`nohup`) stays ignored.
//!
//! The signals are blocked in every thread and taken by `sigwait(2)` on that thread, so
//! they are handled wherever the runtime's thread is, in a write to a full pipe too.
//! SIGKILL cannot be caught: then the idle timeout tells the controller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The signals that end the client with a close.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How long a signal waits for the close packet to leave before the process dies.
const CLOSE_WAIT: Duration = Duration::from_millis(50);

/// The connection to close on a signal, while the client has one open.
static OPEN: Mutex<Option<quinn::Connection>> = Mutex::new(None);

/// Set once a signal was taken: the process is about to die of it, and the command,
/// whose connection was closed under it, must neither report that nor exit first.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Blocks the signals in this thread, and so in every thread it starts after, and
/// starts the thread that takes them. Call before the runtime starts its threads.
pub(crate) fn install() {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&raw mut set) };
    let mut any = false;
    for sig in SIGNALS.into_iter().filter(|s| !ignored(*s)) {
        // SAFETY: as above; `sig` is a valid signal number.
        unsafe { libc::sigaddset(&raw mut set, sig) };
        any = true;
    }
    if !any {
        return;
    }
    // SAFETY: `set` is initialised; the old mask is not asked for.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) } != 0
    {
        return;
    }
    let taker = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid place for the result.
            if unsafe { libc::sigwait(&raw const set, &raw mut sig) } == 0 {
                TAKEN.store(true, Ordering::SeqCst);
                close_open();
                die_of(sig);
            }
        });
    if taker.is_err() {
        // Nobody would take them: leave them as they were.
        // SAFETY: as for the block above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut()) };
    }
}

/// Whether `sig` is ignored (the client was started so, e.g. under `nohup`).
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: a zeroed sigaction is a valid place for the current disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: no new action is set (null); `old` receives the current one.
    let read = unsafe { libc::sigaction(sig, std::ptr::null(), &raw mut old) };
    read == 0 && old.sa_sigaction == libc::SIG_IGN
}

/// Waits for the death a taken signal brings, if one was taken: the command ended
/// because its connection was closed for the signal, which is no error to report.
pub(crate) fn await_death_if_signalled() {
    if TAKEN.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// Makes `conn` the connection a signal closes.
pub(crate) fn watch(conn: &quinn::Connection) {
    *OPEN.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
}

/// The client closes its connection itself: nothing for a signal to do.
pub(crate) fn forget() {
    OPEN.lock().unwrap_or_else(PoisonError::into_inner).take();
}

/// Closes the watched connection and waits (at most [`CLOSE_WAIT`]) until its close
/// packet left: the datagram counter moves once the runtime's thread has sent it.
fn close_open() {
    let Some(conn) = OPEN.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return;
    };
    let before = conn.stats().udp_tx.datagrams;
    conn.close(0u32.into(), b"interrupted");
    let deadline = Instant::now() + CLOSE_WAIT;
    while conn.stats().udp_tx.datagrams == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Dies of `sig`, whose disposition is still the default: raised at this thread, where
/// it is blocked, then unblocked here, so it is delivered at once.
fn die_of(sig: libc::c_int) -> ! {
    // SAFETY: plain signal calls on a local, initialised set.
    unsafe {
        libc::raise(sig);
        let mut one: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut one);
        libc::sigaddset(&raw mut one, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const one, std::ptr::null_mut());
    }
    // Not reached while the disposition is the default.
    std::process::exit(128 + sig)
}
