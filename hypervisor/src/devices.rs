//! The machine's PCI devices and VT-d units, and device assignment to domains.
//!
//! At boot [`init`] enumerates PCI (configuration ports), parses the ACPI DMAR table
//! and takes over every remapping unit: translation goes on at once with no context
//! entries, so every device's DMA is blocked until a domain that owns it is built.
//! A domain with `pci = [...]` in its config gets an IOMMU domain whose second-level
//! tables mirror its physmap (guest-physical address = IOVA): its RAM when it is
//! built, and every grant it maps into its physmap later ([`map_grant`]); unmapping a
//! grant removes the IOMMU entry and completes the IOTLB invalidation ([`flush`])
//! before the grant engine hands the frame back to its owner. DMA faults are polled
//! ([`poll_faults`]), logged with the device and domain, and counted.
//!
//! Devices' configuration space is shown to their owner through ports 0xcf8/0xcfc
//! ([`config_read`], [`config_write`]): reads pass through, writes reach only the
//! command register's decode and bus-master bits. BARs are mapped at their host
//! address (the MSI-X table's pages are not: without interrupt remapping a domain must
//! not program MSIs).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use iommu::dmar::Dmar;
use iommu::pci::{self, Bdf, ConfigSpace, Enumeration};
use iommu::unit::{DomainId, Unit, UnitConfig};
use pagetable::Perms;

use crate::arch::phys::HostPhysMem;
use crate::arch::vtd::{PortConfigSpace, VtdPlatform, VtdRegs};

type VtdUnit = Unit<VtdRegs, HostPhysMem, VtdPlatform>;

/// A DMA fault the hypervisor saw, attributed to the domain owning the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The requester.
    pub device: Bdf,
    /// Page address the device tried to reach.
    pub addr: u64,
    /// A write (else a read).
    pub write: bool,
    /// VT-d fault reason code.
    pub reason: u8,
}

struct Owned {
    /// Index of the unit translating the domain's devices.
    unit: usize,
    iommu: DomainId,
    devices: Vec<Bdf>,
    /// Grant mappings removed from the physmap whose IOMMU entries go at the next
    /// [`flush`] (one batch, one wait).
    pending_unmaps: Vec<u64>,
    /// Grant mappings in the IOMMU tables: IOVA -> host address.
    grants: BTreeMap<u64, u64>,
    faults: Vec<Fault>,
}

struct Devices {
    pci: Enumeration,
    dmar: Option<Dmar>,
    units: Vec<VtdUnit>,
    /// Hypervisor domain id -> what it owns.
    owners: BTreeMap<u16, Owned>,
    /// Faults from devices nobody owns.
    stray_faults: u64,
}

static DEVICES: spin::Mutex<Option<Devices>> = spin::Mutex::new(None);

/// Parses the DMAR table at `dmar` (physical address, from ACPI), enumerates PCI and
/// takes over the remapping units. Problems are logged; the machine then simply has
/// no IOMMU (and domains asking for devices are refused when they are built).
/// `uncached` makes a device register page uncacheable in the host's page tables.
pub fn init(dmar: Option<u64>, uncached: fn(u64)) {
    let mut cfg = PortConfigSpace;
    let mut pci = pci::enumerate(&mut cfg);
    place_unassigned_bars(&mut cfg, &mut pci);
    for d in &pci.devices {
        log::info!(
            "PCI {} {:04x}:{:04x} class {:02x}.{:02x}{}",
            d.bdf,
            d.vendor,
            d.device,
            d.class,
            d.subclass,
            d.bars
                .iter()
                .map(|b| format!(", BAR{} {:#x}+{:#x}", b.index, b.address, b.size))
                .collect::<String>()
        );
    }
    for p in &pci.problems {
        log::warn!("{p}");
    }
    let mut units = Vec::new();
    let dmar = dmar.and_then(|pa| {
        let bytes = crate::arch::phys::acpi_table(pa)?;
        match Dmar::parse(bytes) {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!(
                    "ACPI DMAR table at {pa:#x} is malformed ({e}): running without an IOMMU"
                );
                None
            }
        }
    });
    if let Some(t) = &dmar {
        let pci = &pci;
        for drhd in &t.units {
            let Some(regs) = VtdRegs::claim(drhd.register_base) else {
                log::error!(
                    "iommu: DMAR names a unit at {:#x}, which is not a usable register page (unaligned, above 4 GiB or listed twice): skipped",
                    drhd.register_base
                );
                continue;
            };
            uncached(drhd.register_base);
            let cfg = UnitConfig::new(drhd.register_base, t.host_address_width);
            match Unit::new(regs, HostPhysMem, VtdPlatform, cfg) {
                Ok(mut u) => {
                    let (cap, ecap) = (u.cap(), u.ecap());
                    // context tables now for every bus with devices: the unit's frames
                    // are then all allocated before any domain exists
                    for bus in pci.buses.iter().copied() {
                        if let Err(e) = u.prepare_bus(bus) {
                            log::warn!(
                                "iommu: unit at {:#x}: context table for bus {bus:#x}: {e}",
                                drhd.register_base
                            );
                        }
                    }
                    match u.enable_translation() {
                        Ok(()) => log::info!(
                            "iommu: VT-d unit at {:#x}: CAP {:#x}, ECAP {:#x}, {} invalidation, caching mode {}; translation on, DMA blocked for every device until a domain owns it",
                            drhd.register_base,
                            cap.0,
                            ecap.0,
                            if u.queued_invalidation() { "queued" } else { "register" },
                            if cap.caching_mode() { "on" } else { "off" },
                        ),
                        Err(e) => {
                            log::error!("iommu: unit at {:#x}: cannot enable translation: {e}", drhd.register_base);
                            continue;
                        }
                    }
                    units.push(u);
                }
                Err((e, ..)) => log::error!(
                    "iommu: VT-d unit at {:#x} cannot be used: {e}",
                    drhd.register_base
                ),
            }
        }
    } else {
        log::info!("iommu: no VT-d unit (no ACPI DMAR table): PCI devices cannot be assigned");
    }
    *DEVICES.lock() = Some(Devices {
        pci,
        dmar,
        units,
        owners: BTreeMap::new(),
        stray_faults: 0,
    });
}

/// Where memory BARs that firmware left unassigned are placed: inside the PCI hole of
/// QEMU's q35 (above its ECAM window at 0xb0000000, below the IOAPIC at 0xfec00000).
const BAR_WINDOW: core::ops::Range<u64> = 0xc000_0000..0xfe00_0000;

/// Gives every memory BAR of an endpoint that firmware left at 0 an address in
/// [`BAR_WINDOW`], as firmware would (QEMU's minimal qboot firmware assigns none when
/// it boots a kernel directly). Memory decode stays off while a BAR is written.
fn place_unassigned_bars(cfg: &mut PortConfigSpace, e: &mut Enumeration) {
    let mut next = BAR_WINDOW.start;
    for d in e.devices.iter_mut().filter(|d| d.header_type == 0) {
        for b in d.bars.iter_mut() {
            let memory = !matches!(b.kind, pci::BarKind::Io);
            if !memory || b.address != 0 || b.size == 0 {
                continue;
            }
            let size = b.size.max(4096);
            let at = next.next_multiple_of(size);
            if at + size > BAR_WINDOW.end {
                log::warn!(
                    "PCI {}: no room for BAR{} ({:#x} bytes): left unassigned",
                    d.bdf,
                    b.index,
                    b.size
                );
                continue;
            }
            let cmd = pci::read16(cfg, d.bdf, pci::COMMAND);
            pci::write_command(cfg, d.bdf, cmd & !pci::CMD_MEMORY);
            let off = pci::BAR0 + 4 * u16::from(b.index);
            let low = cfg.read32(d.bdf, off) & 0xf;
            cfg.write32(d.bdf, off, (at as u32 & !0xf) | low);
            if matches!(b.kind, pci::BarKind::Memory64 { .. }) {
                cfg.write32(d.bdf, off + 4, (at >> 32) as u32);
            }
            pci::write_command(cfg, d.bdf, cmd);
            b.address = at;
            next = at + size;
            log::info!(
                "PCI {}: BAR{} was unassigned: placed at {at:#x}",
                d.bdf,
                b.index
            );
        }
    }
}

/// A memory range of an assigned device that the owner's nested page tables map at
/// the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRange {
    /// Host (= guest) physical address.
    pub base: u64,
    /// Bytes (multiple of 4 KiB).
    pub len: u64,
}

/// Gives domain `domid` the devices `bdfs`: an IOMMU domain mapping `ram` (guest
/// address, host address, length; the domain's memory) at guest addresses, each
/// device attached to it. Returns the device memory to map into its nested page
/// tables. `Err` says what is wrong and what to do.
pub fn assign(domid: u16, bdfs: &[Bdf], ram: &[(u64, u64, u64)]) -> Result<Vec<MmioRange>, String> {
    let mut guard = DEVICES.lock();
    let Some(dev) = guard.as_mut() else {
        return Err(String::from(
            "PCI devices are not set up (no devices::init)",
        ));
    };
    if dev.units.is_empty() {
        return Err(String::from(
            "this machine has no usable VT-d unit, so devices cannot be given to domains safely (QEMU: add -device intel-iommu before the device; hardware: enable VT-d in the firmware)",
        ));
    }
    let Some(dmar) = &dev.dmar else {
        return Err(String::from("no DMAR table"));
    };
    let mut unit_index = None;
    let mut mmio = Vec::new();
    for &bdf in bdfs {
        let Some(d) = dev.pci.get(bdf) else {
            return Err(format!(
                "PCI device {bdf} does not exist on this machine (see the 'PCI' lines at boot)"
            ));
        };
        if d.header_type != 0 {
            return Err(format!(
                "PCI device {bdf} is a bridge, not an endpoint: only endpoints can be assigned"
            ));
        }
        if let Some((other, _)) = dev.owners.iter().find(|(_, o)| o.devices.contains(&bdf)) {
            return Err(format!("PCI device {bdf} already belongs to d{other}"));
        }
        let Some(u) = dmar.unit_for(0, bdf, |b| dev.pci.bridge_buses(b)) else {
            return Err(format!(
                "no VT-d unit translates DMA from PCI device {bdf} (it is in no DMAR device scope)"
            ));
        };
        if unit_index.is_some_and(|x| x != u) {
            return Err(String::from(
                "the devices sit behind different VT-d units; assign them to different domains",
            ));
        }
        if u >= dev.units.len() {
            return Err(format!(
                "the VT-d unit translating PCI device {bdf} could not be initialised"
            ));
        }
        unit_index = Some(u);
        // The MSI-X table and PBA stay unmapped: without interrupt remapping, a domain
        // that could program MSI-X entries could send any interrupt to the host.
        let msix_bar = d.capability(0x11).map(|c| {
            let table = PortConfigSpace.read32(bdf, u16::from(c.offset) + 4);
            (table & 7) as u8
        });
        for b in &d.bars {
            let memory = !matches!(b.kind, pci::BarKind::Io);
            if !memory || b.address == 0 || b.size == 0 {
                continue;
            }
            if Some(b.index) == msix_bar {
                log::info!(
                    "PCI {bdf}: BAR{} holds the MSI-X table: not mapped for d{domid}",
                    b.index
                );
                continue;
            }
            mmio.push(MmioRange {
                base: b.address,
                len: b.size.max(4096),
            });
        }
    }
    let Some(ui) = unit_index else {
        return Ok(Vec::new());
    };
    let unit = &mut dev.units[ui];
    let iommu = unit
        .create_domain(48)
        .map_err(|e| format!("IOMMU domain: {e}"))?;
    for &(gpa, hpa, len) in ram {
        if let Err(e) = unit.map(iommu, gpa, hpa, len, Perms::RW) {
            let _ = unit.destroy_domain(iommu);
            return Err(format!(
                "mapping guest memory {gpa:#x}+{len:#x} into the IOMMU: {e}"
            ));
        }
    }
    for &bdf in bdfs {
        if let Err(e) = unit.attach(iommu, bdf) {
            let _ = unit.destroy_domain(iommu);
            return Err(format!("attaching PCI device {bdf}: {e}"));
        }
        log::info!(
            "d{domid}: PCI {bdf} assigned: its DMA is translated by {iommu} (did {}), which mirrors the domain's memory",
            iommu.did()
        );
    }
    dev.owners.insert(
        domid,
        Owned {
            unit: ui,
            iommu,
            devices: bdfs.to_vec(),
            pending_unmaps: Vec::new(),
            grants: BTreeMap::new(),
            faults: Vec::new(),
        },
    );
    Ok(mmio)
}

/// Whether `domid` owns devices (its IOMMU tables mirror its physmap).
pub fn owns_devices(domid: u16) -> bool {
    DEVICES
        .lock()
        .as_ref()
        .is_some_and(|d| d.owners.contains_key(&domid))
}

/// Adds a grant mapping (`hpa` at guest address `gpa`) of `domid` to its IOMMU tables;
/// a no-op for domains without devices. `Err` when the entry cannot be created (the
/// caller then undoes the nested-paging entry and fails the map).
pub fn map_grant(domid: u16, gpa: u64, hpa: u64, readonly: bool) -> Result<(), String> {
    let mut guard = DEVICES.lock();
    let Some(dev) = guard.as_mut() else {
        return Ok(());
    };
    let Some(o) = dev.owners.get_mut(&domid) else {
        return Ok(());
    };
    // an entry still waiting for its flush at this address goes first
    if let Some(i) = o.pending_unmaps.iter().position(|&a| a == gpa) {
        o.pending_unmaps.swap_remove(i);
        dev.units[o.unit]
            .unmap_pages(o.iommu, &[gpa])
            .map_err(|e| format!("{e}"))?;
    }
    let perms = if readonly { Perms::R } else { Perms::RW };
    dev.units[o.unit]
        .map(o.iommu, gpa, hpa, 4096, perms)
        .map_err(|e| format!("{e}"))?;
    o.grants.insert(gpa, hpa);
    Ok(())
}

/// Removes the grant mapping at `gpa` of `domid` from its IOMMU tables at the next
/// [`flush`] of that domain (which the grant engine calls before it releases the
/// grant).
pub fn unmap_grant(domid: u16, gpa: u64) {
    let mut guard = DEVICES.lock();
    if let Some(o) = guard.as_mut().and_then(|d| d.owners.get_mut(&domid)) {
        if o.grants.remove(&gpa).is_some() {
            o.pending_unmaps.push(gpa);
        }
    }
}

/// Clears `domid`'s pending grant unmaps from its IOMMU tables: page-selective IOTLB
/// invalidations and one wait. When it returns, no device can reach those frames.
pub fn flush(domid: u16) {
    let mut guard = DEVICES.lock();
    let Some(dev) = guard.as_mut() else {
        return;
    };
    let Some(o) = dev.owners.get_mut(&domid) else {
        return;
    };
    if o.pending_unmaps.is_empty() {
        return;
    }
    let pages = core::mem::take(&mut o.pending_unmaps);
    match dev.units[o.unit].unmap_pages(o.iommu, &pages) {
        Ok(r) => log::debug!(
            "d{domid}: {} grant page(s) unmapped from the IOMMU, {} invalidation descriptor(s) and one wait",
            r.pages,
            r.descriptors
        ),
        Err(e) => log::error!("d{domid}: IOMMU unmap of {} grant page(s) failed: {e}", pages.len()),
    }
}

/// Releases what `domid` owns: its devices are detached (their DMA blocked again) and
/// its IOMMU domain destroyed. Returns the IOMMU pages that were still mapped.
pub fn release(domid: u16) -> Option<u64> {
    let mut guard = DEVICES.lock();
    let dev = guard.as_mut()?;
    let o = dev.owners.remove(&domid)?;
    let unit = &mut dev.units[o.unit];
    let stats = unit.domain_stats(o.iommu);
    match unit.destroy_domain(o.iommu) {
        Ok(r) => {
            log::info!(
                "d{domid}: IOMMU domain {} destroyed: {} device(s) detached, {} page(s) were still mapped ({} grant mapping(s)); {} DMA fault(s) seen; {:?}",
                o.iommu.did(),
                r.devices_detached,
                r.live_pages,
                o.grants.len(),
                o.faults.len(),
                stats.unwrap_or_default()
            );
            let left = unit.total_refs();
            if left == 0 && dev.owners.is_empty() {
                log::info!("iommu: no mappings left");
            }
            Some(r.live_pages)
        }
        Err(e) => {
            log::error!("d{domid}: destroying IOMMU domain {}: {e}", o.iommu.did());
            None
        }
    }
}

/// Reads and clears every unit's fault records; logs each with the owning domain.
pub fn poll_faults() {
    let mut guard = DEVICES.lock();
    let Some(dev) = guard.as_mut() else {
        return;
    };
    for ui in 0..dev.units.len() {
        let report = dev.units[ui].poll_faults();
        for r in &report.records {
            let owner = dev
                .owners
                .iter_mut()
                .find(|(_, o)| o.devices.contains(&r.source));
            let who = match &owner {
                Some((id, _)) => format!("d{id}"),
                None => String::from("no domain"),
            };
            log::warn!(
                "iommu: DMA fault: PCI {} ({who}) {} at {:#x}: reason {:#x} ({}); blocked",
                r.source,
                if r.write { "write" } else { "read" },
                r.addr,
                r.reason,
                r.reason_name()
            );
            match owner {
                Some((_, o)) => o.faults.push(Fault {
                    device: r.source,
                    addr: r.addr,
                    write: r.write,
                    reason: r.reason,
                }),
                None => dev.stray_faults += 1,
            }
        }
        if report.overflow {
            log::warn!("iommu: fault log overflowed: later faults were dropped by the unit");
        }
    }
}

/// The DMA faults seen from `domid`'s devices.
pub fn faults_of(domid: u16) -> Vec<Fault> {
    DEVICES
        .lock()
        .as_ref()
        .and_then(|d| d.owners.get(&domid))
        .map(|o| o.faults.clone())
        .unwrap_or_default()
}

/// Configuration-space read by `domid` of `bdf` at `off` (dword): the device's value
/// when the domain owns it, all ones otherwise (nothing there).
pub fn config_read(domid: u16, bdf: Bdf, off: u16) -> u32 {
    let guard = DEVICES.lock();
    let owned = guard
        .as_ref()
        .and_then(|d| d.owners.get(&domid))
        .is_some_and(|o| o.devices.contains(&bdf));
    if owned {
        PortConfigSpace.read32(bdf, off & !3)
    } else {
        !0
    }
}

/// Configuration-space write by `domid`: only the command register of a device it
/// owns, and only its I/O, memory and bus-master enables and INTx disable. Returns
/// whether anything was written (the caller logs refused writes once).
pub fn config_write(domid: u16, bdf: Bdf, off: u16, value: u32, size: u8) -> bool {
    let guard = DEVICES.lock();
    let owned = guard
        .as_ref()
        .and_then(|d| d.owners.get(&domid))
        .is_some_and(|o| o.devices.contains(&bdf));
    if !owned || off & !3 != pci::COMMAND || (off & 3) >= 2 {
        return false;
    }
    let shift = u32::from(off & 3) * 8;
    let v = (value << shift) as u16;
    let allowed = pci::CMD_IO | pci::CMD_MEMORY | pci::CMD_BUS_MASTER | (1 << 10);
    let old = (PortConfigSpace.read32(bdf, pci::COMMAND) & 0xffff) as u16;
    let mask = if size == 1 { 0xffu16 << shift } else { 0xffff };
    let new = (old & !(allowed & mask)) | (v & allowed & mask);
    let mut cfg = PortConfigSpace;
    pci::write_command(&mut cfg, bdf, new);
    true
}

/// One line of IOMMU counters for the debug key.
pub fn summary() -> String {
    let guard = DEVICES.lock();
    let Some(dev) = guard.as_ref() else {
        return String::from("iommu: not set up");
    };
    let mut s = String::new();
    for u in &dev.units {
        let st = u.stats();
        s.push_str(&format!(
            "iommu unit {:#x}: {} maps ({} pages), {} unmaps ({} pages), {} invalidation descriptors, {} waits, {} faults; ",
            u.config().register_base,
            st.maps,
            st.mapped_pages,
            st.unmaps,
            st.unmapped_pages,
            st.flush_descriptors,
            st.waits,
            st.faults
        ));
    }
    for (id, o) in &dev.owners {
        s.push_str(&format!(
            "d{id}: devices {:?}, {} grant mappings, {} faults; ",
            o.devices.iter().map(|b| format!("{b}")).collect::<Vec<_>>(),
            o.grants.len(),
            o.faults.len()
        ));
    }
    s
}
