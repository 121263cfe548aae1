//! The PVH ELF loader: finds the Xen PVH entry note of a kernel image and places its
//! loadable segments in guest memory.
//!
//! A Xen PVH kernel is an ELF executable (ELF64 like Linux's `vmlinux`, or ELF32) with
//! a note named `"Xen"` of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`) whose descriptor is the
//! 32-bit physical entry point, stored in 4 bytes or (Linux 64-bit) 8 bytes. Notes are
//! looked up through `PT_NOTE` program headers, then `SHT_NOTE` sections. `PT_LOAD`
//! segments are placed at their physical address (`p_paddr`; Linux has a `PT_LOAD` with
//! `p_vaddr` 0).
//!
//! The image is untrusted: every offset and size is bounds-checked, and malformed
//! input yields a [`LoadError`] meant to be printed after the file's name. The header
//! fields are read by hand (with `elf::abi` constants) so that truncation errors can
//! say exactly what is missing.

use alloc::vec::Vec;
use core::fmt;

use elf::abi::{
    ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFMAGIC, EM_386, EM_X86_64, ET_EXEC, PT_LOAD, PT_NOTE,
    SHT_NOTE,
};

/// One loadable segment: `file_size` bytes from `file_offset` in the image go to guest
/// physical `paddr`, followed by `mem_size - file_size` zero bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address (`p_paddr`).
    pub paddr: u64,
    /// Offset of the segment's bytes in the image.
    pub file_offset: u64,
    /// Bytes taken from the image.
    pub file_size: u64,
    /// Bytes occupied in memory (at least `file_size`).
    pub mem_size: u64,
}

impl Segment {
    /// First guest-physical address past the segment.
    pub fn end(&self) -> u64 {
        self.paddr.saturating_add(self.mem_size)
    }
}

/// What [`parse_pvh`] found: where to enter and what to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    /// The 32-bit physical PVH entry point.
    pub entry: u32,
    /// Loadable segments with a non-zero memory size, sorted by `paddr`, disjoint.
    pub segments: Vec<Segment>,
    /// Lowest segment address.
    pub lowest: u64,
    /// Highest `paddr + mem_size`.
    pub end: u64,
}

/// Writes into guest-physical memory.
pub trait GuestMemWrite {
    /// Copies `data` to `gpa`; false if that range is not guest RAM.
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool;
    /// Zeroes `len` bytes at `gpa`; false if that range is not guest RAM.
    fn zero(&mut self, gpa: u64, len: u64) -> bool;
}

/// Why a kernel image cannot be loaded. The `Display` text completes a sentence that
/// starts with the file's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The file is empty.
    Empty,
    /// No ELF magic.
    NotElf {
        /// The first bytes of the file (zero-padded if shorter).
        first_bytes: [u8; 4],
    },
    /// A structure runs past the end of the file (or, for a segment or note, past the
    /// end of the data it must lie in).
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it starts in the file.
        offset: u64,
        /// Bytes it needs.
        need: u64,
        /// Bytes the file has.
        len: u64,
    },
    /// Not a little-endian ELF32 or ELF64 file.
    UnsupportedClass,
    /// `e_machine` is neither `EM_X86_64` nor `EM_386`.
    UnsupportedMachine(u16),
    /// `e_type` is not `ET_EXEC`.
    NotExecutable(u16),
    /// A header field has an impossible value.
    BadHeader {
        /// Which field.
        what: &'static str,
    },
    /// No `"Xen"` note of type `XEN_ELFNOTE_PHYS32_ENTRY`.
    NoPvhNote,
    /// The PVH note's descriptor is neither 4 nor 8 bytes.
    BadPvhNote {
        /// Its length.
        desc_len: usize,
    },
    /// An 8-byte PVH entry value that does not fit in 32 bits.
    PvhEntryAbove4G {
        /// The value found.
        entry: u64,
    },
    /// No `PT_LOAD` segment with a non-zero memory size.
    NoLoadSegments,
    /// A segment does not fit in the domain's memory.
    SegmentOutsideMemory {
        /// Segment start.
        paddr: u64,
        /// The domain's memory size in bytes.
        mem_size: u64,
        /// Segment end (`paddr + p_memsz`).
        mem_end: u64,
    },
    /// A segment's file size exceeds its memory size, or its end overflows.
    SegmentOverflow {
        /// Segment start.
        paddr: u64,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// Two segments overlap in physical memory.
    OverlappingSegments {
        /// Start of the lower segment.
        first: u64,
        /// End of the lower segment.
        first_end: u64,
        /// Start of the segment that overlaps it.
        second: u64,
    },
    /// The entry point is not inside any loaded segment.
    EntryOutsideSegments {
        /// The entry point.
        entry: u32,
    },
    /// The guest memory writer refused a range.
    GuestWriteFailed {
        /// Start of the refused range.
        gpa: u64,
    },
}

/// Formats a byte count the way a user reads memory sizes.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1 << 10;
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        let b = self.0;
        if b != 0 && b.is_multiple_of(GIB) {
            write!(f, "{} GiB", b / GIB)
        } else if b != 0 && b.is_multiple_of(MIB) {
            write!(f, "{} MiB", b / MIB)
        } else if b != 0 && b.is_multiple_of(KIB) {
            write!(f, "{} KiB", b / KIB)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

fn machine_name(m: u16) -> &'static str {
    match m {
        0 => "none",
        2 => "SPARC",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC 64",
        22 => "S/390",
        40 => "ARM",
        50 => "IA-64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

fn type_name(t: u16) -> &'static str {
    match t {
        0 => "ET_NONE",
        1 => "ET_REL, a relocatable object",
        3 => "ET_DYN, a shared object or position-independent executable",
        4 => "ET_CORE, a core dump",
        _ => "unknown",
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::Empty => f.write_str("is empty"),
            LoadError::NotElf { first_bytes: b } => write!(
                f,
                "is not an ELF file (it starts with {:02x} {:02x} {:02x} {:02x})",
                b[0], b[1], b[2], b[3]
            ),
            LoadError::Truncated { what, offset, need, len } => {
                let verb = if what.ends_with('s') { "need" } else { "needs" };
                write!(
                    f,
                    "is truncated: the {what} at offset {offset} {verb} {need} bytes but the file has {len}"
                )
            }
            LoadError::UnsupportedClass => {
                f.write_str("is not a little-endian 32-bit or 64-bit ELF file")
            }
            LoadError::UnsupportedMachine(m) => write!(
                f,
                "is built for another processor (ELF machine {m}, {}): an x86 kernel (EM_X86_64 or EM_386) is needed",
                machine_name(m)
            ),
            LoadError::NotExecutable(t) => write!(
                f,
                "is not an executable (ELF type {t}, {}): a kernel is ET_EXEC",
                type_name(t)
            ),
            LoadError::BadHeader { what } => write!(f, "has a malformed ELF header: {what}"),
            LoadError::NoPvhNote => f.write_str(
                "has no PVH entry note (ELF note \"Xen\" type 18, XEN_ELFNOTE_PHYS32_ENTRY): it is not a Xen PVH kernel",
            ),
            LoadError::BadPvhNote { desc_len } => write!(
                f,
                "has a malformed PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): its value is {desc_len} bytes long, not 4 or 8"
            ),
            LoadError::PvhEntryAbove4G { entry } => write!(
                f,
                "has a PVH entry point at {entry:#x}, above 4 GiB: it must be a 32-bit physical address"
            ),
            LoadError::NoLoadSegments => f.write_str("has no loadable (PT_LOAD) segment"),
            LoadError::SegmentOutsideMemory { paddr, mem_size, mem_end } => write!(
                f,
                "has a segment at {paddr:#x}..{mem_end:#x} that does not fit in the domain's {} of memory: raise `memory`",
                Size(mem_size)
            ),
            LoadError::SegmentOverflow { paddr, file_size, mem_size } => {
                if file_size > mem_size {
                    write!(
                        f,
                        "has a segment at {paddr:#x} with more bytes in the file ({file_size:#x}) than in memory ({mem_size:#x})"
                    )
                } else {
                    write!(
                        f,
                        "has a segment at {paddr:#x} of {mem_size:#x} bytes that runs past the end of the address space"
                    )
                }
            }
            LoadError::OverlappingSegments { first, first_end, second } => write!(
                f,
                "has overlapping segments: {first:#x}..{first_end:#x} and one starting at {second:#x}"
            ),
            LoadError::EntryOutsideSegments { entry } => write!(
                f,
                "has its PVH entry point {entry:#x} outside every loadable segment"
            ),
            LoadError::GuestWriteFailed { gpa } => {
                write!(f, "could not be written to guest memory at {gpa:#x}")
            }
        }
    }
}

fn le_u16(d: &[u8], off: usize) -> u16 {
    match d.get(off..).and_then(|s| s.first_chunk::<2>()) {
        Some(b) => u16::from_le_bytes(*b),
        None => 0,
    }
}

fn le_u32(d: &[u8], off: usize) -> u32 {
    match d.get(off..).and_then(|s| s.first_chunk::<4>()) {
        Some(b) => u32::from_le_bytes(*b),
        None => 0,
    }
}

fn le_u64(d: &[u8], off: usize) -> u64 {
    match d.get(off..).and_then(|s| s.first_chunk::<8>()) {
        Some(b) => u64::from_le_bytes(*b),
        None => 0,
    }
}

/// The parsed ELF file header (the fields the loader needs).
struct Header {
    is64: bool,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
    shoff: u64,
    shentsize: u64,
    shnum: u64,
}

impl Header {
    /// A natural-width field: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, d: &[u8], off64: usize, off32: usize) -> u64 {
        if self.is64 {
            le_u64(d, off64)
        } else {
            u64::from(le_u32(d, off32))
        }
    }
}

/// Returns `image[offset..offset + size]`, or a `Truncated` error naming `what`.
fn slice<'a>(
    image: &'a [u8],
    what: &'static str,
    offset: u64,
    size: u64,
) -> Result<&'a [u8], LoadError> {
    let len = image.len() as u64;
    let truncated = LoadError::Truncated {
        what,
        offset,
        need: size,
        len,
    };
    let end = offset.checked_add(size).ok_or(truncated)?;
    if end > len {
        return Err(truncated);
    }
    // Both bounds are <= image.len(), so they fit in usize.
    let start = usize::try_from(offset).map_err(|_| truncated)?;
    let end = usize::try_from(end).map_err(|_| truncated)?;
    image.get(start..end).ok_or(truncated)
}

fn parse_header(image: &[u8]) -> Result<Header, LoadError> {
    if image.is_empty() {
        return Err(LoadError::Empty);
    }
    let mut first_bytes = [0u8; 4];
    for (dst, src) in first_bytes.iter_mut().zip(image) {
        *dst = *src;
    }
    let n = image.len().min(4);
    if image.get(..n) != ELFMAGIC.get(..n) {
        return Err(LoadError::NotElf { first_bytes });
    }
    let len = image.len() as u64;
    if image.len() < 16 {
        return Err(LoadError::Truncated {
            what: "ELF identification",
            offset: 0,
            need: 16,
            len,
        });
    }
    let is64 = match image.get(4) {
        Some(&ELFCLASS64) => true,
        Some(&ELFCLASS32) => false,
        _ => return Err(LoadError::UnsupportedClass),
    };
    if image.get(5) != Some(&ELFDATA2LSB) {
        return Err(LoadError::UnsupportedClass);
    }
    let ehsize: u64 = if is64 { 64 } else { 52 };
    slice(image, "ELF header", 0, ehsize)?;
    let e_type = le_u16(image, 16);
    let machine = le_u16(image, 18);
    if machine != EM_X86_64 && machine != EM_386 {
        return Err(LoadError::UnsupportedMachine(machine));
    }
    if e_type != ET_EXEC {
        return Err(LoadError::NotExecutable(e_type));
    }
    let h = if is64 {
        Header {
            is64,
            phoff: le_u64(image, 32),
            shoff: le_u64(image, 40),
            phentsize: le_u16(image, 54).into(),
            phnum: le_u16(image, 56).into(),
            shentsize: le_u16(image, 58).into(),
            shnum: le_u16(image, 60).into(),
        }
    } else {
        Header {
            is64,
            phoff: le_u32(image, 28).into(),
            shoff: le_u32(image, 32).into(),
            phentsize: le_u16(image, 42).into(),
            phnum: le_u16(image, 44).into(),
            shentsize: le_u16(image, 46).into(),
            shnum: le_u16(image, 48).into(),
        }
    };
    Ok(h)
}

/// Reads the program header table (bounds-checked) and returns it.
fn program_headers<'a>(image: &'a [u8], h: &Header) -> Result<&'a [u8], LoadError> {
    let min = if h.is64 { 56 } else { 32 };
    if h.phnum == 0 {
        return Err(LoadError::NoLoadSegments);
    }
    if h.phentsize < min {
        return Err(LoadError::BadHeader {
            what: "program header entry size too small",
        });
    }
    slice(image, "program headers", h.phoff, h.phnum * h.phentsize)
}

/// Reads the section header table (bounds-checked); empty when the file has none.
fn section_headers<'a>(image: &'a [u8], h: &Header) -> Result<&'a [u8], LoadError> {
    if h.shnum == 0 || h.shoff == 0 {
        return Ok(&[]);
    }
    let min = if h.is64 { 64 } else { 40 };
    if h.shentsize < min {
        return Err(LoadError::BadHeader {
            what: "section header entry size too small",
        });
    }
    slice(image, "section headers", h.shoff, h.shnum * h.shentsize)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

/// Looks for the PVH entry note in a block of notes. A malformed tail ends the scan.
fn find_pvh_note(notes: &[u8], align: u64) -> Result<Option<u32>, LoadError> {
    let align = if align == 8 { 8 } else { 4 };
    let total = notes.len() as u64;
    let mut off: u64 = 0;
    while off.checked_add(12).is_some_and(|e| e <= total) {
        let at = off as usize; // off <= total, which came from a usize
        let namesz = u64::from(le_u32(notes, at));
        let descsz = u64::from(le_u32(notes, at + 4));
        let ntype = le_u32(notes, at + 8);
        let name_start = off + 12;
        let Some(name_end) = name_start.checked_add(namesz) else {
            break;
        };
        let Some(desc_start) = align_up(name_end, align) else {
            break;
        };
        let Some(desc_end) = desc_start.checked_add(descsz) else {
            break;
        };
        if desc_end > total {
            break;
        }
        let name = notes
            .get(name_start as usize..name_end as usize)
            .unwrap_or(&[]);
        let desc = notes
            .get(desc_start as usize..desc_end as usize)
            .unwrap_or(&[]);
        let mut name_trimmed = name;
        while let [rest @ .., 0] = name_trimmed {
            name_trimmed = rest;
        }
        if name_trimmed == abi::XEN_ELFNOTE_NAME && ntype == abi::XEN_ELFNOTE_PHYS32_ENTRY {
            return match desc.len() {
                4 => Ok(Some(le_u32(desc, 0))),
                8 => {
                    let v = le_u64(desc, 0);
                    u32::try_from(v)
                        .map(Some)
                        .map_err(|_| LoadError::PvhEntryAbove4G { entry: v })
                }
                n => Err(LoadError::BadPvhNote { desc_len: n }),
            };
        }
        match align_up(desc_end, align) {
            Some(next) if next > off => off = next,
            _ => break,
        }
    }
    Ok(None)
}

/// Parses a PVH kernel image: checks the ELF headers, finds the PVH entry note and
/// lists the segments to load.
pub fn parse_pvh(image: &[u8]) -> Result<LoadPlan, LoadError> {
    let h = parse_header(image)?;
    let phdrs = program_headers(image, &h)?;
    let shdrs = section_headers(image, &h)?;
    let phentsize = h.phentsize as usize; // <= u16::MAX

    let mut entry = None;
    let mut segments = Vec::new();
    for ph in phdrs.chunks_exact(phentsize) {
        let p_type = le_u32(ph, 0);
        let offset = h.word(ph, 8, 4);
        let paddr = h.word(ph, 24, 12);
        let file_size = h.word(ph, 32, 16);
        let mem_size = h.word(ph, 40, 20);
        let align = h.word(ph, 48, 28);
        match p_type {
            PT_LOAD => {
                if file_size > mem_size || paddr.checked_add(mem_size).is_none() {
                    return Err(LoadError::SegmentOverflow {
                        paddr,
                        file_size,
                        mem_size,
                    });
                }
                slice(image, "segment data", offset, file_size)?;
                if mem_size > 0 {
                    segments.push(Segment {
                        paddr,
                        file_offset: offset,
                        file_size,
                        mem_size,
                    });
                }
            }
            PT_NOTE => {
                let notes = slice(image, "note segment", offset, file_size)?;
                if entry.is_none() {
                    entry = find_pvh_note(notes, align)?;
                }
            }
            _ => {}
        }
    }

    if entry.is_none() && !shdrs.is_empty() {
        let shentsize = h.shentsize as usize; // <= u16::MAX
        for sh in shdrs.chunks_exact(shentsize) {
            if le_u32(sh, 4) != SHT_NOTE {
                continue;
            }
            let offset = h.word(sh, 24, 16);
            let size = h.word(sh, 32, 20);
            let align = h.word(sh, 48, 32);
            let notes = slice(image, "note section", offset, size)?;
            entry = find_pvh_note(notes, align)?;
            if entry.is_some() {
                break;
            }
        }
    }
    let entry = entry.ok_or(LoadError::NoPvhNote)?;
    if segments.is_empty() {
        return Err(LoadError::NoLoadSegments);
    }

    segments.sort_by_key(|s| s.paddr);
    for pair in segments.windows(2) {
        if let [a, b] = pair {
            if a.end() > b.paddr {
                return Err(LoadError::OverlappingSegments {
                    first: a.paddr,
                    first_end: a.end(),
                    second: b.paddr,
                });
            }
        }
    }
    let e = u64::from(entry);
    if !segments.iter().any(|s| s.paddr <= e && e < s.end()) {
        return Err(LoadError::EntryOutsideSegments { entry });
    }
    let lowest = segments.first().map_or(0, |s| s.paddr);
    let end = segments.iter().map(Segment::end).max().unwrap_or(0);
    Ok(LoadPlan {
        entry,
        segments,
        lowest,
        end,
    })
}

/// Loads `plan`'s segments from `image` into guest memory of `mem_size` bytes: the
/// file bytes, then zeroes for the rest of each segment. Every segment is checked
/// against `[0, mem_size)` and the image before anything is written.
pub fn load(
    plan: &LoadPlan,
    image: &[u8],
    mem: &mut impl GuestMemWrite,
    mem_size: u64,
) -> Result<(), LoadError> {
    for s in &plan.segments {
        let overflow = LoadError::SegmentOverflow {
            paddr: s.paddr,
            file_size: s.file_size,
            mem_size: s.mem_size,
        };
        if s.file_size > s.mem_size {
            return Err(overflow);
        }
        let end = s.paddr.checked_add(s.mem_size).ok_or(overflow)?;
        if end > mem_size {
            return Err(LoadError::SegmentOutsideMemory {
                paddr: s.paddr,
                mem_size,
                mem_end: end,
            });
        }
        slice(image, "segment data", s.file_offset, s.file_size)?;
    }
    for s in &plan.segments {
        let data = slice(image, "segment data", s.file_offset, s.file_size)?;
        if !data.is_empty() && !mem.write(s.paddr, data) {
            return Err(LoadError::GuestWriteFailed { gpa: s.paddr });
        }
        let bss = s.mem_size - s.file_size;
        let bss_start = s.paddr + s.file_size;
        if bss > 0 && !mem.zero(bss_start, bss) {
            return Err(LoadError::GuestWriteFailed { gpa: bss_start });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone)]
    struct Seg {
        paddr: u64,
        vaddr: u64,
        data: Vec<u8>,
        memsz: u64,
    }

    #[derive(Clone)]
    struct Note {
        name: Vec<u8>,
        ntype: u32,
        desc: Vec<u8>,
    }

    fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Note {
        Note {
            name: name.to_vec(),
            ntype,
            desc: desc.to_vec(),
        }
    }

    fn pvh_note4(entry: u32) -> Note {
        note(b"Xen\0", 18, &entry.to_le_bytes())
    }

    fn pvh_note8(entry: u64) -> Note {
        note(b"Xen\0", 18, &entry.to_le_bytes())
    }

    /// A hand-made ELF writer for tests: header, program headers, notes, segment data,
    /// then (optionally) section headers. Nothing unreferenced at the end of the file.
    #[derive(Clone)]
    struct Builder {
        is64: bool,
        machine: u16,
        etype: u16,
        segs: Vec<Seg>,
        notes: Vec<Note>,
        notes_in_phdr: bool,
        notes_in_section: bool,
    }

    impl Builder {
        fn new(is64: bool) -> Self {
            Builder {
                is64,
                machine: if is64 { EM_X86_64 } else { EM_386 },
                etype: ET_EXEC,
                segs: vec![
                    Seg {
                        paddr: 0x100_0000,
                        vaddr: 0xffff_ffff_8100_0000,
                        data: (0..=255).collect(),
                        memsz: 0x1000,
                    },
                    // Linux-style: p_vaddr 0.
                    Seg {
                        paddr: 0x100_2000,
                        vaddr: 0,
                        data: vec![0xab; 100],
                        memsz: 0x3000,
                    },
                ],
                notes: vec![note(b"GNU\0", 3, &[1; 20]), pvh_note8(0x100_0040)],
                notes_in_phdr: true,
                notes_in_section: false,
            }
        }

        fn build(&self) -> Vec<u8> {
            let (ehsize, phentsize, shentsize) = if self.is64 {
                (64, 56, 64)
            } else {
                (52, 32, 40)
            };
            let phnum = self.segs.len() + usize::from(self.notes_in_phdr);
            let mut notes = Vec::new();
            for n in &self.notes {
                notes.extend((n.name.len() as u32).to_le_bytes());
                notes.extend((n.desc.len() as u32).to_le_bytes());
                notes.extend(n.ntype.to_le_bytes());
                notes.extend(&n.name);
                while !notes.len().is_multiple_of(4) {
                    notes.push(0);
                }
                notes.extend(&n.desc);
                while !notes.len().is_multiple_of(4) {
                    notes.push(0);
                }
            }
            let notes_off = ehsize + phnum * phentsize;
            let mut data_off = notes_off + notes.len();
            let mut seg_offs = Vec::new();
            for s in &self.segs {
                seg_offs.push(data_off);
                data_off += s.data.len();
            }
            let shoff = data_off;
            let shnum = if self.notes_in_section { 2 } else { 0 };

            let mut f = Vec::new();
            f.extend(ELFMAGIC);
            f.push(if self.is64 { ELFCLASS64 } else { ELFCLASS32 });
            f.extend([ELFDATA2LSB, 1, 0]);
            f.resize(16, 0);
            f.extend(self.etype.to_le_bytes());
            f.extend(self.machine.to_le_bytes());
            f.extend(1u32.to_le_bytes());
            let word = |f: &mut Vec<u8>, v: u64| {
                if self.is64 {
                    f.extend(v.to_le_bytes());
                } else {
                    f.extend((v as u32).to_le_bytes());
                }
            };
            word(&mut f, 0xffff_ffff_8100_0000); // e_entry: ignored
            word(&mut f, ehsize as u64);
            word(&mut f, if shnum > 0 { shoff as u64 } else { 0 });
            f.extend(0u32.to_le_bytes());
            f.extend((ehsize as u16).to_le_bytes());
            f.extend((phentsize as u16).to_le_bytes());
            f.extend((phnum as u16).to_le_bytes());
            f.extend((shentsize as u16).to_le_bytes());
            f.extend((shnum as u16).to_le_bytes());
            f.extend(0u16.to_le_bytes());
            assert_eq!(f.len(), ehsize);

            let phdr = |f: &mut Vec<u8>,
                        t: u32,
                        off: u64,
                        vaddr: u64,
                        paddr: u64,
                        filesz: u64,
                        memsz: u64,
                        align: u64| {
                f.extend(t.to_le_bytes());
                if self.is64 {
                    f.extend(7u32.to_le_bytes());
                    for v in [off, vaddr, paddr, filesz, memsz, align] {
                        f.extend(v.to_le_bytes());
                    }
                } else {
                    for v in [off, vaddr, paddr, filesz, memsz] {
                        f.extend((v as u32).to_le_bytes());
                    }
                    f.extend(7u32.to_le_bytes());
                    f.extend((align as u32).to_le_bytes());
                }
            };
            if self.notes_in_phdr {
                phdr(
                    &mut f,
                    PT_NOTE,
                    notes_off as u64,
                    0,
                    0,
                    notes.len() as u64,
                    0,
                    4,
                );
            }
            for (s, &off) in self.segs.iter().zip(&seg_offs) {
                phdr(
                    &mut f,
                    PT_LOAD,
                    off as u64,
                    s.vaddr,
                    s.paddr,
                    s.data.len() as u64,
                    s.memsz,
                    0x1000,
                );
            }
            f.extend(&notes);
            for s in &self.segs {
                f.extend(&s.data);
            }
            if shnum > 0 {
                f.resize(f.len() + shentsize, 0); // null section
                let mut sh = Vec::new();
                sh.extend(0u32.to_le_bytes());
                sh.extend(SHT_NOTE.to_le_bytes());
                let words = [2u64, 0, notes_off as u64, notes.len() as u64];
                for v in words {
                    word(&mut sh, v);
                }
                sh.extend(0u32.to_le_bytes());
                sh.extend(0u32.to_le_bytes());
                word(&mut sh, 4);
                word(&mut sh, 0);
                assert_eq!(sh.len(), shentsize);
                f.extend(sh);
            }
            f
        }
    }

    struct Mem {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl Mem {
        fn new(size: usize) -> Self {
            Mem {
                bytes: vec![0xcc; size],
                writes: 0,
            }
        }
    }

    impl GuestMemWrite for Mem {
        fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
            self.writes += 1;
            let start = gpa as usize;
            match self.bytes.get_mut(start..start + data.len()) {
                Some(d) => {
                    d.copy_from_slice(data);
                    true
                }
                None => false,
            }
        }
        fn zero(&mut self, gpa: u64, len: u64) -> bool {
            self.writes += 1;
            let start = gpa as usize;
            match self.bytes.get_mut(start..start + len as usize) {
                Some(d) => {
                    d.fill(0);
                    true
                }
                None => false,
            }
        }
    }

    fn expected_plan(entry: u32) -> LoadPlan {
        LoadPlan {
            entry,
            segments: vec![
                Segment {
                    paddr: 0x100_0000,
                    file_offset: 0,
                    file_size: 256,
                    mem_size: 0x1000,
                },
                Segment {
                    paddr: 0x100_2000,
                    file_offset: 0,
                    file_size: 100,
                    mem_size: 0x3000,
                },
            ],
            lowest: 0x100_0000,
            end: 0x100_5000,
        }
    }

    fn without_offsets(mut p: LoadPlan) -> LoadPlan {
        for s in &mut p.segments {
            s.file_offset = 0;
        }
        p
    }

    #[test]
    fn elf64_with_8_byte_note() {
        let image = Builder::new(true).build();
        let plan = parse_pvh(&image).unwrap();
        assert_eq!(without_offsets(plan), expected_plan(0x100_0040));
    }

    #[test]
    fn elf64_with_4_byte_note_and_elf32() {
        let mut b = Builder::new(true);
        b.notes = vec![pvh_note4(0x100_2010)];
        assert_eq!(
            without_offsets(parse_pvh(&b.build()).unwrap()),
            expected_plan(0x100_2010)
        );
        let mut b32 = Builder::new(false);
        b32.notes = vec![note(b"GNU\0", 1, &[0; 16]), pvh_note4(0x100_0000)];
        assert_eq!(
            without_offsets(parse_pvh(&b32.build()).unwrap()),
            expected_plan(0x100_0000)
        );
        b32.notes = vec![pvh_note8(0x100_0001)];
        assert_eq!(parse_pvh(&b32.build()).unwrap().entry, 0x100_0001);
    }

    #[test]
    fn note_problems() {
        let mut b = Builder::new(true);
        b.notes = vec![];
        assert_eq!(parse_pvh(&b.build()), Err(LoadError::NoPvhNote));
        b.notes_in_phdr = false;
        assert_eq!(parse_pvh(&b.build()), Err(LoadError::NoPvhNote));
        b.notes_in_phdr = true;
        for wrong in [
            note(b"Xe\0", 18, &[0; 4]),
            note(b"Linux\0", 18, &[0; 4]),
            note(b"Xen\0", 17, &[0; 4]),
            note(b"XenX", 18, &[0; 4]),
        ] {
            b.notes = vec![wrong];
            assert_eq!(parse_pvh(&b.build()), Err(LoadError::NoPvhNote));
        }
        b.notes = vec![note(b"Xen\0", 18, &[0; 2])];
        assert_eq!(
            parse_pvh(&b.build()),
            Err(LoadError::BadPvhNote { desc_len: 2 })
        );
        b.notes = vec![pvh_note8(1 << 32)];
        assert_eq!(
            parse_pvh(&b.build()),
            Err(LoadError::PvhEntryAbove4G { entry: 1 << 32 })
        );
        // A name without its NUL is accepted.
        b.notes = vec![note(b"Xen", 18, &0x100_0000u32.to_le_bytes())];
        assert_eq!(parse_pvh(&b.build()).unwrap().entry, 0x100_0000);
        // Entry outside the segments.
        b.notes = vec![pvh_note4(0x100_1000)];
        assert_eq!(
            parse_pvh(&b.build()),
            Err(LoadError::EntryOutsideSegments { entry: 0x100_1000 })
        );
    }

    #[test]
    fn note_found_through_sections() {
        for is64 in [true, false] {
            let mut b = Builder::new(is64);
            b.notes_in_phdr = false;
            b.notes_in_section = true;
            assert_eq!(parse_pvh(&b.build()).unwrap().entry, 0x100_0040);
            b.notes_in_phdr = true;
            assert_eq!(parse_pvh(&b.build()).unwrap().entry, 0x100_0040);
        }
    }

    #[test]
    fn not_elf_and_empty() {
        assert_eq!(parse_pvh(&[]), Err(LoadError::Empty));
        let mz = [0x4d, 0x5a, 0x90, 0x00, 3, 0, 0, 0];
        let e = parse_pvh(&mz).unwrap_err();
        assert_eq!(
            e,
            LoadError::NotElf {
                first_bytes: [0x4d, 0x5a, 0x90, 0]
            }
        );
        assert_eq!(
            e.to_string(),
            "is not an ELF file (it starts with 4d 5a 90 00)"
        );
        assert_eq!(
            parse_pvh(b"M"),
            Err(LoadError::NotElf {
                first_bytes: [0x4d, 0, 0, 0]
            })
        );
        assert!(matches!(
            parse_pvh(b"\x7fEL"),
            Err(LoadError::Truncated { .. })
        ));
    }

    #[test]
    fn header_checks() {
        let good = Builder::new(true).build();
        let mut bad = good.clone();
        bad[4] = 3;
        assert_eq!(parse_pvh(&bad), Err(LoadError::UnsupportedClass));
        let mut bad = good.clone();
        bad[5] = 2;
        assert_eq!(parse_pvh(&bad), Err(LoadError::UnsupportedClass));
        let mut b = Builder::new(true);
        b.machine = 183;
        let e = parse_pvh(&b.build()).unwrap_err();
        assert_eq!(e, LoadError::UnsupportedMachine(183));
        assert!(e.to_string().contains("AArch64"));
        let mut b = Builder::new(false);
        b.etype = 3;
        let e = parse_pvh(&b.build()).unwrap_err();
        assert_eq!(e, LoadError::NotExecutable(3));
        assert!(e.to_string().contains("ET_DYN"));
        let mut bad = good.clone();
        bad[54] = 20; // phentsize
        assert!(matches!(parse_pvh(&bad), Err(LoadError::BadHeader { .. })));
        let mut bad = good;
        bad[56] = 0; // phnum
        assert_eq!(parse_pvh(&bad), Err(LoadError::NoLoadSegments));
        let mut b = Builder::new(true);
        b.segs.clear();
        assert_eq!(parse_pvh(&b.build()), Err(LoadError::NoLoadSegments));
        b.segs = vec![Seg {
            paddr: 0,
            vaddr: 0,
            data: vec![],
            memsz: 0,
        }];
        b.notes = vec![pvh_note4(0)];
        assert_eq!(parse_pvh(&b.build()), Err(LoadError::NoLoadSegments));
    }

    #[test]
    fn truncation_at_every_prefix() {
        let mut b32 = Builder::new(false);
        b32.notes_in_section = true;
        let mut b64s = Builder::new(true);
        b64s.notes_in_section = true;
        b64s.notes_in_phdr = false;
        for image in [Builder::new(true).build(), b32.build(), b64s.build()] {
            assert!(parse_pvh(&image).is_ok());
            for n in 0..image.len() {
                let r = parse_pvh(&image[..n]);
                assert!(r.is_err(), "prefix {n} of {} parsed", image.len());
            }
        }
        let image = Builder::new(true).build();
        let e = parse_pvh(&image[..100]).unwrap_err();
        assert_eq!(
            e,
            LoadError::Truncated {
                what: "program headers",
                offset: 64,
                need: 168,
                len: 100
            }
        );
        assert_eq!(
            e.to_string(),
            "is truncated: the program headers at offset 64 need 168 bytes but the file has 100"
        );
        assert_eq!(
            parse_pvh(&image[..40]).unwrap_err().to_string(),
            "is truncated: the ELF header at offset 0 needs 64 bytes but the file has 40"
        );
    }

    #[test]
    fn segment_checks() {
        let mut b = Builder::new(true);
        b.segs[1].memsz = 50;
        let e = parse_pvh(&b.build()).unwrap_err();
        assert_eq!(
            e,
            LoadError::SegmentOverflow {
                paddr: 0x100_2000,
                file_size: 100,
                mem_size: 50
            }
        );
        assert!(e.to_string().contains("more bytes in the file"));
        let mut b = Builder::new(true);
        b.segs[1].paddr = 0x100_0800;
        let e = parse_pvh(&b.build()).unwrap_err();
        assert_eq!(
            e,
            LoadError::OverlappingSegments {
                first: 0x100_0000,
                first_end: 0x100_1000,
                second: 0x100_0800
            }
        );
        // Segments given out of order are sorted.
        let mut b = Builder::new(true);
        b.segs.swap(0, 1);
        assert_eq!(
            without_offsets(parse_pvh(&b.build()).unwrap()),
            expected_plan(0x100_0040)
        );
        // End overflow.
        let mut b = Builder::new(true);
        b.segs[1].paddr = u64::MAX - 0x10;
        assert!(matches!(
            parse_pvh(&b.build()),
            Err(LoadError::SegmentOverflow { .. })
        ));
    }

    #[test]
    fn load_writes_bytes_and_zeroes_bss() {
        let image = Builder::new(true).build();
        let plan = parse_pvh(&image).unwrap();
        let mut mem = Mem::new(0x100_6000);
        load(&plan, &image, &mut mem, 0x100_6000).unwrap();
        let expect0: Vec<u8> = (0..=255).collect();
        assert_eq!(&mem.bytes[0x100_0000..0x100_0100], &expect0[..]);
        assert!(mem.bytes[0x100_0100..0x100_1000].iter().all(|&b| b == 0));
        assert!(
            mem.bytes[0x100_1000..0x100_2000].iter().all(|&b| b == 0xcc),
            "gap untouched"
        );
        assert!(mem.bytes[0x100_2000..0x100_2064].iter().all(|&b| b == 0xab));
        assert!(mem.bytes[0x100_2064..0x100_5000].iter().all(|&b| b == 0));
        assert!(mem.bytes[0x100_5000..].iter().all(|&b| b == 0xcc));
        assert!(mem.bytes[..0x100_0000].iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn load_outside_memory_writes_nothing() {
        let image = Builder::new(true).build();
        let plan = parse_pvh(&image).unwrap();
        let mut mem = Mem::new(0);
        let e = load(&plan, &image, &mut mem, 0x100_4000).unwrap_err();
        assert_eq!(
            e,
            LoadError::SegmentOutsideMemory {
                paddr: 0x100_2000,
                mem_size: 0x100_4000,
                mem_end: 0x100_5000
            }
        );
        assert_eq!(mem.writes, 0);
        let big = LoadPlan {
            entry: 0x10_0000,
            segments: vec![Segment {
                paddr: 0x10_0000,
                file_offset: 0,
                file_size: 0,
                mem_size: 0x4f0_0000,
            }],
            lowest: 0x10_0000,
            end: 0x500_0000,
        };
        let e = load(&big, &image, &mut mem, 32 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "has a segment at 0x100000..0x5000000 that does not fit in the domain's 32 MiB of memory: raise `memory`"
        );
        assert_eq!(mem.writes, 0);
        // A plan that does not match the image.
        let mut bad = plan.clone();
        bad.segments[0].file_offset = image.len() as u64;
        assert!(matches!(
            load(&bad, &image, &mut Mem::new(0x100_6000), 0x100_6000),
            Err(LoadError::Truncated { .. })
        ));
        // The writer refusing.
        let mut tiny = Mem::new(16);
        assert_eq!(
            load(&plan, &image, &mut tiny, 0x100_6000),
            Err(LoadError::GuestWriteFailed { gpa: 0x100_0000 })
        );
    }

    #[test]
    fn messages() {
        let msgs = [
            LoadError::Empty,
            LoadError::UnsupportedClass,
            LoadError::UnsupportedMachine(9999),
            LoadError::NotExecutable(77),
            LoadError::BadHeader { what: "x" },
            LoadError::BadPvhNote { desc_len: 3 },
            LoadError::PvhEntryAbove4G { entry: 1 << 40 },
            LoadError::NoLoadSegments,
            LoadError::SegmentOverflow {
                paddr: 0,
                file_size: 0,
                mem_size: 1,
            },
            LoadError::EntryOutsideSegments { entry: 5 },
            LoadError::GuestWriteFailed { gpa: 5 },
        ];
        for m in msgs {
            let s = m.to_string();
            assert!(!s.is_empty() && !s.contains("bzImage"), "{s}");
        }
        assert_eq!(
            LoadError::NoPvhNote.to_string(),
            "has no PVH entry note (ELF note \"Xen\" type 18, XEN_ELFNOTE_PHYS32_ENTRY): it is not a Xen PVH kernel"
        );
        assert_eq!(Size(0).to_string(), "0 bytes");
        assert_eq!(Size(3 << 30).to_string(), "3 GiB");
        assert_eq!(Size(12 << 10).to_string(), "12 KiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    fn try_load(image: &[u8]) {
        if let Ok(plan) = parse_pvh(image) {
            assert!(plan.segments.iter().all(|s| s.file_size <= s.mem_size));
            let mut mem = Mem::new(0x100_6000);
            let _ = load(&plan, image, &mut mem, 0x100_6000);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            try_load(&bytes);
            // And with a valid-looking identification in front.
            let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 62, 0];
            elf.extend(&bytes);
            try_load(&elf);
        }

        #[test]
        fn mutations_never_panic(
            is64 in any::<bool>(),
            sections in any::<bool>(),
            muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut b = Builder::new(is64);
            b.notes_in_section = sections;
            let mut image = b.build();
            for (i, v) in muts {
                let i = i.index(image.len());
                image[i] = v;
            }
            try_load(&image);
        }
    }
}
