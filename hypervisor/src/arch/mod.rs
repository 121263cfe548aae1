//! Hardware access: the only part of the hypervisor crate with `unsafe`.
//!
//! `x86` wraps the privileged instructions the rest needs, `phys` reads and writes
//! physical memory through the identity map the image keeps, `svm` and `vmx` are the
//! AMD and Intel backends of the [`crate::vcpu::GuestCpu`] interface, and `cpu` holds
//! the types that hide which one boot chose.
/// World-switch assembly shared by the SVM and VMX entry code, with `rdi` pointing at
/// the run context (named operands `use_xsave`, `host_xcr0`, `guest_xcr0`, `host_fpu`,
/// `guest_fpu`): saves the host's FPU state and loads the guest's. With XSAVE both
/// move under the host's XCR0 and mask (XSAVE saves only what XCR0 enables, and a
/// guest still at XCR0 = 1 has live SSE state too); the guest's XCR0 goes in last.
/// Without XSAVE, FXSAVE/FXRSTOR. Uses local labels 1 and 2; clobbers rax, rcx, rdx, r8.
macro_rules! fpu_to_guest_asm {
    () => {
        r#"
    cmp qword ptr [rdi + {use_xsave}], 0
    je 1f
    mov eax, dword ptr [rdi + {host_xcr0}]
    mov edx, dword ptr [rdi + {host_xcr0} + 4]
    mov r8, [rdi + {host_fpu}]
    xsave64 [r8]
    mov eax, dword ptr [rdi + {host_xcr0}]
    mov edx, dword ptr [rdi + {host_xcr0} + 4]
    mov r8, [rdi + {guest_fpu}]
    xrstor64 [r8]
    mov eax, dword ptr [rdi + {guest_xcr0}]
    mov edx, dword ptr [rdi + {guest_xcr0} + 4]
    xor ecx, ecx
    xsetbv
    jmp 2f
1:
    mov r8, [rdi + {host_fpu}]
    fxsave64 [r8]
    mov r8, [rdi + {guest_fpu}]
    fxrstor64 [r8]
2:
"#
    };
}

/// The way back after an exit (same operands as [`fpu_to_guest_asm`]): the host's
/// XCR0 goes in first, then the guest's state is saved and the host's loaded.
/// `$guest_xcr0` runs first on the XSAVE path (the SVM backend reads the guest's XCR0
/// back there). Uses local labels 8 and 9; clobbers rax, rcx, rdx, r8.
macro_rules! fpu_to_host_asm {
    ($guest_xcr0:literal) => {
        concat!(
            r#"
    cmp qword ptr [rdi + {use_xsave}], 0
    je 8f
"#,
            $guest_xcr0,
            r#"
    mov eax, dword ptr [rdi + {host_xcr0}]
    mov edx, dword ptr [rdi + {host_xcr0} + 4]
    xor ecx, ecx
    xsetbv
    mov eax, dword ptr [rdi + {host_xcr0}]
    mov edx, dword ptr [rdi + {host_xcr0} + 4]
    mov r8, [rdi + {guest_fpu}]
    xsave64 [r8]
    mov eax, dword ptr [rdi + {host_xcr0}]
    mov edx, dword ptr [rdi + {host_xcr0} + 4]
    mov r8, [rdi + {host_fpu}]
    xrstor64 [r8]
    jmp 9f
8:
    mov r8, [rdi + {guest_fpu}]
    fxsave64 [r8]
    mov r8, [rdi + {host_fpu}]
    fxrstor64 [r8]
9:
"#
        )
    };
}

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
