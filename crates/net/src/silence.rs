//! A connection whose peer has gone silent for the idle timeout is closed, whatever
//! QUIC's own idle timer says.
//!
//! QUIC never lets a connection's idle timeout be shorter than three probe timeouts
//! (RFC 9000, 10.1), and a probe timeout grows with the round-trip estimates. A
//! connection made while both ends were saturated (hundreds of agents reconnecting to a
//! new leader at once) starts with estimates of up to seconds, and until keep-alives
//! bring them down its idle timeout is several times the one asked for: an agent then
//! takes that long to notice that this leader died too. The keep-alives the connection
//! sends are acknowledged by a live peer, so a connection that receives no datagram for
//! the idle timeout has a dead or unreachable peer, and is closed then.
//!
//! [`Silence`] decides from the count of datagrams received and the time, without I/O;
//! [`close_when_silent`] polls a connection's count and closes it.

use std::time::Duration;

use tokio::time::Instant;

/// The reason a connection closed for silence carries (its peer logs it).
pub const SILENT_REASON: &[u8] = b"peer silent";

/// Tracks when a connection last received a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    limit: Duration,
    count: u64,
    since: Instant,
}

impl Silence {
    /// Starts watching at `now`, with `count` datagrams received so far.
    #[must_use]
    pub fn new(limit: Duration, count: u64, now: Instant) -> Self {
        Self {
            limit,
            count,
            since: now,
        }
    }

    /// Learns the count at `now`; whether nothing has been received for the limit.
    pub fn silent(&mut self, count: u64, now: Instant) -> bool {
        if count != self.count {
            self.count = count;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= self.limit
    }

    /// How often to look: often enough to close within an eighth of the limit late.
    #[must_use]
    pub fn period(&self) -> Duration {
        (self.limit / 8).max(Duration::from_millis(10))
    }
}

/// Closes `conn` once it has received no datagram for `limit`, and returns true then;
/// false when the connection ended otherwise.
pub async fn close_when_silent(conn: quinn::Connection, limit: Duration) -> bool {
    let mut watch = Silence::new(limit, conn.stats().udp_rx.datagrams, Instant::now());
    let mut tick = tokio::time::interval(watch.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = conn.closed() => return false,
        }
        if watch.silent(conn.stats().udp_rx.datagrams, Instant::now()) {
            conn.close(quinn::VarInt::from_u32(0), SILENT_REASON);
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_only_after_the_limit_without_a_datagram() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Silence::new(Duration::from_secs(2), 10, t0);
        assert!(!s.silent(10, ms(1_999)));
        // A datagram moves the start of the silence on.
        assert!(!s.silent(11, ms(1_999)));
        assert!(!s.silent(11, ms(3_998)));
        assert!(s.silent(11, ms(3_999)));
        assert!(!s.silent(12, ms(4_000)));
        assert_eq!(s.period(), Duration::from_millis(250));
    }
}
