//! The proxy upgrade's messages as the receiving side reads them (JSON lines from a Unix
//! socket; `upgrade::fuzz_receive`): never panics, and every message decoded survives a
//! round trip through its encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    interceptor_proxy::upgrade::fuzz_receive(data);
});
