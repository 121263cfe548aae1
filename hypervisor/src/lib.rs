//! The hypervisor proper: vCPUs behind one interface (SVM backend), nested paging,
//! domains and their memory, the Xen hypercall ABI and the PVH guest loader.
//!
//! Pure logic (page tables, guest page walks, the ELF/PVH loader, domain configs, the
//! boot bundle) is plain `no_std` code tested on the host; hardware access lives in
//! `arch` and is the only place with `unsafe`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod bundle;
pub mod config;
pub mod guest_walk;
pub mod loader;
pub use pagetable as paging;

#[allow(unsafe_code)]
pub mod arch;
pub mod bzimage;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod domain;
pub mod emulate;
pub mod evtchn;
pub mod evtchn_fifo;
pub mod exits;
pub mod frames;
pub mod grant_glue;
pub mod guest_acpi;
pub mod hypercall;
#[allow(unsafe_code)] // owns guest frames; copies go through `arch::phys`
pub mod memory;
pub mod run;
pub mod smp;
pub mod testiface;
pub mod time;
pub mod vcpu;
pub mod vlapic;
pub mod xen;
pub mod xenstore;
