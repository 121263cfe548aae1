//! The vendor-neutral vCPU interface: what generic exit handling (hypercalls, CPUID,
//! I/O, MSRs, nested page faults) sees of a virtual CPU, whichever backend runs it.

use crate::guest_walk::GuestPaging;

/// General-purpose register numbers in the x86 encoding order.
pub mod reg {
    /// rax
    pub const RAX: usize = 0;
    /// rcx
    pub const RCX: usize = 1;
    /// rdx
    pub const RDX: usize = 2;
    /// rbx
    pub const RBX: usize = 3;
    /// rsp
    pub const RSP: usize = 4;
    /// rbp
    pub const RBP: usize = 5;
    /// rsi
    pub const RSI: usize = 6;
    /// rdi
    pub const RDI: usize = 7;
    /// r8
    pub const R8: usize = 8;
    /// r10
    pub const R10: usize = 10;
}

/// Why the guest stopped running, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// VMMCALL/VMCALL: a hypercall (number in rax).
    Hypercall,
    /// CPUID (leaf in eax, subleaf in ecx).
    Cpuid,
    /// Port I/O.
    Io(IoExit),
    /// RDMSR (`write == false`) or WRMSR; MSR number in ecx.
    Msr {
        /// WRMSR
        write: bool,
    },
    /// An access to a guest-physical address the nested page tables do not map (or map
    /// with fewer rights).
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
        /// The access was an instruction fetch.
        fetch: bool,
        /// A translation existed (a permission fault rather than a missing page).
        present: bool,
    },
    /// HLT.
    Hlt,
    /// XSETBV.
    Xsetbv,
    /// The guest hit a shutdown condition (triple fault).
    TripleFault,
    /// A physical interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// The hardware refused to enter the guest (invalid guest state).
    InvalidState(u64),
    /// An exit the hypervisor does not handle (raw backend code).
    Unhandled(u64),
}

/// A port I/O exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    /// Port number.
    pub port: u16,
    /// Access size in bytes (1, 2 or 4).
    pub size: u8,
    /// IN (true) or OUT.
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// Address of the next instruction, when the hardware reports it.
    pub next_rip: Option<u64>,
}

/// The operating mode of the guest's code segment, for instruction decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    /// Real mode or 16-bit protected mode.
    Bits16,
    /// 32-bit protected mode (or compatibility mode).
    Bits32,
    /// 64-bit mode.
    Bits64,
}

impl CodeMode {
    /// Width in bits.
    pub fn bits(self) -> u32 {
        match self {
            CodeMode::Bits16 => 16,
            CodeMode::Bits32 => 32,
            CodeMode::Bits64 => 64,
        }
    }
}

/// A value an MSR does not accept: the guest gets #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidMsrValue;

/// A virtual CPU as generic code sees it.
pub trait GuestCpu {
    /// Enters the guest and runs it until the next exit.
    fn run(&mut self) -> Exit;
    /// General-purpose register `r` (see [`reg`]).
    fn reg(&self, r: usize) -> u64;
    /// Sets general-purpose register `r`.
    fn set_reg(&mut self, r: usize, v: u64);
    /// Instruction pointer.
    fn rip(&self) -> u64;
    /// Sets the instruction pointer.
    fn set_rip(&mut self, v: u64);
    /// RFLAGS.
    fn rflags(&self) -> u64;
    /// The guest's paging controls, for guest page walks.
    fn paging(&self) -> GuestPaging;
    /// Current privilege level.
    fn cpl(&self) -> u8;
    /// Code-segment mode and base, for fetching and decoding the current instruction.
    fn code_segment(&self) -> (CodeMode, u64);
    /// The next instruction's address if the hardware reported it for this exit.
    fn next_rip(&self) -> Option<u64>;
    /// Queues exception `vector` for delivery at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Reads an MSR whose state the backend keeps (segment bases, syscall MSRs, PAT,
    /// EFER, ...); `None` when the backend does not hold it.
    fn read_arch_msr(&self, msr: u32) -> Option<u64>;
    /// Writes such an MSR; `Err(())` when the value is invalid (#GP); `Ok(false)` when
    /// the backend does not hold it.
    fn write_arch_msr(&mut self, msr: u32, v: u64) -> Result<bool, InvalidMsrValue>;
    /// The guest's XCR0.
    fn xcr0(&self) -> u64;
    /// Sets the guest's XCR0 (already validated).
    fn set_xcr0(&mut self, v: u64);
    /// Requests delivery of external interrupt `vector` as soon as the guest's IF
    /// allows (replacing one not yet delivered).
    fn inject_interrupt(&mut self, vector: u8);
    /// An interrupt requested with [`Self::inject_interrupt`] is still undelivered.
    fn interrupt_pending(&self) -> bool;
    /// Resets the vCPU to the state a start-up IPI leaves: real mode at
    /// `vector << 12`, as a secondary CPU begins.
    fn reset_real_mode(&mut self, vector: u8);
    /// Flushes the guest's TLB at the next entry (after nested page table changes).
    fn flush_tlb(&mut self);
    /// The hypercall instruction of this vendor (VMMCALL or VMCALL), for hypercall pages.
    fn hypercall_instruction(&self) -> [u8; 3];
}
