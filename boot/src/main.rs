//! The ferrovisor image: boots through PVH (QEMU `-kernel`) or multiboot2 (GRUB), sets
//! up the machine, and hands the boot bundle's domains to the hypervisor.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi_info;
mod bootinfo;
mod console;
mod entry;
mod idt;
mod memory;
mod platform;
mod rt;
mod smp;
mod time;

use hypervisor::arch::svm::{self, SvmError};
use platform::ExitCode;

/// Prints `FATAL: ...` and stops the machine with the fatal verdict.
macro_rules! fatal {
    ($($t:tt)*) => {{
        crate::console::write_fmt(format_args!("FATAL: {}\n", format_args!($($t)*)));
        crate::platform::exit(ExitCode::Fatal)
    }};
}

/// The APIC id `selftest=absent-cpu` adds to the MADT's list.
const ABSENT_APIC_ID: u32 = 0x7e;

/// Called by the entry code in long mode with the boot protocol's registers.
pub extern "C" fn boot_main(eax: u32, ebx: u32) -> ! {
    console::init();
    idt::init();
    time::init();
    log::info!("ferrovisor {} starting", env!("CARGO_PKG_VERSION"));
    let bi = match bootinfo::parse(eax, ebx) {
        Ok(b) => b,
        Err(e) => fatal!("no boot information I understand ({e}): boot the image with QEMU -kernel (PVH) or GRUB multiboot2"),
    };
    let cmdline = bi.cmdline();
    let mut max_cpus = usize::MAX;
    let mut absent_cpu = false;
    for opt in cmdline.split_ascii_whitespace() {
        if let Some(l) = opt.strip_prefix("loglvl=") {
            console::set_level(l);
        }
        if let Some(n) = opt.strip_prefix("maxcpus=") {
            match n.parse::<usize>() {
                Ok(n) if n >= 1 => max_cpus = n,
                _ => log::warn!(
                    "maxcpus={n}: not a number of CPUs (1 or more): ignored, every CPU is used"
                ),
            }
        }
        if opt == "selftest=absent-cpu" {
            // the start-up sequence is also sent to an APIC id no CPU has, to show
            // what happens when a CPU does not answer
            absent_cpu = true;
        }
        if opt == "selftest=exception" {
            log::warn!("selftest=exception: executing ud2 in the hypervisor on purpose");
            // SAFETY: raises #UD on purpose to exercise the exception report; the
            // handler never returns.
            unsafe { core::arch::asm!("ud2") };
        }
    }
    log::info!(
        "booted by {}, command line \"{cmdline}\", TSC {} kHz",
        bi.protocol,
        time::tsc_per_ms()
    );
    let (top, free) = match memory::init(&bi) {
        Ok(x) => x,
        Err(e) => fatal!("cannot set up memory: {e}"),
    };
    log::info!(
        "RAM up to {:#x}, {} MiB free after the heap ({} MiB)",
        top,
        free >> 20,
        memory::HEAP_SIZE >> 20
    );
    let acpi = acpi_info::discover(bi.rsdp);
    match &acpi {
        Some(a) => log::info!(
            "ACPI: RSDP at {:#x}, {} CPU(s) in the MADT (APIC ids {:?}); DMAR {}; SRAT {}; MCFG {}",
            a.rsdp,
            a.cpus,
            a.apic_ids,
            a.dmar
                .map_or("absent".into(), |x| alloc::format!("at {x:#x}")),
            a.srat
                .map_or("absent".into(), |x| alloc::format!("at {x:#x}")),
            a.mcfg
                .map_or("absent".into(), |x| alloc::format!("at {x:#x}"))
        ),
        None => log::warn!("continuing without ACPI"),
    }

    mask_legacy_pic();
    hypervisor::time::init(time::tsc_per_ms());
    entry::mark_uncached(0xfee0_0000);
    // SAFETY: once, on the boot CPU, interrupts off; the APIC page is identity-mapped
    // and was just made uncacheable.
    let apic_khz = unsafe { hypervisor::arch::lapic::init(time::tsc_per_ms()) };
    log::info!("local APIC timer: {apic_khz} kHz");

    let features = match svm::detect() {
        Ok(f) => f,
        Err(SvmError::NoSvm) => {
            let vendor = hypervisor::arch::x86::cpuid(0, 0);
            if vendor[1] == 0x756e_6547 {
                fatal!("this CPU has no AMD SVM: it is an Intel CPU and the VMX backend is not built yet; under QEMU TCG use -cpu max or -cpu qemu64,+svm,+npt")
            }
            fatal!("this CPU has no AMD SVM (secure virtual machine): under QEMU TCG use -cpu max or -cpu qemu64,+svm,+npt; on hardware enable SVM in the firmware")
        }
        Err(SvmError::DisabledByFirmware) => fatal!("this CPU has AMD SVM but the firmware disabled it (VM_CR.SVMDIS): enable \"SVM mode\" in the firmware setup"),
        Err(SvmError::NoNpt) => fatal!("this CPU has SVM but no nested paging (NPT), which ferrovisor requires: under QEMU TCG add +npt (-cpu qemu64,+svm,+npt) or use -cpu max"),
    };
    SVM_FEATURES.call_once(|| features);
    // SAFETY: once, on the boot CPU, interrupts off, after detect() succeeded.
    let cpu = unsafe { enable_svm() };
    log::info!(
        "SVM enabled: nested paging, {} ASIDs, next-RIP {}, FPU switch {:?}",
        features.asids,
        if features.nrips {
            "reported"
        } else {
            "decoded by the hypervisor"
        },
        cpu.fpu
    );

    let mut apic_ids = acpi.map(|a| a.apic_ids).unwrap_or_default();
    if absent_cpu {
        log::warn!("selftest=absent-cpu: also starting APIC id {ABSENT_APIC_ID}, which no CPU has");
        apic_ids.push(ABSENT_APIC_ID);
    }
    let cpus = smp::start_aps(&bi, &apic_ids, max_cpus, enable_svm);
    log::info!(
        "{} physical CPU(s) up: {}",
        cpus.len(),
        cpus.iter()
            .map(|(i, apic)| alloc::format!("cpu{i} (apic id {apic})"))
            .collect::<alloc::vec::Vec<_>>()
            .join(", ")
    );

    let Some(m) = bi.modules().first() else {
        fatal!("no boot module: pass the domain bundle as the first module (QEMU -initrd, GRUB module2); `cargo xtask run` does this")
    };
    // SAFETY: the module lies in RAM the frame allocator keeps reserved for the whole
    // run; nothing writes it while domains are built from it.
    let bundle: &'static [u8] = unsafe { hypervisor::arch::phys::slice(m.start, m.len) };
    match hypervisor::run::run_bundle(bundle, &cpu) {
        Ok(o) => {
            log::info!("all domains finished: {} ok, {} failed", o.ok, o.failed);
            platform::exit(if o.failed == 0 {
                ExitCode::Success
            } else {
                ExitCode::DomainFailed
            })
        }
        Err(msg) => fatal!("{msg}"),
    }
}

/// What `svm::detect` found on the boot CPU.
static SVM_FEATURES: spin::Once<svm::SvmFeatures> = spin::Once::new();

/// Turns SVM on for the calling CPU with the boot CPU's findings.
///
/// # Safety
/// As [`svm::enable`]: once per CPU, interrupts off, after the boot CPU's detection
/// succeeded (every CPU of the machine is of the same model).
unsafe fn enable_svm() -> hypervisor::arch::HostCpu {
    let features = *SVM_FEATURES.get().expect("detected on the boot CPU first");
    // SAFETY: the caller's contract is svm::enable's.
    unsafe { svm::enable(features) }
}

/// Masks every line of the two legacy 8259 PICs. Host interrupts are not used (but the
/// local APIC's timer and kick IPIs): a physical interrupt pending while a guest runs
/// would exit to the hypervisor forever.
fn mask_legacy_pic() {
    // SAFETY: the PIC data ports belong to the hypervisor; masking all lines only stops
    // interrupts nobody handles.
    unsafe {
        hypervisor::arch::x86::outb(0x21, 0xff);
        hypervisor::arch::x86::outb(0xa1, 0xff);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::force_write_fmt(format_args!("PANIC: {info}\n"));
    platform::exit(ExitCode::Crash)
}
