//! `sd_notify`-style readiness and status messages to `$NOTIFY_SOCKET`.
//!
//! The socket is a unix datagram socket; a path starting with `@` names a
//! socket in the abstract namespace (the `@` is not part of the name).

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The variable naming the notification socket.
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `message` as one datagram to `$NOTIFY_SOCKET`, if it is set.
///
/// A failure is reported on stderr and otherwise ignored: a service that
/// cannot notify its supervisor keeps running.
pub(crate) fn notify(message: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if target.is_empty() {
        return;
    }
    if let Err(e) = send(&target, message.as_bytes()) {
        eprintln!(
            "drover-testprog: cannot notify {}: {e}",
            target.to_string_lossy()
        );
    }
}

fn send(target: &OsStr, message: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => socket.send_to_addr(message, &SocketAddr::from_abstract_name(name)?)?,
        None => socket.send_to(message, Path::new(target))?,
    };
    if sent != message.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            message.len()
        )));
    }
    Ok(())
}
