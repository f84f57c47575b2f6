//! The messages between the agent and its log keeper, and how they travel.
//!
//! The socket is a unix `SOCK_SEQPACKET` socket: the kernel keeps message boundaries,
//! so a message is one JSON object in one packet, and a descriptor passed with
//! `SCM_RIGHTS` arrives with exactly the message it belongs to (on a stream socket the
//! receiver would have to find which bytes a descriptor came with). A message carries
//! at most [`MAX_FDS`] descriptors; extra ones are closed on receipt. A packet that is
//! not a known message is an error the receiver logs and skips.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::logs::{LogConfig, Stream};

/// Largest packet either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most a [`Msg::Closed`] tail holds, in bytes of output: escaped as JSON (at
/// worst six bytes for one) it stays within [`MAX_MESSAGE`].
pub const TAIL_MAX: usize = 8 * 1024;
/// Descriptors one receive takes at most (more than a message may carry, so that extra
/// ones are received and closed rather than left in flight).
const MAX_RECEIVED_FDS: usize = 8;
/// Most descriptors one message carries.
pub const MAX_FDS: usize = 1;

/// One pipe of one node stream: where its output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeInfo {
    /// The node's name, for messages.
    pub node: String,
    /// Which of its streams.
    pub stream: Stream,
    /// The node directory the stream's files are in (absolute).
    pub dir: PathBuf,
    /// The bound.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl PipeInfo {
    /// The bound as a [`LogConfig`].
    pub fn config(&self) -> LogConfig {
        LogConfig {
            max_bytes: self.max_bytes,
            keep: self.keep,
        }
    }
}

/// A message; the descriptor travelling with it (if any) is passed beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Agent → keeper, first on a connection: the agent's bound, applied to every pipe
    /// held. The keeper answers with a [`Msg::Holding`] per pipe and then [`Msg::Ready`].
    Hello {
        /// Bytes per file.
        max_bytes: u64,
        /// Rotated files kept.
        keep: u32,
    },
    /// Agent → keeper, with the pipe's read end: write what comes out of it.
    Pipe {
        /// Where to.
        pipe: PipeInfo,
    },
    /// Keeper → agent, with a duplicate of the pipe's read end: a pipe the keeper reads.
    Holding {
        /// The pipe's inode number.
        ino: u64,
        /// Where it goes.
        pipe: PipeInfo,
    },
    /// Agent → keeper, with a node's notify socket: hold it (in place of the one held
    /// for that node), so that it outlives the agent; while no agent is connected the
    /// keeper reads it (see [`super::notify`]).
    Notify {
        /// The node.
        node: String,
    },
    /// Agent → keeper: the node is gone; close its notify socket.
    Forget {
        /// The node.
        node: String,
    },
    /// Keeper → agent, on [`Msg::Hello`], with a duplicate of a node's notify socket:
    /// one the keeper holds, and what it read there while no agent was connected.
    HoldingNotify {
        /// The node.
        node: String,
        /// What was read, oldest first.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        heard: Vec<Heard>,
    },
    /// Keeper → agent: every pipe held was told.
    Ready,
    /// Keeper → agent: a pipe reached its end (every writer is gone) and is closed.
    Closed {
        /// The pipe's inode number.
        ino: u64,
        /// The end of what came through it (at most [`TAIL_MAX`] bytes, from a line
        /// start where it was cut), sent once all of it was written out: a failed
        /// process's last words, its own and no later process's. Absent from keepers
        /// that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<String>,
    },
    /// Keeper → agent: a stream's file cannot be written (a full disk): what comes
    /// through its pipes is lost until a write succeeds. Sent when that begins, and on
    /// an agent's [`Msg::Hello`] while it lasts.
    WriteFailing {
        /// The node.
        node: String,
        /// Which of its streams.
        stream: Stream,
        /// Why.
        error: String,
    },
    /// Keeper → agent: a stream's file is written again after [`Msg::WriteFailing`]
    /// (or its last pipe closed first, `ended`); `bytes` of output were lost meanwhile,
    /// where a marker line in the file says (if it could be written).
    Lost {
        /// The node.
        node: String,
        /// Which of its streams.
        stream: Stream,
        /// Bytes of output lost.
        bytes: u64,
        /// Why the writes failed.
        error: String,
        /// The stream's pipes all closed (its process ended) before a write succeeded.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ended: bool,
    },
}

/// A notify datagram the keeper read while no agent was connected: the lines of it an
/// agent acts on, and who sent it (as [`crate::probe::Sender`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heard {
    /// The datagram's lines an agent acts on, one per line.
    pub text: String,
    /// The sender's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The sender's cgroup, read when the datagram came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// Why a packet is not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadMessage {
    /// Larger than [`MAX_MESSAGE`], or cut by the receive buffer.
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    /// Not JSON of a known message.
    #[error("not a log keeper message: {0}")]
    Invalid(String),
    /// A message that needs a descriptor came without one, or one that needs none with one.
    #[error("{0}")]
    Descriptors(String),
}

/// The bytes of a message.
pub fn encode(msg: &Msg) -> Vec<u8> {
    serde_json::to_vec(msg).expect("messages serialize")
}

/// A packet's message, checked against the descriptors that came with it: `Pipe`,
/// `Holding`, `Notify` and `HoldingNotify` need exactly one, the others none.
pub fn decode(bytes: &[u8], fds: usize) -> Result<Msg, BadMessage> {
    if bytes.len() > MAX_MESSAGE {
        return Err(BadMessage::TooLong);
    }
    let msg: Msg = serde_json::from_slice(bytes).map_err(|e| BadMessage::Invalid(e.to_string()))?;
    let wants = usize::from(matches!(
        msg,
        Msg::Pipe { .. } | Msg::Holding { .. } | Msg::Notify { .. } | Msg::HoldingNotify { .. }
    ));
    if fds != wants {
        return Err(BadMessage::Descriptors(format!(
            "a {} message came with {fds} descriptors, not {wants}",
            kind(&msg)
        )));
    }
    if let Msg::Pipe { pipe } | Msg::Holding { pipe, .. } = &msg
        && !pipe.dir.is_absolute()
    {
        return Err(BadMessage::Invalid(format!(
            "node directory {} is not absolute",
            pipe.dir.display()
        )));
    }
    Ok(msg)
}

/// The message's type, for messages about it.
pub fn kind(msg: &Msg) -> &'static str {
    match msg {
        Msg::Hello { .. } => "hello",
        Msg::Pipe { .. } => "pipe",
        Msg::Holding { .. } => "holding",
        Msg::Notify { .. } => "notify",
        Msg::Forget { .. } => "forget",
        Msg::HoldingNotify { .. } => "holding_notify",
        Msg::Ready => "ready",
        Msg::Closed { .. } => "closed",
        Msg::WriteFailing { .. } => "write_failing",
        Msg::Lost { .. } => "lost",
    }
}

/// Sends one packet, with `fd` if given. `MSG_NOSIGNAL`: a peer gone is an error, not a
/// SIGPIPE. On a non-blocking socket `WouldBlock` means nothing was sent.
pub fn send(sock: BorrowedFd<'_>, msg: &Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_with(sock, msg, fd, libc::MSG_NOSIGNAL)
}

/// [`send`], but failing with [`io::ErrorKind::WouldBlock`] instead of waiting for room
/// in the socket.
pub fn try_send(sock: BorrowedFd<'_>, msg: &Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_with(sock, msg, fd, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
}

fn send_with(
    sock: BorrowedFd<'_>,
    msg: &Msg,
    fd: Option<BorrowedFd<'_>>,
    flags: libc::c_int,
) -> io::Result<()> {
    let bytes = encode(msg);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: zeroed msghdr is valid; every pointer set points into `iov`, `bytes` and
    // `control`, which outlive the sendmsg call; the cmsg header written lies within
    // `control`, which CMSG_SPACE sized for one descriptor.
    let ret = unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &raw mut iov;
        hdr.msg_iovlen = 1;
        if let Some(fd) = fd {
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
        libc::sendmsg(sock.as_raw_fd(), &raw const hdr, flags)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What one receive got.
#[derive(Debug)]
pub enum Received {
    /// The peer closed the connection.
    Eof,
    /// A packet: its message or why it is none.
    Packet(Result<(Msg, Option<OwnedFd>), BadMessage>),
}

/// Receives one packet and the descriptors that came with it (close-on-exec). On a
/// non-blocking socket `WouldBlock` means there is none yet.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<Received> {
    // One buffer per thread, kept: a fresh zeroed one per call (and a call that finds
    // nothing is one of every two) cost the keeper more than the messages did.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_MESSAGE + 1]);
    }
    BUF.with(|buf| recv_into(sock, &mut buf.borrow_mut()))
}

fn recv_into(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a few more than we accept, so that extra ones are received and closed
    // rather than left in flight.
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_RECEIVED_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: the msghdr points into `iov`/`buf` and `control`, which outlive the call;
    // the cmsg walk stays within `msg_controllen` as the kernel set it, and each
    // descriptor read from an SCM_RIGHTS message is a new one this process owns.
    let (n, flags) = unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &raw mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        let n = libc::recvmsg(sock.as_raw_fd(), &raw mut hdr, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const hdr, cmsg);
        }
        (n.cast_unsigned(), hdr.msg_flags)
    };
    if n == 0 && fds.is_empty() {
        return Ok(Received::Eof);
    }
    if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || n > MAX_MESSAGE {
        return Ok(Received::Packet(Err(if flags & libc::MSG_CTRUNC != 0 {
            BadMessage::Descriptors("a message came with too many descriptors".to_owned())
        } else {
            BadMessage::TooLong
        })));
    }
    let count = fds.len();
    Ok(Received::Packet(decode(&buf[..n], count).map(|msg| {
        let fd = fds.into_iter().next();
        (msg, fd)
    })))
}

/// A connected pair of seqpacket sockets, close-on-exec (for tests).
#[cfg(test)]
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors this process owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn pipe_info() -> PipeInfo {
        PipeInfo {
            node: "n".into(),
            stream: Stream::Stderr,
            dir: "/var/lib/drover-agent/nodes/n".into(),
            max_bytes: 4096,
            keep: 2,
        }
    }

    #[test]
    fn messages_round_trip_with_their_descriptor() {
        let (a, b) = pair().unwrap();
        let (r, _w) = io::pipe().unwrap();
        let msg = Msg::Pipe { pipe: pipe_info() };
        send(a.as_fd(), &msg, Some(r.as_fd())).unwrap();
        send(a.as_fd(), &Msg::Ready, None).unwrap();
        let Received::Packet(Ok((got, Some(_fd)))) = recv(b.as_fd()).unwrap() else {
            panic!("no pipe message with a descriptor");
        };
        assert_eq!(got, msg);
        let Received::Packet(Ok((Msg::Ready, None))) = recv(b.as_fd()).unwrap() else {
            panic!("no ready message");
        };
        drop(a);
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Eof));
    }

    #[test]
    fn a_closed_notice_carries_its_tail_and_reads_without_one() {
        let msg = Msg::Closed {
            ino: 7,
            tail: Some("last words\n".into()),
        };
        assert_eq!(decode(&encode(&msg), 0).unwrap(), msg);
        // From a keeper that predates tails.
        assert_eq!(
            decode(br#"{"type":"closed","ino":7}"#, 0).unwrap(),
            Msg::Closed { ino: 7, tail: None }
        );
        // The largest tail, every byte escaped, still fits a message.
        let worst = Msg::Closed {
            ino: u64::MAX,
            tail: Some("\u{1}".repeat(TAIL_MAX)),
        };
        assert!(encode(&worst).len() <= MAX_MESSAGE);
    }

    #[test]
    fn loss_notices_round_trip_and_need_no_descriptor() {
        let failing = Msg::WriteFailing {
            node: "n".into(),
            stream: Stream::Stderr,
            error: "No space left on device (os error 28)".into(),
        };
        let lost = Msg::Lost {
            node: "n".into(),
            stream: Stream::Stdout,
            bytes: 123,
            error: "No space left on device (os error 28)".into(),
            ended: false,
        };
        for msg in [failing, lost] {
            assert_eq!(decode(&encode(&msg), 0).unwrap(), msg);
            assert!(matches!(
                decode(&encode(&msg), 1),
                Err(BadMessage::Descriptors(_))
            ));
        }
    }

    #[test]
    fn bad_packets_are_errors_not_panics() {
        assert!(matches!(decode(b"", 0), Err(BadMessage::Invalid(_))));
        assert!(matches!(
            decode(b"{not json", 0),
            Err(BadMessage::Invalid(_))
        ));
        assert!(matches!(
            decode(br#"{"type":"launch_missiles"}"#, 0),
            Err(BadMessage::Invalid(_))
        ));
        assert!(matches!(
            decode(br#"{"type":"closed","ino":"x"}"#, 0),
            Err(BadMessage::Invalid(_))
        ));
        assert_eq!(
            decode(&vec![b' '; MAX_MESSAGE + 1], 0),
            Err(BadMessage::TooLong)
        );
        // A pipe without its descriptor, and a message that needs none with one.
        let pipe = encode(&Msg::Pipe { pipe: pipe_info() });
        assert!(matches!(decode(&pipe, 0), Err(BadMessage::Descriptors(_))));
        assert!(matches!(
            decode(&encode(&Msg::Ready), 1),
            Err(BadMessage::Descriptors(_))
        ));
        let mut relative = pipe_info();
        relative.dir = "nodes/n".into();
        let e = decode(&encode(&Msg::Pipe { pipe: relative }), 1).unwrap_err();
        assert!(e.to_string().contains("not absolute"), "{e}");
        assert_eq!(decode(&pipe, 1).unwrap(), Msg::Pipe { pipe: pipe_info() });
    }

    #[test]
    fn a_packet_with_too_many_descriptors_closes_them_and_is_an_error() {
        let (a, b) = pair().unwrap();
        let (r, _w) = io::pipe().unwrap();
        // Two descriptors with one message, sent by hand.
        let bytes = encode(&Msg::Ready);
        let fds = [r.as_raw_fd(), r.as_raw_fd()];
        // SAFETY: as in `send`, with room for two descriptors.
        let ret = unsafe {
            let mut iov = libc::iovec {
                iov_base: bytes.as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            };
            let space = libc::CMSG_SPACE(size_of_val(&fds) as u32) as usize;
            let mut control = vec![0u8; space];
            let mut hdr: libc::msghdr = std::mem::zeroed();
            hdr.msg_iov = &raw mut iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(&fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), 2);
            libc::sendmsg(a.as_raw_fd(), &raw const hdr, 0)
        };
        assert!(ret > 0);
        let Received::Packet(Err(BadMessage::Descriptors(_))) = recv(b.as_fd()).unwrap() else {
            panic!("two descriptors accepted");
        };
    }
}
