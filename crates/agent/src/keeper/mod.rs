//! The log keeper: the one process that writes the node log files fed through pipes,
//! so that it holds them to their bound exactly, at any write rate.
//!
//! A node's stdout and stderr are the write ends of two pipes. The keeper, the agent
//! binary run as `drover-agent log-keeper STATE_DIR` ([`run_if_keeper`]), reads the
//! read ends and appends to `<stream>.log`, rotating by rename before a write would
//! take the file past `max_bytes` ([`writer`]). When the disk is slower than a node,
//! the pipe fills and the node blocks in `write`: nothing is dropped. (Podman's conmon
//! and Nomad's logmon work this way.)
//!
//! One keeper per state dir (a lock file, `log-keeper.lock`), listening on
//! `log-keeper.sock` (mode 0600) in the state dir. The agent starts it when none
//! answers (`posix_spawn`, its own process group, cwd the state dir, stdout and stderr
//! to `log-keeper.log`; it moves itself to a `keeper/` leaf of the agent's cgroup subtree, in no node's) and it outlives
//! the agent, as the nodes do. The agent hands it each new pipe's read end with
//! `SCM_RIGHTS` ([`proto`]) and keeps a duplicate, which it never reads: a pipe whose
//! last reader is gone would kill its node with SIGPIPE.
//!
//! - The keeper dies: the agent's [`client`] sees the connection end, starts a new
//!   keeper and hands it every read end again. Lost is what the dead keeper had read
//!   and not yet written (at most a chunk and a partial line per pipe); while no keeper
//!   runs the pipes (1 MiB each where the system allows) fill and the nodes then block.
//!   Nodes started once none has answered for a second (one that cannot come up at
//!   all) write their own files, as without a keeper ([`client::Keeper::available`]).
//! - The agent dies: the keeper writes on. The next agent connects, and the keeper
//!   sends it a duplicate of every read end it holds, so that the agent holds them
//!   again. It holds the nodes' notify sockets too, reads them while no agent is
//!   connected and hands them to the next with what it heard ([`notify`]).
//! - Both die at once: the nodes get SIGPIPE on their next write (or EPIPE where they
//!   ignore it), as they would with a supervisor's pipe anywhere.
//!
//! With no pipe left and no agent connected the keeper exits.

pub mod client;
pub mod notify;
pub mod output;
pub mod proto;
pub mod server;
pub mod writer;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use client::{Keeper, PipeEnd};

/// The first argument that makes the agent binary a log keeper.
pub const KEEPER_ARG: &str = "log-keeper";

/// Size asked for each node pipe's buffer (capped by `/proc/sys/fs/pipe-max-size`), so
/// that a keeper restart does not block the nodes at once.
pub const PIPE_BUFFER: usize = 1024 * 1024;

/// When the process was started as a keeper (`drover-agent log-keeper STATE_DIR`), runs
/// it and returns its exit code; `None` for an ordinary agent. Checked before the
/// agent's options are parsed, so it clashes with none of them.
pub fn run_if_keeper() -> Option<std::process::ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(KEEPER_ARG.as_ref()) {
        return None;
    }
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: drover-agent {KEEPER_ARG} STATE_DIR");
        return Some(std::process::ExitCode::from(2));
    };
    // Its own name in `ps` and `top`, whether started by the agent's path or through
    // `/proc/self/exe` (which would name it `exe`); its threads inherit it.
    let _ = nix::sys::prctl::set_name(c"log-keeper");
    // Its process group is orphaned when the agent that started it dies; were it stopped
    // then (a debugger, SIGSTOP by hand), the kernel would send it SIGHUP, and the nodes
    // would lose their last reader. It has no terminal to hang up.
    // SAFETY: SIG_IGN installs no handler; nothing else in this process sets SIGHUP.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    drover_daemon::init_logging();
    Some(match server::run(Path::new(&dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("log keeper of {}: {e}", Path::new(&dir).display());
            std::process::ExitCode::FAILURE
        }
    })
}

/// The keeper's socket in a state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("log-keeper.sock")
}

/// The keeper's own log in a state dir.
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("log-keeper.log")
}

/// The keeper's lock file in a state dir.
fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("log-keeper.lock")
}

/// Takes the state dir's keeper lock, or `None` when another keeper holds it.
fn lock(state_dir: &Path) -> io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(state_dir);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    // SAFETY: flock takes a descriptor we own and no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(f))
}

/// The address of the socket at `path`, and what must stay open while it is used: a
/// path too long for `sun_path` (a long state dir) is given as
/// `/proc/self/fd/<its directory, opened>/<name>`, which the kernel resolves to the
/// same place.
fn socket_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t, Option<OwnedFd>)> {
    if let Ok((addr, len)) = unix_addr(path) {
        return Ok((addr, len, None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return unix_addr(path).map(|(a, l)| (a, l, None));
    };
    let dir_c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string; a negative result is an error.
    let fd = unsafe {
        libc::open(
            dir_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening {}: {e}", dir.display()),
        ));
    }
    // SAFETY: a new descriptor this process owns.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut short = PathBuf::from(format!("/proc/self/fd/{fd}"));
    short.push(name);
    let (addr, len) = unix_addr(&short)?;
    Ok((addr, len, Some(dir_fd)))
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s.cast_signed();
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, libc::socklen_t::try_from(len).unwrap_or(0)))
}

fn seqpacket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_SEQPACKET
        | libc::SOCK_CLOEXEC
        | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket takes no pointers; a negative result is an error.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds and listens on `path` (replacing a stale socket), mode 0600, non-blocking.
fn listen(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let (addr, len, _dir) = socket_addr(path)?;
    let sock = seqpacket(true)?;
    let _ = std::fs::remove_file(path);
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let ret = unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("binding {}: {e}", path.display()),
        ));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: listen takes no pointers.
    if unsafe { libc::listen(sock.as_raw_fd(), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; a negative result is an error.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A blocking connection to the keeper's socket.
fn connect(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len, _dir) = socket_addr(path)?;
    let sock = seqpacket(false)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The inode number of a pipe (what identifies it to both sides); an error for
/// anything that is not a pipe.
pub fn pipe_ino(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero stat is valid for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptor is not a pipe",
        ));
    }
    Ok(st.st_ino)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes no pointers.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A node stream's pipe: (read end, write end), both close-on-exec (the spawn makes the
/// write end the child's fd 1 or 2), with a buffer of up to [`PIPE_BUFFER`].
pub fn node_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new descriptors this process owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A failure leaves the default (64 KiB): only short keeper gaps block nodes sooner.
    // SAFETY: F_SETPIPE_SZ takes an integer.
    let _ = unsafe {
        libc::fcntl(
            w.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            libc::c_int::try_from(pipe_buffer()).unwrap_or(libc::c_int::MAX),
        )
    };
    Ok((r, w))
}

/// [`PIPE_BUFFER`], or the system's most for unprivileged processes if lower.
fn pipe_buffer() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map_or(PIPE_BUFFER, |max: usize| max.min(PIPE_BUFFER))
    })
}

/// Raises the soft limit on open files towards the hard one, to at most
/// [`NOFILE_WANTED`]: the agent and the keeper each hold two descriptors per running
/// node. (Nodes inherit the agent's limit; a limit in the millions would make the
/// programs that close every descriptor up to it slow.)
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit take a pointer to a valid rlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            let want = lim.rlim_max.min(NOFILE_WANTED);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
            }
        }
    }
}

/// The soft limit on open files [`raise_nofile`] asks for.
pub const NOFILE_WANTED: libc::rlim_t = 65536;
