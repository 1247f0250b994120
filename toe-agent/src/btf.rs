//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for programs that read a few fields of a task.
//!
//! Hand-written because only member offsets are needed: aya-obj parses BTF but keeps its type
//! and member accessors private, and the maintained standalone parser (btf-rs) is LGPL. The
//! format is the kernel's stable BTF ABI (Documentation/bpf/btf.rst): a header, then the type
//! records, each a 12-byte common part followed by a kind-specific tail, then the strings.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Offset in bits (the bitfield size is masked off).
    bits: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    /// The referenced type of a typedef or qualifier.
    target: u32,
    members: Vec<Member>,
}

/// The types of one BTF blob, by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, String> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("BTF truncated at byte {at}"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        Self::parse(&data).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let magic = data.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(MAGIC) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("BTF string section out of bounds")?
            .to_vec();
        let end = types_at + type_len;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = types_at;
        while at < end {
            let name = u32_at(data, at)?;
            let info = u32_at(data, at + 4)?;
            let target = u32_at(data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 == 1;
            let mut members = Vec::new();
            at += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(data, m + 8)?;
                        members.push(Member {
                            name: u32_at(data, m)?,
                            ty: u32_at(data, m + 4)?,
                            bits: if bitfields {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                k if k <= KIND_TYPE_TAG => 0,
                k => return Err(format!("unknown BTF kind {k}")),
            };
            types.push(Type {
                kind,
                name,
                target,
                members,
            });
        }
        let mut btf = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let t = &btf.types[id];
            if matches!(t.kind, KIND_STRUCT | KIND_UNION) && t.name != 0 {
                let name = btf.string(t.name).to_owned();
                btf.by_name
                    .entry(name)
                    .or_insert(u32::try_from(id).unwrap_or(0));
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The struct or union behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target;
                }
                KIND_STRUCT | KIND_UNION => return Some(t),
                _ => return None,
            }
        }
        None
    }

    /// Bit offset of member `name` of `t`, looking inside anonymous structs and unions.
    fn member_bits(&self, t: &Type, name: &str, depth: u32) -> Option<(u32, u32)> {
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == name {
                return Some((m.bits, m.ty));
            }
        }
        if depth == 0 {
            return None;
        }
        t.members.iter().filter(|m| m.name == 0).find_map(|m| {
            let inner = self.resolve(m.ty)?;
            let (bits, ty) = self.member_bits(inner, name, depth - 1)?;
            Some((m.bits + bits, ty))
        })
    }

    /// Byte offset of the member at `path` (`["se", "sum_exec_runtime"]`) in struct `name`.
    pub fn offset(&self, name: &str, path: &[&str]) -> Result<u32, String> {
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| format!("no struct {name} in BTF"))?;
        let mut t = self.resolve(id).ok_or_else(|| format!("struct {name}"))?;
        let mut bits = 0;
        for (i, field) in path.iter().enumerate() {
            let (b, ty) = self
                .member_bits(t, field, 4)
                .ok_or_else(|| format!("no member {} in struct {name}", path[..=i].join(".")))?;
            bits += b;
            if i + 1 < path.len() {
                t = self
                    .resolve(ty)
                    .ok_or_else(|| format!("{name}.{} is not a struct", path[..=i].join(".")))?;
            }
        }
        if bits % 8 != 0 {
            return Err(format!("{name}.{} is a bitfield", path.join(".")));
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_struct_member_offset_is_found_through_a_nested_struct_and_an_anonymous_union() {
        // struct inner { long a; long b; }; struct outer { int x; union { int y; struct inner
        // in; }; } — built by hand in the format's layout.
        let strings = b"\0inner\0a\0b\0outer\0x\0y\0in\0long\0";
        let s = |n: &str| {
            let at = strings
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n.as_bytes() && w[n.len() + 1] == 0)
                .unwrap();
            u32::try_from(at + 1).unwrap()
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: long (INT, 8 bytes)
        push(&[s("long"), KIND_INT << 24, 8, 64]);
        // 2: struct inner { a at 0, b at 64 bits }
        push(&[s("inner"), KIND_STRUCT << 24 | 2, 16]);
        push(&[s("a"), 1, 0, s("b"), 1, 64]);
        // 3: anonymous union { y: long at 0, in: inner at 0 }
        push(&[0, KIND_UNION << 24 | 2, 16]);
        push(&[s("y"), 1, 0, s("in"), 2, 0]);
        // 4: struct outer { x at 0, <anon> at 64 bits }
        push(&[s("outer"), KIND_STRUCT << 24 | 2, 24]);
        push(&[s("x"), 1, 0, 0, 3, 64]);
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, u32::try_from(types.len()).unwrap()] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        for w in [
            u32::try_from(types.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.offset("outer", &["x"]), Ok(0));
        assert_eq!(btf.offset("outer", &["y"]), Ok(8));
        assert_eq!(btf.offset("outer", &["in", "b"]), Ok(16));
        assert!(
            btf.offset("outer", &["z"])
                .unwrap_err()
                .contains("no member z")
        );
        assert!(btf.offset("nothing", &["x"]).is_err());
        assert!(Btf::parse(&data[..30]).is_err());
    }

    #[test]
    fn this_kernels_task_struct_has_the_fields_the_off_cpu_program_reads() {
        let Ok(btf) = Btf::kernel() else {
            eprintln!("skipped: this kernel has no /sys/kernel/btf/vmlinux");
            return;
        };
        let state = btf
            .offset("task_struct", &["__state"])
            .or_else(|_| btf.offset("task_struct", &["state"]))
            .unwrap();
        let runtime = btf
            .offset("task_struct", &["se", "sum_exec_runtime"])
            .unwrap();
        let nvcsw = btf.offset("task_struct", &["nvcsw"]).unwrap();
        let nivcsw = btf.offset("task_struct", &["nivcsw"]).unwrap();
        let mut all = [state, runtime, nvcsw, nivcsw];
        all.sort_unstable();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    }
}
