//! The ACPI DMAR table (DMA remapping reporting), parsed from its bytes.
//!
//! Layout (VT-d spec chapter 8): the 36-byte ACPI header, host address width (the
//! value plus one, in bits), flags, 10 reserved bytes, then remapping structures, each starting with
//! `type: u16, length: u16`. DRHD (type 0) describes one remapping unit and RMRR
//! (type 1) a reserved memory region; both carry device scopes. Every other type
//! (ATSR, RHSA, ANDD, SATC, ...) is skipped by its length and listed in
//! [`Dmar::skipped`].
//!
//! Every length is checked against the bytes present and against the structure that
//! contains it; a malformed table gives a [`DmarError`] naming the structure and its
//! offset, never a panic.

use alloc::vec::Vec;
use core::fmt;

/// Size of the ACPI header plus the DMAR fields before the first structure.
pub const DMAR_HEADER_LEN: usize = 48;
/// DMAR flags bit 0: interrupt remapping supported.
pub const DMAR_INTR_REMAP: u8 = 1 << 0;
/// DMAR flags bit 1: x2APIC opt-out requested by firmware.
pub const DMAR_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DMAR flags bit 2: DMA control opt-in (platform wants DMA protection kept on).
pub const DMAR_DMA_CTRL_PLATFORM_OPT_IN: u8 = 1 << 2;
/// DRHD flags bit 0: the unit covers every PCI device of its segment not listed by
/// another unit.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;

const DRHD_LEN: usize = 16;
const RMRR_LEN: usize = 24;
const SCOPE_LEN: usize = 6;

/// A PCI address: segment-local bus, device (0..32) and function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (5 bits).
    pub dev: u8,
    /// Function number (3 bits).
    pub func: u8,
}

impl Bdf {
    /// `bus:dev.func`; `dev` and `func` are masked to 5 and 3 bits.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Bdf {
        Bdf {
            bus,
            dev: dev & 0x1f,
            func: func & 7,
        }
    }
    /// The 16-bit requester/source id: `bus << 8 | dev << 3 | func`.
    pub const fn source_id(self) -> u16 {
        (self.bus as u16) << 8 | (self.dev as u16) << 3 | self.func as u16
    }
    /// The address with this source id.
    pub const fn from_source_id(sid: u16) -> Bdf {
        Bdf::new((sid >> 8) as u8, (sid >> 3) as u8 & 0x1f, sid as u8 & 7)
    }
    /// `dev << 3 | func`, the index in a bus's context table.
    pub const fn devfn(self) -> u8 {
        self.dev << 3 | self.func
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// What a device scope names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeType {
    /// 1: a PCI endpoint.
    PciEndpoint,
    /// 2: a PCI bridge and everything below it.
    PciSubHierarchy,
    /// 3: an I/O APIC (enumeration id = its APIC id).
    IoApic,
    /// 4: an HPET (enumeration id = its number).
    MsiHpet,
    /// 5: an ACPI namespace device (enumeration id from ANDD).
    AcpiNamespace,
    /// Any other value.
    Other(u8),
}

impl ScopeType {
    fn from_u8(v: u8) -> ScopeType {
        match v {
            1 => ScopeType::PciEndpoint,
            2 => ScopeType::PciSubHierarchy,
            3 => ScopeType::IoApic,
            4 => ScopeType::MsiHpet,
            5 => ScopeType::AcpiNamespace,
            o => ScopeType::Other(o),
        }
    }
}

/// One device scope entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    /// What it names.
    pub kind: ScopeType,
    /// Flags byte (VT-d 3.x; reserved before).
    pub flags: u8,
    /// I/O APIC id, HPET number or ACPI device number (0 for PCI scopes).
    pub enumeration_id: u8,
    /// Bus where the path starts.
    pub start_bus: u8,
    /// (device, function) hops from `start_bus`: all but the last are bridges.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// The PCI address the path ends at. `secondary_bus(bridge)` returns the
    /// secondary bus number of the bridge at `bridge` (read from its config space);
    /// it is only called for paths longer than one hop. `None` when a bridge on the
    /// way is unknown or the path is empty.
    pub fn target(&self, mut secondary_bus: impl FnMut(Bdf) -> Option<u8>) -> Option<Bdf> {
        let (&(dev, func), hops) = self.path.split_last()?;
        let mut bus = self.start_bus;
        for &(d, f) in hops {
            bus = secondary_bus(Bdf::new(bus, d, f))?;
        }
        Some(Bdf::new(bus, dev, func))
    }
}

/// A DMA remapping hardware unit (DRHD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// Byte offset of the structure in the table.
    pub offset: usize,
    /// Flags ([`DRHD_INCLUDE_PCI_ALL`]).
    pub flags: u8,
    /// Size field: register set is `2^size` 4 KiB pages (VT-d 3.x; 0 before).
    pub size: u8,
    /// PCI segment.
    pub segment: u16,
    /// Physical address of the register set.
    pub register_base: u64,
    /// Devices under the unit (ignored for PCI devices when INCLUDE_PCI_ALL).
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    /// Whether the unit covers all PCI devices of its segment that no other unit
    /// lists.
    pub fn include_pci_all(&self) -> bool {
        self.flags & DRHD_INCLUDE_PCI_ALL != 0
    }
    /// Bytes of the register set: `2^size` pages, at least one page.
    pub fn register_len(&self) -> u64 {
        4096u64 << (self.size & 0xf)
    }
}

/// A reserved memory region (RMRR): memory that listed devices DMA to (USB legacy
/// emulation, GPU stolen memory) and that must stay identity mapped for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    /// Byte offset of the structure in the table.
    pub offset: usize,
    /// PCI segment.
    pub segment: u16,
    /// First byte (4 KiB aligned).
    pub base: u64,
    /// Last byte (inclusive; the page it ends is 4 KiB aligned + 0xfff).
    pub limit: u64,
    /// Devices that use the region.
    pub scopes: Vec<DeviceScope>,
}

/// The parsed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dmar {
    /// Host (DMA) physical address width in bits (the field + 1).
    pub host_address_width: u8,
    /// DMAR flags ([`DMAR_INTR_REMAP`], ...).
    pub flags: u8,
    /// Remapping units in table order.
    pub units: Vec<Drhd>,
    /// Reserved memory regions.
    pub reserved: Vec<Rmrr>,
    /// Structures skipped by length: (type, offset).
    pub skipped: Vec<(u16, usize)>,
}

/// Which part of the table an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    /// The ACPI header and DMAR fixed fields.
    Header,
    /// A remapping structure header of unknown or any type.
    Remapping(u16),
    /// A DRHD.
    Drhd,
    /// An RMRR.
    Rmrr,
    /// A device scope inside a DRHD/RMRR.
    DeviceScope,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Header => f.write_str("DMAR header"),
            Structure::Remapping(t) => write!(f, "remapping structure (type {t})"),
            Structure::Drhd => f.write_str("DRHD"),
            Structure::Rmrr => f.write_str("RMRR"),
            Structure::DeviceScope => f.write_str("device scope"),
        }
    }
}

/// What is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarProblem {
    /// The signature is not "DMAR".
    BadSignature([u8; 4]),
    /// The header's length field is below the fixed part.
    LengthTooSmall(u32),
    /// The table (or structure) claims `claimed` bytes but only `available` remain.
    Truncated {
        /// Bytes the length field claims.
        claimed: usize,
        /// Bytes actually there.
        available: usize,
    },
    /// A length field smaller than the structure's fixed part (or a device scope
    /// length that is not 6 + 2n).
    BadLength {
        /// The length field.
        length: usize,
        /// Minimum for this structure.
        minimum: usize,
    },
    /// The byte sum of the table is not zero.
    BadChecksum(u8),
}

/// A malformed DMAR table: `problem` in `structure` at byte `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmarError {
    /// The structure being parsed.
    pub structure: Structure,
    /// Its byte offset in the table.
    pub offset: usize,
    /// What is wrong.
    pub problem: DmarProblem,
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ACPI DMAR table: {} at offset {:#x}: ",
            self.structure, self.offset
        )?;
        match self.problem {
            DmarProblem::BadSignature(s) => write!(f, "signature {s:02x?} is not \"DMAR\""),
            DmarProblem::LengthTooSmall(l) => write!(
                f,
                "table length {l} is below the {DMAR_HEADER_LEN}-byte fixed part"
            ),
            DmarProblem::Truncated { claimed, available } => write!(
                f,
                "claims {claimed} bytes but only {available} are there (firmware table truncated)"
            ),
            DmarProblem::BadLength { length, minimum } => {
                write!(f, "length {length} is invalid (minimum {minimum})")
            }
            DmarProblem::BadChecksum(sum) => {
                write!(f, "byte sum is {sum:#04x}, not 0 (corrupt table)")
            }
        }?;
        f.write_str("; the IOMMU cannot be used with this table")
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn err(structure: Structure, offset: usize, problem: DmarProblem) -> DmarError {
    DmarError {
        structure,
        offset,
        problem,
    }
}

/// Parses the device scopes filling `bytes` (the tail of a DRHD/RMRR whose own
/// length was already checked); `base` is the offset of `bytes` in the table.
fn parse_scopes(bytes: &[u8], base: usize) -> Result<Vec<DeviceScope>, DmarError> {
    let mut scopes = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let here = base + off;
        let available = bytes.len() - off;
        if available < 2 {
            return Err(err(
                Structure::DeviceScope,
                here,
                DmarProblem::Truncated {
                    claimed: SCOPE_LEN,
                    available,
                },
            ));
        }
        let len = usize::from(bytes[off + 1]);
        if len < SCOPE_LEN || !(len - SCOPE_LEN).is_multiple_of(2) {
            return Err(err(
                Structure::DeviceScope,
                here,
                DmarProblem::BadLength {
                    length: len,
                    minimum: SCOPE_LEN,
                },
            ));
        }
        if len > available {
            return Err(err(
                Structure::DeviceScope,
                here,
                DmarProblem::Truncated {
                    claimed: len,
                    available,
                },
            ));
        }
        let s = &bytes[off..off + len];
        scopes.push(DeviceScope {
            kind: ScopeType::from_u8(s[0]),
            flags: s[2],
            enumeration_id: s[4],
            start_bus: s[5],
            path: s[SCOPE_LEN..]
                .chunks_exact(2)
                .map(|p| (p[0], p[1]))
                .collect(),
        });
        off += len;
    }
    Ok(scopes)
}

impl Dmar {
    /// Parses a whole DMAR table (ACPI header included). Bytes past the header's
    /// length field are ignored; the checksum must be right.
    pub fn parse(bytes: &[u8]) -> Result<Dmar, DmarError> {
        let hdr = |problem| err(Structure::Header, 0, problem);
        if bytes.len() < DMAR_HEADER_LEN {
            return Err(hdr(DmarProblem::Truncated {
                claimed: DMAR_HEADER_LEN,
                available: bytes.len(),
            }));
        }
        let sig = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if &sig != b"DMAR" {
            return Err(hdr(DmarProblem::BadSignature(sig)));
        }
        let length = u32_at(bytes, 4);
        let len = length as usize;
        if len < DMAR_HEADER_LEN {
            return Err(hdr(DmarProblem::LengthTooSmall(length)));
        }
        if len > bytes.len() {
            return Err(hdr(DmarProblem::Truncated {
                claimed: len,
                available: bytes.len(),
            }));
        }
        let table = &bytes[..len];
        let sum = table.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        if sum != 0 {
            return Err(hdr(DmarProblem::BadChecksum(sum)));
        }
        let mut dmar = Dmar {
            host_address_width: table[36].saturating_add(1),
            flags: table[37],
            units: Vec::new(),
            reserved: Vec::new(),
            skipped: Vec::new(),
        };
        let mut off = DMAR_HEADER_LEN;
        while off < len {
            let available = len - off;
            if available < 4 {
                return Err(err(
                    Structure::Remapping(0),
                    off,
                    DmarProblem::Truncated {
                        claimed: 4,
                        available,
                    },
                ));
            }
            let kind = u16_at(table, off);
            let slen = usize::from(u16_at(table, off + 2));
            let (structure, minimum) = match kind {
                0 => (Structure::Drhd, DRHD_LEN),
                1 => (Structure::Rmrr, RMRR_LEN),
                t => (Structure::Remapping(t), 4),
            };
            if slen < minimum {
                return Err(err(
                    structure,
                    off,
                    DmarProblem::BadLength {
                        length: slen,
                        minimum,
                    },
                ));
            }
            if slen > available {
                return Err(err(
                    structure,
                    off,
                    DmarProblem::Truncated {
                        claimed: slen,
                        available,
                    },
                ));
            }
            let s = &table[off..off + slen];
            match kind {
                0 => dmar.units.push(Drhd {
                    offset: off,
                    flags: s[4],
                    size: s[5],
                    segment: u16_at(s, 6),
                    register_base: u64_at(s, 8),
                    scopes: parse_scopes(&s[DRHD_LEN..], off + DRHD_LEN)?,
                }),
                1 => dmar.reserved.push(Rmrr {
                    offset: off,
                    segment: u16_at(s, 6),
                    base: u64_at(s, 8),
                    limit: u64_at(s, 16),
                    scopes: parse_scopes(&s[RMRR_LEN..], off + RMRR_LEN)?,
                }),
                t => dmar.skipped.push((t, off)),
            }
            off += slen;
        }
        Ok(dmar)
    }

    /// Index in [`Dmar::units`] of the unit that translates DMA from `bdf` in
    /// `segment`: a unit listing it as an endpoint, else one listing a bridge above
    /// it, else the segment's INCLUDE_PCI_ALL unit.
    ///
    /// `bridge_buses(bridge)` returns the (secondary, subordinate) bus numbers of the
    /// bridge at `bridge`, read from config space; `None` if it is not a bridge.
    pub fn unit_for(
        &self,
        segment: u16,
        bdf: Bdf,
        mut bridge_buses: impl FnMut(Bdf) -> Option<(u8, u8)>,
    ) -> Option<usize> {
        let mut under_bridge = None;
        for (i, unit) in self.units.iter().enumerate() {
            if unit.segment != segment {
                continue;
            }
            for scope in &unit.scopes {
                let target = scope.target(|b| bridge_buses(b).map(|(sec, _)| sec));
                match (scope.kind, target) {
                    (ScopeType::PciEndpoint, Some(t)) if t == bdf => return Some(i),
                    (ScopeType::PciSubHierarchy, Some(t)) => {
                        if t == bdf {
                            return Some(i);
                        }
                        if let Some((sec, sub)) = bridge_buses(t) {
                            if (sec..=sub).contains(&bdf.bus) && under_bridge.is_none() {
                                under_bridge = Some(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        under_bridge.or_else(|| {
            self.units
                .iter()
                .position(|u| u.segment == segment && u.include_pci_all())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Builds tables the way firmware (and QEMU's `build_dmar_q35`) lays them out.
    pub(crate) struct TableBuilder {
        bytes: Vec<u8>,
    }

    pub(crate) fn scope(kind: u8, id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
        let mut s = vec![kind, (6 + 2 * path.len()) as u8, 0, 0, id, bus];
        for &(d, f) in path {
            s.extend_from_slice(&[d, f]);
        }
        s
    }

    impl TableBuilder {
        pub(crate) fn new(haw: u8, flags: u8) -> Self {
            let mut bytes = vec![0u8; DMAR_HEADER_LEN];
            bytes[..4].copy_from_slice(b"DMAR");
            bytes[8] = 1;
            bytes[10..16].copy_from_slice(b"BOCHS ");
            bytes[36] = haw - 1;
            bytes[37] = flags;
            TableBuilder { bytes }
        }
        pub(crate) fn drhd(
            mut self,
            flags: u8,
            segment: u16,
            base: u64,
            scopes: &[Vec<u8>],
        ) -> Self {
            let body: Vec<u8> = scopes.concat();
            let len = (DRHD_LEN + body.len()) as u16;
            self.bytes.extend_from_slice(&0u16.to_le_bytes());
            self.bytes.extend_from_slice(&len.to_le_bytes());
            self.bytes.extend_from_slice(&[flags, 0]);
            self.bytes.extend_from_slice(&segment.to_le_bytes());
            self.bytes.extend_from_slice(&base.to_le_bytes());
            self.bytes.extend_from_slice(&body);
            self
        }
        pub(crate) fn rmrr(mut self, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Self {
            let body: Vec<u8> = scopes.concat();
            let len = (RMRR_LEN + body.len()) as u16;
            self.bytes.extend_from_slice(&1u16.to_le_bytes());
            self.bytes.extend_from_slice(&len.to_le_bytes());
            self.bytes.extend_from_slice(&[0, 0, 0, 0]);
            self.bytes.extend_from_slice(&base.to_le_bytes());
            self.bytes.extend_from_slice(&limit.to_le_bytes());
            self.bytes.extend_from_slice(&body);
            self
        }
        pub(crate) fn raw(mut self, kind: u16, body: &[u8]) -> Self {
            self.bytes.extend_from_slice(&kind.to_le_bytes());
            self.bytes
                .extend_from_slice(&((4 + body.len()) as u16).to_le_bytes());
            self.bytes.extend_from_slice(body);
            self
        }
        /// Fixes length and checksum.
        pub(crate) fn build(mut self) -> Vec<u8> {
            let len = self.bytes.len() as u32;
            self.bytes[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut self.bytes);
            self.bytes
        }
    }

    fn fix_checksum(b: &mut [u8]) {
        b[9] = 0;
        let sum = b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        b[9] = 0u8.wrapping_sub(sum);
    }

    /// QEMU 7.2 q35 + intel-iommu with an e1000e at 00:02.0 and a virtio-net at
    /// 00:03.0: one DRHD at 0xfed90000 without INCLUDE_PCI_ALL, the IOAPIC scope
    /// (bus 0xff, 00.0) and one endpoint scope per device on pcie.0.
    pub(crate) fn qemu_table() -> Vec<u8> {
        TableBuilder::new(39, DMAR_INTR_REMAP | DMAR_X2APIC_OPT_OUT)
            .drhd(
                0,
                0,
                0xfed9_0000,
                &[
                    scope(3, 0, 0xff, &[(0, 0)]),
                    scope(1, 0, 0, &[(0, 0)]),
                    scope(1, 0, 0, &[(1, 0)]),
                    scope(1, 0, 0, &[(2, 0)]),
                    scope(1, 0, 0, &[(3, 0)]),
                    scope(1, 0, 0, &[(0x1f, 0)]),
                    scope(1, 0, 0, &[(0x1f, 2)]),
                    scope(1, 0, 0, &[(0x1f, 3)]),
                ],
            )
            .build()
    }

    #[test]
    fn qemu_shape() {
        let t = qemu_table();
        let d = Dmar::parse(&t).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags, 3);
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert_eq!(u.register_base, 0xfed9_0000);
        assert_eq!(u.offset, 48);
        assert!(!u.include_pci_all());
        assert_eq!(u.register_len(), 4096);
        assert_eq!(u.scopes.len(), 8);
        assert_eq!(
            u.scopes[0],
            DeviceScope {
                kind: ScopeType::IoApic,
                flags: 0,
                enumeration_id: 0,
                start_bus: 0xff,
                path: vec![(0, 0)],
            }
        );
        assert_eq!(u.scopes[3].kind, ScopeType::PciEndpoint);
        assert_eq!(u.scopes[3].target(|_| None), Some(Bdf::new(0, 2, 0)));
        assert!(d.reserved.is_empty() && d.skipped.is_empty());
        // Unit lookup: listed devices map to unit 0, others to none (no
        // INCLUDE_PCI_ALL), and the IOAPIC scope is not a PCI device.
        let no_bridges = |_| None;
        assert_eq!(d.unit_for(0, Bdf::new(0, 2, 0), no_bridges), Some(0));
        assert_eq!(d.unit_for(0, Bdf::new(0, 0x1f, 3), no_bridges), Some(0));
        assert_eq!(d.unit_for(0, Bdf::new(0, 4, 0), no_bridges), None);
        assert_eq!(d.unit_for(0, Bdf::new(0xff, 0, 0), no_bridges), None);
        assert_eq!(d.unit_for(1, Bdf::new(0, 2, 0), no_bridges), None);
    }

    #[test]
    fn several_units_rmrr_bridges_and_skipped_structures() {
        let atsr = [0u8, 0, 0, 0, 0, 0, 0, 0]; // flags, reserved, segment + nothing
        let t = TableBuilder::new(46, 0)
            .drhd(0, 0, 0xfed9_1000, &[scope(2, 0, 0, &[(0x1c, 0)])])
            .drhd(0, 0, 0xfed9_2000, &[scope(1, 0, 0, &[(0x1c, 4), (0, 1)])])
            .rmrr(
                0x7a00_0000,
                0x7a1f_ffff,
                &[scope(1, 0, 0, &[(0x14, 0)]), scope(1, 0, 0, &[(0x1a, 0)])],
            )
            .raw(2, &atsr[..4])
            .raw(3, &[0; 12])
            .drhd(
                DRHD_INCLUDE_PCI_ALL,
                0,
                0xfed9_0000,
                &[scope(4, 0, 0, &[(0x1f, 0)])],
            )
            .drhd(DRHD_INCLUDE_PCI_ALL, 1, 0xfed9_4000, &[])
            .build();
        let d = Dmar::parse(&t).unwrap();
        assert_eq!(d.host_address_width, 46);
        assert_eq!(d.units.len(), 4);
        assert_eq!(d.reserved.len(), 1);
        assert_eq!(d.reserved[0].base, 0x7a00_0000);
        assert_eq!(d.reserved[0].limit, 0x7a1f_ffff);
        assert_eq!(d.reserved[0].scopes.len(), 2);
        assert_eq!(d.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(d.units[2].scopes[0].kind, ScopeType::MsiHpet);
        // Bridge 00:1c.0 has buses 2..=3; 00:1c.4 has bus 5.
        let bridges = |b: Bdf| match (b.bus, b.dev, b.func) {
            (0, 0x1c, 0) => Some((2, 3)),
            (0, 0x1c, 4) => Some((5, 5)),
            _ => None,
        };
        assert_eq!(
            d.units[1].scopes[0].target(|b| bridges(b).map(|x| x.0)),
            Some(Bdf::new(5, 0, 1))
        );
        assert_eq!(d.unit_for(0, Bdf::new(5, 0, 1), bridges), Some(1));
        assert_eq!(d.unit_for(0, Bdf::new(3, 0, 0), bridges), Some(0));
        assert_eq!(d.unit_for(0, Bdf::new(0, 0x1c, 0), bridges), Some(0));
        assert_eq!(d.unit_for(0, Bdf::new(5, 0, 0), bridges), Some(2));
        assert_eq!(d.unit_for(0, Bdf::new(0, 2, 0), bridges), Some(2));
        assert_eq!(d.unit_for(1, Bdf::new(0, 2, 0), bridges), Some(3));
        // Unknown bridge on a multi-hop path: no target.
        assert_eq!(d.units[1].scopes[0].target(|_| None), None);
    }

    #[test]
    fn header_errors() {
        let good = qemu_table();
        let e = Dmar::parse(&good[..47]).unwrap_err();
        assert_eq!(e.structure, Structure::Header);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Dmar::parse(&bad).unwrap_err().problem,
            DmarProblem::BadSignature(_)
        ));
        let mut bad = good.clone();
        bad[20] ^= 1;
        let e = Dmar::parse(&bad).unwrap_err();
        assert_eq!(e.problem, DmarProblem::BadChecksum(1));
        assert!(e.to_string().contains("DMAR header at offset 0x0"), "{e}");
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&40u32.to_le_bytes());
        fix_checksum(&mut bad);
        assert_eq!(
            Dmar::parse(&bad).unwrap_err().problem,
            DmarProblem::LengthTooSmall(40)
        );
        // Trailing bytes past the length field are ignored.
        let mut longer = good.clone();
        longer.extend_from_slice(&[0xff; 7]);
        assert_eq!(Dmar::parse(&longer), Dmar::parse(&good));
    }

    #[test]
    fn structure_errors_name_the_structure_and_offset() {
        // DRHD length 12 < 16.
        let mut t = TableBuilder::new(39, 0)
            .drhd(0, 0, 0xfed9_0000, &[])
            .build();
        t[50..52].copy_from_slice(&12u16.to_le_bytes());
        fix_checksum(&mut t);
        let e = Dmar::parse(&t).unwrap_err();
        assert_eq!(
            e,
            DmarError {
                structure: Structure::Drhd,
                offset: 48,
                problem: DmarProblem::BadLength {
                    length: 12,
                    minimum: 16
                }
            }
        );
        assert!(
            e.to_string().contains("DRHD at offset 0x30: length 12"),
            "{e}"
        );
        // A structure of length 0 would loop forever without the minimum check.
        let mut t = TableBuilder::new(39, 0).raw(7, &[]).build();
        t[50..52].copy_from_slice(&0u16.to_le_bytes());
        fix_checksum(&mut t);
        assert_eq!(
            Dmar::parse(&t).unwrap_err().structure,
            Structure::Remapping(7)
        );
        // Device scope with an odd path length, and one running past the DRHD.
        let mut t = TableBuilder::new(39, 0)
            .drhd(0, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(2, 0)])])
            .build();
        t[64 + 1] = 7;
        fix_checksum(&mut t);
        let e = Dmar::parse(&t).unwrap_err();
        assert_eq!((e.structure, e.offset), (Structure::DeviceScope, 64));
        t[64 + 1] = 10;
        fix_checksum(&mut t);
        let e = Dmar::parse(&t).unwrap_err();
        assert_eq!(
            e.problem,
            DmarProblem::Truncated {
                claimed: 10,
                available: 8
            }
        );
        // A DRHD claiming more than the table holds.
        let mut t = qemu_table();
        let len = t.len() as u16 - 48 + 2;
        t[50..52].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t);
        let e = Dmar::parse(&t).unwrap_err();
        assert_eq!((e.structure, e.offset), (Structure::Drhd, 48));
        assert!(matches!(e.problem, DmarProblem::Truncated { .. }));
    }

    /// Cutting the table at every length, with the header's length field either left
    /// alone (the buffer is short) or made to match (the structures are short):
    /// always an error, never a panic.
    #[test]
    fn truncation_at_every_length() {
        let tables = [
            qemu_table(),
            TableBuilder::new(48, 0)
                .drhd(0, 0, 0xfed9_1000, &[scope(2, 0, 0, &[(0x1c, 0), (0, 0)])])
                .rmrr(0x1000, 0x1fff, &[scope(1, 0, 0, &[(0x14, 0)])])
                .raw(2, &[0; 4])
                .build(),
        ];
        for full in tables {
            Dmar::parse(&full).unwrap();
            for cut in 0..full.len() {
                assert!(Dmar::parse(&full[..cut]).is_err(), "buffer cut at {cut}");
                let mut t = full[..cut].to_vec();
                if cut >= 8 {
                    t[4..8].copy_from_slice(&(cut as u32).to_le_bytes());
                }
                if cut >= 10 {
                    fix_checksum(&mut t);
                }
                let r = Dmar::parse(&t);
                // Cutting exactly between structures or scopes is a valid table.
                if let Ok(d) = r {
                    assert!(cut >= DMAR_HEADER_LEN, "cut {cut}");
                    assert!(d.units.len() <= 1);
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(mut body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut t = TableBuilder::new(39, 0).build();
            t.append(&mut body);
            let len = t.len() as u32;
            t[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut t);
            let _ = Dmar::parse(&t);
        }
    }
}
