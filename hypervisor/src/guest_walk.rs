//! Guest-virtual to guest-physical translation, done the way the guest's CPU would,
//! for copying hypercall arguments (Linux passes guest-virtual pointers).
//!
//! Supported: paging off, 32-bit 2-level paging (with 4 MiB PSE pages, PSE-36
//! high bits), PAE 3-level paging (2 MiB pages) and 4-level long mode (2 MiB and 1 GiB
//! pages). 5-level paging is refused with [`WalkError::Unsupported`].
//!
//! The walk only reads guest memory: accessed and dirty bits are not set, TLBs are
//! not modelled (the tables are read afresh, PAE PDPTEs included), and SMEP, SMAP and
//! protection keys are not checked. Reserved bits above the guest's MAXPHYADDR are not
//! checked either (such an address simply is not guest RAM).

use core::fmt;

/// The guest's paging control state (from the VMCB/VMCS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestPaging {
    /// CR0 (PG bit 31, WP bit 16 matter).
    pub cr0: u64,
    /// CR3: the root table.
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12 matter).
    pub cr4: u64,
    /// EFER (LMA bit 10, NXE bit 11 matter).
    pub efer: u64,
}

/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.PSE.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57.
pub const CR4_LA57: u64 = 1 << 12;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// The paging mode a [`GuestPaging`] selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// CR0.PG = 0: linear = physical.
    Off,
    /// 32-bit 2-level paging.
    Bits32,
    /// PAE 3-level paging.
    Pae,
    /// 4-level long-mode paging.
    Long4,
    /// 5-level paging (not supported by the walk).
    Long5,
    /// A combination the CPU does not allow (long mode without PAE).
    Invalid,
}

impl GuestPaging {
    /// The paging mode selected by these registers.
    pub fn mode(&self) -> Mode {
        if self.cr0 & CR0_PG == 0 {
            Mode::Off
        } else if self.efer & EFER_LMA != 0 {
            if self.cr4 & CR4_PAE == 0 {
                Mode::Invalid
            } else if self.cr4 & CR4_LA57 != 0 {
                Mode::Long5
            } else {
                Mode::Long4
            }
        } else if self.cr4 & CR4_PAE != 0 {
            Mode::Pae
        } else {
            Mode::Bits32
        }
    }
}

/// Reads of guest-physical memory, 8 bytes at a time.
pub trait GuestPhys {
    /// The 8 bytes (little-endian) at 8-aligned `gpa`; `None` if that is not guest RAM.
    fn read_u64(&self, gpa: u64) -> Option<u64>;
}

/// Byte-granular guest-physical access, for copies. The walker never passes a range
/// that crosses a 4 KiB guest-physical page.
pub trait GuestPhysBytes: GuestPhys {
    /// Fills `buf` from guest-physical `gpa`; `None` if that is not guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()>;
    /// Writes `buf` at guest-physical `gpa`; `None` if that is not (writable) guest RAM.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Option<()>;
}

/// The kind of access being translated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write.
    pub write: bool,
    /// A user-mode (CPL 3) access.
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl Access {
    /// A supervisor data read.
    pub const READ: Access = Access {
        write: false,
        user: false,
        fetch: false,
    };
    /// A supervisor data write.
    pub const WRITE: Access = Access {
        write: true,
        user: false,
        fetch: false,
    };
}

/// Why a translation failed (what the guest would see as a page fault, or a state
/// the walker does not handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` (1 = page table, 2 = page directory, 3 = PDPT, 4 = PML4)
    /// is not present.
    NotPresent {
        /// Table level of the missing entry.
        level: u8,
    },
    /// The page is present but the access is not allowed.
    Protection,
    /// An entry has a reserved bit set.
    ReservedBit,
    /// A paging-structure entry's address is not guest RAM.
    TableNotRam {
        /// Guest-physical address of the entry that could not be read.
        gpa: u64,
    },
    /// The address is not canonical (long mode).
    NonCanonical,
    /// A paging mode the walker does not implement (5-level), or an impossible one.
    Unsupported,
    /// The translated data page is not guest RAM (copies only).
    DataNotRam {
        /// Guest-physical address that could not be accessed.
        gpa: u64,
    },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NotPresent { level } => write!(f, "page not present (level {level})"),
            WalkError::Protection => f.write_str("page protection violation"),
            WalkError::ReservedBit => f.write_str("reserved bit set in a page-table entry"),
            WalkError::TableNotRam { gpa } => {
                write!(f, "page-table entry at {gpa:#x} is not in guest RAM")
            }
            WalkError::NonCanonical => f.write_str("non-canonical address"),
            WalkError::Unsupported => f.write_str("unsupported guest paging mode"),
            WalkError::DataNotRam { gpa } => write!(f, "guest address {gpa:#x} is not RAM"),
        }
    }
}

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Bits 52..62: reserved in PAE-mode entries.
const PAE_HIGH_RSVD: u64 = 0x7ff0_0000_0000_0000;
/// Reserved bits of a PAE PDPTE: 1, 2, 5..8 and 52..63.
const PDPTE_RSVD: u64 = 0x1e6 | PAE_HIGH_RSVD | NX;

/// Rights accumulated over a walk.
struct Rights {
    write: bool,
    user: bool,
    nx: bool,
}

impl Rights {
    const ALL: Rights = Rights {
        write: true,
        user: true,
        nx: false,
    };

    fn add(&mut self, entry: u64) {
        self.write &= entry & RW != 0;
        self.user &= entry & US != 0;
        self.nx |= entry & NX != 0;
    }

    fn check(&self, p: &GuestPaging, access: Access) -> Result<(), WalkError> {
        if access.user && !self.user {
            return Err(WalkError::Protection);
        }
        if access.write && !self.write && (access.user || p.cr0 & CR0_WP != 0) {
            return Err(WalkError::Protection);
        }
        if access.fetch && self.nx && p.efer & EFER_NXE != 0 {
            return Err(WalkError::Protection);
        }
        Ok(())
    }
}

fn read_entry(mem: &impl GuestPhys, gpa: u64) -> Result<u64, WalkError> {
    mem.read_u64(gpa).ok_or(WalkError::TableNotRam { gpa })
}

fn read_entry32(mem: &impl GuestPhys, gpa: u64) -> Result<u64, WalkError> {
    let word = mem
        .read_u64(gpa & !7)
        .ok_or(WalkError::TableNotRam { gpa })?;
    Ok(if gpa & 4 != 0 {
        word >> 32
    } else {
        word & 0xffff_ffff
    })
}

/// Translates guest-virtual `gva` to guest-physical for `access`, as the guest CPU
/// would with the given control registers.
///
/// Outside long mode, linear addresses are 32 bits: `gva` is truncated (wraps at
/// 4 GiB) like the CPU does.
pub fn translate(
    p: &GuestPaging,
    mem: &impl GuestPhys,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    match p.mode() {
        Mode::Off => Ok(if p.efer & EFER_LMA != 0 {
            gva
        } else {
            gva & 0xffff_ffff
        }),
        Mode::Bits32 => walk32(p, mem, gva & 0xffff_ffff, access),
        Mode::Pae => walk_pae(p, mem, gva & 0xffff_ffff, access),
        Mode::Long4 => {
            if ((gva << 16) as i64 >> 16) as u64 != gva {
                return Err(WalkError::NonCanonical);
            }
            let mut rights = Rights::ALL;
            let gpa = walk64(p, mem, gva, p.cr3 & ADDR, 4, false, &mut rights)?;
            rights.check(p, access)?;
            Ok(gpa)
        }
        Mode::Long5 | Mode::Invalid => Err(WalkError::Unsupported),
    }
}

fn walk32(
    p: &GuestPaging,
    mem: &impl GuestPhys,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    let mut rights = Rights::ALL;
    let pde_gpa = (p.cr3 & 0xffff_f000) + ((gva >> 22) & 0x3ff) * 4;
    let pde = read_entry32(mem, pde_gpa)?;
    if pde & P == 0 {
        return Err(WalkError::NotPresent { level: 2 });
    }
    rights.add(pde);
    if pde & PS != 0 && p.cr4 & CR4_PSE != 0 {
        // 4 MiB page; bits 13..20 are physical bits 32..39 (PSE-36), bit 21 reserved.
        if pde & (1 << 21) != 0 {
            return Err(WalkError::ReservedBit);
        }
        rights.check(p, access)?;
        let high = ((pde >> 13) & 0xff) << 32;
        return Ok(high | (pde & 0xffc0_0000) | (gva & 0x3f_ffff));
    }
    let pte_gpa = (pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4;
    let pte = read_entry32(mem, pte_gpa)?;
    if pte & P == 0 {
        return Err(WalkError::NotPresent { level: 1 });
    }
    rights.add(pte);
    rights.check(p, access)?;
    Ok((pte & 0xffff_f000) | (gva & 0xfff))
}

fn walk_pae(
    p: &GuestPaging,
    mem: &impl GuestPhys,
    gva: u64,
    access: Access,
) -> Result<u64, WalkError> {
    let pdpte_gpa = (p.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8;
    let pdpte = read_entry(mem, pdpte_gpa)?;
    if pdpte & P == 0 {
        return Err(WalkError::NotPresent { level: 3 });
    }
    if pdpte & PDPTE_RSVD != 0 {
        return Err(WalkError::ReservedBit);
    }
    let mut rights = Rights::ALL;
    let gpa = walk64(p, mem, gva, pdpte & ADDR, 2, true, &mut rights)?;
    rights.check(p, access)?;
    Ok(gpa)
}

/// Walks 8-byte entries from `table` at level `top` down to the leaf.
fn walk64(
    p: &GuestPaging,
    mem: &impl GuestPhys,
    gva: u64,
    mut table: u64,
    top: u8,
    pae: bool,
    rights: &mut Rights,
) -> Result<u64, WalkError> {
    for level in (1..=top).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let gpa = table + ((gva >> shift) & 511) * 8;
        let e = read_entry(mem, gpa)?;
        if e & P == 0 {
            return Err(WalkError::NotPresent { level });
        }
        let mut reserved = 0;
        if p.efer & EFER_NXE == 0 {
            reserved |= NX;
        }
        if pae {
            reserved |= PAE_HIGH_RSVD;
        }
        if level == 4 {
            reserved |= PS;
        }
        let large = (level == 2 || level == 3) && e & PS != 0;
        if large {
            // Bits 13..(shift-1): between the PAT bit and the page address.
            reserved |= ((1u64 << shift) - 1) & !0x1fff;
        }
        if e & reserved != 0 {
            return Err(WalkError::ReservedBit);
        }
        rights.add(e);
        if level == 1 || large {
            let offset = (1u64 << shift) - 1;
            return Ok((e & ADDR & !offset) | (gva & offset));
        }
        table = e & ADDR;
    }
    // `top` is at least 1, so the loop always returns; keep the compiler content.
    Err(WalkError::Unsupported)
}

/// Splits `[gva, gva + len)` at 4 KiB boundaries: yields (offset into the buffer,
/// guest-virtual address, length).
fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize)> {
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let cur = gva.wrapping_add(done as u64);
        let in_page = 0x1000 - (cur & 0xfff) as usize;
        let n = in_page.min(len - done);
        let item = (done, cur, n);
        done += n;
        Some(item)
    })
}

/// Copies `buf.len()` bytes from guest-virtual `gva` (a supervisor read), page by
/// page. On error, `buf` may be partly filled.
pub fn copy_from_guest(
    p: &GuestPaging,
    mem: &impl GuestPhysBytes,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), WalkError> {
    for (off, cur, n) in chunks(gva, buf.len()) {
        let gpa = translate(p, mem, cur, Access::READ)?;
        let part = buf
            .get_mut(off..off + n)
            .ok_or(WalkError::DataNotRam { gpa })?;
        mem.read(gpa, part).ok_or(WalkError::DataNotRam { gpa })?;
    }
    Ok(())
}

/// Copies `buf` to guest-virtual `gva` (a supervisor write), page by page. Every page
/// is translated before the first byte is written, so a translation fault writes
/// nothing.
pub fn copy_to_guest(
    p: &GuestPaging,
    mem: &mut impl GuestPhysBytes,
    gva: u64,
    buf: &[u8],
) -> Result<(), WalkError> {
    for (_, cur, _) in chunks(gva, buf.len()) {
        translate(p, mem, cur, Access::WRITE)?;
    }
    for (off, cur, n) in chunks(gva, buf.len()) {
        let gpa = translate(p, mem, cur, Access::WRITE)?;
        let part = buf.get(off..off + n).ok_or(WalkError::DataNotRam { gpa })?;
        mem.write(gpa, part).ok_or(WalkError::DataNotRam { gpa })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Guest RAM in a Vec; optionally every address wraps into it (for fuzzing deep
    /// walks).
    struct Ram {
        bytes: Vec<u8>,
        wrap: bool,
    }

    impl Ram {
        fn new(size: usize) -> Self {
            Ram {
                bytes: vec![0; size],
                wrap: false,
            }
        }
        fn w64(&mut self, gpa: u64, v: u64) {
            self.bytes[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn w32(&mut self, gpa: u64, v: u32) {
            self.bytes[gpa as usize..gpa as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        fn range(&self, gpa: u64, len: usize) -> Option<core::ops::Range<usize>> {
            if self.bytes.is_empty() {
                return None;
            }
            let start = if self.wrap {
                gpa % self.bytes.len() as u64
            } else {
                gpa
            };
            let start = usize::try_from(start).ok()?;
            let end = start.checked_add(len)?;
            (end <= self.bytes.len()).then_some(start..end)
        }
    }

    impl GuestPhys for Ram {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            assert_eq!(gpa % 8, 0, "unaligned entry read");
            let r = self.range(gpa, 8)?;
            Some(u64::from_le_bytes(self.bytes[r].try_into().unwrap()))
        }
    }

    impl GuestPhysBytes for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
            assert!(
                (gpa & 0xfff) as usize + buf.len() <= 0x1000,
                "chunk crosses a page"
            );
            let r = self.range(gpa, buf.len())?;
            buf.copy_from_slice(&self.bytes[r]);
            Some(())
        }
        fn write(&mut self, gpa: u64, buf: &[u8]) -> Option<()> {
            assert!(
                (gpa & 0xfff) as usize + buf.len() <= 0x1000,
                "chunk crosses a page"
            );
            let r = self.range(gpa, buf.len())?;
            self.bytes[r].copy_from_slice(buf);
            Some(())
        }
    }

    const R: Access = Access::READ;
    const W: Access = Access::WRITE;
    const UR: Access = Access {
        write: false,
        user: true,
        fetch: false,
    };
    const UW: Access = Access {
        write: true,
        user: true,
        fetch: false,
    };
    const X: Access = Access {
        write: false,
        user: false,
        fetch: true,
    };

    fn regs(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> GuestPaging {
        GuestPaging {
            cr0,
            cr3,
            cr4,
            efer,
        }
    }

    #[test]
    fn paging_off_is_identity_low_32() {
        let ram = Ram::new(0);
        let p = regs(0, 0xdead_0000, 0, 0);
        assert_eq!(p.mode(), Mode::Off);
        assert_eq!(translate(&p, &ram, 0x1234_5678_9abc, UW), Ok(0x5678_9abc));
        let p = regs(0, 0, 0, EFER_LMA);
        assert_eq!(
            translate(&p, &ram, 0x1234_5678_9abc, R),
            Ok(0x1234_5678_9abc)
        );
    }

    /// 32-bit tables: PD at 0x1000, PT at 0x2000.
    fn setup32() -> (Ram, GuestPaging) {
        let mut ram = Ram::new(0x10000);
        ram.w32(0x1000 + 4, 0x2000 | 0x7); // PDE[1] -> PT, user rw
        ram.w32(0x2000 + 5 * 4, 0x7000 | 0x7); // PTE[5] user rw (odd: high half)
        ram.w32(0x2000 + 6 * 4, 0x8000 | 0x5); // PTE[6] user read-only
        ram.w32(0x2000 + 8 * 4, 0x9000 | 0x3); // PTE[8] supervisor rw
        ram.w32(0x1000 + 2 * 4, 0x0c00_0000 | 0x83); // PDE[2] 4 MiB, supervisor rw
        ram.w32(0x1000 + 3 * 4, 0x0c40_0000 | (0x12 << 13) | 0x87); // PSE-36
        ram.w32(0x1000 + 4 * 4, 0x0c80_0000 | (1 << 21) | 0x83); // reserved bit 21
        (ram, regs(CR0_PG, 0x1000, CR4_PSE, 0))
    }

    #[test]
    fn bits32() {
        let (ram, p) = setup32();
        assert_eq!(p.mode(), Mode::Bits32);
        assert_eq!(translate(&p, &ram, 0x0040_5123, UW), Ok(0x7123));
        assert_eq!(translate(&p, &ram, 0x0040_8fff, W), Ok(0x9fff));
        assert_eq!(translate(&p, &ram, 0x0081_2345, W), Ok(0x0c01_2345));
        assert_eq!(translate(&p, &ram, 0x00c0_0010, UR), Ok(0x12_0c40_0010));
        assert_eq!(
            translate(&p, &ram, 0x0100_0000, R),
            Err(WalkError::ReservedBit)
        );
        // High bits of gva are dropped outside long mode.
        assert_eq!(translate(&p, &ram, 0xffff_ffff_0040_5123, R), Ok(0x7123));
        assert_eq!(
            translate(&p, &ram, 0x0000_0000, R),
            Err(WalkError::NotPresent { level: 2 })
        );
        assert_eq!(
            translate(&p, &ram, 0x0040_7000, R),
            Err(WalkError::NotPresent { level: 1 })
        );
        // Protection.
        assert_eq!(
            translate(&p, &ram, 0x0040_8000, UR),
            Err(WalkError::Protection)
        );
        assert_eq!(
            translate(&p, &ram, 0x0081_0000, UR),
            Err(WalkError::Protection)
        );
        assert_eq!(translate(&p, &ram, 0x0040_6000, UR), Ok(0x8000));
        assert_eq!(
            translate(&p, &ram, 0x0040_6000, UW),
            Err(WalkError::Protection)
        );
        assert_eq!(
            translate(&p, &ram, 0x0040_6000, W),
            Ok(0x8000),
            "WP=0: supervisor writes pass"
        );
        let wp = GuestPaging {
            cr0: CR0_PG | CR0_WP,
            ..p
        };
        assert_eq!(
            translate(&wp, &ram, 0x0040_6000, W),
            Err(WalkError::Protection)
        );
        // No NX in 32-bit paging.
        assert_eq!(translate(&p, &ram, 0x0040_5000, X), Ok(0x7000));
        // Without CR4.PSE, PS is ignored: the PDE points at a "table" beyond RAM.
        let nopse = GuestPaging { cr4: 0, ..p };
        assert_eq!(
            translate(&nopse, &ram, 0x0080_0000, R),
            Err(WalkError::TableNotRam { gpa: 0x0c00_0000 })
        );
        let far = GuestPaging {
            cr3: 0x8000_0000,
            ..p
        };
        assert_eq!(
            translate(&far, &ram, 0, R),
            Err(WalkError::TableNotRam { gpa: 0x8000_0000 })
        );
    }

    /// PAE: PDPT at 0x3020, PD at 0x4000, PT at 0x5000.
    fn setup_pae() -> (Ram, GuestPaging) {
        let mut ram = Ram::new(0x10000);
        ram.w64(0x3020 + 8, 0x4000 | 1); // PDPTE[1]
        ram.w64(0x3020 + 16, 0x6000 | 1 | 2); // PDPTE[2]: RW is reserved in a PDPTE
        ram.w64(0x4000 + 3 * 8, 0x5000 | 0x7); // PDE[3]
        ram.w64(0x5000 + 7 * 8, 0x9000 | 0x7); // PTE[7]
        ram.w64(0x5000 + 8 * 8, 0xa000 | 0x7 | NX); // PTE[8] NX
        ram.w64(0x5000 + 9 * 8, 0xb000 | 0x7 | (1 << 52)); // PTE[9] reserved high bit
        ram.w64(0x4000 + 4 * 8, 0x0040_0000 | 0x83); // PDE[4] 2 MiB
        ram.w64(0x4000 + 5 * 8, 0x0060_0000 | 0x83 | (1 << 13)); // reserved in 2 MiB
        ram.w64(0x4000 + 6 * 8, 0x0080_0000 | 0x83 | (1 << 12)); // PAT bit: fine
        (ram, regs(CR0_PG, 0x3020, CR4_PAE, 0))
    }

    #[test]
    fn pae() {
        let (ram, p) = setup_pae();
        assert_eq!(p.mode(), Mode::Pae);
        let g = |pd: u64, pt: u64, off: u64| (1 << 30) | (pd << 21) | (pt << 12) | off;
        assert_eq!(translate(&p, &ram, g(3, 7, 0x10), UW), Ok(0x9010));
        assert_eq!(
            translate(&p, &ram, g(4, 0x1f, 0x234), UW),
            Err(WalkError::Protection)
        );
        assert_eq!(translate(&p, &ram, g(4, 0x1f, 0x234), W), Ok(0x0041_f234));
        assert_eq!(translate(&p, &ram, g(6, 0, 0x1), R), Ok(0x0080_0001));
        assert_eq!(
            translate(&p, &ram, g(5, 0, 0), R),
            Err(WalkError::ReservedBit)
        );
        assert_eq!(
            translate(&p, &ram, g(3, 9, 0), R),
            Err(WalkError::ReservedBit)
        );
        assert_eq!(translate(&p, &ram, 2 << 30, R), Err(WalkError::ReservedBit));
        assert_eq!(
            translate(&p, &ram, 0, R),
            Err(WalkError::NotPresent { level: 3 })
        );
        assert_eq!(
            translate(&p, &ram, g(0, 0, 0), R),
            Err(WalkError::NotPresent { level: 2 })
        );
        assert_eq!(
            translate(&p, &ram, g(3, 0, 0), R),
            Err(WalkError::NotPresent { level: 1 })
        );
        // NX without NXE is a reserved bit; with NXE only fetches fail.
        assert_eq!(
            translate(&p, &ram, g(3, 8, 0), R),
            Err(WalkError::ReservedBit)
        );
        let nxe = GuestPaging {
            efer: EFER_NXE,
            ..p
        };
        assert_eq!(translate(&nxe, &ram, g(3, 8, 0), R), Ok(0xa000));
        assert_eq!(
            translate(&nxe, &ram, g(3, 8, 0), X),
            Err(WalkError::Protection)
        );
        assert_eq!(translate(&nxe, &ram, g(3, 7, 0), X), Ok(0x9000));
    }

    /// Long mode: PML4 0x10000, PDPT 0x11000, PD 0x12000, PT 0x13000.
    fn setup_long() -> (Ram, GuestPaging) {
        let mut ram = Ram::new(0x40000);
        ram.w64(0x10000, 0x11000 | 0x7);
        ram.w64(0x11000, 0x12000 | 0x7);
        ram.w64(0x12000, 0x13000 | 0x7);
        ram.w64(0x13000 + 8, 0x20000 | 0x7); // gva 0x1000
        ram.w64(0x13000 + 16, 0x21000 | 0x1); // gva 0x2000: supervisor ro
        ram.w64(0x13000 + 24, 0x22000 | 0x3 | NX); // gva 0x3000: NX
        ram.w64(0x13000 + 32, 0x30000 | 0x3); // gva 0x4000
        ram.w64(0x13000 + 40, 0x100_0000 | 0x3); // gva 0x5000: not RAM
        ram.w64(0x11000 + 8, 0x8000_0000 | 0x83); // 1 GiB at gva 1 GiB
        ram.w64(0x11000 + 16, 0x8000_0000 | 0x83 | (1 << 29)); // reserved in 1 GiB
        ram.w64(0x12000 + 8, 0x40_0000 | 0x87); // 2 MiB at gva 2 MiB
        ram.w64(0x12000 + 16, 0x40_0000 | 0x83 | (1 << 20)); // reserved in 2 MiB
        ram.w64(0x10000 + 8, 0x11000 | 0x87); // PML4E with PS: reserved
        ram.w64(0x10000 + 511 * 8, 0x11000 | 0x3); // upper half -> same PDPT, supervisor
        ram.w64(0x10000 + 2 * 8, 0x11000 | 0x7 | (1 << 52)); // bits 52+ ignored in long mode
        (
            ram,
            regs(
                CR0_PG | CR0_WP,
                0x10000 | 0x18,
                CR4_PAE,
                EFER_LMA | EFER_NXE,
            ),
        )
    }

    #[test]
    fn long_mode() {
        let (ram, p) = setup_long();
        assert_eq!(p.mode(), Mode::Long4);
        assert_eq!(translate(&p, &ram, 0x1abc, UW), Ok(0x20abc));
        assert_eq!(translate(&p, &ram, 0x4000_1234, R), Ok(0x8000_1234));
        assert_eq!(translate(&p, &ram, 0x7fff_ffff, R), Ok(0xbfff_ffff));
        assert_eq!(translate(&p, &ram, 0x20_5678, UR), Ok(0x40_5678));
        assert_eq!(
            translate(&p, &ram, 0x8000_0000, R),
            Err(WalkError::ReservedBit)
        );
        assert_eq!(
            translate(&p, &ram, 0x40_0000, R),
            Err(WalkError::ReservedBit)
        );
        assert_eq!(translate(&p, &ram, 1 << 39, R), Err(WalkError::ReservedBit));
        assert_eq!(translate(&p, &ram, (2 << 39) | 0x1000, R), Ok(0x20000));
        assert_eq!(translate(&p, &ram, 0xffff_ff80_0000_1010, R), Ok(0x20010));
        assert_eq!(
            translate(&p, &ram, 0xffff_ff80_0000_1010, UR),
            Err(WalkError::Protection)
        );
        assert_eq!(
            translate(&p, &ram, 0x0000_8000_0000_0000, R),
            Err(WalkError::NonCanonical)
        );
        assert_eq!(
            translate(&p, &ram, 0xffff_7fff_ffff_f000, R),
            Err(WalkError::NonCanonical)
        );
        assert_eq!(
            translate(&p, &ram, 3 << 39, R),
            Err(WalkError::NotPresent { level: 4 })
        );
        assert_eq!(
            translate(&p, &ram, 3 << 30, R),
            Err(WalkError::NotPresent { level: 3 })
        );
        assert_eq!(
            translate(&p, &ram, 3 << 21, R),
            Err(WalkError::NotPresent { level: 2 })
        );
        assert_eq!(
            translate(&p, &ram, 0, R),
            Err(WalkError::NotPresent { level: 1 })
        );
        assert_eq!(translate(&p, &ram, 0x2000, W), Err(WalkError::Protection));
        let nowp = GuestPaging { cr0: CR0_PG, ..p };
        assert_eq!(translate(&nowp, &ram, 0x2000, W), Ok(0x21000));
        assert_eq!(translate(&p, &ram, 0x3000, R), Ok(0x22000));
        assert_eq!(translate(&p, &ram, 0x3000, X), Err(WalkError::Protection));
        let nonxe = GuestPaging {
            efer: EFER_LMA,
            ..p
        };
        assert_eq!(
            translate(&nonxe, &ram, 0x3000, R),
            Err(WalkError::ReservedBit)
        );
        let la57 = GuestPaging {
            cr4: CR4_PAE | CR4_LA57,
            ..p
        };
        assert_eq!(la57.mode(), Mode::Long5);
        assert_eq!(
            translate(&la57, &ram, 0x1000, R),
            Err(WalkError::Unsupported)
        );
        let nopae = GuestPaging { cr4: 0, ..p };
        assert_eq!(
            translate(&nopae, &ram, 0x1000, R),
            Err(WalkError::Unsupported)
        );
        let far = GuestPaging {
            cr3: 0x1_0000_0000,
            ..p
        };
        assert_eq!(
            translate(&far, &ram, 0x1000, R),
            Err(WalkError::TableNotRam { gpa: 0x1_0000_0000 })
        );
    }

    #[test]
    fn copies_split_at_pages() {
        let (mut ram, p) = setup_long();
        // gva 0x1000 -> 0x20000, 0x2000 -> 0x21000 (ro), 0x4000 -> 0x30000
        ram.w64(0x13000 + 16, 0x25000 | 0x3); // make gva 0x2000 writable, non-contiguous gpa
        let data: Vec<u8> = (0..0x40u8).collect();
        copy_to_guest(&p, &mut ram, 0x1fe0, &data).unwrap();
        assert_eq!(&ram.bytes[0x20fe0..0x21000], &data[..0x20]);
        assert_eq!(&ram.bytes[0x25000..0x25020], &data[0x20..]);
        let mut back = [0u8; 0x40];
        copy_from_guest(&p, &ram, 0x1fe0, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        // Larger than a page, spanning three.
        let big: Vec<u8> = (0..0x1800).map(|i| (i * 7) as u8).collect();
        copy_to_guest(&p, &mut ram, 0x1c00, &big).unwrap();
        let mut back = vec![0u8; big.len()];
        copy_from_guest(&p, &ram, 0x1c00, &mut back).unwrap();
        assert_eq!(back, big);
        // Empty copies always work.
        copy_from_guest(&p, &ram, 0xdead_0000_0000_0000, &mut []).unwrap();
    }

    #[test]
    fn copy_faults() {
        let (mut ram, p) = setup_long();
        let before = ram.bytes.clone();
        // Second page read-only (WP=1): nothing written at all.
        assert_eq!(
            copy_to_guest(&p, &mut ram, 0x1ff0, &[0xaa; 0x20]),
            Err(WalkError::Protection)
        );
        assert_eq!(ram.bytes, before);
        // Reading it is fine.
        let mut buf = [0u8; 0x20];
        copy_from_guest(&p, &ram, 0x1ff0, &mut buf).unwrap();
        // Crossing into an unmapped page.
        assert_eq!(
            copy_from_guest(&p, &ram, 0xff0, &mut buf),
            Err(WalkError::NotPresent { level: 1 })
        );
        // Mapped, but not RAM.
        assert_eq!(
            copy_from_guest(&p, &ram, 0x5000, &mut buf),
            Err(WalkError::DataNotRam { gpa: 0x100_0000 })
        );
        assert_eq!(
            copy_to_guest(&p, &mut ram, 0x5008, &buf),
            Err(WalkError::DataNotRam { gpa: 0x100_0008 })
        );
        for e in [
            WalkError::NotPresent { level: 2 },
            WalkError::Protection,
            WalkError::ReservedBit,
            WalkError::TableNotRam { gpa: 1 },
            WalkError::NonCanonical,
            WalkError::Unsupported,
            WalkError::DataNotRam { gpa: 2 },
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn copies_with_paging_off_wrap_at_4g() {
        let mut ram = Ram::new(0x2000);
        ram.wrap = true;
        let p = GuestPaging::default();
        copy_to_guest(&p, &mut ram, 0xffff_fff0, &[1; 0x20]).unwrap();
        // 0xffff_fff0 % 0x2000 = 0x1ff0, then wraps to 0.
        assert_eq!(&ram.bytes[0x1ff0..0x2000], &[1; 0x10]);
        assert_eq!(&ram.bytes[0..0x10], &[1; 0x10]);
    }

    fn regs_strategy() -> impl Strategy<Value = GuestPaging> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
        )
            .prop_map(|(cr0, cr3, cr4, efer, pick)| {
                // Bias towards the interesting modes.
                let mut g = GuestPaging {
                    cr0,
                    cr3,
                    cr4,
                    efer,
                };
                match pick % 4 {
                    0 => {
                        g.cr0 |= CR0_PG;
                        g.cr4 &= !(CR4_PAE | CR4_LA57);
                        g.efer &= !EFER_LMA;
                    }
                    1 => {
                        g.cr0 |= CR0_PG;
                        g.cr4 = (g.cr4 | CR4_PAE) & !CR4_LA57;
                        g.efer &= !EFER_LMA;
                    }
                    2 => {
                        g.cr0 |= CR0_PG;
                        g.cr4 = (g.cr4 | CR4_PAE) & !CR4_LA57;
                        g.efer |= EFER_LMA;
                    }
                    _ => {}
                }
                g
            })
    }

    fn access_strategy() -> impl Strategy<Value = Access> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(write, user, fetch)| Access {
            write,
            user,
            fetch,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_ram_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..0x3000),
            p in regs_strategy(),
            gva in any::<u64>(),
            access in access_strategy(),
            len in 0usize..0x2100,
        ) {
            let mut ram = Ram { bytes, wrap: false };
            let _ = translate(&p, &ram, gva, access);
            let mut buf = vec![0u8; len];
            let _ = copy_from_guest(&p, &ram, gva, &mut buf);
            let _ = copy_to_guest(&p, &mut ram, gva, &buf);
        }

        #[test]
        fn wrapping_ram_deep_walks_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 8..0x2000),
            p in regs_strategy(),
            gva in any::<u64>(),
            access in access_strategy(),
            len in 0usize..0x2100,
        ) {
            // Every address is RAM, so walks go as deep as the random entries allow.
            let mut ram = Ram { bytes, wrap: true };
            let r = translate(&p, &ram, gva, access);
            if let Ok(gpa) = r {
                prop_assert_eq!(gpa & 0xfff, gva & 0xfff);
            }
            let mut buf = vec![0u8; len];
            let _ = copy_from_guest(&p, &ram, gva, &mut buf);
            let _ = copy_to_guest(&p, &mut ram, gva, &buf);
        }
    }
}
