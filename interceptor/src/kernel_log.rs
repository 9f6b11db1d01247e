//! The kernel programs' own log lines (aya-log), off unless asked for.
//!
//! Every decision the programs count is also a `debug` log statement. Programs are loaded
//! with their log level in a read-only global: `off` (the default: a statement costs one
//! load and one compare) or `debug`, set for the loads of this process with
//! [`set_kernel_log`] (`interceptor --kernel-log debug attach|upgrade ...`). Swapping the
//! programs with `upgrade` switches a running interception's logging either way.
//!
//! [`follow`] reads the lines of every program under a pin dir (each object load has its
//! own ring buffer) and hands them out; `interceptor logs` prints them.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::MapInfo;
use aya::programs::ProgramInfo;

use crate::error::{Error, Result};
use crate::paths::PinLayout;

/// Name of aya-log's level global in the object (aya-log-ebpf defines it, aya-log names it).
pub(crate) const LEVEL_GLOBAL: &str = aya_log::LEVEL;
/// aya-log's levels: off (0), or up to debug.
const OFF: u8 = 0;
const DEBUG: u8 = aya_log::Level::Debug as u8;

static LEVEL: AtomicU8 = AtomicU8::new(OFF);

/// Whether programs loaded from now on by this process log their decisions.
pub fn set_kernel_log(debug: bool) {
    LEVEL.store(if debug { DEBUG } else { OFF }, Ordering::Relaxed);
}

pub(crate) fn level() -> u8 {
    LEVEL.load(Ordering::Relaxed)
}

/// Collects the formatted records of aya-log into lines.
struct Lines(Arc<Mutex<Vec<String>>>);

impl log::Log for Lines {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .expect("log lines")
            .push(format!("{}", record.args()));
    }

    fn flush(&self) {}
}

/// The ids of the programs on the links pinned under `layout`, one per log ring buffer.
fn programs(layout: &PinLayout) -> Result<Vec<u32>> {
    let st = crate::status(layout)?;
    let ids: BTreeSet<u32> = st
        .root_links
        .iter()
        .chain(st.scopes.iter().flat_map(|s| &s.links))
        .chain(st.inbound.iter().flat_map(|s| &s.links))
        .filter_map(|l| l.program_id)
        .collect();
    // Programs of one load share a ring buffer: keep one program per buffer.
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for id in ids {
        let Some(info) = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p: &ProgramInfo| p.id() == id)
        else {
            continue;
        };
        let ring = info.map_ids().ok().flatten().and_then(|maps| {
            maps.into_iter().find(|m| {
                MapInfo::from_id(*m)
                    .ok()
                    .is_some_and(|i| i.name_as_str() == Some("AYA_LOGS"))
            })
        });
        if let Some(ring) = ring {
            if seen.insert(ring) {
                out.push(id);
            }
        }
    }
    Ok(out)
}

/// Reads the log lines of every program pinned under `layout` and passes each to `line`,
/// until `line` returns false or `limit` has passed (`None`: no limit). Programs attached
/// meanwhile are picked up within a second. `ready` is called once, with the number of
/// programs followed, when the first scan is done: lines logged from then on are read.
pub fn follow(
    layout: &PinLayout,
    limit: Option<Duration>,
    ready: impl FnOnce(usize),
    mut line: impl FnMut(&str) -> bool,
) -> Result<()> {
    let mut ready = Some(ready);
    crate::system::check_privileges()?;
    let start = Instant::now();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut loggers = Vec::new();
    let mut known = BTreeSet::new();
    let mut rescan = Instant::now() - Duration::from_secs(1);
    loop {
        if rescan.elapsed() >= Duration::from_secs(1) {
            rescan = Instant::now();
            for id in programs(layout)? {
                if known.insert(id) {
                    let logger =
                        aya_log::EbpfLogger::init_from_id_with_logger(id, Lines(lines.clone()))
                            .map_err(|e| {
                                Error::bpf(format!("reading the logs of program {id}"), e)
                            })?;
                    loggers.push(logger);
                }
            }
            if let Some(ready) = ready.take() {
                ready(loggers.len());
            }
        }
        for l in &mut loggers {
            l.flush();
        }
        let batch = std::mem::take(&mut *lines.lock().expect("log lines"));
        for l in batch {
            if !line(&l) {
                return Ok(());
            }
        }
        if limit.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
