//! The subset of Hessian 2.0 (<http://hessian.caucho.com/doc/hessian-serialization.html>,
//! with Dubbo's hessian-lite reading of `0x5f` as a double in thousandths) that routing a
//! Dubbo request needs: every value can be read or skipped; strings, integers, longs,
//! doubles, booleans, null and dates are kept, maps are kept as pairs (attachments), lists,
//! binaries and typed objects are skipped (their class definitions and types are recorded,
//! as later references need them).
//!
//! Written for hostile input: every length is checked against the bytes that are there
//! (nothing is allocated from a declared length), nesting is bounded ([`MAX_DEPTH`]), and
//! an error names the byte offset. Why not a crate: see the module `routing::dubbo`.

/// Deepest nesting of lists, maps and objects read; deeper input is an error, not a stack
/// overflow.
pub const MAX_DEPTH: usize = 64;

/// A decoded value; containers other than maps are skipped (read past, not kept).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Double(f64),
    /// Milliseconds since the epoch.
    Date(i64),
    String(String),
    /// Binary data of this many bytes (skipped).
    Binary(usize),
    /// A list of this many elements (skipped).
    List(usize),
    /// An untyped or typed map, its pairs in order.
    Map(Vec<(Value, Value)>),
    /// A typed object of this class (its fields skipped).
    Object(String),
    /// A back reference to an earlier object.
    Ref(u32),
}

impl Value {
    /// The value as a route match sees it: strings as they are, numbers in decimal,
    /// booleans as `true`/`false`; `None` for null and containers.
    pub fn as_match_string(&self) -> Option<String> {
        match self {
            Value::String(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Long(i) => Some(i.to_string()),
            Value::Double(d) => Some(d.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Date(ms) => Some(ms.to_string()),
            _ => None,
        }
    }
}

/// Why a Hessian 2 body does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Hessian2 at byte {at}: {what}")]
pub struct DecodeError {
    /// Byte offset in the body.
    pub at: usize,
    pub what: &'static str,
}

/// A Hessian 2 reader over one body: its class definitions and types are shared by the
/// values read from it in order.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Field counts of the class definitions seen, by reference number, with their names.
    classes: Vec<(String, usize)>,
    /// Types seen (lists and maps), by reference number.
    types: Vec<String>,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            classes: Vec::new(),
            types: Vec::new(),
        }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Whether every byte has been read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError { at: self.pos, what }
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(self.err("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(self.err("unexpected end"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(self.err("length past the end of the body"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// The next value.
    pub fn value(&mut self) -> Result<Value, DecodeError> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        loop {
            let b = self.peek()?;
            let v = match b {
                b'N' => {
                    self.pos += 1;
                    Value::Null
                }
                b'T' | b'F' => {
                    self.pos += 1;
                    Value::Bool(b == b'T')
                }
                0x80..=0xbf | 0xc0..=0xcf | 0xd0..=0xd7 | b'I' => Value::Int(self.int()?),
                0xd8..=0xff | 0x38..=0x3f | 0x59 | b'L' => Value::Long(self.long()?),
                0x5b..=0x5f | b'D' => Value::Double(self.double()?),
                0x4a => {
                    self.pos += 1;
                    Value::Date(self.be(8)? as i64)
                }
                0x4b => {
                    self.pos += 1;
                    Value::Date(i64::from(self.be(4)? as u32 as i32) * 60_000)
                }
                0x00..=0x1f | 0x30..=0x33 | b'S' | b'R' => Value::String(self.string()?),
                0x20..=0x2f | 0x34..=0x37 | b'B' | b'A' => Value::Binary(self.binary()?),
                0x55..=0x58 | 0x70..=0x7f => Value::List(self.list(depth)?),
                b'H' | b'M' => Value::Map(self.map(depth)?),
                b'C' => {
                    self.pos += 1;
                    let name = self.string()?;
                    let n = self.int()?;
                    let n = usize::try_from(n).map_err(|_| self.err("negative field count"))?;
                    for _ in 0..n {
                        self.string()?;
                    }
                    self.classes.push((name, n));
                    // The definition precedes the instance that uses it.
                    continue;
                }
                b'O' | 0x60..=0x6f => Value::Object(self.object(depth)?),
                b'Q' => {
                    self.pos += 1;
                    Value::Ref(self.int()? as u32)
                }
                _ => return Err(self.err("not a Hessian 2 value")),
            };
            return Ok(v);
        }
    }

    /// An int (`I` and its compact forms).
    pub fn int(&mut self) -> Result<i32, DecodeError> {
        let b = self.byte()?;
        Ok(match b {
            0x80..=0xbf => i32::from(b) - 0x90,
            0xc0..=0xcf => ((i32::from(b) - 0xc8) << 8) | i32::from(self.byte()?),
            0xd0..=0xd7 => ((i32::from(b) - 0xd4) << 16) | self.be(2)? as i32,
            b'I' => self.be(4)? as u32 as i32,
            _ => {
                self.pos -= 1;
                return Err(self.err("not an int"));
            }
        })
    }

    fn long(&mut self) -> Result<i64, DecodeError> {
        let b = self.byte()?;
        Ok(match b {
            0xd8..=0xef => i64::from(b) - 0xe0,
            0xf0..=0xff => ((i64::from(b) - 0xf8) << 8) | i64::from(self.byte()?),
            0x38..=0x3f => ((i64::from(b) - 0x3c) << 16) | self.be(2)? as i64,
            0x59 => i64::from(self.be(4)? as u32 as i32),
            b'L' => self.be(8)? as i64,
            _ => unreachable!("checked by the caller"),
        })
    }

    fn double(&mut self) -> Result<f64, DecodeError> {
        let b = self.byte()?;
        Ok(match b {
            0x5b => 0.0,
            0x5c => 1.0,
            0x5d => f64::from(self.byte()? as i8),
            0x5e => f64::from(self.be(2)? as u16 as i16),
            // hessian-lite (Dubbo) and Caucho read this as thousandths.
            0x5f => f64::from(self.be(4)? as u32 as i32) * 0.001,
            b'D' => f64::from_bits(self.be(8)?),
            _ => unreachable!("checked by the caller"),
        })
    }

    /// A string (every chunk). Its length counts UTF-16 units, encoded as UTF-8 (with
    /// surrogates encoded one by one, as Java writes them).
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let mut units: Vec<u16> = Vec::new();
        let mut ascii = String::new();
        loop {
            let b = self.byte()?;
            let (len, last) = match b {
                0x00..=0x1f => (usize::from(b), true),
                0x30..=0x33 => (
                    (usize::from(b - 0x30) << 8) | usize::from(self.byte()?),
                    true,
                ),
                b'S' => (self.be(2)? as usize, true),
                b'R' => (self.be(2)? as usize, false),
                _ => {
                    self.pos -= 1;
                    return Err(self.err("not a string"));
                }
            };
            // The common case: a chunk of ASCII, one byte a unit.
            if let Some(chunk) = self.buf.get(self.pos..self.pos + len) {
                if chunk.is_ascii() && units.is_empty() {
                    ascii.push_str(std::str::from_utf8(chunk).expect("ASCII"));
                    self.pos += len;
                    if last {
                        return Ok(ascii);
                    }
                    continue;
                }
            }
            if !ascii.is_empty() {
                units.extend(ascii.encode_utf16());
                ascii.clear();
            }
            let mut n = 0;
            while n < len {
                let c = self.byte()?;
                let cont = |r: &mut Self| -> Result<u32, DecodeError> {
                    let x = r.byte()?;
                    if x & 0xc0 != 0x80 {
                        return Err(r.err("bad UTF-8 continuation byte"));
                    }
                    Ok(u32::from(x & 0x3f))
                };
                let cp = match c {
                    0x00..=0x7f => u32::from(c),
                    0xc0..=0xdf => (u32::from(c & 0x1f) << 6) | cont(self)?,
                    0xe0..=0xef => (u32::from(c & 0x0f) << 12) | (cont(self)? << 6) | cont(self)?,
                    0xf0..=0xf7 => {
                        (u32::from(c & 0x07) << 18)
                            | (cont(self)? << 12)
                            | (cont(self)? << 6)
                            | cont(self)?
                    }
                    _ => return Err(self.err("bad UTF-8 lead byte")),
                };
                if cp > 0xffff {
                    // Not how Java writes it, but what other writers send: two units.
                    let cp = cp.checked_sub(0x10000).ok_or(self.err("bad code point"))?;
                    if cp > 0xfffff {
                        return Err(self.err("bad code point"));
                    }
                    units.push(0xd800 | (cp >> 10) as u16);
                    units.push(0xdc00 | (cp & 0x3ff) as u16);
                    n += 2;
                } else {
                    units.push(cp as u16);
                    n += 1;
                }
            }
            if last {
                return Ok(String::from_utf16_lossy(&units));
            }
        }
    }

    fn binary(&mut self) -> Result<usize, DecodeError> {
        let mut total = 0usize;
        loop {
            let b = self.byte()?;
            let (len, last) = match b {
                0x20..=0x2f => (usize::from(b - 0x20), true),
                0x34..=0x37 => (
                    (usize::from(b - 0x34) << 8) | usize::from(self.byte()?),
                    true,
                ),
                b'B' => (self.be(2)? as usize, true),
                b'A' => (self.be(2)? as usize, false),
                _ => {
                    self.pos -= 1;
                    return Err(self.err("not a binary chunk"));
                }
            };
            self.take(len)?;
            total += len;
            if last {
                return Ok(total);
            }
        }
    }

    /// A list or map type: a string (recorded) or a reference to one recorded earlier.
    fn type_name(&mut self) -> Result<String, DecodeError> {
        match self.peek()? {
            0x00..=0x1f | 0x30..=0x33 | b'S' | b'R' => {
                let t = self.string()?;
                self.types.push(t.clone());
                Ok(t)
            }
            _ => {
                let at = self.pos;
                let i = self.int()?;
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.types.get(i).cloned())
                    .ok_or(DecodeError {
                        at,
                        what: "type reference to no type",
                    })
            }
        }
    }

    fn length(&mut self) -> Result<usize, DecodeError> {
        let n = self.int()?;
        usize::try_from(n).map_err(|_| self.err("negative length"))
    }

    /// Skips a list; returns how many elements it had.
    fn list(&mut self, depth: usize) -> Result<usize, DecodeError> {
        let b = self.byte()?;
        let fixed = match b {
            0x55 => {
                self.type_name()?;
                None
            }
            0x56 => {
                self.type_name()?;
                Some(self.length()?)
            }
            0x57 => None,
            0x58 => Some(self.length()?),
            0x70..=0x77 => {
                self.type_name()?;
                Some(usize::from(b - 0x70))
            }
            _ => Some(usize::from(b - 0x78)),
        };
        match fixed {
            // Every element takes at least one byte: a huge count ends at the body's end.
            Some(n) => {
                for _ in 0..n {
                    self.value_at(depth + 1)?;
                }
                Ok(n)
            }
            None => {
                let mut n = 0;
                while self.peek()? != b'Z' {
                    self.value_at(depth + 1)?;
                    n += 1;
                }
                self.pos += 1;
                Ok(n)
            }
        }
    }

    fn map(&mut self, depth: usize) -> Result<Vec<(Value, Value)>, DecodeError> {
        if self.byte()? == b'M' {
            self.type_name()?;
        }
        let mut pairs = Vec::new();
        while self.peek()? != b'Z' {
            let k = self.value_at(depth + 1)?;
            let v = self.value_at(depth + 1)?;
            pairs.push((k, v));
        }
        self.pos += 1;
        Ok(pairs)
    }

    /// Skips an object instance; returns its class name.
    fn object(&mut self, depth: usize) -> Result<String, DecodeError> {
        let at = self.pos;
        let b = self.byte()?;
        let i = if b == b'O' {
            usize::try_from(self.int()?).unwrap_or(usize::MAX)
        } else {
            usize::from(b - 0x60)
        };
        let (name, fields) = self.classes.get(i).cloned().ok_or(DecodeError {
            at,
            what: "object of an undefined class",
        })?;
        for _ in 0..fields {
            self.value_at(depth + 1)?;
        }
        Ok(name)
    }
}

/// Appends `s` as a Hessian 2 string (what an error response's body carries).
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    let units: Vec<u16> = s.encode_utf16().collect();
    let mut chunks = units.chunks(0xffff).peekable();
    if units.is_empty() {
        out.push(0);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let len = chunk.len();
        let last = chunks.peek().is_none();
        if last && len <= 0x1f {
            out.push(len as u8);
        } else if last && len <= 0x3ff {
            out.push(0x30 + (len >> 8) as u8);
            out.push(len as u8);
        } else {
            out.push(if last { b'S' } else { b'R' });
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        // Each unit on its own (surrogates too), as Java's writer does.
        for &u in chunk {
            let u = u32::from(u);
            if u < 0x80 {
                out.push(u as u8);
            } else if u < 0x800 {
                out.push(0xc0 | (u >> 6) as u8);
                out.push(0x80 | (u & 0x3f) as u8);
            } else {
                out.push(0xe0 | (u >> 12) as u8);
                out.push(0x80 | ((u >> 6) & 0x3f) as u8);
                out.push(0x80 | (u & 0x3f) as u8);
            }
        }
    }
}

/// Appends `i` as a Hessian 2 int.
pub fn write_int(out: &mut Vec<u8>, i: i32) {
    if (-0x10..=0x2f).contains(&i) {
        out.push((i + 0x90) as u8);
    } else if (-0x800..=0x7ff).contains(&i) {
        out.push((0xc8 + (i >> 8)) as u8);
        out.push(i as u8);
    } else if (-0x40000..=0x3ffff).contains(&i) {
        out.push((0xd4 + (i >> 16)) as u8);
        out.extend_from_slice(&(i as u16).to_be_bytes());
    } else {
        out.push(b'I');
        out.extend_from_slice(&i.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(b: &[u8]) -> Result<Value, DecodeError> {
        Reader::new(b).value()
    }

    #[test]
    fn scalars_in_every_form() {
        for (bytes, want) in [
            (&[0x90][..], Value::Int(0)),
            (&[0x80], Value::Int(-16)),
            (&[0xbf], Value::Int(47)),
            (&[0xc8, 0x30], Value::Int(48)),
            (&[0xc0, 0x00], Value::Int(-2048)),
            (&[0xd4, 0x08, 0x00], Value::Int(2048)),
            (&[0xd0, 0x00, 0x00], Value::Int(-262144)),
            (&[b'I', 0x7f, 0xff, 0xff, 0xff], Value::Int(i32::MAX)),
            (&[0xe0], Value::Long(0)),
            (&[0xd8], Value::Long(-8)),
            (&[0xf8, 0x08], Value::Long(8)),
            (&[0x3c, 0x08, 0x00], Value::Long(2048)),
            (&[0x59, 0xff, 0xff, 0xff, 0xff], Value::Long(-1)),
            (&[b'L', 0, 0, 0, 1, 0, 0, 0, 0], Value::Long(1 << 32)),
            (&[0x5b], Value::Double(0.0)),
            (&[0x5c], Value::Double(1.0)),
            (&[0x5d, 0xff], Value::Double(-1.0)),
            (&[0x5e, 0x01, 0x00], Value::Double(256.0)),
            (&[0x5f, 0, 0, 0x0b, 0xb8], Value::Double(3.0)),
            (b"N", Value::Null),
            (b"T", Value::Bool(true)),
            (b"F", Value::Bool(false)),
            (&[0x4b, 0, 0, 0, 1], Value::Date(60_000)),
            (
                &[0x05, b'h', b'e', b'l', b'l', b'o'],
                Value::String("hello".into()),
            ),
            (
                &[0x02, 0xc3, 0xa9, 0xe2, 0x82, 0xac],
                Value::String("é€".into()),
            ),
            (&[b'R', 0, 1, b'a', 0x01, b'b'], Value::String("ab".into())),
            (&[0x23, 1, 2, 3], Value::Binary(3)),
        ] {
            assert_eq!(one(bytes).unwrap(), want, "{bytes:02x?}");
        }
        let mut d = vec![b'D'];
        d.extend(2.5f64.to_bits().to_be_bytes());
        assert_eq!(one(&d).unwrap(), Value::Double(2.5));
    }

    #[test]
    fn containers_are_skipped_and_maps_kept() {
        // A typed fixed list of 2 ints, then a reference to its type in a second one.
        let mut r = Reader::new(&[
            0x72, 0x04, b'[', b'i', b'n', b't', 0x91, 0x92, 0x71, 0x90, 0x93,
        ]);
        assert_eq!(r.value().unwrap(), Value::List(2));
        assert_eq!(r.value().unwrap(), Value::List(1));
        assert!(r.at_end());
        // A class definition, then two instances of it.
        let mut body = vec![b'C', 0x03, b'c', b'a', b'r', 0x92, 0x01, b'a', 0x01, b'b'];
        body.extend([0x60, 0x91, 0x01, b'x', 0x60, b'N', b'T']);
        let mut r = Reader::new(&body);
        assert_eq!(r.value().unwrap(), Value::Object("car".into()));
        assert_eq!(r.value().unwrap(), Value::Object("car".into()));
        assert!(r.at_end());
        let m = one(&[b'H', 0x01, b'k', 0x01, b'v', 0x91, b'N', b'Z']).unwrap();
        assert_eq!(
            m,
            Value::Map(vec![
                (Value::String("k".into()), Value::String("v".into())),
                (Value::Int(1), Value::Null)
            ])
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_crash() {
        // A fixed list that claims 2^31-1 elements: no allocation, ends at the end.
        assert!(one(&[0x58, b'I', 0x7f, 0xff, 0xff, 0xff, 0x90]).is_err());
        // Nesting deeper than the bound.
        let deep = vec![0x79; 100_000];
        assert_eq!(one(&deep).unwrap_err().what, "nested too deep");
        assert!(one(&[0x60]).is_err(), "undefined class");
        assert!(one(&[0x71, 0x95]).is_err(), "type reference to no type");
        assert!(one(&[0x03, b'a']).is_err(), "short string");
        assert!(one(&[0x01, 0xff]).is_err(), "bad UTF-8");
        assert!(one(&[0x40]).is_err(), "reserved byte");
    }

    #[test]
    fn written_strings_and_ints_read_back() {
        for s in [
            "",
            "a",
            &"x".repeat(31),
            &"y".repeat(1000),
            &"z".repeat(70_000),
            "é€😀",
        ] {
            let mut out = Vec::new();
            write_string(&mut out, s);
            assert_eq!(
                one(&out).unwrap(),
                Value::String(s.to_owned()),
                "{}",
                s.len()
            );
        }
        for i in [
            0,
            -16,
            47,
            48,
            -2048,
            2047,
            2048,
            -262144,
            262143,
            262144,
            i32::MIN,
        ] {
            let mut out = Vec::new();
            write_int(&mut out, i);
            assert_eq!(one(&out).unwrap(), Value::Int(i));
        }
    }
}
