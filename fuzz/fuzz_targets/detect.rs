//! Protocol detection from a client's first bytes (`routing::detect::classify`): never
//! panics; once it decides, more bytes never change the decision (the proxy peeks a growing
//! buffer and acts on the first answer); it decides by the length of the longest pattern
//! (the HTTP/2 preface), so a full peek buffer always gets an answer.
#![no_main]

use interceptor_proxy::routing::detect::classify;
use libfuzzer_sys::fuzz_target;

/// Length of the HTTP/2 connection preface, the longest pattern.
const LONGEST: usize = 24;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    if data.len() >= LONGEST {
        assert!(whole.is_some(), "undecided after {} bytes", data.len());
    }
    let mut first = None;
    for k in 0..=data.len() {
        let d = classify(&data[..k]);
        if k == 0 {
            assert_eq!(d, None, "decided on no bytes");
        }
        match (first, d) {
            (None, Some(d)) => first = Some(d),
            (Some(f), d) => assert_eq!(Some(f), d, "decision changed at byte {k}"),
            (None, None) => {}
        }
    }
    assert_eq!(first, whole);
});
