//! drover-metrics: Prometheus metrics without a framework.
//!
//! A [`Registry`] holds counters and histograms (atomics, cheap to update from any
//! task); values that are better computed at scrape time (agents connected, nodes by
//! state) are added by the daemon's render function. [`serve`] answers `GET /metrics`
//! with the text exposition format on a TCP listener; it is off unless the daemon is
//! given a listen address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets, in seconds: 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A distribution of observations in fixed buckets.
#[derive(Debug)]
struct HistogramInner {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum of observations in nanoseconds (an integer, so it can be atomic).
    sum_nanos: AtomicU64,
}

/// A latency histogram.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Self(Arc::new(HistogramInner {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in self.0.bounds.iter().zip(&self.0.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Counter),
    Histogram(Histogram),
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: &'static str,
    /// Rendered label set (`{a="b"}` or empty) -> metric.
    series: BTreeMap<String, Metric>,
}

/// The metrics of one daemon.
#[derive(Debug, Default)]
pub struct Registry {
    /// A std mutex: taken to register a series or render, never across an await.
    families: Mutex<BTreeMap<String, Family>>,
}

/// Renders a label set in exposition syntax, escaping values.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Registry {
    fn series(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        pairs: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            series: BTreeMap::new(),
        });
        family
            .series
            .entry(labels(pairs))
            .or_insert_with(make)
            .clone()
    }

    /// The counter `name` with these labels (created on first use).
    pub fn counter(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Counter {
        match self.series(name, help, "counter", pairs, || {
            Metric::Counter(Counter::default())
        }) {
            Metric::Counter(c) => c,
            Metric::Histogram(_) => panic!("{name} is registered as a histogram"),
        }
    }

    /// The latency histogram `name` with these labels (created on first use).
    pub fn histogram(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Histogram {
        match self.series(name, help, "histogram", pairs, || {
            Metric::Histogram(Histogram::new(LATENCY_BUCKETS))
        }) {
            Metric::Histogram(h) => h,
            Metric::Counter(_) => panic!("{name} is registered as a counter"),
        }
    }

    /// Everything registered, in the text exposition format.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, f) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, m) in &f.series {
                match m {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.get());
                    }
                    Metric::Histogram(h) => render_histogram(&mut out, name, labels, h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let with = |le: &str| {
        if labels.is_empty() {
            format!("{{le=\"{le}\"}}")
        } else {
            format!("{},le=\"{le}\"}}", &labels[..labels.len() - 1])
        }
    };
    for (bound, count) in h.0.bounds.iter().zip(&h.0.counts) {
        let _ = writeln!(
            out,
            "{name}_bucket{} {}",
            with(&bound.to_string()),
            count.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "{name}_bucket{} {}", with("+Inf"), h.count());
    let sum = h.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum{labels} {sum}");
    let _ = writeln!(out, "{name}_count{labels} {}", h.count());
}

/// Appends a gauge family computed at scrape time.
pub fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Appends a counter family whose values are read at scrape time.
pub fn counter_samples(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Produces the page served at `/metrics`.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Connections served at once, and from one address: one past either is closed as soon
/// as it is accepted, so that clients that connect and send nothing (or read nothing)
/// can neither use up the daemon's file descriptors, which it needs for its state files
/// and its nodes, nor, from one address, keep a scraper elsewhere out.
pub const MAX_CONNECTIONS: usize = 64;
/// See [`MAX_CONNECTIONS`].
pub const MAX_PER_PEER: usize = 16;

/// The longest a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one connection is served, the page's writing included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` until `shutdown`; anything else is a 404. One short-lived task
/// per connection, within [`MAX_CONNECTIONS`] and [`MAX_PER_PEER`].
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    serve_at_most(listener, render, shutdown, (MAX_CONNECTIONS, MAX_PER_PEER)).await;
}

/// Connections served, in all and by peer address.
#[derive(Default)]
struct Served {
    all: usize,
    by_peer: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// One connection's place in [`Served`], given back when it ends.
struct Slot {
    served: Arc<Mutex<Served>>,
    peer: std::net::IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.all -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) = s.by_peer.entry(self.peer) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

async fn serve_at_most(
    listener: TcpListener,
    render: Render,
    shutdown: CancellationToken,
    (max, per_peer): (usize, usize),
) {
    let served = Arc::new(Mutex::new(Served::default()));
    // An accept that fails (out of file descriptors, say) fails again at once: pause,
    // and say so once until one succeeds.
    let mut failing = false;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => {
                    failing = false;
                    s
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!("metrics listener: {e}; pausing between accepts until one succeeds");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            },
        };
        let peer = peer.ip();
        let slot = {
            let mut s = served
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mine = s.by_peer.get(&peer).copied().unwrap_or(0);
            if s.all >= max || mine >= per_peer {
                None
            } else {
                s.all += 1;
                *s.by_peer.entry(peer).or_insert(0) += 1;
                Some(Slot {
                    served: served.clone(),
                    peer,
                })
            }
        };
        // Over the limits: closed at once (dropped).
        let Some(slot) = slot else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, render)).await;
        });
    }
}

/// Reads one request head from `stream` and answers it.
async fn answer(mut stream: tokio::net::TcpStream, render: Render) {
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    let head = async {
        loop {
            let n = stream.read(&mut buf[got..]).await.ok()?;
            if n == 0 {
                return None;
            }
            got += n;
            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") || got == buf.len() {
                return Some(());
            }
        }
    };
    if tokio::time::timeout(HEAD_TIMEOUT, head)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        return;
    }
    let request = String::from_utf8_lossy(&buf[..got]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) =
        if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
            ("200 OK", render().await)
        } else {
            ("404 Not Found", "not found\n".to_owned())
        };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let r = Registry::default();
        r.counter(
            "drover_requests_total",
            "Requests.",
            &[("request", "get_nodes")],
        )
        .inc();
        r.counter(
            "drover_requests_total",
            "Requests.",
            &[("request", "get_nodes")],
        )
        .inc();
        let h = r.histogram(
            "drover_request_seconds",
            "Latency.",
            &[("request", "deploy")],
        );
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let text = r.render();
        assert!(
            text.contains("drover_requests_total{request=\"get_nodes\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("drover_request_seconds_bucket{request=\"deploy\",le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("drover_request_seconds_bucket{request=\"deploy\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("drover_request_seconds_bucket{request=\"deploy\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("drover_request_seconds_count{request=\"deploy\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE drover_request_seconds histogram"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z")]), "{a=\"x\\\"y\\\\z\"}");
        assert_eq!(labels(&[]), "");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let render: Render = Arc::new(|| Box::pin(async { "up 1\n".to_owned() }));
        tokio::spawn(serve(listener, render, shutdown.clone()));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
    }

    /// Connections that send nothing hold at most the caps of the daemon's descriptors:
    /// one past its address's cap, or past the cap over all addresses, is closed at
    /// once, unserved; once one ends, a scrape is served again.
    #[tokio::test]
    async fn idle_connections_are_capped_and_a_scrape_is_served_once_one_ends() {
        // (all, per address): the address's cap is reached first, then the overall one.
        for caps in [(4, 2), (2, 16)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let render: Render = Arc::new(|| Box::pin(async { "up 1\n".to_owned() }));
            tokio::spawn(serve_at_most(listener, render, shutdown.clone(), caps));
            let mut idle = Vec::new();
            for _ in 0..2 {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
                idle.push(s);
            }
            let refused = scrape(addr).await;
            assert!(refused.is_empty(), "{caps:?}: {refused}");
            // One idle client goes away: served again.
            drop(idle.pop());
            let served = until_answered(addr).await;
            assert!(served.starts_with("HTTP/1.1 200 OK"), "{caps:?}: {served}");
            shutdown.cancel();
        }
    }

    /// One scrape: the answer, or nothing when the server closed the connection.
    async fn scrape(addr: std::net::SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may have closed it already.
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("answered or closed, not left waiting");
        out
    }

    /// Scrapes until one is answered (the server learns of a closed connection a
    /// moment after it is closed).
    async fn until_answered(addr: std::net::SocketAddr) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = scrape(addr).await;
            if !out.is_empty() || tokio::time::Instant::now() > deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
