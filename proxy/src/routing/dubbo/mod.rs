//! Dubbo 2 (the `dubbo://` protocol of Apache Dubbo, HSF's family): the 16-byte frame
//! header and the request body an invocation carries in Hessian 2 ([`hessian`]).
//!
//! ```text
//! 0      2      3      4             12           16
//! | dabb | flags| status| request id | body length | body ...
//! flags: 0x80 request, 0x40 two-way, 0x20 event (heartbeat), low 5 bits serialization (2 = Hessian 2)
//! ```
//!
//! A request body is, in order: the Dubbo version, the service path, the service version,
//! the method, the parameter types descriptor (JVM style, e.g. `Ljava/lang/String;I`), one
//! value per parameter type, and the attachments map (`application`, `group`, ...).
//!
//! The Hessian 2 decoder is our own ([`hessian`]), for the subset routing needs. Of the
//! crates with a permissive licence, `hessian2` 0.0.10 (MIT) decodes what the clients send
//! but allocates from declared lengths (`Vec::with_capacity` of a list's count, so a
//! 6-byte body can ask for gigabytes) and recurses without a bound (a body of nested lists
//! overflows the stack): input a proxy takes from any workload must not do either, and it
//! builds a whole value tree where routing reads five strings. `hessian` 0.0.1 (Apache-2.0)
//! is an unfinished placeholder; `hessian_rs` is GPL-3.0. ARCHITECTURE.md has the figures.

pub mod hessian;

use hessian::{DecodeError, Reader, Value};

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = [0xda, 0xbb];
pub const HEADER_LEN: usize = 16;
pub const FLAG_REQUEST: u8 = 0x80;
pub const FLAG_TWO_WAY: u8 = 0x40;
pub const FLAG_EVENT: u8 = 0x20;
pub const SERIALIZATION_MASK: u8 = 0x1f;
/// Serialization id of Hessian 2.
pub const HESSIAN2: u8 = 2;

/// Response status codes (Dubbo's `Response`).
pub mod status {
    pub const OK: u8 = 20;
    pub const SERVER_TIMEOUT: u8 = 31;
    pub const BAD_REQUEST: u8 = 40;
    pub const SERVICE_NOT_FOUND: u8 = 60;
    pub const SERVER_ERROR: u8 = 80;
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub status: u8,
    pub id: u64,
    pub body_len: u32,
}

/// Why a frame header closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a Dubbo frame: magic {0:02x?}, want da bb")]
    BadMagic([u8; 2]),
    #[error("body of {len} bytes is over the cap of {cap} (--dubbo-max-body)")]
    OverCap { len: u64, cap: u32 },
}

impl Header {
    /// Parses a header; a bad magic or a body over `cap` bytes is an error (the body
    /// length is a signed 32-bit number on the wire: a negative one is over any cap).
    pub fn parse(b: &[u8; HEADER_LEN], cap: u32) -> Result<Header, FrameError> {
        if b[..2] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1]]));
        }
        let body_len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        if body_len > cap || body_len > i32::MAX as u32 {
            return Err(FrameError::OverCap {
                len: u64::from(body_len),
                cap,
            });
        }
        Ok(Header {
            flags: b[2],
            status: b[3],
            id: u64::from_be_bytes(b[4..12].try_into().expect("8 bytes")),
            body_len,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..2].copy_from_slice(&MAGIC);
        b[2] = self.flags;
        b[3] = self.status;
        b[4..12].copy_from_slice(&self.id.to_be_bytes());
        b[12..].copy_from_slice(&self.body_len.to_be_bytes());
        b
    }

    pub fn is_request(&self) -> bool {
        self.flags & FLAG_REQUEST != 0
    }
    pub fn is_two_way(&self) -> bool {
        self.flags & FLAG_TWO_WAY != 0
    }
    pub fn is_event(&self) -> bool {
        self.flags & FLAG_EVENT != 0
    }
    pub fn serialization(&self) -> u8 {
        self.flags & SERIALIZATION_MASK
    }
}

/// Rewrites the request id of an encoded frame in place.
pub fn set_id(frame: &mut [u8], id: u64) {
    frame[4..12].copy_from_slice(&id.to_be_bytes());
}

/// A response frame with `status` and an error message (Dubbo's format for any status but
/// OK: the body is the message as a Hessian 2 string).
pub fn error_response(id: u64, status: u8, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 3);
    hessian::write_string(&mut body, message);
    frame(HESSIAN2, status, id, &body)
}

/// The answer to a heartbeat request `id` (an event response whose body is null).
pub fn heartbeat_response(id: u64, serialization: u8) -> Vec<u8> {
    frame(FLAG_EVENT | serialization, status::OK, id, b"N")
}

fn frame(flags: u8, status: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let h = Header {
        flags,
        status,
        id,
        body_len: body.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(body);
    out
}

/// What routing reads from a request body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Invocation {
    pub dubbo_version: String,
    /// The service path (interface name), e.g. `org.example.DemoService`.
    pub service: String,
    pub version: String,
    pub method: String,
    pub parameter_types: String,
    /// The arguments as a match sees them ([`Value::as_match_string`]).
    pub args: Vec<Option<String>>,
    /// String-keyed attachments with a scalar value.
    pub attachments: Vec<(String, String)>,
}

impl Invocation {
    pub fn attachment(&self, key: &str) -> Option<&str> {
        self.attachments
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes a Hessian 2 request body.
pub fn decode_request(body: &[u8]) -> Result<Invocation, DecodeError> {
    let mut r = Reader::new(body);
    let mut inv = Invocation {
        dubbo_version: r.string()?,
        service: r.string()?,
        version: r.string()?,
        method: r.string()?,
        ..Default::default()
    };
    let at = r.position();
    inv.parameter_types = r.string()?;
    let n = count_parameter_types(&inv.parameter_types).map_err(|what| DecodeError { at, what })?;
    for _ in 0..n {
        inv.args.push(r.value()?.as_match_string());
    }
    if !r.at_end() {
        let at = r.position();
        match r.value()? {
            Value::Map(pairs) => {
                for (k, v) in pairs {
                    if let (Value::String(k), Some(v)) = (k, v.as_match_string()) {
                        inv.attachments.push((k, v));
                    }
                }
            }
            Value::Null => {}
            _ => {
                return Err(DecodeError {
                    at,
                    what: "attachments are not a map",
                })
            }
        }
    }
    Ok(inv)
}

/// How many parameters a JVM descriptor names (`Ljava/lang/String;[IJ` is 3).
pub fn count_parameter_types(desc: &str) -> Result<usize, &'static str> {
    let b = desc.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b'[' {
            i += 1;
        }
        match b.get(i) {
            Some(b'Z' | b'B' | b'C' | b'D' | b'F' | b'I' | b'J' | b'S') => i += 1,
            Some(b'L') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b';')
                    .ok_or("parameter types: an L type without its ';'")?;
                i += end + 1;
            }
            _ => return Err("parameter types: not a JVM type descriptor"),
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body in the shape dubbo-ssl-python 0.9.6 sends for `call("sayHello", ["bob", 7])`
    /// with `context={"application": "web"}`.
    pub(crate) fn python_client_body() -> Vec<u8> {
        let mut b = Vec::new();
        for s in [
            "2.4.10",
            "org.example.Greeter",
            "1.0.0",
            "sayHello",
            "Ljava/lang/String;I",
            "bob",
        ] {
            hessian::write_string(&mut b, s);
        }
        hessian::write_int(&mut b, 7);
        b.push(b'H');
        for (k, v) in [
            ("path", "org.example.Greeter"),
            ("interface", "org.example.Greeter"),
            ("version", "1.0.0"),
            ("group", "g"),
            ("application", "web"),
        ] {
            hessian::write_string(&mut b, k);
            hessian::write_string(&mut b, v);
        }
        b.push(b'Z');
        b
    }

    #[test]
    fn a_request_body_decodes() {
        let inv = decode_request(&python_client_body()).unwrap();
        assert_eq!(inv.service, "org.example.Greeter");
        assert_eq!(inv.version, "1.0.0");
        assert_eq!(inv.method, "sayHello");
        assert_eq!(inv.args, vec![Some("bob".into()), Some("7".into())]);
        assert_eq!(inv.attachment("application"), Some("web"));
        // Every truncation is an error, never a panic.
        let b = python_client_body();
        for cut in 0..b.len() - 1 {
            let _ = decode_request(&b[..cut]);
        }
    }

    /// What dubbo-ssl-python 0.9.6 encodes for `lookup(Car{name, seats, price}, [1, 2, 3],
    /// ["a", "b"], [car, car], True, 1 << 40, -3.25, "é€" * 40, range(10))` (a fuzz seed,
    /// made with that client's encoder): typed objects with their class definition, typed
    /// lists with type references, compact and long numbers, thousandths doubles.
    #[test]
    fn what_the_python_client_sends_decodes() {
        let body = include_bytes!("../../../../fuzz/seeds/hessian2/typed_values");
        let inv = decode_request(body).unwrap();
        assert_eq!(inv.method, "lookup");
        assert_eq!(inv.args.len(), 9);
        assert_eq!(inv.args[0], None, "an object");
        assert_eq!(inv.args[1], None, "a list");
        assert_eq!(inv.args[4].as_deref(), Some("true"));
        assert_eq!(inv.args[5].as_deref(), Some("1099511627776"));
        assert_eq!(inv.args[6].as_deref(), Some("-3.25"));
        assert_eq!(inv.args[7].as_deref(), Some("é€".repeat(40).as_str()));
        assert_eq!(inv.attachment("group"), Some("g"));
        let frame = include_bytes!("../../../../fuzz/seeds/dubbo_frame/request");
        let h = Header::parse(frame[..16].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(h.flags, FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2);
        let inv = decode_request(&frame[16..]).unwrap();
        assert_eq!(inv.args, vec![Some("bob".into()), Some("7".into())]);
        assert_eq!(inv.attachment("application"), Some("web"));
    }

    #[test]
    fn headers_parse_and_bad_ones_are_refused() {
        let h = Header {
            flags: FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2,
            status: 0,
            id: 7,
            body_len: 100,
        };
        assert_eq!(Header::parse(&h.encode(), 100), Ok(h));
        assert!(matches!(
            Header::parse(&h.encode(), 99),
            Err(FrameError::OverCap { len: 100, cap: 99 })
        ));
        let mut bad = h.encode();
        bad[0] = b'G';
        assert!(matches!(
            Header::parse(&bad, 100),
            Err(FrameError::BadMagic(_))
        ));
        let mut neg = h.encode();
        neg[12] = 0xff;
        assert!(Header::parse(&neg, u32::MAX).is_err(), "negative length");
    }

    #[test]
    fn descriptors_count() {
        assert_eq!(count_parameter_types(""), Ok(0));
        assert_eq!(count_parameter_types("Ljava/lang/String;[IJ"), Ok(3));
        assert_eq!(count_parameter_types("[[Ljava/lang/Object;Z"), Ok(2));
        assert!(count_parameter_types("Ljava/lang/String").is_err());
        assert!(count_parameter_types("Q").is_err());
    }

    #[test]
    fn error_responses_carry_the_message() {
        let f = error_response(9, status::BAD_REQUEST, "bad body");
        let h = Header::parse(f[..16].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!((h.id, h.status, h.is_request()), (9, 40, false));
        assert_eq!(
            Reader::new(&f[16..]).value().unwrap(),
            Value::String("bad body".into())
        );
    }
}
