//! Pod networking: one network namespace per pod, connected to the bed's bridge with a veth pair.
//!
//! Namespace `kpipe-<uid12>`, host veth `kv<uid10>` (attached to the bridge), pod side renamed to `eth0` with the
//! pod IP; default route via the bridge address. Everything is done with `ip` (iproute2) so no unsafe code or
//! netlink library is needed.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use tokio::process::Command;

use super::KubeletError;

/// Names derived from a pod UID.
#[derive(Debug, Clone)]
pub struct PodNet {
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// Host-side veth name.
    pub host_veth: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// `hostNetwork: true`: no namespace of its own (only a private mount namespace).
    pub host: bool,
}

/// Hands out pod addresses from the bridge's /prefix network, skipping the bridge address itself.
#[derive(Debug)]
pub struct IpAllocator {
    base: u32,
    size: u32,
    bridge: Ipv4Addr,
    used: BTreeSet<u32>,
}

impl IpAllocator {
    /// A pool for `bridge/prefix_len`.
    pub fn new(bridge: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix = u32::from(prefix_len.clamp(8, 30));
        let mask = u32::MAX << (32 - prefix);
        Self { base: u32::from(bridge) & mask, size: 1u32 << (32 - prefix), bridge, used: BTreeSet::new() }
    }

    /// Next free address (never the network, broadcast or bridge address).
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let bridge = u32::from(self.bridge);
        (1..self.size - 1)
            .map(|off| self.base + off)
            .find(|a| *a != bridge && !self.used.contains(a))
            .inspect(|a| {
                self.used.insert(*a);
            })
            .map(Ipv4Addr::from)
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }
}

fn uid_hex(uid: &str) -> String {
    uid.chars().filter(|c| c.is_ascii_hexdigit()).collect::<String>().to_lowercase()
}

impl PodNet {
    /// Names for a pod UID and an allocated IP.
    pub fn for_pod(uid: &str, ip: Ipv4Addr) -> Self {
        let hex = uid_hex(uid);
        let short = |n: usize| hex.chars().take(n).collect::<String>();
        Self { netns: format!("kpipe-{}", short(12)), host_veth: format!("kv{}", short(10)), ip, host: false }
    }

    /// A `hostNetwork` pod: shares the host's network; its IP is the node (bridge) address.
    pub fn host(uid: &str, node_ip: Ipv4Addr) -> Self {
        Self { host: true, ..Self::for_pod(uid, node_ip) }
    }

    /// Command prefix that runs a program inside the pod's namespaces (network + a private mount namespace).
    pub fn enter(&self) -> Vec<String> {
        if self.host {
            ["unshare", "--mount", "--propagation", "slave"].map(String::from).to_vec()
        } else {
            vec!["ip".into(), "netns".into(), "exec".into(), self.netns.clone()]
        }
    }

    /// Creates the namespace, the veth pair, addresses and routes. Removes a stale namespace of the same name.
    pub async fn setup(&self, bridge: &str, bridge_ip: Ipv4Addr, prefix_len: u8) -> Result<(), KubeletError> {
        if self.host {
            return Ok(());
        }
        self.teardown().await;
        let peer = format!("kp{}", &self.host_veth[2..]);
        let ns = self.netns.as_str();
        let cidr = format!("{}/{}", self.ip, prefix_len);
        let gw = bridge_ip.to_string();
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", ns],
            vec!["link", "add", &self.host_veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &self.host_veth, "master", bridge],
            vec!["link", "set", &self.host_veth, "up"],
            vec!["link", "set", &peer, "netns", ns],
            vec!["-n", ns, "link", "set", &peer, "name", "eth0"],
            vec!["-n", ns, "addr", "add", &cidr, "dev", "eth0"],
            vec!["-n", ns, "link", "set", "eth0", "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec!["-n", ns, "route", "add", "default", "via", &gw],
        ];
        for args in steps {
            if let Err(e) = ip(&args).await {
                self.teardown().await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes the namespace (which also deletes the veth pair). Errors are ignored: it may not exist.
    pub async fn teardown(&self) {
        if self.host {
            return;
        }
        let _ = ip(&["netns", "del", &self.netns]).await;
        let _ = ip(&["link", "del", &self.host_veth]).await;
    }
}

/// Runs `ip <args>`, mapping a non-zero exit to an error carrying stderr.
pub async fn ip(args: &[&str]) -> Result<(), KubeletError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| KubeletError::Command { cmd: format!("ip {}", args.join(" ")), msg: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KubeletError::Command {
            cmd: format!("ip {}", args.join(" ")),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Deletes every `kpipe-*` namespace (leftovers of an earlier kubelet run).
pub async fn cleanup_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output().await else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for name in text.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with("kpipe-") {
            let _ = ip(&["netns", "del", name]).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allocator_skips_bridge_and_reuses() {
        let mut a = IpAllocator::new(Ipv4Addr::new(10, 244, 0, 1), 24);
        assert_eq!(a.allocate(), Some(Ipv4Addr::new(10, 244, 0, 2)));
        assert_eq!(a.allocate(), Some(Ipv4Addr::new(10, 244, 0, 3)));
        a.release(Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(a.allocate(), Some(Ipv4Addr::new(10, 244, 0, 2)));
        let mut small = IpAllocator::new(Ipv4Addr::new(10, 0, 0, 1), 30);
        assert_eq!(small.allocate(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(small.allocate(), None);
    }

    #[test]
    fn names_fit_interface_limits() {
        let n = PodNet::for_pod("3f2a9c1e-1234-4bcd-9def-0123456789ab", Ipv4Addr::new(10, 244, 0, 9));
        assert_eq!(n.netns, "kpipe-3f2a9c1e1234");
        assert_eq!(n.host_veth, "kv3f2a9c1e12");
        assert!(n.host_veth.len() <= 15);
    }
}
