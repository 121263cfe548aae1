//! `struct shared_info`, `struct vcpu_info`, `struct vcpu_time_info` (pvclock) and
//! `struct vcpu_runstate_info`, x86_64 layout.
//!
//! Sources read (xen-project/xen, staging, 2026): `xen/include/public/xen.h`
//! (`vcpu_time_info`, `vcpu_info`, `shared_info`, `XEN_PVCLOCK_*`),
//! `xen/include/public/arch-x86/xen.h` (`XEN_LEGACY_MAX_VCPUS` = 32,
//! `XEN_HAVE_PV_UPCALL_MASK`, `xen_ulong_t` = `unsigned long`, `arch_shared_info`),
//! `xen/include/public/arch-x86/xen-x86_64.h` (`arch_vcpu_info` = { cr2, pad }) and
//! `xen/include/public/vcpu.h` (`vcpu_runstate_info`, `RUNSTATE_*`).
//!
//! Offsets verified (each pinned by a `const` assertion below):
//!
//! | field | offset | size |
//! |---|---|---|
//! | `vcpu_info.evtchn_upcall_pending` | 0 | 1 |
//! | `vcpu_info.evtchn_upcall_mask` | 1 | 1 |
//! | `vcpu_info.evtchn_pending_sel` | 8 | 8 |
//! | `vcpu_info.arch` (`cr2`, `pad`) | 16 | 16 |
//! | `vcpu_info.time` | 32 | 32 |
//! | `sizeof(vcpu_info)` | | 64 |
//! | `shared_info.vcpu_info[32]` | 0 | 2048 |
//! | `shared_info.evtchn_pending[64]` | 2048 | 512 |
//! | `shared_info.evtchn_mask[64]` | 2560 | 512 |
//! | `wc_version`, `wc_sec`, `wc_nsec`, `wc_sec_hi` | 3072, 3076, 3080, 3084 | 4 each |
//! | `shared_info.arch` (6 × u64) | 3088 | 48 |
//! | `sizeof(shared_info)` | | 3136 |
//! | `vcpu_time_info`: version 0, pad0 4, tsc_timestamp 8, system_time 16, tsc_to_system_mul 24, tsc_shift 28, flags 29, pad1 30 | | 32 |
//! | `vcpu_runstate_info`: state 0, state_entry_time 8, time[4] 16 | | 48 |
//!
//! The guest owns these pages; the hypervisor reads and writes fields in place (by
//! offset) or through the `to_bytes`/`from_bytes` helpers on copies.

use core::mem::{offset_of, size_of};

/// vcpu_info slots inside shared_info (`XEN_LEGACY_MAX_VCPUS`, x86).
pub const XEN_LEGACY_MAX_VCPUS: u32 = 32;
/// Bits in one event-channel word (`BITS_PER_EVTCHN_WORD`, `sizeof(xen_ulong_t) * 8`).
pub const BITS_PER_EVTCHN_WORD: u32 = 64;
/// Words in `evtchn_pending` / `evtchn_mask` (`sizeof(xen_ulong_t) * 8`).
pub const EVTCHN_WORDS: usize = 64;

/// `XEN_PVCLOCK_TSC_STABLE_BIT`: `vcpu_time_info.flags` bit, the TSC is synchronised
/// across vCPUs (Linux then uses the pvclock vDSO and skips cross-vCPU monotonicity fixes).
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
/// `XEN_PVCLOCK_GUEST_STOPPED`: `vcpu_time_info.flags` bit, the guest was paused.
pub const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;

/// Size of `struct vcpu_info`.
pub const VCPU_INFO_SIZE: usize = 64;
/// Offset of `evtchn_upcall_pending` (u8) in `vcpu_info`.
pub const VCPU_INFO_UPCALL_PENDING: usize = 0;
/// Offset of `evtchn_upcall_mask` (u8) in `vcpu_info` (not consulted by Xen for HVM/PVH).
pub const VCPU_INFO_UPCALL_MASK: usize = 1;
/// Offset of `evtchn_pending_sel` (u64) in `vcpu_info`.
pub const VCPU_INFO_PENDING_SEL: usize = 8;
/// Offset of `arch` (`arch_vcpu_info`) in `vcpu_info`.
pub const VCPU_INFO_ARCH: usize = 16;
/// Offset of `time` (`vcpu_time_info`) in `vcpu_info`.
pub const VCPU_INFO_TIME: usize = 32;

/// Offset of `evtchn_pending[64]` (u64 words) in shared_info.
pub const SHARED_INFO_EVTCHN_PENDING: usize = 2048;
/// Offset of `evtchn_mask[64]` (u64 words) in shared_info.
pub const SHARED_INFO_EVTCHN_MASK: usize = 2560;
/// Offset of `wc_version` (u32) in shared_info.
pub const SHARED_INFO_WC_VERSION: usize = 3072;
/// Offset of `wc_sec` (u32) in shared_info.
pub const SHARED_INFO_WC_SEC: usize = 3076;
/// Offset of `wc_nsec` (u32) in shared_info.
pub const SHARED_INFO_WC_NSEC: usize = 3080;
/// Offset of `wc_sec_hi` (u32, x86_64 only) in shared_info.
pub const SHARED_INFO_WC_SEC_HI: usize = 3084;
/// Offset of `arch` (`arch_shared_info`) in shared_info.
pub const SHARED_INFO_ARCH: usize = 3088;
/// Size of `struct shared_info` on x86_64.
pub const SHARED_INFO_SIZE: usize = 3136;

/// Offset in shared_info of vCPU `vcpu`'s legacy vcpu_info slot (`None` from vCPU 32 on:
/// those vCPUs have one only after `VCPUOP_register_vcpu_info`).
pub const fn vcpu_info_offset(vcpu: u32) -> Option<usize> {
    if vcpu < XEN_LEGACY_MAX_VCPUS {
        Some(vcpu as usize * VCPU_INFO_SIZE)
    } else {
        None
    }
}

/// Where the 2-level bit of `port` lives: (byte offset of its u64 word relative to the
/// start of `evtchn_pending` or `evtchn_mask`, bit number in that word). `None` for a
/// port the 2-level ABI cannot name (>= 4096).
pub const fn evtchn_bit(port: u32) -> Option<(usize, u32)> {
    if port >= BITS_PER_EVTCHN_WORD * BITS_PER_EVTCHN_WORD {
        return None;
    }
    Some((
        (port / BITS_PER_EVTCHN_WORD) as usize * 8,
        port % BITS_PER_EVTCHN_WORD,
    ))
}

/// `struct vcpu_time_info`: the pvclock record of one vCPU.
///
/// Updates bump `version` to odd first and back to even last; system time is
/// `system_time + ((((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul) >> 32)`
/// (a negative `tsc_shift` shifts right).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VcpuTimeInfo {
    /// Odd while an update is in progress.
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// TSC at the last update.
    pub tsc_timestamp: u64,
    /// System time (ns since boot) at `tsc_timestamp`.
    pub system_time: u64,
    /// 32.32 fixed-point multiplier from shifted TSC ticks to ns.
    pub tsc_to_system_mul: u32,
    /// Power-of-two shift applied to the TSC delta before multiplying.
    pub tsc_shift: i8,
    /// `PVCLOCK_*` flags.
    pub flags: u8,
    /// Padding.
    pub pad1: [u8; 2],
}

impl VcpuTimeInfo {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.pad0.to_le_bytes());
        b[8..16].copy_from_slice(&self.tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time.to_le_bytes());
        b[24..28].copy_from_slice(&self.tsc_to_system_mul.to_le_bytes());
        b[28..29].copy_from_slice(&self.tsc_shift.to_le_bytes());
        b[29] = self.flags;
        b[30..32].copy_from_slice(&self.pad1);
        b
    }

    /// Decodes a copy.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        VcpuTimeInfo {
            version: rd_u32(b, 0),
            pad0: rd_u32(b, 4),
            tsc_timestamp: rd_u64(b, 8),
            system_time: rd_u64(b, 16),
            tsc_to_system_mul: rd_u32(b, 24),
            tsc_shift: i8::from_le_bytes([b[28]]),
            flags: b[29],
            pad1: [b[30], b[31]],
        }
    }
}

/// `struct arch_vcpu_info` (x86_64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ArchVcpuInfo {
    /// Faulting address of the last page fault (PV only).
    pub cr2: u64,
    /// Padding: keeps `sizeof(vcpu_info) == 64`.
    pub pad: u64,
}

/// `struct vcpu_info`: per-vCPU event and time state, in shared_info or wherever
/// `VCPUOP_register_vcpu_info` placed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VcpuInfo {
    /// Non-zero: an event upcall is pending for this vCPU (set by Xen, cleared by the guest).
    pub evtchn_upcall_pending: u8,
    /// PV-only upcall mask; Xen ignores it for HVM/PVH guests.
    pub evtchn_upcall_mask: u8,
    /// Padding up to the 8-byte aligned selector.
    pub pad: [u8; 6],
    /// 2-level selector: bit `w` set means word `w` of `evtchn_pending` may hold events.
    pub evtchn_pending_sel: u64,
    /// Architecture part.
    pub arch: ArchVcpuInfo,
    /// pvclock.
    pub time: VcpuTimeInfo,
}

impl VcpuInfo {
    /// Size in bytes.
    pub const SIZE: usize = VCPU_INFO_SIZE;

    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0] = self.evtchn_upcall_pending;
        b[1] = self.evtchn_upcall_mask;
        b[2..8].copy_from_slice(&self.pad);
        b[8..16].copy_from_slice(&self.evtchn_pending_sel.to_le_bytes());
        b[16..24].copy_from_slice(&self.arch.cr2.to_le_bytes());
        b[24..32].copy_from_slice(&self.arch.pad.to_le_bytes());
        b[32..64].copy_from_slice(&self.time.to_bytes());
        b
    }

    /// Decodes a copy.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let mut pad = [0u8; 6];
        pad.copy_from_slice(&b[2..8]);
        let mut t = [0u8; VcpuTimeInfo::SIZE];
        t.copy_from_slice(&b[32..64]);
        VcpuInfo {
            evtchn_upcall_pending: b[0],
            evtchn_upcall_mask: b[1],
            pad,
            evtchn_pending_sel: rd_u64(b, 8),
            arch: ArchVcpuInfo {
                cr2: rd_u64(b, 16),
                pad: rd_u64(b, 24),
            },
            time: VcpuTimeInfo::from_bytes(&t),
        }
    }
}

/// `struct arch_shared_info` (x86_64): PV p2m bookkeeping, unused by PVH guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ArchSharedInfo {
    /// Valid entries in the p2m table.
    pub max_pfn: u64,
    /// Frame of the p2m frame-list list.
    pub pfn_to_mfn_frame_list_list: u64,
    /// NMI reason bits.
    pub nmi_reason: u64,
    /// Root of the address space where `p2m_vaddr` is valid.
    pub p2m_cr3: u64,
    /// Virtual address of the linear p2m list.
    pub p2m_vaddr: u64,
    /// Generation count of the p2m mapping.
    pub p2m_generation: u64,
}

/// `struct shared_info` (x86_64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct SharedInfo {
    /// Legacy vcpu_info slots for vCPUs 0..32.
    pub vcpu_info: [VcpuInfo; XEN_LEGACY_MAX_VCPUS as usize],
    /// 2-level pending bitmap: bit `p` is port `p`.
    pub evtchn_pending: [u64; EVTCHN_WORDS],
    /// 2-level mask bitmap: bit `p` is port `p`.
    pub evtchn_mask: [u64; EVTCHN_WORDS],
    /// Wallclock version (odd while updating).
    pub wc_version: u32,
    /// Wallclock seconds (low 32 bits) at system time 0.
    pub wc_sec: u32,
    /// Wallclock nanoseconds.
    pub wc_nsec: u32,
    /// Wallclock seconds, high 32 bits.
    pub wc_sec_hi: u32,
    /// Architecture part.
    pub arch: ArchSharedInfo,
}

impl Default for SharedInfo {
    fn default() -> Self {
        SharedInfo {
            vcpu_info: [VcpuInfo::default(); XEN_LEGACY_MAX_VCPUS as usize],
            evtchn_pending: [0; EVTCHN_WORDS],
            evtchn_mask: [0; EVTCHN_WORDS],
            wc_version: 0,
            wc_sec: 0,
            wc_nsec: 0,
            wc_sec_hi: 0,
            arch: ArchSharedInfo::default(),
        }
    }
}

/// The wallclock fields of shared_info (`wc_version` .. `wc_sec_hi`, 16 bytes at
/// [`SHARED_INFO_WC_VERSION`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    /// Version (odd while updating).
    pub version: u32,
    /// Seconds since the epoch at system time 0 (64-bit; split into `wc_sec`/`wc_sec_hi`).
    pub sec: u64,
    /// Nanoseconds.
    pub nsec: u32,
}

impl WallClock {
    /// Size in bytes.
    pub const SIZE: usize = 16;

    /// Little-endian encoding of `wc_version, wc_sec, wc_nsec, wc_sec_hi`.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&(self.sec as u32).to_le_bytes());
        b[8..12].copy_from_slice(&self.nsec.to_le_bytes());
        b[12..16].copy_from_slice(&((self.sec >> 32) as u32).to_le_bytes());
        b
    }

    /// Decodes a copy.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        WallClock {
            version: rd_u32(b, 0),
            sec: u64::from(rd_u32(b, 4)) | (u64::from(rd_u32(b, 12)) << 32),
            nsec: rd_u32(b, 8),
        }
    }
}

/// `RUNSTATE_running`: the vCPU is on a physical CPU.
pub const RUNSTATE_RUNNING: i32 = 0;
/// `RUNSTATE_runnable`: runnable, not scheduled.
pub const RUNSTATE_RUNNABLE: i32 = 1;
/// `RUNSTATE_blocked`: blocked (idle).
pub const RUNSTATE_BLOCKED: i32 = 2;
/// `RUNSTATE_offline`: neither runnable nor blocked (down, paused).
pub const RUNSTATE_OFFLINE: i32 = 3;
/// `XEN_RUNSTATE_UPDATE`: set in `state_entry_time` while the area is being updated
/// (only with `VMASST_TYPE_runstate_update_flag`).
pub const XEN_RUNSTATE_UPDATE: u64 = 1 << 63;

/// `struct vcpu_runstate_info` (the area of `VCPUOP_register_runstate_memory_area`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VcpuRunstateInfo {
    /// `RUNSTATE_*`.
    pub state: i32,
    /// System time (ns) when `state` was entered.
    pub state_entry_time: u64,
    /// Time spent in each `RUNSTATE_*` (ns), indexed by state.
    pub time: [u64; 4],
}

impl VcpuRunstateInfo {
    /// Size in bytes on x86_64.
    pub const SIZE: usize = 48;

    /// Little-endian encoding (padding after `state` written as zero).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.state.to_le_bytes());
        b[8..16].copy_from_slice(&self.state_entry_time.to_le_bytes());
        for (i, t) in self.time.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// Decodes a copy.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        VcpuRunstateInfo {
            state: rd_u32(b, 0) as i32,
            state_entry_time: rd_u64(b, 8),
            time: [rd_u64(b, 16), rd_u64(b, 24), rd_u64(b, 32), rd_u64(b, 40)],
        }
    }
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

const _: () = assert!(size_of::<VcpuTimeInfo>() == VcpuTimeInfo::SIZE);
const _: () = assert!(offset_of!(VcpuTimeInfo, tsc_timestamp) == 8);
const _: () = assert!(offset_of!(VcpuTimeInfo, system_time) == 16);
const _: () = assert!(offset_of!(VcpuTimeInfo, tsc_to_system_mul) == 24);
const _: () = assert!(offset_of!(VcpuTimeInfo, tsc_shift) == 28);
const _: () = assert!(offset_of!(VcpuTimeInfo, flags) == 29);
const _: () = assert!(offset_of!(VcpuTimeInfo, pad1) == 30);
const _: () = assert!(size_of::<ArchVcpuInfo>() == 16);
const _: () = assert!(size_of::<VcpuInfo>() == VCPU_INFO_SIZE);
const _: () = assert!(offset_of!(VcpuInfo, evtchn_upcall_pending) == VCPU_INFO_UPCALL_PENDING);
const _: () = assert!(offset_of!(VcpuInfo, evtchn_upcall_mask) == VCPU_INFO_UPCALL_MASK);
const _: () = assert!(offset_of!(VcpuInfo, evtchn_pending_sel) == VCPU_INFO_PENDING_SEL);
const _: () = assert!(offset_of!(VcpuInfo, arch) == VCPU_INFO_ARCH);
const _: () = assert!(offset_of!(VcpuInfo, time) == VCPU_INFO_TIME);
const _: () = assert!(size_of::<ArchSharedInfo>() == 48);
const _: () = assert!(offset_of!(SharedInfo, evtchn_pending) == SHARED_INFO_EVTCHN_PENDING);
const _: () = assert!(offset_of!(SharedInfo, evtchn_mask) == SHARED_INFO_EVTCHN_MASK);
const _: () = assert!(offset_of!(SharedInfo, wc_version) == SHARED_INFO_WC_VERSION);
const _: () = assert!(offset_of!(SharedInfo, wc_sec) == SHARED_INFO_WC_SEC);
const _: () = assert!(offset_of!(SharedInfo, wc_nsec) == SHARED_INFO_WC_NSEC);
const _: () = assert!(offset_of!(SharedInfo, wc_sec_hi) == SHARED_INFO_WC_SEC_HI);
const _: () = assert!(offset_of!(SharedInfo, arch) == SHARED_INFO_ARCH);
const _: () = assert!(size_of::<SharedInfo>() == SHARED_INFO_SIZE);
const _: () = assert!(SHARED_INFO_SIZE <= 4096);
const _: () = assert!(size_of::<VcpuRunstateInfo>() == VcpuRunstateInfo::SIZE);
const _: () = assert!(offset_of!(VcpuRunstateInfo, state_entry_time) == 8);
const _: () = assert!(offset_of!(VcpuRunstateInfo, time) == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_info_round_trip_and_offsets() {
        let t = VcpuTimeInfo {
            version: 2,
            pad0: 0,
            tsc_timestamp: 0x1122_3344_5566_7788,
            system_time: 0x99,
            tsc_to_system_mul: 0xdead_beef,
            tsc_shift: -1,
            flags: PVCLOCK_TSC_STABLE_BIT,
            pad1: [0; 2],
        };
        let b = t.to_bytes();
        assert_eq!(b[8], 0x88);
        assert_eq!(b[28], 0xff);
        assert_eq!(b[29], 1);
        assert_eq!(VcpuTimeInfo::from_bytes(&b), t);
    }

    #[test]
    fn vcpu_info_round_trip() {
        let v = VcpuInfo {
            evtchn_upcall_pending: 1,
            evtchn_pending_sel: 1 << 63,
            time: VcpuTimeInfo {
                version: 4,
                ..Default::default()
            },
            ..Default::default()
        };
        let b = v.to_bytes();
        assert_eq!(b[VCPU_INFO_UPCALL_PENDING], 1);
        assert_eq!(b[VCPU_INFO_PENDING_SEL + 7], 0x80);
        assert_eq!(b[VCPU_INFO_TIME], 4);
        assert_eq!(VcpuInfo::from_bytes(&b), v);
    }

    #[test]
    fn wallclock_and_runstate_round_trip() {
        let w = WallClock {
            version: 2,
            sec: 0x1_2345_6789,
            nsec: 5,
        };
        let b = w.to_bytes();
        assert_eq!(&b[4..8], &0x2345_6789u32.to_le_bytes());
        assert_eq!(&b[12..16], &1u32.to_le_bytes());
        assert_eq!(WallClock::from_bytes(&b), w);

        let r = VcpuRunstateInfo {
            state: RUNSTATE_BLOCKED,
            state_entry_time: 7,
            time: [1, 2, 3, 4],
        };
        let b = r.to_bytes();
        assert_eq!(b[16], 1);
        assert_eq!(b[40], 4);
        assert_eq!(VcpuRunstateInfo::from_bytes(&b), r);
    }

    #[test]
    fn bit_locations() {
        assert_eq!(evtchn_bit(0), Some((0, 0)));
        assert_eq!(evtchn_bit(65), Some((8, 1)));
        assert_eq!(evtchn_bit(4095), Some((504, 63)));
        assert_eq!(evtchn_bit(4096), None);
        assert_eq!(vcpu_info_offset(1), Some(64));
        assert_eq!(vcpu_info_offset(31), Some(1984));
        assert_eq!(vcpu_info_offset(32), None);
    }
}
