//! The `interceptor-proxy` binary: argument errors, bind errors, start-up and SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_interceptor-proxy");

#[test]
fn bad_values_exit_2_naming_setting_and_value() {
    for (args, want) in [
        (
            &["--bypass-mark", "0xzz"][..],
            "invalid --bypass-mark \"0xzz\"",
        ),
        (
            &["--connect-timeout", "fast"][..],
            "invalid --connect-timeout \"fast\"",
        ),
        (
            &["--outbound", "localhost:15001"][..],
            "invalid --outbound \"localhost:15001\"",
        ),
        (&["--log-format", "xml"][..], "invalid --log-format \"xml\""),
        (
            &["--inbound", "0.0.0.0"][..],
            "invalid --inbound \"0.0.0.0\"",
        ),
        (
            &["--inbound-source", "::1"][..],
            "invalid --inbound-source \"::1\"",
        ),
        (
            &["--inbound-source6", "0.0.0.0"][..],
            "invalid --inbound-source6 \"0.0.0.0\"",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn outbound_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(BIN)
        .args([
            "--outbound",
            &addr.to_string(),
            "--admin",
            "off",
            "--bypass-mark",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "outbound listener {addr}: address already in use (is another proxy running?)"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn serves_admin_then_exits_0_on_sigterm_with_its_final_counters() {
    let admin = free_port();
    let child = Command::new(BIN)
        .args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            &admin.to_string(),
            "--bypass-mark",
            "0",
        ])
        .args([
            "--workers",
            "1",
            "--log-format",
            "json",
            "--drain-timeout",
            "1s",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, body)) = try_http_get(admin, "/ready").await {
            if body == "ready\n" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "admin never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = http_get(admin, "/stats").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["connections_total"], 0);
    assert_eq!(json["inbound_connections_total"], 0);
    let (status, body) = http_get(admin, "/listeners").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["inbound"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json["outbound"].as_array().map(Vec::len), Some(1), "{json}");

    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let stderr = child.0.stderr.take().unwrap();
    let lines: Vec<String> = BufReader::new(stderr).lines().map(Result::unwrap).collect();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let last = events.last().expect("log lines");
    assert_eq!(last["message"], "proxy stopped", "{last}");
    assert_eq!(last["level"], "INFO");
    for field in [
        "connections_total",
        "orig_dst_missing",
        "upstream_connect_errors_timeout",
        "bytes_upstream_to_client",
        "inbound_connections_total",
        "inbound_loop_rejected",
        "inbound_bytes_upstream_to_client",
    ] {
        assert!(last.get(field).is_some(), "{field} missing in {last}");
    }
    assert!(events.iter().any(|e| e["message"] == "proxy ready"));
    assert!(events.iter().any(|e| e["signal"] == "SIGTERM"));
    // The open-file limit was raised to the hard limit at start, and said so.
    let limit = events
        .iter()
        .find(|e| e["message"] == "open-file limit (RLIMIT_NOFILE)")
        .unwrap_or_else(|| panic!("no open-file limit line in {lines:#?}"));
    assert_eq!(limit["soft"], limit["hard"], "{limit}");
}

/// A non-loopback admin address is allowed, with a warning (in a network namespace of its
/// own, made by `unshare --net`, so nothing listens on the host's addresses).
#[test]
fn non_loopback_admin_is_logged_as_a_warning() {
    if !hostops::skip::root("non_loopback_admin_is_logged_as_a_warning (unshare --net)") {
        return;
    }
    let run = |admin: &str| -> Vec<serde_json::Value> {
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "--",
                BIN,
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                admin,
            ])
            .args([
                "--bypass-mark",
                "0",
                "--log-format",
                "json",
                "--workers",
                "1",
            ])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            let e: serde_json::Value = serde_json::from_str(&line).unwrap();
            let ready = e["message"] == "proxy ready";
            events.push(e);
            if ready {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            events.iter().any(|e| e["message"] == "proxy ready"),
            "{events:#?}"
        );
        events
    };
    let warned = |events: &[serde_json::Value]| {
        events.iter().any(|e| {
            e["level"] == "WARN"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("admin listener is not on a loopback address"))
        })
    };
    let events = run("0.0.0.0:0");
    assert!(warned(&events), "{events:#?}");
    let events = run("127.0.0.1:0");
    assert!(!warned(&events), "{events:#?}");
}
