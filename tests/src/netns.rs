//! Network namespaces for tests.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sched::{setns, CloneFlags};

use crate::names::{bounded_name, NETNS_NAME_MAX};
use crate::util::{leaked, run_cmd, run_cmd_ok, CMD_TIMEOUT};

const CONNTRACK_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";

/// Moves the calling *thread* into the network namespace at `path` (a network
/// namespace is per thread; sockets created afterwards by this thread belong to it).
pub fn enter_netns_current_thread(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

/// A named network namespace `icpt-t-<test>` (`/run/netns/<name>`), with `lo` up.
///
/// Drop: SIGKILLs every process whose network namespace it is (`ip netns pids`),
/// waits for them (bounded), then `ip netns delete`s it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace (removing a stale one of the same name first) and
    /// brings `lo` up, so 127.0.0.1 and ::1 work at once.
    pub fn new(test: &str) -> NetNs {
        crate::names::hold_run_lock();
        let name = bounded_name(test, NETNS_NAME_MAX);
        let path = Path::new("/run/netns").join(&name);
        hostops::netns::remove(&name)
            .unwrap_or_else(|e| panic!("stale netns of an earlier run: {e}"));
        run_cmd_ok("ip", &["netns", "add", &name]);
        let ns = NetNs { name, path };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what `icpt-exec --netns` and `setns` take.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("netns path is UTF-8")
    }

    /// Runs `cmd` inside the namespace with `ip netns exec` (bounded by 60 s).
    /// Fine for `ip`, `iptables`, `conntrack`, `cat /proc/...`; not for anything that
    /// needs the cgroup2 mount (`ip netns exec` remounts /sys): use
    /// [`crate::spawn_in`] / [`crate::run_in`] for those.
    pub fn run(&self, cmd: &[&str]) -> Output {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(cmd),
            CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot run ip netns exec {} {}: {e}",
                self.name,
                cmd.join(" ")
            )
        })
    }

    /// Like [`run`](Self::run) but panics unless it succeeds; returns stdout.
    pub fn run_ok(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        run_cmd_ok("ip", &args)
    }

    /// `ip -n <name> ARGS...`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run_cmd_ok("ip", &a)
    }

    /// Creates a veth pair: `local` in this namespace, `remote` in `peer` (or also in
    /// this namespace when `peer` is `None`), and brings both ends up.
    /// Interface names must be at most 15 characters.
    pub fn add_veth_pair(&self, local: &str, remote: &str, peer: Option<&NetNs>) {
        assert!(
            local.len() <= 15 && remote.len() <= 15,
            "interface names are limited to 15 characters"
        );
        let peer_name = peer.map_or(self.name.as_str(), |p| p.name.as_str());
        self.ip(&[
            "link", "add", local, "type", "veth", "peer", "name", remote, "netns", peer_name,
        ]);
        self.ip(&["link", "set", local, "up"]);
        match peer {
            Some(p) => p.ip(&["link", "set", remote, "up"]),
            None => self.ip(&["link", "set", remote, "up"]),
        };
    }

    /// Adds an address in CIDR form (`10.0.0.1/24`, `fd00::1/64`) to `dev`;
    /// IPv6 addresses get `nodad` so they are usable immediately.
    pub fn add_addr(&self, dev: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev]);
        }
    }

    /// One call for the common topology: a veth pair between `self` and `peer`
    /// with addresses on both ends (each slice may mix IPv4 and IPv6 CIDRs).
    pub fn link_to(
        &self,
        local: &str,
        local_addrs: &[&str],
        peer: &NetNs,
        remote: &str,
        remote_addrs: &[&str],
    ) {
        self.add_veth_pair(local, remote, Some(peer));
        for a in local_addrs {
            self.add_addr(local, a);
        }
        for a in remote_addrs {
            peer.add_addr(remote, a);
        }
    }

    /// Current number of conntrack entries in this namespace
    /// (`/proc/sys/net/netfilter/nf_conntrack_count` read inside it). Loads
    /// `nf_conntrack` with modprobe if the file is missing; panics if it stays missing.
    pub fn conntrack_count(&self) -> u64 {
        let read = || {
            let out = self.run(&["cat", CONNTRACK_COUNT]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let text = match read() {
            Some(t) => t,
            None => {
                // Built-in conntrack needs nothing; a modular one must be loaded.
                let _ = run_cmd(Command::new("modprobe").arg("nf_conntrack"), CMD_TIMEOUT);
                read().unwrap_or_else(|| {
                    panic!("{CONNTRACK_COUNT} is missing in netns {}: nf_conntrack is neither built in nor loadable", self.name)
                })
            }
        };
        text.parse()
            .unwrap_or_else(|e| panic!("bad {CONNTRACK_COUNT} value {text:?}: {e}"))
    }

    /// Makes conntrack active in this namespace the way a host firewall does, with a stateful
    /// filter rule and no NAT (`iptables -A OUTPUT -p tcp -m conntrack --ctstate
    /// NEW,ESTABLISHED,RELATED -j ACCEPT`): from then on every TCP connection here, loopback
    /// included, gets an entry. Without such a rule conntrack does not run in a namespace
    /// (Linux 4.10+), and a count of 0 proves nothing.
    pub fn enable_stateful_filter(&self) {
        self.run_ok(&[
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
    }

    /// The TCP entries of this namespace's conntrack table (`conntrack -L -p tcp`), one line
    /// each; with `dst_nat`, only those whose destination was rewritten (`--dst-nat`).
    pub fn conntrack_entries(&self, dst_nat: bool) -> Vec<String> {
        let mut cmd = vec!["conntrack", "-L", "-p", "tcp"];
        if dst_nat {
            cmd.push("--dst-nat");
        }
        let out = self.run(&cmd);
        assert!(
            out.status.success(),
            "conntrack -L in netns {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("tcp"))
            .map(str::to_string)
            .collect()
    }

    /// Pids of processes in this namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        netns_pids(&self.name)
    }

    /// Moves the calling thread into this namespace. Prefer [`in_ns`](Self::in_ns),
    /// which does it on a scoped helper thread.
    pub fn enter_current_thread(&self) {
        enter_netns_current_thread(&self.path)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.path.display()));
    }

    /// Runs `f` on a helper thread inside the namespace and returns its result
    /// (a panic in `f` is re-raised here). Sockets `f` creates live in the namespace.
    pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let path = self.path.clone();
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                enter_netns_current_thread(&path)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = hostops::netns::remove(&self.name) {
            leaked(e);
        }
    }
}

fn netns_pids(name: &str) -> Vec<i32> {
    hostops::netns::pids(name).unwrap_or_else(|e| panic!("{e}"))
}
