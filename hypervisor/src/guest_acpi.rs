//! The ACPI tables a PVH domU finds at `hvm_start_info.rsdp_paddr`: hardware-reduced ACPI,
//! as Linux expects on Xen PVH.
//!
//! Layout, one contiguous blob at `base_gpa`, every table 16-byte aligned:
//! RSDP (revision 2, XSDT only) -> XSDT -> FADT, MADT; FADT -> DSDT.
//! - FADT: ACPI 6.0 layout (revision 6, minor 0, 276 bytes) with `HW_REDUCED_ACPI`; no
//!   FACS, PM timer, GPE or SCI (a hardware-reduced platform has none). `IAPC_BOOT_ARCH`
//!   says no VGA, no CMOS RTC and no ASPM control (and, leaving bits 0/1 clear, no legacy
//!   devices and no 8042). Fixed power/sleep buttons are marked absent, as Xen does when it
//!   has no buttons. The hypervisor vendor identity (FADT 6.0) is `"XenVMM"`: Xen itself
//!   builds a revision-5 FADT (268 bytes) that has no such field.
//! - MADT (revision 4): local APIC address 0xFEE00000, flags 0 (no 8259 PIC; Xen sets
//!   PCAT_COMPAT), one enabled processor entry per vCPU with APIC id = ACPI processor UID =
//!   vCPU index (Xen's HVM uses APIC id 2i), as Processor Local x2APIC entries (type 9) or
//!   Processor Local APIC entries (type 0; vCPUs 255 and up, which an xAPIC id cannot name,
//!   get x2APIC entries). No I/O APIC, no interrupt source overrides.
//! - DSDT: a header and no AML objects. Linux needs the DSDT to exist, not to contain
//!   anything: a `\_S5` object would be ignored on a hardware-reduced platform without
//!   sleep registers, and the guest powers off through `SCHEDOP_shutdown`.
//!
//! Identity as Xen's libacpi: OEM id `"Xen"`, OEM table id `"HVM"`, OEM revision 0, creator
//! `"HVML"` revision 0. The tables are written by hand (about 150 lines): `acpi_tables`
//! (rust-vmm) has no x2APIC MADT entry and exposes the FADT only as a raw struct, so it
//! would save little.

use alloc::vec;
use alloc::vec::Vec;

/// The tables and where they go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Guest-physical address of the RSDP (the blob's start): `hvm_start_info.rsdp_paddr`.
    pub rsdp_gpa: u64,
    /// RSDP first, then the other tables, to be copied to guest memory at `rsdp_gpa`.
    pub tables: Vec<u8>,
}

/// Local APIC base address written in the MADT.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;

const OEM_ID: &[u8; 6] = b"Xen\0\0\0";
const OEM_TABLE_ID: &[u8; 8] = b"HVM\0\0\0\0\0";
const CREATOR_ID: &[u8; 4] = b"HVML";

const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;
const MADT_FIXED_LEN: usize = HEADER_LEN + 8;
const LAPIC_ENTRY_LEN: usize = 8;
const X2APIC_ENTRY_LEN: usize = 16;

// FADT field offsets (ACPI 6.0, table 5-34).
const FADT_DSDT: usize = 40;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_HYPERVISOR_VENDOR: usize = 268;

// FADT flags.
const PWR_BUTTON: u32 = 1 << 4;
const SLP_BUTTON: u32 = 1 << 5;
const HW_REDUCED_ACPI: u32 = 1 << 20;

// IAPC_BOOT_ARCH.
const VGA_NOT_PRESENT: u16 = 1 << 2;
const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const MADT_ENABLED: u32 = 1;

fn align16(x: usize) -> usize {
    (x + 15) & !15
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The byte that makes `bytes` sum to zero (mod 256) when stored in a zeroed checksum
/// field.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_sub(b))
}

/// Writes a standard table header at the start of `t` and its checksum over all of `t`.
fn seal(t: &mut [u8], signature: &[u8; 4], revision: u8) {
    put(t, 0, signature);
    put(t, 4, &(t.len() as u32).to_le_bytes());
    t[8] = revision;
    t[9] = 0;
    put(t, 10, OEM_ID);
    put(t, 16, OEM_TABLE_ID);
    put(t, 24, &0u32.to_le_bytes());
    put(t, 28, CREATOR_ID);
    put(t, 32, &0u32.to_le_bytes());
    t[9] = checksum(t);
}

/// Builds the tables for a domain with `vcpus` vCPUs (0 is taken as 1), to be placed at
/// `base_gpa` (which should be 16-byte aligned: the tables' alignment is relative to it).
/// `x2apic` selects Processor Local x2APIC MADT entries instead of Processor Local APIC
/// ones. The result is a few hundred bytes plus 8 or 16 per vCPU.
#[must_use]
pub fn build(base_gpa: u64, vcpus: u32, x2apic: bool) -> AcpiLayout {
    let vcpus = vcpus.max(1);
    let xsdt_entries = 2;
    let xsdt_len = HEADER_LEN + 8 * xsdt_entries;
    let madt_len = MADT_FIXED_LEN
        + (0..vcpus)
            .map(|i| {
                if x2apic || i >= 255 {
                    X2APIC_ENTRY_LEN
                } else {
                    LAPIC_ENTRY_LEN
                }
            })
            .sum::<usize>();

    let rsdp = 0;
    let xsdt = align16(rsdp + RSDP_LEN);
    let fadt = align16(xsdt + xsdt_len);
    let dsdt = align16(fadt + FADT_LEN);
    let madt = align16(dsdt + HEADER_LEN);
    let end = madt + madt_len;
    let gpa = |off: usize| base_gpa + off as u64;
    let mut b = vec![0u8; end];

    // DSDT: header only.
    seal(&mut b[dsdt..dsdt + HEADER_LEN], b"DSDT", 2);

    // FADT.
    {
        let t = &mut b[fadt..fadt + FADT_LEN];
        let dsdt_gpa = gpa(dsdt);
        // The 32-bit field too when it can hold the address, as Xen does.
        if let Ok(low) = u32::try_from(dsdt_gpa) {
            put(t, FADT_DSDT, &low.to_le_bytes());
        }
        put(t, FADT_X_DSDT, &dsdt_gpa.to_le_bytes());
        let boot_arch = VGA_NOT_PRESENT | PCIE_ASPM_CONTROLS | CMOS_RTC_NOT_PRESENT;
        put(t, FADT_IAPC_BOOT_ARCH, &boot_arch.to_le_bytes());
        let flags = HW_REDUCED_ACPI | PWR_BUTTON | SLP_BUTTON;
        put(t, FADT_FLAGS, &flags.to_le_bytes());
        t[FADT_MINOR_VERSION] = 0;
        put(t, FADT_HYPERVISOR_VENDOR, b"XenVMM\0\0");
        seal(t, b"FACP", 6);
    }

    // MADT.
    {
        let t = &mut b[madt..madt + madt_len];
        put(t, HEADER_LEN, &LAPIC_ADDRESS.to_le_bytes());
        put(t, HEADER_LEN + 4, &0u32.to_le_bytes());
        let mut at = MADT_FIXED_LEN;
        for i in 0..vcpus {
            if x2apic || i >= 255 {
                let e = &mut t[at..at + X2APIC_ENTRY_LEN];
                e[0] = 9;
                e[1] = X2APIC_ENTRY_LEN as u8;
                put(e, 4, &i.to_le_bytes());
                put(e, 8, &MADT_ENABLED.to_le_bytes());
                put(e, 12, &i.to_le_bytes());
                at += X2APIC_ENTRY_LEN;
            } else {
                let e = &mut t[at..at + LAPIC_ENTRY_LEN];
                e[0] = 0;
                e[1] = LAPIC_ENTRY_LEN as u8;
                e[2] = i as u8; // ACPI processor UID
                e[3] = i as u8; // APIC id
                put(e, 4, &MADT_ENABLED.to_le_bytes());
                at += LAPIC_ENTRY_LEN;
            }
        }
        seal(t, b"APIC", 4);
    }

    // XSDT.
    {
        let t = &mut b[xsdt..xsdt + xsdt_len];
        put(t, HEADER_LEN, &gpa(fadt).to_le_bytes());
        put(t, HEADER_LEN + 8, &gpa(madt).to_le_bytes());
        seal(t, b"XSDT", 1);
    }

    // RSDP: the ACPI 1.0 checksum covers the first 20 bytes, the extended one all 36.
    {
        let t = &mut b[rsdp..rsdp + RSDP_LEN];
        put(t, 0, b"RSD PTR ");
        put(t, 9, OEM_ID);
        t[15] = 2;
        // RsdtAddress (16..20) stays 0: there is no RSDT.
        put(t, 20, &(RSDP_LEN as u32).to_le_bytes());
        put(t, 24, &gpa(xsdt).to_le_bytes());
        t[8] = checksum(&t[..20]);
        t[32] = checksum(t);
    }

    AcpiLayout {
        rsdp_gpa: base_gpa,
        tables: b,
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // the `acpi` crate's handler interface is unsafe; test-only
mod tests {
    use super::*;
    use acpi::fadt::Fadt;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
    use alloc::string::String;
    use core::ptr::NonNull;

    /// "Physical memory" holding only the tables, at `base`.
    #[derive(Clone, Copy)]
    struct Mem {
        base: usize,
        bytes: &'static [u8],
    }

    impl AcpiHandler for Mem {
        unsafe fn map_physical_region<T>(
            &self,
            pa: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            let off = pa.checked_sub(self.base).expect("read below the tables");
            assert!(
                off + size <= self.bytes.len(),
                "read past the tables: {pa:#x}+{size}"
            );
            let ptr = NonNull::from(&self.bytes[off]).cast::<T>();
            // SAFETY: `ptr..ptr + size` lies inside `bytes`, which is leaked (lives for the
            // rest of the test process) and never written; the parser's table types are
            // packed structs of plain integers, valid for any bytes at any alignment.
            unsafe { PhysicalMapping::new(pa, ptr, size, size, *self) }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    /// A copy of `b` that lives until the test process ends, 16-byte aligned like the
    /// guest-physical placement, so that the tables' own alignment is preserved.
    fn leak_aligned(b: &[u8]) -> &'static [u8] {
        let words: &'static mut [u128] = Vec::leak(vec![0u128; b.len().div_ceil(16)]);
        // SAFETY: `words` is a live, exclusively borrowed allocation of at least `b.len()`
        // bytes; u8 has no alignment or validity requirements.
        let bytes: &'static mut [u8] =
            unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), b.len()) };
        bytes.copy_from_slice(b);
        bytes
    }

    fn table_len(b: &[u8], at: usize) -> usize {
        u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize
    }

    fn check(base: u64, vcpus: u32, x2apic: bool) {
        let layout = build(base, vcpus, x2apic);
        assert_eq!(layout.rsdp_gpa, base);
        let b = &layout.tables;
        assert!(b.len() < 1024 + 16 * vcpus as usize, "{} bytes", b.len());

        // Our own view: every table 16-byte aligned, checksums zero.
        let rsdp = &b[..36];
        assert_eq!(rsdp.iter().take(20).fold(0u8, |s, &x| s.wrapping_add(x)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |s, &x| s.wrapping_add(x)), 0);
        let xsdt = (u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - base) as usize;
        let mut tables = vec![xsdt];
        for e in b[xsdt + 36..xsdt + table_len(b, xsdt)].chunks(8) {
            tables.push((u64::from_le_bytes(e.try_into().unwrap()) - base) as usize);
        }
        let fadt = tables[1];
        tables.push(
            (u64::from_le_bytes(b[fadt + 140..fadt + 148].try_into().unwrap()) - base) as usize,
        );
        for &t in &tables {
            assert_eq!(t % 16, 0);
            let len = table_len(b, t);
            assert!(t + len <= b.len());
            assert_eq!(b[t..t + len].iter().fold(0u8, |s, &x| s.wrapping_add(x)), 0);
            assert_eq!(&b[t + 10..t + 16], b"Xen\0\0\0");
            assert_eq!(&b[t + 16..t + 24], b"HVM\0\0\0\0\0");
        }

        // The `acpi` crate's view.
        let mem = Mem {
            base: base as usize,
            bytes: leak_aligned(b),
        };
        // SAFETY: `Mem` maps exactly the bytes built above, RSDP first.
        let acpi = unsafe { AcpiTables::from_rsdp(mem, base as usize) }.unwrap();
        assert_eq!(acpi.revision(), 2);
        let mut sigs: Vec<String> = acpi
            .headers()
            .map(|h| h.signature.as_str().into())
            .collect();
        sigs.sort();
        assert_eq!(sigs, ["APIC", "FACP"]);

        let fadt = acpi.find_table::<Fadt>().unwrap();
        let flags = { fadt.flags };
        assert!(flags.system_is_hw_reduced_acpi());
        assert!(flags.power_button_is_control_method());
        assert!(flags.sleep_button_is_control_method());
        let header = acpi::AcpiTable::header(&*fadt);
        assert!(header.revision == 6 && { header.length } == 276);
        let arch = fadt.iapc_boot_arch;
        assert!(!arch.legacy_devices_are_accessible());
        assert!(!arch.motherboard_implements_8042());
        assert!(arch.dont_probe_vga());
        assert!(arch.use_time_and_alarm_namespace_for_rtc()); // bit 5, CMOS RTC not present
        assert!(arch.dont_enable_pcie_aspm());
        assert!(fadt.pm_timer_block().unwrap().is_none());
        let dsdt = acpi.dsdt().unwrap();
        assert_eq!(dsdt.length, 0);
        assert_eq!(fadt.dsdt_address().unwrap() as u64, base + tables[3] as u64);
        drop(fadt);

        let madt = acpi.find_table::<Madt>().unwrap();
        let madt = madt.get();
        assert_eq!({ madt.local_apic_address }, LAPIC_ADDRESS);
        assert!(!madt.supports_8259());
        let mut ids = vec![];
        for e in madt.entries() {
            match e {
                MadtEntry::LocalApic(l) if !x2apic => {
                    assert_eq!(l.processor_id, l.apic_id);
                    assert_eq!({ l.flags }, 1);
                    ids.push(u32::from(l.apic_id));
                }
                MadtEntry::LocalX2Apic(l) if x2apic || l.x2apic_id >= 255 => {
                    assert_eq!({ l.processor_uid }, { l.x2apic_id });
                    assert_eq!({ l.flags }, 1);
                    ids.push(l.x2apic_id);
                }
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        assert_eq!(ids, (0..vcpus.max(1)).collect::<Vec<_>>());
    }

    #[test]
    fn tables_parse_back() {
        for base in [0x000f_0000u64, 0x9_f000, 0xfc00_0000, 0x1_2345_6780] {
            for vcpus in [1, 2, 64] {
                for x2apic in [false, true] {
                    check(base, vcpus, x2apic);
                }
            }
        }
    }

    #[test]
    fn many_and_zero_vcpus() {
        // xAPIC entries stop at id 254; the rest are x2APIC entries.
        check(0x10_0000, 300, false);
        check(0x10_0000, 300, true);
        let zero = build(0x10_0000, 0, false);
        assert_eq!(zero, build(0x10_0000, 1, false));
    }

    #[test]
    fn dsdt_32_bit_pointer_only_below_4g() {
        let low = build(0xe_0000, 1, true);
        let high = build(0x1_0000_0000, 1, true);
        let fadt_of = |l: &AcpiLayout| {
            let xsdt =
                (u64::from_le_bytes(l.tables[24..32].try_into().unwrap()) - l.rsdp_gpa) as usize;
            (u64::from_le_bytes(l.tables[xsdt + 36..xsdt + 44].try_into().unwrap()) - l.rsdp_gpa)
                as usize
        };
        let f = fadt_of(&low);
        assert_ne!(&low.tables[f + 40..f + 44], &[0; 4]);
        let f = fadt_of(&high);
        assert_eq!(&high.tables[f + 40..f + 44], &[0; 4]);
        assert_eq!(&high.tables[f + 268..f + 276], b"XenVMM\0\0");
    }
}
