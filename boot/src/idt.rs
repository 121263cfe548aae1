//! CPU exceptions in the hypervisor itself: a GDT with a TSS (each vector gets an IST
//! stack, since precompiled `core` may use the red zone), an IDT whose stubs save every
//! register, and a handler that prints a report and stops the machine cleanly.
//!
//! Host interrupts stay disabled; physical interrupts during guest execution come back
//! as exits, so only exceptions (hypervisor bugs) arrive here, plus the APIC timer and
//! the kick IPI while a CPU idles (their handlers only acknowledge them).
//!
//! Every CPU has its own GDT and TSS (a TSS is marked busy by the CPU that loads it)
//! with its own IST stacks; all share the one IDT, whose gates name IST slots that each
//! CPU's TSS fills with its own stacks.

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

core::arch::global_asm!(
    r#"
    .macro ISR_NOERR n
isr_\n:
    push 0
    push \n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_\n:
    push \n
    jmp isr_common
    .endm

    .text
    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31

isr_common:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call {handler}
1:
    cli
    hlt
    jmp 1b

    .global ferrovisor_irq_timer
ferrovisor_irq_timer:
    push rax
    mov rax, [rip + FERROVISOR_LAPIC_EOI]
    mov dword ptr [rax], 0
    pop rax
    iretq

    .global ferrovisor_irq_spurious
ferrovisor_irq_spurious:
    iretq

    .section .rodata
    .p2align 3
    .global ferrovisor_isr_table
ferrovisor_isr_table:
    .quad isr_0
    .quad isr_1
    .quad isr_2
    .quad isr_3
    .quad isr_4
    .quad isr_5
    .quad isr_6
    .quad isr_7
    .quad isr_8
    .quad isr_9
    .quad isr_10
    .quad isr_11
    .quad isr_12
    .quad isr_13
    .quad isr_14
    .quad isr_15
    .quad isr_16
    .quad isr_17
    .quad isr_18
    .quad isr_19
    .quad isr_20
    .quad isr_21
    .quad isr_22
    .quad isr_23
    .quad isr_24
    .quad isr_25
    .quad isr_26
    .quad isr_27
    .quad isr_28
    .quad isr_29
    .quad isr_30
    .quad isr_31
    "#,
    handler = sym exception_handler,
);

unsafe extern "C" {
    static ferrovisor_isr_table: [u64; 32];
    fn ferrovisor_irq_timer();
    fn ferrovisor_irq_spurious();
}

/// The stack frame the stubs build (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

extern "C" fn exception_handler(f: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    // no allocation here: the heap's lock may be held by the code that faulted
    struct OnCpu(Option<u32>);
    impl core::fmt::Display for OnCpu {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Some(id) => write!(f, " on the CPU with APIC id {id}"),
                None => Ok(()),
            }
        }
    }
    let apic = OnCpu(hypervisor::arch::lapic::id());
    crate::console::force_write_fmt(format_args!(
        "EXCEPTION: {name} (vector {}) in the hypervisor, error code {:#x}{apic}\n\
         EXCEPTION: rip {:#018x} cs {:#x} rflags {:#x} rsp {:#018x} cr2 {:#018x}\n\
         EXCEPTION: rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\n\
         EXCEPTION: r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}\n",
        f.vector, f.error_code, f.rip, f.cs, f.rflags, f.rsp, cr2, f.rax, f.rbx, f.rcx, f.rdx, f.rsi,
        f.rdi, f.rbp, f.r8, f.r9, f.r10, f.r11, f.r12, f.r13, f.r14, f.r15
    ));
    crate::platform::exit(crate::platform::ExitCode::Crash)
}

const IST_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_SIZE]);

static mut EXC_STACK: Stack = Stack([0; IST_SIZE]);
static mut DF_STACK: Stack = Stack([0; IST_SIZE]);
static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<(GlobalDescriptorTable, [SegmentSelector; 3])> = spin::Once::new();
static IDT: spin::Once<[[u64; 2]; 256]> = spin::Once::new();
static mut IRQ_STACK: Stack = Stack([0; IST_SIZE]);

/// A TSS whose three IST slots (exceptions, double fault/NMI/machine check,
/// interrupts) point at the tops of `stacks`.
fn tss_with(stacks: [u64; 3]) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    for (i, base) in stacks.into_iter().enumerate() {
        tss.interrupt_stack_table[i] = VirtAddr::new(base + IST_SIZE as u64);
    }
    tss
}

/// A GDT with the flat 64-bit code and data segments and `tss`.
fn gdt_with(tss: &'static TaskStateSegment) -> (GlobalDescriptorTable, [SegmentSelector; 3]) {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    (gdt, [code, data, tss_sel])
}

/// Loads the GDT (code, data, TSS) and the IDT. Call once, on the boot CPU.
pub fn init() {
    let tss = TSS.call_once(|| {
        tss_with([
            (&raw const EXC_STACK) as u64,
            (&raw const DF_STACK) as u64,
            (&raw const IRQ_STACK) as u64,
        ])
    });
    let (gdt, [code, data, tss_sel]) = GDT.call_once(|| gdt_with(tss));
    let idt = IDT.call_once(|| {
        let gate = |addr: u64, ist: u64| {
            [
                (addr & 0xffff)
                    | (u64::from(code.0) << 16)
                    | (ist << 32)
                    | (0x8e << 40)
                    | (((addr >> 16) & 0xffff) << 48),
                addr >> 32,
            ]
        };
        let mut idt = [[0u64; 2]; 256];
        for (v, slot) in idt.iter_mut().take(32).enumerate() {
            // SAFETY: the table is immutable data emitted by the asm above.
            let addr = unsafe { ferrovisor_isr_table[v] };
            *slot = gate(addr, if v == 8 || v == 2 || v == 18 { 2 } else { 1 });
        }
        let timer = hypervisor::arch::lapic::TIMER_VECTOR as usize;
        idt[timer] = gate(ferrovisor_irq_timer as *const () as u64, 3);
        // the kick IPI needs nothing but its acknowledgement, as the timer
        let kick = hypervisor::arch::lapic::KICK_VECTOR as usize;
        idt[kick] = gate(ferrovisor_irq_timer as *const () as u64, 3);
        let spurious = hypervisor::arch::lapic::SPURIOUS_VECTOR as usize;
        idt[spurious] = gate(ferrovisor_irq_spurious as *const () as u64, 3);
        idt
    });
    load(gdt, [*code, *data, *tss_sel], idt);
}

/// Gives a secondary CPU its own GDT and TSS, with IST stacks from the heap, and
/// loads the shared IDT. Call once on each secondary CPU, after [`init`] ran.
pub fn init_ap() {
    let stacks = [(); 3].map(|()| {
        let s: &'static mut Stack =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(Stack([0; IST_SIZE])));
        s as *mut Stack as u64
    });
    let tss: &'static TaskStateSegment =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(tss_with(stacks)));
    let (gdt, sels) = gdt_with(tss);
    let gdt: &'static GlobalDescriptorTable = alloc::boxed::Box::leak(alloc::boxed::Box::new(gdt));
    let idt = IDT
        .get()
        .expect("the boot CPU builds the IDT before starting others");
    load(gdt, sels, idt);
}

fn load(
    gdt: &'static GlobalDescriptorTable,
    [code, data, tss_sel]: [SegmentSelector; 3],
    idt: &'static [[u64; 2]; 256],
) {
    let ptr = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<[[u64; 2]; 256]>() - 1) as u16,
        base: VirtAddr::new(idt.as_ptr() as u64),
    };
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are the flat
    // 64-bit code/data segments and a TSS that lives forever; the IDT entries point at
    // the stubs above with valid IST indexes.
    unsafe {
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss_sel);
        x86_64::instructions::tables::lidt(&ptr);
    }
}
