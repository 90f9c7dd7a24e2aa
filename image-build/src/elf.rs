//! Just enough ELF64 reading to list what a dynamic executable needs: its interpreter
//! (PT_INTERP) and its DT_NEEDED sonames. Lets the builder collect libraries from the pinned
//! packages themselves instead of asking the host's ldd (which would see the host's libraries).
use crate::Error;

pub struct Deps {
    pub interp: Option<String>,
    pub needed: Vec<String>,
}

fn u16_at(d: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(d: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(o..o + 8)?.try_into().ok()?))
}
fn cstr(d: &[u8], o: usize) -> Option<String> {
    let s = d.get(o..)?;
    let end = s.iter().position(|&b| b == 0)?;
    String::from_utf8(s[..end].to_vec()).ok()
}

/// `what` names the file in errors.
pub fn deps(d: &[u8], what: &str) -> Result<Deps, Error> {
    parse(d).ok_or_else(|| Error::Elf(what.to_string()))
}

fn parse(d: &[u8]) -> Option<Deps> {
    // 64-bit little-endian only: the vnode is x86_64.
    if d.get(0..4)? != b"\x7fELF" || d[4] != 2 || d[5] != 1 {
        return None;
    }
    let phoff = u64_at(d, 0x20)? as usize;
    let phentsize = u16_at(d, 0x36)? as usize;
    let phnum = u16_at(d, 0x38)? as usize;
    let mut loads = Vec::new();
    let mut dynamic = None;
    let mut interp = None;
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        let (ty, off, vaddr, filesz) = (
            u32_at(d, p)?,
            u64_at(d, p + 8)?,
            u64_at(d, p + 16)?,
            u64_at(d, p + 32)?,
        );
        match ty {
            1 => loads.push((vaddr, off, filesz)),
            2 => dynamic = Some((off as usize, filesz as usize)),
            3 => interp = Some(cstr(d, off as usize)?),
            _ => {}
        }
    }
    let Some((doff, dsize)) = dynamic else {
        return Some(Deps {
            interp,
            needed: vec![],
        });
    };
    let (mut strtab, mut needed_offs) = (None, Vec::new());
    for e in (doff..doff + dsize).step_by(16) {
        match (u64_at(d, e)?, u64_at(d, e + 8)?) {
            (0, _) => break,
            (1, v) => needed_offs.push(v),
            (5, v) => strtab = Some(v),
            _ => {}
        }
    }
    // DT_STRTAB is a virtual address: map it to a file offset through the PT_LOAD segments.
    let strtab = strtab?;
    let (vaddr, off, _) = *loads
        .iter()
        .find(|(v, _, sz)| *v <= strtab && strtab < v + sz)?;
    let base = (strtab - vaddr + off) as usize;
    let needed = needed_offs
        .iter()
        .map(|&o| cstr(d, base + o as usize))
        .collect::<Option<_>>()?;
    Some(Deps { interp, needed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_host_binary() {
        let d = std::fs::read("/bin/sh").unwrap();
        let deps = deps(&d, "/bin/sh").unwrap();
        assert!(deps.interp.unwrap().contains("ld-linux"));
        assert!(
            deps.needed.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            deps.needed
        );
        assert!(matches!(
            super::deps(b"#!/bin/sh\n", "x"),
            Err(crate::Error::Elf(what)) if what == "x"
        ));
    }
}
