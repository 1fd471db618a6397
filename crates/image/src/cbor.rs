//! The metadata codec: serde to and from CBOR (RFC 8949), limited to what the records use.
//!
//! It writes exactly the bytes ciborium 0.2 writes for the same records (the images before
//! this codec were written with ciborium, and tests compare both ways): structs are maps
//! with definite lengths keyed by field name; sequences, tuples and arrays are definite
//! arrays; integers take their shortest form (major type 1 for negatives); `None` and unit
//! are `null`; unit variants are their name as text, other variants a one-entry map from
//! the name to the content; `serde_bytes` fields are byte strings.
//!
//! What the records never produce is refused rather than half supported: floating-point
//! numbers, tags, indefinite lengths and sequences or maps of unknown length.
//!
//! Encoding goes into memory ([`to_vec`]) or, piece by piece, into a writer
//! ([`to_writer`]: the image writer hashes and writes the pieces as they come).
//!
//! Decoding works on the whole metadata in memory and borrows text and byte strings from
//! it. Every length or count read from the data is checked against the bytes that remain
//! before it is used (an item takes at least one byte), and the size hints given to serde
//! never exceed that, so a forged length is an error where it is read, not a huge
//! allocation; nesting is limited, and skipping unknown fields does not recurse.

use serde::de::{self, DeserializeSeed, Visitor};
use serde::ser::{self, Serialize};
use std::fmt;

/// How deep arrays, maps and variants may nest (as in ciborium).
const MAX_DEPTH: u32 = 256;

const MAJOR_UNSIGNED: u8 = 0;
const MAJOR_NEGATIVE: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const MAJOR_TAG: u8 = 6;
const MAJOR_SIMPLE: u8 = 7;

const FALSE: u8 = 0xf4;
const TRUE: u8 = 0xf5;
const NULL: u8 = 0xf6;
const UNDEFINED: u8 = 0xf7;

/// A metadata encoding or decoding failure, with where in the data it was found. Boxed:
/// every serde call returns a `Result` of it, which stays small this way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(Box<ErrorInner>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorInner {
    offset: Option<usize>,
    what: String,
}

impl Error {
    #[cold]
    fn at(offset: usize, what: impl Into<String>) -> Error {
        Error(Box::new(ErrorInner { offset: Some(offset), what: what.into() }))
    }

    #[cold]
    fn new(what: String) -> Error {
        Error(Box::new(ErrorInner { offset: None, what }))
    }

    /// The byte offset in the data where decoding failed, when known.
    pub fn offset(&self) -> Option<usize> {
        self.0.offset
    }

    /// What was wrong, without the offset.
    pub fn what(&self) -> &str {
        &self.0.what
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.offset {
            Some(o) => write!(f, "at byte {o}: {}", self.0.what),
            None => f.write_str(&self.0.what),
        }
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Error {
        Error::new(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Error {
        Error::new(msg.to_string())
    }
}

/// Encodes `value`.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut enc = Encoder { out: Vec::with_capacity(4096), sink: None };
    value.serialize(&mut enc)?;
    Ok(enc.out)
}

/// Encodes `value` into `sink`, handing it the bytes in order in pieces of about
/// [`PIECE`] bytes: the whole encoding never sits in memory, and the buffer it goes
/// through stays in cache. An error of `sink` is returned as an [`Error`]; a caller that
/// needs the `io::Error` itself keeps it in its sink.
pub fn to_writer<T: Serialize + ?Sized>(value: &T, sink: &mut dyn std::io::Write) -> Result<(), Error> {
    let mut enc = Encoder { out: Vec::with_capacity(PIECE + PIECE / 4), sink: Some(sink) };
    value.serialize(&mut enc)?;
    enc.flush()
}

/// The size [`to_writer`] hands its sink the encoding in (it can exceed it by one item of
/// a sequence).
pub const PIECE: usize = 256 << 10;

/// Decodes one `T` that must fill all of `data`.
pub fn from_slice<'de, T: de::Deserialize<'de>>(data: &'de [u8]) -> Result<T, Error> {
    let mut d = Decoder { data, pos: 0, depth: 0 };
    let value = T::deserialize(&mut d).map_err(|mut e| {
        // Errors raised by the visitors (a missing field, an integer out of range) carry
        // no position: the decoder's is just past the item at fault.
        e.0.offset.get_or_insert(d.pos);
        e
    })?;
    if d.pos != data.len() {
        return Err(Error::at(d.pos, format!("{} bytes after the end of the record", data.len() - d.pos)));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// Encoding

struct Encoder<'w> {
    out: Vec<u8>,
    /// Where full pieces go; `None`: everything stays in `out`.
    sink: Option<&'w mut dyn std::io::Write>,
}

impl Encoder<'_> {
    /// Passes a full buffer on; called between the items of sequences, so that a piece
    /// never grows much beyond [`PIECE`].
    #[inline(always)]
    fn maybe_flush(&mut self) -> Result<(), Error> {
        if self.out.len() >= PIECE && self.sink.is_some() {
            return self.flush();
        }
        Ok(())
    }

    #[inline(never)]
    fn flush(&mut self) -> Result<(), Error> {
        if let Some(sink) = self.sink.as_mut() {
            sink.write_all(&self.out).map_err(|e| Error::new(format!("writing the encoding: {e}")))?;
            self.out.clear();
        }
        Ok(())
    }

    /// A head in its shortest form: the major type and its argument.
    #[inline(always)]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.out.push(m | arg as u8);
        } else {
            self.long_head(m, arg);
        }
    }

    #[inline(never)]
    fn long_head(&mut self, m: u8, arg: u64) {
        if arg <= u8::MAX as u64 {
            self.out.extend_from_slice(&[m | 24, arg as u8]);
        } else if arg <= u16::MAX as u64 {
            let b = (arg as u16).to_be_bytes();
            self.out.extend_from_slice(&[m | 25, b[0], b[1]]);
        } else if arg <= u32::MAX as u64 {
            let b = (arg as u32).to_be_bytes();
            self.out.extend_from_slice(&[m | 26, b[0], b[1], b[2], b[3]]);
        } else {
            let b = arg.to_be_bytes();
            self.out.extend_from_slice(&[m | 27, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
    }

    #[inline]
    fn signed(&mut self, v: i64) {
        if v < 0 {
            self.head(MAJOR_NEGATIVE, !(v as u64));
        } else {
            self.head(MAJOR_UNSIGNED, v as u64);
        }
    }

    #[inline(always)]
    fn text(&mut self, s: &str) {
        self.head(MAJOR_TEXT, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn no_float() -> Error {
        ser::Error::custom("floating-point numbers are not part of the image metadata")
    }

    fn known_len(len: Option<usize>) -> Result<u64, Error> {
        len.map(|l| l as u64)
            .ok_or_else(|| ser::Error::custom("a sequence or map of unknown length (not part of the image metadata)"))
    }
}

impl ser::Serializer for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out.push(if v { TRUE } else { FALSE });
        Ok(())
    }
    #[inline]
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.signed(v.into());
        Ok(())
    }
    #[inline]
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.signed(v.into());
        Ok(())
    }
    #[inline]
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.signed(v.into());
        Ok(())
    }
    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.signed(v);
        Ok(())
    }
    #[inline]
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        // In range, a plain integer as ciborium writes it; beyond, ciborium would write a
        // bignum tag, which the metadata never needs.
        if v < 0 {
            let n = u64::try_from(-1 - v).map_err(|_| ser::Error::custom("integer below -2^64"))?;
            self.head(MAJOR_NEGATIVE, n);
        } else {
            let n = u64::try_from(v).map_err(|_| ser::Error::custom("integer of 2^64 or more"))?;
            self.head(MAJOR_UNSIGNED, n);
        }
        Ok(())
    }
    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.head(MAJOR_UNSIGNED, v.into());
        Ok(())
    }
    #[inline]
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.head(MAJOR_UNSIGNED, v.into());
        Ok(())
    }
    #[inline]
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.head(MAJOR_UNSIGNED, v.into());
        Ok(())
    }
    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.head(MAJOR_UNSIGNED, v);
        Ok(())
    }
    #[inline]
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        let n = u64::try_from(v).map_err(|_| ser::Error::custom("integer of 2^64 or more"))?;
        self.head(MAJOR_UNSIGNED, n);
        Ok(())
    }
    #[inline]
    fn serialize_f32(self, _v: f32) -> Result<(), Error> {
        Err(Encoder::no_float())
    }
    #[inline]
    fn serialize_f64(self, _v: f64) -> Result<(), Error> {
        Err(Encoder::no_float())
    }
    #[inline]
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.text(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.text(v);
        Ok(())
    }
    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        self.head(MAJOR_BYTES, v.len() as u64);
        self.out.extend_from_slice(v);
        Ok(())
    }
    #[inline]
    fn serialize_none(self) -> Result<(), Error> {
        self.out.push(NULL);
        Ok(())
    }
    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    #[inline]
    fn serialize_unit(self) -> Result<(), Error> {
        self.out.push(NULL);
        Ok(())
    }
    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.out.push(NULL);
        Ok(())
    }
    #[inline]
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        self.text(variant);
        Ok(())
    }
    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.head(MAJOR_MAP, 1);
        self.text(variant);
        value.serialize(self)
    }
    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, Error> {
        self.head(MAJOR_ARRAY, Encoder::known_len(len)?);
        Ok(self)
    }
    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self, Error> {
        self.head(MAJOR_ARRAY, len as u64);
        Ok(self)
    }
    #[inline]
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Error> {
        self.head(MAJOR_ARRAY, len as u64);
        Ok(self)
    }
    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Error> {
        self.head(MAJOR_MAP, 1);
        self.text(variant);
        self.head(MAJOR_ARRAY, len as u64);
        Ok(self)
    }
    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self, Error> {
        self.head(MAJOR_MAP, Encoder::known_len(len)?);
        Ok(self)
    }
    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self, Error> {
        self.head(MAJOR_MAP, len as u64);
        Ok(self)
    }
    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, Error> {
        self.head(MAJOR_MAP, 1);
        self.text(variant);
        self.head(MAJOR_MAP, len as u64);
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeSeq for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)?;
        self.maybe_flush()
    }
    #[inline]
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

/// The tuple kinds: each item is encoded in turn, the head already says how many.
macro_rules! tuple_items {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for &mut Encoder<'_> {
            type Ok = ();
            type Error = Error;
            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                value.serialize(&mut **self)
            }
            #[inline]
            fn end(self) -> Result<(), Error> {
                Ok(())
            }
        }
    )*};
}
tuple_items!(SerializeTuple::serialize_element, SerializeTupleStruct::serialize_field, SerializeTupleVariant::serialize_field);

impl ser::SerializeMap for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        key.serialize(&mut **self)
    }
    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.text(key);
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Encoder<'_> {
    type Ok = ();
    type Error = Error;
    #[inline(always)]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.text(key);
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Decoding

struct Decoder<'de> {
    data: &'de [u8],
    pos: usize,
    depth: u32,
}

/// One data item's head: its major type, the low five bits of its first byte, and the
/// argument those announce (the value, a length or a count; for major type 7 the simple
/// value or the float's bits).
#[derive(Clone, Copy)]
struct Head {
    at: usize,
    major: u8,
    info: u8,
    arg: u64,
}

impl Head {
    fn describe(&self) -> String {
        match (self.major, self.info) {
            (MAJOR_UNSIGNED, _) => format!("integer {}", self.arg),
            (MAJOR_NEGATIVE, _) => format!("integer {}", -1 - self.arg as i128),
            (MAJOR_BYTES, _) => format!("byte string of {} bytes", self.arg),
            (MAJOR_TEXT, _) => format!("text of {} bytes", self.arg),
            (MAJOR_ARRAY, _) => format!("array of {} items", self.arg),
            (MAJOR_MAP, _) => format!("map of {} entries", self.arg),
            (MAJOR_TAG, _) => format!("tag {}", self.arg),
            (_, 20) => "false".into(),
            (_, 21) => "true".into(),
            (_, 22) => "null".into(),
            (_, 23) => "undefined".into(),
            (_, 25..=27) => "a floating-point number".into(),
            _ => format!("simple value {}", self.arg),
        }
    }
}

impl<'de> Decoder<'de> {
    #[inline(always)]
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    #[cold]
    #[inline(never)]
    fn eof(&self) -> Error {
        Error::at(self.pos, "the metadata ends in the middle of an item")
    }

    #[inline(always)]
    fn peek(&self) -> Result<u8, Error> {
        match self.data.get(self.pos) {
            Some(&b) => Ok(b),
            None => Err(self.eof()),
        }
    }

    #[inline(always)]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        match self.data.get(self.pos..self.pos + N).and_then(|b| <[u8; N]>::try_from(b).ok()) {
            Some(b) => {
                self.pos += N;
                Ok(b)
            }
            None => Err(self.eof()),
        }
    }

    #[inline(always)]
    fn head(&mut self) -> Result<Head, Error> {
        let at = self.pos;
        let first = self.peek()?;
        self.pos = at + 1;
        let (major, info) = (first >> 5, first & 0x1f);
        let arg = match info {
            0..=23 => info.into(),
            24 => u8::from_be_bytes(self.fixed()?).into(),
            25 => u16::from_be_bytes(self.fixed()?).into(),
            26 => u32::from_be_bytes(self.fixed()?).into(),
            27 => u64::from_be_bytes(self.fixed()?),
            _ => return Err(Decoder::bad_head(at, first)),
        };
        Ok(Head { at, major, info, arg })
    }

    #[cold]
    #[inline(never)]
    fn bad_head(at: usize, first: u8) -> Error {
        if first & 0x1f == 31 && ![MAJOR_UNSIGNED, MAJOR_NEGATIVE, MAJOR_TAG].contains(&(first >> 5)) {
            Error::at(at, "an indefinite length (not part of the image metadata)")
        } else {
            Error::at(at, format!("malformed item head {first:#04x}"))
        }
    }

    #[cold]
    #[inline(never)]
    fn unexpected(h: &Head, expected: &str) -> Error {
        Error::at(h.at, format!("expected {expected}, found {}", h.describe()))
    }

    /// The `h.arg` bytes that follow, if there are that many.
    #[inline(always)]
    fn take(&mut self, h: &Head) -> Result<&'de [u8], Error> {
        if h.arg > self.remaining() as u64 {
            return Err(self.too_long(h));
        }
        let s = &self.data[self.pos..self.pos + h.arg as usize];
        self.pos += h.arg as usize;
        Ok(s)
    }

    #[cold]
    #[inline(never)]
    fn too_long(&self, h: &Head) -> Error {
        Error::at(h.at, format!("{}, only {} remain", h.describe(), self.remaining()))
    }

    #[inline(always)]
    fn text(&mut self, h: &Head) -> Result<&'de str, Error> {
        let b = self.take(h)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s),
            Err(e) => Err(Decoder::not_utf8(h, e)),
        }
    }

    #[cold]
    #[inline(never)]
    fn not_utf8(h: &Head, e: std::str::Utf8Error) -> Error {
        Error::at(h.at, format!("text is not UTF-8: {e}"))
    }

    /// An array's or map's item count, which cannot exceed the bytes left (each item takes
    /// at least one).
    #[inline(always)]
    fn count(&self, h: &Head, per_item: u64) -> Result<u64, Error> {
        if h.arg.saturating_mul(per_item) > self.remaining() as u64 {
            return Err(self.too_many(h));
        }
        Ok(h.arg)
    }

    #[cold]
    #[inline(never)]
    fn too_many(&self, h: &Head) -> Error {
        Error::at(h.at, format!("{} cannot fit in the {} bytes that remain", h.describe(), self.remaining()))
    }

    #[inline(always)]
    fn enter(&mut self, at: usize) -> Result<(), Error> {
        if self.depth >= MAX_DEPTH {
            return Err(Decoder::too_deep(at));
        }
        self.depth += 1;
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn too_deep(at: usize) -> Error {
        Error::at(at, format!("items nested more than {MAX_DEPTH} deep"))
    }

    #[cold]
    #[inline(never)]
    fn left_over(h: &Head, left: u64) -> Error {
        Error::at(h.at, format!("{} has {left} more than expected", h.describe()))
    }

    #[inline(always)]
    fn visit_int<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match h.major {
            MAJOR_UNSIGNED => visitor.visit_u64(h.arg),
            MAJOR_NEGATIVE => match i64::try_from(h.arg) {
                Ok(n) => visitor.visit_i64(-1 - n),
                Err(_) => visitor.visit_i128(-1 - h.arg as i128),
            },
            _ => Err(Decoder::unexpected(&h, "an integer")),
        }
    }

    #[inline]
    fn visit_array<V: Visitor<'de>>(&mut self, h: Head, visitor: V) -> Result<V::Value, Error> {
        let left = self.count(&h, 1)?;
        self.enter(h.at)?;
        let mut access = Items { de: self, left };
        let value = visitor.visit_seq(&mut access)?;
        if access.left != 0 {
            return Err(Decoder::left_over(&h, access.left));
        }
        self.depth -= 1;
        Ok(value)
    }

    #[inline]
    fn visit_map<V: Visitor<'de>>(&mut self, h: Head, visitor: V) -> Result<V::Value, Error> {
        let left = self.count(&h, 2)?;
        self.enter(h.at)?;
        let mut access = Items { de: self, left };
        let value = visitor.visit_map(&mut access)?;
        if access.left != 0 {
            return Err(Decoder::left_over(&h, access.left));
        }
        self.depth -= 1;
        Ok(value)
    }

    /// Steps over one whole item, without recursion.
    fn skip(&mut self) -> Result<(), Error> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let h = self.head()?;
            let more = match h.major {
                MAJOR_BYTES | MAJOR_TEXT => {
                    self.take(&h)?;
                    0
                }
                MAJOR_ARRAY => self.count(&h, 1)?,
                MAJOR_MAP => self.count(&h, 2)? * 2,
                MAJOR_TAG => 1,
                _ => 0,
            };
            // Each count is bounded by the bytes left (`count`), so this cannot grow
            // beyond what the data can hold.
            pending = pending.saturating_add(more);
        }
        Ok(())
    }
}

/// The items of an array (or the entries of a map) still to be read.
struct Items<'a, 'de> {
    de: &'a mut Decoder<'de>,
    left: u64,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left as usize)
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = Error;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.de)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.left as usize)
    }
}

/// A variant written as its name alone (a unit variant).
struct NameOnly<'a, 'de>(&'a mut Decoder<'de>);

impl<'de> de::EnumAccess<'de> for NameOnly<'_, 'de> {
    type Error = Error;
    type Variant = Self;

    #[inline]
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let v = seed.deserialize(&mut *self.0)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for NameOnly<'_, 'de> {
    type Error = Error;

    #[inline]
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    #[inline]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, Error> {
        Err(de::Error::invalid_type(de::Unexpected::UnitVariant, &"a variant with content"))
    }
    #[inline]
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::invalid_type(de::Unexpected::UnitVariant, &"a tuple variant"))
    }
    #[inline]
    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::invalid_type(de::Unexpected::UnitVariant, &"a struct variant"))
    }
}

/// A variant written as a one-entry map from its name to its content.
struct NameAndContent<'a, 'de>(&'a mut Decoder<'de>);

impl<'de> de::EnumAccess<'de> for NameAndContent<'_, 'de> {
    type Error = Error;
    type Variant = Self;

    #[inline]
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let v = seed.deserialize(&mut *self.0)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for NameAndContent<'_, 'de> {
    type Error = Error;

    #[inline]
    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(self.0)
    }
    #[inline]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self.0)
    }
    #[inline]
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self.0, visitor)
    }
    #[inline]
    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(self.0, visitor)
    }
}

macro_rules! ints {
    ($($name:ident)*) => {$(
        #[inline]
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.visit_int(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = Error;

    #[inline]
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match h.major {
            MAJOR_UNSIGNED => visitor.visit_u64(h.arg),
            MAJOR_NEGATIVE => match i64::try_from(h.arg) {
                Ok(n) => visitor.visit_i64(-1 - n),
                Err(_) => visitor.visit_i128(-1 - h.arg as i128),
            },
            MAJOR_BYTES => visitor.visit_borrowed_bytes(self.take(&h)?),
            MAJOR_TEXT => visitor.visit_borrowed_str(self.text(&h)?),
            MAJOR_ARRAY => self.visit_array(h, visitor),
            MAJOR_MAP => self.visit_map(h, visitor),
            _ => match h.info {
                20 => visitor.visit_bool(false),
                21 => visitor.visit_bool(true),
                22 | 23 => visitor.visit_none(),
                _ => Err(Decoder::unexpected(&h, "an item of the image metadata")),
            },
        }
    }

    #[inline]
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match (h.major, h.info) {
            (MAJOR_SIMPLE, 20) => visitor.visit_bool(false),
            (MAJOR_SIMPLE, 21) => visitor.visit_bool(true),
            _ => Err(Decoder::unexpected(&h, "true or false")),
        }
    }

    ints!(deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
          deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128);

    #[inline]
    fn deserialize_f32<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(Error::at(self.pos, "floating-point numbers are not part of the image metadata"))
    }

    #[inline]
    fn deserialize_f64<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(Error::at(self.pos, "floating-point numbers are not part of the image metadata"))
    }

    #[inline]
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    #[inline]
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        if h.major != MAJOR_TEXT {
            return Err(Decoder::unexpected(&h, "text"));
        }
        visitor.visit_borrowed_str(self.text(&h)?)
    }

    #[inline]
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    #[inline]
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match h.major {
            MAJOR_BYTES => visitor.visit_borrowed_bytes(self.take(&h)?),
            // ciborium reads an array of small integers as bytes too.
            MAJOR_ARRAY => self.visit_array(h, visitor),
            _ => Err(Decoder::unexpected(&h, "a byte string")),
        }
    }

    #[inline]
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_bytes(visitor)
    }

    #[inline]
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek()? {
            NULL | UNDEFINED => {
                self.pos += 1;
                visitor.visit_none()
            }
            _ => visitor.visit_some(self),
        }
    }

    #[inline]
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match (h.major, h.info) {
            (MAJOR_SIMPLE, 22 | 23) => visitor.visit_unit(),
            _ => Err(Decoder::unexpected(&h, "null")),
        }
    }

    #[inline]
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    #[inline]
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        if h.major != MAJOR_ARRAY {
            return Err(Decoder::unexpected(&h, "an array"));
        }
        self.visit_array(h, visitor)
    }

    #[inline]
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    #[inline]
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    #[inline]
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        if h.major != MAJOR_MAP {
            return Err(Decoder::unexpected(&h, "a map"));
        }
        self.visit_map(h, visitor)
    }

    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    #[inline]
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let at = self.pos;
        let first = self.peek()?;
        if first >> 5 == MAJOR_TEXT {
            return visitor.visit_enum(NameOnly(self));
        }
        let h = self.head()?;
        if h.major != MAJOR_MAP || h.arg != 1 {
            return Err(Decoder::unexpected(&h, "a variant name or a one-entry map"));
        }
        self.enter(at)?;
        let value = visitor.visit_enum(NameAndContent(self))?;
        self.depth -= 1;
        Ok(value)
    }

    #[inline]
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let h = self.head()?;
        match h.major {
            MAJOR_TEXT => {
                let b = self.take(&h)?;
                // Names are ASCII: checking that is cheaper than full UTF-8 validation,
                // and names read as bytes or as text match alike.
                if b.is_ascii() {
                    visitor.visit_borrowed_bytes(b)
                } else {
                    let s = std::str::from_utf8(b).map_err(|e| Error::at(h.at, format!("text is not UTF-8: {e}")))?;
                    visitor.visit_borrowed_str(s)
                }
            }
            MAJOR_BYTES => visitor.visit_borrowed_bytes(self.take(&h)?),
            _ => Err(Decoder::unexpected(&h, "a field or variant name")),
        }
    }

    #[inline]
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip()?;
        visitor.visit_unit()
    }

    #[inline]
    fn is_human_readable(&self) -> bool {
        false
    }
}
