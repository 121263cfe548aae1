//! AMD SVM backend: per-CPU enablement, the VMCB, the world switch and exit decoding.
//!
//! Facts this relies on (AMD APM vol. 2, ch. 15, and PLATFORM.md): VMRUN restores only
//! rax/rsp/rip/rflags, segment selectors, GDTR/IDTR, CR0/3/4, EFER and DR6/7 of the host,
//! so the trampoline saves every other GPR and swaps the hidden segment/syscall state
//! with VMSAVE/VMLOAD; QEMU TCG offers no NRIPS, decode assists, clean bits or
//! flush-by-ASID, so none is assumed.

use alloc::boxed::Box;

use super::x86::{self, efer, msr};
use crate::guest_walk::GuestPaging;
use crate::vcpu::{CodeMode, Exit, GuestCpu, InvalidMsrValue, IoExit};

/// What the CPU offers for SVM, from CPUID 0x80000001/0x8000000A.
#[derive(Clone, Copy, Debug)]
pub struct SvmFeatures {
    /// Nested paging.
    pub npt: bool,
    /// The VMCB reports the next RIP on intercepts.
    pub nrips: bool,
    /// Number of ASIDs.
    pub asids: u32,
}

/// Why SVM cannot be used on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID says no SVM at all.
    NoSvm,
    /// SVM exists but firmware disabled it (VM_CR.SVMDIS).
    DisabledByFirmware,
    /// SVM without nested paging.
    NoNpt,
}

/// Reads the SVM features of this CPU, or why SVM is unusable.
pub fn detect() -> Result<SvmFeatures, SvmError> {
    let reader = |leaf: u32, sub: u32| {
        let [eax, ebx, ecx, edx] = x86::cpuid(leaf, sub);
        raw_cpuid::CpuIdResult { eax, ebx, ecx, edx }
    };
    detect_with(&raw_cpuid::CpuId::with_cpuid_reader(reader), || {
        // SAFETY: VM_CR exists on every CPU that reports SVM in CPUID, and this is
        // only called after that check.
        unsafe { x86::rdmsr(msr::VM_CR) }
    })
}

/// [`detect`] over any CPUID source; `vm_cr` reads the VM_CR MSR (called only when
/// CPUID reports SVM).
pub fn detect_with<R: raw_cpuid::CpuIdReader>(
    cpuid: &raw_cpuid::CpuId<R>,
    vm_cr: impl FnOnce() -> u64,
) -> Result<SvmFeatures, SvmError> {
    let has_svm = cpuid
        .get_extended_processor_and_feature_identifiers()
        .is_some_and(|f| f.has_svm());
    let Some(svm) = cpuid.get_svm_info().filter(|_| has_svm) else {
        return Err(SvmError::NoSvm);
    };
    if vm_cr() & (1 << 4) != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    if !svm.has_nested_paging() {
        return Err(SvmError::NoNpt);
    }
    Ok(SvmFeatures {
        npt: true,
        nrips: svm.has_nrip(),
        asids: svm.supported_asids(),
    })
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Per-CPU SVM state: the host save area VMRUN uses and the area VMSAVE/VMLOAD swap
/// (one of each per physical CPU: see [`SvmVcpu::load_on`]).
pub struct SvmCpu {
    _hsave: Box<Page>,
    host_save: Box<Page>,
    host_fpu: Box<FpuArea>,
    /// How FPU state is saved.
    pub fpu: FpuMode,
    /// Features found at enable time.
    pub features: SvmFeatures,
}

/// How FPU/SSE/AVX state is switched.
#[derive(Clone, Copy, Debug)]
pub enum FpuMode {
    /// XSAVE/XRSTOR with this host XCR0 (also the set of components guests may enable).
    Xsave {
        /// Host XCR0.
        host_xcr0: u64,
    },
    /// FXSAVE/FXRSTOR (no XSAVE on this CPU).
    Fxsave,
}

/// Turns SVM on for the calling CPU: EFER.SVME, VM_HSAVE_PA, and the FPU mode.
///
/// # Safety
/// Call once per CPU, with interrupts off, after [`detect`] succeeded.
pub unsafe fn enable(features: SvmFeatures) -> SvmCpu {
    let hsave = Box::new(Page([0; 4096]));
    let host_save = Box::new(Page([0; 4096]));
    // SAFETY: SVM is present (caller ran detect); setting SVME and the host save area
    // before the first VMRUN is the documented enable sequence.
    unsafe {
        x86::wrmsr(msr::EFER, x86::rdmsr(msr::EFER) | efer::SVME);
        x86::wrmsr(msr::VM_HSAVE_PA, pa_of(&*hsave));
    }
    let fpu = enable_fpu();
    SvmCpu {
        _hsave: hsave,
        host_save,
        host_fpu: Box::new(FpuArea::new()),
        fpu,
        features,
    }
}

/// Enables XSAVE in CR4 when the CPU has it, with every component up to AVX that the
/// CPU supports (more would need larger save areas and Bochs mis-sizes them).
pub(crate) fn enable_fpu() -> FpuMode {
    let has_xsave = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_xsave());
    if !has_xsave {
        return FpuMode::Fxsave;
    }
    let [eax, _, _, _] = x86::cpuid(0xd, 0);
    let host_xcr0 = u64::from(eax) & 0x7; // x87, SSE, AVX
                                          // SAFETY: CPUID says XSAVE exists; setting OSXSAVE then XCR0 to supported components
                                          // (x87 always included) is the architectural enable sequence.
    unsafe {
        x86::write_cr4(x86::cr4() | (1 << 18));
        x86::xsetbv0(host_xcr0 | 1);
    }
    FpuMode::Xsave {
        host_xcr0: host_xcr0 | 1,
    }
}

/// An FPU save area, big enough for x87+SSE+AVX XSAVE images (and FXSAVE).
#[repr(C, align(64))]
pub struct FpuArea([u8; 4096]);

impl FpuArea {
    /// The state a CPU has after reset: FCW 0x37f, MXCSR 0x1f80, no component live.
    pub fn new() -> Self {
        let mut a = FpuArea([0; 4096]);
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }
}

impl Default for FpuArea {
    fn default() -> Self {
        Self::new()
    }
}

fn pa_of<T>(r: &T) -> u64 {
    // The heap lives in identity-mapped RAM: a pointer's value is its physical address.
    r as *const T as u64
}

/// VMCB field offsets (AMD APM vol. 2, appendix B).
mod off {
    pub const INTERCEPT_CR: usize = 0x000;
    pub const INTERCEPT_EXC: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE: usize = 0x040;
    pub const MSRPM_BASE: usize = 0x048;
    pub const TSC_OFFSET: usize = 0x050;
    pub const ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    pub const VINTR: usize = 0x060;
    pub const EXITCODE: usize = 0x070;
    pub const EXITINFO1: usize = 0x078;
    pub const EXITINFO2: usize = 0x080;
    pub const EXITINTINFO: usize = 0x088;
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENTINJ: usize = 0x0a8;
    pub const N_CR3: usize = 0x0b0;
    pub const NRIP: usize = 0x0c8;
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4cb;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const STAR: usize = 0x600;
    pub const LSTAR: usize = 0x608;
    pub const CSTAR: usize = 0x610;
    pub const SFMASK: usize = 0x618;
    pub const KERNEL_GS_BASE: usize = 0x620;
    pub const SYSENTER_CS: usize = 0x628;
    pub const SYSENTER_ESP: usize = 0x630;
    pub const SYSENTER_EIP: usize = 0x638;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// Intercept bits in the first misc vector (VMCB 0x00c).
mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const IOIO: u32 = 1 << 27;
    pub const MSR: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept bits in the second misc vector (VMCB 0x010).
mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const XSETBV: u32 = 1 << 13;
}

/// Exit codes (AMD APM vol. 2, appendix C).
mod code {
    pub const INTR: u64 = 0x60;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMMCALL: u64 = 0x81;
    pub const XSETBV: u64 = 0x8d;
    pub const NPF: u64 = 0x400;
    pub const INVALID: u64 = 0xffff_ffff;
}

/// V_INTR_MASKING: the guest's IF masks only virtual interrupts; physical ones follow
/// the host's IF (and exit through the INTR intercept).
const VINTR_MASKING: u64 = 1 << 24;
/// V_IRQ, V_IGN_TPR and priority 15: a virtual interrupt to deliver when the guest's IF
/// allows.
const VIRQ_BITS: u64 = (1 << 8) | (1 << 20) | (0xf << 16);

/// The virtual machine control block: one 4 KiB page, accessed by field offset.
#[repr(C, align(4096))]
pub struct Vmcb([u8; 4096]);

impl Vmcb {
    fn r64(&self, o: usize) -> u64 {
        u64::from_le_bytes(self.0[o..o + 8].try_into().expect("8 bytes"))
    }
    fn w64(&mut self, o: usize, v: u64) {
        self.0[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn w32(&mut self, o: usize, v: u32) {
        self.0[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_segment(&mut self, o: usize, sel: u16, attrib: u16, limit: u32, base: u64) {
        self.0[o..o + 2].copy_from_slice(&sel.to_le_bytes());
        self.0[o + 2..o + 4].copy_from_slice(&attrib.to_le_bytes());
        self.w32(o + 4, limit);
        self.w64(o + 8, base);
    }
    fn segment_attrib(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.0[o + 2], self.0[o + 3]])
    }
}

/// Guest GPRs the trampoline saves and loads (rax and rsp live in the VMCB).
#[repr(C)]
#[derive(Default)]
struct RunCtx {
    gprs: [u64; 16],
    vmcb_pa: u64,
    host_save_pa: u64,
    host_fpu: u64,
    guest_fpu: u64,
    host_xcr0: u64,
    guest_xcr0: u64,
    use_xsave: u64,
}

const CTX_GPRS: usize = 0;
const CTX_VMCB: usize = 128;
const CTX_HOST_SAVE: usize = 136;
const CTX_HOST_FPU: usize = 144;
const CTX_GUEST_FPU: usize = 152;
const CTX_HOST_XCR0: usize = 160;
const CTX_GUEST_XCR0: usize = 168;
const CTX_USE_XSAVE: usize = 176;
const _: () = assert!(core::mem::offset_of!(RunCtx, vmcb_pa) == CTX_VMCB);
const _: () = assert!(core::mem::offset_of!(RunCtx, use_xsave) == CTX_USE_XSAVE);
const _: () = assert!(core::mem::size_of::<Vmcb>() == 4096);

// The world switch. rdi = &mut RunCtx. Saves the host's callee-saved registers and FPU
// state, loads the guest's FPU state and GPRs, VMLOAD/VMRUN/VMSAVE, and reverses it all.
// GIF is cleared around the switch; host interrupts are enabled (STI under GIF=0) so
// that, with V_INTR_MASKING, a host timer interrupt exits the guest; it is taken
// right after STGI and acknowledged by the image's handler, then interrupts go off.
core::arch::global_asm!(
    r#"
    .text
    .global ferrovisor_svm_run
ferrovisor_svm_run:
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
    clgi
    sti
    mov rax, [rdi + {host_save}]
    vmsave rax

    mov rax, rdi
    mov rcx, [rax + {gprs} + 1*8]
    mov rdx, [rax + {gprs} + 2*8]
    mov rbx, [rax + {gprs} + 3*8]
    mov rbp, [rax + {gprs} + 5*8]
    mov rsi, [rax + {gprs} + 6*8]
    mov rdi, [rax + {gprs} + 7*8]
    mov r8,  [rax + {gprs} + 8*8]
    mov r9,  [rax + {gprs} + 9*8]
    mov r10, [rax + {gprs} + 10*8]
    mov r11, [rax + {gprs} + 11*8]
    mov r12, [rax + {gprs} + 12*8]
    mov r13, [rax + {gprs} + 13*8]
    mov r14, [rax + {gprs} + 14*8]
    mov r15, [rax + {gprs} + 15*8]
    mov rax, [rax + {vmcb}]
    vmload rax
    vmrun rax
    vmsave rax

    mov rax, [rsp]
    mov [rax + {gprs} + 1*8], rcx
    mov [rax + {gprs} + 2*8], rdx
    mov [rax + {gprs} + 3*8], rbx
    mov [rax + {gprs} + 5*8], rbp
    mov [rax + {gprs} + 6*8], rsi
    mov [rax + {gprs} + 7*8], rdi
    mov [rax + {gprs} + 8*8], r8
    mov [rax + {gprs} + 9*8], r9
    mov [rax + {gprs} + 10*8], r10
    mov [rax + {gprs} + 11*8], r11
    mov [rax + {gprs} + 12*8], r12
    mov [rax + {gprs} + 13*8], r13
    mov [rax + {gprs} + 14*8], r14
    mov [rax + {gprs} + 15*8], r15
    mov rdi, rax
    mov rax, [rdi + {host_save}]
    vmload rax
    stgi
    nop
    cli

"#,
    fpu_to_host_asm!(
        r#"
    /* The guest's XCR0 as it is now: XSETBV is not intercepted everywhere (QEMU's
       SVM model lacks that intercept), so read it back instead of trusting our copy.
       Save only components the host area has room for. */
    xor ecx, ecx
    xgetbv
    and eax, dword ptr [rdi + {host_xcr0}]
    mov dword ptr [rdi + {guest_xcr0}], eax
    mov dword ptr [rdi + {guest_xcr0} + 4], 0
"#
    ),
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
    vmcb = const CTX_VMCB,
    host_save = const CTX_HOST_SAVE,
    host_fpu = const CTX_HOST_FPU,
    guest_fpu = const CTX_GUEST_FPU,
    host_xcr0 = const CTX_HOST_XCR0,
    guest_xcr0 = const CTX_GUEST_XCR0,
    use_xsave = const CTX_USE_XSAVE,
);

unsafe extern "C" {
    fn ferrovisor_svm_run(ctx: *mut RunCtx);
}

/// The initial register state of a PVH guest (Xen's `hvm_start_info` convention).
pub struct PvhEntry {
    /// 32-bit physical entry point.
    pub entry: u32,
    /// Guest-physical address of `hvm_start_info`, passed in ebx.
    pub start_info: u64,
}

/// One virtual CPU on SVM.
pub struct SvmVcpu {
    vmcb: Box<Vmcb>,
    _iopm: Box<[Page; 3]>,
    _msrpm: Box<[Page; 2]>,
    guest_fpu: Box<FpuArea>,
    ctx: RunCtx,
    fpu: FpuMode,
    host_save_pa: u64,
    host_fpu_pa: u64,
    nrips: bool,
    next_rip: Option<u64>,
    guest_xcr0: u64,
}

impl SvmVcpu {
    /// A vCPU that enters `entry` in 32-bit protected mode with paging off, flat
    /// segments and `ebx` = the start info, as Xen starts a PVH guest; nested paging
    /// through the table at `ncr3`.
    pub fn new_pvh(cpu: &SvmCpu, asid: u32, ncr3: u64, entry: &PvhEntry) -> SvmVcpu {
        let mut vmcb = Box::new(Vmcb([0; 4096]));
        // Intercept every port and every MSR: guests get only what is emulated.
        let iopm = Box::new([Page([0xff; 4096]), Page([0xff; 4096]), Page([0xff; 4096])]);
        let msrpm = Box::new([Page([0xff; 4096]), Page([0xff; 4096])]);

        let v = &mut *vmcb;
        v.w32(off::INTERCEPT_CR, 0);
        v.w32(off::INTERCEPT_EXC, 0);
        v.w32(
            off::INTERCEPT_MISC1,
            misc1::INTR
                | misc1::NMI
                | misc1::SMI
                | misc1::INIT
                | misc1::CPUID
                | misc1::INVD
                | misc1::HLT
                | misc1::IOIO
                | misc1::MSR
                | misc1::SHUTDOWN,
        );
        v.w32(
            off::INTERCEPT_MISC2,
            misc2::VMRUN
                | misc2::VMMCALL
                | misc2::VMLOAD
                | misc2::VMSAVE
                | misc2::STGI
                | misc2::CLGI
                | misc2::SKINIT
                | misc2::XSETBV,
        );
        v.w64(off::IOPM_BASE, pa_of(&*iopm));
        v.w64(off::MSRPM_BASE, pa_of(&*msrpm));
        v.w64(off::TSC_OFFSET, 0);
        v.w32(off::ASID, asid);
        v.0[off::TLB_CONTROL] = 1; // flush everything on the first entry
        v.w64(off::NP_ENABLE, 1);
        v.w64(off::VINTR, VINTR_MASKING);
        v.w64(off::N_CR3, ncr3);

        // Flat 32-bit protected mode, as Xen's PVH start: CS 32-bit code, data segments
        // read/write, TR a busy 32-bit TSS, LDTR unusable.
        let code32 = 0x0c9b; // G, D, P, S, type 0xb
        let data32 = 0x0c93;
        v.set_segment(off::CS, 0x08, code32, 0xffff_ffff, 0);
        for o in [off::DS, off::ES, off::SS, off::FS, off::GS] {
            v.set_segment(o, 0x10, data32, 0xffff_ffff, 0);
        }
        v.set_segment(off::TR, 0x18, 0x008b, 0x67, 0);
        v.set_segment(off::LDTR, 0, 0x0082, 0, 0);
        v.set_segment(off::GDTR, 0, 0, 0, 0);
        v.set_segment(off::IDTR, 0, 0, 0, 0);
        v.0[off::CPL] = 0;
        v.w64(off::EFER, efer::SVME);
        v.w64(off::CR0, 0x11); // PE | ET
        v.w64(off::CR3, 0);
        v.w64(off::CR4, 0);
        v.w64(off::DR6, 0xffff_0ff0);
        v.w64(off::DR7, 0x400);
        v.w64(off::RFLAGS, 0x2);
        v.w64(off::RIP, u64::from(entry.entry));
        v.w64(off::RSP, 0);
        v.w64(off::RAX, 0);
        v.w64(off::G_PAT, 0x0007_0406_0007_0406);

        let mut ctx = RunCtx::default();
        ctx.gprs[crate::vcpu::reg::RBX] = entry.start_info;
        let guest_fpu = Box::new(FpuArea::new());
        SvmVcpu {
            vmcb,
            _iopm: iopm,
            _msrpm: msrpm,
            guest_fpu,
            ctx,
            fpu: cpu.fpu,
            host_save_pa: pa_of(&*cpu.host_save),
            host_fpu_pa: pa_of(&*cpu.host_fpu),
            nrips: cpu.features.nrips,
            next_rip: None,
            guest_xcr0: 1,
        }
    }

    /// Makes this vCPU run on the physical CPU whose state is `cpu` from its next
    /// entry: VMRUN saves the host there and the world switch swaps the host's hidden
    /// state and FPU through that CPU's areas. Call before every time slice (a vCPU
    /// moves between physical CPUs).
    pub fn load_on(&mut self, cpu: &SvmCpu) {
        self.host_save_pa = pa_of(&*cpu.host_save);
        self.host_fpu_pa = pa_of(&*cpu.host_fpu);
    }

    /// Raw exit information for diagnostics: (exit code, exitinfo1, exitinfo2).
    pub fn exit_info(&self) -> (u64, u64, u64) {
        (
            self.vmcb.r64(off::EXITCODE),
            self.vmcb.r64(off::EXITINFO1),
            self.vmcb.r64(off::EXITINFO2),
        )
    }

    fn decode_exit(&mut self) -> Exit {
        let v = &*self.vmcb;
        let exitcode = v.r64(off::EXITCODE);
        let info1 = v.r64(off::EXITINFO1);
        let info2 = v.r64(off::EXITINFO2);
        self.next_rip = if self.nrips {
            Some(v.r64(off::NRIP))
        } else {
            None
        };
        if exitcode & 0xffff_ffff == code::INVALID {
            return Exit::InvalidState(exitcode);
        }
        match exitcode {
            code::VMMCALL => Exit::Hypercall,
            code::CPUID => Exit::Cpuid,
            code::HLT => Exit::Hlt,
            code::XSETBV => Exit::Xsetbv,
            code::SHUTDOWN => Exit::TripleFault,
            code::INTR => Exit::ExternalInterrupt,
            code::MSR => Exit::Msr {
                write: info1 & 1 != 0,
            },
            code::IOIO => {
                // The hardware always reports the next RIP of an IOIO exit in EXITINFO2.
                self.next_rip = Some(info2);
                Exit::Io(IoExit {
                    port: (info1 >> 16) as u16,
                    size: if info1 & (1 << 4) != 0 {
                        1
                    } else if info1 & (1 << 5) != 0 {
                        2
                    } else {
                        4
                    },
                    input: info1 & 1 != 0,
                    string: info1 & (1 << 2) != 0,
                    rep: info1 & (1 << 3) != 0,
                    next_rip: Some(info2),
                })
            }
            code::NPF => Exit::NestedPageFault {
                gpa: info2,
                present: info1 & 1 != 0,
                write: info1 & 2 != 0,
                fetch: info1 & (1 << 4) != 0,
            },
            other => Exit::Unhandled(other),
        }
    }
}

impl GuestCpu for SvmVcpu {
    fn run(&mut self) -> Exit {
        self.ctx.vmcb_pa = pa_of(&*self.vmcb);
        self.ctx.host_save_pa = self.host_save_pa;
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
        // SAFETY: ctx points at a live RunCtx whose VMCB, host save area and FPU areas
        // are owned by this vCPU and its SvmCpu (heap memory, identity-mapped, aligned
        // as VMRUN/XSAVE require); SVM was enabled on this CPU by `enable`.
        unsafe { ferrovisor_svm_run(&mut self.ctx) };
        if let FpuMode::Xsave { .. } = self.fpu {
            self.guest_xcr0 = self.ctx.guest_xcr0;
        }
        self.vmcb.0[off::TLB_CONTROL] = 0;
        self.vmcb.w64(off::EVENTINJ, 0);
        self.decode_exit()
    }

    fn reg(&self, r: usize) -> u64 {
        match r {
            0 => self.vmcb.r64(off::RAX),
            4 => self.vmcb.r64(off::RSP),
            _ => self.ctx.gprs[r & 15],
        }
    }

    fn set_reg(&mut self, r: usize, v: u64) {
        match r {
            0 => self.vmcb.w64(off::RAX, v),
            4 => self.vmcb.w64(off::RSP, v),
            _ => self.ctx.gprs[r & 15] = v,
        }
    }

    fn rip(&self) -> u64 {
        self.vmcb.r64(off::RIP)
    }

    fn set_rip(&mut self, v: u64) {
        self.vmcb.w64(off::RIP, v);
    }

    fn rflags(&self) -> u64 {
        self.vmcb.r64(off::RFLAGS)
    }

    fn paging(&self) -> GuestPaging {
        GuestPaging {
            cr0: self.vmcb.r64(off::CR0),
            cr3: self.vmcb.r64(off::CR3),
            cr4: self.vmcb.r64(off::CR4),
            efer: self.vmcb.r64(off::EFER),
        }
    }

    fn cpl(&self) -> u8 {
        self.vmcb.0[off::CPL]
    }

    fn code_segment(&self) -> (CodeMode, u64) {
        let attrib = self.vmcb.segment_attrib(off::CS);
        let base = self.vmcb.r64(off::CS + 8);
        let long = attrib & (1 << 9) != 0; // L
        let db = attrib & (1 << 10) != 0; // D/B
        let lma = self.vmcb.r64(off::EFER) & efer::LMA != 0;
        let pe = self.vmcb.r64(off::CR0) & 1 != 0;
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
        let mut ev = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(ec) = error_code {
            ev |= (1 << 11) | (u64::from(ec) << 32);
        }
        self.vmcb.w64(off::EVENTINJ, ev);
    }

    fn read_arch_msr(&self, m: u32) -> Option<u64> {
        let v = &self.vmcb;
        Some(match m {
            msr::EFER => v.r64(off::EFER) & !efer::SVME,
            msr::STAR => v.r64(off::STAR),
            msr::LSTAR => v.r64(off::LSTAR),
            msr::CSTAR => v.r64(off::CSTAR),
            msr::SFMASK => v.r64(off::SFMASK),
            msr::KERNEL_GS_BASE => v.r64(off::KERNEL_GS_BASE),
            msr::FS_BASE => v.r64(off::FS + 8),
            msr::GS_BASE => v.r64(off::GS + 8),
            msr::SYSENTER_CS => v.r64(off::SYSENTER_CS),
            msr::SYSENTER_ESP => v.r64(off::SYSENTER_ESP),
            msr::SYSENTER_EIP => v.r64(off::SYSENTER_EIP),
            msr::PAT => v.r64(off::G_PAT),
            _ => return None,
        })
    }

    fn write_arch_msr(&mut self, m: u32, val: u64) -> Result<bool, InvalidMsrValue> {
        let canonical = |x: u64| ((x as i64) << 16 >> 16) as u64 == x;
        let v = &mut self.vmcb;
        match m {
            msr::EFER => {
                let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE | efer::FFXSR;
                if val & !allowed != 0 {
                    return Err(InvalidMsrValue);
                }
                // LMA is read-only: keep the hardware's view; SVME stays set for VMRUN.
                let lma = v.r64(off::EFER) & efer::LMA;
                v.w64(off::EFER, (val & !efer::LMA) | lma | efer::SVME);
            }
            msr::STAR => v.w64(off::STAR, val),
            msr::LSTAR | msr::CSTAR | msr::KERNEL_GS_BASE | msr::FS_BASE | msr::GS_BASE
                if !canonical(val) =>
            {
                return Err(InvalidMsrValue)
            }
            msr::LSTAR => v.w64(off::LSTAR, val),
            msr::CSTAR => v.w64(off::CSTAR, val),
            msr::SFMASK => v.w64(off::SFMASK, val & 0xffff_ffff),
            msr::KERNEL_GS_BASE => v.w64(off::KERNEL_GS_BASE, val),
            msr::FS_BASE => v.w64(off::FS + 8, val),
            msr::GS_BASE => v.w64(off::GS + 8, val),
            msr::SYSENTER_CS => v.w64(off::SYSENTER_CS, val & 0xffff),
            msr::SYSENTER_ESP => v.w64(off::SYSENTER_ESP, val),
            msr::SYSENTER_EIP => v.w64(off::SYSENTER_EIP, val),
            msr::PAT => {
                // each byte must be a valid memory type (0, 1, 4, 5, 6, 7)
                if (0..8).any(|i| matches!((val >> (i * 8)) & 0xff, 2 | 3 | 8..)) {
                    return Err(InvalidMsrValue);
                }
                v.w64(off::G_PAT, val);
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
        let v = self.vmcb.r64(off::VINTR) & !(VIRQ_BITS | (0xff << 32));
        self.vmcb
            .w64(off::VINTR, v | VIRQ_BITS | (u64::from(vector) << 32));
    }

    fn interrupt_pending(&self) -> bool {
        self.vmcb.r64(off::VINTR) & (1 << 8) != 0
    }

    fn reset_real_mode(&mut self, vector: u8) {
        let v = &mut self.vmcb;
        let base = u64::from(vector) << 12;
        v.set_segment(off::CS, u16::from(vector) << 8, 0x009b, 0xffff, base);
        for o in [off::DS, off::ES, off::SS, off::FS, off::GS] {
            v.set_segment(o, 0, 0x0093, 0xffff, 0);
        }
        v.set_segment(off::TR, 0, 0x008b, 0xffff, 0);
        v.set_segment(off::LDTR, 0, 0x0082, 0xffff, 0);
        v.set_segment(off::GDTR, 0, 0, 0xffff, 0);
        v.set_segment(off::IDTR, 0, 0, 0xffff, 0);
        v.0[off::CPL] = 0;
        v.w64(off::EFER, efer::SVME);
        v.w64(off::CR0, 0x10);
        v.w64(off::CR3, 0);
        v.w64(off::CR4, 0);
        v.w64(off::RFLAGS, 0x2);
        v.w64(off::RIP, 0);
        v.w64(off::RSP, 0);
        v.w64(off::RAX, 0);
        v.w64(off::EVENTINJ, 0);
        let vintr = v.r64(off::VINTR) & !(VIRQ_BITS | (0xff << 32));
        v.w64(off::VINTR, vintr);
        v.0[off::TLB_CONTROL] = 1;
        self.ctx.gprs = [0; 16];
        self.guest_xcr0 = 1;
        *self.guest_fpu = FpuArea::new();
    }

    fn flush_tlb(&mut self) {
        self.vmcb.0[off::TLB_CONTROL] = 1;
    }

    fn hypercall_instruction(&self) -> [u8; 3] {
        [0x0f, 0x01, 0xd9] // vmmcall
    }
}

impl SvmVcpu {
    /// The pending-event field left by an exit that interrupted delivery (diagnostics).
    pub fn exit_int_info(&self) -> u64 {
        self.vmcb.r64(off::EXITINTINFO)
    }

    /// Guest CR2 (diagnostics).
    pub fn cr2(&self) -> u64 {
        self.vmcb.r64(off::CR2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raw_cpuid::{CpuId, CpuIdResult};

    /// A CPU answering CPUID from a table: (leaf -> eax, ebx, ecx, edx).
    fn cpu(svm: bool, npt: bool, nrips: bool) -> CpuId<impl raw_cpuid::CpuIdReader> {
        CpuId::with_cpuid_reader(move |leaf: u32, _sub: u32| {
            let r = |eax, ebx, ecx, edx| CpuIdResult { eax, ebx, ecx, edx };
            match leaf {
                0 => r(0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65), // AuthenticAMD
                0x8000_0000 => r(0x8000_000a, 0, 0, 0),
                0x8000_0001 => r(0, 0, if svm { 1 << 2 } else { 0 }, 0),
                0x8000_000a => r(1, 16, 0, u32::from(npt) | (u32::from(nrips) << 3)),
                _ => r(0, 0, 0, 0),
            }
        })
    }

    #[test]
    fn no_svm_bit_means_no_svm() {
        assert_eq!(
            detect_with(&cpu(false, true, true), || 0).unwrap_err(),
            SvmError::NoSvm
        );
    }

    #[test]
    fn svm_without_npt_is_refused() {
        assert_eq!(
            detect_with(&cpu(true, false, false), || 0).unwrap_err(),
            SvmError::NoNpt
        );
    }

    #[test]
    fn firmware_lock_is_reported() {
        assert_eq!(
            detect_with(&cpu(true, true, false), || 1 << 4).unwrap_err(),
            SvmError::DisabledByFirmware
        );
    }

    #[test]
    fn full_svm_reports_features() {
        let f = detect_with(&cpu(true, true, true), || 0).unwrap();
        assert!(f.npt && f.nrips);
        assert_eq!(f.asids, 16);
        assert!(!detect_with(&cpu(true, true, false), || 0).unwrap().nrips);
    }
}
