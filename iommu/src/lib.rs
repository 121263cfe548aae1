//! VT-d IOMMU support (issue 6), pure `no_std` logic with the hardware behind traits.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod dmar;
pub mod refcount;
pub mod regs;
pub mod unit;

pub mod pci;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod unit_tests;
