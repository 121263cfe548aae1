//! VT-d register offsets, capability decoding, command/status bits, invalidation
//! descriptors, root/context entries and fault records (legacy mode).
//!
//! Register access goes through [`Mmio`]. Registers listed in [`REGS_32BIT_ONLY`]
//! must be accessed 32 bits wide: QEMU 7.2 aborts on a 64-bit access to them, and
//! the spec defines them as 32-bit registers. The driver in [`crate::unit`] only
//! uses 64-bit accesses for CAP, ECAP, RTADDR, CCMD, IQH, IQT, IQA, IVA and IOTLB.

use core::fmt;

use crate::dmar::Bdf;

/// Access to one remapping unit's register page (offsets from its DRHD base).
///
/// On hardware: volatile loads/stores of exactly the given width to an uncached
/// mapping of the page. A 64-bit access is one 8-byte instruction.
pub trait Mmio {
    /// 32-bit load at `off` (4-byte aligned).
    fn read32(&self, off: usize) -> u32;
    /// 32-bit store at `off` (4-byte aligned).
    fn write32(&mut self, off: usize, value: u32);
    /// 64-bit load at `off` (8-byte aligned).
    fn read64(&self, off: usize) -> u64;
    /// 64-bit store at `off` (8-byte aligned).
    fn write64(&mut self, off: usize, value: u64);
}

/// Version register (32-bit).
pub const VER: usize = 0x00;
/// Capability register (64-bit).
pub const CAP: usize = 0x08;
/// Extended capability register (64-bit).
pub const ECAP: usize = 0x10;
/// Global command register (32-bit).
pub const GCMD: usize = 0x18;
/// Global status register (32-bit).
pub const GSTS: usize = 0x1c;
/// Root table address register (64-bit).
pub const RTADDR: usize = 0x20;
/// Context command register (64-bit).
pub const CCMD: usize = 0x28;
/// Fault status register (32-bit).
pub const FSTS: usize = 0x34;
/// Fault event control register (32-bit).
pub const FECTL: usize = 0x38;
/// Fault event data register (32-bit).
pub const FEDATA: usize = 0x3c;
/// Fault event address register (32-bit).
pub const FEADDR: usize = 0x40;
/// Fault event upper address register (32-bit).
pub const FEUADDR: usize = 0x44;
/// Protected memory enable register (32-bit).
pub const PMEN: usize = 0x64;
/// Invalidation queue head (64-bit).
pub const IQH: usize = 0x80;
/// Invalidation queue tail (64-bit).
pub const IQT: usize = 0x88;
/// Invalidation queue address (64-bit).
pub const IQA: usize = 0x90;
/// Invalidation completion status (32-bit).
pub const ICS: usize = 0x9c;
/// Invalidation event control (32-bit).
pub const IECTL: usize = 0xa0;
/// Invalidation event data (32-bit).
pub const IEDATA: usize = 0xa4;
/// Invalidation event address (32-bit).
pub const IEADDR: usize = 0xa8;
/// Invalidation event upper address (32-bit).
pub const IEUADDR: usize = 0xac;
/// Interrupt remapping table address (64-bit).
pub const IRTA: usize = 0xb8;

/// Registers that must only be accessed 32 bits wide.
pub const REGS_32BIT_ONLY: [usize; 13] = [
    GCMD, GSTS, FSTS, FECTL, FEDATA, FEADDR, FEUADDR, ICS, IECTL, IEDATA, IEADDR, IEUADDR, PMEN,
];

/// Whether a 64-bit access at `off` would touch a 32-bit-only register (either
/// half).
pub fn is_32bit_only(off: usize) -> bool {
    REGS_32BIT_ONLY.iter().any(|&r| r == off || r == off + 4)
}

/// IVA register: offset from ECAP.IRO.
pub const IVA_FROM_IRO: usize = 0;
/// IOTLB invalidate register: offset from ECAP.IRO.
pub const IOTLB_FROM_IRO: usize = 8;

/// GCMD/GSTS: translation enable / status.
pub const GCMD_TE: u32 = 1 << 31;
/// GCMD: set root table pointer; GSTS: RTPS.
pub const GCMD_SRTP: u32 = 1 << 30;
/// GCMD: set fault log.
pub const GCMD_SFL: u32 = 1 << 29;
/// GCMD: enable advanced fault logging.
pub const GCMD_EAFL: u32 = 1 << 28;
/// GCMD: write buffer flush; GSTS: WBFS (set while flushing).
pub const GCMD_WBF: u32 = 1 << 27;
/// GCMD/GSTS: queued invalidation enable / status.
pub const GCMD_QIE: u32 = 1 << 26;
/// GCMD/GSTS: interrupt remapping enable / status.
pub const GCMD_IRE: u32 = 1 << 25;
/// GCMD: set interrupt remapping table pointer.
pub const GCMD_SIRTP: u32 = 1 << 24;
/// GCMD/GSTS: compatibility format interrupts.
pub const GCMD_CFI: u32 = 1 << 23;
/// GCMD bits that stay set (enables); every other bit is a one-shot command.
pub const GCMD_PERSISTENT: u32 = GCMD_TE | GCMD_EAFL | GCMD_QIE | GCMD_IRE | GCMD_CFI;

/// GSTS: translation enabled.
pub const GSTS_TES: u32 = GCMD_TE;
/// GSTS: root table pointer set.
pub const GSTS_RTPS: u32 = GCMD_SRTP;
/// GSTS: write buffer flush in progress.
pub const GSTS_WBFS: u32 = GCMD_WBF;
/// GSTS: queued invalidation enabled.
pub const GSTS_QIES: u32 = GCMD_QIE;
/// GSTS: interrupt remapping enabled.
pub const GSTS_IRES: u32 = GCMD_IRE;

/// FSTS: primary fault overflow (write 1 to clear).
pub const FSTS_PFO: u32 = 1 << 0;
/// FSTS: primary pending fault (read-only: some F bit is set).
pub const FSTS_PPF: u32 = 1 << 1;
/// FSTS: advanced fault overflow.
pub const FSTS_AFO: u32 = 1 << 2;
/// FSTS: advanced pending fault.
pub const FSTS_APF: u32 = 1 << 3;
/// FSTS: invalidation queue error (write 1 to clear).
pub const FSTS_IQE: u32 = 1 << 4;
/// FSTS: invalidation completion error (write 1 to clear).
pub const FSTS_ICE: u32 = 1 << 5;
/// FSTS: invalidation time-out error (write 1 to clear).
pub const FSTS_ITE: u32 = 1 << 6;
/// FSTS: the write-1-to-clear error bits.
pub const FSTS_W1C: u32 = FSTS_PFO | FSTS_AFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;
/// FSTS: index of the first pending fault record (bits 15:8).
pub const fn fsts_fri(fsts: u32) -> usize {
    ((fsts >> 8) & 0xff) as usize
}

/// FECTL: interrupt mask (set at reset).
pub const FECTL_IM: u32 = 1 << 31;
/// FECTL: interrupt pending.
pub const FECTL_IP: u32 = 1 << 30;

/// ICS: invalidation wait descriptor complete (write 1 to clear).
pub const ICS_IWC: u32 = 1;

/// CCMD: invalidate context cache (set to start, hardware clears when done).
pub const CCMD_ICC: u64 = 1 << 63;
/// IOTLB register: invalidate IOTLB (set to start, cleared when done).
pub const IOTLB_IVT: u64 = 1 << 63;

/// The capability register.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    fn bits(self, lo: u32, n: u32) -> u64 {
        (self.0 >> lo) & ((1 << n) - 1)
    }
    /// ND: bits of domain id (4 + 2 * ND).
    pub fn domain_id_bits(self) -> u32 {
        4 + 2 * self.bits(0, 3) as u32
    }
    /// Number of domain ids (`2^bits`; id 0 is never used by the driver).
    pub fn num_domains(self) -> u32 {
        1 << self.domain_id_bits().min(16)
    }
    /// RWBF: table writes need a write-buffer flush before hardware sees them.
    pub fn rwbf(self) -> bool {
        self.bits(4, 1) != 0
    }
    /// CM: caching mode (not-present and invalid entries may be cached: flush on
    /// map too).
    pub fn caching_mode(self) -> bool {
        self.bits(7, 1) != 0
    }
    /// SAGAW bit field: bit 1 = 39-bit 3-level, bit 2 = 48-bit 4-level, bit 3 =
    /// 57-bit 5-level.
    pub fn sagaw(self) -> u8 {
        self.bits(8, 5) as u8
    }
    /// Whether second-level tables with `levels` levels (3, 4, 5) are supported.
    pub fn supports_levels(self, levels: u8) -> bool {
        (2..=6).contains(&levels) && self.sagaw() & (1 << (levels - 2)) != 0
    }
    /// MGAW: maximum guest (input) address width in bits.
    pub fn mgaw(self) -> u8 {
        self.bits(16, 6) as u8 + 1
    }
    /// ZLR: zero-length reads supported.
    pub fn zlr(self) -> bool {
        self.bits(22, 1) != 0
    }
    /// FRO: byte offset of the first fault recording register.
    pub fn fault_record_offset(self) -> usize {
        self.bits(24, 10) as usize * 16
    }
    /// SLLPS bit field: bit 0 = 2 MiB, bit 1 = 1 GiB second-level pages.
    pub fn sllps(self) -> u8 {
        self.bits(34, 4) as u8
    }
    /// PSI: page-selective IOTLB invalidation supported.
    pub fn psi(self) -> bool {
        self.bits(39, 1) != 0
    }
    /// NFR: number of fault recording registers.
    pub fn num_fault_records(self) -> usize {
        self.bits(40, 8) as usize + 1
    }
    /// MAMV: largest address mask for page-selective invalidation (2^MAMV pages).
    pub fn mamv(self) -> u8 {
        self.bits(48, 6) as u8
    }
    /// DWD: write draining supported.
    pub fn dwd(self) -> bool {
        self.bits(54, 1) != 0
    }
    /// DRD: read draining supported.
    pub fn drd(self) -> bool {
        self.bits(55, 1) != 0
    }
    /// PI: posted interrupts supported.
    pub fn pi(self) -> bool {
        self.bits(59, 1) != 0
    }
}

impl fmt::Debug for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CAP {:#x} (domain ids {} bits, SAGAW {:#x}, MGAW {}, SLLPS {:#x}, CM {}, RWBF {}, PSI {} MAMV {}, {} fault record(s) at {:#x})",
            self.0,
            self.domain_id_bits(),
            self.sagaw(),
            self.mgaw(),
            self.sllps(),
            u8::from(self.caching_mode()),
            u8::from(self.rwbf()),
            u8::from(self.psi()),
            self.mamv(),
            self.num_fault_records(),
            self.fault_record_offset()
        )
    }
}

/// The extended capability register.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ecap(pub u64);

impl Ecap {
    fn bit(self, n: u32) -> bool {
        (self.0 >> n) & 1 != 0
    }
    /// C: page walks snoop CPU caches (if false, table writes must be flushed
    /// from the CPU cache, e.g. with clflush).
    pub fn coherent(self) -> bool {
        self.bit(0)
    }
    /// QI: queued invalidation supported.
    pub fn qi(self) -> bool {
        self.bit(1)
    }
    /// DT: device-TLBs supported.
    pub fn dt(self) -> bool {
        self.bit(2)
    }
    /// IR: interrupt remapping supported.
    pub fn ir(self) -> bool {
        self.bit(3)
    }
    /// EIM: extended (x2APIC) interrupt mode.
    pub fn eim(self) -> bool {
        self.bit(4)
    }
    /// PT: pass-through translation type supported.
    pub fn pass_through(self) -> bool {
        self.bit(6)
    }
    /// SC: snoop control (SNP bit in second-level leaves).
    pub fn snoop_control(self) -> bool {
        self.bit(7)
    }
    /// IRO: byte offset of the IOTLB registers (IVA, then IOTLB at +8).
    pub fn iotlb_offset(self) -> usize {
        ((self.0 >> 8) & 0x3ff) as usize * 16
    }
    /// MHMV: maximum handle mask value (interrupt entry cache).
    pub fn mhmv(self) -> u8 {
        ((self.0 >> 20) & 0xf) as u8
    }
    /// SMTS: scalable mode translation supported (not used here).
    pub fn smts(self) -> bool {
        self.bit(43)
    }
}

impl fmt::Debug for Ecap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ECAP {:#x} (C {}, QI {}, DT {}, IR {}, PT {}, SC {}, IOTLB regs at {:#x})",
            self.0,
            u8::from(self.coherent()),
            u8::from(self.qi()),
            u8::from(self.dt()),
            u8::from(self.ir()),
            u8::from(self.pass_through()),
            u8::from(self.snoop_control()),
            self.iotlb_offset()
        )
    }
}

/// Context-cache invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CcScope {
    /// Everything.
    Global,
    /// Entries tagged with a domain id.
    Domain(u16),
    /// One device's entry (`did` is the domain id the entry had, 0 if it was not
    /// present).
    Device {
        /// Domain id of the cached entry.
        did: u16,
        /// The device.
        sid: u16,
    },
}

/// IOTLB invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbScope {
    /// Everything.
    Global,
    /// All entries of a domain id.
    Domain(u16),
    /// `2^am` pages at `addr` (aligned to that size) of a domain id. `ih` (invalidation
    /// hint) says non-leaf entries did not change.
    Page {
        /// Domain id.
        did: u16,
        /// First byte (aligned to `4096 << am`).
        addr: u64,
        /// Address mask: log2 of the page count.
        am: u8,
        /// Invalidation hint (leaf-only change).
        ih: bool,
    },
}

/// Queued invalidation descriptor types (bits 3:0).
pub mod desc {
    /// Context-cache invalidate.
    pub const TYPE_CC: u64 = 1;
    /// IOTLB invalidate.
    pub const TYPE_IOTLB: u64 = 2;
    /// Invalidation wait.
    pub const TYPE_WAIT: u64 = 5;
    /// Wait: interrupt flag (never set together with SW: QEMU 7.2 asserts).
    pub const WAIT_IF: u64 = 1 << 4;
    /// Wait: status write.
    pub const WAIT_SW: u64 = 1 << 5;
    /// Wait: fence.
    pub const WAIT_FN: u64 = 1 << 6;
}

/// A context-cache invalidation descriptor: `1 | G<<4 | DID<<16 | SID<<32 | FM<<48`.
pub fn cc_descriptor(scope: CcScope) -> [u64; 2] {
    let lo = match scope {
        CcScope::Global => 1 << 4,
        CcScope::Domain(did) => 2 << 4 | u64::from(did) << 16,
        CcScope::Device { did, sid } => 3 << 4 | u64::from(did) << 16 | u64::from(sid) << 32,
    };
    [desc::TYPE_CC | lo, 0]
}

/// An IOTLB invalidation descriptor: `2 | G<<4 | DW<<6 | DR<<7 | DID<<16`, hi =
/// `ADDR | IH<<6 | AM`. `drain` sets DR and DW (pass what CAP.DRD/DWD allow).
pub fn iotlb_descriptor(scope: IotlbScope, drain_read: bool, drain_write: bool) -> [u64; 2] {
    let mut lo = desc::TYPE_IOTLB;
    if drain_write {
        lo |= 1 << 6;
    }
    if drain_read {
        lo |= 1 << 7;
    }
    match scope {
        IotlbScope::Global => [lo | 1 << 4, 0],
        IotlbScope::Domain(did) => [lo | 2 << 4 | u64::from(did) << 16, 0],
        IotlbScope::Page { did, addr, am, ih } => [
            lo | 3 << 4 | u64::from(did) << 16,
            (addr & !0xfff) | u64::from(ih) << 6 | u64::from(am & 0x3f),
        ],
    }
}

/// An invalidation wait descriptor with status write: `5 | SW<<5 | data<<32`, hi =
/// the status dword's address (4-byte aligned). No IF bit.
pub fn wait_descriptor(status_data: u32, status_addr: u64) -> [u64; 2] {
    [
        desc::TYPE_WAIT | desc::WAIT_SW | u64::from(status_data) << 32,
        status_addr & !3,
    ]
}

/// The CCMD register value for a register-based context-cache invalidation
/// (ICC | CIRG<<61 | FM<<32 | SID<<16 | DID).
pub fn ccmd_value(scope: CcScope) -> u64 {
    CCMD_ICC
        | match scope {
            CcScope::Global => 1 << 61,
            CcScope::Domain(did) => 2 << 61 | u64::from(did),
            CcScope::Device { did, sid } => 3 << 61 | u64::from(sid) << 16 | u64::from(did),
        }
}

/// The (IVA, IOTLB) register values for a register-based IOTLB invalidation
/// (IVA is only written for page-selective ones).
pub fn iotlb_reg_values(
    scope: IotlbScope,
    drain_read: bool,
    drain_write: bool,
) -> (Option<u64>, u64) {
    let mut v = IOTLB_IVT;
    if drain_read {
        v |= 1 << 49;
    }
    if drain_write {
        v |= 1 << 48;
    }
    match scope {
        IotlbScope::Global => (None, v | 1 << 60),
        IotlbScope::Domain(did) => (None, v | 2 << 60 | u64::from(did) << 32),
        IotlbScope::Page { did, addr, am, ih } => (
            Some((addr & !0xfff) | u64::from(ih) << 6 | u64::from(am & 0x3f)),
            v | 3 << 60 | u64::from(did) << 32,
        ),
    }
}

/// IOTLB register: actual granularity the hardware used (IAIG, bits 58:57; 0 =
/// the request was not performed).
pub fn iotlb_iaig(v: u64) -> u8 {
    ((v >> 57) & 3) as u8
}

/// CCMD: actual granularity (CAIG, bits 60:59; 0 = not performed).
pub fn ccmd_caig(v: u64) -> u8 {
    ((v >> 59) & 3) as u8
}

/// Context entry translation type: second-level translation of untranslated
/// requests.
pub const TT_TRANSLATE: u64 = 0;
/// Context entry translation type: pass-through (needs ECAP.PT).
pub const TT_PASS_THROUGH: u64 = 2;

/// A root entry (128 bits) pointing at the context table at `ctp`, present.
pub fn root_entry(ctp: u64) -> [u64; 2] {
    [(ctp & !0xfff) | 1, 0]
}

/// A present context entry: lo = SLPTPTR | TT<<2 | P, hi = DID<<8 | AW, with AW =
/// `levels - 2` (1 = 39-bit 3-level, 2 = 48-bit 4-level, 3 = 57-bit 5-level).
pub fn context_entry(slptptr: u64, tt: u64, did: u16, levels: u8) -> [u64; 2] {
    [
        (slptptr & !0xfff) | (tt & 3) << 2 | 1,
        u64::from(did) << 8 | u64::from(levels.saturating_sub(2) & 7),
    ]
}

/// The domain id in a context entry's high half.
pub fn context_did(hi: u64) -> u16 {
    (hi >> 8) as u16
}

/// One decoded primary fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Index of the recording register it came from.
    pub index: usize,
    /// The requester.
    pub source: Bdf,
    /// Page address of the faulting request (bits 63:12 of FI); for interrupt
    /// remapping faults the interrupt index is in bits 63:48.
    pub addr: u64,
    /// Fault reason code.
    pub reason: u8,
    /// Whether the request was a write (T = 0) rather than a read (T = 1).
    pub write: bool,
}

impl FaultRecord {
    /// Decodes the 128-bit record `(lo, hi)` read from register `index`.
    pub fn decode(index: usize, lo: u64, hi: u64) -> FaultRecord {
        FaultRecord {
            index,
            source: Bdf::from_source_id(hi as u16),
            addr: lo & !0xfff,
            reason: (hi >> 32) as u8,
            write: hi & (1 << 62) == 0,
        }
    }

    /// A name for the reason code.
    pub fn reason_name(&self) -> &'static str {
        fault_reason_name(self.reason)
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA {} from {} at {:#x}: reason {:#x} ({})",
            if self.write { "write" } else { "read" },
            self.source,
            self.addr,
            self.reason,
            self.reason_name()
        )
    }
}

/// The name of a fault reason code (VT-d spec, appendix A).
pub fn fault_reason_name(reason: u8) -> &'static str {
    match reason {
        0x1 => "root entry not present",
        0x2 => "context entry not present",
        0x3 => "invalid context entry",
        0x4 => "address beyond the guest address width",
        0x5 => "write not permitted (page not present or read-only)",
        0x6 => "read not permitted (page not present or write-only)",
        0x7 => "cannot access a second-level table",
        0x8 => "cannot access the root table",
        0x9 => "cannot access the context table",
        0xa => "reserved bit set in a root entry",
        0xb => "reserved bit set in a context entry",
        0xc => "reserved bit set in a second-level entry",
        0xd => "blocked by the context entry's translation type",
        0x20..=0x26 => "interrupt remapping fault",
        _ => "unknown fault reason",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_CAP: u64 = 0xd2_008c_2226_0206;

    #[test]
    fn qemu_cap_decodes_as_vtd_md_says() {
        let c = Cap(QEMU_CAP);
        assert_eq!(c.domain_id_bits(), 16);
        assert_eq!(c.num_domains(), 65536);
        assert!(!c.caching_mode());
        assert!(!c.rwbf());
        assert_eq!(c.sagaw(), 0b10);
        assert!(c.supports_levels(3));
        assert!(!c.supports_levels(4));
        assert!(!c.supports_levels(5));
        assert_eq!(c.mgaw(), 39);
        assert_eq!(c.fault_record_offset(), 0x220);
        assert_eq!(c.num_fault_records(), 1);
        assert_eq!(c.sllps(), 3);
        assert!(c.psi());
        assert_eq!(c.mamv(), 18);
        assert!(c.dwd() && c.drd());
        assert!(!c.zlr());
        assert!(!c.pi());
        assert!(format!("{c:?}").contains("MGAW 39"));
        // aw-bits=48 adds 4-level (SAGAW bit 2) and MGAW 48; caching-mode=on sets CM.
        let c48 = Cap(QEMU_CAP | 4 << 8 | 1 << 7);
        assert!(c48.supports_levels(4) && c48.caching_mode());
    }

    #[test]
    fn qemu_ecap_decodes() {
        let e = Ecap(0xf42);
        assert!(e.qi() && e.pass_through());
        assert!(!e.coherent() && !e.ir() && !e.snoop_control() && !e.dt());
        assert_eq!(e.iotlb_offset(), 0xf0);
        let e = Ecap(0xf0_0f4a);
        assert!(e.ir() && e.qi());
        assert_eq!(e.mhmv(), 0xf);
        assert!(!e.smts());
        assert!(format!("{e:?}").contains("IOTLB regs at 0xf0"));
        assert!(Ecap(0xf42 | 1 << 7).snoop_control());
    }

    #[test]
    fn thirty_two_bit_only_registers() {
        for r in REGS_32BIT_ONLY {
            assert!(is_32bit_only(r));
        }
        // A 64-bit access at 0x18 covers GCMD and GSTS; at 0x30 it covers FSTS.
        assert!(is_32bit_only(0x30));
        assert!(is_32bit_only(0x40));
        for ok in [CAP, ECAP, RTADDR, CCMD, IQH, IQT, IQA, IRTA, 0xf0, 0xf8] {
            assert!(!is_32bit_only(ok), "{ok:#x}");
        }
    }

    #[test]
    fn descriptors_match_vtd_md() {
        assert_eq!(
            cc_descriptor(CcScope::Device {
                did: 7,
                sid: 0x0010
            }),
            [1 | 3 << 4 | 7 << 16 | 0x10 << 32, 0]
        );
        assert_eq!(cc_descriptor(CcScope::Global), [0x11, 0]);
        assert_eq!(cc_descriptor(CcScope::Domain(3)), [1 | 2 << 4 | 3 << 16, 0]);
        assert_eq!(
            iotlb_descriptor(
                IotlbScope::Page {
                    did: 5,
                    addr: 0x1234_5000,
                    am: 2,
                    ih: true
                },
                true,
                false
            ),
            [2 | 3 << 4 | 1 << 7 | 5 << 16, 0x1234_5000 | 1 << 6 | 2]
        );
        assert_eq!(
            iotlb_descriptor(IotlbScope::Global, false, false),
            [0x12, 0]
        );
        assert_eq!(
            iotlb_descriptor(IotlbScope::Domain(9), false, true),
            [2 | 2 << 4 | 1 << 6 | 9 << 16, 0]
        );
        assert_eq!(
            wait_descriptor(0xabcd, 0x9000_0004),
            [5 | 1 << 5 | 0xabcd << 32, 0x9000_0004]
        );
        assert_eq!(wait_descriptor(1, 0x9000)[0] & desc::WAIT_IF, 0);
        assert_eq!(
            ccmd_value(CcScope::Device { did: 2, sid: 0x18 }),
            1 << 63 | 3 << 61 | 0x18 << 16 | 2
        );
        assert_eq!(ccmd_value(CcScope::Domain(4)), 1 << 63 | 2 << 61 | 4);
        assert_eq!(
            iotlb_reg_values(
                IotlbScope::Page {
                    did: 3,
                    addr: 0x5000,
                    am: 0,
                    ih: false
                },
                true,
                true
            ),
            (
                Some(0x5000),
                1 << 63 | 3 << 60 | 1 << 49 | 1 << 48 | 3 << 32
            )
        );
        assert_eq!(
            iotlb_reg_values(IotlbScope::Global, false, false),
            (None, 1 << 63 | 1 << 60)
        );
        assert_eq!(iotlb_iaig(3 << 57), 3);
        assert_eq!(ccmd_caig(1 << 59), 1);
        assert_eq!(root_entry(0x7000_0fff), [0x7000_0001, 0]);
        let ce = context_entry(0x8000_0000, TT_TRANSLATE, 0x1234, 3);
        assert_eq!(ce, [0x8000_0001, 0x1234 << 8 | 1]);
        assert_eq!(context_did(ce[1]), 0x1234);
        assert_eq!(
            context_entry(0x8000_0000, TT_PASS_THROUGH, 1, 4),
            [0x8000_0009, 0x102]
        );
    }

    #[test]
    fn fault_records() {
        // QEMU: lo = page address, hi = SID | FR<<32 | T<<62 (read) | F<<63.
        let r = FaultRecord::decode(0, 0x1234_5678, 0x0010 | 6 << 32 | 1 << 62 | 1 << 63);
        assert_eq!(r.source, Bdf::new(0, 2, 0));
        assert_eq!(r.addr, 0x1234_5000);
        assert_eq!(r.reason, 6);
        assert!(!r.write);
        assert_eq!(
            r.to_string(),
            "DMA read from 00:02.0 at 0x12345000: reason 0x6 (read not permitted (page not present or write-only))"
        );
        let w = FaultRecord::decode(0, 0x8000, 0x0318 | 5 << 32 | 1 << 63);
        assert!(w.write);
        assert_eq!(w.source, Bdf::new(3, 3, 0));
        assert_eq!(
            w.reason_name(),
            "write not permitted (page not present or read-only)"
        );
        for code in 0..=255u8 {
            assert!(!fault_reason_name(code).is_empty());
        }
        assert_eq!(fault_reason_name(2), "context entry not present");
        assert_eq!(fsts_fri(0x0302), 3);
    }
}
