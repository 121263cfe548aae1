//! The vendor choice, made once at boot from CPUID: the per-CPU virtualisation state
//! ([`HostCpu`]), virtual CPUs ([`Vcpu`]) and nested page tables ([`NestedTable`]) of
//! either backend behind one type each, so that domains and the scheduler never name
//! a vendor. Every method forwards to the backend's own.

use crate::guest_walk::GuestPaging;
use crate::paging::{MapError, Npt, PageSize, PageTable, Perms, PhysMem};
use crate::vcpu::{CodeMode, Exit, GuestCpu, InvalidMsrValue};

use super::svm::{PvhEntry, SvmCpu, SvmVcpu};
use super::vmx::{VmxCpu, VmxVcpu};

/// This CPU's virtualisation extension, enabled.
pub enum HostCpu {
    /// AMD SVM with nested paging.
    Svm(SvmCpu),
    /// Intel VMX with EPT.
    Vmx(VmxCpu),
}

impl HostCpu {
    /// "SVM" or "VMX".
    pub fn name(&self) -> &'static str {
        match self {
            HostCpu::Svm(_) => "SVM",
            HostCpu::Vmx(_) => "VMX",
        }
    }

    /// An empty nested page table in this vendor's format (NPT or EPT, 4 levels).
    pub fn nested_table(&self, mem: &mut impl PhysMem) -> Result<NestedTable, MapError> {
        Ok(match self {
            HostCpu::Svm(_) => NestedTable::Npt(PageTable::new(mem, 4)?),
            HostCpu::Vmx(c) => NestedTable::Ept {
                table: PageTable::new(mem, 4)?,
                max_page: c.features.ept_max_page,
            },
        })
    }
}

/// A guest's nested page table: AMD NPT or Intel EPT, built by the one walker.
pub enum NestedTable {
    /// AMD nested page table.
    Npt(PageTable<Npt>),
    /// Intel extended page table; leaves no larger than `max_page` (what the CPU walks).
    Ept {
        /// The table.
        table: PageTable<crate::paging::Ept>,
        /// Largest page the CPU supports in EPT.
        max_page: PageSize,
    },
}

impl core::fmt::Debug for NestedTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NestedTable::Npt(t) => t.fmt(f),
            NestedTable::Ept { table, .. } => table.fmt(f),
        }
    }
}

impl NestedTable {
    /// Physical address of the root table.
    pub fn root(&self) -> u64 {
        match self {
            NestedTable::Npt(t) => t.root(),
            NestedTable::Ept { table, .. } => table.root(),
        }
    }

    /// See [`PageTable::map`]; EPT refuses pages larger than the CPU walks.
    pub fn map(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        pa: u64,
        size: PageSize,
        perms: Perms,
    ) -> Result<(), MapError> {
        match self {
            NestedTable::Npt(t) => t.map(mem, va, pa, size, perms),
            NestedTable::Ept { max_page, .. } if size > *max_page => {
                Err(MapError::LargePageUnsupported)
            }
            NestedTable::Ept { table, .. } => table.map(mem, va, pa, size, perms),
        }
    }

    /// See [`PageTable::map_range`]; for EPT `max` is capped to what the CPU walks.
    pub fn map_range(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        pa: u64,
        len: u64,
        perms: Perms,
        max: PageSize,
    ) -> Result<(), MapError> {
        match self {
            NestedTable::Npt(t) => t.map_range(mem, va, pa, len, perms, max),
            NestedTable::Ept { table, max_page } => {
                table.map_range(mem, va, pa, len, perms, max.min(*max_page))
            }
        }
    }

    /// See [`PageTable::unmap`].
    pub fn unmap(
        &mut self,
        mem: &mut impl PhysMem,
        va: u64,
        size: PageSize,
    ) -> Result<u64, MapError> {
        match self {
            NestedTable::Npt(t) => t.unmap(mem, va, size),
            NestedTable::Ept { table, .. } => table.unmap(mem, va, size),
        }
    }

    /// See [`PageTable::translate`].
    pub fn translate(&self, mem: &impl PhysMem, va: u64) -> Option<(u64, Perms, PageSize)> {
        match self {
            NestedTable::Npt(t) => t.translate(mem, va),
            NestedTable::Ept { table, .. } => table.translate(mem, va),
        }
    }

    /// See [`PageTable::destroy`].
    pub fn destroy(self, mem: &mut impl PhysMem) {
        match self {
            NestedTable::Npt(t) => t.destroy(mem),
            NestedTable::Ept { table, .. } => table.destroy(mem),
        }
    }
}

/// A virtual CPU of either backend.
pub enum Vcpu {
    /// On AMD SVM.
    Svm(SvmVcpu),
    /// On Intel VMX.
    Vmx(VmxVcpu),
}

impl Vcpu {
    /// A vCPU at the PVH entry (see [`SvmVcpu::new_pvh`]); `tag` is unique per vCPU
    /// (its ASID or VPID), `nested` the domain's table in `cpu`'s format.
    pub fn new_pvh(cpu: &HostCpu, tag: u32, nested: &NestedTable, entry: &PvhEntry) -> Vcpu {
        match cpu {
            HostCpu::Svm(c) => Vcpu::Svm(SvmVcpu::new_pvh(c, tag, nested.root(), entry)),
            HostCpu::Vmx(c) => Vcpu::Vmx(VmxVcpu::new_pvh(c, tag, nested.root(), entry)),
        }
    }

    /// Makes this vCPU run on the physical CPU whose state is `cpu` from its next entry
    /// (see [`SvmVcpu::load_on`]). VMX vCPUs never move: under VMX only the boot CPU
    /// runs guests (moving a VMCS needs VMCLEAR on the CPU it was current on, which is
    /// not done), so their VMCS stays current where it was loaded.
    pub fn load_on(&mut self, cpu: &HostCpu) {
        // one backend per boot: a VMX vCPU only meets the boot CPU's VMX state
        if let (Vcpu::Svm(v), HostCpu::Svm(c)) = (self, cpu) {
            v.load_on(c);
        }
    }

    /// Raw exit information for diagnostics (backend-specific triple).
    pub fn exit_info(&self) -> (u64, u64, u64) {
        match self {
            Vcpu::Svm(v) => v.exit_info(),
            Vcpu::Vmx(v) => v.exit_info(),
        }
    }

    /// The event whose delivery the last exit interrupted (diagnostics).
    pub fn exit_int_info(&self) -> u64 {
        match self {
            Vcpu::Svm(v) => v.exit_int_info(),
            Vcpu::Vmx(v) => v.exit_int_info(),
        }
    }

    /// Guest CR2 (diagnostics).
    pub fn cr2(&self) -> u64 {
        match self {
            Vcpu::Svm(v) => v.cr2(),
            Vcpu::Vmx(v) => v.cr2(),
        }
    }
}

/// Forwards a [`GuestCpu`] method to the backend.
macro_rules! forward {
    ($self:ident, $v:ident => $e:expr) => {
        match $self {
            Vcpu::Svm($v) => $e,
            Vcpu::Vmx($v) => $e,
        }
    };
}

impl GuestCpu for Vcpu {
    fn run(&mut self) -> Exit {
        forward!(self, v => v.run())
    }
    fn reg(&self, r: usize) -> u64 {
        forward!(self, v => v.reg(r))
    }
    fn set_reg(&mut self, r: usize, val: u64) {
        forward!(self, v => v.set_reg(r, val))
    }
    fn rip(&self) -> u64 {
        forward!(self, v => v.rip())
    }
    fn set_rip(&mut self, val: u64) {
        forward!(self, v => v.set_rip(val))
    }
    fn rflags(&self) -> u64 {
        forward!(self, v => v.rflags())
    }
    fn paging(&self) -> GuestPaging {
        forward!(self, v => v.paging())
    }
    fn cpl(&self) -> u8 {
        forward!(self, v => v.cpl())
    }
    fn code_segment(&self) -> (CodeMode, u64) {
        forward!(self, v => v.code_segment())
    }
    fn next_rip(&self) -> Option<u64> {
        forward!(self, v => v.next_rip())
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        forward!(self, v => v.inject_exception(vector, error_code))
    }
    fn read_arch_msr(&self, msr: u32) -> Option<u64> {
        forward!(self, v => v.read_arch_msr(msr))
    }
    fn write_arch_msr(&mut self, msr: u32, val: u64) -> Result<bool, InvalidMsrValue> {
        forward!(self, v => v.write_arch_msr(msr, val))
    }
    fn xcr0(&self) -> u64 {
        forward!(self, v => v.xcr0())
    }
    fn set_xcr0(&mut self, val: u64) {
        forward!(self, v => v.set_xcr0(val))
    }
    fn inject_interrupt(&mut self, vector: u8) {
        forward!(self, v => v.inject_interrupt(vector))
    }
    fn interrupt_pending(&self) -> bool {
        forward!(self, v => v.interrupt_pending())
    }
    fn reset_real_mode(&mut self, vector: u8) {
        forward!(self, v => v.reset_real_mode(vector))
    }
    fn flush_tlb(&mut self) {
        forward!(self, v => v.flush_tlb())
    }
    fn hypercall_instruction(&self) -> [u8; 3] {
        forward!(self, v => v.hypercall_instruction())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page-table memory on the host heap: frames are 4 KiB-aligned boxes.
    struct HeapMem(
        alloc::collections::BTreeMap<u64, alloc::boxed::Box<[u64; 512]>>,
        u64,
    );

    impl PhysMem for HeapMem {
        fn read(&self, pa: u64) -> u64 {
            self.0[&(pa & !0xfff)][((pa & 0xfff) / 8) as usize]
        }
        fn write(&mut self, pa: u64, v: u64) {
            self.0.get_mut(&(pa & !0xfff)).expect("table frame")[((pa & 0xfff) / 8) as usize] = v;
        }
        fn alloc_table(&mut self) -> Option<u64> {
            self.1 += 0x1000;
            self.0.insert(self.1, alloc::boxed::Box::new([0; 512]));
            Some(self.1)
        }
        fn free_table(&mut self, pa: u64) {
            self.0.remove(&pa);
        }
    }

    #[test]
    fn ept_leaves_stay_within_what_the_cpu_walks() {
        let mut mem = HeapMem(Default::default(), 0x10_0000);
        let mut t = NestedTable::Ept {
            table: PageTable::new(&mut mem, 4).unwrap(),
            max_page: PageSize::Size4K,
        };
        // a 2 MiB-aligned range asked with 2 MiB pages gets 4 KiB leaves
        t.map_range(
            &mut mem,
            0x20_0000,
            0x4020_0000,
            0x20_0000,
            Perms::ALL,
            PageSize::Size2M,
        )
        .unwrap();
        let (pa, perms, size) = t.translate(&mem, 0x20_1000).unwrap();
        assert_eq!((pa, size), (0x4020_1000, PageSize::Size4K));
        // EPT has no user bit: a request with it maps read/write/execute
        assert_eq!(perms, Perms::RWX);
        assert_eq!(
            t.map(&mut mem, 0x40_0000, 0x40_0000, PageSize::Size2M, Perms::ALL),
            Err(MapError::LargePageUnsupported)
        );
        // the leaf is an EPT entry: R|W|X, write-back memory type, no large-page bit
        let leaf_bits = |t: &NestedTable| {
            let NestedTable::Ept { table, .. } = t else {
                unreachable!()
            };
            let mut e = mem.read(table.root());
            for level in (1..4).rev() {
                let idx = (0x20_1000u64 >> (12 + 9 * (level - 1))) & 511;
                e = mem.read((e & crate::paging::ADDR_MASK) + idx * 8);
            }
            e & 0xfff
        };
        assert_eq!(leaf_bits(&t), 0x7 | (6 << 3));
        t.destroy(&mut mem);
        assert!(mem.0.is_empty());

        let mut mem = HeapMem(Default::default(), 0x10_0000);
        let mut big = NestedTable::Ept {
            table: PageTable::new(&mut mem, 4).unwrap(),
            max_page: PageSize::Size1G,
        };
        big.map_range(
            &mut mem,
            0,
            0x8000_0000,
            0x4000_0000,
            Perms::ALL,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(
            big.translate(&mem, 0x1234_5678).unwrap().2,
            PageSize::Size2M
        );
        big.destroy(&mut mem);
    }

    #[test]
    fn npt_keeps_user_rights() {
        let mut mem = HeapMem(Default::default(), 0x10_0000);
        let mut t = NestedTable::Npt(PageTable::new(&mut mem, 4).unwrap());
        t.map(&mut mem, 0x1000, 0x5000, PageSize::Size4K, Perms::ALL)
            .unwrap();
        assert_eq!(t.translate(&mem, 0x1000).unwrap().1, Perms::ALL);
        assert_eq!(t.unmap(&mut mem, 0x1000, PageSize::Size4K), Ok(0x5000));
        t.destroy(&mut mem);
    }
}
