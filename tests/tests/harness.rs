//! Tests of the test harness itself (no interception involved).
//! Root only; run with `--test-threads=1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use interceptor_tests::probe::{self, ClientOpts, HelloReply};
use interceptor_tests::*;

fn setup() {
    register_helper_bins!();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests need root"
    );
}

fn probe() -> String {
    probe_bin().to_str().unwrap().to_string()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts `icpt-probe serve` in `ns` and waits until it reports its listeners.
fn serve(ns: &NetNs, listen: &[&str]) -> Proc {
    let p = probe();
    let mut cmd = vec![p.as_str(), "serve"];
    for l in listen {
        cmd.extend_from_slice(&["--listen", l]);
    }
    let mut srv = spawn_in(ns, None, &cmd);
    assert!(
        srv.wait_for_stdout("listening", Duration::from_secs(10)),
        "probe server did not start: {}",
        srv.stderr()
    );
    srv
}

#[test]
fn netns_is_created_and_deleted() {
    setup();
    let path: PathBuf;
    let mut left;
    {
        let ns = NetNs::new("harness_netns");
        path = ns.path().to_path_buf();
        assert_eq!(ns.name(), resource_name("harness_netns"));
        assert!(path.exists());
        let lo = ns.ip(&["-o", "link", "show", "lo"]);
        assert!(lo.contains("UP"), "lo not up: {lo}");
        let v6 = ns.ip(&["-6", "-o", "addr", "show", "dev", "lo"]);
        assert!(v6.contains("::1/128"), "no ::1 on lo: {v6}");
        // A process left in the namespace (no Proc guard) is killed by NetNs::drop.
        left = exec_command(Some(&ns), None, None, &["sleep", "30"])
            .spawn()
            .unwrap();
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(10),
            || ns.pids().contains(&(left.id() as i32))
        ));
    }
    assert!(!path.exists(), "{} still exists", path.display());
    let st = left
        .try_wait()
        .unwrap()
        .expect("process in the deleted netns was not killed");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
}

#[test]
fn cgroup_is_created_killed_and_removed() {
    setup();
    let path: PathBuf;
    let mut left;
    {
        let cg = TestCgroup::new("harness_cgroup");
        path = cg.path().to_path_buf();
        assert!(path.starts_with(cgroup2_root()));
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            resource_name("harness_cgroup")
        );
        assert_eq!(
            cg.id(),
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap())
        );
        let mut p = Proc::spawn(
            "sleep",
            exec_command(None, Some(&cg), None, &["sleep", "30"]),
        );
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(10),
            || cg.procs().contains(&(p.pid() as i32))
        ));
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).unwrap();
        assert!(
            own.contains(&format!("0::/{}", resource_name("harness_cgroup"))),
            "{own}"
        );
        assert!(cg.kill_all());
        assert!(cg.procs().is_empty());
        assert!(p.wait_timeout(Duration::from_secs(5)).is_some());
        // Another process, left running: Drop must kill it and still remove the cgroup.
        left = exec_command(None, Some(&cg), None, &["sleep", "30"])
            .spawn()
            .unwrap();
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(10),
            || cg.procs().len() == 1
        ));
        cg.child("nested");
    }
    assert!(!path.exists(), "{} still exists", path.display());
    let st = left
        .try_wait()
        .unwrap()
        .expect("process in the removed cgroup was not killed");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
}

#[test]
fn guards_clean_up_when_the_test_panics() {
    setup();
    let res = std::panic::catch_unwind(|| {
        let ns = NetNs::new("harness_panic");
        let cg = TestCgroup::new("harness_panic");
        let pin = PinDir::new("harness_panic");
        pin.create();
        let _p = spawn_in(&ns, Some(&cg), &["sleep", "30"]);
        panic!("deliberate");
    });
    assert!(res.is_err());
    let name = resource_name("harness_panic");
    assert!(!PathBuf::from("/run/netns").join(&name).exists());
    assert!(!cgroup2_root().join(&name).exists());
    assert!(!PathBuf::from("/sys/fs/bpf").join(&name).exists());
}

#[test]
fn pin_dir_on_bpffs() {
    setup();
    let path;
    {
        let pin = PinDir::new("harness_pin");
        assert!(bpffs_mounted());
        path = pin.path().to_path_buf();
        assert_eq!(
            path,
            PathBuf::from("/sys/fs/bpf").join(resource_name("harness_pin"))
        );
        assert!(!path.exists());
        pin.create();
        assert!(path.is_dir());
        assert!(pin.pinned().is_empty());
    }
    assert!(!path.exists());
}

#[test]
fn bpftool_lists_nothing_on_a_fresh_cgroup() {
    setup();
    let cg = TestCgroup::new("harness_bpftool");
    assert_eq!(bpftool_cgroup_progs(cg.path()), Vec::<AttachedProg>::new());
    // Effective = what the cgroup inherits: only programs attached at the cgroup2 root (read
    // before and after, as another test run may attach there meanwhile).
    let root_before = bpftool_cgroup_progs(&cgroup2_root());
    let effective = bpftool_cgroup_progs_effective(cg.path());
    let root_after = bpftool_cgroup_progs(&cgroup2_root());
    for p in &effective {
        assert!(
            root_before.iter().chain(&root_after).any(|r| r.id == p.id),
            "{p:?} is inherited from the root: {root_before:?} {root_after:?}"
        );
    }
}

#[test]
fn probe_hello_in_netns_is_direct() {
    setup();
    let ns = NetNs::new("harness_hello");
    let cg = TestCgroup::new("harness_hello");
    let _srv = serve(&ns, &["127.0.0.1:8080", "[::1]:8080"]);
    let p = probe();
    for addr in ["127.0.0.1:8080", "[::1]:8080"] {
        let out = run_in(&ns, Some(&cg), &[&p, "hello", addr]);
        assert!(out.status.success(), "{out:?}");
        let r: HelloReply = serde_json::from_value(json(&out)).unwrap();
        assert_eq!(r.peer_seen_by_server, r.local, "{r:?}");
        assert_eq!(r.server_local, addr.parse::<SocketAddr>().unwrap());
        assert_eq!(r.socket_peer, r.remote);
        assert!(!r.proxied);
    }
    // With a mark and a bound source address.
    let out = run_in(
        &ns,
        Some(&cg),
        &[
            &p,
            "hello",
            "127.0.0.1:8080",
            "--mark",
            "0x539",
            "--bind",
            "127.0.0.9:0",
        ],
    );
    let r: HelloReply = serde_json::from_value(json(&out)).unwrap();
    assert_eq!(r.peer_seen_by_server.ip().to_string(), "127.0.0.9");
    // Churn.
    let out = run_in(
        &ns,
        Some(&cg),
        &[
            &p,
            "churn",
            "127.0.0.1:8080",
            "--count",
            "200",
            "--parallel",
            "4",
        ],
    );
    let v = json(&out);
    assert_eq!(
        (
            v["ok"].as_u64(),
            v["failed"].as_u64(),
            v["proxied"].as_u64()
        ),
        (Some(200), Some(0), Some(0)),
        "{v}"
    );
}

#[test]
fn probe_errors_are_classified() {
    setup();
    let ns = NetNs::new("harness_errors");
    let p = probe();
    let out = run_in(&ns, None, &[&p, "hello", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["kind"], "refused");
    // A listener that never answers: the read times out.
    let silent = ns.in_ns(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = silent.local_addr().unwrap().to_string();
    let out = run_in(&ns, None, &[&p, "hello", &addr, "--timeout-ms", "300"]);
    assert_eq!(json(&out)["kind"], "timeout", "{out:?}");
    // The library reports the same.
    let e = ns
        .in_ns(|| probe::hello("127.0.0.1:1".parse().unwrap(), &ClientOpts::default()))
        .unwrap_err();
    assert_eq!(e.kind, ProbeErrorKind::Refused);
}

#[test]
fn probe_bulk_10mb_is_byte_exact() {
    setup();
    let ns = NetNs::new("harness_bulk");
    let cg = TestCgroup::new("harness_bulk");
    let _srv = serve(&ns, &["127.0.0.1:8080"]);
    let p = probe();
    let n = (10 * 1024 * 1024).to_string();
    let out = run_in(
        &ns,
        Some(&cg),
        &[
            &p,
            "bulk",
            "127.0.0.1:8080",
            "--send",
            &n,
            "--recv",
            &n,
            "--seed",
            "7",
        ],
    );
    let v = json(&out);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["received"].as_u64(), Some(10 * 1024 * 1024));
    assert_eq!(v["server_rx"].as_u64(), Some(10 * 1024 * 1024));
    assert_eq!(v["received_sum"], v["expected_received_sum"]);
    assert_eq!(v["server_sum"], v["sent_sum"]);
    assert_eq!(
        v["expected_received_sum"].as_str().unwrap(),
        probe::stream_sum(7, 10 * 1024 * 1024)
    );
    // Asymmetric, including empty directions.
    for (s, r) in [("0", "1000"), ("12345", "0"), ("0", "0")] {
        let out = run_in(
            &ns,
            Some(&cg),
            &[&p, "bulk", "127.0.0.1:8080", "--send", s, "--recv", r],
        );
        assert_eq!(json(&out)["ok"], true, "{out:?}");
    }
}

#[test]
fn in_process_server_in_netns() {
    setup();
    let ns = NetNs::new("harness_inproc");
    let srv = ProbeServer::start_in(
        ns.path(),
        &["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
    )
    .unwrap();
    for addr in srv.addrs().to_vec() {
        let r = ns
            .in_ns(|| probe::hello(addr, &ClientOpts::default()))
            .unwrap();
        assert!(!r.proxied, "{r:?}");
        let b = ns
            .in_ns(|| probe::bulk(addr, 1 << 20, 1 << 20, 3, &ClientOpts::default()))
            .unwrap();
        assert!(b.ok, "{b:?}");
    }
    assert_eq!(srv.accepted(), 4);
    // The server is not reachable from the test's own namespace.
    let port = srv.addr().port();
    let here = probe::hello(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &ClientOpts {
            timeout: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let _ = here; // whatever answered (if anything), it was not our server:
    assert_eq!(srv.accepted(), 4);
}

#[test]
fn veth_between_namespaces_v4_and_v6() {
    setup();
    let a = NetNs::new("harness_veth_a");
    let b = NetNs::new("harness_veth_b");
    a.link_to(
        "va",
        &["10.199.0.1/24", "fd00:199::1/64"],
        &b,
        "vb",
        &["10.199.0.2/24", "fd00:199::2/64"],
    );
    let addrs = b.ip(&["-o", "addr", "show", "dev", "vb"]);
    let line = addrs
        .lines()
        .find(|l| l.contains("fd00:199::2/64"))
        .unwrap_or_else(|| panic!("{addrs}"));
    assert!(
        !line.contains("tentative"),
        "nodad address is tentative: {line}"
    );
    let srv = ProbeServer::start_in(
        b.path(),
        &[
            "[fd00:199::2]:9000".parse().unwrap(),
            "10.199.0.2:9000".parse().unwrap(),
        ],
    )
    .unwrap();
    for addr in srv.addrs().to_vec() {
        let r = a
            .in_ns(|| probe::hello(addr, &ClientOpts::default()))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(r.peer_seen_by_server, r.local);
        let want_src = if addr.is_ipv6() {
            "fd00:199::1"
        } else {
            "10.199.0.1"
        };
        assert_eq!(r.local.ip().to_string(), want_src);
    }
    // Also through the helper binaries (icpt-exec into netns a).
    let out = run_in(&a, None, &[&probe(), "hello", "[fd00:199::2]:9000"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn conntrack_is_read_once_a_stateful_rule_makes_it_active() {
    setup();
    let ns = NetNs::new("harness_conntrack");
    let _srv = ProbeServer::start_in(ns.path(), &["127.0.0.1:8080".parse().unwrap()]).unwrap();
    let hello = || {
        let out = run_in(&ns, None, &[&probe(), "hello", "127.0.0.1:8080"]);
        assert!(out.status.success(), "{out:?}");
    };
    // No rule needs conntrack: it does not run, and a connection leaves no entry.
    hello();
    assert_eq!(ns.conntrack_count(), 0);
    ns.enable_stateful_filter();
    hello();
    assert_eq!(ns.conntrack_count(), 1);
    let entries = ns.conntrack_entries(false);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].contains("dport=8080"), "{entries:?}");
    assert!(
        ns.conntrack_entries(true).is_empty(),
        "no NAT rule, no NAT entry"
    );
}

#[test]
fn exec_as_other_uid() {
    setup();
    let ns = NetNs::new("harness_uid");
    let mut c = exec_command(Some(&ns), None, Some(1337), &["id", "-u"]);
    let out = run_cmd(&mut c, Duration::from_secs(10)).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1337",
        "{out:?}"
    );
    let out = run_in(&ns, None, &["/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("icpt-exec: cannot execute"));
}

#[test]
fn wrk_against_nginx_in_netns_keepalive_and_close() {
    setup();
    let ns = NetNs::new("harness_wrk");
    let cg = TestCgroup::new("harness_wrk");
    let _nginx = Nginx::start(&ns, &["127.0.0.1:8088", "[::1]:8088"]);
    let (drops0, overflows0) = listen_drops(&ns);
    for close in [false, true] {
        let wrk = Wrk::start(
            &ns,
            Some(&cg),
            "http://127.0.0.1:8088/",
            4,
            Duration::from_secs(1),
            close,
        );
        let r = wrk.finish();
        assert!(r.requests > 0, "close={close}: {}", r.output);
        assert_eq!(r.errors(), 0, "close={close}: {r:?}");
    }
    // Nothing was dropped at nginx's listener.
    let (drops, overflows) = listen_drops(&ns);
    assert_eq!((drops - drops0, overflows - overflows0), (0, 0));
}

#[test]
fn wrk_failure_panics_with_its_output() {
    setup();
    let ns = NetNs::new("harness_wrk_fail");
    let res = std::panic::catch_unwind(|| {
        Wrk::start(
            &ns,
            None,
            "http://127.0.0.1:1/",
            1,
            Duration::from_secs(1),
            false,
        )
        .finish()
    });
    // wrk 4.1 checks that it can connect before it starts and exits 1 when it cannot.
    let msg = res
        .expect_err("wrk against a closed port fails")
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        msg.contains("wrk") && msg.contains("unable to connect"),
        "{msg}"
    );
}

#[test]
fn churn_for_a_duration_in_netns() {
    setup();
    let ns = NetNs::new("harness_churn_for");
    let cg = TestCgroup::new("harness_churn_for");
    let _srv = serve(&ns, &["127.0.0.1:8080"]);
    let c = Churn::start(
        &ns,
        Some(&cg),
        "127.0.0.1:8080",
        2,
        Duration::from_millis(500),
    );
    let r = c.finish();
    assert!(r.ok > 0, "{r:?}");
    assert_eq!((r.failed, r.proxied), (0, 0), "{r:?}");
    // The count bound still works, and both bounds together stop at the first.
    let p = probe();
    let out = run_in(
        &ns,
        Some(&cg),
        &[
            &p,
            "churn",
            "127.0.0.1:8080",
            "--count",
            "5",
            "--for-ms",
            "60000",
        ],
    );
    assert_eq!(json(&out)["ok"], 5, "{out:?}");
    let out = run_in(&ns, Some(&cg), &[&p, "churn", "127.0.0.1:8080"]);
    assert!(!out.status.success(), "a churn with no bound is refused");
}

#[test]
fn listen_drops_are_read_per_namespace() {
    setup();
    let ns = NetNs::new("harness_listen_drops");
    let (d, o) = listen_drops(&ns);
    assert_eq!((d, o), (0, 0), "a fresh namespace has dropped nothing");
    // Overflow an accept queue: a listener with backlog 0 that never accepts.
    let l = ns.in_ns(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        s.listen(0).unwrap();
        s
    });
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let held: Vec<_> = ns.in_ns(|| {
        (0..4)
            .filter_map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .ok()?;
                s.set_nonblocking(true).ok()?;
                let _ = s.connect(&addr.into());
                Some(s)
            })
            .collect()
    });
    let overflowed = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        listen_drops(&ns).1 > 0
    });
    drop(held);
    assert!(
        overflowed,
        "backlog 0 with 4 connects overflows: {:?}",
        listen_drops(&ns)
    );
}
