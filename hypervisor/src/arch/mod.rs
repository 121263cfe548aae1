//! Hardware access: the only part of the hypervisor crate with `unsafe`.
//!
//! `x86` wraps the privileged instructions the rest needs, `phys` reads and writes
//! physical memory through the identity map the image keeps, and `svm` is the AMD
//! backend of the [`crate::vcpu::GuestCpu`] interface.
pub mod lapic;

/// The virtualisation state of one physical CPU (host save areas, FPU mode), whichever
/// backend runs it: the scheduler keeps one per CPU and hands it to the vCPU it runs.
pub type HostCpu = svm::SvmCpu;

pub mod phys;
pub mod stack;
pub mod svm;
pub mod x86;
