//! The Xen public guest interface, as ferrovisor speaks it.
//!
//! Constants and `#[repr(C)]` layouts taken from the definitions in Xen's
//! `xen/include/public/` (xen.h, version.h, sched.h, arch-x86/hvm/start_info.h,
//! elfnote.h), written out here because no maintained `no_std` crate carries them.
//! Sizes are pinned with `const` assertions so a layout slip fails the build.
//!
//! [`ferro`] holds the project's own test interface (not part of Xen's ABI): it is
//! only answered for domains created with `test_interface = 1`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod errno;
pub mod event_channel;
pub mod ferro;
pub mod grant_table;
pub mod hypercall;
pub mod shared_info;
pub mod start_info;
mod wire;

/// ELF note type carrying the 32-bit physical entry point of a PVH kernel
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, elfnote.h).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Owner name of Xen ELF notes.
pub const XEN_ELFNOTE_NAME: &[u8] = b"Xen";

/// The interface version this hypervisor reports through `XENVER_version`
/// (major << 16 | minor). We implement the subset of Xen 4.17's ABI that is documented
/// in the repository's notes.
pub const XEN_VERSION_MAJOR: u32 = 4;
/// Minor half of [`XEN_VERSION_MAJOR`].
pub const XEN_VERSION_MINOR: u32 = 17;

/// `XenVMMXenVMM`, the hypervisor signature returned in CPUID leaf 0x40000000
/// (ebx, ecx, edx).
pub const XEN_CPUID_SIGNATURE: [u32; 3] = [0x566e_6558, 0x65584d4d, 0x4d4d566e];

pub mod xs_wire;
