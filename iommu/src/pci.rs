//! PCI configuration space: enumeration of one segment (bus 0 and every bus behind
//! a PCI-to-PCI bridge, as firmware numbered them), type-0 BAR decoding and sizing,
//! and capability list walks. Access goes through [`ConfigSpace`] (ECAM from MCFG,
//! or ports 0xcf8/0xcfc), 32 bits at a time.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;

pub use crate::dmar::Bdf;

/// 32-bit access to the configuration space of one PCI segment.
pub trait ConfigSpace {
    /// Reads the dword at `off` (4-byte aligned, below 4096) of `bdf`; all ones if
    /// nothing answers.
    fn read32(&self, bdf: Bdf, off: u16) -> u32;
    /// Writes the dword at `off` of `bdf`.
    fn write32(&mut self, bdf: Bdf, off: u16, value: u32);
}

/// Vendor id register (16 bits at 0x00).
pub const VENDOR_ID: u16 = 0x00;
/// Command (0x04, low half) and status (0x06, high half).
pub const COMMAND: u16 = 0x04;
/// Command: I/O space decode.
pub const CMD_IO: u16 = 1 << 0;
/// Command: memory space decode.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command: bus master (the device may DMA).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Status: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Class code, subclass, prog-if, revision (0x08).
pub const CLASS_REV: u16 = 0x08;
/// Cache line, latency, header type, BIST (0x0c).
pub const HEADER: u16 = 0x0c;
/// First BAR.
pub const BAR0: u16 = 0x10;
/// Bridge bus numbers: primary, secondary, subordinate, latency (0x18).
pub const BRIDGE_BUSES: u16 = 0x18;
/// Capability pointer (low byte of 0x34).
pub const CAP_PTR: u16 = 0x34;
/// Interrupt line and pin (0x3c).
pub const INTERRUPT: u16 = 0x3c;

/// Reads the byte at `off`.
pub fn read8(cfg: &impl ConfigSpace, bdf: Bdf, off: u16) -> u8 {
    (cfg.read32(bdf, off & !3) >> ((off & 3) * 8)) as u8
}

/// Reads the 16-bit value at `off` (2-byte aligned).
pub fn read16(cfg: &impl ConfigSpace, bdf: Bdf, off: u16) -> u16 {
    (cfg.read32(bdf, off & !3) >> ((off & 2) * 8)) as u16
}

/// Writes the command register. The status half of the dword is written as 0: its
/// error bits are write-1-to-clear, so echoing them back would clear them.
pub fn write_command(cfg: &mut impl ConfigSpace, bdf: Bdf, command: u16) {
    cfg.write32(bdf, COMMAND, u32::from(command));
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Memory32 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory (uses two BAR slots).
    Memory64 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// I/O ports.
    Io,
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index (0..6); a 64-bit BAR also occupies `index + 1`.
    pub index: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Base address firmware assigned (0 if none).
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// A capability in the standard list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id (0x05 MSI, 0x10 PCI Express, 0x11 MSI-X, ...).
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u8,
}

/// Capability id of MSI.
pub const CAP_MSI: u8 = 0x05;
/// Capability id of PCI Express.
pub const CAP_PCIE: u8 = 0x10;
/// Capability id of MSI-X.
pub const CAP_MSIX: u8 = 0x11;

/// Bus numbers of a PCI-to-PCI bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeBuses {
    /// Bus the bridge sits on.
    pub primary: u8,
    /// Bus right behind it.
    pub secondary: u8,
    /// Highest bus behind it.
    pub subordinate: u8,
}

/// One function found by [`enumerate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Its address (and DMA source id).
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision.
    pub revision: u8,
    /// Header layout (0 endpoint, 1 PCI bridge, 2 CardBus), without the
    /// multi-function bit.
    pub header_type: u8,
    /// Function 0 said it has other functions.
    pub multifunction: bool,
    /// BARs (type-0 headers only).
    pub bars: Vec<Bar>,
    /// Capability list in order.
    pub capabilities: Vec<Capability>,
    /// Bus numbers, for bridges.
    pub bridge: Option<BridgeBuses>,
    /// Interrupt pin (1 = INTA#, 0 = none).
    pub interrupt_pin: u8,
}

impl Device {
    /// The first capability with `id`.
    pub fn capability(&self, id: u8) -> Option<Capability> {
        self.capabilities.iter().copied().find(|c| c.id == id)
    }
    /// The BAR with `index`.
    pub fn bar(&self, index: u8) -> Option<Bar> {
        self.bars.iter().copied().find(|b| b.index == index)
    }
}

/// Something odd found while enumerating (the walk goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A capability list points back into itself (or outside 0x40..0x100); the walk
    /// stopped at `offset`.
    CapabilityLoop {
        /// The device.
        bdf: Bdf,
        /// The offending pointer.
        offset: u8,
    },
    /// A bridge's secondary bus is 0, already visited or not above its own bus: not
    /// followed.
    BadBridgeBus {
        /// The bridge.
        bdf: Bdf,
        /// Its secondary bus number.
        secondary: u8,
    },
    /// A 64-bit BAR in the last slot.
    TruncatedBar64 {
        /// The device.
        bdf: Bdf,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::CapabilityLoop { bdf, offset } => write!(
                f,
                "PCI {bdf}: capability list loops or leaves the header at {offset:#x}; rest ignored"
            ),
            Problem::BadBridgeBus { bdf, secondary } => write!(
                f,
                "PCI {bdf}: bridge secondary bus {secondary} is unassigned or already seen; not scanned"
            ),
            Problem::TruncatedBar64 { bdf } => {
                write!(f, "PCI {bdf}: 64-bit BAR in the last slot; ignored")
            }
        }
    }
}

/// The result of [`enumerate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enumeration {
    /// Functions in scan order (depth first: a bridge's buses right after it).
    pub devices: Vec<Device>,
    /// Oddities.
    pub problems: Vec<Problem>,
    /// Buses scanned.
    pub buses: Vec<u8>,
}

impl Enumeration {
    /// The function at `bdf`.
    pub fn get(&self, bdf: Bdf) -> Option<&Device> {
        self.devices.iter().find(|d| d.bdf == bdf)
    }
    /// Secondary and subordinate bus of the bridge at `bdf` (for
    /// [`crate::dmar::Dmar::unit_for`]).
    pub fn bridge_buses(&self, bdf: Bdf) -> Option<(u8, u8)> {
        self.get(bdf)?.bridge.map(|b| (b.secondary, b.subordinate))
    }
}

/// Walks the capability list of `bdf` (if the status register says it has one),
/// stopping at a pointer already seen or outside 0x40..=0xfc (reported).
pub fn capabilities(
    cfg: &impl ConfigSpace,
    bdf: Bdf,
    problems: &mut Vec<Problem>,
) -> Vec<Capability> {
    let mut out = Vec::new();
    if read16(cfg, bdf, COMMAND + 2) & STATUS_CAP_LIST == 0 {
        return out;
    }
    let mut seen = [false; 256];
    let mut ptr = read8(cfg, bdf, CAP_PTR) & 0xfc;
    while ptr != 0 {
        if ptr < 0x40 || seen[usize::from(ptr)] {
            problems.push(Problem::CapabilityLoop { bdf, offset: ptr });
            break;
        }
        seen[usize::from(ptr)] = true;
        let dw = cfg.read32(bdf, u16::from(ptr));
        out.push(Capability {
            id: dw as u8,
            offset: ptr,
        });
        ptr = (dw >> 8) as u8 & 0xfc;
    }
    out
}

/// Decodes and sizes the six BARs of a type-0 header: memory and I/O decode are
/// turned off while each BAR is written with all ones, and every BAR and the
/// command register are restored.
pub fn probe_bars(cfg: &mut impl ConfigSpace, bdf: Bdf, problems: &mut Vec<Problem>) -> Vec<Bar> {
    let mut bars = Vec::new();
    let command = read16(cfg, bdf, COMMAND);
    write_command(cfg, bdf, command & !(CMD_IO | CMD_MEMORY));
    let mut i = 0u8;
    while i < 6 {
        let off = BAR0 + u16::from(i) * 4;
        let orig = cfg.read32(bdf, off);
        cfg.write32(bdf, off, u32::MAX);
        let mask = cfg.read32(bdf, off);
        cfg.write32(bdf, off, orig);
        if orig & 1 == 1 {
            // I/O: bits 31:2; devices may hardwire the upper 16 bits to 0.
            let m = mask & !3;
            let m = if m >> 16 == 0 { m | 0xffff_0000 } else { m };
            if m & 0xffff != 0 {
                bars.push(Bar {
                    index: i,
                    kind: BarKind::Io,
                    address: u64::from(orig & !3),
                    size: u64::from(!m) + 1,
                });
            }
            i += 1;
            continue;
        }
        let prefetchable = orig & 8 != 0;
        if (orig >> 1) & 3 == 2 {
            if i == 5 {
                problems.push(Problem::TruncatedBar64 { bdf });
                break;
            }
            let hi_off = off + 4;
            let orig_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, u32::MAX);
            let mask_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, orig_hi);
            let m = u64::from(mask_hi) << 32 | u64::from(mask & !0xf);
            if m != 0 {
                bars.push(Bar {
                    index: i,
                    kind: BarKind::Memory64 { prefetchable },
                    address: u64::from(orig_hi) << 32 | u64::from(orig & !0xf),
                    size: (!m).wrapping_add(1),
                });
            }
            i += 2;
            continue;
        }
        let m = mask & !0xf;
        if m != 0 {
            bars.push(Bar {
                index: i,
                kind: BarKind::Memory32 { prefetchable },
                address: u64::from(orig & !0xf),
                size: u64::from(!m) + 1,
            });
        }
        i += 1;
    }
    write_command(cfg, bdf, command);
    bars
}

fn read_function(
    cfg: &mut impl ConfigSpace,
    bdf: Bdf,
    id: u32,
    problems: &mut Vec<Problem>,
) -> Device {
    let class = cfg.read32(bdf, CLASS_REV);
    let header = read8(cfg, bdf, HEADER + 2);
    let header_type = header & 0x7f;
    let bridge = (header_type == 1).then(|| {
        let b = cfg.read32(bdf, BRIDGE_BUSES);
        BridgeBuses {
            primary: b as u8,
            secondary: (b >> 8) as u8,
            subordinate: (b >> 16) as u8,
        }
    });
    let bars = if header_type == 0 {
        probe_bars(cfg, bdf, problems)
    } else {
        Vec::new()
    };
    Device {
        bdf,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: (class >> 24) as u8,
        subclass: (class >> 16) as u8,
        prog_if: (class >> 8) as u8,
        revision: class as u8,
        header_type,
        multifunction: header & 0x80 != 0,
        bars,
        capabilities: capabilities(cfg, bdf, problems),
        bridge,
        interrupt_pin: read8(cfg, bdf, INTERRUPT + 1),
    }
}

/// Enumerates bus 0 and, depth first, the secondary bus of every bridge found
/// (bus numbers as firmware assigned them; a bus is scanned once). Functions 1..7
/// are scanned only when function 0 has the multi-function bit; a vendor id of
/// 0xffff means nothing is there.
pub fn enumerate(cfg: &mut impl ConfigSpace) -> Enumeration {
    let mut e = Enumeration::default();
    let mut visited = BTreeSet::new();
    scan_bus(cfg, 0, &mut visited, &mut e);
    e
}

fn scan_bus(cfg: &mut impl ConfigSpace, bus: u8, visited: &mut BTreeSet<u8>, e: &mut Enumeration) {
    if !visited.insert(bus) {
        return;
    }
    e.buses.push(bus);
    for dev in 0..32u8 {
        let f0 = Bdf::new(bus, dev, 0);
        let id = cfg.read32(f0, VENDOR_ID);
        if id as u16 == 0xffff || id as u16 == 0 {
            continue;
        }
        let multi = read8(cfg, f0, HEADER + 2) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let bdf = Bdf::new(bus, dev, func);
            let id = if func == 0 {
                id
            } else {
                cfg.read32(bdf, VENDOR_ID)
            };
            if id as u16 == 0xffff || id as u16 == 0 {
                continue;
            }
            let d = read_function(cfg, bdf, id, &mut e.problems);
            let bridge = d.bridge;
            e.devices.push(d);
            if let Some(b) = bridge {
                if b.secondary <= bus || visited.contains(&b.secondary) {
                    e.problems.push(Problem::BadBridgeBus {
                        bdf,
                        secondary: b.secondary,
                    });
                } else {
                    scan_bus(cfg, b.secondary, visited, e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// One function: 256 bytes of registers plus the BAR size masks (bits that
    /// stick when written).
    #[derive(Clone)]
    struct Func {
        regs: [u32; 64],
        bar_masks: [u32; 6],
        /// Slot holds the upper half of a 64-bit BAR.
        upper: [bool; 6],
    }

    #[derive(Default)]
    struct FakeCfg {
        funcs: BTreeMap<Bdf, Func>,
        /// BAR writes made while decode of that space was on.
        bad_probes: Vec<(Bdf, u16)>,
    }

    impl ConfigSpace for FakeCfg {
        fn read32(&self, bdf: Bdf, off: u16) -> u32 {
            assert_eq!(off % 4, 0);
            self.funcs
                .get(&bdf)
                .map_or(u32::MAX, |f| f.regs[usize::from(off / 4)])
        }
        fn write32(&mut self, bdf: Bdf, off: u16, value: u32) {
            assert_eq!(off % 4, 0);
            let Some(f) = self.funcs.get_mut(&bdf) else {
                return;
            };
            let i = usize::from(off / 4);
            let header_type = (f.regs[3] >> 16) & 0x7f;
            if header_type == 0 && (4..10).contains(&i) {
                let b = i - 4;
                let cmd = f.regs[1] as u16;
                let is_io = f.regs[i] & 1 == 1;
                if value == u32::MAX && cmd & if is_io { CMD_IO } else { CMD_MEMORY } != 0 {
                    self.bad_probes.push((bdf, off));
                }
                let m = f.bar_masks[b];
                let low_bits = if f.upper[b] {
                    0
                } else if is_io {
                    3
                } else {
                    0xf
                };
                f.regs[i] = (value & m & !low_bits) | (f.regs[i] & low_bits);
            } else if i == 1 {
                // Status is write-1-to-clear.
                let status = (f.regs[1] >> 16) & !(value >> 16);
                f.regs[1] = status << 16 | (value & 0xffff);
            } else {
                f.regs[i] = value;
            }
        }
    }

    fn func(vendor: u16, device: u16, class: u32, header: u8) -> Func {
        let mut regs = [0u32; 64];
        regs[0] = u32::from(device) << 16 | u32::from(vendor);
        regs[1] = u32::from(CMD_MEMORY | CMD_IO | CMD_BUS_MASTER);
        regs[2] = class << 8 | 1;
        regs[3] = u32::from(header) << 16;
        Func {
            regs,
            bar_masks: [0; 6],
            upper: [false; 6],
        }
    }

    fn with_bar(mut f: Func, i: usize, value: u32, size: u64) -> Func {
        f.regs[4 + i] = value;
        let io = value & 1 == 1;
        let m = (!(size - 1)) as u32;
        f.bar_masks[i] = if io { m & 0xffff } else { m };
        if (value >> 1) & 3 == 2 && !io && i < 5 {
            f.bar_masks[i + 1] = (!(size - 1) >> 32) as u32;
            f.upper[i + 1] = true;
        }
        f
    }

    fn with_caps(mut f: Func, caps: &[(u8, u8, u8)]) -> Func {
        // (offset, id, next)
        f.regs[1] |= u32::from(STATUS_CAP_LIST) << 16;
        f.regs[13] = u32::from(caps[0].0);
        for &(off, id, next) in caps {
            f.regs[usize::from(off / 4)] = u32::from(next) << 8 | u32::from(id);
        }
        f
    }

    fn bridge(secondary: u8, subordinate: u8, primary: u8) -> Func {
        let mut f = func(0x8086, 0x2448, 0x06_04_00, 1);
        f.regs[6] = u32::from(subordinate) << 16 | u32::from(secondary) << 8 | u32::from(primary);
        f
    }

    /// q35-like: host bridge, an e1000e (BARs: 128K mem, 128K mem, 32-byte I/O,
    /// 16K mem; MSI-X, PCIe caps), ICH9 functions 1f.0/.2/.3, a root port 00:1c.0 ->
    /// bus 1 with a switch port 01:00.0 -> bus 2 holding a device with a 64-bit
    /// prefetchable 8 GiB BAR.
    fn q35() -> FakeCfg {
        let mut c = FakeCfg::default();
        c.funcs
            .insert(Bdf::new(0, 0, 0), func(0x8086, 0x29c0, 0x06_00_00, 0));
        let nic = func(0x8086, 0x10d3, 0x02_00_00, 0);
        let nic = with_bar(nic, 0, 0xfeb8_0000, 128 << 10);
        let nic = with_bar(nic, 1, 0xfeba_0000, 128 << 10);
        let nic = with_bar(nic, 2, 0xc041, 32);
        let nic = with_bar(nic, 3, 0xfebc_0000, 16 << 10);
        let nic = with_caps(
            nic,
            &[
                (0xc8, 0x01, 0xd0),
                (0xd0, CAP_MSI, 0xe0),
                (0xe0, CAP_PCIE, 0xa0),
                (0xa0, CAP_MSIX, 0),
            ],
        );
        c.funcs.insert(Bdf::new(0, 2, 0), nic);
        c.funcs
            .insert(Bdf::new(0, 0x1f, 0), func(0x8086, 0x2918, 0x06_01_00, 0x80));
        c.funcs.insert(
            Bdf::new(0, 0x1f, 2),
            with_bar(func(0x8086, 0x2922, 0x01_06_01, 0), 5, 0xfebd_1000, 4096),
        );
        c.funcs.insert(
            Bdf::new(0, 0x1f, 3),
            with_bar(func(0x8086, 0x2930, 0x0c_05_00, 0), 4, 0x0701, 64),
        );
        c.funcs.insert(Bdf::new(0, 0x1c, 0), bridge(1, 2, 0));
        c.funcs.insert(Bdf::new(1, 0, 0), bridge(2, 2, 1));
        let big = func(0x1af4, 0x1041, 0x02_00_00, 0);
        let big = with_bar(big, 0, 0x0000_000c, 8 << 30);
        let mut big = with_bar(big, 2, 0xfe00_0000, 1 << 20);
        big.regs[5] = 0x8;
        c.funcs.insert(Bdf::new(2, 0, 0), big);
        // A function 3 of a device whose function 0 is single-function: never scanned.
        c.funcs
            .insert(Bdf::new(0, 2, 3), func(0xdead, 0xbeef, 0, 0));
        c
    }

    #[test]
    fn enumerates_q35_like_topology() {
        let mut c = q35();
        let e = enumerate(&mut c);
        let bdfs: Vec<String> = e.devices.iter().map(|d| d.bdf.to_string()).collect();
        assert_eq!(
            bdfs,
            [
                "00:00.0", "00:02.0", "00:1c.0", "01:00.0", "02:00.0", "00:1f.0", "00:1f.2",
                "00:1f.3"
            ]
        );
        assert_eq!(e.buses, [0, 1, 2]);
        assert!(e.problems.is_empty(), "{:?}", e.problems);
        assert!(
            c.bad_probes.is_empty(),
            "BAR probed with decode on: {:?}",
            c.bad_probes
        );

        let nic = e.get(Bdf::new(0, 2, 0)).unwrap();
        assert_eq!(
            (nic.vendor, nic.device, nic.class, nic.subclass),
            (0x8086, 0x10d3, 2, 0)
        );
        assert_eq!(
            nic.bars,
            [
                Bar {
                    index: 0,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    address: 0xfeb8_0000,
                    size: 128 << 10
                },
                Bar {
                    index: 1,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    address: 0xfeba_0000,
                    size: 128 << 10
                },
                Bar {
                    index: 2,
                    kind: BarKind::Io,
                    address: 0xc040,
                    size: 32
                },
                Bar {
                    index: 3,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    address: 0xfebc_0000,
                    size: 16 << 10
                },
            ]
        );
        assert_eq!(
            nic.capabilities.iter().map(|c| c.id).collect::<Vec<_>>(),
            [0x01, CAP_MSI, CAP_PCIE, CAP_MSIX]
        );
        assert_eq!(
            nic.capability(CAP_MSIX),
            Some(Capability {
                id: CAP_MSIX,
                offset: 0xa0
            })
        );
        assert_eq!(nic.bar(2).unwrap().kind, BarKind::Io);
        // Registers were restored, decode back on.
        assert_eq!(c.funcs[&Bdf::new(0, 2, 0)].regs[4], 0xfeb8_0000);
        assert_eq!(c.funcs[&Bdf::new(0, 2, 0)].regs[1] & 7, 7);

        let big = e.get(Bdf::new(2, 0, 0)).unwrap();
        assert_eq!(
            big.bars,
            [
                Bar {
                    index: 0,
                    kind: BarKind::Memory64 { prefetchable: true },
                    address: 0x8_0000_0000,
                    size: 8 << 30
                },
                Bar {
                    index: 2,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    address: 0xfe00_0000,
                    size: 1 << 20
                },
            ]
        );
        assert_eq!(
            c.funcs[&Bdf::new(2, 0, 0)].regs[5],
            8,
            "upper half restored"
        );
        let lpc = e.get(Bdf::new(0, 0x1f, 0)).unwrap();
        assert!(lpc.multifunction);
        assert!(lpc.bars.is_empty());
        assert_eq!(e.get(Bdf::new(0, 0x1f, 3)).unwrap().bars[0].size, 64);
        assert_eq!(e.bridge_buses(Bdf::new(0, 0x1c, 0)), Some((1, 2)));
        assert_eq!(e.bridge_buses(Bdf::new(0, 2, 0)), None);
        assert!(e.get(Bdf::new(0, 2, 3)).is_none());
    }

    #[test]
    fn status_bits_survive_bar_probing() {
        let mut c = q35();
        // Received master abort (bit 13 of status) must not be cleared by the probe.
        c.funcs.get_mut(&Bdf::new(0, 2, 0)).unwrap().regs[1] |= 1 << 29;
        enumerate(&mut c);
        assert_ne!(c.funcs[&Bdf::new(0, 2, 0)].regs[1] & 1 << 29, 0);
    }

    #[test]
    fn loops_and_bad_bridges_are_contained() {
        let mut c = FakeCfg::default();
        let looping = with_caps(func(1, 1, 0, 0), &[(0x40, 5, 0x50), (0x50, 0x10, 0x40)]);
        c.funcs.insert(Bdf::new(0, 1, 0), looping);
        let low = with_caps(func(1, 2, 0, 0), &[(0x40, 5, 0x10)]);
        c.funcs.insert(Bdf::new(0, 2, 0), low);
        // A bridge pointing back at bus 0, one with no bus assigned, and two bridges
        // claiming the same secondary bus.
        c.funcs.insert(Bdf::new(0, 3, 0), bridge(0, 0, 0));
        c.funcs.insert(Bdf::new(0, 4, 0), bridge(3, 3, 0));
        c.funcs.insert(Bdf::new(0, 5, 0), bridge(3, 3, 0));
        c.funcs.insert(Bdf::new(3, 0, 0), bridge(3, 3, 3));
        // 64-bit BAR in slot 5.
        c.funcs
            .insert(Bdf::new(3, 1, 0), with_bar(func(1, 3, 0, 0), 5, 0x4, 4096));
        let e = enumerate(&mut c);
        assert_eq!(e.buses, [0, 3]);
        assert_eq!(e.get(Bdf::new(0, 1, 0)).unwrap().capabilities.len(), 2);
        assert_eq!(e.get(Bdf::new(0, 2, 0)).unwrap().capabilities.len(), 1);
        assert_eq!(
            e.problems,
            [
                Problem::CapabilityLoop {
                    bdf: Bdf::new(0, 1, 0),
                    offset: 0x40
                },
                Problem::CapabilityLoop {
                    bdf: Bdf::new(0, 2, 0),
                    offset: 0x10
                },
                Problem::BadBridgeBus {
                    bdf: Bdf::new(0, 3, 0),
                    secondary: 0
                },
                Problem::BadBridgeBus {
                    bdf: Bdf::new(3, 0, 0),
                    secondary: 3
                },
                Problem::TruncatedBar64 {
                    bdf: Bdf::new(3, 1, 0)
                },
                Problem::BadBridgeBus {
                    bdf: Bdf::new(0, 5, 0),
                    secondary: 3
                },
            ]
        );
        for p in &e.problems {
            assert!(p.to_string().starts_with("PCI "));
        }
    }

    #[test]
    fn absent_devices_and_empty_bus() {
        let mut c = FakeCfg::default();
        assert_eq!(enumerate(&mut c).devices.len(), 0);
        // Function 0 absent: functions behind it are not looked at.
        c.funcs.insert(Bdf::new(0, 7, 1), func(1, 1, 0, 0x80));
        assert_eq!(enumerate(&mut c).devices.len(), 0);
        // Multi-function with holes.
        c.funcs.insert(Bdf::new(0, 7, 0), func(1, 1, 0, 0x80));
        c.funcs.insert(Bdf::new(0, 7, 6), func(1, 6, 0, 0));
        let e = enumerate(&mut c);
        assert_eq!(
            e.devices.iter().map(|d| d.bdf.func).collect::<Vec<_>>(),
            [0, 1, 6]
        );
        assert_eq!(read16(&c, Bdf::new(0, 7, 6), 2), 6);
        assert_eq!(read8(&c, Bdf::new(9, 9, 0), 0), 0xff);
    }

    proptest::proptest! {
        /// Random configuration bytes never panic or loop.
        #[test]
        fn random_config_space(regs in proptest::collection::vec(proptest::prelude::any::<u32>(), 64), masks in proptest::collection::vec(proptest::prelude::any::<u32>(), 6)) {
            let mut c = FakeCfg::default();
            let mut f = Func { regs: [0; 64], bar_masks: [0; 6], upper: [false; 6] };
            f.regs.copy_from_slice(&regs);
            f.bar_masks.copy_from_slice(&masks);
            f.regs[0] = 0x1234_5678;
            for bus in [0u8, 1, 7] {
                for dev in [0u8, 3, 31] {
                    c.funcs.insert(Bdf::new(bus, dev, 0), f.clone());
                    c.funcs.insert(Bdf::new(bus, dev, 5), f.clone());
                }
            }
            let e = enumerate(&mut c);
            proptest::prop_assert!(e.devices.len() <= 18);
            for d in &e.devices {
                proptest::prop_assert!(d.bars.len() <= 6);
                proptest::prop_assert!(d.capabilities.len() <= 48);
            }
        }
    }
}
