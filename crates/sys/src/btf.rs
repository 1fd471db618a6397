//! A reader of the kernel's own type information (BTF, /sys/kernel/btf/vmlinux): where a
//! field lies in a kernel structure on the running kernel, how large a structure is, and
//! the type ID of a kernel function (what a BPF tracing program attaches to).
//!
//! Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst. A header, then the type
//! records (IDs from 1, in order, each a 12-byte `btf_type` plus data whose size depends on
//! its kind), then the string section that names point into.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug)]
pub struct BtfError(pub String);

impl std::fmt::Display for BtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(what: impl Into<String>) -> Result<T, BtfError> {
    Err(BtfError(what.into()))
}

/// FNV-1a of a kind and a name: the key of [`Btf::named`].
fn name_key(kind: u32, name: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ kind as u64;
    for &b in name {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A hasher for keys that are hashes already.
#[derive(Default, Clone, Copy)]
struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl std::hash::BuildHasher for Identity {
    type Hasher = Identity;
    fn build_hasher(&self) -> Identity {
        Identity(0)
    }
}

/// One type record: where it starts in the type section.
#[derive(Clone, Copy)]
struct Rec {
    at: u32,
}

/// The parsed type section, with the structures and functions indexed by name.
pub struct Btf {
    data: Vec<u8>,
    types: usize,
    strs: usize,
    str_len: usize,
    recs: Vec<Rec>,
    /// Named structures and functions by a hash of kind and name (see [`name_key`]): the
    /// first type ID with that key (a lookup checks the name, and scans on a collision).
    named: HashMap<u64, u32, Identity>,
}

/// Where a member lies, and its type (modifiers and typedefs removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outermost structure.
    pub offset: u32,
    pub type_id: u32,
    /// Its size in bytes (pointers: 8).
    pub size: u32,
}

impl Btf {
    /// The running kernel's types.
    pub fn vmlinux() -> Result<Btf, BtfError> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| BtfError(format!("/sys/kernel/btf/vmlinux: {e}")))?;
        Btf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(MAGIC) {
            return err("not little-endian BTF (bad magic)");
        }
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (u32_at(4), u32_at(8), u32_at(12), u32_at(16), u32_at(20))
        else {
            return err("truncated BTF header");
        };
        let types = hdr_len as usize + type_off as usize;
        let strs = hdr_len as usize + str_off as usize;
        if types + type_len as usize > data.len() || strs + str_len as usize > data.len() {
            return err("BTF sections run past the end of the data");
        }
        let mut btf = Btf {
            data,
            types,
            strs,
            str_len: str_len as usize,
            recs: Vec::with_capacity(type_len as usize / 24),
            named: HashMap::with_capacity_and_hasher(type_len as usize / 48, Identity::default()),
        };
        btf.recs.push(Rec { at: 0 });
        let mut at = 0usize;
        while at < type_len as usize {
            let (name_off, info, _) = btf.header_at(at).ok_or_else(|| BtfError("truncated type record".into()))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => 0,
                k => return err(format!("unknown BTF kind {k}")),
            };
            if matches!(kind, KIND_STRUCT | KIND_FUNC) && name_off != 0 {
                let id = btf.recs.len() as u32;
                btf.named.entry(name_key(kind, btf.name(name_off))).or_insert(id);
            }
            btf.recs.push(Rec { at: at as u32 });
            at += 12 + extra;
        }
        Ok(btf)
    }

    fn u32_at(&self, o: usize) -> Option<u32> {
        self.data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn header_at(&self, at: usize) -> Option<(u32, u32, u32)> {
        let o = self.types + at;
        Some((self.u32_at(o)?, self.u32_at(o + 4)?, self.u32_at(o + 8)?))
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strs + off as usize;
        let end = self.strs + self.str_len;
        let tail = self.data.get(s..end).unwrap_or_default();
        &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
    }

    /// (name_off, info, size_or_type) of type `id`.
    fn header(&self, id: u32) -> Result<(u32, u32, u32), BtfError> {
        let rec = self.recs.get(id as usize).filter(|_| id != 0).ok_or_else(|| BtfError(format!("no BTF type {id}")))?;
        self.header_at(rec.at as usize).ok_or_else(|| BtfError(format!("truncated BTF type {id}")))
    }

    fn kind(info: u32) -> u32 {
        (info >> 24) & 0x1f
    }

    /// The first type of `kind` called `name`.
    fn named(&self, kind: u32, name: &str) -> Option<u32> {
        let is = |id: u32| {
            self.header(id).is_ok_and(|(n, info, _)| Self::kind(info) == kind && self.name(n) == name.as_bytes())
        };
        match self.named.get(&name_key(kind, name.as_bytes())) {
            Some(&id) if is(id) => Some(id),
            Some(_) => (1..self.recs.len() as u32).find(|&id| is(id)),
            None => None,
        }
    }

    /// The type ID of the structure called `name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.named(KIND_STRUCT, name).ok_or_else(|| BtfError(format!("the kernel has no struct {name}")))
    }

    /// The type ID of the function called `name`.
    pub fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        self.named(KIND_FUNC, name).ok_or_else(|| BtfError(format!("the kernel has no function {name}")))
    }

    /// `id` with typedefs and modifiers (const, volatile, restrict, type tags) removed.
    pub fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let (_, info, next) = self.header(id)?;
            match Self::kind(info) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = next,
                _ => return Ok(id),
            }
        }
        err(format!("BTF type {id}: too many typedefs"))
    }

    /// The size in bytes of type `id`.
    pub fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let id = self.resolve(id)?;
        let (_, info, size) = self.header(id)?;
        match Self::kind(info) {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT | KIND_DATASEC => Ok(size),
            KIND_PTR => Ok(8),
            KIND_ARRAY => {
                let (elem, n) = self.array(id)?;
                Ok(self.size_of(elem)?.saturating_mul(n))
            }
            k => err(format!("BTF type {id} of kind {k} has no size")),
        }
    }

    /// Element type and count of array type `id`.
    pub fn array(&self, id: u32) -> Result<(u32, u32), BtfError> {
        let id = self.resolve(id)?;
        let (_, info, _) = self.header(id)?;
        if Self::kind(info) != KIND_ARRAY {
            return err(format!("BTF type {id} is not an array"));
        }
        let o = self.types + self.recs[id as usize].at as usize + 12;
        match (self.u32_at(o), self.u32_at(o + 8)) {
            (Some(elem), Some(n)) => Ok((elem, n)),
            _ => err(format!("truncated BTF array {id}")),
        }
    }

    /// The type a pointer type points to.
    pub fn pointee(&self, id: u32) -> Result<u32, BtfError> {
        let id = self.resolve(id)?;
        match self.header(id)? {
            (_, info, to) if Self::kind(info) == KIND_PTR => Ok(to),
            _ => err(format!("BTF type {id} is not a pointer")),
        }
    }

    /// The member called `name` of structure or union `id`, looked for also inside its
    /// anonymous structures and unions (as C lets one name it): (bit offset, type).
    fn member(&self, id: u32, name: &[u8]) -> Result<Option<(u32, u32)>, BtfError> {
        let id = self.resolve(id)?;
        let (_, info, _) = self.header(id)?;
        let kind = Self::kind(info);
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return err(format!("BTF type {id} is not a structure"));
        }
        let bitfields = info & (1 << 31) != 0;
        let base = self.types + self.recs[id as usize].at as usize + 12;
        for i in 0..(info & 0xffff) as usize {
            let o = base + 12 * i;
            let (Some(m_name), Some(m_type), Some(m_off)) = (self.u32_at(o), self.u32_at(o + 4), self.u32_at(o + 8)) else {
                return err(format!("truncated BTF structure {id}"));
            };
            let bit = if bitfields { m_off & 0xff_ffff } else { m_off };
            if m_name == 0 {
                // An anonymous structure or union is searched; anything else unnamed (a
                // padding bit field) holds no member.
                let inner_kind = Self::kind(self.header(self.resolve(m_type)?)?.1);
                if inner_kind != KIND_STRUCT && inner_kind != KIND_UNION {
                    continue;
                }
                if let Some((inner, t)) = self.member(m_type, name)? {
                    return Ok(Some((bit + inner, t)));
                }
            } else if self.name(m_name) == name {
                if bitfields && m_off >> 24 != 0 {
                    return err(format!("{} is a bit field", String::from_utf8_lossy(name)));
                }
                return Ok(Some((bit, m_type)));
            }
        }
        Ok(None)
    }

    /// The field at `path` ("a.b.c", each a member of the one before) of structure
    /// `strukt`: byte offset from the structure's start, type and size.
    pub fn field(&self, strukt: &str, path: &str) -> Result<Field, BtfError> {
        let mut id = self.struct_id(strukt)?;
        let mut bits = 0u32;
        for part in path.split('.') {
            let (off, t) = self
                .member(id, part.as_bytes())?
                .ok_or_else(|| BtfError(format!("struct {strukt} has no member {path}")))?;
            bits += off;
            id = self.resolve(t)?;
        }
        if !bits.is_multiple_of(8) {
            return err(format!("{strukt}.{path} does not start on a byte"));
        }
        Ok(Field { offset: bits / 8, type_id: id, size: self.size_of(id)? })
    }

    /// Whether structure `strukt` has a member at `path`.
    pub fn has_field(&self, strukt: &str, path: &str) -> bool {
        self.field(strukt, path).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernel_fields_with_their_uapi_offsets() {
        let Ok(btf) = Btf::vmlinux() else {
            eprintln!("no vmlinux BTF here: skipped");
            return;
        };
        // struct bpf_iter_meta { seq; session_id; seq_num } is fixed by its uapi use.
        assert_eq!(btf.field("bpf_iter_meta", "seq").unwrap().offset, 0);
        assert_eq!(btf.field("bpf_iter_meta", "session_id").unwrap().offset, 8);
        // struct sigaction on x86-64: handler, flags, restorer, mask; 32 bytes.
        let sa = btf.struct_id("sigaction").unwrap();
        assert_eq!(btf.size_of(sa).unwrap(), 32);
        assert_eq!(btf.field("sigaction", "sa_mask").unwrap().offset, 24);
        // vm_start lies in an anonymous member on recent kernels.
        let start = btf.field("vm_area_struct", "vm_start").unwrap();
        let end = btf.field("vm_area_struct", "vm_end").unwrap();
        assert_eq!((start.size, end.size, end.offset - start.offset), (8, 8, 8));
        assert!(btf.func_id("bpf_iter_task").is_ok());
        let action = btf.field("sighand_struct", "action").unwrap();
        assert_eq!(btf.array(action.type_id).unwrap().1, 64);
        assert!(btf.field("task_struct", "no_such_member").is_err());
        assert!(btf.struct_id("no_such_struct_here").is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(vec![0; 40]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(hdr).is_err());
    }
}
