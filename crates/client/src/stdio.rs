//! Writing to stdout and stderr when their readers may go away.
//!
//! `drover status | head -3` closes the pipe while drover still writes. Rust ignores
//! SIGPIPE, so the write fails with `EPIPE`, and `println!` would panic on it (exit
//! status 101 and a panic message). Here a reader that went away is no error: the rest
//! of the output is dropped and the command ends as it would have otherwise, with its
//! own exit status. A stream without end (`monitor`, `logs -f`) stops at once, as
//! `tail -f` does: [`stdout_closed`] tells it, also when nothing is being written.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout found its reader gone; later writes are dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it. A reader that went away is not an error (see
/// the module docs); any other failure (a full disk under `> file`) is, naming stdout.
pub fn out(text: &str) -> anyhow::Result<()> {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot write to standard output: {}",
            crate::io_text(&e)
        )),
    }
}

/// [`out`] with a newline.
pub fn outln(text: &str) -> anyhow::Result<()> {
    out(&format!("{text}\n"))
}

/// Writes `text` to stderr. A failure is dropped: stderr is where it would be told.
pub fn err(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// [`err`] with a newline.
pub fn errln(text: &str) {
    err(&format!("{text}\n"));
}

/// Whether a write to stdout found its reader gone.
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

/// Resolves once stdout is a pipe or socket whose reader went away, whether or not
/// anything was written since; never for a terminal or a file.
///
/// A thread waits in `poll(2)` for no event at all: the kernel reports `POLLERR` (a
/// pipe without readers) and `POLLHUP` (a socket shut down) whatever was asked for.
/// One thread for the process, however many wait (a follow taken up through another
/// controller waits anew).
pub async fn stdout_closed() {
    static CLOSED: std::sync::OnceLock<Option<tokio::sync::watch::Receiver<bool>>> =
        std::sync::OnceLock::new();
    let Some(mut closed) = CLOSED.get_or_init(watch_stdout).clone() else {
        return std::future::pending().await;
    };
    if closed.wait_for(|c| *c).await.is_ok() {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        return;
    }
    std::future::pending().await
}

/// Starts the thread of [`stdout_closed`]: its receiver turns true once stdout's
/// reader went away (none when the thread cannot be started).
fn watch_stdout() -> Option<tokio::sync::watch::Receiver<bool>> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let watch = std::thread::Builder::new()
        .name("stdout-watch".into())
        .spawn(move || {
            let mut fd = libc::pollfd {
                fd: libc::STDOUT_FILENO,
                events: 0,
                revents: 0,
            };
            loop {
                // SAFETY: `fd` is one valid pollfd, and the count says so.
                let n = unsafe { libc::poll(&raw mut fd, 1, -1) };
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                if fd.revents & libc::POLLNVAL != 0 {
                    return;
                }
                if fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    let _ = tx.send(true);
                    return;
                }
            }
        });
    watch.is_ok().then_some(rx)
}
