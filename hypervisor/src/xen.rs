//! Per-domain and per-vCPU Xen state: shared_info, vcpu_info placement, pvclock,
//! runstate areas, timers, HVM parameters and the special pages (console, store) a
//! toolstack would set up.

use alloc::vec::Vec;

use crate::memory::GuestMemory;
use crate::time;

/// Size of one `vcpu_info`.
pub const VCPU_INFO_SIZE: u64 = 64;
/// vcpu_info slots in shared_info.
pub const LEGACY_VCPUS: u32 = 32;
/// Offset of `vcpu_time_info` in `vcpu_info`.
pub const VCPU_TIME_OFFSET: u64 = 32;
/// `PVCLOCK_TSC_STABLE_BIT`
pub const PVCLOCK_TSC_STABLE: u8 = 1;

/// HVM parameter numbers (`hvm/params.h`).
pub mod param {
    /// HVM_PARAM_CALLBACK_IRQ
    pub const CALLBACK_IRQ: u32 = 0;
    /// HVM_PARAM_STORE_PFN
    pub const STORE_PFN: u32 = 1;
    /// HVM_PARAM_STORE_EVTCHN
    pub const STORE_EVTCHN: u32 = 2;
    /// HVM_PARAM_PAE_ENABLED
    pub const PAE_ENABLED: u32 = 4;
    /// HVM_PARAM_CONSOLE_PFN
    pub const CONSOLE_PFN: u32 = 17;
    /// HVM_PARAM_CONSOLE_EVTCHN
    pub const CONSOLE_EVTCHN: u32 = 18;
    /// Number of parameters (HVM_NR_PARAMS).
    pub const NR: u32 = 40;
}

/// RUNSTATE_running
pub const RUNSTATE_RUNNING: i32 = 0;
/// RUNSTATE_runnable
pub const RUNSTATE_RUNNABLE: i32 = 1;
/// RUNSTATE_blocked
pub const RUNSTATE_BLOCKED: i32 = 2;
/// RUNSTATE_offline
pub const RUNSTATE_OFFLINE: i32 = 3;

/// Moves vCPU `v` to runstate `new` at `now`, accounting the time spent in the old one.
pub fn runstate_change(s: &mut VcpuState, new: i32, now: u64) {
    let (old, since, ref mut times) = s.runstate;
    if let Some(t) = times.get_mut(old as usize) {
        *t += now.saturating_sub(since);
    }
    s.runstate = (new, now, *times);
}

/// Writes vCPU `v`'s `vcpu_runstate_info` to its registered area (a guest-virtual
/// address, translated with `cpu`'s paging: call only while `cpu` is that vCPU).
pub fn write_runstate(d: &mut crate::domain::DomainCore, v: u32, cpu: &dyn crate::vcpu::GuestCpu) {
    let Some(s) = d.xen.vcpus.get(v as usize) else {
        return;
    };
    let Some(area) = s.runstate_area else { return };
    let (state, since, times) = s.runstate;
    let mut b = [0u8; 48];
    b[0..4].copy_from_slice(&state.to_le_bytes());
    b[8..16].copy_from_slice(&since.to_le_bytes());
    for (i, t) in times.iter().enumerate() {
        b[16 + i * 8..24 + i * 8].copy_from_slice(&t.to_le_bytes());
    }
    if crate::exits::copy_to_guest(d, cpu, area, &b).is_err() {
        // Xen leaves an unmapped area alone; so do we.
    }
}

/// MTRRcap as guests see it: 8 variable ranges, fixed ranges, write-combining.
pub const MTRR_CAP: u64 = 0x508;
/// MTRRdefType after reset as firmware leaves it: enabled, fixed enabled, write-back.
pub const MTRR_DEF_TYPE: u64 = 0xc06;

/// Is `msr` one of the emulated MTRR registers (variable pairs, fixed ranges, default
/// type)?
pub fn is_mtrr(msr: u32) -> bool {
    matches!(msr, 0x200..=0x20f | 0x250 | 0x258 | 0x259 | 0x268..=0x26f | 0x2ff)
}

/// Where a vCPU's `vcpu_info` lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuInfoLoc {
    /// Its slot in shared_info (only for vCPUs below 32), wherever the guest mapped it.
    Shared,
    /// A guest-physical address chosen with VCPUOP_register_vcpu_info.
    Guest(u64),
}

/// What a vCPU is doing, for the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Not started (secondary vCPUs before INIT/SIPI) or taken down.
    Down,
    /// Can run.
    Runnable,
    /// Waiting for an event (HLT with interrupts on, SCHEDOP_block).
    Blocked,
    /// SCHEDOP_poll on these ports, until one is pending or the deadline passes.
    Polling {
        /// Ports polled.
        ports: Vec<u32>,
        /// Absolute system-time deadline, if any.
        deadline: Option<u64>,
    },
}

/// Generic (vendor-neutral) state of one vCPU.
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u32,
    /// Where its vcpu_info is.
    pub vcpu_info: VcpuInfoLoc,
    /// Guest-virtual address of its runstate area.
    pub runstate_area: Option<u64>,
    /// Single-shot timer deadline (system time, ns).
    pub singleshot: Option<u64>,
    /// Periodic timer: (period, next deadline).
    pub periodic: Option<(u64, u64)>,
    /// Scheduler state.
    pub state: RunState,
    /// Per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector), if set.
    pub upcall_vector: Option<u8>,
    /// Runstate accounting: current state (RUNSTATE_*), since when, totals.
    pub runstate: (i32, u64, [u64; 4]),
    /// Its local APIC.
    pub apic: crate::vlapic::Vlapic,
    /// A start-up IPI arrived: begin in real mode at this vector's page.
    pub sipi: Option<u8>,
    /// INIT received: a SIPI may start it.
    pub wait_for_sipi: bool,
    /// An APIC vector handed to the CPU for delivery, not yet confirmed taken.
    pub apic_injected: Option<u8>,
    /// Emulated MTRRs (MTRRdefType, fixed and variable ranges) as the guest wrote them.
    pub mtrr: alloc::collections::BTreeMap<u32, u64>,
    /// Event upcalls and IPIs raised for this vCPU so far: when it moves while the vCPU
    /// runs on another physical CPU, the scheduler kicks that CPU.
    pub notified: u64,
}

impl VcpuState {
    /// A vCPU in its initial state: vCPU 0 runnable, the others down.
    pub fn new(id: u32) -> VcpuState {
        VcpuState {
            id,
            vcpu_info: VcpuInfoLoc::Shared,
            runstate_area: None,
            singleshot: None,
            periodic: None,
            state: if id == 0 {
                RunState::Runnable
            } else {
                RunState::Down
            },
            upcall_vector: None,
            runstate: (
                if id == 0 {
                    RUNSTATE_RUNNING
                } else {
                    RUNSTATE_OFFLINE
                },
                0,
                [0; 4],
            ),
            apic: crate::vlapic::Vlapic::new(id),
            sipi: None,
            wait_for_sipi: id != 0,
            apic_injected: None,
            mtrr: alloc::collections::BTreeMap::new(),
            notified: 0,
        }
    }

    /// The earliest timer deadline of this vCPU.
    pub fn next_deadline(&self) -> Option<u64> {
        let poll = match &self.state {
            RunState::Polling { deadline, .. } => *deadline,
            _ => None,
        };
        [
            self.singleshot,
            self.periodic.map(|p| p.1),
            poll,
            self.apic.timer_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The guest-memory side of event channels: shared_info's pending/mask bitmaps and
/// each vCPU's vcpu_info selector and upcall flag.
pub struct GuestEventMemory<'a> {
    /// Xen state (where shared_info and each vcpu_info are).
    pub xen: &'a XenDomain,
    /// Guest memory.
    pub mem: &'a mut GuestMemory,
}

impl GuestEventMemory<'_> {
    fn word(&self, base: u64, port: u32) -> u64 {
        let mut b = [0u8; 8];
        self.mem.special_read(
            self.xen.shared_info,
            base + u64::from(port / 64) * 8,
            &mut b,
        );
        u64::from_le_bytes(b)
    }
    fn set_word(&mut self, base: u64, port: u32, v: u64) {
        self.mem.special_write(
            self.xen.shared_info,
            base + u64::from(port / 64) * 8,
            &v.to_le_bytes(),
        );
    }
    fn bit(port: u32) -> u64 {
        1 << (port % 64)
    }
}

const PENDING: u64 = 2048;
const MASK: u64 = 2560;

impl crate::evtchn::EventMemory for GuestEventMemory<'_> {
    fn test_and_set_pending(&mut self, port: u32) -> bool {
        let w = self.word(PENDING, port);
        self.set_word(PENDING, port, w | Self::bit(port));
        w & Self::bit(port) != 0
    }
    fn clear_pending(&mut self, port: u32) {
        let w = self.word(PENDING, port);
        self.set_word(PENDING, port, w & !Self::bit(port));
    }
    fn is_pending(&self, port: u32) -> bool {
        self.word(PENDING, port) & Self::bit(port) != 0
    }
    fn is_masked(&self, port: u32) -> bool {
        self.word(MASK, port) & Self::bit(port) != 0
    }
    fn test_and_clear_mask(&mut self, port: u32) -> bool {
        let w = self.word(MASK, port);
        self.set_word(MASK, port, w & !Self::bit(port));
        w & Self::bit(port) != 0
    }
    fn test_and_set_sel(&mut self, vcpu: u32, word: u32) -> bool {
        let mut b = [0u8; 8];
        self.xen.vcpu_info_read(self.mem, vcpu, 8, &mut b);
        let sel = u64::from_le_bytes(b);
        self.xen
            .vcpu_info_write(self.mem, vcpu, 8, &(sel | (1 << (word % 64))).to_le_bytes());
        sel & (1 << (word % 64)) != 0
    }
    fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
        let mut b = [0u8; 1];
        self.xen.vcpu_info_read(self.mem, vcpu, 0, &mut b);
        self.xen.vcpu_info_write(self.mem, vcpu, 0, &[1]);
        b[0] != 0
    }
}

/// The guest-memory side of FIFO event channels: 32-bit words in the control blocks
/// and event-array pages the guest registered (addressed by guest frame number), with
/// locked atomic updates, and the vCPUs' upcall flags.
pub struct GuestFifoMemory<'a> {
    /// Xen state (where each vcpu_info is).
    pub xen: &'a XenDomain,
    /// Guest memory.
    pub mem: &'a mut GuestMemory,
}

impl crate::evtchn_fifo::FifoMemory for GuestFifoMemory<'_> {
    fn read(&self, frame: u64, offset: u32) -> Option<u32> {
        let mut b = [0u8; 4];
        self.mem
            .read((frame << 12) + u64::from(offset), &mut b)
            .then(|| u32::from_le_bytes(b))
    }
    fn write(&mut self, frame: u64, offset: u32, value: u32) -> bool {
        self.mem
            .write((frame << 12) + u64::from(offset), &value.to_le_bytes())
    }
    fn cmpxchg(&mut self, frame: u64, offset: u32, old: u32, new: u32) -> Option<u32> {
        self.mem
            .cmpxchg_u32((frame << 12) + u64::from(offset), old, new)
    }
    fn set_upcall_pending(&mut self, vcpu: u32) -> bool {
        let mut b = [0u8; 1];
        self.xen.vcpu_info_read(self.mem, vcpu, 0, &mut b);
        self.xen.vcpu_info_write(self.mem, vcpu, 0, &[1]);
        b[0] != 0
    }
}

/// Per-domain Xen state.
pub struct XenDomain {
    /// The domain's shared_info frame (host-physical, owned by the domain's memory).
    pub shared_info: u64,
    /// HVM parameters.
    pub params: [u64; param::NR as usize],
    /// Generic vCPU state, by id.
    pub vcpus: Vec<VcpuState>,
}

impl XenDomain {
    /// Sets up shared_info (wallclock and every legacy vcpu_info's pvclock valid from
    /// the start, as Linux reads them as soon as it maps the page).
    pub fn new(mem: &mut GuestMemory, nvcpus: u32, wallclock_ns: u64) -> Option<XenDomain> {
        let shared_info = mem.add_special_frame()?;
        let x = XenDomain {
            shared_info,
            params: [0; param::NR as usize],
            vcpus: (0..nvcpus).map(VcpuState::new).collect(),
        };
        for v in 0..nvcpus.min(LEGACY_VCPUS) {
            x.write_time_info(mem, v);
        }
        // wc_version, wc_sec, wc_nsec, wc_sec_hi: wallclock at system time 0
        let secs = wallclock_ns / 1_000_000_000;
        let mut wc = [0u8; 16];
        wc[0..4].copy_from_slice(&2u32.to_le_bytes());
        wc[4..8].copy_from_slice(&(secs as u32).to_le_bytes());
        wc[8..12].copy_from_slice(&((wallclock_ns % 1_000_000_000) as u32).to_le_bytes());
        wc[12..16].copy_from_slice(&((secs >> 32) as u32).to_le_bytes());
        mem.special_write(shared_info, 3072, &wc);
        Some(x)
    }

    /// Writes `bytes` at `offset` inside vCPU `v`'s vcpu_info; false if it lives in
    /// guest memory that is gone.
    pub fn vcpu_info_write(
        &self,
        mem: &mut GuestMemory,
        v: u32,
        offset: u64,
        bytes: &[u8],
    ) -> bool {
        match self.vcpus.get(v as usize).map(|s| s.vcpu_info) {
            Some(VcpuInfoLoc::Shared) if v < LEGACY_VCPUS => mem.special_write(
                self.shared_info,
                u64::from(v) * VCPU_INFO_SIZE + offset,
                bytes,
            ),
            Some(VcpuInfoLoc::Guest(gpa)) => mem.write(gpa + offset, bytes),
            _ => false,
        }
    }

    /// Reads from vCPU `v`'s vcpu_info.
    pub fn vcpu_info_read(&self, mem: &GuestMemory, v: u32, offset: u64, buf: &mut [u8]) -> bool {
        match self.vcpus.get(v as usize).map(|s| s.vcpu_info) {
            Some(VcpuInfoLoc::Shared) if v < LEGACY_VCPUS => mem.special_read(
                self.shared_info,
                u64::from(v) * VCPU_INFO_SIZE + offset,
                buf,
            ),
            Some(VcpuInfoLoc::Guest(gpa)) => mem.read(gpa + offset, buf),
            _ => false,
        }
    }

    /// (Re)writes vCPU `v`'s pvclock: version odd, fields, version even.
    pub fn write_time_info(&self, mem: &mut GuestMemory, v: u32) {
        let (tsc0, scale) = time::pvclock();
        let mut ver = [0u8; 4];
        self.vcpu_info_read(mem, v, VCPU_TIME_OFFSET, &mut ver);
        let ver = u32::from_le_bytes(ver).wrapping_add(1) | 1;
        self.vcpu_info_write(mem, v, VCPU_TIME_OFFSET, &ver.to_le_bytes());
        let mut t = [0u8; 28];
        t[4..12].copy_from_slice(&tsc0.to_le_bytes()); // tsc_timestamp (after pad0)
        t[12..20].copy_from_slice(&0u64.to_le_bytes()); // system_time at tsc0
        t[20..24].copy_from_slice(&scale.mul.to_le_bytes());
        t[24] = scale.shift as u8;
        t[25] = PVCLOCK_TSC_STABLE;
        self.vcpu_info_write(mem, v, VCPU_TIME_OFFSET + 4, &t);
        self.vcpu_info_write(mem, v, VCPU_TIME_OFFSET, &ver.wrapping_add(1).to_le_bytes());
    }

    /// Is `evtchn_upcall_pending` set in vCPU `v`'s vcpu_info?
    pub fn upcall_pending(&self, mem: &GuestMemory, v: u32) -> bool {
        let mut b = [0u8; 1];
        self.vcpu_info_read(mem, v, 0, &mut b) && b[0] != 0
    }

    /// The vector to inject for event-channel upcalls on vCPU `v`, if any is set up.
    pub fn callback_vector(&self, v: u32) -> Option<u8> {
        if self
            .vcpus
            .get(v as usize)
            .and_then(|s| s.upcall_vector)
            .is_some()
        {
            return None; // that vector goes through the vCPU's local APIC instead
        }
        let cb = self.params[param::CALLBACK_IRQ as usize];
        // HVM_PARAM_CALLBACK_IRQ type 2 = vector (bits 63:56), vector in the low byte.
        (cb >> 56 == 2 && cb & 0xff >= 0x10).then_some(cb as u8)
    }
}
