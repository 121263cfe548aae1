//! Hardware access: the only part of the hypervisor crate with `unsafe`.
//!
//! `x86` wraps the privileged instructions the rest needs, `phys` reads and writes
//! physical memory through the identity map the image keeps, `svm` and `vmx` are the
//! AMD and Intel backends of the [`crate::vcpu::GuestCpu`] interface, and `cpu` holds
//! the types that hide which one boot chose.
pub mod cpu;
pub mod lapic;

/// The virtualisation state of one physical CPU (host save areas, FPU mode), whichever
/// backend runs it: the scheduler keeps one per CPU and hands it to the vCPU it runs.
pub use cpu::HostCpu;

pub mod phys;
pub mod stack;
pub mod svm;
pub mod vmx;
pub mod vtd;
pub mod x86;
