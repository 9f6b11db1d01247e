//! The SNI of a TLS ClientHello (`routing::detect::client_hello_sni`), fed the first bytes
//! a client sends to a `TLS` service port: never panics; a name found is lower case and
//! also found when the record is followed by more bytes (the proxy peeks a growing buffer).
#![no_main]

use interceptor_proxy::routing::detect::client_hello_sni;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(name) = client_hello_sni(data) else {
        return;
    };
    assert_eq!(name, name.to_ascii_lowercase(), "SNI not lower case");
    let mut more = data.to_vec();
    more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
    assert_eq!(
        client_hello_sni(&more).as_deref(),
        Some(name.as_str()),
        "bytes after the record changed the SNI"
    );
});
