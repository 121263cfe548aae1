//! VT-d IOMMU support (issue 6): pure `no_std` + `alloc` logic, hardware behind
//! traits, tested on the host against a simulated remapping unit.
//!
//! Modules:
//! - [`dmar`]: the ACPI DMAR table parsed from its bytes ([`dmar::Dmar::parse`]),
//!   units ([`dmar::Drhd`]), reserved regions ([`dmar::Rmrr`]), device scopes and
//!   [`dmar::Dmar::unit_for`] to find the unit of a PCI device;
//! - [`regs`]: register offsets, [`regs::Cap`]/[`regs::Ecap`] decoding, GCMD/GSTS,
//!   FSTS bits, invalidation descriptors, root/context entries, fault records, and
//!   the [`regs::Mmio`] trait;
//! - [`unit`](mod@unit): [`unit::Unit`], the driver of one remapping unit (root and context
//!   tables, per-domain second-level tables built by the `pagetable` crate,
//!   queued or register invalidation, batched unmaps, frame reference counts,
//!   fault polling, counters);
//! - [`refcount`]: per-frame mapping counts stored as runs;
//! - [`pci`]: configuration space behind [`pci::ConfigSpace`], enumeration, BAR
//!   sizing, capability walks.
//!
//! Wiring it into the image (what the hypervisor provides):
//! 1. the DMAR table's bytes (found through the `acpi` crate's table list), parsed
//!    with [`dmar::Dmar::parse`];
//! 2. per DRHD, an uncached identity mapping of `register_base..+register_len()`
//!    and an [`regs::Mmio`] doing volatile 32/64-bit loads and stores there;
//! 3. a [`pagetable::PhysMem`] for table frames (the existing `HostPhysMem`);
//! 4. a [`unit::Platform`]: `flush_cache` = clflush each 64-byte line then mfence
//!    (called only when ECAP.C = 0, which is QEMU's case), volatile dword access,
//!    a microsecond clock (TSC) and `pause`;
//! 5. [`unit::Unit::new`] with [`unit::UnitConfig::new`]`(base, dmar.host_address_width)`,
//!    then one [`unit::Unit::create_domain`] per device-owning domain, `map` of its
//!    physmap (IOVA = guest-physical), `attach` of its devices, and
//!    [`unit::Unit::enable_translation`]. Devices without a context entry are
//!    blocked (they fault) once translation is on.
//!
//! Domains live on one unit; a hypervisor domain whose devices sit behind two units
//! needs a domain (and the same maps) on each.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod dmar;
pub mod pci;
pub mod refcount;
pub mod regs;
pub mod unit;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod unit_tests;
