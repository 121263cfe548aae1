//! One page-table walker for the four radix-tree formats the hypervisor builds:
//! host x86-64 paging ([`X86`]), AMD nested paging ([`Npt`]), Intel EPT ([`Ept`]) and
//! VT-d second-level tables ([`VtdSl`]).
//!
//! All four are 512-entry, 8-byte-entry trees indexed by 9 bits of the address per
//! level, with 4 KiB leaves at level 1 and optional 2 MiB / 1 GiB leaves at levels 2
//! and 3. Only the entry encodings differ; they live behind [`EntryFormat`]. Physical
//! memory holding the tables is reached through [`PhysMem`], so the same code runs on
//! the host (tests) and on bare metal.
//!
//! A format is a value: [`X86`], [`Npt`] and [`Ept`] are unit structs, while [`VtdSl`]
//! carries what the remapping unit supports (large pages from CAP.SLLPS, the snoop bit
//! from ECAP.SC), so one walker builds exactly the entries a given unit accepts.
//!
//! The walker never flushes TLBs or IOTLBs: after `unmap` (or any permission change)
//! the caller invalidates whatever caches the format has.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use core::fmt;

/// Access to the physical memory that holds page tables.
pub trait PhysMem {
    /// Reads the 8-byte entry at physical address `pa` (8-byte aligned).
    fn read(&self, pa: u64) -> u64;
    /// Writes the 8-byte entry at physical address `pa` (8-byte aligned).
    fn write(&mut self, pa: u64, value: u64);
    /// Allocates a zeroed, 4 KiB-aligned frame for a table; `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Returns a frame obtained from [`PhysMem::alloc_table`].
    fn free_table(&mut self, pa: u64);
}

/// Access rights of a mapping.
///
/// Not every format can express every combination; [`EntryFormat::normalize`] says
/// what a format actually stores (and therefore what [`PageTable::translate`] reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub exec: bool,
    /// User-mode (CPL 3) accesses allowed (x86 paging only).
    pub user: bool,
}

impl Perms {
    /// Read, write and execute, supervisor only.
    pub const RWX: Perms = Perms {
        read: true,
        write: true,
        exec: true,
        user: false,
    };
    /// Read and write, no execute, supervisor only.
    pub const RW: Perms = Perms {
        read: true,
        write: true,
        exec: false,
        user: false,
    };
    /// Read and execute, supervisor only.
    pub const RX: Perms = Perms {
        read: true,
        write: false,
        exec: true,
        user: false,
    };
    /// Read only, supervisor only.
    pub const R: Perms = Perms {
        read: true,
        write: false,
        exec: false,
        user: false,
    };
    /// Every right.
    pub const ALL: Perms = Perms {
        read: true,
        write: true,
        exec: true,
        user: true,
    };

    /// The same rights, also for user mode.
    pub const fn with_user(self) -> Perms {
        Perms { user: true, ..self }
    }

    /// Rights granted by both `self` and `other` (what a walk through both yields).
    pub const fn and(self, other: Perms) -> Perms {
        Perms {
            read: self.read && other.read,
            write: self.write && other.write,
            exec: self.exec && other.exec,
            user: self.user && other.user,
        }
    }
}

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a level-1 leaf.
    Size4K,
    /// 2 MiB, a level-2 leaf.
    Size2M,
    /// 1 GiB, a level-3 leaf.
    Size1G,
}

impl PageSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// The table level whose entries map pages of this size (1, 2 or 3).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The page size mapped by a leaf at `level`, if leaves can exist there.
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// Largest first.
    const DESCENDING: [PageSize; 3] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K];
}

/// Bits 12..51 of an entry: the address of the next table or of the mapped frame.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Physical addresses are limited to 52 bits by every format.
pub const MAX_PHYS: u64 = 1 << 52;

/// The encoding of one page-table format.
///
/// Levels are numbered from 1 (4 KiB leaves) up to the root level. Methods take
/// `&self` so that a format can depend on what the hardware supports ([`VtdSl`]).
pub trait EntryFormat: Copy {
    /// A short name for messages.
    const NAME: &'static str;
    /// Whether virtual (input) addresses must be canonical (sign-extended from the top
    /// bit of the table's width) rather than simply below `2^width`.
    const CANONICAL: bool = false;

    /// Whether a table with `levels` levels is valid in this format.
    fn levels_supported(&self, levels: u8) -> bool;
    /// Whether the entry is present (maps or points at something).
    fn is_present(&self, entry: u64) -> bool;
    /// Whether a present entry at `level` is a leaf (always at level 1; at levels 2
    /// and 3 when its large-page bit is set; never above).
    fn is_leaf(&self, entry: u64, level: u8) -> bool;
    /// The address in the entry (bits 12..51); for a large leaf the caller masks it to
    /// the page size.
    fn address(&self, entry: u64) -> u64 {
        entry & ADDR_MASK
    }
    /// A non-leaf entry pointing at the table at `table`.
    fn table_entry(&self, table: u64) -> u64;
    /// A leaf mapping `pa` with a page of `size` and rights `perms` (already
    /// normalized).
    fn leaf_entry(&self, pa: u64, size: PageSize, perms: Perms) -> u64;
    /// The rights a present entry grants (table entries too: a walk ANDs them).
    fn perms(&self, entry: u64) -> Perms;
    /// Whether leaves of `size` may be built (4 KiB is always allowed).
    fn large_page_allowed(&self, size: PageSize) -> bool;
    /// The rights this format actually stores for a request of `perms`, or `None`
    /// when they would not make a present entry.
    fn normalize(&self, perms: Perms) -> Option<Perms>;
}

/// What an entry means, decoded without a [`PageTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Nothing there.
    NotPresent,
    /// Points at the next-level table at `addr`.
    Table {
        /// Physical address of the next table.
        addr: u64,
        /// Rights this entry contributes to the walk.
        perms: Perms,
    },
    /// Maps the frame at `addr` (aligned to `size`).
    Leaf {
        /// Physical address of the mapped page.
        addr: u64,
        /// Page size.
        size: PageSize,
        /// Rights of this entry.
        perms: Perms,
    },
}

/// Decodes `entry` found at `level` (1..=5) of a table in format `F`.
///
/// Out-of-range levels decode as [`Decoded::NotPresent`].
pub fn decode<F: EntryFormat>(format: &F, entry: u64, level: u8) -> Decoded {
    if level == 0 || level > 5 || !format.is_present(entry) {
        return Decoded::NotPresent;
    }
    let perms = format.perms(entry);
    if format.is_leaf(entry, level) {
        if let Some(size) = PageSize::from_level(level) {
            return Decoded::Leaf {
                addr: format.address(entry) & !(size.bytes() - 1),
                size,
                perms,
            };
        }
    }
    Decoded::Table {
        addr: format.address(entry),
        perms,
    }
}

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

fn x86_is_leaf(entry: u64, level: u8) -> bool {
    level == 1 || ((level == 2 || level == 3) && entry & PS != 0)
}

fn x86_leaf(pa: u64, size: PageSize, perms: Perms) -> u64 {
    let mut e = (pa & ADDR_MASK) | P;
    if perms.write {
        e |= RW;
    }
    if perms.user {
        e |= US;
    }
    if size != PageSize::Size4K {
        e |= PS;
    }
    if !perms.exec {
        e |= NX;
    }
    e
}

fn x86_perms(entry: u64) -> Perms {
    Perms {
        read: true,
        write: entry & RW != 0,
        exec: entry & NX == 0,
        user: entry & US != 0,
    }
}

/// Host x86-64 paging (4- or 5-level; canonical addresses). Table entries are
/// `P|RW|US`; rights are enforced at the leaves; `exec == false` sets NX. Every present
/// entry is readable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86;

impl EntryFormat for X86 {
    const NAME: &'static str = "x86-64";
    const CANONICAL: bool = true;

    fn levels_supported(&self, levels: u8) -> bool {
        levels == 4 || levels == 5
    }
    fn is_present(&self, entry: u64) -> bool {
        entry & P != 0
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        x86_is_leaf(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDR_MASK) | P | RW | US
    }
    fn leaf_entry(&self, pa: u64, size: PageSize, perms: Perms) -> u64 {
        x86_leaf(pa, size, perms)
    }
    fn perms(&self, entry: u64) -> Perms {
        x86_perms(entry)
    }
    fn large_page_allowed(&self, _size: PageSize) -> bool {
        true
    }
    fn normalize(&self, perms: Perms) -> Option<Perms> {
        Some(Perms {
            read: true,
            ..perms
        })
    }
}

/// AMD nested page tables: the x86-64 encoding, except that nested walks are user
/// accesses, so US is set in every entry (tables `P|RW|US` = 0x7, leaves too);
/// translations therefore always report `user: true`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt;

impl EntryFormat for Npt {
    const NAME: &'static str = "NPT";

    fn levels_supported(&self, levels: u8) -> bool {
        levels == 4 || levels == 5
    }
    fn is_present(&self, entry: u64) -> bool {
        entry & P != 0
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        x86_is_leaf(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDR_MASK) | P | RW | US
    }
    fn leaf_entry(&self, pa: u64, size: PageSize, perms: Perms) -> u64 {
        x86_leaf(pa, size, perms.with_user())
    }
    fn perms(&self, entry: u64) -> Perms {
        x86_perms(entry)
    }
    fn large_page_allowed(&self, _size: PageSize) -> bool {
        true
    }
    fn normalize(&self, perms: Perms) -> Option<Perms> {
        Some(Perms {
            read: true,
            user: true,
            ..perms
        })
    }
}

const EPT_R: u64 = 1;
const EPT_W: u64 = 1 << 1;
const EPT_X: u64 = 1 << 2;
const EPT_RWX: u64 = EPT_R | EPT_W | EPT_X;
/// EPT memory type write-back in leaf bits 3..5.
const EPT_MT_WB: u64 = 6 << 3;

/// Intel EPT: R=1, W=2, X=4 (non-leaf entries R|W|X), leaves write-back (6 << 3),
/// bit 7 for large leaves; present = any of R/W/X. There is no user bit; write
/// without read is a misconfiguration, so a write request also grants read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

impl EntryFormat for Ept {
    const NAME: &'static str = "EPT";

    fn levels_supported(&self, levels: u8) -> bool {
        levels == 4 || levels == 5
    }
    fn is_present(&self, entry: u64) -> bool {
        entry & EPT_RWX != 0
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        x86_is_leaf(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDR_MASK) | EPT_RWX
    }
    fn leaf_entry(&self, pa: u64, size: PageSize, perms: Perms) -> u64 {
        let mut e = (pa & ADDR_MASK) | EPT_MT_WB;
        if perms.read {
            e |= EPT_R;
        }
        if perms.write {
            e |= EPT_W;
        }
        if perms.exec {
            e |= EPT_X;
        }
        if size != PageSize::Size4K {
            e |= PS;
        }
        e
    }
    fn perms(&self, entry: u64) -> Perms {
        Perms {
            read: entry & EPT_R != 0,
            write: entry & EPT_W != 0,
            exec: entry & EPT_X != 0,
            user: false,
        }
    }
    fn large_page_allowed(&self, _size: PageSize) -> bool {
        true
    }
    fn normalize(&self, perms: Perms) -> Option<Perms> {
        let p = Perms {
            read: perms.read || perms.write,
            user: false,
            ..perms
        };
        (p.read || p.exec).then_some(p)
    }
}

const SL_R: u64 = 1;
const SL_W: u64 = 1 << 1;
/// SNP (snoop) in second-level leaves: reserved unless ECAP.SC.
pub const VTD_SL_SNP: u64 = 1 << 11;

/// VT-d second-level tables (3-level = 39-bit, 4-level = 48-bit, 5-level = 57-bit
/// address width) in legacy mode.
///
/// Encoding: R=1, W=2; non-leaf entries always R|W (a walk ANDs the rights, so a
/// table entry must not restrict them); bit 7 (PS) only in 2 MiB (level 2) and 1 GiB
/// (level 3) leaves, and only when the unit reports those sizes in CAP.SLLPS (bit 7
/// is reserved at levels 4 and 5 and never written there); SNP (bit 11) only in
/// leaves and only when `snoop` is set, which the caller does only with ECAP.SC.
/// Execute and user rights do not exist and are dropped. Write-only leaves are valid.
///
/// [`Default`] is the most restrictive unit: 4 KiB pages only, no snoop bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtdSl {
    /// 2 MiB leaves allowed (CAP.SLLPS bit 0, i.e. CAP bit 34).
    pub pages_2m: bool,
    /// 1 GiB leaves allowed (CAP.SLLPS bit 1, i.e. CAP bit 35).
    pub pages_1g: bool,
    /// Set SNP (bit 11) in leaves (only with ECAP.SC).
    pub snoop: bool,
}

impl VtdSl {
    /// 4 KiB pages only, no snoop bit (what every unit accepts).
    pub const BASIC: VtdSl = VtdSl {
        pages_2m: false,
        pages_1g: false,
        snoop: false,
    };
    /// 2 MiB and 1 GiB pages, no snoop bit (QEMU's default unit).
    pub const LARGE: VtdSl = VtdSl {
        pages_2m: true,
        pages_1g: true,
        snoop: false,
    };

    /// The format a unit with CAP.SLLPS = `sllps` (CAP bits 34..37, already shifted
    /// down) and ECAP.SC = `snoop_control` accepts. `force_snoop` asks for SNP in
    /// every leaf; it is ignored without snoop control.
    pub const fn from_caps(sllps: u8, snoop_control: bool, force_snoop: bool) -> VtdSl {
        VtdSl {
            pages_2m: sllps & 1 != 0,
            pages_1g: sllps & 2 != 0,
            snoop: snoop_control && force_snoop,
        }
    }
}

impl EntryFormat for VtdSl {
    const NAME: &'static str = "VT-d second-level";

    fn levels_supported(&self, levels: u8) -> bool {
        (3..=5).contains(&levels)
    }
    fn is_present(&self, entry: u64) -> bool {
        entry & (SL_R | SL_W) != 0
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        x86_is_leaf(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDR_MASK) | SL_R | SL_W
    }
    fn leaf_entry(&self, pa: u64, size: PageSize, perms: Perms) -> u64 {
        let mut e = pa & ADDR_MASK;
        if perms.read {
            e |= SL_R;
        }
        if perms.write {
            e |= SL_W;
        }
        if size != PageSize::Size4K {
            e |= PS;
        }
        if self.snoop {
            e |= VTD_SL_SNP;
        }
        e
    }
    fn perms(&self, entry: u64) -> Perms {
        Perms {
            read: entry & SL_R != 0,
            write: entry & SL_W != 0,
            exec: false,
            user: false,
        }
    }
    fn large_page_allowed(&self, size: PageSize) -> bool {
        match size {
            PageSize::Size4K => true,
            PageSize::Size2M => self.pages_2m,
            PageSize::Size1G => self.pages_1g,
        }
    }
    fn normalize(&self, perms: Perms) -> Option<Perms> {
        let p = Perms {
            exec: false,
            user: false,
            ..perms
        };
        (p.read || p.write).then_some(p)
    }
}

/// Why a page-table operation failed. A failed operation leaves the table as it was
/// (frames it allocated are returned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An address or length is not aligned to the page size.
    Misaligned,
    /// Something is already mapped in the range.
    AlreadyMapped,
    /// Nothing is mapped there with that page size.
    NotMapped,
    /// No frame for a new table.
    OutOfMemory,
    /// The virtual address is beyond the table's width, or the physical one beyond
    /// 52 bits.
    OutOfRange,
    /// The format does not allow leaves of this size.
    LargePageUnsupported,
    /// The requested rights cannot make a present entry in this format (e.g. no
    /// read and no write for VT-d).
    NoAccess,
    /// The table's level count is not valid for its format.
    UnsupportedLevels,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapError::Misaligned => "address or length not aligned to the page size",
            MapError::AlreadyMapped => "range already mapped",
            MapError::NotMapped => "nothing mapped there with that page size",
            MapError::OutOfMemory => "out of memory for page tables",
            MapError::OutOfRange => "address beyond the page table's range",
            MapError::LargePageUnsupported => "page size not supported by this format",
            MapError::NoAccess => "requested rights cannot be expressed by this format",
            MapError::UnsupportedLevels => "unsupported number of page-table levels",
        })
    }
}

const ENTRIES: u64 = 512;
const MAX_LEVELS: usize = 5;

fn index(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (u32::from(level) - 1))) & (ENTRIES - 1)
}

fn slot(table: u64, va: u64, level: u8) -> u64 {
    table + index(va, level) * 8
}

fn table_is_empty<F: EntryFormat>(format: &F, mem: &impl PhysMem, table: u64) -> bool {
    (0..ENTRIES).all(|i| !format.is_present(mem.read(table + i * 8)))
}

/// A page table in format `F`, identified by its root frame. The table does not own
/// the memory: pass the same [`PhysMem`] to every call.
pub struct PageTable<F: EntryFormat> {
    root: u64,
    levels: u8,
    fmt: F,
}

impl<F: EntryFormat + fmt::Debug> fmt::Debug for PageTable<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &F::NAME)
            .field("options", &self.fmt)
            .field("root", &format_args!("{:#x}", self.root))
            .field("levels", &self.levels)
            .finish()
    }
}

impl<F: EntryFormat + Default> PageTable<F> {
    /// A new, empty table with `levels` levels (4 for X86/Npt/Ept; 3 or 4 for VtdSl;
    /// 5 where the format has it), in the format's default variant.
    pub fn new(mem: &mut impl PhysMem, levels: u8) -> Result<Self, MapError> {
        Self::with_format(mem, F::default(), levels)
    }

    /// Adopts an existing table whose root frame is at `root` (bits below 12, such as
    /// CR3 or EPTP flags, are ignored). With a level count the format does not
    /// support, every operation fails ([`MapError::UnsupportedLevels`], or `None`).
    pub fn from_root(root: u64, levels: u8) -> Self {
        Self::from_root_with(F::default(), root, levels)
    }
}

impl<F: EntryFormat> PageTable<F> {
    /// A new, empty table in the format variant `format` (e.g. a [`VtdSl`] built from
    /// a unit's capabilities).
    pub fn with_format(mem: &mut impl PhysMem, format: F, levels: u8) -> Result<Self, MapError> {
        if !format.levels_supported(levels) {
            return Err(MapError::UnsupportedLevels);
        }
        let root = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        Ok(PageTable {
            root: root & ADDR_MASK,
            levels,
            fmt: format,
        })
    }

    /// [`PageTable::from_root`] with an explicit format variant.
    pub fn from_root_with(format: F, root: u64, levels: u8) -> Self {
        PageTable {
            root: root & ADDR_MASK,
            levels,
            fmt: format,
        }
    }

    /// The format variant entries are built with.
    pub fn format(&self) -> F {
        self.fmt
    }

    /// The largest leaf size this table can hold (limited by the format and by the
    /// level count).
    pub fn max_page_size(&self) -> PageSize {
        for size in PageSize::DESCENDING {
            if size.level() <= self.levels
                && (size == PageSize::Size4K || self.fmt.large_page_allowed(size))
            {
                return size;
            }
        }
        PageSize::Size4K
    }

    /// Bits of input address the table translates (`12 + 9 * levels`).
    pub fn address_width(&self) -> u32 {
        self.width()
    }

    /// Physical address of the root frame.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of levels.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Bits of input address the table translates.
    fn width(&self) -> u32 {
        12 + 9 * u32::from(self.levels)
    }

    fn va_ok(&self, va: u64) -> bool {
        let width = self.width();
        if width >= 64 {
            return true;
        }
        if F::CANONICAL {
            let top = (va as i64) >> (width - 1);
            top == 0 || top == -1
        } else {
            va >> width == 0
        }
    }

    fn check_levels(&self) -> Result<(), MapError> {
        if self.fmt.levels_supported(self.levels) && usize::from(self.levels) <= MAX_LEVELS {
            Ok(())
        } else {
            Err(MapError::UnsupportedLevels)
        }
    }

    fn size_ok(&self, size: PageSize) -> Result<(), MapError> {
        if size != PageSize::Size4K && !self.fmt.large_page_allowed(size) {
            return Err(MapError::LargePageUnsupported);
        }
        if size.level() > self.levels {
            return Err(MapError::LargePageUnsupported);
        }
        Ok(())
    }

    /// Maps the page of `size` at `va` to `pa`. Both must be aligned to `size`; the
    /// whole page must be unmapped (else [`MapError::AlreadyMapped`]).
    pub fn map(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        pa: u64,
        size: PageSize,
        perms: Perms,
    ) -> Result<(), MapError> {
        self.check_levels()?;
        self.size_ok(size)?;
        let mask = size.bytes() - 1;
        if va & mask != 0 || pa & mask != 0 {
            return Err(MapError::Misaligned);
        }
        if !self.va_ok(va)
            || pa
                .checked_add(size.bytes())
                .is_none_or(|end| end > MAX_PHYS)
        {
            return Err(MapError::OutOfRange);
        }
        let perms = self.fmt.normalize(perms).ok_or(MapError::NoAccess)?;
        let target = size.level();

        // Tables created by this call, to undo on failure: (slot in parent, table).
        let mut created = [(0u64, 0u64); MAX_LEVELS];
        let mut n_created = 0;
        let mut table = self.root;
        let mut level = self.levels;
        while level > target {
            let s = slot(table, va, level);
            let e = mem.read(s);
            if !self.fmt.is_present(e) {
                let Some(new) = mem.alloc_table() else {
                    Self::undo_created(mem, &created[..n_created]);
                    return Err(MapError::OutOfMemory);
                };
                let new = new & ADDR_MASK;
                mem.write(s, self.fmt.table_entry(new));
                created[n_created] = (s, new);
                n_created += 1;
                table = new;
            } else if self.fmt.is_leaf(e, level) {
                // A larger page already covers it (tables we created are empty, so
                // this happens only before any creation).
                Self::undo_created(mem, &created[..n_created]);
                return Err(MapError::AlreadyMapped);
            } else {
                table = self.fmt.address(e);
            }
            level -= 1;
        }
        let s = slot(table, va, target);
        let e = mem.read(s);
        if self.fmt.is_present(e) {
            if self.fmt.is_leaf(e, target) || !table_is_empty(&self.fmt, mem, self.fmt.address(e)) {
                return Err(MapError::AlreadyMapped);
            }
            // An empty subtable left behind (adopted tables): replace it.
            mem.free_table(self.fmt.address(e));
        }
        mem.write(s, self.fmt.leaf_entry(pa, size, perms));
        Ok(())
    }

    fn undo_created(mem: &mut impl PhysMem, created: &[(u64, u64)]) {
        for &(s, table) in created.iter().rev() {
            mem.write(s, 0);
            mem.free_table(table);
        }
    }

    fn pick_size(&self, va: u64, pa: u64, remaining: u64, max: PageSize) -> PageSize {
        for size in PageSize::DESCENDING {
            if size > max
                || (size != PageSize::Size4K && !self.fmt.large_page_allowed(size))
                || size.level() > self.levels
            {
                continue;
            }
            let mask = size.bytes() - 1;
            if (va | pa) & mask == 0 && remaining >= size.bytes() {
                return size;
            }
        }
        PageSize::Size4K
    }

    /// Maps `len` bytes at `va` to `pa` using the largest pages (up to `max`) that the
    /// alignment of both addresses and the remaining length allow. `va`, `pa` and
    /// `len` must be 4 KiB aligned. All or nothing: on error, whatever this call mapped
    /// is unmapped again.
    pub fn map_range(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        pa: u64,
        len: u64,
        perms: Perms,
        max: PageSize,
    ) -> Result<(), MapError> {
        self.check_levels()?;
        if (va | pa | len) & 0xfff != 0 {
            return Err(MapError::Misaligned);
        }
        if len == 0 {
            return Ok(());
        }
        let last_va = va.checked_add(len - 1).ok_or(MapError::OutOfRange)?;
        if pa.checked_add(len).is_none_or(|end| end > MAX_PHYS)
            || !self.va_ok(va)
            || !self.va_ok(last_va)
            || (va ^ last_va) >> (self.width() - 1) != 0
        {
            return Err(MapError::OutOfRange);
        }
        let mut done = 0;
        while done < len {
            let size = self.pick_size(va + done, pa + done, len - done, max);
            if let Err(e) = self.map(mem, va + done, pa + done, size, perms) {
                self.undo_range(mem, va, pa, done, max);
                return Err(e);
            }
            done += size.bytes();
        }
        Ok(())
    }

    /// Unmaps the first `len` bytes a `map_range(va, pa, .., max)` mapped (the page
    /// sizes are recomputed the same way).
    fn undo_range(&mut self, mem: &mut impl PhysMem, va: u64, pa: u64, len: u64, max: PageSize) {
        let mut done = 0;
        while done < len {
            let size = self.pick_size(va + done, pa + done, len - done, max);
            let _ = self.unmap(mem, va + done, size);
            done += size.bytes();
        }
    }

    /// Unmaps the page of `size` at `va` and returns the physical address it mapped.
    ///
    /// If `va` lies inside a larger leaf, that leaf is first split into pages of the
    /// next smaller sizes with the same rights. Tables left empty (except the root) are
    /// freed. A range mapped with smaller pages than `size` is [`MapError::NotMapped`].
    pub fn unmap(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        size: PageSize,
    ) -> Result<u64, MapError> {
        self.check_levels()?;
        self.size_ok(size)?;
        if va & (size.bytes() - 1) != 0 {
            return Err(MapError::Misaligned);
        }
        if !self.va_ok(va) {
            return Err(MapError::OutOfRange);
        }
        let target = size.level();
        // tables[d] is the table walked at depth d (tables[0] = root); slots[d] the
        // entry used in it.
        let mut tables = [0u64; MAX_LEVELS];
        let mut slots = [0u64; MAX_LEVELS];
        // Large leaves split by this call: (slot, old entry, new table).
        let mut splits = [(0u64, 0u64, 0u64); MAX_LEVELS];
        let mut n_splits = 0;
        let mut depth = 0;
        let mut table = self.root;
        let mut level = self.levels;
        let leaf = loop {
            let s = slot(table, va, level);
            tables[depth] = table;
            slots[depth] = s;
            let e = mem.read(s);
            let fail = !self.fmt.is_present(e) || (level == target && !self.fmt.is_leaf(e, level));
            if fail {
                Self::undo_splits(mem, &splits[..n_splits]);
                return Err(MapError::NotMapped);
            }
            if level == target {
                break e;
            }
            if self.fmt.is_leaf(e, level) {
                let (Some(big), Some(small)) =
                    (PageSize::from_level(level), PageSize::from_level(level - 1))
                else {
                    Self::undo_splits(mem, &splits[..n_splits]);
                    return Err(MapError::NotMapped);
                };
                if small != PageSize::Size4K && !self.fmt.large_page_allowed(small) {
                    Self::undo_splits(mem, &splits[..n_splits]);
                    return Err(MapError::LargePageUnsupported);
                }
                let Some(new) = mem.alloc_table() else {
                    Self::undo_splits(mem, &splits[..n_splits]);
                    return Err(MapError::OutOfMemory);
                };
                let new = new & ADDR_MASK;
                let base = self.fmt.address(e) & !(big.bytes() - 1);
                let perms = self.fmt.perms(e);
                for i in 0..ENTRIES {
                    let child = self.fmt.leaf_entry(base + i * small.bytes(), small, perms);
                    mem.write(new + i * 8, child);
                }
                mem.write(s, self.fmt.table_entry(new));
                splits[n_splits] = (s, e, new);
                n_splits += 1;
                table = new;
            } else {
                table = self.fmt.address(e);
            }
            level -= 1;
            depth += 1;
        };
        mem.write(slots[depth], 0);
        // Free tables that became empty, bottom-up; never the root.
        while depth > 0 && table_is_empty(&self.fmt, mem, tables[depth]) {
            mem.free_table(tables[depth]);
            mem.write(slots[depth - 1], 0);
            depth -= 1;
        }
        Ok(self.fmt.address(leaf) & !(size.bytes() - 1))
    }

    fn undo_splits(mem: &mut impl PhysMem, splits: &[(u64, u64, u64)]) {
        for &(s, old, table) in splits.iter().rev() {
            mem.write(s, old);
            mem.free_table(table);
        }
    }

    /// Translates `va`: the physical address, the rights (ANDed over the walk) and
    /// the size of the leaf that maps it; `None` if unmapped or out of range.
    pub fn translate(&self, mem: &impl PhysMem, va: u64) -> Option<(u64, Perms, PageSize)> {
        if self.check_levels().is_err() || !self.va_ok(va) {
            return None;
        }
        let mut table = self.root;
        let mut perms = Perms::ALL;
        for level in (1..=self.levels).rev() {
            let e = mem.read(slot(table, va, level));
            if !self.fmt.is_present(e) {
                return None;
            }
            perms = perms.and(self.fmt.perms(e));
            if self.fmt.is_leaf(e, level) {
                let size = PageSize::from_level(level)?;
                let mask = size.bytes() - 1;
                return Some(((self.fmt.address(e) & !mask) | (va & mask), perms, size));
            }
            table = self.fmt.address(e);
        }
        None
    }

    /// Calls `f(va, pa, size, perms)` for every leaf, in increasing `va` order (`va`
    /// as the table indexes it: not sign-extended for canonical formats). Rights are
    /// ANDed over the walk, as [`PageTable::translate`] reports them.
    pub fn for_each_leaf(&self, mem: &impl PhysMem, mut f: impl FnMut(u64, u64, PageSize, Perms)) {
        if self.check_levels().is_ok() {
            self.visit(mem, self.root, self.levels, 0, Perms::ALL, &mut f);
        }
    }

    fn visit(
        &self,
        mem: &impl PhysMem,
        table: u64,
        level: u8,
        base: u64,
        perms: Perms,
        f: &mut impl FnMut(u64, u64, PageSize, Perms),
    ) {
        let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
        for i in 0..ENTRIES {
            let e = mem.read(table + i * 8);
            if !self.fmt.is_present(e) {
                continue;
            }
            let va = base + i * span;
            let p = perms.and(self.fmt.perms(e));
            if self.fmt.is_leaf(e, level) {
                if let Some(size) = PageSize::from_level(level) {
                    f(va, self.fmt.address(e) & !(size.bytes() - 1), size, p);
                }
            } else if level > 1 {
                self.visit(mem, self.fmt.address(e), level - 1, va, p, f);
            }
        }
    }

    /// Frees every table frame (not the mapped pages), the root included.
    pub fn destroy(self, mem: &mut impl PhysMem) {
        if self.check_levels().is_ok() {
            self.free_tree(mem, self.root, self.levels);
        } else {
            mem.free_table(self.root);
        }
    }

    fn free_tree(&self, mem: &mut impl PhysMem, table: u64, level: u8) {
        if level > 1 {
            for i in 0..ENTRIES {
                let e = mem.read(table + i * 8);
                if self.fmt.is_present(e) && !self.fmt.is_leaf(e, level) {
                    self.free_tree(mem, self.fmt.address(e), level - 1);
                }
            }
        }
        mem.free_table(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    /// Tables in a HashMap of frames; counts live tables; optional allocation limit.
    #[derive(Default)]
    struct FakeMem {
        frames: HashMap<u64, Box<[u64; 512]>>,
        next: u64,
        limit: Option<usize>,
        allocs: usize,
        frees: usize,
    }

    impl FakeMem {
        fn new() -> Self {
            FakeMem {
                next: 0x10_0000,
                ..Default::default()
            }
        }
        fn live(&self) -> usize {
            self.frames.len()
        }
    }

    impl PhysMem for FakeMem {
        fn read(&self, pa: u64) -> u64 {
            assert_eq!(pa % 8, 0);
            self.frames
                .get(&(pa & !0xfff))
                .expect("read outside a table")[((pa & 0xfff) / 8) as usize]
        }
        fn write(&mut self, pa: u64, value: u64) {
            assert_eq!(pa % 8, 0);
            self.frames
                .get_mut(&(pa & !0xfff))
                .expect("write outside a table")[((pa & 0xfff) / 8) as usize] = value;
        }
        fn alloc_table(&mut self) -> Option<u64> {
            if self.limit.is_some_and(|l| self.frames.len() >= l) {
                return None;
            }
            let pa = self.next;
            self.next += 0x1000;
            self.frames.insert(pa, Box::new([0; 512]));
            self.allocs += 1;
            Some(pa)
        }
        fn free_table(&mut self, pa: u64) {
            self.frames
                .remove(&pa)
                .expect("double free or foreign frame");
            self.frees += 1;
        }
    }

    const K4: u64 = 1 << 12;
    const M2: u64 = 1 << 21;
    const G1: u64 = 1 << 30;
    const SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    fn roundtrip_all_sizes<F: EntryFormat>(fmt: F, levels: u8, perms: Perms) {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::with_format(&mut mem, fmt, levels).unwrap();
        let expect = fmt.normalize(perms).unwrap();
        for (i, size) in SIZES.into_iter().enumerate() {
            let va = (i as u64 + 1) * 4 * G1;
            let pa = (i as u64 + 3) * 2 * G1;
            pt.map(&mut mem, va, pa, size, perms).unwrap();
            let off = size.bytes() - 8;
            assert_eq!(pt.translate(&mem, va + off), Some((pa + off, expect, size)));
            assert_eq!(pt.translate(&mem, va), Some((pa, expect, size)));
            assert_eq!(pt.translate(&mem, va + size.bytes()), None);
            assert_eq!(
                pt.map(&mut mem, va, pa, size, perms),
                Err(MapError::AlreadyMapped)
            );
        }
        for (i, size) in SIZES.into_iter().enumerate() {
            let va = (i as u64 + 1) * 4 * G1;
            let pa = (i as u64 + 3) * 2 * G1;
            assert_eq!(pt.unmap(&mut mem, va, size), Ok(pa));
            assert_eq!(pt.translate(&mem, va), None);
            assert_eq!(pt.unmap(&mut mem, va, size), Err(MapError::NotMapped));
        }
        assert_eq!(mem.live(), 1, "only the root remains");
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn every_format_and_size() {
        for perms in [Perms::RWX, Perms::R, Perms::RW.with_user(), Perms::RX] {
            roundtrip_all_sizes(X86, 4, perms);
            roundtrip_all_sizes(Npt, 4, perms);
            roundtrip_all_sizes(Ept, 4, perms);
            roundtrip_all_sizes(VtdSl::LARGE, 4, perms);
            roundtrip_all_sizes(X86, 5, perms);
            roundtrip_all_sizes(Ept, 5, perms);
        }
        // VT-d 3-level: 39 bits, use low addresses.
        let mut mem = FakeMem::new();
        let mut pt = PageTable::with_format(&mut mem, VtdSl::LARGE, 3).unwrap();
        for (i, size) in SIZES.into_iter().enumerate() {
            let va = (i as u64 + 1) * 4 * G1;
            pt.map(&mut mem, va, va, size, Perms::RW).unwrap();
            assert_eq!(pt.translate(&mem, va + 4), Some((va + 4, Perms::RW, size)));
        }
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn x86_encoding() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<X86>::new(&mut mem, 4).unwrap();
        pt.map(&mut mem, 0, 0x20_0000, PageSize::Size2M, Perms::R)
            .unwrap();
        pt.map(
            &mut mem,
            0x4000_0000,
            0x5000,
            PageSize::Size4K,
            Perms::RWX.with_user(),
        )
        .unwrap();
        let pml4 = mem.read(pt.root());
        assert_eq!(pml4 & 0xfff, 0x7);
        let pdpt = pml4 & ADDR_MASK;
        let pd = mem.read(pdpt) & ADDR_MASK;
        assert_eq!(mem.read(pd), 0x20_0000 | P | PS | NX);
        let pd1 = mem.read(pdpt + 8);
        assert_eq!(pd1 & 0xfff, 0x7);
        let pt1 = mem.read(pd1 & ADDR_MASK) & ADDR_MASK;
        assert_eq!(mem.read(pt1), 0x5000 | P | RW | US);
        assert_eq!(
            decode(&X86, 0x20_0000 | P | PS | NX, 2),
            Decoded::Leaf {
                addr: 0x20_0000,
                size: PageSize::Size2M,
                perms: Perms::R
            }
        );
        assert_eq!(
            decode(&X86, 0x3000 | 7, 4),
            Decoded::Table {
                addr: 0x3000,
                perms: Perms::ALL
            }
        );
        assert_eq!(decode(&X86, 0x3000 | 6, 4), Decoded::NotPresent);
        // Large-page PAT bit (12) is masked off the address.
        assert_eq!(
            decode(&X86, 0x4000_1000 | P | PS, 3),
            Decoded::Leaf {
                addr: 0x4000_0000,
                size: PageSize::Size1G,
                perms: Perms::RX
            }
        );
        // PS at level 4 and at level 1 does not make a large leaf.
        assert!(matches!(
            decode(&X86, 0x3000 | P | PS, 4),
            Decoded::Table { .. }
        ));
        assert!(matches!(
            decode(&X86, 0x3000 | P | PS, 1),
            Decoded::Leaf {
                size: PageSize::Size4K,
                ..
            }
        ));
    }

    #[test]
    fn npt_sets_us_everywhere() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<Npt>::new(&mut mem, 4).unwrap();
        pt.map(&mut mem, 0x1000, 0x9000, PageSize::Size4K, Perms::RW)
            .unwrap();
        let mut table = pt.root();
        for level in (1..=4u8).rev() {
            let e = mem.read(table + index(0x1000, level) * 8);
            assert_ne!(e & US, 0, "level {level}");
            if level > 1 {
                assert_eq!(e & 0xfff, 0x7);
            }
            table = e & ADDR_MASK;
        }
        assert_eq!(
            pt.translate(&mem, 0x1000),
            Some((0x9000, Perms::RW.with_user(), PageSize::Size4K))
        );
    }

    #[test]
    fn ept_encoding() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<Ept>::new(&mut mem, 4).unwrap();
        pt.map(&mut mem, 0, 0x4000_0000, PageSize::Size1G, Perms::RX)
            .unwrap();
        pt.map(&mut mem, 0x4000_0000, 0x1000, PageSize::Size4K, Perms::RW)
            .unwrap();
        let pml4 = mem.read(pt.root());
        assert_eq!(pml4 & 0xfff, 7);
        let pdpt = pml4 & ADDR_MASK;
        assert_eq!(mem.read(pdpt), 0x4000_0000 | EPT_R | EPT_X | EPT_MT_WB | PS);
        let pd = mem.read(pdpt + 8) & ADDR_MASK;
        let ptab = mem.read(pd) & ADDR_MASK;
        assert_eq!(mem.read(ptab), 0x1000 | EPT_R | EPT_W | EPT_MT_WB);
        // Write-only requests become read-write; nothing at all is refused.
        let wo = Perms {
            read: false,
            write: true,
            exec: false,
            user: false,
        };
        pt.map(&mut mem, 0x4000_1000, 0x2000, PageSize::Size4K, wo)
            .unwrap();
        assert_eq!(pt.translate(&mem, 0x4000_1000).unwrap().1, Perms::RW);
        let none = Perms {
            read: false,
            write: false,
            exec: false,
            user: true,
        };
        assert_eq!(
            pt.map(&mut mem, 0x4000_2000, 0x2000, PageSize::Size4K, none),
            Err(MapError::NoAccess)
        );
        // Execute-only is expressible.
        let xo = Perms {
            read: false,
            write: false,
            exec: true,
            user: false,
        };
        pt.map(&mut mem, 0x4000_3000, 0x3000, PageSize::Size4K, xo)
            .unwrap();
        assert_eq!(pt.translate(&mem, 0x4000_3000).unwrap().1, xo);
        assert!(!Ept.is_present(EPT_MT_WB | 0x1000));
    }

    #[test]
    fn vtd_encoding() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::with_format(&mut mem, VtdSl::LARGE, 3).unwrap();
        pt.map(
            &mut mem,
            0x20_0000,
            0x40_0000,
            PageSize::Size2M,
            Perms::RWX.with_user(),
        )
        .unwrap();
        let l3 = mem.read(pt.root());
        assert_eq!(l3 & 0xfff, 3);
        let l2 = l3 & ADDR_MASK;
        assert_eq!(mem.read(l2 + 8), 0x40_0000 | SL_R | SL_W | PS);
        assert_eq!(
            pt.translate(&mem, 0x20_0010),
            Some((0x40_0010, Perms::RW, PageSize::Size2M))
        );
        let wo = Perms {
            read: false,
            write: true,
            exec: false,
            user: false,
        };
        pt.map(&mut mem, 0x1000, 0x1000, PageSize::Size4K, wo)
            .unwrap();
        assert_eq!(pt.translate(&mem, 0x1000).unwrap().1, wo);
        assert_eq!(
            pt.map(
                &mut mem,
                0x2000,
                0x1000,
                PageSize::Size4K,
                Perms { write: false, ..wo }
            ),
            Err(MapError::NoAccess)
        );
    }

    /// Every entry on the walk to `va` in a VT-d table: (level, entry).
    fn vtd_walk(mem: &FakeMem, pt: &PageTable<VtdSl>, va: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        let mut table = pt.root();
        for level in (1..=pt.levels()).rev() {
            let e = mem.read(table + index(va, level) * 8);
            out.push((level, e));
            if !pt.format().is_present(e) || pt.format().is_leaf(e, level) {
                break;
            }
            table = e & ADDR_MASK;
        }
        out
    }

    #[test]
    fn vtd_large_pages_follow_sllps() {
        // QEMU's CAP 0xd2008c22260206: SLLPS (bits 34..37) = 3; ECAP 0xf42: no SC.
        let cap: u64 = 0xd2_008c_2226_0206;
        let sllps = ((cap >> 34) & 0xf) as u8;
        assert_eq!(VtdSl::from_caps(sllps, false, true), VtdSl::LARGE);
        assert!(!VtdSl::from_caps(1, false, false).pages_1g);
        assert_eq!(VtdSl::default(), VtdSl::BASIC);

        let mut mem = FakeMem::new();
        // 4 KiB only: large leaves are refused, map_range falls back to 4 KiB.
        let mut basic = PageTable::with_format(&mut mem, VtdSl::BASIC, 3).unwrap();
        assert_eq!(basic.max_page_size(), PageSize::Size4K);
        for size in [PageSize::Size2M, PageSize::Size1G] {
            assert_eq!(
                basic.map(&mut mem, 0, 0, size, Perms::RW),
                Err(MapError::LargePageUnsupported)
            );
        }
        basic
            .map_range(&mut mem, 0, 0, 2 * M2, Perms::RW, PageSize::Size1G)
            .unwrap();
        assert_eq!(basic.translate(&mem, M2).unwrap().2, PageSize::Size4K);
        for (level, e) in vtd_walk(&mem, &basic, M2) {
            assert_eq!(e & PS, 0, "level {level}");
        }
        // 2 MiB only.
        let two_m = VtdSl::from_caps(1, false, false);
        let mut pt = PageTable::with_format(&mut mem, two_m, 3).unwrap();
        assert_eq!(pt.max_page_size(), PageSize::Size2M);
        assert_eq!(
            pt.map(&mut mem, 0, 0, PageSize::Size1G, Perms::RW),
            Err(MapError::LargePageUnsupported)
        );
        pt.map_range(&mut mem, 0, 0, G1, Perms::RW, PageSize::Size1G)
            .unwrap();
        assert_eq!(pt.translate(&mem, 0).unwrap().2, PageSize::Size2M);
        let walk = vtd_walk(&mem, &pt, 0);
        assert_eq!(walk.len(), 2);
        assert_eq!(walk[0].1 & 0xfff, SL_R | SL_W);
        assert_eq!(walk[1].1 & 0xfff, SL_R | SL_W | PS);
        // A 3-level table holds 1 GiB leaves in its root; a 4-level table's root
        // (level 4, where bit 7 is reserved) only ever holds R|W table entries.
        let mut pt3 = PageTable::with_format(&mut mem, VtdSl::LARGE, 3).unwrap();
        pt3.map(&mut mem, G1, 0, PageSize::Size1G, Perms::R)
            .unwrap();
        assert_eq!(mem.read(pt3.root() + 8) & 0xfff, SL_R | PS);
        let mut pt4 = PageTable::with_format(&mut mem, VtdSl::LARGE, 4).unwrap();
        assert_eq!(pt4.max_page_size(), PageSize::Size1G);
        pt4.map_range(&mut mem, 0, 0, 4 * G1, Perms::RW, PageSize::Size1G)
            .unwrap();
        pt4.map(&mut mem, 1 << 40, 0, PageSize::Size2M, Perms::R)
            .unwrap();
        for i in 0..512 {
            let e = mem.read(pt4.root() + i * 8);
            assert!(e == 0 || e & 0xfff == SL_R | SL_W, "PML4E {i}: {e:#x}");
        }
        for t in [basic, pt, pt3, pt4] {
            t.destroy(&mut mem);
        }
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn vtd_snoop_bit_only_in_leaves_and_only_when_asked() {
        let mut mem = FakeMem::new();
        let snoop = VtdSl::from_caps(3, true, true);
        assert!(snoop.snoop);
        assert!(!VtdSl::from_caps(3, false, true).snoop, "no SC: never SNP");
        for (format, want) in [(snoop, VTD_SL_SNP), (VtdSl::LARGE, 0)] {
            let mut pt = PageTable::with_format(&mut mem, format, 4).unwrap();
            pt.map(&mut mem, 0x1000, 0x5000, PageSize::Size4K, Perms::RW)
                .unwrap();
            pt.map(&mut mem, M2, 4 * M2, PageSize::Size2M, Perms::R)
                .unwrap();
            for va in [0x1000, M2] {
                let walk = vtd_walk(&mem, &pt, va);
                let (last, tables) = walk.split_last().unwrap();
                assert_eq!(last.1 & VTD_SL_SNP, want, "leaf at level {}", last.0);
                for &(level, e) in tables {
                    assert_eq!(e & 0xfff, SL_R | SL_W, "level {level}");
                }
            }
            // The snoop bit is not part of the address or the rights.
            assert_eq!(
                pt.translate(&mem, 0x1008),
                Some((0x5008, Perms::RW, PageSize::Size4K))
            );
            // Splitting a large leaf keeps the snoop bit in the new leaves.
            assert_eq!(pt.unmap(&mut mem, M2, PageSize::Size4K), Ok(4 * M2));
            let walk = vtd_walk(&mem, &pt, M2 + 0x1000);
            assert_eq!(walk.last().unwrap().1 & VTD_SL_SNP, want);
            assert_eq!(walk.last().unwrap().0, 1);
            pt.destroy(&mut mem);
        }
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn bounds() {
        let mut mem = FakeMem::new();
        let mut vtd3 = PageTable::with_format(&mut mem, VtdSl::LARGE, 3).unwrap();
        assert_eq!(
            vtd3.map(&mut mem, 1 << 39, 0, PageSize::Size4K, Perms::R),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            vtd3.map(&mut mem, (1 << 39) - K4, 0, PageSize::Size4K, Perms::R),
            Ok(())
        );
        assert_eq!(vtd3.translate(&mem, 1 << 39), None);
        assert_eq!(
            vtd3.unmap(&mut mem, 1 << 39, PageSize::Size4K),
            Err(MapError::OutOfRange)
        );
        let mut vtd4 = PageTable::with_format(&mut mem, VtdSl::LARGE, 4).unwrap();
        assert_eq!(
            vtd4.map(&mut mem, 1 << 39, 0, PageSize::Size4K, Perms::R),
            Ok(())
        );
        assert_eq!(
            vtd4.map(&mut mem, 1 << 48, 0, PageSize::Size4K, Perms::R),
            Err(MapError::OutOfRange)
        );
        // pa beyond 52 bits
        assert_eq!(
            vtd4.map(&mut mem, 0, MAX_PHYS, PageSize::Size4K, Perms::R),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            vtd4.map(&mut mem, 0, MAX_PHYS - G1, PageSize::Size1G, Perms::R),
            Ok(())
        );
        assert_eq!(
            vtd4.map(&mut mem, G1, !(G1 - 1), PageSize::Size1G, Perms::R),
            Err(MapError::OutOfRange)
        );

        // X86: canonical addresses; the upper half works, the hole does not.
        let mut x = PageTable::<X86>::new(&mut mem, 4).unwrap();
        let high = 0xffff_8000_0000_0000;
        x.map(&mut mem, high, 0x1000, PageSize::Size4K, Perms::RW)
            .unwrap();
        assert_eq!(
            x.translate(&mem, high + 5),
            Some((0x1005, Perms::RW, PageSize::Size4K))
        );
        assert_eq!(
            x.map(
                &mut mem,
                0x0000_8000_0000_0000,
                0,
                PageSize::Size4K,
                Perms::R
            ),
            Err(MapError::OutOfRange)
        );
        assert_eq!(x.translate(&mem, 0x0000_8000_0000_0000), None);
        // Npt is not canonical: upper half is out of range.
        let mut n = PageTable::<Npt>::new(&mut mem, 4).unwrap();
        assert_eq!(
            n.map(&mut mem, high, 0, PageSize::Size4K, Perms::R),
            Err(MapError::OutOfRange)
        );

        // Levels.
        assert_eq!(
            PageTable::<X86>::new(&mut mem, 3).unwrap_err(),
            MapError::UnsupportedLevels
        );
        assert_eq!(
            PageTable::with_format(&mut mem, VtdSl::LARGE, 2).unwrap_err(),
            MapError::UnsupportedLevels
        );
        let mut bad = PageTable::<Ept>::from_root(0x10_0000, 9);
        assert_eq!(
            bad.map(&mut mem, 0, 0, PageSize::Size4K, Perms::R),
            Err(MapError::UnsupportedLevels)
        );
        assert_eq!(bad.translate(&mem, 0), None);
    }

    #[test]
    fn misalignment() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<X86>::new(&mut mem, 4).unwrap();
        for (va, pa, size) in [
            (0x800, 0, PageSize::Size4K),
            (0, 0x10, PageSize::Size4K),
            (0x1000, 0, PageSize::Size2M),
            (0, 0x1000, PageSize::Size2M),
            (M2, 0, PageSize::Size1G),
            (0, M2, PageSize::Size1G),
        ] {
            assert_eq!(
                pt.map(&mut mem, va, pa, size, Perms::R),
                Err(MapError::Misaligned)
            );
        }
        assert_eq!(
            pt.unmap(&mut mem, 0x1000, PageSize::Size2M),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            pt.map_range(&mut mem, 0, 0, 0x800, Perms::R, PageSize::Size1G),
            Err(MapError::Misaligned)
        );
        assert_eq!(mem.live(), 1);
    }

    #[test]
    fn overlaps() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<X86>::new(&mut mem, 4).unwrap();
        pt.map(&mut mem, M2, 0, PageSize::Size2M, Perms::R).unwrap();
        assert_eq!(
            pt.map(&mut mem, M2 + K4, 0, PageSize::Size4K, Perms::R),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(
            pt.map(&mut mem, 0, 0, PageSize::Size1G, Perms::R),
            Err(MapError::AlreadyMapped)
        );
        pt.map(&mut mem, 2 * M2, 0, PageSize::Size4K, Perms::R)
            .unwrap();
        assert_eq!(
            pt.map(&mut mem, 2 * M2, 0, PageSize::Size2M, Perms::R),
            Err(MapError::AlreadyMapped)
        );
        // Unmapping a 2M where 4K pages live is NotMapped, and changes nothing.
        assert_eq!(
            pt.unmap(&mut mem, 2 * M2, PageSize::Size2M),
            Err(MapError::NotMapped)
        );
        assert!(pt.translate(&mem, 2 * M2).is_some());
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn splitting_large_pages() {
        for fmt in 0..4 {
            let mut mem = FakeMem::new();
            match fmt {
                0 => split_case(&mut mem, X86),
                1 => split_case(&mut mem, Npt),
                2 => split_case(&mut mem, Ept),
                _ => split_case(&mut mem, VtdSl::LARGE),
            }
            assert_eq!(mem.live(), 0);
        }
    }

    fn split_case<F: EntryFormat>(mem: &mut FakeMem, fmt: F) {
        let perms = fmt.normalize(Perms::RW).unwrap();
        let mut pt = PageTable::with_format(mem, fmt, 4).unwrap();
        // 1G leaf, unmap one 4K inside: 1G -> 2M table -> 4K table.
        pt.map(mem, G1, 4 * G1, PageSize::Size1G, Perms::RW)
            .unwrap();
        let hole = G1 + 3 * M2 + 5 * K4;
        assert_eq!(
            pt.unmap(mem, hole, PageSize::Size4K),
            Ok(4 * G1 + 3 * M2 + 5 * K4)
        );
        assert_eq!(pt.translate(mem, hole), None);
        assert_eq!(
            pt.translate(mem, hole + K4),
            Some((4 * G1 + 3 * M2 + 6 * K4, perms, PageSize::Size4K))
        );
        assert_eq!(
            pt.translate(mem, hole - K4 + 1),
            Some((4 * G1 + 3 * M2 + 4 * K4 + 1, perms, PageSize::Size4K))
        );
        assert_eq!(
            pt.translate(mem, G1),
            Some((4 * G1, perms, PageSize::Size2M))
        );
        assert_eq!(
            pt.translate(mem, 2 * G1 - 1),
            Some((5 * G1 - 1, perms, PageSize::Size2M))
        );
        // root + PDPT + the split PD + the split PT
        assert_eq!(mem.live(), 4);
        // Unmap a 2M from a 1G: only one split.
        pt.map(mem, 3 * G1, 0, PageSize::Size1G, Perms::RW).unwrap();
        assert_eq!(pt.unmap(mem, 3 * G1 + M2, PageSize::Size2M), Ok(M2));
        assert_eq!(pt.translate(mem, 3 * G1 + M2), None);
        assert_eq!(
            pt.translate(mem, 3 * G1 + 2 * M2),
            Some((2 * M2, perms, PageSize::Size2M))
        );
        assert_eq!(mem.live(), 5);
        // Split with OOM: nothing changes.
        mem.limit = Some(mem.live() + 1);
        pt.map(mem, 4 * G1, 0, PageSize::Size1G, Perms::RW).unwrap();
        assert_eq!(
            pt.unmap(mem, 4 * G1, PageSize::Size4K),
            Err(MapError::OutOfMemory)
        );
        assert_eq!(
            pt.translate(mem, 4 * G1),
            Some((0, perms, PageSize::Size1G))
        );
        assert_eq!(mem.live(), 5);
        mem.limit = None;
        pt.destroy(mem);
    }

    #[test]
    fn empty_tables_are_freed() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<Ept>::new(&mut mem, 4).unwrap();
        let pages = [0u64, K4, 511 * K4, M2, G1 + 7 * K4, 1 << 39, (1 << 47) - K4];
        for (i, &va) in pages.iter().enumerate() {
            pt.map(&mut mem, va, i as u64 * K4, PageSize::Size4K, Perms::R)
                .unwrap();
        }
        assert!(mem.live() > 5);
        for (i, &va) in pages.iter().enumerate() {
            assert_eq!(pt.unmap(&mut mem, va, PageSize::Size4K), Ok(i as u64 * K4));
        }
        assert_eq!(mem.live(), 1);
        assert_eq!(mem.read(pt.root()), 0);
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
        assert_eq!(mem.allocs, mem.frees);
    }

    #[test]
    fn map_range_uses_large_pages() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<X86>::new(&mut mem, 4).unwrap();
        // va and pa share 2M alignment but only va is 1G-aligned past the first 2M.
        let va = G1 - M2 - 2 * K4;
        let pa = 3 * G1 - M2 - 2 * K4;
        let len = 2 * K4 + M2 + G1 + M2 + K4;
        pt.map_range(&mut mem, va, pa, len, Perms::RW, PageSize::Size1G)
            .unwrap();
        assert_eq!(pt.translate(&mem, va).unwrap().2, PageSize::Size4K);
        assert_eq!(pt.translate(&mem, va + K4).unwrap().2, PageSize::Size4K);
        assert_eq!(
            pt.translate(&mem, G1 - M2).unwrap(),
            (3 * G1 - M2, Perms::RW, PageSize::Size2M)
        );
        assert_eq!(
            pt.translate(&mem, G1).unwrap(),
            (3 * G1, Perms::RW, PageSize::Size1G)
        );
        assert_eq!(pt.translate(&mem, 2 * G1).unwrap().2, PageSize::Size2M);
        assert_eq!(
            pt.translate(&mem, 2 * G1 + M2).unwrap(),
            (4 * G1 + M2, Perms::RW, PageSize::Size4K)
        );
        assert_eq!(pt.translate(&mem, 2 * G1 + M2 + K4), None);
        // max limits the size
        let mut pt2 = PageTable::<X86>::new(&mut mem, 4).unwrap();
        pt2.map_range(&mut mem, 0, 0, 4 * M2, Perms::R, PageSize::Size4K)
            .unwrap();
        assert_eq!(pt2.translate(&mem, 3 * M2).unwrap().2, PageSize::Size4K);
        // Different 2M alignment of va and pa: only 4K pages.
        let mut pt3 = PageTable::<X86>::new(&mut mem, 4).unwrap();
        pt3.map_range(&mut mem, 0, K4, 2 * M2, Perms::R, PageSize::Size1G)
            .unwrap();
        assert_eq!(
            pt3.translate(&mem, M2).unwrap(),
            (M2 + K4, Perms::R, PageSize::Size4K)
        );
        // Zero length is fine; out of range is refused up front.
        pt3.map_range(&mut mem, 0, 0, 0, Perms::R, PageSize::Size1G)
            .unwrap();
        assert_eq!(
            pt3.map_range(
                &mut mem,
                (1 << 47) - K4,
                0,
                2 * K4,
                Perms::R,
                PageSize::Size4K
            ),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            pt3.map_range(
                &mut mem,
                u64::MAX - 0xfff,
                0,
                2 * K4,
                Perms::R,
                PageSize::Size4K
            ),
            Err(MapError::OutOfRange)
        );
        // Top of the canonical upper half: va + len wraps to exactly 0.
        pt3.map_range(
            &mut mem,
            u64::MAX - (2 * M2 - 1),
            0,
            2 * M2,
            Perms::R,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(
            pt3.translate(&mem, u64::MAX).unwrap(),
            (2 * M2 - 1, Perms::R, PageSize::Size2M)
        );
        for t in [pt, pt2, pt3] {
            t.destroy(&mut mem);
        }
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn map_range_is_all_or_nothing() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::with_format(&mut mem, VtdSl::LARGE, 4).unwrap();
        pt.map(&mut mem, 5 * M2, 0, PageSize::Size4K, Perms::R)
            .unwrap();
        let live = mem.live();
        assert_eq!(
            pt.map_range(&mut mem, 0, 0, 8 * M2, Perms::RW, PageSize::Size2M),
            Err(MapError::AlreadyMapped)
        );
        assert_eq!(mem.live(), live);
        for i in 0..8 {
            let t = pt.translate(&mem, i * M2);
            assert_eq!(t.is_some(), i == 5, "{i}");
        }
        // Out of memory half way: everything undone, no frame leaked.
        mem.limit = Some(live + 2);
        assert_eq!(
            pt.map_range(&mut mem, G1, 0, 3 * G1, Perms::RW, PageSize::Size4K),
            Err(MapError::OutOfMemory)
        );
        assert_eq!(mem.live(), live);
        assert_eq!(pt.translate(&mem, G1), None);
        mem.limit = None;
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn out_of_memory_on_map_leaks_nothing() {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::<X86>::new(&mut mem, 4).unwrap();
        for limit in 1..4 {
            mem.limit = Some(limit);
            assert_eq!(
                pt.map(&mut mem, 0x1000, 0, PageSize::Size4K, Perms::R),
                Err(MapError::OutOfMemory)
            );
            assert_eq!(mem.live(), 1);
            assert_eq!(mem.read(pt.root()), 0);
        }
        mem.limit = None;
        assert_eq!(
            PageTable::<X86>::new(
                &mut FakeMem {
                    limit: Some(0),
                    ..FakeMem::new()
                },
                4
            )
            .unwrap_err(),
            MapError::OutOfMemory
        );
        pt.destroy(&mut mem);
    }

    #[test]
    fn adopted_table_and_leftover_empty_subtable() {
        let mut mem = FakeMem::new();
        let root = mem.alloc_table().unwrap();
        let pdpt = mem.alloc_table().unwrap();
        let pd = mem.alloc_table().unwrap(); // empty
        mem.write(root, X86.table_entry(pdpt));
        mem.write(pdpt, X86.table_entry(pd));
        let mut pt = PageTable::<X86>::from_root(root | 0x18, 4);
        assert_eq!(pt.root(), root);
        assert_eq!(pt.levels(), 4);
        // A 1G map where an empty PD hangs: the PD is replaced.
        pt.map(&mut mem, 0, 0, PageSize::Size1G, Perms::RW).unwrap();
        assert_eq!(mem.live(), 2);
        assert!(format!("{pt:?}").contains("x86-64"));
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn errors_display() {
        for e in [
            MapError::Misaligned,
            MapError::AlreadyMapped,
            MapError::NotMapped,
            MapError::OutOfMemory,
            MapError::OutOfRange,
            MapError::LargePageUnsupported,
            MapError::NoAccess,
            MapError::UnsupportedLevels,
        ] {
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(PageSize::from_level(4), None);
        assert_eq!(PageSize::Size2M.bytes(), M2);
    }

    /// Reference model: leaves keyed by va.
    #[derive(Default, Debug)]
    struct Model {
        leaves: BTreeMap<u64, (u64, PageSize, Perms)>,
    }

    impl Model {
        fn find(&self, va: u64) -> Option<(u64, u64, PageSize, Perms)> {
            let (&start, &(pa, size, perms)) = self.leaves.range(..=va).next_back()?;
            (va < start + size.bytes()).then_some((start, pa, size, perms))
        }
        fn overlaps(&self, va: u64, len: u64) -> bool {
            self.leaves
                .range(..va + len)
                .next_back()
                .is_some_and(|(&s, &(_, size, _))| s + size.bytes() > va)
        }
        fn map(&mut self, va: u64, pa: u64, size: PageSize, perms: Perms) -> Result<(), MapError> {
            if self.overlaps(va, size.bytes()) {
                return Err(MapError::AlreadyMapped);
            }
            self.leaves.insert(va, (pa, size, perms));
            Ok(())
        }
        fn unmap(&mut self, va: u64, size: PageSize) -> Result<u64, MapError> {
            loop {
                let Some((start, pa, leaf, perms)) = self.find(va) else {
                    return Err(MapError::NotMapped);
                };
                if leaf < size {
                    return Err(MapError::NotMapped);
                }
                if leaf == size {
                    self.leaves.remove(&start);
                    return Ok(pa);
                }
                let small = PageSize::from_level(leaf.level() - 1).unwrap();
                self.leaves.remove(&start);
                for i in 0..512 {
                    self.leaves.insert(
                        start + i * small.bytes(),
                        (pa + i * small.bytes(), small, perms),
                    );
                }
            }
        }
        fn translate(&self, va: u64) -> Option<(u64, Perms, PageSize)> {
            let (start, pa, size, perms) = self.find(va)?;
            Some((pa + (va - start), perms, size))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            slot: (u64, u64, u64),
            pa: u64,
            size: PageSize,
            perms: Perms,
        },
        Unmap {
            slot: (u64, u64, u64),
            size: PageSize,
        },
        MapRange {
            slot: (u64, u64, u64),
            pages: u64,
            max: PageSize,
        },
    }

    fn slot_va((g, m, k): (u64, u64, u64)) -> u64 {
        g * G1 + m * M2 + k * K4
    }

    fn size_strategy() -> impl Strategy<Value = PageSize> {
        prop_oneof![
            Just(PageSize::Size4K),
            Just(PageSize::Size2M),
            Just(PageSize::Size1G)
        ]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let slot = (0..3u64, 0..3u64, 0..3u64);
        let perms = (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(r, w, x, u)| Perms {
                read: r,
                write: w,
                exec: x,
                user: u,
            },
        );
        prop_oneof![
            3 => (slot.clone(), 0..8u64, size_strategy(), perms)
                .prop_map(|(slot, pa, size, perms)| Op::Map { slot, pa, size, perms }),
            2 => (slot.clone(), size_strategy()).prop_map(|(slot, size)| Op::Unmap { slot, size }),
            1 => (slot, 1..600u64, size_strategy()).prop_map(|(slot, pages, max)| Op::MapRange { slot, pages, max }),
        ]
    }

    fn run_model<F: EntryFormat>(fmt: F, ops: &[Op], levels: u8) -> Result<(), TestCaseError> {
        let mut mem = FakeMem::new();
        let mut pt = PageTable::with_format(&mut mem, fmt, levels).unwrap();
        let mut model = Model::default();
        let probes: Vec<u64> = (0..3)
            .flat_map(|g| (0..4).flat_map(move |m| (0..4).map(move |k| slot_va((g, m, k)))))
            .flat_map(|va| [va, va + 0x18, va + K4 - 8])
            .collect();
        for op in ops {
            match *op {
                Op::Map {
                    slot,
                    pa,
                    size,
                    perms,
                } => {
                    let va = slot_va(slot);
                    let pa = pa * size.bytes();
                    let got = pt.map(&mut mem, va, pa, size, perms);
                    let want = if !fmt.large_page_allowed(size) {
                        Err(MapError::LargePageUnsupported)
                    } else if !va.is_multiple_of(size.bytes()) {
                        Err(MapError::Misaligned)
                    } else if let Some(p) = fmt.normalize(perms) {
                        model.map(va, pa, size, p)
                    } else {
                        Err(MapError::NoAccess)
                    };
                    prop_assert_eq!(got, want, "{:?}", op);
                }
                Op::Unmap { slot, size } => {
                    let va = slot_va(slot);
                    let got = pt.unmap(&mut mem, va, size);
                    let want = if !fmt.large_page_allowed(size) {
                        Err(MapError::LargePageUnsupported)
                    } else if !va.is_multiple_of(size.bytes()) {
                        Err(MapError::Misaligned)
                    } else {
                        model.unmap(va, size)
                    };
                    prop_assert_eq!(got, want, "{:?}", op);
                }
                Op::MapRange { slot, pages, max } => {
                    let va = slot_va(slot);
                    let len = pages * K4;
                    let pa = 7 * G1 + (va % G1);
                    let got = pt.map_range(&mut mem, va, pa, len, Perms::RW, max);
                    let want = if model.overlaps(va, len) {
                        Err(MapError::AlreadyMapped)
                    } else {
                        Ok(())
                    };
                    prop_assert_eq!(got, want, "{:?}", op);
                    if got.is_ok() {
                        let p = fmt.normalize(Perms::RW).unwrap();
                        let mut done = 0;
                        while done < len {
                            let size = pt.pick_size(va + done, pa + done, len - done, max);
                            model.map(va + done, pa + done, size, p).unwrap();
                            done += size.bytes();
                        }
                    }
                }
            }
            for &va in &probes {
                prop_assert_eq!(
                    pt.translate(&mem, va),
                    model.translate(va),
                    "va {:#x} after {:?}",
                    va,
                    op
                );
            }
            for (&va, &(pa, size, perms)) in &model.leaves {
                prop_assert_eq!(pt.translate(&mem, va), Some((pa, perms, size)));
            }
        }
        let mut walked = Vec::new();
        pt.for_each_leaf(&mem, |va, pa, size, perms| {
            walked.push((va, (pa, size, perms)))
        });
        let modelled: Vec<_> = model.leaves.iter().map(|(&va, &l)| (va, l)).collect();
        prop_assert_eq!(walked, modelled);
        // Unmap everything: only the root remains; destroy frees it.
        let leaves: Vec<_> = model
            .leaves
            .iter()
            .map(|(&va, &(pa, size, _))| (va, pa, size))
            .collect();
        for (va, pa, size) in leaves {
            prop_assert_eq!(pt.unmap(&mut mem, va, size), Ok(pa));
        }
        prop_assert_eq!(mem.live(), 1);
        pt.destroy(&mut mem);
        prop_assert_eq!(mem.live(), 0);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn model_x86(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(X86, &ops, 4)?;
        }

        #[test]
        fn model_vtd3(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(VtdSl::LARGE, &ops, 3)?;
        }

        #[test]
        fn model_vtd4_small_pages_only(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(VtdSl::BASIC, &ops, 4)?;
        }

        #[test]
        fn model_vtd4_2m_snoop(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(VtdSl::from_caps(1, true, true), &ops, 4)?;
        }

        #[test]
        fn model_ept(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(Ept, &ops, 4)?;
        }

        #[test]
        fn model_npt(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            run_model(Npt, &ops, 4)?;
        }

        #[test]
        fn decode_never_panics(entry in any::<u64>(), level in any::<u8>()) {
            let _ = decode(&X86, entry, level);
            let _ = decode(&Npt, entry, level);
            let _ = decode(&Ept, entry, level);
            let _ = decode(&VtdSl::LARGE, entry, level);
        }
    }
}
