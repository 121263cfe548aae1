//! Ferrovisor's test guest: a tiny PVH kernel that exercises the hypervisor's exit paths
//! and reports what it observed through the test hypercall (`abi::ferro`).
//!
//! Command line: `test=exits` (default) runs the exit-path checks in the order of
//! [`Check::ALL`]; `test=triple-fault` triple-faults on purpose; `test=spin` computes for
//! about a second without exits, then powers off; `test=work count=N` computes N
//! million steps without exits and reports the TSC cycles they took; `test=smp-shutdown`
//! (two vCPUs) powers off while its second vCPU runs. Any other `test=` value
//! is reported and ends the guest with `SHUTDOWN_crash`.
//!
//! Boot: [`boot`] (32-bit PVH entry to long mode). Exceptions: [`idt`]. The instructions
//! used: [`arch`]. C runtime symbols: [`rt`].
#![no_std]
#![no_main]

mod arch;
mod boot;
mod idt;
mod nic;
mod peer;
mod rt;
mod xs;

use core::arch::x86_64::__cpuid;
use core::fmt::Write;
use core::sync::atomic::{compiler_fence, AtomicU64, AtomicU8, Ordering};

use abi::ferro::{self, Check};
use abi::hypercall as hc;
use abi::start_info::{HvmModlistEntry, HvmStartInfo, HVM_START_MAGIC};

/// The page tables map guest-physical 0..4 GiB one to one; nothing above is reachable.
const MAPPED_LIMIT: u64 = 1 << 32;
/// Longest command line read.
const CMDLINE_MAX: u64 = 4096;
/// IA32_SYSENTER_ESP
const MSR_SYSENTER_ESP: u32 = 0x175;

/// End of the first RAM range in the memory map (0 when unknown).
static RAM_END: AtomicU64 = AtomicU64::new(0);

/// Physical address and length of the ramdisk (module 0), 0 when there is none.
static RAMDISK: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));

/// Physical address of the NUL-terminated command line, 0 when there is none.
static CMDLINE_PADDR: AtomicU64 = AtomicU64::new(0);

/// The `memory-write` target: one page in `.bss`, filled with [`ferro::memory_pattern`].
#[repr(C, align(4096))]
struct PatternPage([AtomicU8; ferro::MEMORY_PATTERN_LEN as usize]);

static PATTERN_PAGE: PatternPage =
    PatternPage([const { AtomicU8::new(0) }; ferro::MEMORY_PATTERN_LEN as usize]);

const _: () = assert!(core::mem::size_of::<PatternPage>() == 4096);

/// Entered from `boot` in long mode, identity-mapped, with SSE on.
#[no_mangle]
extern "C" fn main(start_info_paddr: u64) -> ! {
    idt::init();
    match read_start_info(start_info_paddr) {
        Some(info) => {
            CMDLINE_PADDR.store(info.cmdline_paddr, Ordering::SeqCst);
            if info.memmap_entries > 0
                && info.memmap_paddr != 0
                && info.memmap_paddr < MAPPED_LIMIT - 24
            {
                // SAFETY: the first memory-map entry lies in the identity map; plain
                // integers read unaligned.
                let e = unsafe {
                    core::ptr::read_unaligned(
                        info.memmap_paddr as *const abi::start_info::HvmMemmapEntry,
                    )
                };
                RAM_END.store(e.addr.saturating_add(e.size), Ordering::SeqCst);
            }
            if info.nr_modules > 0 {
                if let Some(m) = read_module0(info.modlist_paddr) {
                    RAMDISK.0.store(m.paddr, Ordering::SeqCst);
                    RAMDISK.1.store(m.size, Ordering::SeqCst);
                }
            }
        }
        None => console_write("testguest: no valid hvm_start_info; empty command line\n"),
    }
    match test_option(cmdline()) {
        b"exits" => run_exits(),
        b"triple-fault" => run_triple_fault(),
        b"spin" => run_spin(),
        b"work" => run_work(count_option(cmdline()).unwrap_or(100)),
        b"smp-shutdown" => run_smp_shutdown(),
        b"hostile" => run_hostile(),
        b"reboot-twice" => run_reboot_n(2),
        b"xenstore" => xs::run(),
        b"bench" => run_bench(),
        b"reboot-cycles" => run_reboot_n(count_option(cmdline()).unwrap_or(100)),
        b"peer-a" => peer::run_a(peer_option(cmdline()).unwrap_or(2)),
        b"peer-b" => peer::run_b(peer_option(cmdline()).unwrap_or(1)),
        b"dma-granter" => nic::run_granter(peer_option(cmdline()).unwrap_or(2)),
        b"dma-nic" => nic::run_nic(peer_option(cmdline()).unwrap_or(1)),
        other => {
            console_write("testguest: unknown test '");
            console_write_bytes(other);
            console_write("'\n");
            shutdown(hc::SHUTDOWN_CRASH)
        }
    }
}

/// The `test=exits` sequence: every [`Check`] in order, a summary line, poweroff.
fn run_exits() -> ! {
    let mut tally = Tally::default();
    console_write("testguest: starting exit-path checks\n");

    // SAFETY: XENVER_version takes no pointer argument.
    let version = unsafe { arch::hypercall(hc::XEN_VERSION, hc::XENVER_VERSION, 0, 0) };
    tally.report(Check::Hypercall, version as u64, 0);

    let sig = __cpuid(0x4000_0000);
    tally.report(
        Check::CpuidSignature,
        u64::from(sig.ebx) | u64::from(sig.ecx) << 32,
        u64::from(sig.edx),
    );

    let leaf1 = __cpuid(1).ecx;
    let ext1 = __cpuid(0x8000_0001).ecx;
    tally.report(Check::CpuidFeatures, u64::from(leaf1), u64::from(ext1));

    // Nothing else is written to the debug port before this (on the normal path).
    let hello = b"testguest: hello through port 0xe9\n";
    for &b in hello {
        arch::outb(ferro::DEBUG_PORT, b);
    }
    tally.report(Check::IoOut, hello.len() as u64, 0);

    let wide = arch::inl(ferro::UNCLAIMED_PORT);
    let narrow = arch::inb(ferro::UNCLAIMED_PORT);
    tally.report(Check::IoIn, u64::from(wide), u64::from(narrow));

    // SAFETY: SYSENTER_ESP is only used by `sysenter`, which this guest never executes.
    unsafe { arch::wrmsr(MSR_SYSENTER_ESP, ferro::MSR_TEST_VALUE) };
    let msr = arch::try_rdmsr(MSR_SYSENTER_ESP).unwrap_or(u64::MAX);
    tally.report(Check::Msr, msr, 0);

    let gp = match arch::try_rdmsr(ferro::MSR_UNKNOWN) {
        Ok(_) => u64::MAX,
        Err(vector) => u64::from(vector),
    };
    tally.report(Check::MsrGp, gp, 0);

    // SAFETY: UNBACKED_GPA (3.25 GiB) is inside the identity map and 4-byte aligned; no
    // Rust object lives there (the image ends a few hundred KiB above 1 MiB).
    let before = unsafe { arch::read32(ferro::UNBACKED_GPA) };
    tally.report(Check::NpfRead, u64::from(before), 0);

    // SAFETY: as above.
    let after = unsafe {
        arch::write32(ferro::UNBACKED_GPA, 0);
        arch::read32(ferro::UNBACKED_GPA)
    };
    tally.report(Check::NpfWrite, u64::from(after), 0);

    for (i, byte) in PATTERN_PAGE.0.iter().enumerate() {
        byte.store(ferro::memory_pattern(i as u64), Ordering::Relaxed);
    }
    compiler_fence(Ordering::SeqCst);
    tally.report(
        Check::MemoryWrite,
        PATTERN_PAGE.0.as_ptr() as u64,
        ferro::MEMORY_PATTERN_LEN,
    );

    let (rd_paddr, rd_len) = (
        RAMDISK.0.load(Ordering::SeqCst),
        RAMDISK.1.load(Ordering::SeqCst),
    );
    if rd_paddr != 0
        && rd_paddr
            .checked_add(rd_len)
            .is_some_and(|end| end <= MAPPED_LIMIT)
    {
        // SAFETY: the hypervisor placed the module inside this guest's RAM, below 4 GiB
        // (checked above), so it lies in the identity map; nothing writes it.
        let bytes = unsafe { core::slice::from_raw_parts(rd_paddr as *const u8, rd_len as usize) };
        tally.report(Check::Ramdisk, ferro::fnv1a64(bytes), rd_len);
    }

    let mut line = StackBuf::<96>::new();
    let _ = writeln!(
        line,
        "testguest: {} checks reported, {} failed verdicts",
        tally.reported, tally.failed
    );
    console_write_bytes(line.as_bytes());
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// `test=triple-fault`.
/// The `test=hostile` guest: hypercalls with bad pointers, sub-ops, lengths, ports and
/// vCPUs; each must fail with the error code Xen gives. Prints one line per case and
/// reports the number of mismatches.
fn run_hostile() -> ! {
    const EFAULT: i64 = -14;
    const EINVAL: i64 = -22;
    const ENOENT: i64 = -2;
    const ENOSYS: i64 = -38;
    // A page this guest maps that the hypervisor never backed (4 GiB up is unmapped in
    // the guest's own tables; 0xd0000000 is mapped but not RAM).
    const NON_CANONICAL: u64 = 0xdead_0000_0000_0000;
    const UNMAPPED: u64 = 5 << 30;
    const NOT_RAM: u64 = ferro::UNBACKED_GPA;
    // 96 KiB below the end of RAM: zeroes, then the reserved pages, then nothing; a
    // 4 GiB write there runs through one continuation before it faults.
    let near_end = RAM_END.load(Ordering::SeqCst).saturating_sub(96 * 1024);
    let cases: [(&str, u64, u64, u64, u64, i64); 14] = [
        (
            "console_io write, non-canonical buffer",
            hc::CONSOLE_IO,
            hc::CONSOLEIO_WRITE,
            16,
            NON_CANONICAL,
            EFAULT,
        ),
        (
            "console_io write, unmapped buffer",
            hc::CONSOLE_IO,
            hc::CONSOLEIO_WRITE,
            16,
            UNMAPPED,
            EFAULT,
        ),
        (
            "console_io write, buffer not in RAM",
            hc::CONSOLE_IO,
            hc::CONSOLEIO_WRITE,
            16,
            NOT_RAM,
            EFAULT,
        ),
        (
            "console_io write, 4 GiB length",
            hc::CONSOLE_IO,
            hc::CONSOLEIO_WRITE,
            0xffff_ffff,
            near_end,
            EFAULT,
        ),
        (
            "console_io bad sub-op",
            hc::CONSOLE_IO,
            77,
            1,
            0x10_0000,
            EINVAL,
        ),
        ("xen_version bad sub-op", hc::XEN_VERSION, 99, 0, 0, ENOSYS),
        (
            "xen_version get_features, bad pointer",
            hc::XEN_VERSION,
            hc::XENVER_GET_FEATURES,
            UNMAPPED,
            0,
            EFAULT,
        ),
        ("sched_op bad sub-op", hc::SCHED_OP, 99, 0, 0, ENOSYS),
        (
            "sched_op shutdown, bad pointer",
            hc::SCHED_OP,
            hc::SCHEDOP_SHUTDOWN,
            NON_CANONICAL,
            0,
            EFAULT,
        ),
        (
            "vcpu_op on vCPU 99",
            hc::VCPU_OP,
            hc::VCPUOP_IS_UP,
            99,
            0,
            ENOENT,
        ),
        (
            "hvm_op get_param, bad pointer",
            hc::HVM_OP,
            hc::HVMOP_GET_PARAM,
            UNMAPPED,
            0,
            EFAULT,
        ),
        (
            "memory_op memory_map, bad pointer",
            hc::MEMORY_OP,
            hc::XENMEM_MEMORY_MAP,
            NOT_RAM,
            0,
            EFAULT,
        ),
        ("hypercall 63 (none)", 63, 0, 0, 0, ENOSYS),
        (
            "hypercall 100000 (beyond the table)",
            100_000,
            0,
            0,
            0,
            ENOSYS,
        ),
    ];
    let mut bad = 0u64;
    for (name, nr, a1, a2, a3, want) in cases {
        // SAFETY: every pointer argument is deliberately invalid; the hypervisor must
        // reject it without touching this guest's memory. No valid memory is named.
        let got = unsafe { arch::hypercall(nr, a1, a2, a3) };
        let mut line = StackBuf::<128>::new();
        let verdict = if got == want { "ok" } else { "WRONG" };
        let _ = writeln!(
            line,
            "testguest: hostile: {name}: {got} (Xen: {want}) {verdict}"
        );
        console_write_bytes(line.as_bytes());
        if got != want {
            bad += 1;
        }
    }
    report(Check::Hostile, bad, cases.len() as u64);
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// `count=N`: how many restarts `test=reboot-cycles` asks for.
fn count_option(cmdline: &[u8]) -> Option<i64> {
    let v = cmdline
        .split(|b| b.is_ascii_whitespace())
        .find_map(|word| word.strip_prefix(b"count="))?;
    core::str::from_utf8(v).ok()?.parse().ok()
}

/// The `test=reboot-twice` / `test=reboot-cycles` guest: reboots until the hypervisor
/// has restarted it `want` times (its config says `on_reboot = "restart"`), then
/// reports the count and powers off.
fn run_reboot_n(want: i64) -> ! {
    // SAFETY: the query takes plain values, no pointers.
    let n = unsafe { arch::hypercall(ferro::TEST_HYPERCALL, ferro::QUERY_RESTARTS, 0, 0) };
    let mut line = StackBuf::<64>::new();
    let _ = writeln!(line, "testguest: restarted {n} times");
    console_write_bytes(line.as_bytes());
    if n < want {
        shutdown(hc::SHUTDOWN_REBOOT)
    }
    report(Check::Restarts, n as u64, 0);
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// The `test=bench` guest: times exit round trips with the TSC (guest-side, so it
/// includes the whole world switch): a hypercall (xen_version), CPUID of a hypervisor
/// leaf, and an `in` from an unclaimed port; 2000 of each. Prints TSC cycles per round
/// trip; the hypervisor's log states its TSC frequency to convert them.
fn run_bench() -> ! {
    // `count=N` runs N round trips of each kind (default 2000)
    let n = count_option(cmdline()).map_or(2000, |c| c.max(1) as u64);
    let tsc = || {
        // SAFETY: RDTSC is unprivileged and has no side effects.
        unsafe { core::arch::x86_64::_rdtsc() }
    };
    let time = |name: &str, f: &mut dyn FnMut()| {
        let t0 = tsc();
        for _ in 0..n {
            f();
        }
        let per = (tsc() - t0) / n;
        let mut line = StackBuf::<96>::new();
        let _ = writeln!(
            line,
            "testguest: bench: {name}: {per} TSC cycles per round trip ({n} runs)"
        );
        console_write_bytes(line.as_bytes());
    };
    time("hypercall (xen_version)", &mut || {
        // SAFETY: XENVER_version takes no pointer argument.
        unsafe { arch::hypercall(hc::XEN_VERSION, hc::XENVER_VERSION, 0, 0) };
    });
    time("cpuid 0x40000000", &mut || {
        let _ = __cpuid(0x4000_0000);
    });
    time("port read (unclaimed)", &mut || {
        let _ = arch::inb(ferro::UNCLAIMED_PORT);
    });
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// The `test=spin` guest: computes without a single exit for about 2e9 TSC cycles
/// (about a second here), then powers off. Another domain that finishes first proves
/// the hypervisor preempts a guest that never gives the CPU back.
fn run_spin() -> ! {
    console_write("testguest: spinning without exits\n");
    // SAFETY: RDTSC is unprivileged and has no side effects.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    // SAFETY: as above.
    while unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start) < 2_000_000_000 {
        core::hint::spin_loop();
    }
    console_write("testguest: done spinning\n");
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// The `test=work` guest: a fixed amount of computation without a single exit
/// (`count=N` million steps of a 64-bit LCG, default 100), then the TSC cycles it
/// took, and poweroff. Unlike `test=spin` (which waits for the TSC, a wall clock),
/// it only finishes by getting CPU time: two of them on two physical CPUs each finish
/// in about the time one alone takes, on one CPU in about twice that.
fn run_work(millions: i64) -> ! {
    let steps = millions.max(1) as u64 * 1_000_000;
    console_write("testguest: working\n");
    // SAFETY: RDTSC is unprivileged and has no side effects.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    let mut x: u64 = 1;
    for _ in 0..steps {
        x = core::hint::black_box(
            x.wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407),
        );
    }
    // SAFETY: as above.
    let cycles = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start);
    let mut line = StackBuf::<128>::new();
    let _ = writeln!(
        line,
        "testguest: work done: {millions} M steps in {} M TSC cycles (result {:#x})",
        cycles / 1_000_000,
        x >> 48
    );
    console_write_bytes(line.as_bytes());
    shutdown(hc::SHUTDOWN_POWEROFF)
}

/// Guest-physical page where `test=smp-shutdown` starts vCPU 1 (its SIPI vector).
const SMP_CODE_PAGE: u64 = 0x8000;
/// Where vCPU 1 counts its loop iterations.
const SMP_COUNTER: u64 = 0x100;

/// The `test=smp-shutdown` guest (two vCPUs): starts vCPU 1 with INIT and a start-up
/// IPI into a real-mode loop that counts forever without exits, waits until the count
/// moves (vCPU 1 runs, on another physical CPU when there is one), then powers off
/// while vCPU 1 is still running: the hypervisor must stop it before it destroys the
/// domain.
fn run_smp_shutdown() -> ! {
    // inc dword [0x100]; jmp back (real mode, DS = 0 after the start-up IPI)
    let code: [u8; 7] = [0x66, 0xff, 0x06, 0x00, 0x01, 0xeb, 0xf9];
    // SAFETY: the low pages of guest RAM are identity-mapped and unused by this guest.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), SMP_CODE_PAGE as *mut u8, code.len());
        arch::write32(SMP_COUNTER, 0);
    }
    console_write("testguest: starting vcpu1\n");
    // SAFETY: x2APIC ICR writes (the hypervisor starts the APIC in x2APIC mode): INIT,
    // then a start-up IPI with vector 8 (page 0x8000) to APIC id 1.
    unsafe {
        arch::wrmsr(0x830, (1u64 << 32) | 0x4500);
        arch::wrmsr(0x830, (1u64 << 32) | 0x4600 | (SMP_CODE_PAGE >> 12));
    }
    // SAFETY: RDTSC is unprivileged and has no side effects.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    let mut seen = 0;
    loop {
        // SAFETY: reads the counter vCPU 1 writes (identity-mapped guest RAM).
        let n = unsafe { arch::read32(SMP_COUNTER) };
        if n > 1_000_000 {
            seen = n;
            break;
        }
        // SAFETY: as above.
        if unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start) > 20_000_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    let mut line = StackBuf::<96>::new();
    if seen > 0 {
        let _ = writeln!(line, "testguest: vcpu1 is counting ({seen}): powering off");
    } else {
        let _ = writeln!(line, "testguest: vcpu1 never counted: powering off");
    }
    console_write_bytes(line.as_bytes());
    shutdown(hc::SHUTDOWN_POWEROFF)
}

fn run_triple_fault() -> ! {
    console_write("testguest: about to triple fault\n");
    arch::triple_fault()
}

/// Counts reports and non-PASS verdicts.
#[derive(Default)]
struct Tally {
    reported: u32,
    failed: u32,
}

impl Tally {
    fn report(&mut self, check: Check, value: u64, value2: u64) -> i64 {
        let verdict = report(check, value, value2);
        self.reported += 1;
        if verdict != 0 {
            self.failed += 1;
        }
        verdict
    }
}

/// Reports one observation: 0 = PASS, 1 = FAIL, negative errno otherwise.
fn report(check: Check, value: u64, value2: u64) -> i64 {
    // SAFETY: the test hypercall takes plain values, no pointers.
    unsafe { arch::hypercall(ferro::TEST_HYPERCALL, check as u64, value, value2) }
}

/// Writes text to the hypervisor console (`CONSOLEIO_write`).
fn console_write(s: &str) {
    console_write_bytes(s.as_bytes());
}

fn console_write_bytes(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: the hypervisor reads `len` bytes at the pointer, which `bytes` covers; the
    // guest is identity-mapped, so the virtual address is also the physical one.
    unsafe {
        arch::hypercall(
            hc::CONSOLE_IO,
            hc::CONSOLEIO_WRITE,
            bytes.len() as u64,
            bytes.as_ptr() as u64,
        )
    };
}

/// `SCHEDOP_shutdown`; if the hypervisor returns, halts with interrupts off.
fn shutdown(reason: u32) -> ! {
    let arg: u32 = reason;
    // SAFETY: SCHEDOP_shutdown reads one `u32` (`struct sched_shutdown`) at the pointer,
    // and `arg` lives across the call.
    unsafe {
        arch::hypercall(
            hc::SCHED_OP,
            hc::SCHEDOP_SHUTDOWN,
            &arg as *const u32 as u64,
            0,
        )
    };
    arch::halt_forever()
}

/// The start info at `paddr`, if it is mapped and carries the PVH magic.
fn read_start_info(paddr: u64) -> Option<HvmStartInfo> {
    let size = core::mem::size_of::<HvmStartInfo>() as u64;
    if paddr == 0 || paddr >= MAPPED_LIMIT - size {
        return None;
    }
    // SAFETY: the address is non-null and the whole struct lies in the identity map; the
    // struct is plain integers (any bit pattern valid), read without alignment demands.
    let info = unsafe { core::ptr::read_unaligned(paddr as *const HvmStartInfo) };
    (info.magic == HVM_START_MAGIC).then_some(info)
}

/// Module 0 (the ramdisk) from the start info's module list.
fn read_module0(modlist_paddr: u64) -> Option<HvmModlistEntry> {
    let size = core::mem::size_of::<HvmModlistEntry>() as u64;
    if modlist_paddr == 0 || modlist_paddr >= MAPPED_LIMIT - size {
        return None;
    }
    // SAFETY: non-null, inside the identity map; plain integers, read unaligned.
    Some(unsafe { core::ptr::read_unaligned(modlist_paddr as *const HvmModlistEntry) })
}

/// The command line (without its NUL), empty when there is none.
fn cmdline() -> &'static [u8] {
    let paddr = CMDLINE_PADDR.load(Ordering::SeqCst);
    if paddr == 0 || paddr >= MAPPED_LIMIT - CMDLINE_MAX {
        return &[];
    }
    let mut len = 0;
    while len < CMDLINE_MAX {
        // SAFETY: paddr + len < 4 GiB lies in the identity map and is non-null.
        let b = unsafe { core::ptr::read_volatile((paddr + len) as *const u8) };
        if b == 0 {
            break;
        }
        len += 1;
    }
    // SAFETY: the `len` bytes were just read through the identity map; the loader hands
    // the command line over for good and nothing in this guest writes it.
    unsafe { core::slice::from_raw_parts(paddr as *const u8, len as usize) }
}

/// The value of the first `test=` option, `exits` without one.
/// `peer=N`: the other domain of the peer tests.
fn peer_option(cmdline: &[u8]) -> Option<u16> {
    let v = cmdline
        .split(|b| b.is_ascii_whitespace())
        .find_map(|word| word.strip_prefix(b"peer="))?;
    core::str::from_utf8(v).ok()?.parse().ok()
}

fn test_option(cmdline: &[u8]) -> &[u8] {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .find_map(|word| word.strip_prefix(b"test="))
        .unwrap_or(b"exits")
}

/// A fixed-size text buffer; output beyond its capacity is dropped.
struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let take = s.len().min(N - self.len);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(idt::DebugPort, "testguest: panic: {info}");
    shutdown(hc::SHUTDOWN_CRASH)
}
