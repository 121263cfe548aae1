//! Starting the secondary CPUs (APs) the MADT lists: INIT, then start-up IPIs into a
//! real-mode trampoline copied to a free page below 1 MiB, which goes through 32-bit
//! protected mode into long mode on the boot CPU's page tables and calls [`ap_entry`]
//! on a stack of its own. There each CPU gets its GDT/TSS with IST stacks, the shared
//! IDT, its local APIC and SVM (its own host save areas), then joins the scheduler.
//!
//! APs are started one at a time: one parameter block in the trampoline page serves
//! them all. An AP claims the block with a locked bit-test-and-set before touching
//! anything else, so a late AP (one that answered after its timeout) cannot share the
//! stack of the next one; it halts instead, and [`ap_entry`] also refuses to run with
//! an APIC id other than the one the block was written for.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use hypervisor::arch::{lapic, svm, x86};

use crate::bootinfo::BootInfo;

/// Stack of each secondary CPU (the boot CPU's is 64 KiB).
const AP_STACK_SIZE: u64 = 128 * 1024;
/// How long the boot CPU waits for an AP to report in after its start-up IPIs.
const AP_TIMEOUT_MS: u64 = 1000;

// Offsets in the trampoline page (the asm below places its data with `.org`).
const OFF_GDTR: u64 = 0x220;
const OFF_PM32_PTR: u64 = 0x228;
const OFF_LM64_PTR: u64 = 0x230;
const OFF_CR3: u64 = 0x238;
const OFF_EFER: u64 = 0x23c;
const OFF_STACK: u64 = 0x240;
const OFF_ENTRY: u64 = 0x248;
const OFF_ARG: u64 = 0x250;
const OFF_CLAIM: u64 = 0x258;
const TRAMPOLINE_LEN: u64 = 0x260;

core::arch::global_asm!(
    r#"
    .section .text.ap_trampoline, "ax"
    .p2align 4
    .global ferrovisor_ap_trampoline
ferrovisor_ap_trampoline:
    .code16
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    /* claim the parameter block; a second CPU arriving here halts */
    lock btsl $0, 0x258
    jc 9f
    /* ebx = the page's linear address, kept through the mode switches */
    movzwl %ax, %ebx
    shll $4, %ebx
    lgdtl 0x220
    mov %cr0, %eax
    orl $1, %eax
    mov %eax, %cr0
    ljmpl *0x228
9:
    cli
    hlt
    jmp 9b

    .code32
    .global ferrovisor_ap_pm32
ferrovisor_ap_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    /* CR4: PAE, OSFXSR, OSXMMEXCPT, as the boot CPU's entry */
    mov %cr4, %eax
    orl $0x620, %eax
    mov %eax, %cr4
    mov 0x238(%ebx), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    orl 0x23c(%ebx), %eax
    wrmsr
    /* CR0: PG, PE, MP; clear EM and TS */
    mov %cr0, %eax
    andl $0xfffffff3, %eax
    orl $0x80000003, %eax
    mov %eax, %cr0
    ljmpl *0x230(%ebx)

    .code64
    .global ferrovisor_ap_lm64
ferrovisor_ap_lm64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov %ebx, %ebx
    mov 0x240(%rbx), %rsp
    mov 0x250(%rbx), %rdi
    mov 0x248(%rbx), %rax
    xor %ebp, %ebp
    call *%rax
8:
    cli
    hlt
    jmp 8b

    /* the temporary GDT: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18) */
    .org 0x200
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
    .org 0x220
    .word 31
    .long 0            /* GDT base: patched */
    .org 0x228
    .long 0            /* -> ferrovisor_ap_pm32: patched */
    .word 0x08
    .org 0x230
    .long 0            /* -> ferrovisor_ap_lm64: patched */
    .word 0x18
    .org 0x238
    .long 0            /* CR3 */
    .long 0            /* EFER bits to set */
    .quad 0            /* stack top */
    .quad 0            /* entry */
    .quad 0            /* argument */
    .long 0            /* claim */
    .long 0
    .global ferrovisor_ap_trampoline_end
ferrovisor_ap_trampoline_end:
    .text
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static ferrovisor_ap_trampoline: u8;
    static ferrovisor_ap_pm32: u8;
    static ferrovisor_ap_lm64: u8;
    static ferrovisor_ap_trampoline_end: u8;
}

/// The virtualisation extension the boot CPU enabled, which every AP enables too.
#[derive(Clone, Copy, Debug)]
pub enum Virt {
    /// AMD SVM with these features.
    Svm(svm::SvmFeatures),
    /// Intel VMX with these features.
    Vmx(hypervisor::arch::vmx::VmxFeatures),
}

/// What a secondary CPU needs from the boot CPU.
struct Shared {
    virt: Virt,
}

static SHARED: spin::Once<Shared> = spin::Once::new();
/// Set by the AP being started once it is up; cleared by the boot CPU before each start.
static ANSWERED: AtomicBool = AtomicBool::new(false);
/// The APIC id the parameter block is currently written for.
static EXPECTED_APIC: AtomicU32 = AtomicU32::new(u32::MAX);

/// A page below 1 MiB for the trampoline: RAM in the loader's map, clear of the boot
/// information, the command line and the modules (the frame allocator never hands out
/// the low 1 MiB, so it stays ours).
fn trampoline_page(bi: &BootInfo) -> Option<u64> {
    let busy = |a: u64, b: u64| {
        let (s, e) = bi.cmdline;
        let mut ranges = [(0u64, 0u64); 2 + crate::bootinfo::MAX_MODULES];
        ranges[0] = bi.info_range;
        ranges[1] = (s, s + e + 1);
        for (i, m) in bi.modules().iter().enumerate() {
            ranges[2 + i] = (m.start, m.start + m.len);
        }
        ranges.iter().any(|r| r.0 < b && a < r.1)
    };
    (1..0x9f)
        .map(|p: u64| p << 12)
        .filter(|&pa| pa != 0x7000) // leave the classic boot-sector page alone
        .find(|&pa| {
            let end = pa + 4096;
            bi.regions().iter().any(|r| {
                r.kind == abi::start_info::MEMMAP_TYPE_RAM && r.start <= pa && end <= r.end
            }) && !busy(pa, end)
        })
}

fn delay_us(us: u64) {
    let t0 = x86::rdtsc();
    let ticks = crate::time::tsc_per_ms() * us / 1000;
    while x86::rdtsc().wrapping_sub(t0) < ticks {
        core::hint::spin_loop();
    }
}

/// Starts every CPU of `apic_ids` other than this one, up to `max_cpus` CPUs in all;
/// each turns on virtualisation with `enable_virt` (call once per CPU, interrupts
/// off). Returns the CPUs that run now, this one first: (index, APIC id). An AP that
/// does not answer within [`AP_TIMEOUT_MS`] is reported and left out.
pub fn start_aps(
    bi: &BootInfo,
    apic_ids: &[u32],
    max_cpus: usize,
    virt: Virt,
) -> alloc::vec::Vec<(usize, u32)> {
    let bsp = lapic::id().unwrap_or(0);
    let mut up = alloc::vec![(0usize, bsp)];
    hypervisor::smp::register(0, bsp);
    let (bottom, size) = crate::entry::boot_stack();
    let rsp: u64;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    // SAFETY: the boot stack; what lies more than 4 KiB below the current stack
    // pointer is unused now.
    unsafe {
        hypervisor::arch::stack::register(0, bottom, size, (rsp - 4096).saturating_sub(bottom))
    };
    let others: alloc::vec::Vec<u32> = apic_ids.iter().copied().filter(|&a| a != bsp).collect();
    if others.is_empty() {
        return up;
    }
    if matches!(virt, Virt::Vmx(_)) {
        log::info!(
            "VMX: guests run on the boot CPU only; the other {} CPU(s) stay halted (moving a vCPU's VMCS between CPUs is not implemented)",
            others.len()
        );
        return up;
    }
    let limit = max_cpus.min(hypervisor::smp::MAX_CPUS);
    if limit <= 1 {
        log::info!(
            "maxcpus={max_cpus}: not starting the other {} CPU(s) the MADT lists",
            others.len()
        );
        return up;
    }
    let Some(page) = trampoline_page(bi) else {
        log::warn!(
            "no free RAM page below 1 MiB for the AP trampoline: running on the boot CPU only"
        );
        return up;
    };
    let cr3 = x86::cr3() & !0xfff;
    if cr3 >= 1 << 32 {
        log::warn!("the page tables lie above 4 GiB ({cr3:#x}): APs cannot load them in 32-bit mode; running on the boot CPU only");
        return up;
    }
    SHARED.call_once(|| Shared { virt });
    // SAFETY: reading EFER has no side effects.
    let efer_bits = unsafe { x86::rdmsr(x86::msr::EFER) } & (x86::efer::LME | x86::efer::NXE);
    let base = (&raw const ferrovisor_ap_trampoline) as u64;
    let len = (&raw const ferrovisor_ap_trampoline_end) as u64 - base;
    assert_eq!(len, TRAMPOLINE_LEN, "AP trampoline layout");
    let pm32 = (&raw const ferrovisor_ap_pm32) as u64 - base;
    let lm64 = (&raw const ferrovisor_ap_lm64) as u64 - base;
    // SAFETY: the trampoline's bytes are part of the image; `page` is a free RAM page
    // below 1 MiB that nothing else uses (see `trampoline_page`).
    unsafe {
        let code = core::slice::from_raw_parts(base as *const u8, len as usize);
        hypervisor::arch::phys::write(page, code);
    }
    let put32 = |off: u64, v: u32| {
        // SAFETY: inside the trampoline page copied above; no AP runs it yet (or the
        // previous one has claimed and left it).
        unsafe { hypervisor::arch::phys::write(page + off, &v.to_le_bytes()) }
    };
    let put64 = |off: u64, v: u64| {
        // SAFETY: as above.
        unsafe { hypervisor::arch::phys::write(page + off, &v.to_le_bytes()) }
    };
    put32(OFF_GDTR + 2, (page + 0x200) as u32);
    put32(OFF_PM32_PTR, (page + pm32) as u32);
    put32(OFF_LM64_PTR, (page + lm64) as u32);
    put32(OFF_CR3, cr3 as u32);
    put32(OFF_EFER, efer_bits as u32);
    put64(OFF_ENTRY, ap_entry as *const () as u64);

    for apic in others {
        let index = up.len();
        if index >= limit {
            log::info!("maxcpus={max_cpus}: APIC id {apic} not started");
            continue;
        }
        let Some(stack) = hypervisor::frames::alloc(AP_STACK_SIZE / 4096, 1) else {
            log::warn!("no memory for the stack of the CPU with APIC id {apic}: not started");
            continue;
        };
        ANSWERED.store(false, Ordering::SeqCst);
        EXPECTED_APIC.store(apic, Ordering::SeqCst);
        hypervisor::smp::register(index, apic);
        // SAFETY: the stack's frames were just allocated for this CPU alone; its lowest
        // bytes hold the canary, and it stays allocated for good.
        unsafe { hypervisor::arch::stack::register(index, stack, AP_STACK_SIZE, AP_STACK_SIZE) };
        put64(OFF_STACK, stack + AP_STACK_SIZE);
        put64(OFF_ARG, index as u64);
        put32(OFF_CLAIM, 0);
        core::sync::atomic::fence(Ordering::SeqCst);
        // INIT, 10 ms, start-up IPI, 200 us, a second start-up IPI if the first did not
        // take (the MultiProcessor Specification's sequence).
        lapic::send_init(apic);
        delay_us(10_000);
        lapic::send_startup(apic, (page >> 12) as u8);
        delay_us(200);
        if !ANSWERED.load(Ordering::SeqCst) && claim(page) == 0 {
            lapic::send_startup(apic, (page >> 12) as u8);
        }
        let t0 = crate::time::uptime_ms();
        while !ANSWERED.load(Ordering::SeqCst) && crate::time::uptime_ms() - t0 < AP_TIMEOUT_MS {
            core::hint::spin_loop();
        }
        if ANSWERED.load(Ordering::SeqCst) {
            up.push((index, apic));
        } else {
            hypervisor::smp::unregister(index);
            log::warn!(
                "the CPU with APIC id {apic} did not answer its start-up IPIs within {AP_TIMEOUT_MS} ms ({}): going on without it",
                if claim(page) == 0 { "it never reached the trampoline" } else { "it stopped between the trampoline and long mode" }
            );
            // its stack stays allocated: the CPU might still wake up and use it
        }
    }
    EXPECTED_APIC.store(u32::MAX, Ordering::SeqCst);
    up
}

fn claim(page: u64) -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: reads the claim word in the trampoline page.
    unsafe { hypervisor::arch::phys::read(page + OFF_CLAIM, &mut b) };
    u32::from_le_bytes(b)
}

/// Where each AP arrives in long mode, on its own stack, with `index` its CPU number.
extern "C" fn ap_entry(index: u64) -> ! {
    crate::idt::init_ap();
    let index = index as usize;
    // SAFETY: once on this CPU, interrupts off, after the boot CPU set up its APIC.
    unsafe { lapic::init_ap() };
    let apic = lapic::id().unwrap_or(u32::MAX);
    if apic != EXPECTED_APIC.load(Ordering::SeqCst) {
        log::warn!("a CPU with APIC id {apic} answered late for another CPU's start: halting it");
        x86::halt_forever();
    }
    let shared = SHARED.get().expect("set before any AP starts");
    let cpu = match shared.virt {
        // SAFETY: once on this CPU, interrupts off; the boot CPU's detect() succeeded
        // and every CPU of the machine is of the same model.
        Virt::Svm(f) => hypervisor::arch::cpu::HostCpu::Svm(unsafe { svm::enable(f) }),
        // SAFETY: as above.
        Virt::Vmx(f) => match unsafe { hypervisor::arch::vmx::enable(f) } {
            Ok(c) => hypervisor::arch::cpu::HostCpu::Vmx(c),
            Err(e) => {
                log::warn!("cpu{index} (apic id {apic}): VMX cannot be enabled ({e}): halting it");
                x86::halt_forever();
            }
        },
    };
    log::info!("cpu{index} up (apic id {apic})");
    ANSWERED.store(true, Ordering::SeqCst);
    hypervisor::run::ap_main(index, cpu)
}
