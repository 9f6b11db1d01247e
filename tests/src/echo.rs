//! A line echo server for tests: each read back as it came, until EOF.
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::NetNs;

/// A line echo server in a namespace: each line back, until EOF. Stops on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    pub fn start_in(ns: &NetNs, addr: SocketAddr) -> Echo {
        let listener = ns.in_ns(|| std::net::TcpListener::bind(addr).expect("echo server binds"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        std::thread::Builder::new()
                            .stack_size(64 * 1024)
                            .spawn(move || {
                                let mut w = s.try_clone().unwrap();
                                let mut buf = [0u8; 256];
                                let mut r = s;
                                while let Ok(n) = r.read(&mut buf) {
                                    if n == 0 || w.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            })
                            .unwrap();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("echo accept: {e}"),
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
