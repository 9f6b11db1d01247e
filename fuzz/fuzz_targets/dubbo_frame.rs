//! The bytes a client sends to a `DUBBO` port, read as the proxy reads them: frame headers
//! (`routing::dubbo::Header::parse` with a small cap) and, for Hessian 2 requests, their
//! bodies (`routing::dubbo::decode_request`). Never panics; a parsed header encodes back
//! to the same 16 bytes; rewriting a frame's request id changes only those 8 bytes; every
//! error response the proxy would send parses back with its id and status.
#![no_main]

use interceptor_proxy::routing::dubbo::{
    decode_request, error_response, set_id, status, Header, HEADER_LEN, HESSIAN2,
};
use libfuzzer_sys::fuzz_target;

const CAP: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let head: [u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
        let Ok(h) = Header::parse(&head, CAP) else {
            return; // the proxy closes the connection
        };
        assert!(h.body_len <= CAP);
        assert_eq!(h.encode(), head, "header round trip");
        let len = HEADER_LEN + h.body_len as usize;
        if rest.len() < len {
            return; // the proxy waits for the rest
        }
        let mut frame = rest[..len].to_vec();
        set_id(&mut frame, !h.id);
        assert_eq!(frame[..4], rest[..4]);
        assert_eq!(frame[12..], rest[12..len]);
        assert_eq!(Header::parse(frame[..HEADER_LEN].try_into().unwrap(), CAP).unwrap().id, !h.id);
        if h.is_request() && !h.is_event() && h.serialization() == HESSIAN2 {
            if let Err(e) = decode_request(&frame[HEADER_LEN..]) {
                assert!(e.at <= h.body_len as usize, "error offset past the body");
                let resp = error_response(h.id, status::BAD_REQUEST, &e.to_string());
                let rh = Header::parse(resp[..HEADER_LEN].try_into().unwrap(), u32::MAX >> 1).unwrap();
                assert_eq!((rh.id, rh.status, rh.is_request()), (h.id, status::BAD_REQUEST, false));
                assert_eq!(resp.len(), HEADER_LEN + rh.body_len as usize);
            }
        }
        rest = &rest[len..];
    }
});
