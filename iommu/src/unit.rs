//! A driver for one VT-d remapping unit in legacy mode.
//!
//! Generic over the unit's registers ([`Mmio`]), the memory its tables live in
//! ([`PhysMem`]: zeroed 4 KiB frames, 8-byte reads and writes) and a few platform
//! services ([`Platform`]: cache write-back for non-coherent units, the QI status
//! dword, a clock for bounded polls). Nothing here spins forever: every poll gives up
//! after [`UnitConfig::timeout_us`] with [`IommuError::Timeout`].
//!
//! Sequence (VTD.md): [`Unit::new`] reads CAP/ECAP, turns off translation and QI
//! left on by firmware, builds the root table, sets up the invalidation queue (or
//! falls back to register invalidation without ECAP.QI), sets the root table pointer
//! and invalidates the context cache and IOTLB globally. Domains can then be created
//! and devices attached (devices the hypervisor itself DMAs with need an entry
//! before translation is on); [`Unit::enable_translation`] sets TE.
//!
//! GCMD is always written from a software copy of the persistent enables plus one
//! command bit; GSTS is never echoed back.
//!
//! Invalidation rules (VTD.md "Grant map/unmap rules"):
//! - map (not-present to present): nothing with CM=0 (a write-buffer flush if
//!   CAP.RWBF); page-selective IOTLB invalidation + wait with CM=1;
//! - unmap: clear the entries, page-selective IOTLB descriptors with the domain's DID
//!   (one per aligned block, up to 2^MAMV pages each), ONE wait descriptor, and
//!   return only after the wait completed; page-table frames freed by the unmap are
//!   returned to the allocator only after that. Domain-selective instead when PSI is
//!   missing, a block would exceed MAMV, or more than
//!   [`UnitConfig::max_flush_descriptors`] descriptors would be needed.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use pagetable::{EntryFormat, MapError, PageSize, PageTable, Perms, PhysMem, VtdSl};

use crate::dmar::Bdf;
use crate::refcount::{FrameRange, FrameRefs, RefError};
use crate::regs::{
    self, CcScope, IotlbScope, Mmio, CAP, CCMD, ECAP, FEADDR, FECTL, FECTL_IM, FEDATA, FEUADDR,
    FSTS, FSTS_ICE, FSTS_IQE, FSTS_ITE, FSTS_PFO, FSTS_PPF, GCMD, GCMD_IRE, GCMD_PERSISTENT,
    GCMD_QIE, GCMD_SRTP, GCMD_TE, GCMD_WBF, GSTS, GSTS_QIES, GSTS_RTPS, GSTS_TES, GSTS_WBFS,
    IOTLB_FROM_IRO, IOTLB_IVT, IQA, IQH, IQT, IVA_FROM_IRO, RTADDR,
};
pub use crate::regs::{Cap, Ecap, FaultRecord};

/// Platform services the driver needs besides registers and table memory.
pub trait Platform {
    /// Writes back CPU cache lines covering `[pa, pa + len)` so that a unit whose
    /// walks do not snoop (ECAP.C = 0) sees them (clflush per line, then a fence).
    /// Only called for such units.
    fn flush_cache(&mut self, pa: u64, len: u64);
    /// Reads the dword at `pa` (volatile): the QI wait status.
    fn read_u32(&self, pa: u64) -> u32;
    /// Writes the dword at `pa`.
    fn write_u32(&mut self, pa: u64, value: u32);
    /// A monotonic clock in microseconds.
    fn now_us(&self) -> u64;
    /// Called between two polls of a register or the status dword (pause).
    fn relax(&mut self);
}

/// IOVAs in this range are the interrupt window: DMA writes there are MSIs and
/// never translate, so nothing may be mapped there.
pub const INTERRUPT_WINDOW: core::ops::Range<u64> = 0xfee0_0000..0xfef0_0000;

const PAGE: u64 = 4096;

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    /// The unit's register base (from its DRHD), for messages.
    pub register_base: u64,
    /// Host address width from the DMAR table: frames above it are refused.
    pub host_address_width: u8,
    /// How long a poll may take before [`IommuError::Timeout`].
    pub timeout_us: u64,
    /// Set SNP in every leaf when the unit has snoop control (ECAP.SC).
    pub force_snoop: bool,
    /// Most page-selective descriptors one flush may use before it becomes one
    /// domain-selective descriptor (at most 254, the queue's capacity minus a wait).
    pub max_flush_descriptors: usize,
}

impl UnitConfig {
    /// Defaults for the unit at `register_base` in a platform whose DMAR reports
    /// `host_address_width` bits: 1 s timeout, no forced snooping, 64 descriptors.
    pub const fn new(register_base: u64, host_address_width: u8) -> Self {
        UnitConfig {
            register_base,
            host_address_width,
            timeout_us: 1_000_000,
            force_snoop: false,
            max_flush_descriptors: 64,
        }
    }
}

/// An IOMMU domain on one unit; the value is its domain id (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(u16);

impl DomainId {
    /// The hardware domain id (DID).
    pub fn did(self) -> u16 {
        self.0
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOMMU domain {}", self.0)
    }
}

/// Counters of a unit or a domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful map calls.
    pub maps: u64,
    /// 4 KiB pages mapped by them.
    pub mapped_pages: u64,
    /// Successful unmap calls (a batch counts once).
    pub unmaps: u64,
    /// 4 KiB pages unmapped.
    pub unmapped_pages: u64,
    /// Invalidation descriptors (or register invalidations) issued.
    pub flush_descriptors: u64,
    /// Wait descriptors completed.
    pub waits: u64,
    /// Fault records read.
    pub faults: u64,
    /// Times the fault log overflowed (FSTS.PFO).
    pub fault_overflows: u64,
}

/// What an unmap did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmapReport {
    /// 4 KiB pages unmapped.
    pub pages: u64,
    /// Host frames whose mapping count reached zero (safe to hand back).
    pub released: Vec<FrameRange>,
    /// IOTLB invalidation descriptors issued (before the one wait).
    pub descriptors: u32,
    /// Whether a domain-selective invalidation was used instead of page-selective.
    pub domain_flush: bool,
}

/// What destroying a domain did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// 4 KiB pages that were still mapped.
    pub live_pages: u64,
    /// Host frames whose mapping count reached zero.
    pub released: Vec<FrameRange>,
    /// Devices that were still attached.
    pub devices_detached: usize,
}

/// Faults read by [`Unit::poll_faults`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// Decoded records, oldest first; each was cleared.
    pub records: Vec<FaultRecord>,
    /// FSTS.PFO was set: later faults were dropped (cleared now).
    pub overflow: bool,
    /// Other FSTS error bits seen and cleared (IQE, ICE, ITE).
    pub errors: u32,
}

/// Why a unit operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuError {
    /// The hardware did not finish `what` in time.
    Timeout {
        /// Unit register base.
        unit: u64,
        /// The operation waited for.
        what: &'static str,
    },
    /// The invalidation queue reported an error (FSTS.IQE) at descriptor `head`.
    QueueError {
        /// Unit register base.
        unit: u64,
        /// Index of the rejected descriptor.
        head: u64,
        /// That descriptor.
        descriptor: [u64; 2],
    },
    /// A register invalidation was not performed (actual granularity 0).
    InvalidationRefused {
        /// Unit register base.
        unit: u64,
        /// "context" or "IOTLB".
        what: &'static str,
    },
    /// The unit cannot be driven in legacy mode with second-level tables.
    Unsupported {
        /// Unit register base.
        unit: u64,
        /// What is missing.
        why: &'static str,
    },
    /// No memory for a table.
    OutOfMemory,
    /// Every domain id is in use.
    NoDomainIds,
    /// The domain does not exist on this unit.
    NoSuchDomain(DomainId),
    /// The device is attached to another domain.
    DeviceBusy {
        /// The device.
        device: Bdf,
        /// Its domain.
        domain: DomainId,
    },
    /// The device is not attached.
    NotAttached(Bdf),
    /// Address or length not 4 KiB aligned, or zero length.
    Misaligned {
        /// IOVA.
        iova: u64,
        /// Host address (0 for unmaps).
        hpa: u64,
        /// Length.
        len: u64,
    },
    /// The range touches the interrupt window 0xFEE00000-0xFEEFFFFF.
    InterruptWindow {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The range goes past the domain's address width.
    OutOfRange {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// First IOVA the domain cannot translate.
        limit: u64,
    },
    /// The host range goes past the host address width.
    HostAddressTooHigh {
        /// Host address.
        hpa: u64,
        /// Length.
        len: u64,
        /// Width in bits.
        width: u8,
    },
    /// Part of the range is mapped already.
    AlreadyMapped {
        /// IOVA.
        iova: u64,
    },
    /// Nothing is mapped at this IOVA.
    NotMapped {
        /// IOVA.
        iova: u64,
    },
    /// Neither read nor write requested.
    NoAccess,
    /// A frame is mapped `u32::MAX` times.
    RefcountOverflow {
        /// The frame number.
        pfn: u64,
    },
    /// Page-table error not covered above.
    Table(MapError),
}

impl fmt::Display for IommuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IommuError::Timeout { unit, what } => write!(
                f,
                "VT-d unit at {unit:#x}: {what} did not complete in time (hardware hung or not a VT-d unit; disable the IOMMU for this boot)"
            ),
            IommuError::QueueError { unit, head, descriptor } => write!(
                f,
                "VT-d unit at {unit:#x}: invalidation queue rejected descriptor {head} ({:#x}, {:#x}); the queue was reset",
                descriptor[0], descriptor[1]
            ),
            IommuError::InvalidationRefused { unit, what } => write!(
                f,
                "VT-d unit at {unit:#x}: register-based {what} invalidation was not performed"
            ),
            IommuError::Unsupported { unit, why } => {
                write!(f, "VT-d unit at {unit:#x} cannot be used: {why}")
            }
            IommuError::OutOfMemory => f.write_str("out of memory for IOMMU tables"),
            IommuError::NoDomainIds => f.write_str("every IOMMU domain id is in use"),
            IommuError::NoSuchDomain(d) => write!(f, "{d} does not exist"),
            IommuError::DeviceBusy { device, domain } => write!(
                f,
                "device {device} is attached to {domain}; detach it first"
            ),
            IommuError::NotAttached(d) => write!(f, "device {d} is not attached"),
            IommuError::Misaligned { iova, hpa, len } => write!(
                f,
                "IOVA {iova:#x}, host address {hpa:#x} and length {len:#x} must be non-zero multiples of 4 KiB"
            ),
            IommuError::InterruptWindow { iova, len } => write!(
                f,
                "IOVA range {iova:#x}+{len:#x} overlaps the interrupt window 0xfee00000-0xfeefffff, which never translates"
            ),
            IommuError::OutOfRange { iova, len, limit } => write!(
                f,
                "IOVA range {iova:#x}+{len:#x} goes past the domain's limit {limit:#x}"
            ),
            IommuError::HostAddressTooHigh { hpa, len, width } => write!(
                f,
                "host range {hpa:#x}+{len:#x} is beyond the {width}-bit host address width"
            ),
            IommuError::AlreadyMapped { iova } => write!(f, "IOVA {iova:#x} is already mapped"),
            IommuError::NotMapped { iova } => write!(f, "nothing is mapped at IOVA {iova:#x}"),
            IommuError::NoAccess => f.write_str("a DMA mapping needs read or write access"),
            IommuError::RefcountOverflow { pfn } => {
                write!(f, "frame {pfn:#x} is mapped too many times")
            }
            IommuError::Table(e) => write!(f, "IOMMU page table: {e}"),
        }
    }
}

impl From<MapError> for IommuError {
    fn from(e: MapError) -> Self {
        match e {
            MapError::OutOfMemory => IommuError::OutOfMemory,
            MapError::NoAccess => IommuError::NoAccess,
            e => IommuError::Table(e),
        }
    }
}

/// The aligned power-of-two blocks `(first page, log2 pages)` covering `pages` pages
/// from page number `start`, each at most `2^max_order` pages.
pub fn psi_blocks(start: u64, pages: u64, max_order: u8) -> Vec<(u64, u8)> {
    let mut out = Vec::new();
    let end = start.saturating_add(pages);
    let mut pos = start;
    while pos < end {
        let mut order = pos.trailing_zeros().min(u32::from(max_order).min(63));
        while order > 0 && (end - pos) < (1u64 << order) {
            order -= 1;
        }
        out.push((pos, order as u8));
        pos += 1 << order;
    }
    out
}

/// How an IOTLB flush will be done.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Flush {
    Pages(Vec<(u64, u8)>),
    Domain,
}

struct Domain {
    table: PageTable<VtdSl>,
    limit: u64,
    devices: BTreeSet<u16>,
    live_pages: u64,
    stats: Stats,
}

struct Queue {
    base: u64,
    entries: u64,
    tail: u64,
    status: u64,
    seq: u32,
}

/// Table memory as the walker sees it during one operation: writes are flushed from
/// the CPU cache for non-coherent units, frames the walker frees are kept until the
/// IOTLB flush completed, and frames above the host address width are refused.
struct TableMem<'a, M: PhysMem, H: Platform> {
    mem: &'a mut M,
    host: &'a mut H,
    coherent: bool,
    haw_limit: u64,
    deferred: &'a mut Vec<u64>,
}

impl<M: PhysMem, H: Platform> PhysMem for TableMem<'_, M, H> {
    fn read(&self, pa: u64) -> u64 {
        self.mem.read(pa)
    }
    fn write(&mut self, pa: u64, value: u64) {
        self.mem.write(pa, value);
        if !self.coherent {
            self.host.flush_cache(pa, 8);
        }
    }
    fn alloc_table(&mut self) -> Option<u64> {
        let pa = self.mem.alloc_table()?;
        if pa + PAGE > self.haw_limit {
            self.mem.free_table(pa);
            return None;
        }
        if !self.coherent {
            self.host.flush_cache(pa, PAGE);
        }
        Some(pa)
    }
    fn free_table(&mut self, pa: u64) {
        self.deferred.push(pa);
    }
}

/// One remapping unit.
pub struct Unit<R: Mmio, M: PhysMem, H: Platform> {
    regs: R,
    mem: M,
    host: H,
    cfg: UnitConfig,
    cap: Cap,
    ecap: Ecap,
    /// Software copy of the persistent GCMD enables.
    gcmd: u32,
    root: u64,
    /// Context table per bus (0 = none yet).
    context: Vec<u64>,
    queue: Option<Queue>,
    domains: BTreeMap<u16, Domain>,
    devices: BTreeMap<u16, u16>,
    refs: FrameRefs,
    stats: Stats,
    deferred: Vec<u64>,
}

impl<R: Mmio, M: PhysMem, H: Platform> fmt::Debug for Unit<R, M, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unit")
            .field("base", &format_args!("{:#x}", self.cfg.register_base))
            .field("cap", &self.cap)
            .field("ecap", &self.ecap)
            .field("domains", &self.domains.len())
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// Polls `check` until it returns `Ok(true)`, at most `timeout_us`.
fn spin<H: Platform>(
    host: &mut H,
    timeout_us: u64,
    unit: u64,
    what: &'static str,
    mut check: impl FnMut(&mut H) -> Result<bool, IommuError>,
) -> Result<(), IommuError> {
    let start = host.now_us();
    loop {
        if check(host)? {
            return Ok(());
        }
        if host.now_us().wrapping_sub(start) > timeout_us {
            return Err(IommuError::Timeout { unit, what });
        }
        host.relax();
    }
}

impl<R: Mmio, M: PhysMem, H: Platform> Unit<R, M, H> {
    /// Takes over the unit: reads CAP/ECAP, turns off translation and QI if firmware
    /// left them on, builds an empty root table, sets up queued invalidation (if
    /// ECAP.QI), sets the root table pointer and invalidates everything globally.
    /// Translation stays off until [`Unit::enable_translation`].
    ///
    /// On error the registers, memory and platform come back with the error; frames
    /// already handed to the unit (root table, queue) are not freed, since the
    /// hardware may still point at them.
    pub fn new(regs: R, mem: M, host: H, cfg: UnitConfig) -> Result<Self, (IommuError, R, M, H)> {
        let cap = Cap(regs.read64(CAP));
        let ecap = Ecap(regs.read64(ECAP));
        let gsts = regs.read32(GSTS);
        let mut unit = Unit {
            regs,
            mem,
            host,
            cfg,
            cap,
            ecap,
            gcmd: gsts & GCMD_PERSISTENT,
            root: 0,
            context: alloc::vec![0; 256],
            queue: None,
            domains: BTreeMap::new(),
            devices: BTreeMap::new(),
            refs: FrameRefs::new(),
            stats: Stats::default(),
            deferred: Vec::new(),
        };
        match unit.init() {
            Ok(()) => Ok(unit),
            Err(e) => {
                let (r, m, h) = unit.into_parts();
                Err((e, r, m, h))
            }
        }
    }

    fn init(&mut self) -> Result<(), IommuError> {
        let unit = self.cfg.register_base;
        if ![3, 4, 5].iter().any(|&l| self.cap.supports_levels(l)) {
            return Err(IommuError::Unsupported {
                unit,
                why: "CAP.SAGAW offers no 3-, 4- or 5-level second-level tables",
            });
        }
        if self.cap.fault_record_offset() == 0 {
            return Err(IommuError::Unsupported {
                unit,
                why: "CAP.FRO is 0 (no fault recording registers)",
            });
        }
        if self.gcmd & GCMD_TE != 0 {
            self.set_enable(GCMD_TE, GSTS_TES, false, "disabling translation (TE)")?;
        }
        if self.gcmd & GCMD_QIE != 0 {
            let iqt = self.regs.read64(IQT);
            spin(
                &mut self.host,
                self.cfg.timeout_us,
                unit,
                "draining the firmware's invalidation queue",
                |_| Ok(self.regs.read64(IQH) == iqt),
            )?;
            self.set_enable(GCMD_QIE, GSTS_QIES, false, "disabling queued invalidation")?;
        }
        self.root = self.alloc_frame()?;
        if self.ecap.qi() {
            let base = self.alloc_frame()?;
            let status = self.alloc_frame()?;
            self.queue = Some(Queue {
                base,
                entries: PAGE / 16,
                tail: 0,
                status,
                seq: 0,
            });
            self.regs.write64(IQT, 0);
            // QS = 0: one 4 KiB page of 256 128-bit descriptors; DW = 0.
            self.regs.write64(IQA, base);
            self.set_enable(GCMD_QIE, GSTS_QIES, true, "enabling queued invalidation")?;
        }
        self.regs.write64(RTADDR, self.root);
        self.command(GCMD_SRTP, "setting the root table pointer (SRTP)", |g| {
            g & GSTS_RTPS != 0
        })?;
        self.invalidate(&[
            Inv::Context(CcScope::Global),
            Inv::Iotlb(IotlbScope::Global),
        ])?;
        Ok(())
    }

    /// Gives the registers, memory and platform back (tables are not freed: call
    /// [`Unit::shutdown`] first).
    pub fn into_parts(self) -> (R, M, H) {
        (self.regs, self.mem, self.host)
    }

    /// Turns translation and queued invalidation off and frees every table, the
    /// domains' included. Returns the live pages that were still mapped.
    pub fn shutdown(mut self) -> Result<(R, M, H, u64), IommuError> {
        if self.gcmd & GCMD_TE != 0 {
            self.set_enable(GCMD_TE, GSTS_TES, false, "disabling translation (TE)")?;
        }
        let mut live = 0;
        let ids: Vec<u16> = self.domains.keys().copied().collect();
        for did in ids {
            live += self.destroy_domain(DomainId(did))?.live_pages;
        }
        if self.gcmd & GCMD_QIE != 0 {
            self.set_enable(GCMD_QIE, GSTS_QIES, false, "disabling queued invalidation")?;
        }
        for ctx in core::mem::take(&mut self.context) {
            if ctx != 0 {
                self.mem.free_table(ctx);
            }
        }
        if let Some(q) = self.queue.take() {
            self.mem.free_table(q.base);
            self.mem.free_table(q.status);
        }
        if self.root != 0 {
            self.mem.free_table(self.root);
        }
        Ok((self.regs, self.mem, self.host, live))
    }

    /// The capability register.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// The extended capability register.
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }
    /// The configuration.
    pub fn config(&self) -> &UnitConfig {
        &self.cfg
    }
    /// Whether invalidations go through the queue (else registers).
    pub fn queued_invalidation(&self) -> bool {
        self.queue.is_some()
    }
    /// Unit-wide counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// A domain's counters.
    pub fn domain_stats(&self, dom: DomainId) -> Option<Stats> {
        self.domains.get(&dom.0).map(|d| d.stats)
    }
    /// Pages mapped in a domain now.
    pub fn live_pages(&self, dom: DomainId) -> Option<u64> {
        self.domains.get(&dom.0).map(|d| d.live_pages)
    }
    /// How many live mappings (over all domains of this unit) point at frame `pfn`.
    pub fn frame_refcount(&self, pfn: u64) -> u32 {
        self.refs.get(pfn)
    }
    /// Sum of all frame reference counts (0 when nothing is mapped).
    pub fn total_refs(&self) -> u64 {
        self.refs.total()
    }
    /// The domain a device is attached to.
    pub fn device_domain(&self, device: Bdf) -> Option<DomainId> {
        self.devices.get(&device.source_id()).map(|&d| DomainId(d))
    }
    /// The domains that exist.
    pub fn domains(&self) -> impl Iterator<Item = DomainId> + '_ {
        self.domains.keys().map(|&d| DomainId(d))
    }
    /// The memory the tables live in.
    pub fn mem(&self) -> &M {
        &self.mem
    }
    /// The platform services.
    pub fn host(&self) -> &H {
        &self.host
    }

    fn alloc_frame(&mut self) -> Result<u64, IommuError> {
        let pa = self.mem.alloc_table().ok_or(IommuError::OutOfMemory)?;
        if pa + PAGE > self.haw_limit() {
            self.mem.free_table(pa);
            return Err(IommuError::OutOfMemory);
        }
        self.flush_cpu(pa, PAGE);
        Ok(pa)
    }

    fn haw_limit(&self) -> u64 {
        1u64.checked_shl(u32::from(self.cfg.host_address_width.min(63)))
            .unwrap_or(u64::MAX)
    }

    fn flush_cpu(&mut self, pa: u64, len: u64) {
        if !self.ecap.coherent() {
            self.host.flush_cache(pa, len);
        }
    }

    /// Writes a 128-bit table entry: the high half first, then the low half (with
    /// the present bit), so the unit never sees a present entry with a stale high half.
    fn write_entry(&mut self, pa: u64, e: [u64; 2]) {
        self.mem.write(pa + 8, e[1]);
        self.mem.write(pa, e[0]);
        self.flush_cpu(pa, 16);
    }

    /// Sets or clears a persistent enable and waits for its status bit.
    fn set_enable(
        &mut self,
        bit: u32,
        status: u32,
        on: bool,
        what: &'static str,
    ) -> Result<(), IommuError> {
        if on {
            self.gcmd |= bit;
        } else {
            self.gcmd &= !bit;
        }
        self.regs.write32(GCMD, self.gcmd);
        let regs = &self.regs;
        spin(
            &mut self.host,
            self.cfg.timeout_us,
            self.cfg.register_base,
            what,
            |_| Ok((regs.read32(GSTS) & status != 0) == on),
        )
    }

    /// Issues one one-shot command (persistent enables + `bit`) and waits for `done`.
    fn command(
        &mut self,
        bit: u32,
        what: &'static str,
        done: impl Fn(u32) -> bool,
    ) -> Result<(), IommuError> {
        self.regs.write32(GCMD, self.gcmd | bit);
        let regs = &self.regs;
        spin(
            &mut self.host,
            self.cfg.timeout_us,
            self.cfg.register_base,
            what,
            |_| Ok(done(regs.read32(GSTS))),
        )
    }

    /// Flushes the chipset write buffer if the unit needs it (CAP.RWBF).
    fn flush_write_buffer(&mut self) -> Result<(), IommuError> {
        if self.cap.rwbf() {
            self.command(GCMD_WBF, "write buffer flush (WBF)", |g| g & GSTS_WBFS == 0)?;
        }
        Ok(())
    }

    /// Turns DMA remapping on (TE).
    pub fn enable_translation(&mut self) -> Result<(), IommuError> {
        self.set_enable(GCMD_TE, GSTS_TES, true, "enabling translation (TE)")
    }

    /// Turns DMA remapping off.
    pub fn disable_translation(&mut self) -> Result<(), IommuError> {
        self.set_enable(GCMD_TE, GSTS_TES, false, "disabling translation (TE)")
    }

    /// Whether GSTS says translation is on.
    pub fn translation_enabled(&self) -> bool {
        self.regs.read32(GSTS) & GSTS_TES != 0
    }

    /// Whether interrupt remapping was left enabled by firmware (kept as found).
    pub fn interrupt_remapping_enabled(&self) -> bool {
        self.gcmd & GCMD_IRE != 0
    }

    /// Runs invalidations and waits for them: through the queue (descriptors + ONE
    /// wait descriptor) or through the registers. Counts descriptors and waits.
    fn invalidate(&mut self, invs: &[Inv]) -> Result<(), IommuError> {
        if invs.is_empty() {
            return Ok(());
        }
        let dr = self.cap.drd();
        let dw = self.cap.dwd();
        let unit = self.cfg.register_base;
        if self.queue.is_some() {
            let descs: Vec<[u64; 2]> = invs
                .iter()
                .map(|i| match *i {
                    Inv::Context(s) => regs::cc_descriptor(s),
                    Inv::Iotlb(s) => regs::iotlb_descriptor(s, dr, dw),
                })
                .collect();
            let per_batch = (self.queue.as_ref().map_or(2, |q| q.entries) - 2) as usize;
            for chunk in descs.chunks(per_batch.max(1)) {
                self.qi_submit(chunk)?;
            }
            return Ok(());
        }
        for inv in invs {
            match *inv {
                Inv::Context(s) => {
                    self.regs.write64(CCMD, regs::ccmd_value(s));
                    let regs = &self.regs;
                    spin(
                        &mut self.host,
                        self.cfg.timeout_us,
                        unit,
                        "context-cache invalidation (CCMD)",
                        |_| Ok(regs.read64(CCMD) & regs::CCMD_ICC == 0),
                    )?;
                    if regs::ccmd_caig(self.regs.read64(CCMD)) == 0 {
                        return Err(IommuError::InvalidationRefused {
                            unit,
                            what: "context",
                        });
                    }
                }
                Inv::Iotlb(s) => {
                    let iro = self.ecap.iotlb_offset();
                    let (iva, cmd) = regs::iotlb_reg_values(s, dr, dw);
                    if let Some(iva) = iva {
                        self.regs.write64(iro + IVA_FROM_IRO, iva);
                    }
                    self.regs.write64(iro + IOTLB_FROM_IRO, cmd);
                    let regs = &self.regs;
                    spin(
                        &mut self.host,
                        self.cfg.timeout_us,
                        unit,
                        "IOTLB invalidation (IOTLB register)",
                        |_| Ok(regs.read64(iro + IOTLB_FROM_IRO) & IOTLB_IVT == 0),
                    )?;
                    if regs::iotlb_iaig(self.regs.read64(iro + IOTLB_FROM_IRO)) == 0 {
                        return Err(IommuError::InvalidationRefused {
                            unit,
                            what: "IOTLB",
                        });
                    }
                }
            }
            self.stats.flush_descriptors += 1;
        }
        Ok(())
    }

    /// Queues `descs` plus one wait descriptor, moves the tail and waits for the
    /// status write.
    fn qi_submit(&mut self, descs: &[[u64; 2]]) -> Result<(), IommuError> {
        let unit = self.cfg.register_base;
        let timeout = self.cfg.timeout_us;
        let coherent = self.ecap.coherent();
        let Some(q) = self.queue.as_mut() else {
            return Ok(());
        };
        q.seq = q.seq.wrapping_add(1).max(1);
        let seq = q.seq;
        let status = q.status;
        self.host.write_u32(status, 0);
        let wait = regs::wait_descriptor(seq, status);
        for d in descs.iter().chain(core::iter::once(&wait)) {
            let slot = q.base + q.tail * 16;
            self.mem.write(slot, d[0]);
            self.mem.write(slot + 8, d[1]);
            if !coherent {
                self.host.flush_cache(slot, 16);
            }
            q.tail = (q.tail + 1) % q.entries;
        }
        let (base, entries, tail) = (q.base, q.entries, q.tail);
        self.regs.write64(IQT, tail << 4);
        let regs = &self.regs;
        let mut bad = None;
        let r = spin(
            &mut self.host,
            timeout,
            unit,
            "invalidation wait descriptor",
            |h| {
                if h.read_u32(status) == seq {
                    return Ok(true);
                }
                if regs.read32(FSTS) & FSTS_IQE != 0 {
                    bad = Some((regs.read64(IQH) >> 4) % entries);
                    return Ok(true);
                }
                Ok(false)
            },
        );
        if let Some(head) = bad {
            let descriptor = [
                self.mem.read(base + head * 16),
                self.mem.read(base + head * 16 + 8),
            ];
            // Skip what is left: tail = head, then clear the error so the queue runs on.
            self.regs.write64(IQT, head << 4);
            if let Some(q) = self.queue.as_mut() {
                q.tail = head;
            }
            self.regs.write32(FSTS, FSTS_IQE);
            return Err(IommuError::QueueError {
                unit,
                head,
                descriptor,
            });
        }
        r?;
        self.stats.flush_descriptors += descs.len() as u64;
        self.stats.waits += 1;
        Ok(())
    }

    fn domain(&self, dom: DomainId) -> Result<&Domain, IommuError> {
        self.domains
            .get(&dom.0)
            .ok_or(IommuError::NoSuchDomain(dom))
    }

    /// The smallest supported table depth (3..=5) translating `bits` of address (the
    /// deepest one if none does).
    fn levels_for(&self, bits: u8) -> Option<u8> {
        let supported: Vec<u8> = [3u8, 4, 5]
            .into_iter()
            .filter(|&l| self.cap.supports_levels(l))
            .collect();
        supported
            .iter()
            .copied()
            .find(|&l| 12 + 9 * u32::from(l) >= u32::from(bits))
            .or_else(|| supported.last().copied())
    }

    /// Creates an empty domain that can translate IOVAs of up to `address_bits` bits
    /// (the unit's MGAW caps it; 48 covers any physmap). Its id is the lowest free
    /// domain id above 0; its depth the smallest SAGAW allows for the width.
    pub fn create_domain(&mut self, address_bits: u8) -> Result<DomainId, IommuError> {
        let max = self.cap.num_domains();
        let did = (1..max)
            .find(|&d| !self.domains.contains_key(&(d as u16)))
            .ok_or(IommuError::NoDomainIds)? as u16;
        let bits = address_bits.min(self.cap.mgaw());
        let levels = self.levels_for(bits).ok_or(IommuError::Unsupported {
            unit: self.cfg.register_base,
            why: "no supported table depth",
        })?;
        let width = (12 + 9 * u32::from(levels)).min(u32::from(self.cap.mgaw()));
        let format = VtdSl::from_caps(
            self.cap.sllps(),
            self.ecap.snoop_control(),
            self.cfg.force_snoop,
        );
        let mut tm = TableMem {
            mem: &mut self.mem,
            host: &mut self.host,
            coherent: self.ecap.coherent(),
            haw_limit: 1u64
                .checked_shl(u32::from(self.cfg.host_address_width.min(63)))
                .unwrap_or(u64::MAX),
            deferred: &mut self.deferred,
        };
        let table = PageTable::with_format(&mut tm, format, levels)?;
        self.domains.insert(
            did,
            Domain {
                table,
                limit: 1u64 << width,
                devices: BTreeSet::new(),
                live_pages: 0,
                stats: Stats::default(),
            },
        );
        Ok(DomainId(did))
    }

    /// First IOVA the domain cannot translate.
    pub fn domain_limit(&self, dom: DomainId) -> Option<u64> {
        self.domains.get(&dom.0).map(|d| d.limit)
    }

    /// Table depth of a domain.
    pub fn domain_levels(&self, dom: DomainId) -> Option<u8> {
        self.domains.get(&dom.0).map(|d| d.table.levels())
    }

    /// Creates the (empty: every device blocked) context table of `bus` now rather than
    /// at its first [`Unit::attach`], so that the unit's own frames are all allocated
    /// up front (the hypervisor counts frames around domains' lives). A not-present root
    /// entry becomes present: a write-buffer flush, or with CM=1 a global context-cache
    /// invalidation.
    pub fn prepare_bus(&mut self, bus: u8) -> Result<(), IommuError> {
        if self.context[usize::from(bus)] != 0 {
            return Ok(());
        }
        self.ensure_context_table(bus)?;
        if self.cap.caching_mode() {
            self.invalidate(&[Inv::Context(CcScope::Global)])
        } else {
            self.flush_write_buffer()
        }
    }

    fn ensure_context_table(&mut self, bus: u8) -> Result<(), IommuError> {
        let bus = usize::from(bus);
        if self.context[bus] == 0 {
            let ctx = self.alloc_frame()?;
            self.context[bus] = ctx;
            self.write_entry(self.root + bus as u64 * 16, regs::root_entry(ctx));
        }
        Ok(())
    }

    /// Points `device`'s context entry at the domain's tables (translation type
    /// "translate", AW from the depth) and invalidates the device's context-cache
    /// entry (and, with CM=1, the domain's IOTLB entries).
    pub fn attach(&mut self, dom: DomainId, device: Bdf) -> Result<(), IommuError> {
        let sid = device.source_id();
        let (root_pt, levels) = {
            let d = self.domain(dom)?;
            (d.table.root(), d.table.levels())
        };
        if let Some(&cur) = self.devices.get(&sid) {
            if cur == dom.0 {
                return Ok(());
            }
            return Err(IommuError::DeviceBusy {
                device,
                domain: DomainId(cur),
            });
        }
        let bus = usize::from(device.bus);
        self.ensure_context_table(device.bus)?;
        let slot = self.context[bus] + u64::from(device.devfn()) * 16;
        self.write_entry(
            slot,
            regs::context_entry(root_pt, regs::TT_TRANSLATE, dom.0, levels),
        );
        self.devices.insert(sid, dom.0);
        if let Some(d) = self.domains.get_mut(&dom.0) {
            d.devices.insert(sid);
        }
        // The old entry was not present: cached (CM=1 only) with domain id 0.
        let mut invs = alloc::vec![Inv::Context(CcScope::Device { did: 0, sid })];
        if self.cap.caching_mode() {
            invs.push(Inv::Iotlb(IotlbScope::Domain(dom.0)));
        } else {
            self.flush_write_buffer()?;
        }
        self.invalidate(&invs)
    }

    /// Clears `device`'s context entry (its DMA then faults) and invalidates its
    /// context-cache entry and the domain's IOTLB entries.
    pub fn detach(&mut self, device: Bdf) -> Result<DomainId, IommuError> {
        let sid = device.source_id();
        let did = self
            .devices
            .remove(&sid)
            .ok_or(IommuError::NotAttached(device))?;
        let slot = self.context[usize::from(device.bus)] + u64::from(device.devfn()) * 16;
        // Present bit first.
        self.mem.write(slot, 0);
        self.mem.write(slot + 8, 0);
        self.flush_cpu(slot, 16);
        if let Some(d) = self.domains.get_mut(&did) {
            d.devices.remove(&sid);
        }
        self.invalidate(&[
            Inv::Context(CcScope::Device { did, sid }),
            Inv::Iotlb(IotlbScope::Domain(did)),
        ])?;
        Ok(DomainId(did))
    }

    fn check_range(&self, d: &Domain, iova: u64, hpa: u64, len: u64) -> Result<u64, IommuError> {
        if len == 0 || (iova | hpa | len) & (PAGE - 1) != 0 {
            return Err(IommuError::Misaligned { iova, hpa, len });
        }
        let end =
            iova.checked_add(len)
                .filter(|&e| e <= d.limit)
                .ok_or(IommuError::OutOfRange {
                    iova,
                    len,
                    limit: d.limit,
                })?;
        Ok(end)
    }

    /// Maps `len` bytes at `iova` to host memory at `hpa` with `perms` (read and/or
    /// write; execute and user are ignored), using large pages where alignment and
    /// CAP.SLLPS allow. All or nothing. Every frame's mapping count goes up by one.
    pub fn map(
        &mut self,
        dom: DomainId,
        iova: u64,
        hpa: u64,
        len: u64,
        perms: Perms,
    ) -> Result<(), IommuError> {
        let d = self.domain(dom)?;
        let end = self.check_range(d, iova, hpa, len)?;
        if iova < INTERRUPT_WINDOW.end && end > INTERRUPT_WINDOW.start {
            return Err(IommuError::InterruptWindow { iova, len });
        }
        let width = self.cfg.host_address_width;
        if hpa.checked_add(len).is_none_or(|e| e > self.haw_limit()) {
            return Err(IommuError::HostAddressTooHigh { hpa, len, width });
        }
        if d.table.format().normalize(perms).is_none() {
            return Err(IommuError::NoAccess);
        }
        self.refs.add(hpa / PAGE, len / PAGE).map_err(|e| match e {
            RefError::Overflow(pfn) => IommuError::RefcountOverflow { pfn },
            _ => IommuError::OutOfRange {
                iova,
                len,
                limit: 0,
            },
        })?;
        let haw_limit = self.haw_limit();
        let coherent = self.ecap.coherent();
        let Some(d) = self.domains.get_mut(&dom.0) else {
            return Err(IommuError::NoSuchDomain(dom));
        };
        let max = d.table.max_page_size();
        let mut tm = TableMem {
            mem: &mut self.mem,
            host: &mut self.host,
            coherent,
            haw_limit,
            deferred: &mut self.deferred,
        };
        let r = d.table.map_range(&mut tm, iova, hpa, len, perms, max);
        if let Err(e) = r {
            let mut released = Vec::new();
            let _ = self.refs.remove(hpa / PAGE, len / PAGE, &mut released);
            // Tables the failed call created and removed again may have been seen by
            // the unit: flush before reusing them.
            if !self.deferred.is_empty() {
                self.flush_range(dom.0, &[(iova / PAGE, len / PAGE)])?;
                self.release_deferred();
            }
            return Err(match e {
                MapError::AlreadyMapped => {
                    let first = (iova..end)
                        .step_by(PAGE as usize)
                        .find(|&v| self.translate(dom, v).is_some())
                        .unwrap_or(iova);
                    IommuError::AlreadyMapped { iova: first }
                }
                e => e.into(),
            });
        }
        let pages = len / PAGE;
        d.live_pages += pages;
        d.stats.maps += 1;
        d.stats.mapped_pages += pages;
        self.stats.maps += 1;
        self.stats.mapped_pages += pages;
        if self.cap.caching_mode() {
            self.flush_range(dom.0, &[(iova / PAGE, pages)])?;
        } else {
            self.flush_write_buffer()?;
        }
        Ok(())
    }

    /// What the domain's tables map at `iova`: host address, rights, leaf size.
    pub fn translate(&self, dom: DomainId, iova: u64) -> Option<(u64, Perms, PageSize)> {
        let d = self.domains.get(&dom.0)?;
        d.table.translate(&self.mem, iova)
    }

    /// Unmaps every page in `[iova, iova + len)` (all must be mapped; large pages
    /// are split where the range cuts them), invalidates the IOTLB for the range
    /// with the domain's DID (page-selective descriptors + one wait) and returns
    /// after the wait completed, with the frames whose count dropped to zero.
    pub fn unmap(&mut self, dom: DomainId, iova: u64, len: u64) -> Result<UnmapReport, IommuError> {
        let d = self.domain(dom)?;
        let end = self.check_range(d, iova, 0, len)?;
        // Check first, change nothing on error.
        let mut pos = iova;
        while pos < end {
            let (_, _, size) = d
                .table
                .translate(&self.mem, pos)
                .ok_or(IommuError::NotMapped { iova: pos })?;
            pos = (pos & !(size.bytes() - 1)) + size.bytes();
        }
        self.unmap_ranges(dom, &[(iova, len)])
    }

    /// Unmaps many 4 KiB pages (in any order, each mapped, no duplicates) with one
    /// flush: page-selective descriptors for the runs they form and ONE wait.
    pub fn unmap_pages(&mut self, dom: DomainId, iovas: &[u64]) -> Result<UnmapReport, IommuError> {
        let d = self.domain(dom)?;
        let mut sorted: Vec<u64> = iovas.to_vec();
        sorted.sort_unstable();
        for (i, &v) in sorted.iter().enumerate() {
            self.check_range(d, v, 0, PAGE)?;
            if i > 0 && sorted[i - 1] == v {
                return Err(IommuError::NotMapped { iova: v });
            }
            if d.table.translate(&self.mem, v).is_none() {
                return Err(IommuError::NotMapped { iova: v });
            }
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for v in sorted {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == v => *l += PAGE,
                _ => ranges.push((v, PAGE)),
            }
        }
        self.unmap_ranges(dom, &ranges)
    }

    fn unmap_ranges(
        &mut self,
        dom: DomainId,
        ranges: &[(u64, u64)],
    ) -> Result<UnmapReport, IommuError> {
        let haw_limit = self.haw_limit();
        let coherent = self.ecap.coherent();
        let Some(d) = self.domains.get_mut(&dom.0) else {
            return Err(IommuError::NoSuchDomain(dom));
        };
        let mut report = UnmapReport::default();
        let mut done_ranges: Vec<(u64, u64)> = Vec::new();
        let mut failure = None;
        'outer: for &(iova, len) in ranges {
            let end = iova + len;
            let mut pos = iova;
            while pos < end {
                let mut tm = TableMem {
                    mem: &mut self.mem,
                    host: &mut self.host,
                    coherent,
                    haw_limit,
                    deferred: &mut self.deferred,
                };
                let Some((_, _, leaf)) = d.table.translate(&tm, pos) else {
                    failure = Some(IommuError::NotMapped { iova: pos });
                    break 'outer;
                };
                let size = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K]
                    .into_iter()
                    .find(|s| *s <= leaf && pos.is_multiple_of(s.bytes()) && end - pos >= s.bytes())
                    .unwrap_or(PageSize::Size4K);
                match d.table.unmap(&mut tm, pos, size) {
                    Ok(pa) => {
                        let n = size.bytes() / PAGE;
                        let _ = self.refs.remove(pa / PAGE, n, &mut report.released);
                        report.pages += n;
                        match done_ranges.last_mut() {
                            Some((s, l)) if *s + *l == pos / PAGE => *l += n,
                            _ => done_ranges.push((pos / PAGE, n)),
                        }
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        break 'outer;
                    }
                }
                pos += size.bytes();
            }
        }
        d.live_pages -= report.pages;
        d.stats.unmapped_pages += report.pages;
        self.stats.unmapped_pages += report.pages;
        if failure.is_none() {
            d.stats.unmaps += 1;
            self.stats.unmaps += 1;
        }
        let before = self.stats.flush_descriptors;
        let plan = self.flush_range(dom.0, &done_ranges)?;
        report.descriptors = (self.stats.flush_descriptors - before) as u32;
        report.domain_flush = plan == Some(Flush::Domain);
        self.release_deferred();
        if let Some(d) = self.domains.get_mut(&dom.0) {
            d.stats.flush_descriptors += u64::from(report.descriptors);
            if !done_ranges.is_empty() {
                d.stats.waits += u64::from(self.queue.is_some());
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn plan(&self, ranges: &[(u64, u64)]) -> Flush {
        if !self.cap.psi() {
            return Flush::Domain;
        }
        let mamv = self.cap.mamv();
        let mut blocks = Vec::new();
        for &(start, pages) in ranges {
            if pages > 1u64 << mamv.min(63) {
                return Flush::Domain;
            }
            blocks.extend(psi_blocks(start, pages, mamv));
            if blocks.len() > self.cfg.max_flush_descriptors.min(254) {
                return Flush::Domain;
            }
        }
        Flush::Pages(blocks)
    }

    /// IOTLB invalidation of page ranges `(first page, pages)` of domain `did`.
    fn flush_range(
        &mut self,
        did: u16,
        ranges: &[(u64, u64)],
    ) -> Result<Option<Flush>, IommuError> {
        if ranges.iter().all(|r| r.1 == 0) {
            return Ok(None);
        }
        let plan = self.plan(ranges);
        let invs: Vec<Inv> = match &plan {
            Flush::Domain => alloc::vec![Inv::Iotlb(IotlbScope::Domain(did))],
            Flush::Pages(blocks) => blocks
                .iter()
                .map(|&(page, am)| {
                    Inv::Iotlb(IotlbScope::Page {
                        did,
                        addr: page * PAGE,
                        am,
                        ih: false,
                    })
                })
                .collect(),
        };
        self.invalidate(&invs)?;
        Ok(Some(plan))
    }

    fn release_deferred(&mut self) {
        for pa in core::mem::take(&mut self.deferred) {
            self.mem.free_table(pa);
        }
    }

    /// Detaches the domain's devices, unmaps everything (frame counts drop), flushes
    /// the domain's IOTLB entries, frees its tables and its domain id. Returns how
    /// many pages were still mapped.
    pub fn destroy_domain(&mut self, dom: DomainId) -> Result<DestroyReport, IommuError> {
        let devices: Vec<u16> = self.domain(dom)?.devices.iter().copied().collect();
        let mut report = DestroyReport {
            devices_detached: devices.len(),
            ..DestroyReport::default()
        };
        for sid in devices {
            self.detach(Bdf::from_source_id(sid))?;
        }
        let Some(d) = self.domains.remove(&dom.0) else {
            return Err(IommuError::NoSuchDomain(dom));
        };
        let mut leaves = Vec::new();
        d.table.for_each_leaf(&self.mem, |_, pa, size, _| {
            leaves.push((pa, size.bytes() / PAGE))
        });
        for (pa, n) in leaves {
            let _ = self.refs.remove(pa / PAGE, n, &mut report.released);
            report.live_pages += n;
        }
        self.stats.unmapped_pages += report.live_pages;
        if report.live_pages > 0 {
            self.invalidate(&[Inv::Iotlb(IotlbScope::Domain(dom.0))])?;
        }
        d.table.destroy(&mut self.mem);
        Ok(report)
    }

    /// Programs the fault event interrupt (MSI `data` to `addr`) and unmasks it, or
    /// masks it with `None` (then poll with [`Unit::poll_faults`]). 32-bit writes only.
    pub fn set_fault_interrupt(&mut self, msi: Option<(u32, u64)>) {
        match msi {
            Some((data, addr)) => {
                self.regs.write32(FEDATA, data);
                self.regs.write32(FEADDR, addr as u32);
                self.regs.write32(FEUADDR, (addr >> 32) as u32);
                self.regs.write32(FECTL, 0);
            }
            None => self.regs.write32(FECTL, FECTL_IM),
        }
    }

    /// Reads, decodes and clears pending fault records (starting at FSTS.FRI, at most
    /// CAP.NFR of them) and the overflow/error bits. 32-bit accesses only.
    pub fn poll_faults(&mut self) -> FaultReport {
        let mut report = FaultReport::default();
        let fsts = self.regs.read32(FSTS);
        if fsts & FSTS_PPF != 0 {
            let nfr = self.cap.num_fault_records();
            let fro = self.cap.fault_record_offset();
            let mut idx = regs::fsts_fri(fsts) % nfr;
            for _ in 0..nfr {
                let off = fro + idx * 16;
                let w3 = self.regs.read32(off + 12);
                if w3 & (1 << 31) == 0 {
                    break;
                }
                let lo =
                    u64::from(self.regs.read32(off)) | u64::from(self.regs.read32(off + 4)) << 32;
                let hi = u64::from(self.regs.read32(off + 8)) | u64::from(w3) << 32;
                let rec = FaultRecord::decode(idx, lo, hi);
                // F is write-1-to-clear.
                self.regs.write32(off + 12, 1 << 31);
                let sid = rec.source.source_id();
                if let Some(d) = self
                    .devices
                    .get(&sid)
                    .and_then(|did| self.domains.get_mut(did))
                {
                    d.stats.faults += 1;
                }
                report.records.push(rec);
                idx = (idx + 1) % nfr;
            }
        }
        let clear = fsts & (FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE);
        if clear != 0 {
            self.regs.write32(FSTS, clear);
        }
        report.overflow = fsts & FSTS_PFO != 0;
        report.errors = fsts & (FSTS_IQE | FSTS_ICE | FSTS_ITE);
        self.stats.faults += report.records.len() as u64;
        self.stats.fault_overflows += u64::from(report.overflow);
        report
    }
}

/// One invalidation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inv {
    Context(CcScope),
    Iotlb(IotlbScope),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_blocks_are_aligned_and_exact() {
        assert_eq!(psi_blocks(0, 1, 18), [(0, 0)]);
        assert_eq!(psi_blocks(3, 6, 18), [(3, 0), (4, 2), (8, 0)]);
        assert_eq!(psi_blocks(512, 512, 18), [(512, 9)]);
        assert_eq!(psi_blocks(0, 8, 2), [(0, 2), (4, 2)]);
        assert!(psi_blocks(5, 0, 18).is_empty());
        for start in 0..70u64 {
            for pages in 0..70u64 {
                let b = psi_blocks(start, pages, 3);
                let mut pos = start;
                for &(p, o) in &b {
                    assert_eq!(p, pos);
                    assert!(o <= 3);
                    assert_eq!(p % (1 << o), 0);
                    pos += 1 << o;
                }
                assert_eq!(pos, start + pages);
            }
        }
    }
}
