//! What the boot loader told us, whichever protocol it used: the memory map, the boot
//! modules, the command line and where the ACPI RSDP is.
//!
//! Parsed before the heap exists, into fixed-size arrays.

use abi::start_info::{HvmMemmapEntry, HvmModlistEntry, HvmStartInfo, HVM_START_MAGIC};

/// Multiboot2's boot magic in eax.
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;

/// A physical memory range and its E820 type.
#[derive(Clone, Copy, Debug, Default)]
pub struct Region {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

/// A boot module.
#[derive(Clone, Copy, Debug, Default)]
pub struct Module {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Most memory-map entries kept.
pub const MAX_REGIONS: usize = 128;
/// Most modules kept.
pub const MAX_MODULES: usize = 16;

/// Boot information, protocol-neutral.
pub struct BootInfo {
    /// "PVH" or "multiboot2".
    pub protocol: &'static str,
    /// Memory map.
    pub regions: [Region; MAX_REGIONS],
    /// Entries used in `regions`.
    pub nregions: usize,
    /// Modules.
    pub modules: [Module; MAX_MODULES],
    /// Entries used in `modules`.
    pub nmodules: usize,
    /// Command line (physical address and length; lives in loader memory).
    pub cmdline: (u64, u64),
    /// RSDP physical address, if the loader gave one.
    pub rsdp: Option<u64>,
    /// Physical range of the boot information itself (to keep it from the allocator).
    pub info_range: (u64, u64),
}

impl BootInfo {
    /// The memory map.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.nregions]
    }
    /// The modules.
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.nmodules]
    }
    /// The command line.
    pub fn cmdline(&self) -> &'static str {
        let (pa, len) = self.cmdline;
        if pa == 0 {
            return "";
        }
        // SAFETY: the loader placed a NUL-terminated string of this length at pa; the
        // frame allocator keeps it reserved for the image's lifetime.
        let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, len as usize) };
        core::str::from_utf8(bytes).unwrap_or("")
    }
}

/// Why boot information could not be read.
pub enum BootInfoError {
    /// Neither the multiboot2 magic nor a PVH start_info.
    UnknownProtocol { eax: u32, ebx: u32 },
    /// The multiboot2 structure did not parse.
    Multiboot2,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootInfoError::UnknownProtocol { eax, ebx } => write!(
                f,
                "eax {eax:#x} is not the multiboot2 magic and ebx {ebx:#x} holds no PVH start_info"
            ),
            BootInfoError::Multiboot2 => {
                write!(f, "the multiboot2 information structure is malformed")
            }
        }
    }
}

fn c_strlen(pa: u64, max: u64) -> u64 {
    let mut n = 0;
    // SAFETY: the loader's command line lies in RAM below 4 GiB (identity-mapped);
    // reading stops at the NUL or after `max` bytes.
    while n < max && unsafe { ((pa + n) as *const u8).read_volatile() } != 0 {
        n += 1;
    }
    n
}

/// Multiboot2 tag types of the EFI information.
const TAG_EFI64_SYSTEM_TABLE: u32 = 12;
const TAG_EFI_MMAP: u32 = 17;

/// E820 type for an EFI memory type: memory free once boot services have exited is RAM
/// (1), ACPI reclaimable (3) and NVS (4) keep theirs, the rest is reserved (2).
fn e820_of_efi(t: u32) -> u32 {
    match t {
        1..=4 | 7 => 1, // loader code/data, boot services code/data, conventional
        9 => 3,
        10 => 4,
        _ => 2,
    }
}

/// Fills the memory map and the RSDP from the multiboot2 EFI tags when the standard
/// tags did not give them (`mbi`: the whole information structure).
fn efi_fallback(bi: &mut BootInfo, mbi: &[u8]) {
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
    };
    let mut at = 8;
    while let (Some(typ), Some(size)) = (u32_at(mbi, at), u32_at(mbi, at + 4)) {
        let size = size as usize;
        if typ == 0 || size < 8 || at + size > mbi.len() {
            break;
        }
        let tag = &mbi[at..at + size];
        if typ == TAG_EFI_MMAP && bi.nregions == 0 {
            let stride = u32_at(tag, 8).unwrap_or(0) as usize;
            let mut d = 16;
            while stride >= 32 && d + stride <= tag.len() && bi.nregions < MAX_REGIONS {
                let (Some(t), Some(start), Some(pages)) =
                    (u32_at(tag, d), u64_at(tag, d + 8), u64_at(tag, d + 24))
                else {
                    break;
                };
                bi.regions[bi.nregions] = Region {
                    start,
                    end: start.saturating_add(pages.saturating_mul(4096)),
                    kind: e820_of_efi(t),
                };
                bi.nregions += 1;
                d += stride;
            }
        }
        if typ == TAG_EFI64_SYSTEM_TABLE && bi.rsdp.is_none() {
            if let Some(st) = u64_at(tag, 8) {
                bi.rsdp = rsdp_from_efi_system_table(st);
            }
        }
        at += size.next_multiple_of(8);
    }
}

/// The RSDP from the EFI system table's configuration table (ACPI 2.0 entry, else 1.0).
fn rsdp_from_efi_system_table(st: u64) -> Option<u64> {
    const ACPI20: [u8; 16] = [
        0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88,
        0x81,
    ];
    const ACPI10: [u8; 16] = [
        0x30, 0x2d, 0x9d, 0xeb, 0x88, 0x2d, 0xd3, 0x11, 0x9a, 0x16, 0x00, 0x90, 0x27, 0x3f, 0xc1,
        0x4d,
    ];
    if st == 0 || st >= 1 << 32 {
        return None; // only the identity-mapped first 4 GiB is reachable this early
    }
    // SAFETY: the firmware's system table stays in runtime memory below 4 GiB (checked)
    // after boot services exited; its header is read once, by value.
    let (n, table) = unsafe {
        (
            ((st + 104) as *const u64).read_unaligned(),
            ((st + 112) as *const u64).read_unaligned(),
        )
    };
    if table == 0 || table >= 1 << 32 || n > 256 {
        return None;
    }
    let mut found = None;
    for i in 0..n {
        let e = table + i * 24;
        // SAFETY: the configuration table has `n` 24-byte entries (GUID, pointer) in
        // firmware memory below 4 GiB.
        let (guid, ptr) = unsafe {
            (
                (e as *const [u8; 16]).read_unaligned(),
                ((e + 16) as *const u64).read_unaligned(),
            )
        };
        if guid == ACPI20 {
            return Some(ptr);
        }
        if guid == ACPI10 {
            found = Some(ptr);
        }
    }
    found
}

/// Parses the boot information the entry code received.
pub fn parse(eax: u32, ebx: u32) -> Result<BootInfo, BootInfoError> {
    let mut bi = BootInfo {
        protocol: "",
        regions: [Region::default(); MAX_REGIONS],
        nregions: 0,
        modules: [Module::default(); MAX_MODULES],
        nmodules: 0,
        cmdline: (0, 0),
        rsdp: None,
        info_range: (0, 0),
    };
    if eax == MULTIBOOT2_MAGIC {
        // SAFETY: GRUB passes a valid, 8-aligned multiboot2 information structure in ebx.
        let mbi = unsafe {
            multiboot2::BootInformation::load(
                ebx as usize as *const multiboot2::BootInformationHeader,
            )
        }
        .map_err(|_| BootInfoError::Multiboot2)?;
        bi.protocol = "multiboot2";
        bi.info_range = (mbi.start_address() as u64, mbi.end_address() as u64);
        if let Some(mm) = mbi.memory_map_tag() {
            for a in mm.memory_areas().iter().take(MAX_REGIONS) {
                bi.regions[bi.nregions] = Region {
                    start: a.start_address(),
                    end: a.end_address(),
                    kind: u32::from(a.typ()),
                };
                bi.nregions += 1;
            }
        }
        for m in mbi.module_tags().take(MAX_MODULES) {
            bi.modules[bi.nmodules] = Module {
                start: u64::from(m.start_address()),
                len: u64::from(m.module_size()),
            };
            bi.nmodules += 1;
        }
        if let Some(c) = mbi.command_line_tag() {
            if let Ok(s) = c.cmdline() {
                bi.cmdline = (s.as_ptr() as u64, s.len() as u64);
            }
        }
        // The RSDP tags hold a copy of the RSDP right after their 8-byte tag header.
        if let Some(t) = mbi.rsdp_v2_tag() {
            bi.rsdp = Some(t as *const _ as *const u8 as u64 + 8);
        } else if let Some(t) = mbi.rsdp_v1_tag() {
            bi.rsdp = Some(t as *const _ as *const u8 as u64 + 8);
        }
        // Under UEFI a loader may give only the EFI tags: the EFI memory map, and the
        // EFI system table whose configuration table points at the RSDP.
        if bi.nregions == 0 || bi.rsdp.is_none() {
            // SAFETY: the structure was validated by the crate above; it spans
            // info_range and stays reserved while this reads it.
            let raw = unsafe {
                core::slice::from_raw_parts(
                    bi.info_range.0 as *const u8,
                    (bi.info_range.1 - bi.info_range.0) as usize,
                )
            };
            efi_fallback(&mut bi, raw);
        }
        return Ok(bi);
    }
    // SAFETY: PVH loaders pass the physical address of hvm_start_info in ebx; the
    // magic check below rejects anything else before other fields are trusted. The
    // struct is read once, by value.
    let si: HvmStartInfo = unsafe { (ebx as usize as *const HvmStartInfo).read_unaligned() };
    if ebx == 0 || si.magic != HVM_START_MAGIC {
        return Err(BootInfoError::UnknownProtocol { eax, ebx });
    }
    bi.protocol = "PVH";
    bi.info_range = (u64::from(ebx), u64::from(ebx) + 56);
    if si.version >= 1 && si.memmap_paddr != 0 {
        for i in 0..(si.memmap_entries as usize).min(MAX_REGIONS) {
            // SAFETY: the loader's memory map array lies in RAM below 4 GiB.
            let e: HvmMemmapEntry = unsafe {
                ((si.memmap_paddr as usize + i * 24) as *const HvmMemmapEntry).read_unaligned()
            };
            bi.regions[bi.nregions] = Region {
                start: e.addr,
                end: e.addr + e.size,
                kind: e.type_,
            };
            bi.nregions += 1;
        }
    }
    for i in 0..(si.nr_modules as usize).min(MAX_MODULES) {
        // SAFETY: the loader's module list lies in RAM below 4 GiB.
        let m: HvmModlistEntry = unsafe {
            ((si.modlist_paddr as usize + i * 32) as *const HvmModlistEntry).read_unaligned()
        };
        bi.modules[bi.nmodules] = Module {
            start: m.paddr,
            len: m.size,
        };
        bi.nmodules += 1;
    }
    if si.cmdline_paddr != 0 {
        bi.cmdline = (si.cmdline_paddr, c_strlen(si.cmdline_paddr, 4096));
    }
    if si.rsdp_paddr != 0 {
        bi.rsdp = Some(si.rsdp_paddr);
    }
    Ok(bi)
}
