//! `struct hvm_start_info` and friends (`arch-x86/hvm/start_info.h`), handed to a PVH
//! kernel in `ebx`. All addresses are guest-physical.

/// `XEN_HVM_START_MAGIC_VALUE`
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// `struct hvm_start_info` (version 1: with the memory map fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct HvmStartInfo {
    /// [`HVM_START_MAGIC`]
    pub magic: u32,
    /// 0 or 1; 1 adds `memmap_paddr`/`memmap_entries`.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of [`HvmModlistEntry`] at `modlist_paddr`.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Physical address of the RSDP, or 0.
    pub rsdp_paddr: u64,
    /// Physical address of the [`HvmMemmapEntry`] table (version >= 1).
    pub memmap_paddr: u64,
    /// Number of memory map entries (version >= 1).
    pub memmap_entries: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct hvm_modlist_entry`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct HvmModlistEntry {
    /// Physical address of the module.
    pub paddr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Physical address of the module's command line, or 0.
    pub cmdline_paddr: u64,
    /// Must be zero.
    pub reserved: u64,
}

/// `struct hvm_memmap_table_entry`: an E820 entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct HvmMemmapEntry {
    /// Base physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// `XEN_HVM_MEMMAP_TYPE_*` (E820 numbering).
    pub type_: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// E820 usable RAM.
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// E820 reserved.
pub const MEMMAP_TYPE_RESERVED: u32 = 2;
/// E820 ACPI reclaimable.
pub const MEMMAP_TYPE_ACPI: u32 = 3;
/// E820 ACPI NVS.
pub const MEMMAP_TYPE_NVS: u32 = 4;

const _: () = assert!(core::mem::size_of::<HvmStartInfo>() == 56);
const _: () = assert!(core::mem::size_of::<HvmModlistEntry>() == 32);
const _: () = assert!(core::mem::size_of::<HvmMemmapEntry>() == 24);
