//! The routing file (`interceptor-proxy --routes`): YAML parsed and compiled exactly as a
//! load or a reload does (`routing::reload::parse`). Never panics; a refusal has a message.
#![no_main]

use interceptor_proxy::routing::reload::parse;
use interceptor_proxy::routing::RoutingStats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let stats = RoutingStats::default();
    if let Err(e) = parse(text, &stats) {
        assert!(!e.to_string().is_empty(), "a refusal without a message");
    }
});
