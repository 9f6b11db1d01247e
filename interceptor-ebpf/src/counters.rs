//! The decision counters (`ICP_COUNTERS`, per CPU, per scope) and the debug log line that
//! goes with each count.
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_log_ebpf::debug;
use interceptor_common::{Counter, CounterKey};

use crate::maps::ICP_COUNTERS;

/// `lock *(u64 *)v += 1`: the verifier accepts atomic adds on map values.
///
/// # Safety
/// `v` must point at a u64 in a map value.
#[inline(always)]
unsafe fn atomic_inc(v: *mut u64) {
    // SAFETY: per the contract above.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            v, 1,
        );
    }
}

/// Counts one decision, and logs it (with its scope) at debug level: `interceptor logs` prints
/// the lines of programs loaded with `--kernel-log debug` (others are loaded with logging off,
/// where the log statement costs one load and one compare).
#[inline(always)]
pub(crate) fn count(scope: u64, counter: Counter) {
    // Not for scope 0: the root programs see every socket of the host, most of them not ours.
    if scope != 0 {
        debug!(&(), "scope {} {}", scope, counter.name());
    }
    let key = CounterKey {
        scope,
        counter: counter as u32,
        _pad: 0,
    };
    match ICP_COUNTERS.get_ptr_mut(key) {
        // An atomic add even on a per-CPU value: a program running in process context can be
        // preempted on its CPU by another run of a program, and a plain `+= 1` would then
        // lose a count.
        // SAFETY: the value is a valid, aligned u64 for this program run.
        Some(v) => unsafe { atomic_inc(v) },
        None => {
            if ICP_COUNTERS.insert(key, 1, BPF_NOEXIST as u64).is_err() {
                // Another run created it in between: count on the entry it made.
                if let Some(v) = ICP_COUNTERS.get_ptr_mut(key) {
                    // SAFETY: as above.
                    unsafe { atomic_inc(v) };
                }
            }
        }
    }
}
