//! Intel VMX backend: detection, VMX operation per CPU (VMXON), one VMCS per vCPU with
//! EPT, VPID and unrestricted guest, the world switch and exit decoding onto the same
//! neutral [`Exit`]s as the SVM backend.
//!
//! Facts this relies on (Intel SDM vol. 3C, chapters 24-28 and appendix A, and
//! PLATFORM.md's Bochs notes):
//! - VM-execution, exit and entry controls are adjusted from the capability MSRs: the low
//!   half says which bits must be 1, the high half which may be 1; with
//!   IA32_VMX_BASIC bit 55 the TRUE_* MSRs apply (they let default-1 bits such as CR3
//!   exiting be cleared).
//! - A VM exit restores host CR0/3/4, RSP, RIP, segment selectors, FS/GS/TR/GDTR/IDTR
//!   bases, SYSENTER MSRs and (with the exit controls used here) EFER and PAT. It does
//!   not switch STAR/LSTAR/CSTAR/SFMASK/KERNEL_GS_BASE, CR2, XCR0 or FPU state, and no
//!   GPR but RSP: the trampoline and [`VmxVcpu::run`] swap those.
//! - External-interrupt exiting without acknowledge-on-exit leaves the host timer's
//!   interrupt pending in the local APIC; the trampoline takes it with `sti; nop; cli`
//!   right after the exit, as the SVM trampoline does after `stgi`. The VMX-preemption
//!   timer (when the CPU has it) backs this up: under Bochs a secondary vCPU bringing
//!   Linux up was not preempted by the host timer's interrupt (reproducibly), and the whole
//!   machine stopped; its expiry is reported as the same preemption.
//! - Guest CR0.NE and CR4.VMXE are fixed to 1 by VMX: both are owned by the host
//!   (guest/host masks) and the guest sees its own values through the read shadows.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};
use x86::vmx::vmcs::{control, guest, host, ro};

use super::svm::{FpuArea, FpuMode, PvhEntry};
use super::x86::{self as hw, efer, msr};
use crate::guest_walk::GuestPaging;
use crate::paging::PageSize;
use crate::vcpu::{CodeMode, Exit, GuestCpu, InvalidMsrValue, IoExit};

/// VMX capability MSRs (Intel SDM vol. 3D, appendix A).
pub mod cap {
    /// IA32_FEATURE_CONTROL
    pub const FEATURE_CONTROL: u32 = x86::msr::IA32_FEATURE_CONTROL;
    /// IA32_VMX_BASIC
    pub const BASIC: u32 = x86::msr::IA32_VMX_BASIC;
    /// IA32_VMX_PINBASED_CTLS
    pub const PINBASED: u32 = x86::msr::IA32_VMX_PINBASED_CTLS;
    /// IA32_VMX_PROCBASED_CTLS
    pub const PROCBASED: u32 = x86::msr::IA32_VMX_PROCBASED_CTLS;
    /// IA32_VMX_EXIT_CTLS
    pub const EXIT: u32 = x86::msr::IA32_VMX_EXIT_CTLS;
    /// IA32_VMX_MISC (bits 4:0: the VMX-preemption timer's rate)
    pub const MISC: u32 = x86::msr::IA32_VMX_MISC;
    /// IA32_VMX_ENTRY_CTLS
    pub const ENTRY: u32 = x86::msr::IA32_VMX_ENTRY_CTLS;
    /// IA32_VMX_CR0_FIXED0
    pub const CR0_FIXED0: u32 = x86::msr::IA32_VMX_CR0_FIXED0;
    /// IA32_VMX_CR0_FIXED1
    pub const CR0_FIXED1: u32 = x86::msr::IA32_VMX_CR0_FIXED1;
    /// IA32_VMX_CR4_FIXED0
    pub const CR4_FIXED0: u32 = x86::msr::IA32_VMX_CR4_FIXED0;
    /// IA32_VMX_CR4_FIXED1
    pub const CR4_FIXED1: u32 = x86::msr::IA32_VMX_CR4_FIXED1;
    /// IA32_VMX_PROCBASED_CTLS2
    pub const PROCBASED2: u32 = x86::msr::IA32_VMX_PROCBASED_CTLS2;
    /// IA32_VMX_EPT_VPID_CAP
    pub const EPT_VPID: u32 = x86::msr::IA32_VMX_EPT_VPID_CAP;
    /// IA32_VMX_TRUE_PINBASED_CTLS
    pub const TRUE_PINBASED: u32 = x86::msr::IA32_VMX_TRUE_PINBASED_CTLS;
    /// IA32_VMX_TRUE_PROCBASED_CTLS
    pub const TRUE_PROCBASED: u32 = x86::msr::IA32_VMX_TRUE_PROCBASED_CTLS;
    /// IA32_VMX_TRUE_EXIT_CTLS
    pub const TRUE_EXIT: u32 = x86::msr::IA32_VMX_TRUE_EXIT_CTLS;
    /// IA32_VMX_TRUE_ENTRY_CTLS
    pub const TRUE_ENTRY: u32 = x86::msr::IA32_VMX_TRUE_ENTRY_CTLS;

    /// IA32_FEATURE_CONTROL: lock bit.
    pub const FC_LOCKED: u64 = 1 << 0;
    /// IA32_FEATURE_CONTROL: VMXON allowed outside SMX operation.
    pub const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
    /// IA32_VMX_BASIC bit 55: the TRUE_* control MSRs exist.
    pub const BASIC_TRUE_CTLS: u64 = 1 << 55;

    /// EPT_VPID_CAP: 4-level EPT walks.
    pub const EPT_WALK4: u64 = 1 << 6;
    /// EPT_VPID_CAP: write-back EPT paging structures.
    pub const EPT_WB: u64 = 1 << 14;
    /// EPT_VPID_CAP: 2 MiB EPT pages.
    pub const EPT_2M: u64 = 1 << 16;
    /// EPT_VPID_CAP: 1 GiB EPT pages.
    pub const EPT_1G: u64 = 1 << 17;
    /// EPT_VPID_CAP: INVEPT exists.
    pub const INVEPT: u64 = 1 << 20;
    /// EPT_VPID_CAP: single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// EPT_VPID_CAP: all-context INVEPT.
    pub const INVEPT_ALL: u64 = 1 << 26;
    /// EPT_VPID_CAP: INVVPID exists.
    pub const INVVPID: u64 = 1 << 32;
    /// EPT_VPID_CAP: single-context INVVPID.
    pub const INVVPID_SINGLE: u64 = 1 << 41;
    /// EPT_VPID_CAP: all-context INVVPID.
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// Why VMX cannot be used on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID says no VMX.
    NoVmx,
    /// Firmware locked IA32_FEATURE_CONTROL with VMX (outside SMX) disabled.
    LockedOff,
    /// No EPT (or no secondary controls at all).
    NoEpt,
    /// EPT without unrestricted guest.
    NoUnrestrictedGuest,
    /// EPT exists but not in a form usable here (4-level walks, INVEPT).
    EptUnusable(&'static str),
    /// A VM-execution/exit/entry control this backend needs cannot be set (or one it
    /// must clear is forced on): which group and the bits.
    Controls {
        /// "pin-based", "primary", "secondary", "exit" or "entry".
        group: &'static str,
        /// Required bits the CPU does not allow.
        missing: u32,
        /// Bits the CPU forces on that must be off.
        forced: u32,
    },
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmxError::NoVmx => write!(
                f,
                "this Intel CPU has no VMX (CPUID.1:ECX bit 5 is clear): enable \"Intel Virtualization \
                 Technology\" (VT-x) in the firmware setup; nested under KVM, load kvm_intel with nested=1 \
                 and give the VM the host CPU (-cpu host); under Bochs use cpu: model=corei7_skylake_x"
            ),
            VmxError::LockedOff => write!(
                f,
                "VMX is disabled by the firmware (IA32_FEATURE_CONTROL is locked with \"VMXON outside SMX\" \
                 off): enable \"Intel Virtualization Technology\" (VT-x) in the firmware setup, save, and \
                 power the machine off and on"
            ),
            VmxError::NoEpt => write!(
                f,
                "this CPU's VMX has no EPT (extended page tables), which ferrovisor requires for guest \
                 memory: use an Intel CPU from Nehalem (2008) on; nested under KVM, load kvm_intel with \
                 ept=1; under Bochs use cpu: model=corei7_skylake_x"
            ),
            VmxError::NoUnrestrictedGuest => write!(
                f,
                "this CPU's VMX has EPT but no unrestricted guest, which ferrovisor requires (PVH guests \
                 start in protected mode with paging off, secondary vCPUs in real mode): use an Intel CPU \
                 from Westmere (2010) on; nested under KVM, load kvm_intel with ept=1 unrestricted_guest=1"
            ),
            VmxError::EptUnusable(why) => write!(
                f,
                "this CPU's EPT cannot be used: {why}; ferrovisor needs 4-level EPT with INVEPT"
            ),
            VmxError::Controls {
                group,
                missing,
                forced,
            } => write!(
                f,
                "this CPU's VMX lacks {group} controls ferrovisor needs (required bits {missing:#x} not \
                 allowed, bits {forced:#x} forced on that must be off); report the CPU model"
            ),
        }
    }
}

/// Bits a control field needs, may have and must not have.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    /// Must be 1.
    pub required: u32,
    /// 1 when the CPU allows it.
    pub optional: u32,
    /// Must be 0.
    pub forbidden: u32,
}

/// Adjusts a control field to a capability MSR (`cap`: allowed-0 settings in bits
/// 31:0, i.e. bits that must be 1; allowed-1 settings in bits 63:32). Returns the
/// value, or `(missing, forced)`: required bits not allowed and forbidden bits forced.
pub fn adjust(cap: u64, want: Want) -> Result<u32, (u32, u32)> {
    let must_be_one = cap as u32;
    let may_be_one = (cap >> 32) as u32;
    let missing = want.required & !may_be_one;
    let forced = want.forbidden & must_be_one;
    if missing != 0 || forced != 0 {
        return Err((missing, forced));
    }
    Ok((want.required | (want.optional & may_be_one) | must_be_one) & may_be_one)
}

/// The control fields as this backend runs every guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    /// Pin-based VM-execution controls.
    pub pin: u32,
    /// Primary processor-based controls.
    pub proc: u32,
    /// Secondary processor-based controls.
    pub proc2: u32,
    /// VM-exit controls.
    pub exit: u32,
    /// VM-entry controls (without IA-32e mode guest, which follows the guest's EFER.LMA).
    pub entry: u32,
}

/// What the CPU offers for VMX, read once at boot.
#[derive(Clone, Copy, Debug)]
pub struct VmxFeatures {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub revision: u32,
    /// The controls every VMCS gets.
    pub controls: Controls,
    /// VPIDs tag guest TLB entries.
    pub vpid: bool,
    /// Largest EPT page.
    pub ept_max_page: PageSize,
    /// EPT paging structures may be write-back (else uncached).
    pub ept_wb: bool,
    /// Single-context INVEPT (else all-context).
    pub invept_single: bool,
    /// Single-context INVVPID (else all-context), when VPIDs are on.
    pub invvpid_single: bool,
    /// IA32_FEATURE_CONTROL is unlocked: enable must set and lock it.
    pub needs_feature_control: bool,
    /// The VMX-preemption timer counts down once every `2^shift` TSC cycles (when the
    /// pin-based control is on).
    pub preemption_timer_shift: u8,
    /// CR0 bits fixed to 1 in VMX operation (IA32_VMX_CR0_FIXED0).
    pub cr0_fixed0: u64,
    /// CR0 bits allowed to be 1 (IA32_VMX_CR0_FIXED1).
    pub cr0_fixed1: u64,
    /// CR4 bits fixed to 1 (IA32_VMX_CR4_FIXED0).
    pub cr4_fixed0: u64,
    /// CR4 bits allowed to be 1 (IA32_VMX_CR4_FIXED1).
    pub cr4_fixed1: u64,
}

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;

impl VmxFeatures {
    /// CR0 bits the host owns: those VMX fixes to 1 except PE and PG (unrestricted
    /// guest), and those it fixes to 0.
    pub fn cr0_mask(&self) -> u64 {
        (self.cr0_fixed0 & !(CR0_PE | CR0_PG)) | (!self.cr0_fixed1 & 0xffff_ffff)
    }
    /// CR4 bits the host owns: those VMX fixes to 1 (VMXE).
    pub fn cr4_mask(&self) -> u64 {
        self.cr4_fixed0
    }
    /// The CR0 the hardware runs for a guest that wrote `v`.
    pub fn real_cr0(&self, v: u64) -> u64 {
        (v | (self.cr0_fixed0 & !(CR0_PE | CR0_PG))) & self.cr0_fixed1
    }
    /// The CR4 the hardware runs for a guest that wrote `v`.
    pub fn real_cr4(&self, v: u64) -> u64 {
        (v | self.cr4_fixed0) & self.cr4_fixed1
    }
}

/// The controls this backend asks for (see [`compute_controls`]).
pub fn wanted_controls() -> [Want; 5] {
    let pin = Want {
        required: (PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::NMI_EXITING)
            .bits(),
        // A backstop for preemption besides the host timer's interrupt.
        optional: PinbasedControls::VMX_PREEMPTION_TIMER.bits(),
        forbidden: PinbasedControls::POSTED_INTERRUPTS.bits(),
    };
    let proc = Want {
        required: (PrimaryControls::HLT_EXITING
            | PrimaryControls::UNCOND_IO_EXITING
            | PrimaryControls::CR8_LOAD_EXITING
            | PrimaryControls::CR8_STORE_EXITING
            | PrimaryControls::SECONDARY_CONTROLS)
            .bits(),
        optional: 0,
        // Every MSR access exits (no bitmap); CR3 accesses are the guest's own (EPT);
        // no TPR shadow: CR8 exits and is emulated.
        forbidden: (PrimaryControls::CR3_LOAD_EXITING
            | PrimaryControls::CR3_STORE_EXITING
            | PrimaryControls::USE_MSR_BITMAPS
            | PrimaryControls::USE_TPR_SHADOW
            | PrimaryControls::INTERRUPT_WINDOW_EXITING
            | PrimaryControls::MONITOR_TRAP_FLAG
            | PrimaryControls::RDTSC_EXITING
            | PrimaryControls::INVLPG_EXITING)
            .bits(),
    };
    let proc2 = Want {
        required: (SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST).bits(),
        // INVPCID is offered to guests when the host has it (CPUID leaf 7 passes it).
        optional: (SecondaryControls::ENABLE_VPID | SecondaryControls::ENABLE_INVPCID).bits(),
        forbidden: (SecondaryControls::VIRTUALIZE_APIC
            | SecondaryControls::VIRTUALIZE_X2APIC
            | SecondaryControls::ENABLE_PML
            | SecondaryControls::EPT_VIOLATION_VE
            | SecondaryControls::USE_TSC_SCALING)
            .bits(),
    };
    let exit = Want {
        required: (ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER
            | ExitControls::SAVE_IA32_PAT
            | ExitControls::LOAD_IA32_PAT)
            .bits(),
        optional: ExitControls::SAVE_DEBUG_CONTROLS.bits(),
        // The host timer's interrupt stays pending in the APIC and is taken after the exit.
        forbidden: ExitControls::ACK_INTERRUPT_ON_EXIT.bits(),
    };
    let entry = Want {
        required: (EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits(),
        optional: EntryControls::LOAD_DEBUG_CONTROLS.bits(),
        forbidden: (EntryControls::IA32E_MODE_GUEST
            | EntryControls::ENTRY_TO_SMM
            | EntryControls::DEACTIVATE_DUAL_MONITOR)
            .bits(),
    };
    [pin, proc, proc2, exit, entry]
}

/// Reads the VMX capabilities through `rdmsr` (only MSRs that exist given the earlier
/// answers) after CPUID said VMX (`cpuid_vmx`), and computes what this backend runs.
pub fn detect_with(cpuid_vmx: bool, rdmsr: impl Fn(u32) -> u64) -> Result<VmxFeatures, VmxError> {
    if !cpuid_vmx {
        return Err(VmxError::NoVmx);
    }
    let fc = rdmsr(cap::FEATURE_CONTROL);
    if fc & cap::FC_LOCKED != 0 && fc & cap::FC_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::LockedOff);
    }
    let basic = rdmsr(cap::BASIC);
    let true_ctls = basic & cap::BASIC_TRUE_CTLS != 0;
    let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
        (
            cap::TRUE_PINBASED,
            cap::TRUE_PROCBASED,
            cap::TRUE_EXIT,
            cap::TRUE_ENTRY,
        )
    } else {
        (cap::PINBASED, cap::PROCBASED, cap::EXIT, cap::ENTRY)
    };
    let proc_cap = rdmsr(proc_msr);
    let has_secondary = (proc_cap >> 32) as u32 & PrimaryControls::SECONDARY_CONTROLS.bits() != 0;
    if !has_secondary {
        return Err(VmxError::NoEpt);
    }
    let proc2_cap = rdmsr(cap::PROCBASED2);
    let allowed2 = (proc2_cap >> 32) as u32;
    if allowed2 & SecondaryControls::ENABLE_EPT.bits() == 0 {
        return Err(VmxError::NoEpt);
    }
    if allowed2 & SecondaryControls::UNRESTRICTED_GUEST.bits() == 0 {
        return Err(VmxError::NoUnrestrictedGuest);
    }
    // Readable now: secondary controls allow EPT.
    let ept = rdmsr(cap::EPT_VPID);
    if ept & cap::EPT_WALK4 == 0 {
        return Err(VmxError::EptUnusable("no 4-level EPT page walks"));
    }
    if ept & cap::INVEPT == 0 || ept & (cap::INVEPT_SINGLE | cap::INVEPT_ALL) == 0 {
        return Err(VmxError::EptUnusable("no INVEPT"));
    }
    let [pin_w, proc_w, mut proc2_w, exit_w, entry_w] = wanted_controls();
    let vpid_usable =
        ept & cap::INVVPID != 0 && ept & (cap::INVVPID_SINGLE | cap::INVVPID_ALL) != 0;
    if !vpid_usable {
        proc2_w.optional &= !SecondaryControls::ENABLE_VPID.bits();
    }
    let fit = |group: &'static str, cap: u64, w: Want| {
        adjust(cap, w).map_err(|(missing, forced)| VmxError::Controls {
            group,
            missing,
            forced,
        })
    };
    let controls = Controls {
        pin: fit("pin-based", rdmsr(pin_msr), pin_w)?,
        proc: fit("primary processor-based", proc_cap, proc_w)?,
        proc2: fit("secondary processor-based", proc2_cap, proc2_w)?,
        exit: fit("VM-exit", rdmsr(exit_msr), exit_w)?,
        entry: fit("VM-entry", rdmsr(entry_msr), entry_w)?,
    };
    let ept_max_page = if ept & cap::EPT_1G != 0 {
        PageSize::Size1G
    } else if ept & cap::EPT_2M != 0 {
        PageSize::Size2M
    } else {
        PageSize::Size4K
    };
    Ok(VmxFeatures {
        revision: (basic & 0x7fff_ffff) as u32,
        controls,
        vpid: controls.proc2 & SecondaryControls::ENABLE_VPID.bits() != 0,
        ept_max_page,
        ept_wb: ept & cap::EPT_WB != 0,
        invept_single: ept & cap::INVEPT_SINGLE != 0,
        invvpid_single: ept & cap::INVVPID_SINGLE != 0,
        needs_feature_control: fc & cap::FC_LOCKED == 0,
        preemption_timer_shift: (rdmsr(cap::MISC) & 0x1f) as u8,
        cr0_fixed0: rdmsr(cap::CR0_FIXED0),
        cr0_fixed1: rdmsr(cap::CR0_FIXED1),
        cr4_fixed0: rdmsr(cap::CR4_FIXED0),
        cr4_fixed1: rdmsr(cap::CR4_FIXED1),
    })
}

/// Reads the VMX features of this CPU, or why VMX is unusable.
pub fn detect() -> Result<VmxFeatures, VmxError> {
    let [_, _, ecx, _] = hw::cpuid(1, 0);
    detect_with(ecx & (1 << 5) != 0, |m| {
        // SAFETY: detect_with reads IA32_FEATURE_CONTROL and the VMX capability MSRs only
        // after CPUID reported VMX, PROCBASED_CTLS2 only when secondary controls exist,
        // and EPT_VPID_CAP only when EPT is allowed (the SDM's conditions for each).
        unsafe { hw::rdmsr(m) }
    })
}

/// The EPT pointer for the table rooted at `root`: 4-level walk, write-back when allowed.
pub fn eptp(root: u64, wb: bool) -> u64 {
    (root & crate::paging::ADDR_MASK) | (3 << 3) | if wb { 6 } else { 0 }
}

/// Converts the SVM-style packed 12-bit segment attributes (type, S, DPL, P in bits 0-7;
/// AVL, L, D/B, G in bits 8-11) to the VMX access-rights layout (bits 12-15), where
/// 0 stands for an unusable segment (bit 16).
pub fn access_rights(packed: u16) -> u32 {
    if packed == 0 {
        return 1 << 16;
    }
    let p = u32::from(packed);
    (p & 0xff) | ((p & 0xf00) << 4)
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

impl Page {
    /// A VMXON region or VMCS: the revision identifier in its first four bytes.
    fn with_revision(revision: u32) -> Box<Page> {
        let mut p = Box::new(Page([0; 4096]));
        p.0[0..4].copy_from_slice(&(revision & 0x7fff_ffff).to_le_bytes());
        p
    }
}

fn pa_of<T>(r: &T) -> u64 {
    // The heap lives in identity-mapped RAM: a pointer's value is its physical address.
    r as *const T as u64
}

/// Per-CPU VMX state: the VMXON region, the host FPU area and what was detected.
pub struct VmxCpu {
    _vmxon: Box<Page>,
    host_fpu: Box<FpuArea>,
    /// How FPU state is saved.
    pub fpu: FpuMode,
    /// Features found at detect time.
    pub features: VmxFeatures,
}

/// Enters VMX operation on the calling CPU: IA32_FEATURE_CONTROL (when the firmware left
/// it unlocked), CR0/CR4 fixed bits (NE, VMXE), VMXON, and the FPU mode.
///
/// # Safety
/// Call once per CPU, with interrupts off, after [`detect`] succeeded.
pub unsafe fn enable(features: VmxFeatures) -> Result<VmxCpu, &'static str> {
    let vmxon = Page::with_revision(features.revision);
    // SAFETY: VMX exists (caller ran detect). Writing FEATURE_CONTROL only when it is
    // unlocked is what firmware would have done; the CR0/CR4 fixed bits are the
    // documented prerequisites of VMXON, and NE/VMXE do not change how the image runs.
    unsafe {
        if features.needs_feature_control {
            let fc = hw::rdmsr(cap::FEATURE_CONTROL);
            hw::wrmsr(
                cap::FEATURE_CONTROL,
                fc | cap::FC_LOCKED | cap::FC_VMX_OUTSIDE_SMX,
            );
        }
        hw::write_cr0((hw::cr0() | features.cr0_fixed0) & features.cr0_fixed1);
        hw::write_cr4((hw::cr4() | features.cr4_fixed0) & features.cr4_fixed1);
    }
    // SAFETY: the region is a 4 KiB-aligned page in identity-mapped RAM holding the
    // revision identifier; CR4.VMXE and the fixed bits are set above.
    if unsafe { x86::bits64::vmx::vmxon(pa_of(&*vmxon)) }.is_err() {
        return Err("VMXON failed (is another hypervisor already in VMX operation?)");
    }
    for m in SYSCALL_MSRS {
        // SAFETY: the syscall MSRs exist on every x86-64 CPU and the host does not use
        // them; zero matches LOADED_SYSCALL_MSRS' initial values.
        unsafe { hw::wrmsr(m, 0) };
    }
    let fpu = super::svm::enable_fpu();
    Ok(VmxCpu {
        _vmxon: vmxon,
        host_fpu: Box::new(FpuArea::new()),
        fpu,
        features,
    })
}

/// The physical address of the VMCS that is current on this CPU (0: none). One CPU
/// runs guests today; with more, this becomes per-CPU state.
static CURRENT_VMCS: AtomicU64 = AtomicU64::new(0);

/// What this CPU's STAR/LSTAR/CSTAR/SFMASK/KERNEL_GS_BASE hold now (the last guest's
/// values; the host does not use them): only MSRs that differ are written before an
/// entry. Per CPU, like [`CURRENT_VMCS`].
static LOADED_SYSCALL_MSRS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

fn vmread(field: u32) -> u64 {
    // SAFETY: callers made a VMCS current (VmxVcpu::load); VMREAD of a field the CPU
    // does not know fails with VMfailValid, which reads as 0 here.
    unsafe { x86::bits64::vmx::vmread(field) }.unwrap_or(0)
}

fn vmwrite(field: u32, v: u64) {
    // SAFETY: as in `vmread`; a failing VMWRITE leaves the VMCS unchanged.
    if unsafe { x86::bits64::vmx::vmwrite(field, v) }.is_err() {
        let err = vmread(ro::VM_INSTRUCTION_ERROR);
        log::error!("VMWRITE of field {field:#x} = {v:#x} failed (VM-instruction error {err})");
    }
}

/// INVEPT `kind` (1 single-context, 2 all-context) for `eptp`.
///
/// # Safety
/// VMX operation is on; the CPU supports the kind.
unsafe fn invept(kind: u64, eptp: u64) {
    let desc: [u64; 2] = [eptp, 0];
    // SAFETY: the descriptor lives on the stack for the instruction; the caller
    // guarantees the kind is supported.
    unsafe { core::arch::asm!("invept {0}, [{1}]", in(reg) kind, in(reg) &desc, options(nostack)) };
}

/// INVVPID `kind` (1 individual address, 1 single-context, 2 all-context) for `vpid`.
///
/// # Safety
/// VMX operation is on; the CPU supports the kind; `vpid` is non-zero for single-context.
unsafe fn invvpid(kind: u64, vpid: u16) {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    // SAFETY: as for `invept`.
    unsafe {
        core::arch::asm!("invvpid {0}, [{1}]", in(reg) kind, in(reg) &desc, options(nostack))
    };
}

/// Guest GPRs and what the trampoline needs (RSP lives in the VMCS).
#[repr(C)]
#[derive(Default)]
struct RunCtx {
    gprs: [u64; 16],
    cr2: u64,
    host_fpu: u64,
    guest_fpu: u64,
    host_xcr0: u64,
    guest_xcr0: u64,
    use_xsave: u64,
    launched: u64,
    /// 0: a VM exit; 1: VMfailInvalid; 2: VMfailValid (VM-instruction error field).
    result: u64,
}

const CTX_GPRS: usize = 0;
const CTX_CR2: usize = 128;
const CTX_HOST_FPU: usize = 136;
const CTX_GUEST_FPU: usize = 144;
const CTX_HOST_XCR0: usize = 152;
const CTX_GUEST_XCR0: usize = 160;
const CTX_USE_XSAVE: usize = 168;
const CTX_LAUNCHED: usize = 176;
const CTX_RESULT: usize = 184;
const _: () = assert!(core::mem::offset_of!(RunCtx, cr2) == CTX_CR2);
const _: () = assert!(core::mem::offset_of!(RunCtx, result) == CTX_RESULT);

// The world switch. rdi = &mut RunCtx; the VMCS is current. Saves the host's
// callee-saved registers and FPU state, loads the guest's FPU state, CR2 and GPRs,
// writes HOST_RSP, VMLAUNCH/VMRESUME; the exit lands at ferrovisor_vmx_exit with the
// host RSP written here (ctx pointer on top). A failed entry falls through with the
// guest GPRs loaded and is reported in ctx.result. Either way a pending host interrupt
// is taken (`sti; nop; cli`) and the FPU state switched back.
core::arch::global_asm!(
    r#"
    .text
    .global ferrovisor_vmx_run
ferrovisor_vmx_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi

"#,
    fpu_to_guest_asm!(),
    r#"
    mov eax, {host_rsp}
    vmwrite rax, rsp
    mov rax, [rdi + {cr2}]
    mov cr2, rax

    cmp qword ptr [rdi + {launched}], 0
    mov rax, [rdi + {gprs} + 0*8]
    mov rcx, [rdi + {gprs} + 1*8]
    mov rdx, [rdi + {gprs} + 2*8]
    mov rbx, [rdi + {gprs} + 3*8]
    mov rbp, [rdi + {gprs} + 5*8]
    mov rsi, [rdi + {gprs} + 6*8]
    mov r8,  [rdi + {gprs} + 8*8]
    mov r9,  [rdi + {gprs} + 9*8]
    mov r10, [rdi + {gprs} + 10*8]
    mov r11, [rdi + {gprs} + 11*8]
    mov r12, [rdi + {gprs} + 12*8]
    mov r13, [rdi + {gprs} + 13*8]
    mov r14, [rdi + {gprs} + 14*8]
    mov r15, [rdi + {gprs} + 15*8]
    mov rdi, [rdi + {gprs} + 7*8]
    jne 3f
    vmlaunch
    jmp 4f
3:
    vmresume
4:
    /* entry failed: CF = VMfailInvalid, ZF = VMfailValid */
    mov rdi, [rsp]
    mov eax, 2
    mov ecx, 1
    cmovc eax, ecx
    mov [rdi + {result}], rax
    jmp 5f

    .global ferrovisor_vmx_exit
ferrovisor_vmx_exit:
    xchg rdi, [rsp]
    mov [rdi + {gprs} + 0*8], rax
    mov [rdi + {gprs} + 1*8], rcx
    mov [rdi + {gprs} + 2*8], rdx
    mov [rdi + {gprs} + 3*8], rbx
    mov [rdi + {gprs} + 5*8], rbp
    mov [rdi + {gprs} + 6*8], rsi
    mov [rdi + {gprs} + 8*8], r8
    mov [rdi + {gprs} + 9*8], r9
    mov [rdi + {gprs} + 10*8], r10
    mov [rdi + {gprs} + 11*8], r11
    mov [rdi + {gprs} + 12*8], r12
    mov [rdi + {gprs} + 13*8], r13
    mov [rdi + {gprs} + 14*8], r14
    mov [rdi + {gprs} + 15*8], r15
    mov rax, [rsp]
    mov [rdi + {gprs} + 7*8], rax
    mov [rsp], rdi
    mov rax, cr2
    mov [rdi + {cr2}], rax
    mov qword ptr [rdi + {result}], 0
5:
    sti
    nop
    cli

"#,
    fpu_to_host_asm!(""),
    r#"
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    "#,
    gprs = const CTX_GPRS,
    cr2 = const CTX_CR2,
    host_fpu = const CTX_HOST_FPU,
    guest_fpu = const CTX_GUEST_FPU,
    host_xcr0 = const CTX_HOST_XCR0,
    guest_xcr0 = const CTX_GUEST_XCR0,
    use_xsave = const CTX_USE_XSAVE,
    launched = const CTX_LAUNCHED,
    result = const CTX_RESULT,
    host_rsp = const host::RSP,
);

unsafe extern "C" {
    fn ferrovisor_vmx_run(ctx: *mut RunCtx);
    fn ferrovisor_vmx_exit();
}

/// Basic exit reasons (Intel SDM vol. 3D, appendix C).
mod reason {
    pub const EXCEPTION_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const VMCALL: u32 = 18;
    pub const VMCLEAR: u32 = 19;
    pub const VMXON: u32 = 27;
    pub const CR_ACCESS: u32 = 28;
    pub const IO: u32 = 30;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const PREEMPTION_TIMER: u32 = 52;
    pub const MSR_LOADING: u32 = 34;
    pub const EPT_VIOLATION: u32 = 48;
    pub const INVEPT: u32 = 50;
    pub const INVVPID: u32 = 53;
    pub const XSETBV: u32 = 55;
}

/// Interruption-information fields: valid bit, types, error-code bit.
mod event {
    pub const VALID: u32 = 1 << 31;
    pub const ERROR_CODE: u32 = 1 << 11;
    pub const TYPE_EXTERNAL: u32 = 0;
    pub const TYPE_HW_EXCEPTION: u32 = 3 << 8;
    pub const TYPE_MASK: u32 = 7 << 8;
}

const VEC_UD: u8 = 6;
/// Milliseconds of guest execution after which the VMX-preemption timer exits.
const BACKSTOP_MS: u64 = 20;
const VEC_GP: u8 = 13;

/// An event to inject at the next entry: interruption information, error code and
/// instruction length (software events only).
#[derive(Clone, Copy, Debug)]
struct Event {
    info: u32,
    error_code: u32,
    len: u32,
}

/// One virtual CPU on VMX.
pub struct VmxVcpu {
    vmcs: Box<Page>,
    guest_fpu: Box<FpuArea>,
    ctx: RunCtx,
    fpu: FpuMode,
    host_fpu_pa: u64,
    features: VmxFeatures,
    eptp: u64,
    vpid: u16,
    guest_xcr0: u64,
    /// Syscall MSRs (not switched by VMX): STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE.
    syscall_msrs: [u64; 5],
    /// The guest's CR8 (task priority), emulated: CR8 accesses exit.
    cr8: u64,
    /// An exception to inject at the next entry.
    exception: Option<Event>,
    /// An event whose delivery an exit interrupted (IDT-vectoring information).
    reinject: Option<Event>,
    /// An external interrupt requested by generic code, not yet delivered.
    pending_irq: Option<u8>,
    /// Interrupt-window exiting is on in the VMCS.
    window: bool,
    /// INVEPT/INVVPID before the next entry.
    flush: bool,
    next_rip: Option<u64>,
}

const SYSCALL_MSRS: [u32; 5] = [
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::KERNEL_GS_BASE,
];

/// Host state that is the same for every VMCS on this CPU.
fn write_host_state() {
    // SAFETY: reading control registers, descriptor-table registers, selectors and
    // MSRs that exist on every x86-64 CPU has no side effect.
    unsafe {
        vmwrite(host::CR0, hw::cr0());
        vmwrite(host::CR3, hw::cr3());
        vmwrite(host::CR4, hw::cr4());
        vmwrite(
            host::CS_SELECTOR,
            u64::from(x86::segmentation::cs().bits() & !7),
        );
        vmwrite(
            host::SS_SELECTOR,
            u64::from(x86::segmentation::ss().bits() & !7),
        );
        vmwrite(
            host::DS_SELECTOR,
            u64::from(x86::segmentation::ds().bits() & !7),
        );
        vmwrite(
            host::ES_SELECTOR,
            u64::from(x86::segmentation::es().bits() & !7),
        );
        vmwrite(
            host::FS_SELECTOR,
            u64::from(x86::segmentation::fs().bits() & !7),
        );
        vmwrite(
            host::GS_SELECTOR,
            u64::from(x86::segmentation::gs().bits() & !7),
        );
        let tr = x86::task::tr().bits() & !7;
        vmwrite(host::TR_SELECTOR, u64::from(tr));
        let mut gdtr: x86::dtables::DescriptorTablePointer<u64> = Default::default();
        x86::dtables::sgdt(&mut gdtr);
        let mut idtr: x86::dtables::DescriptorTablePointer<u64> = Default::default();
        x86::dtables::sidt(&mut idtr);
        vmwrite(host::GDTR_BASE, gdtr.base as u64);
        vmwrite(host::IDTR_BASE, idtr.base as u64);
        // The TSS descriptor (16 bytes in long mode) holds the TR base.
        let d = (gdtr.base as u64 + u64::from(tr)) as *const u64;
        let (lo, hi) = (d.read_unaligned(), d.add(1).read_unaligned());
        let tr_base = ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | (hi << 32);
        vmwrite(host::TR_BASE, tr_base);
        vmwrite(host::FS_BASE, hw::rdmsr(msr::FS_BASE));
        vmwrite(host::GS_BASE, hw::rdmsr(msr::GS_BASE));
        vmwrite(host::IA32_SYSENTER_CS, 0);
        vmwrite(host::IA32_SYSENTER_ESP, 0);
        vmwrite(host::IA32_SYSENTER_EIP, 0);
        vmwrite(host::IA32_EFER_FULL, hw::rdmsr(msr::EFER));
        vmwrite(host::IA32_PAT_FULL, hw::rdmsr(msr::PAT));
        vmwrite(host::RIP, ferrovisor_vmx_exit as *const () as u64);
    }
}

impl VmxVcpu {
    /// A vCPU that enters `entry` in 32-bit protected mode with paging off, flat
    /// segments and `ebx` = the start info, as Xen starts a PVH guest; guest memory
    /// through the EPT rooted at `ept_root`; `tag` is unique per vCPU (its VPID).
    pub fn new_pvh(cpu: &VmxCpu, tag: u32, ept_root: u64, entry: &PvhEntry) -> VmxVcpu {
        let f = cpu.features;
        let mut v = VmxVcpu {
            vmcs: Page::with_revision(f.revision),
            guest_fpu: Box::new(FpuArea::new()),
            ctx: RunCtx::default(),
            fpu: cpu.fpu,
            host_fpu_pa: pa_of(&*cpu.host_fpu),
            features: f,
            eptp: eptp(ept_root, f.ept_wb),
            // VPID 0 is the host's: fold the tag into 1..=0xffff.
            vpid: (tag % 0xffff + 1) as u16,
            guest_xcr0: 1,
            syscall_msrs: [0; 5],
            cr8: 0,
            exception: None,
            reinject: None,
            pending_irq: None,
            window: false,
            flush: true,
            next_rip: None,
        };
        let pa = pa_of(&*v.vmcs);
        // SAFETY: VMX operation is on (VmxCpu exists); the VMCS is a fresh 4 KiB page
        // in identity-mapped RAM with the revision identifier.
        unsafe {
            let _ = x86::bits64::vmx::vmclear(pa);
        }
        v.load();
        let c = f.controls;
        vmwrite(control::PINBASED_EXEC_CONTROLS, u64::from(c.pin));
        vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(c.proc));
        vmwrite(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.proc2),
        );
        vmwrite(control::VMEXIT_CONTROLS, u64::from(c.exit));
        vmwrite(control::VMENTRY_CONTROLS, u64::from(c.entry));
        vmwrite(control::EXCEPTION_BITMAP, 0);
        vmwrite(control::PAGE_FAULT_ERR_CODE_MASK, 0);
        vmwrite(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
        vmwrite(control::CR3_TARGET_COUNT, 0);
        vmwrite(control::VMEXIT_MSR_STORE_COUNT, 0);
        vmwrite(control::VMEXIT_MSR_LOAD_COUNT, 0);
        vmwrite(control::VMENTRY_MSR_LOAD_COUNT, 0);
        vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        vmwrite(control::TSC_OFFSET_FULL, 0);
        vmwrite(control::EPTP_FULL, v.eptp);
        if f.vpid {
            vmwrite(control::VPID, u64::from(v.vpid));
        }
        vmwrite(control::CR0_GUEST_HOST_MASK, f.cr0_mask());
        vmwrite(control::CR4_GUEST_HOST_MASK, f.cr4_mask());
        write_host_state();

        vmwrite(guest::LINK_PTR_FULL, u64::MAX);
        vmwrite(guest::IA32_DEBUGCTL_FULL, 0);
        vmwrite(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406);
        vmwrite(guest::PENDING_DBG_EXCEPTIONS, 0);
        vmwrite(guest::IA32_SYSENTER_CS, 0);
        vmwrite(guest::IA32_SYSENTER_ESP, 0);
        vmwrite(guest::IA32_SYSENTER_EIP, 0);
        vmwrite(guest::DR7, 0x400);

        // Flat 32-bit protected mode, as Xen's PVH start: CS 32-bit code, data segments
        // read/write, TR a busy 32-bit TSS, LDTR unusable.
        v.set_segment(Seg::Cs, 0x08, 0x0c9b, 0xffff_ffff, 0);
        for s in [Seg::Ds, Seg::Es, Seg::Ss, Seg::Fs, Seg::Gs] {
            v.set_segment(s, 0x10, 0x0c93, 0xffff_ffff, 0);
        }
        v.set_segment(Seg::Tr, 0x18, 0x008b, 0x67, 0);
        v.set_segment(Seg::Ldtr, 0, 0, 0, 0);
        vmwrite(guest::GDTR_BASE, 0);
        vmwrite(guest::GDTR_LIMIT, 0);
        vmwrite(guest::IDTR_BASE, 0);
        vmwrite(guest::IDTR_LIMIT, 0);
        v.set_control_regs(0x11, 0);
        vmwrite(guest::CR3, 0);
        vmwrite(guest::IA32_EFER_FULL, 0);
        vmwrite(guest::RFLAGS, 0x2);
        vmwrite(guest::RIP, u64::from(entry.entry));
        vmwrite(guest::RSP, 0);
        vmwrite(guest::INTERRUPTIBILITY_STATE, 0);
        vmwrite(guest::ACTIVITY_STATE, 0);
        v.ctx.gprs[crate::vcpu::reg::RBX] = entry.start_info;
        v
    }

    /// Makes this vCPU's VMCS the current one on this CPU.
    fn load(&self) {
        let pa = pa_of(&*self.vmcs);
        if CURRENT_VMCS.load(Ordering::Relaxed) != pa {
            // SAFETY: the VMCS was VMCLEARed when created and lives as long as self;
            // VMX operation is on.
            if unsafe { x86::bits64::vmx::vmptrld(pa) }.is_err() {
                log::error!("VMPTRLD of the VMCS at {pa:#x} failed");
            }
            CURRENT_VMCS.store(pa, Ordering::Relaxed);
        }
    }

    fn set_segment(&mut self, s: Seg, sel: u16, packed: u16, limit: u32, base: u64) {
        let [fsel, flimit, far, fbase] = s.fields();
        vmwrite(fsel, u64::from(sel));
        vmwrite(flimit, u64::from(limit));
        vmwrite(far, u64::from(access_rights(packed)));
        vmwrite(fbase, base);
    }

    /// Sets guest CR0 and CR4 to what the guest wrote (`cr0`, `cr4`): shadows hold them,
    /// the hardware runs them with the fixed bits.
    fn set_control_regs(&mut self, cr0: u64, cr4: u64) {
        vmwrite(control::CR0_READ_SHADOW, cr0);
        vmwrite(guest::CR0, self.features.real_cr0(cr0));
        vmwrite(control::CR4_READ_SHADOW, cr4);
        vmwrite(guest::CR4, self.features.real_cr4(cr4));
    }

    /// CR0 as the guest sees it.
    fn guest_cr0(&self) -> u64 {
        let m = self.features.cr0_mask();
        (vmread(guest::CR0) & !m) | (vmread(control::CR0_READ_SHADOW) & m)
    }

    /// CR4 as the guest sees it.
    fn guest_cr4(&self) -> u64 {
        let m = self.features.cr4_mask();
        (vmread(guest::CR4) & !m) | (vmread(control::CR4_READ_SHADOW) & m)
    }

    /// Raw exit information for diagnostics: (exit reason, qualification,
    /// guest-physical address).
    pub fn exit_info(&self) -> (u64, u64, u64) {
        self.load();
        (
            vmread(ro::EXIT_REASON),
            vmread(ro::EXIT_QUALIFICATION),
            vmread(ro::GUEST_PHYSICAL_ADDR_FULL),
        )
    }

    /// The IDT-vectoring information of the last exit (diagnostics).
    pub fn exit_int_info(&self) -> u64 {
        self.load();
        vmread(ro::IDT_VECTORING_INFO)
    }

    /// Guest CR2 (diagnostics).
    pub fn cr2(&self) -> u64 {
        self.ctx.cr2
    }

    /// The guest is interruptible now: IF set, no STI/MOV SS shadow, active.
    fn interruptible(&self) -> bool {
        vmread(guest::RFLAGS) & (1 << 9) != 0
            && vmread(guest::INTERRUPTIBILITY_STATE) & 3 == 0
            && vmread(guest::ACTIVITY_STATE) == 0
    }

    /// Chooses the event for the next entry and sets interrupt-window exiting.
    fn prepare_events(&mut self) {
        let mut ev = self.exception.take();
        if ev.is_none() {
            ev = self.reinject.take();
        }
        let mut want_window = false;
        if ev.is_none() {
            if let Some(vector) = self.pending_irq {
                if self.interruptible() {
                    ev = Some(Event {
                        info: event::VALID | event::TYPE_EXTERNAL | u32::from(vector),
                        error_code: 0,
                        len: 0,
                    });
                    self.pending_irq = None;
                } else {
                    want_window = true;
                }
            }
        } else if self.pending_irq.is_some() {
            want_window = true;
        }
        match ev {
            Some(e) => {
                vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(e.info));
                vmwrite(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(e.error_code));
                vmwrite(control::VMENTRY_INSTRUCTION_LEN, u64::from(e.len));
            }
            None => vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0),
        }
        if want_window != self.window {
            let mut proc = self.features.controls.proc;
            if want_window {
                proc |= PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
            }
            vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(proc));
            self.window = want_window;
        }
    }

    /// After an exit: an event whose delivery was cut short is delivered again.
    fn collect_vectoring(&mut self) {
        let idt = vmread(ro::IDT_VECTORING_INFO) as u32;
        if idt & event::VALID == 0 {
            return;
        }
        if idt & event::TYPE_MASK == event::TYPE_EXTERNAL {
            // generic code still considers it pending: put it back
            self.pending_irq = Some(idt as u8);
            return;
        }
        let error_code = if idt & event::ERROR_CODE != 0 {
            vmread(ro::IDT_VECTORING_ERR_CODE) as u32
        } else {
            0
        };
        self.reinject = Some(Event {
            info: idt & !(1 << 12),
            error_code,
            len: vmread(ro::VMEXIT_INSTRUCTION_LEN) as u32,
        });
    }

    fn flush_now(&mut self) {
        let f = &self.features;
        // SAFETY: VMX operation is on; detect() checked the INVEPT kinds, and the
        // INVVPID kind used is the one the CPU reports.
        unsafe {
            invept(if f.invept_single { 1 } else { 2 }, self.eptp);
            if f.vpid {
                invvpid(if f.invvpid_single { 1 } else { 2 }, self.vpid);
            }
        }
        self.flush = false;
    }

    fn gpr(&self, r: usize) -> u64 {
        if r == 4 {
            vmread(guest::RSP)
        } else {
            self.ctx.gprs[r & 15]
        }
    }

    fn set_gpr(&mut self, r: usize, v: u64) {
        if r == 4 {
            vmwrite(guest::RSP, v);
        } else {
            self.ctx.gprs[r & 15] = v;
        }
    }

    fn skip_instruction(&mut self) {
        let next = vmread(guest::RIP).wrapping_add(vmread(ro::VMEXIT_INSTRUCTION_LEN));
        self.set_rip(next);
    }

    fn queue_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut info = event::VALID | event::TYPE_HW_EXCEPTION | u32::from(vector);
        if error_code.is_some() {
            info |= event::ERROR_CODE;
        }
        self.exception = Some(Event {
            info,
            error_code: error_code.unwrap_or(0),
            len: 0,
        });
    }

    /// A control-register access exit: MOV to CR0/CR4 touching a host-owned bit, or
    /// CR8. `true` when handled here (re-enter), `false` to report it.
    fn cr_access(&mut self) -> bool {
        let q = vmread(ro::EXIT_QUALIFICATION);
        let cr = q & 0xf;
        let kind = (q >> 4) & 3;
        let gpr = ((q >> 8) & 0xf) as usize;
        // Outside 64-bit mode MOV to CR uses the register's low 32 bits.
        let long = vmread(guest::IA32_EFER_FULL) & efer::LMA != 0
            && vmread(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0;
        let width = if long { u64::MAX } else { 0xffff_ffff };
        match (kind, cr) {
            (0, 0) => {
                let v = self.gpr(gpr) & width;
                let old = self.guest_cr0();
                let efer_v = vmread(guest::IA32_EFER_FULL);
                let cr4 = self.guest_cr4();
                if v >> 32 != 0
                    || (v & CR0_PG != 0 && v & CR0_PE == 0)
                    || (v & CR0_NW != 0 && v & CR0_CD == 0)
                    || (v & CR0_PG != 0
                        && old & CR0_PG == 0
                        && efer_v & efer::LME != 0
                        && cr4 & CR4_PAE == 0)
                {
                    self.queue_exception(VEC_GP, Some(0));
                    return true;
                }
                let mut entry = vmread(control::VMENTRY_CONTROLS);
                let ia32e = EntryControls::IA32E_MODE_GUEST.bits() as u64;
                if v & CR0_PG != 0 && old & CR0_PG == 0 {
                    if efer_v & efer::LME != 0 {
                        vmwrite(guest::IA32_EFER_FULL, efer_v | efer::LMA);
                        entry |= ia32e;
                    } else if cr4 & CR4_PAE != 0 {
                        // Legacy PAE paging would need the PDPTEs loaded into the VMCS.
                        return false;
                    }
                } else if v & CR0_PG == 0 && old & CR0_PG != 0 {
                    vmwrite(guest::IA32_EFER_FULL, efer_v & !efer::LMA);
                    entry &= !ia32e;
                }
                vmwrite(control::VMENTRY_CONTROLS, entry);
                vmwrite(control::CR0_READ_SHADOW, v);
                vmwrite(guest::CR0, self.features.real_cr0(v));
                self.flush = true;
            }
            (0, 4) => {
                let v = self.gpr(gpr) & width;
                let lma = vmread(guest::IA32_EFER_FULL) & efer::LMA != 0;
                let allowed = self.features.cr4_fixed1 & !CR4_VMXE;
                if v & !allowed != 0 || (lma && v & CR4_PAE == 0) {
                    self.queue_exception(VEC_GP, Some(0));
                    return true;
                }
                vmwrite(control::CR4_READ_SHADOW, v);
                vmwrite(guest::CR4, self.features.real_cr4(v));
                self.flush = true;
            }
            (0, 8) => {
                let v = self.gpr(gpr);
                if v >> 4 != 0 {
                    self.queue_exception(VEC_GP, Some(0));
                    return true;
                }
                self.cr8 = v;
            }
            (1, 8) => {
                let v = self.cr8;
                self.set_gpr(gpr, v);
            }
            _ => return false,
        }
        self.skip_instruction();
        true
    }

    fn decode_exit(&mut self, reason: u32) -> Exit {
        let q = vmread(ro::EXIT_QUALIFICATION);
        let next = || vmread(guest::RIP).wrapping_add(vmread(ro::VMEXIT_INSTRUCTION_LEN));
        self.next_rip = None;
        match reason {
            reason::VMCALL => {
                self.next_rip = Some(next());
                Exit::Hypercall
            }
            reason::CPUID => {
                self.next_rip = Some(next());
                Exit::Cpuid
            }
            reason::HLT => {
                self.next_rip = Some(next());
                Exit::Hlt
            }
            reason::XSETBV => {
                self.next_rip = Some(next());
                Exit::Xsetbv
            }
            reason::RDMSR | reason::WRMSR => {
                self.next_rip = Some(next());
                Exit::Msr {
                    write: reason == reason::WRMSR,
                }
            }
            reason::TRIPLE_FAULT => Exit::TripleFault,
            // The backstop timer ran out: the host takes the CPU back, as after its
            // timer's interrupt.
            reason::EXTERNAL_INTERRUPT | reason::PREEMPTION_TIMER => Exit::ExternalInterrupt,
            reason::IO => {
                let n = next();
                self.next_rip = Some(n);
                Exit::Io(IoExit {
                    port: (q >> 16) as u16,
                    size: ((q & 7) + 1) as u8,
                    input: q & (1 << 3) != 0,
                    string: q & (1 << 4) != 0,
                    rep: q & (1 << 5) != 0,
                    next_rip: Some(n),
                })
            }
            reason::EPT_VIOLATION => Exit::NestedPageFault {
                gpa: vmread(ro::GUEST_PHYSICAL_ADDR_FULL),
                write: q & 2 != 0,
                fetch: q & 4 != 0,
                present: q & (7 << 3) != 0,
            },
            reason::INVALID_GUEST_STATE | reason::MSR_LOADING => {
                Exit::InvalidState(u64::from(reason) | (1 << 31))
            }
            other => Exit::Unhandled(u64::from(other)),
        }
    }
}

/// Guest segment registers and their four VMCS fields.
#[derive(Clone, Copy)]
enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
}

impl Seg {
    /// (selector, limit, access rights, base) field encodings.
    fn fields(self) -> [u32; 4] {
        use guest::*;
        match self {
            Seg::Es => [ES_SELECTOR, ES_LIMIT, ES_ACCESS_RIGHTS, ES_BASE],
            Seg::Cs => [CS_SELECTOR, CS_LIMIT, CS_ACCESS_RIGHTS, CS_BASE],
            Seg::Ss => [SS_SELECTOR, SS_LIMIT, SS_ACCESS_RIGHTS, SS_BASE],
            Seg::Ds => [DS_SELECTOR, DS_LIMIT, DS_ACCESS_RIGHTS, DS_BASE],
            Seg::Fs => [FS_SELECTOR, FS_LIMIT, FS_ACCESS_RIGHTS, FS_BASE],
            Seg::Gs => [GS_SELECTOR, GS_LIMIT, GS_ACCESS_RIGHTS, GS_BASE],
            Seg::Ldtr => [LDTR_SELECTOR, LDTR_LIMIT, LDTR_ACCESS_RIGHTS, LDTR_BASE],
            Seg::Tr => [TR_SELECTOR, TR_LIMIT, TR_ACCESS_RIGHTS, TR_BASE],
        }
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        let pa = pa_of(&*self.vmcs);
        // SAFETY: VMCLEAR writes back and deactivates the VMCS before its memory is
        // freed, so the CPU never touches freed memory.
        unsafe {
            let _ = x86::bits64::vmx::vmclear(pa);
        }
        let _ = CURRENT_VMCS.compare_exchange(pa, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl GuestCpu for VmxVcpu {
    fn run(&mut self) -> Exit {
        loop {
            self.load();
            if self.flush {
                self.flush_now();
            }
            self.prepare_events();
            if self.features.controls.pin & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0 {
                // Expires after a generous slice (the host timer normally ends it first).
                let ticks = (crate::time::tsc_khz().max(1) * BACKSTOP_MS)
                    >> self.features.preemption_timer_shift;
                vmwrite(
                    guest::VMX_PREEMPTION_TIMER_VALUE,
                    ticks.clamp(1, u64::from(u32::MAX)),
                );
            }
            self.ctx.host_fpu = self.host_fpu_pa;
            self.ctx.guest_fpu = pa_of(&*self.guest_fpu);
            match self.fpu {
                FpuMode::Xsave { host_xcr0 } => {
                    self.ctx.use_xsave = 1;
                    self.ctx.host_xcr0 = host_xcr0;
                    self.ctx.guest_xcr0 = self.guest_xcr0;
                }
                FpuMode::Fxsave => self.ctx.use_xsave = 0,
            }
            for ((m, v), loaded) in SYSCALL_MSRS
                .iter()
                .zip(self.syscall_msrs)
                .zip(&LOADED_SYSCALL_MSRS)
            {
                if loaded.load(Ordering::Relaxed) != v {
                    // SAFETY: the syscall MSRs exist on every x86-64 CPU; the host does
                    // not use them, so they hold the guest's values while it runs.
                    unsafe { hw::wrmsr(*m, v) };
                    loaded.store(v, Ordering::Relaxed);
                }
            }
            // SAFETY: ctx is a live RunCtx; this vCPU's VMCS is current and complete
            // (guest, host and control state written by new_pvh); the FPU areas are
            // owned by this vCPU and its VmxCpu, aligned for XSAVE.
            unsafe { ferrovisor_vmx_run(&mut self.ctx) };
            // SAFETY: KERNEL_GS_BASE exists on every x86-64 CPU; SWAPGS in the guest may
            // have changed it.
            self.syscall_msrs[4] = unsafe { hw::rdmsr(msr::KERNEL_GS_BASE) };
            LOADED_SYSCALL_MSRS[4].store(self.syscall_msrs[4], Ordering::Relaxed);
            if self.ctx.result != 0 {
                let err = if self.ctx.result == 2 {
                    vmread(ro::VM_INSTRUCTION_ERROR)
                } else {
                    0xffff
                };
                // VM-instruction error numbers (7: invalid control fields, 8: invalid
                // host state) in the low bits, bit 32 set to tell them from exits.
                return Exit::InvalidState((1 << 32) | err);
            }
            self.ctx.launched = 1;
            let full = vmread(ro::EXIT_REASON) as u32;
            if full & (1 << 31) != 0 {
                return Exit::InvalidState(u64::from(full));
            }
            self.collect_vectoring();
            let reason = full & 0xffff;
            match reason {
                reason::INTERRUPT_WINDOW => continue,
                reason::CR_ACCESS if self.cr_access() => continue,
                reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID => {
                    // no nested VMX: the instructions do not exist for the guest
                    self.queue_exception(VEC_UD, None);
                    continue;
                }
                reason::EXCEPTION_NMI => {
                    let info = vmread(ro::VMEXIT_INTERRUPTION_INFO);
                    return Exit::Unhandled((info << 16) | u64::from(reason));
                }
                _ => return self.decode_exit(reason),
            }
        }
    }

    fn reg(&self, r: usize) -> u64 {
        if r == 4 {
            self.load();
        }
        self.gpr(r)
    }

    fn set_reg(&mut self, r: usize, v: u64) {
        if r == 4 {
            self.load();
        }
        self.set_gpr(r, v);
    }

    fn rip(&self) -> u64 {
        self.load();
        vmread(guest::RIP)
    }

    fn set_rip(&mut self, v: u64) {
        self.load();
        vmwrite(guest::RIP, v);
        // The instruction completed: STI/MOV SS blocking ends with it.
        let s = vmread(guest::INTERRUPTIBILITY_STATE);
        if s & 3 != 0 {
            vmwrite(guest::INTERRUPTIBILITY_STATE, s & !3);
        }
    }

    fn rflags(&self) -> u64 {
        self.load();
        vmread(guest::RFLAGS)
    }

    fn paging(&self) -> GuestPaging {
        self.load();
        GuestPaging {
            cr0: self.guest_cr0(),
            cr3: vmread(guest::CR3),
            cr4: self.guest_cr4(),
            efer: vmread(guest::IA32_EFER_FULL),
        }
    }

    fn cpl(&self) -> u8 {
        self.load();
        ((vmread(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
    }

    fn code_segment(&self) -> (CodeMode, u64) {
        self.load();
        let ar = vmread(guest::CS_ACCESS_RIGHTS);
        let base = vmread(guest::CS_BASE);
        let long = ar & (1 << 13) != 0;
        let db = ar & (1 << 14) != 0;
        let lma = vmread(guest::IA32_EFER_FULL) & efer::LMA != 0;
        let pe = vmread(guest::CR0) & CR0_PE != 0;
        let mode = if lma && long {
            CodeMode::Bits64
        } else if pe && db {
            CodeMode::Bits32
        } else {
            CodeMode::Bits16
        };
        (mode, if mode == CodeMode::Bits64 { 0 } else { base })
    }

    fn next_rip(&self) -> Option<u64> {
        self.next_rip
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.queue_exception(vector, error_code);
    }

    fn read_arch_msr(&self, m: u32) -> Option<u64> {
        self.load();
        Some(match m {
            msr::EFER => vmread(guest::IA32_EFER_FULL),
            msr::STAR => self.syscall_msrs[0],
            msr::LSTAR => self.syscall_msrs[1],
            msr::CSTAR => self.syscall_msrs[2],
            msr::SFMASK => self.syscall_msrs[3],
            msr::KERNEL_GS_BASE => self.syscall_msrs[4],
            msr::FS_BASE => vmread(guest::FS_BASE),
            msr::GS_BASE => vmread(guest::GS_BASE),
            msr::SYSENTER_CS => vmread(guest::IA32_SYSENTER_CS),
            msr::SYSENTER_ESP => vmread(guest::IA32_SYSENTER_ESP),
            msr::SYSENTER_EIP => vmread(guest::IA32_SYSENTER_EIP),
            msr::PAT => vmread(guest::IA32_PAT_FULL),
            _ => return None,
        })
    }

    fn write_arch_msr(&mut self, m: u32, val: u64) -> Result<bool, InvalidMsrValue> {
        self.load();
        let canonical = |x: u64| ((x as i64) << 16 >> 16) as u64 == x;
        match m {
            msr::EFER => {
                let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE;
                if val & !allowed != 0 {
                    return Err(InvalidMsrValue);
                }
                // LMA is read-only: it follows CR0.PG with LME (and the IA-32e entry control).
                let lma = vmread(guest::IA32_EFER_FULL) & efer::LMA;
                vmwrite(guest::IA32_EFER_FULL, (val & !efer::LMA) | lma);
            }
            msr::STAR => self.syscall_msrs[0] = val,
            msr::LSTAR | msr::CSTAR | msr::KERNEL_GS_BASE | msr::FS_BASE | msr::GS_BASE
                if !canonical(val) =>
            {
                return Err(InvalidMsrValue)
            }
            msr::LSTAR => self.syscall_msrs[1] = val,
            msr::CSTAR => self.syscall_msrs[2] = val,
            msr::SFMASK => self.syscall_msrs[3] = val & 0xffff_ffff,
            msr::KERNEL_GS_BASE => self.syscall_msrs[4] = val,
            msr::FS_BASE => vmwrite(guest::FS_BASE, val),
            msr::GS_BASE => vmwrite(guest::GS_BASE, val),
            msr::SYSENTER_CS => vmwrite(guest::IA32_SYSENTER_CS, val & 0xffff),
            msr::SYSENTER_ESP | msr::SYSENTER_EIP if !canonical(val) => {
                return Err(InvalidMsrValue)
            }
            msr::SYSENTER_ESP => vmwrite(guest::IA32_SYSENTER_ESP, val),
            msr::SYSENTER_EIP => vmwrite(guest::IA32_SYSENTER_EIP, val),
            msr::PAT => {
                // each byte must be a valid memory type (0, 1, 4, 5, 6, 7)
                if (0..8).any(|i| matches!((val >> (i * 8)) & 0xff, 2 | 3 | 8..)) {
                    return Err(InvalidMsrValue);
                }
                vmwrite(guest::IA32_PAT_FULL, val);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn xcr0(&self) -> u64 {
        self.guest_xcr0
    }

    fn set_xcr0(&mut self, v: u64) {
        self.guest_xcr0 = v;
    }

    fn inject_interrupt(&mut self, vector: u8) {
        self.pending_irq = Some(vector);
    }

    fn interrupt_pending(&self) -> bool {
        self.pending_irq.is_some()
    }

    fn reset_real_mode(&mut self, vector: u8) {
        self.load();
        let base = u64::from(vector) << 12;
        self.set_segment(Seg::Cs, u16::from(vector) << 8, 0x009b, 0xffff, base);
        for s in [Seg::Ds, Seg::Es, Seg::Ss, Seg::Fs, Seg::Gs] {
            self.set_segment(s, 0, 0x0093, 0xffff, 0);
        }
        self.set_segment(Seg::Tr, 0, 0x008b, 0xffff, 0);
        self.set_segment(Seg::Ldtr, 0, 0, 0, 0);
        vmwrite(guest::GDTR_BASE, 0);
        vmwrite(guest::GDTR_LIMIT, 0xffff);
        vmwrite(guest::IDTR_BASE, 0);
        vmwrite(guest::IDTR_LIMIT, 0xffff);
        self.set_control_regs(0x10, 0);
        vmwrite(guest::CR3, 0);
        vmwrite(guest::IA32_EFER_FULL, 0);
        vmwrite(
            control::VMENTRY_CONTROLS,
            u64::from(self.features.controls.entry),
        );
        vmwrite(guest::RFLAGS, 0x2);
        vmwrite(guest::RIP, 0);
        vmwrite(guest::RSP, 0);
        vmwrite(guest::INTERRUPTIBILITY_STATE, 0);
        vmwrite(guest::ACTIVITY_STATE, 0);
        vmwrite(guest::DR7, 0x400);
        self.ctx.gprs = [0; 16];
        self.ctx.cr2 = 0;
        self.syscall_msrs = [0; 5];
        self.cr8 = 0;
        self.exception = None;
        self.reinject = None;
        self.pending_irq = None;
        self.guest_xcr0 = 1;
        *self.guest_fpu = FpuArea::new();
        self.flush = true;
    }

    fn flush_tlb(&mut self) {
        self.flush = true;
    }

    fn hypercall_instruction(&self) -> [u8; 3] {
        [0x0f, 0x01, 0xc1] // vmcall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capability MSRs as Bochs 2.7's corei7_skylake_x model reports them (TRUE
    /// controls, EPT with 2 MiB and 1 GiB pages, VPID, unrestricted guest).
    fn skylake(m: u32) -> u64 {
        match m {
            cap::FEATURE_CONTROL => 0x5,
            cap::BASIC => 0x00da_0400_0000_0001 | (1 << 55),
            cap::PINBASED => 0x0000_007f_0000_0016,
            cap::TRUE_PINBASED => 0x0000_007f_0000_0016,
            cap::PROCBASED => 0xfff9_fffe_0401_e172,
            cap::TRUE_PROCBASED => 0xfff9_fffe_0400_6172,
            cap::PROCBASED2 => 0x0017_33ff_0000_0000,
            cap::EXIT => 0x01ff_ffff_0003_6dff,
            cap::MISC => 0x7004_c1e7,
            cap::TRUE_EXIT => 0x01ff_ffff_0003_6dfb,
            cap::ENTRY => 0x0003_ffff_0000_11ff,
            cap::TRUE_ENTRY => 0x0003_ffff_0000_11fb,
            cap::CR0_FIXED0 => 0x8000_0021,
            cap::CR0_FIXED1 => 0xffff_ffff,
            cap::CR4_FIXED0 => 0x2000,
            cap::CR4_FIXED1 => 0x0037_27ff,
            cap::EPT_VPID => 0x0f01_0633_4141,
            _ => panic!("unexpected MSR {m:#x}"),
        }
    }

    #[test]
    fn adjust_sets_must_be_one_and_keeps_allowed() {
        // bits 1 and 2 must be 1; bits 0..=7 may be 1
        let cap = (0xffu64 << 32) | 0x6;
        let w = Want {
            required: 1 << 0,
            optional: (1 << 3) | (1 << 9),
            forbidden: 0,
        };
        assert_eq!(adjust(cap, w), Ok(0b1111));
        let missing = Want {
            required: 1 << 8,
            optional: 0,
            forbidden: 0,
        };
        assert_eq!(adjust(cap, missing), Err((1 << 8, 0)));
        let forced = Want {
            required: 0,
            optional: 0,
            forbidden: 1 << 2,
        };
        assert_eq!(adjust(cap, forced), Err((0, 1 << 2)));
    }

    #[test]
    fn skylake_controls_are_adjusted_from_the_true_msrs() {
        let f = detect_with(true, skylake).unwrap();
        let c = f.controls;
        // pin: external interrupts, NMIs, the preemption timer, plus the default-1 bits
        // 1, 2, 4
        assert_eq!(c.pin, 0x5f);
        assert_eq!(f.preemption_timer_shift, 7);
        // primary: the TRUE MSR lets CR3 exiting (bits 15, 16) go; HLT, CR8, I/O and
        // secondary controls on; bits 1, 4-6, 8, 13, 14, 26 default to 1
        assert_eq!(c.proc & (3 << 15), 0);
        assert_eq!(
            c.proc,
            0x0400_6172 | (1 << 7) | (1 << 19) | (1 << 20) | (1 << 24) | (1 << 31)
        );
        assert_eq!(
            c.proc2,
            (SecondaryControls::ENABLE_EPT
                | SecondaryControls::UNRESTRICTED_GUEST
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::ENABLE_INVPCID)
                .bits()
        );
        assert_eq!(c.exit & ExitControls::ACK_INTERRUPT_ON_EXIT.bits(), 0);
        assert_ne!(c.exit & ExitControls::HOST_ADDRESS_SPACE_SIZE.bits(), 0);
        assert_ne!(c.exit & ExitControls::LOAD_IA32_EFER.bits(), 0);
        assert_eq!(c.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        assert_ne!(c.entry & EntryControls::LOAD_IA32_PAT.bits(), 0);
        assert!(f.vpid && f.ept_wb && f.invept_single && f.invvpid_single);
        assert_eq!(f.ept_max_page, PageSize::Size1G);
        assert_eq!(f.revision, 1);
        assert!(!f.needs_feature_control);
        // CR0: NE owned by the host, PE/PG the guest's; CR4: VMXE owned by the host
        assert_eq!(f.cr0_mask(), 1 << 5); // NE
        assert_eq!(f.cr4_mask(), CR4_VMXE);
        assert_eq!(f.real_cr0(0x11), 0x31);
        assert_eq!(f.real_cr4(0), CR4_VMXE);
    }

    #[test]
    fn without_true_msrs_forced_cr3_exiting_is_refused() {
        let old = |m: u32| match m {
            cap::BASIC => skylake(m) & !(1 << 55),
            cap::TRUE_PINBASED | cap::TRUE_PROCBASED | cap::TRUE_EXIT | cap::TRUE_ENTRY => {
                panic!("TRUE MSR {m:#x} read without BASIC bit 55")
            }
            _ => skylake(m),
        };
        // the non-TRUE primary MSR forces CR3 load/store exiting (bits 15, 16)
        assert_eq!(
            detect_with(true, old).unwrap_err(),
            VmxError::Controls {
                group: "primary processor-based",
                missing: 0,
                forced: 3 << 15
            }
        );
    }

    #[test]
    fn missing_features_are_named() {
        assert_eq!(
            detect_with(false, |_| panic!("no MSR without VMX")).unwrap_err(),
            VmxError::NoVmx
        );
        let locked = |m: u32| {
            if m == cap::FEATURE_CONTROL {
                1
            } else {
                skylake(m)
            }
        };
        assert_eq!(detect_with(true, locked).unwrap_err(), VmxError::LockedOff);
        let unlocked = |m: u32| {
            if m == cap::FEATURE_CONTROL {
                0
            } else {
                skylake(m)
            }
        };
        assert!(detect_with(true, unlocked).unwrap().needs_feature_control);
        let no_secondary = |m: u32| match m {
            cap::TRUE_PROCBASED => skylake(m) & !(1 << 63),
            cap::PROCBASED2 | cap::EPT_VPID => panic!("MSR {m:#x} read without secondary controls"),
            _ => skylake(m),
        };
        assert_eq!(
            detect_with(true, no_secondary).unwrap_err(),
            VmxError::NoEpt
        );
        let no_ept = |m: u32| match m {
            cap::PROCBASED2 => skylake(m) & !(2 << 32),
            cap::EPT_VPID => panic!("EPT_VPID_CAP read without EPT"),
            _ => skylake(m),
        };
        assert_eq!(detect_with(true, no_ept).unwrap_err(), VmxError::NoEpt);
        let no_ug = |m: u32| match m {
            cap::PROCBASED2 => skylake(m) & !(0x80 << 32),
            _ => skylake(m),
        };
        assert_eq!(
            detect_with(true, no_ug).unwrap_err(),
            VmxError::NoUnrestrictedGuest
        );
        let no_invvpid = |m: u32| match m {
            cap::EPT_VPID => skylake(m) & !(cap::INVVPID | cap::INVVPID_SINGLE | cap::INVVPID_ALL),
            _ => skylake(m),
        };
        let f = detect_with(true, no_invvpid).unwrap();
        assert!(!f.vpid, "VPIDs need INVVPID");
        let small_ept = |m: u32| match m {
            cap::EPT_VPID => skylake(m) & !(cap::EPT_1G | cap::EPT_2M),
            _ => skylake(m),
        };
        assert_eq!(
            detect_with(true, small_ept).unwrap().ept_max_page,
            PageSize::Size4K
        );
        let walk3 = |m: u32| match m {
            cap::EPT_VPID => skylake(m) & !cap::EPT_WALK4,
            _ => skylake(m),
        };
        assert!(matches!(
            detect_with(true, walk3).unwrap_err(),
            VmxError::EptUnusable(_)
        ));
        for e in [
            VmxError::NoVmx,
            VmxError::LockedOff,
            VmxError::NoEpt,
            VmxError::NoUnrestrictedGuest,
        ] {
            let text = alloc::format!("{e}");
            assert!(text.contains("firmware") || text.contains("CPU"), "{text}");
        }
    }

    #[test]
    fn eptp_and_access_rights_encodings() {
        assert_eq!(eptp(0x1234_5000, true), 0x1234_501e);
        assert_eq!(eptp(0x1234_5fff, false), 0x1234_5018);
        // 32-bit code (G, D, P, S, type 0xb), 64-bit code, data, busy TSS, unusable
        assert_eq!(access_rights(0x0c9b), 0xc09b);
        assert_eq!(access_rights(0x0a9b), 0xa09b);
        assert_eq!(access_rights(0x0c93), 0xc093);
        assert_eq!(access_rights(0x008b), 0x008b);
        assert_eq!(access_rights(0), 1 << 16);
    }
}
