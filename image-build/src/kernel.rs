//! The kernel as an ELF that QEMU boots directly (the PVH entry point): Debian's bzImage holds
//! the kernel compressed with LZ4, and under TCG its self-decompression and the real-mode
//! start cost ~0.2 s of every boot (QEMU start to the kernel's uptime 0: 0.37–0.60 s with the
//! bzImage, 0.15–0.39 s with the ELF, 2026-12-04). Unpacked once per cached base.
//!
//! The bzImage layout is the x86 boot protocol's (Documentation/arch/x86/boot.rst): the setup
//! header's `payload_offset`/`payload_length` (protocol 2.08+) locate the compressed kernel in
//! the protected-mode part, which starts after `setup_sects + 1` sectors. The payload is in
//! LZ4's legacy format, which is what the kernel's `lz4 -l` makes: a magic, then blocks of at
//! most 8 MiB each prefixed by its compressed size, and the build appends the uncompressed size
//! as four more bytes.
use crate::Error;

const HDRS: &[u8; 4] = b"HdrS";
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// LZ4 legacy blocks hold at most 8 MiB uncompressed.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// An unpacked kernel larger than this is refused (Debian's cloud kernel is ~53 MB).
pub const MAX_KERNEL: usize = 256 << 20;
/// XEN_ELFNOTE_PHYS32_ENTRY: the note QEMU looks for to boot an ELF kernel through PVH.
const PVH_NOTE: u32 = 18;

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(d: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(
        d.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
    .ok()
}
fn u16_at(d: &[u8], o: usize) -> Option<usize> {
    Some(usize::from(u16::from_le_bytes(
        d.get(o..o.checked_add(2)?)?.try_into().ok()?,
    )))
}
/// EM_X86_64.
const X86_64: usize = 0x3e;

/// Why a bzImage gives no PVH kernel. Not an error of the build: the bzImage is booted then.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoPvh {
    #[error("not a bzImage (no HdrS setup header, or boot protocol before 2.08)")]
    NotBzImage,
    #[error("the payload is outside the file")]
    Truncated,
    #[error("the payload is not LZ4 (legacy format); only LZ4 kernels are unpacked")]
    NotLz4,
    #[error("the LZ4 payload is corrupt: {0}")]
    Corrupt(String),
    #[error("the unpacked kernel is larger than the limit ({MAX_KERNEL} bytes)")]
    TooLarge,
    #[error("the unpacked kernel is not an x86_64 ELF with a PVH entry note")]
    NoPvhNote,
}

/// The ELF kernel with a PVH entry inside `bzimage`, or why there is none.
pub fn pvh_elf(bzimage: &[u8]) -> Result<Vec<u8>, NoPvh> {
    pvh_elf_within(bzimage, MAX_KERNEL)
}

/// [`pvh_elf`] with the largest unpacked kernel accepted.
fn pvh_elf_within(bzimage: &[u8], max: usize) -> Result<Vec<u8>, NoPvh> {
    let version = bzimage
        .get(0x206..0x208)
        .map(|v| u16::from_le_bytes([v[0], v[1]]));
    if bzimage.get(0x202..0x206) != Some(HDRS) || version < Some(0x0208) {
        return Err(NoPvh::NotBzImage);
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm = (setup_sects + 1) * 512;
    let (offset, length) = (
        u32_at(bzimage, 0x248).ok_or(NoPvh::NotBzImage)? as usize,
        u32_at(bzimage, 0x24c).ok_or(NoPvh::NotBzImage)? as usize,
    );
    let payload = pm
        .checked_add(offset)
        .and_then(|start| bzimage.get(start..start.checked_add(length)?))
        .ok_or(NoPvh::Truncated)?;
    let elf = lz4_legacy(payload, max)?;
    if !has_pvh_note(&elf) {
        return Err(NoPvh::NoPvhNote);
    }
    Ok(elf)
}

/// Decodes LZ4's legacy format: magic, then `size, block` until the payload's last four bytes
/// (the uncompressed size the kernel build appends, checked against what was decoded).
fn lz4_legacy(payload: &[u8], max: usize) -> Result<Vec<u8>, NoPvh> {
    if u32_at(payload, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(NoPvh::NotLz4);
    }
    let corrupt = |why: String| NoPvh::Corrupt(why);
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut at = 4;
    // Everything but the size trailer is blocks.
    while payload.len() - at > 4 {
        let size = u32_at(payload, at).ok_or_else(|| corrupt("a block size cut off".into()))?;
        if size == LZ4_LEGACY_MAGIC {
            // Concatenated streams restart with the magic.
            at += 4;
            continue;
        }
        at += 4;
        let data = at
            .checked_add(size as usize)
            .and_then(|end| payload.get(at..end))
            .ok_or_else(|| corrupt(format!("block of {size} bytes at {at} past the end")))?;
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| corrupt(format!("block at {at}: {e}")))?;
        if out.len() + n > max {
            return Err(NoPvh::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        at += size as usize;
    }
    match u32_at(payload, at) {
        Some(n) if n as usize == out.len() => Ok(out),
        Some(n) => Err(corrupt(format!(
            "{} bytes unpacked, the trailer says {n}",
            out.len()
        ))),
        None => Err(corrupt("no size trailer".into())),
    }
}

/// Whether an x86_64 little-endian ELF carries the Xen PVH entry note (in a PT_NOTE segment,
/// where QEMU's loader looks).
fn has_pvh_note(d: &[u8]) -> bool {
    let ok = || -> Option<bool> {
        // ELF, 64-bit, little-endian, x86_64.
        if d.get(0..4)? != b"\x7fELF" || d.get(4..6)? != [2, 1] || u16_at(d, 0x12)? != X86_64 {
            return Some(false);
        }
        let (phoff, phentsize, phnum) = (u64_at(d, 0x20)?, u16_at(d, 0x36)?, u16_at(d, 0x38)?);
        for i in 0..phnum {
            let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
            if u32_at(d, ph)? != 4 {
                continue; // not PT_NOTE
            }
            let (off, size) = (
                u64_at(d, ph.checked_add(8)?)?,
                u64_at(d, ph.checked_add(32)?)?,
            );
            let notes = d.get(off..off.checked_add(size)?)?;
            let mut n = 0;
            while n + 12 <= notes.len() {
                let (namesz, descsz, kind) = (
                    u32_at(notes, n)? as usize,
                    u32_at(notes, n + 4)? as usize,
                    u32_at(notes, n + 8)?,
                );
                let name = notes.get(n + 12..(n + 12).checked_add(namesz)?)?;
                if kind == PVH_NOTE && name.starts_with(b"Xen") {
                    return Some(true);
                }
                let pad = |x: usize| x.checked_add(3).map(|x| x & !3);
                n = n
                    .checked_add(12)?
                    .checked_add(pad(namesz)?)?
                    .checked_add(pad(descsz)?)?;
            }
        }
        Some(false)
    };
    ok().unwrap_or(false)
}

/// Writes `dir/vmlinux` from `dir/vmlinuz` when the kernel allows it; says why not otherwise
/// (the bzImage is booted then, as before).
pub fn unpack_into(dir: &std::path::Path) -> Result<Option<NoPvh>, Error> {
    let bz = dir.join("vmlinuz");
    let image = std::fs::read(&bz).map_err(|e| Error::io(&bz, e))?;
    match pvh_elf(&image) {
        Ok(elf) => {
            let out = dir.join(PVH_KERNEL);
            std::fs::write(&out, elf).map_err(|e| Error::io(&out, e))?;
            Ok(None)
        }
        Err(why) => Ok(Some(why)),
    }
}

/// The unpacked kernel's file name in a base directory.
pub const PVH_KERNEL: &str = "vmlinux";

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file around `payload`: the setup header fields the reader uses.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 5 * 512];
        d[0x1f1] = 4;
        d[0x202..0x206].copy_from_slice(HDRS);
        d[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        d[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        d[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        d.extend_from_slice(&[0u8; 16]);
        d.extend_from_slice(payload);
        d
    }

    /// An ELF64 header with one PT_NOTE holding `note_kind` named "Xen".
    fn elf(note_kind: u32) -> Vec<u8> {
        let mut d = vec![0u8; 0x40 + 56];
        d[0..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x12] = 0x3e;
        d[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_at = d.len() as u64;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&note_kind.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&[1, 2, 3, 4]);
        let ph = 0x40;
        d[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        d[ph + 8..ph + 16].copy_from_slice(&note_at.to_le_bytes());
        d[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        d.extend_from_slice(&note);
        d
    }

    fn legacy(data: &[u8], chunks: usize) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for c in data.chunks(data.len().div_ceil(chunks)) {
            let b = lz4_flex::block::compress(c);
            p.extend_from_slice(&(b.len() as u32).to_le_bytes());
            p.extend_from_slice(&b);
        }
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p
    }

    #[test]
    fn unpacks_an_lz4_kernel_with_a_pvh_note() {
        let mut kernel = elf(PVH_NOTE);
        kernel.extend((0..100_000u32).map(|i| (i % 251) as u8));
        assert_eq!(pvh_elf(&bzimage(&legacy(&kernel, 3))).unwrap(), kernel);
    }

    /// Streams concatenated by the kernel build restart with the magic.
    #[test]
    fn reads_concatenated_lz4_streams() {
        let mut kernel = elf(PVH_NOTE);
        kernel.extend((0..50_000u32).map(|i| (i % 97) as u8));
        let (a, b) = kernel.split_at(30_000);
        let mut p = legacy(a, 1);
        p.truncate(p.len() - 4);
        let second = legacy(b, 2);
        p.extend_from_slice(&second[..second.len() - 4]);
        p.extend_from_slice(&(kernel.len() as u32).to_le_bytes());
        assert_eq!(pvh_elf(&bzimage(&p)).unwrap(), kernel);
    }

    #[test]
    fn says_why_there_is_no_pvh_kernel() {
        let kernel = elf(PVH_NOTE);
        assert_eq!(pvh_elf(&[0u8; 600]), Err(NoPvh::NotBzImage));
        assert_eq!(pvh_elf(&[]), Err(NoPvh::NotBzImage));
        // Another compressor (gzip's magic).
        assert_eq!(
            pvh_elf(&bzimage(b"\x1f\x8b\x08\0rest-of-it")),
            Err(NoPvh::NotLz4)
        );
        // No PVH note (another note kind).
        assert_eq!(
            pvh_elf(&bzimage(&legacy(&elf(17), 1))),
            Err(NoPvh::NoPvhNote)
        );
        // The trailer disagrees.
        let mut p = legacy(&kernel, 1);
        let n = p.len();
        p[n - 4] ^= 1;
        assert!(matches!(pvh_elf(&bzimage(&p)), Err(NoPvh::Corrupt(_))));
        // A block that claims more than there is.
        let mut p = legacy(&kernel, 1);
        p[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(pvh_elf(&bzimage(&p)), Err(NoPvh::Corrupt(_))));
        // The payload runs past the file.
        let mut b = bzimage(&legacy(&kernel, 1));
        b[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_elf(&b), Err(NoPvh::Truncated));
        // An ELF for another machine.
        let mut arm = elf(PVH_NOTE);
        arm[0x12] = 0xb7;
        assert_eq!(pvh_elf(&bzimage(&legacy(&arm, 1))), Err(NoPvh::NoPvhNote));
        // Too short to be an ELF at all (4 and 5 bytes: the header is read bounded).
        for short in [&b"\x7fELF"[..], b"\x7fELF\x02"] {
            assert_eq!(pvh_elf(&bzimage(&legacy(short, 1))), Err(NoPvh::NoPvhNote));
        }
        // Program headers said to be at the end of the address space.
        let mut far = elf(PVH_NOTE);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(pvh_elf(&bzimage(&legacy(&far, 1))), Err(NoPvh::NoPvhNote));
        // A note size that overflows.
        let mut note = elf(PVH_NOTE);
        let ph = 0x40;
        note[ph + 32..ph + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(pvh_elf(&bzimage(&legacy(&note, 1))), Err(NoPvh::NoPvhNote));
        // Larger than the limit.
        let mut big = elf(PVH_NOTE);
        big.resize(64 << 10, 7);
        assert_eq!(
            pvh_elf_within(&bzimage(&legacy(&big, 4)), 32 << 10),
            Err(NoPvh::TooLarge)
        );
        // Garbage instead of LZ4 blocks.
        let mut p = legacy(&kernel, 1);
        for x in &mut p[8..40] {
            *x = 0xff;
        }
        assert!(matches!(pvh_elf(&bzimage(&p)), Err(NoPvh::Corrupt(_))));
    }
}
