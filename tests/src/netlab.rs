//! Separate hosts on one machine: network namespaces joined by veth pairs to a bridge.
//!
//! A [`NetLab`] makes a bridge on the host with address `10.213.N.1/24` and, for each
//! host it is asked for, a namespace whose veth end has `10.213.N.(10+i)`. Processes are
//! started inside a namespace with `ip netns exec`. A host's link can be cut and healed
//! ([`NetLab::set_link`]). Everything is removed when the lab is dropped. It needs root
//! (CI runs as root) and iproute2.

use std::net::Ipv4Addr;
use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

/// A bridge and a set of namespaces acting as hosts.
#[derive(Debug)]
pub struct NetLab {
    tag: String,
    subnet: u8,
    hosts: Vec<String>,
}

impl NetLab {
    /// A new lab with a bridge; panics with a clear message without root.
    ///
    /// The subnet is claimed by creating the bridge named after it: creation fails if
    /// another lab (another test process) holds it, and the next subnet is tried.
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network-namespace tests need root (CI runs as root)"
        );
        let start = u8::try_from(std::process::id() % 200).unwrap_or(0);
        for k in 0..200u8 {
            let subnet = 20 + (start + k) % 200;
            let lab = Self {
                tag: format!("s{subnet}"),
                subnet,
                hosts: Vec::new(),
            };
            let br = lab.bridge();
            let created = Command::new("ip")
                .args(["link", "add", &br, "type", "bridge"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !created {
                continue;
            }
            ip(&[
                "addr",
                "add",
                &format!("{}/24", lab.host_gateway()),
                "dev",
                &br,
            ]);
            ip(&["link", "set", &br, "up"]);
            return lab;
        }
        panic!("no free subnet for a network lab (is `ip` from iproute2 installed?)");
    }

    fn bridge(&self) -> String {
        format!("dvb{}", self.tag)
    }

    /// The host side's address on the bridge (where a controller listens).
    pub fn host_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    fn ns(&self, i: usize) -> String {
        format!("dvn{}h{i}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("dvv{}h{i}", self.tag)
    }

    /// Adds a host; returns its index.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let (ns, veth, peer) = (self.ns(i), self.veth(i), format!("dvp{}h{i}", self.tag));
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        // The bridge of this tag is ours, so a veth of this tag is what a lab killed
        // before its cleanup left behind (with no bridge, hence its subnet looked free).
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["link", "set", &veth, "master", &self.bridge(), "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.host_addr(i)),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        i
    }

    /// The address of host `i`.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            213,
            self.subnet,
            u8::try_from(10 + i).expect("few hosts"),
        )
    }

    /// A command run inside host `i`'s network namespace. It enters that namespace alone
    /// (`nsenter --net`), not a mount namespace of its own as `ip netns exec` does, which
    /// remounts /sys and so hides the cgroup hierarchies a real host's agent has.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.hosts[i]))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Cuts (`false`) or heals (`true`) host `i`'s link to the bridge.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["link", "set", &self.veth(i), if up { "up" } else { "down" }]);
    }
}

impl Default for NetLab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}
