//! ACPI discovery with the `acpi` crate: the RSDP (from the loader, else the BIOS
//! areas), the MADT for CPUs, and the DMAR and SRAT tables kept for later (VT-d, NUMA).

use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

/// The identity map makes every physical address directly accessible.
#[derive(Clone, Copy, Debug)]
pub struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // SAFETY: firmware tables lie in identity-mapped memory below 4 GiB; the crate
        // only reads them.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(physical_address as *mut T).expect("ACPI table at address 0"),
                size,
                size,
                *self,
            )
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What discovery found.
#[derive(Debug, Default, Clone)]
pub struct AcpiInfo {
    /// Physical address of the RSDP.
    pub rsdp: u64,
    /// Enabled local APICs in the MADT.
    pub cpus: u32,
    /// Their APIC ids, in MADT order (the boot CPU's among them; xAPIC ids above 254
    /// are left out: this hypervisor drives the local APIC in xAPIC mode).
    pub apic_ids: alloc::vec::Vec<u32>,
    /// Physical address of the DMAR table (VT-d), if any.
    pub dmar: Option<u64>,
    /// Physical address of the SRAT (NUMA), if any.
    pub srat: Option<u64>,
    /// Physical address of the MCFG (PCI ECAM), if any.
    pub mcfg: Option<u64>,
    /// The FADT's PM1a control port when the firmware is an emulator's (OEM "BOCHS ",
    /// as Bochs and QEMU write it), whose S5 sleep type is 0: how the image powers off
    /// there.
    pub emulator_pm1a_cnt: Option<u16>,
}

/// Finds the ACPI tables; `None` (with a warning) when the machine has none.
pub fn discover(rsdp_hint: Option<u64>) -> Option<AcpiInfo> {
    let h = IdentityHandler;
    // SAFETY: the loader's RSDP address (or the BIOS area search) points at firmware
    // tables in identity-mapped memory.
    let tables = unsafe {
        match rsdp_hint {
            Some(a) => AcpiTables::from_rsdp(h, a as usize),
            None => AcpiTables::search_for_rsdp_bios(h),
        }
    };
    let tables = match tables {
        Ok(t) => t,
        Err(e) => {
            log::warn!("no usable ACPI tables ({e:?}): CPU and IOMMU discovery skipped");
            return None;
        }
    };
    let mut info = AcpiInfo {
        rsdp: rsdp_hint.unwrap_or(0),
        ..AcpiInfo::default()
    };
    if let Ok(madt) = tables.find_table::<acpi::madt::Madt>() {
        for e in madt.get().entries() {
            let (id, flags) = match e {
                acpi::madt::MadtEntry::LocalApic(l) => (u32::from(l.apic_id), l.flags),
                acpi::madt::MadtEntry::LocalX2Apic(l) => (l.x2apic_id, l.flags),
                _ => continue,
            };
            if flags & 1 != 0 {
                info.cpus += 1;
                if id < 0xff && !info.apic_ids.contains(&id) {
                    info.apic_ids.push(id);
                } else if id >= 0xff {
                    log::warn!("MADT: CPU with APIC id {id} needs x2APIC mode: left out");
                }
            }
        }
    }
    if let Ok(fadt) = tables.find_table::<acpi::fadt::Fadt>() {
        let oem = acpi::AcpiTable::header(&*fadt).oem_id;
        if &oem == b"BOCHS " {
            if let Ok(cnt) = fadt.pm1a_control_block() {
                if cnt.address_space == acpi::address::AddressSpace::SystemIo {
                    info.emulator_pm1a_cnt = u16::try_from(cnt.address).ok();
                }
            }
        }
    }
    info.dmar = tables
        .find_table::<Dmar>()
        .ok()
        .map(|m| m.physical_start() as u64);
    info.srat = tables
        .find_table::<Srat>()
        .ok()
        .map(|m| m.physical_start() as u64);
    info.mcfg = tables
        .find_table::<acpi::mcfg::Mcfg>()
        .ok()
        .map(|m| m.physical_start() as u64);
    Some(info)
}

macro_rules! raw_table {
    ($name:ident, $sig:expr, $doc:literal) => {
        #[doc = $doc]
        #[repr(C, packed)]
        pub struct $name {
            header: acpi::sdt::SdtHeader,
        }

        // SAFETY: the struct is exactly the common SDT header the signature names;
        // its body is read later by the code that owns that table.
        unsafe impl acpi::AcpiTable for $name {
            const SIGNATURE: acpi::sdt::Signature = $sig;
            fn header(&self) -> &acpi::sdt::SdtHeader {
                &self.header
            }
        }
    };
}

raw_table!(
    Dmar,
    acpi::sdt::Signature::DMAR,
    "The DMA remapping table (VT-d), parsed by the iommu crate."
);
raw_table!(
    Srat,
    acpi::sdt::Signature::SRAT,
    "The static resource affinity table (NUMA nodes)."
);
