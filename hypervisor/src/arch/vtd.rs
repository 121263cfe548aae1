//! Hardware access for VT-d and PCI: a remapping unit's register page ([`iommu::regs::Mmio`]),
//! the platform services its driver needs ([`iommu::unit::Platform`]) and PCI
//! configuration space through ports 0xcf8/0xcfc ([`iommu::pci::ConfigSpace`]).

use iommu::pci::{Bdf, ConfigSpace};

/// The register page of one remapping unit, at its DRHD base (identity-mapped,
/// made uncacheable by boot code).
pub struct VtdRegs {
    base: u64,
}

/// Register pages already handed out (each unit is driven by one `VtdRegs`).
static CLAIMED: spin::Mutex<alloc::vec::Vec<u64>> = spin::Mutex::new(alloc::vec::Vec::new());

impl VtdRegs {
    /// The unit whose registers start at `base`, a DRHD register base from the
    /// firmware's DMAR table; `None` when it is not a page-aligned address below 4 GiB
    /// (the identity map's uncached device range) or was claimed before.
    pub fn claim(base: u64) -> Option<VtdRegs> {
        if base == 0 || !base.is_multiple_of(4096) || base >= 1 << 32 {
            return None;
        }
        let mut claimed = CLAIMED.lock();
        if claimed.contains(&base) {
            return None;
        }
        claimed.push(base);
        Some(VtdRegs { base })
    }
}

impl iommu::regs::Mmio for VtdRegs {
    fn read32(&self, off: usize) -> u32 {
        // SAFETY: `claim` checked the page lies in the identity map below 4 GiB and is
        // driven only through this value; the driver passes aligned offsets inside it.
        unsafe { core::ptr::read_volatile((self.base + off as u64) as *const u32) }
    }
    fn write32(&mut self, off: usize, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile((self.base + off as u64) as *mut u32, value) }
    }
    fn read64(&self, off: usize) -> u64 {
        // SAFETY: as in `read32`; one 8-byte load.
        unsafe { core::ptr::read_volatile((self.base + off as u64) as *const u64) }
    }
    fn write64(&mut self, off: usize, value: u64) {
        // SAFETY: as in `read32`; one 8-byte store.
        unsafe { core::ptr::write_volatile((self.base + off as u64) as *mut u64, value) }
    }
}

/// Cache write-back, the QI status dword and the clock, for the VT-d driver.
pub struct VtdPlatform;

impl iommu::unit::Platform for VtdPlatform {
    fn flush_cache(&mut self, pa: u64, len: u64) {
        let mut line = pa & !63;
        while line < pa + len {
            // SAFETY: clflush of identity-mapped RAM the driver owns (its tables) only
            // writes the line back; it changes no memory contents.
            unsafe { core::arch::asm!("clflush [{}]", in(reg) line, options(nostack)) };
            line += 64;
        }
        // SAFETY: a fence has no memory-safety effect.
        unsafe { core::arch::asm!("mfence", options(nostack)) };
    }
    fn read_u32(&self, pa: u64) -> u32 {
        // SAFETY: the driver names the status dword it allocated (identity-mapped RAM,
        // 4-aligned); the unit writes it by DMA, hence volatile.
        unsafe { core::ptr::read_volatile(pa as *const u32) }
    }
    fn write_u32(&mut self, pa: u64, value: u32) {
        // SAFETY: as in `read_u32`.
        unsafe { core::ptr::write_volatile(pa as *mut u32, value) }
    }
    fn now_us(&self) -> u64 {
        crate::time::now_ns() / 1000
    }
    fn relax(&mut self) {
        core::hint::spin_loop();
    }
}

/// PCI configuration space of segment 0 through the legacy ports (type 1 accesses:
/// offsets below 256).
pub struct PortConfigSpace;

fn address(bdf: Bdf, off: u16) -> u32 {
    0x8000_0000 | u32::from(bdf.source_id()) << 8 | u32::from(off & 0xfc)
}

impl ConfigSpace for PortConfigSpace {
    fn read32(&self, bdf: Bdf, off: u16) -> u32 {
        if off >= 256 {
            return !0;
        }
        // SAFETY: the hypervisor owns the host bridge's configuration ports; one CPU
        // at a time (callers hold the devices lock) selects and reads a dword.
        unsafe {
            super::x86::outl(0xcf8, address(bdf, off));
            super::x86::inl(0xcfc)
        }
    }
    fn write32(&mut self, bdf: Bdf, off: u16, value: u32) {
        if off >= 256 {
            return;
        }
        // SAFETY: as in `read32`; the callers write only registers of devices the
        // hypervisor enumerates or a domain owns (command register, BAR probing).
        unsafe {
            super::x86::outl(0xcf8, address(bdf, off));
            super::x86::outl(0xcfc, value);
        }
    }
}
