//! VT-d IOMMU support (issue 6): DMAR parsing, one driver per remapping unit, root and
//! context tables, per-domain second-level page tables, register and queued
//! invalidation, and fault reporting. Page-table logic is tested on the host.
//!
//! Nothing is implemented yet; this crate is deliberately empty until that issue.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
