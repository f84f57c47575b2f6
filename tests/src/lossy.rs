//! A lossy, slow link for UDP (QUIC) traffic, in place of `tc netem` where the kernel
//! lacks it: a relay on loopback that forwards datagrams between one client and a server,
//! dropping a share of them and delaying the rest, in both directions. The impairment
//! can be changed while traffic flows.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

/// Loss and delay, applied to each datagram in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0 to 1.0.
    pub loss: f64,
    /// Delay added to every datagram kept.
    pub delay: Duration,
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct LossyLink {
    /// Where clients send to instead of the server.
    pub addr: SocketAddr,
    setting: Arc<Mutex<Impairment>>,
    /// Drop every datagram from the server to the client (a one-way outage).
    replies_cut: Arc<std::sync::atomic::AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

/// A small xorshift generator: reproducible and dependency-free.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl LossyLink {
    /// Starts a relay to `server` on an ephemeral loopback port.
    pub fn start(server: SocketAddr, imp: Impairment) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let setting = Arc::new(Mutex::new(imp));
        let replies_cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (front, back) = rt.block_on(async {
            (
                Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind")),
                Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind")),
            )
        });
        let addr = front.local_addr().expect("addr");
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        // client -> server
        {
            let (front, back, setting, client) =
                (front.clone(), back.clone(), setting.clone(), client.clone());
            rt.spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().expect("lock") = Some(from);
                    let imp = *setting.lock().expect("lock");
                    if rng.unit() < imp.loss {
                        continue;
                    }
                    let data = buf[..n].to_vec();
                    let back = back.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(imp.delay).await;
                        let _ = back.send_to(&data, server).await;
                    });
                }
            });
        }
        // server -> client
        {
            let (front, back, setting, client) = (front, back, setting.clone(), client);
            let cut = replies_cut.clone();
            rt.spawn(async move {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d);
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = back.recv_from(&mut buf).await {
                    let Some(to) = *client.lock().expect("lock") else {
                        continue;
                    };
                    let imp = *setting.lock().expect("lock");
                    if rng.unit() < imp.loss || cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    let data = buf[..n].to_vec();
                    let front = front.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(imp.delay).await;
                        let _ = front.send_to(&data, to).await;
                    });
                }
            });
        }
        Self {
            addr,
            setting,
            replies_cut,
            rt: Some(rt),
        }
    }

    /// Changes the impairment for datagrams from now on.
    pub fn set(&self, imp: Impairment) {
        *self.setting.lock().expect("lock") = imp;
    }

    /// Drops (`true`) or forwards again every datagram from the server to the client:
    /// the client hears nothing while the server still hears the client.
    pub fn cut_replies(&self, cut: bool) {
        self.replies_cut
            .store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
