//! Hessian 2 values as a Dubbo request body carries them (`routing::dubbo::hessian::Reader`,
//! and `routing::dubbo::decode_request` on the same bytes). Never panics, never allocates
//! from a declared length (libFuzzer's -rss_limit catches that) nor recurses without bound;
//! every value read advances the reader; an error's offset is within the input; a string
//! written by `write_string` reads back the same.
#![no_main]

use interceptor_proxy::routing::dubbo::decode_request;
use interceptor_proxy::routing::dubbo::hessian::{write_string, Reader, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    while !r.at_end() {
        let before = r.position();
        match r.value() {
            Ok(_) => assert!(r.position() > before, "a value read no byte"),
            Err(e) => {
                assert!(e.at <= data.len());
                break;
            }
        }
    }
    if let Err(e) = decode_request(data) {
        assert!(e.at <= data.len());
    }
    let s = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    write_string(&mut out, &s);
    assert_eq!(Reader::new(&out).value(), Ok(Value::String(s.into_owned())));
});
