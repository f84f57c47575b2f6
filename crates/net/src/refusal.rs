//! Telling at once that nothing listens on a peer's UDP port.
//!
//! A QUIC endpoint sends from an unconnected socket, and the kernel reports an ICMP
//! "port unreachable" only on a connected one, so a handshake to a port where nothing
//! listens waits out its whole timeout. [`nothing_listens`] sends a byte from a socket
//! connected to the same address; the kernel turns the ICMP answer into
//! `ECONNREFUSED` there. An interactive client races its handshake against it, so that
//! `drover` against a stopped controller says so at once. Daemons do not: they retry
//! anyway, and a handshake that waits survives a peer that starts meanwhile.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How often the probe is sent again: hosts rate-limit their ICMP answers (loopback
/// does not), so one probe may go unanswered.
const INTERVAL: Duration = Duration::from_millis(250);

/// Resolves, with the error, once the host at `addr` answered that nothing listens on
/// that port. Never resolves otherwise (something listens, the host is silent, or no
/// probe could be sent): the caller's handshake and its timeout decide then.
pub async fn nothing_listens(addr: SocketAddr) -> io::Error {
    match probe(addr).await {
        Some(e) => e,
        None => std::future::pending().await,
    }
}

async fn probe(addr: SocketAddr) -> Option<io::Error> {
    let local: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local).await.ok()?;
    sock.connect(addr).await.ok()?;
    let refused = |e: io::Error| (e.kind() == io::ErrorKind::ConnectionRefused).then_some(e);
    let mut buf = [0u8; 64];
    loop {
        // One byte is no QUIC packet: a listening endpoint drops it unanswered.
        if let Err(e) = sock.send(&[0]).await {
            return refused(e);
        }
        if let Ok(Err(e)) = tokio::time::timeout(INTERVAL, sock.recv(&mut buf)).await {
            return refused(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::nothing_listens;

    #[tokio::test]
    async fn a_port_without_a_listener_is_told_at_once() {
        // Bound, then closed: nothing listens there now.
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(30), nothing_listens(addr))
            .await
            .expect("loopback answers a closed port");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_listening_port_is_never_reported() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        // Long enough for several probes, each of which reaches the socket.
        let got = tokio::time::timeout(Duration::from_millis(800), nothing_listens(addr)).await;
        assert!(got.is_err(), "reported a listening port: {got:?}");
        let mut buf = [0u8; 8];
        sock.set_nonblocking(true).unwrap();
        assert_eq!(
            sock.recv(&mut buf).unwrap(),
            1,
            "the probe reached the port"
        );
    }
}
