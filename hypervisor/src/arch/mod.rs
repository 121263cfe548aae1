//! Hardware access: the only part of the hypervisor crate with `unsafe`.
//!
//! `x86` wraps the privileged instructions the rest needs, `phys` reads and writes
//! physical memory through the identity map the image keeps, and `svm` is the AMD
//! backend of the [`crate::vcpu::GuestCpu`] interface.
pub mod lapic;
pub mod phys;
pub mod svm;
pub mod vtd;
pub mod x86;
