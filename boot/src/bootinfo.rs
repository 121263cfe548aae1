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
