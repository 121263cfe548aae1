//! The project's test interface (see `abi::ferro`): a test guest reports what it
//! observed and the hypervisor compares it with what it did, logging a verdict.

use alloc::format;
use alloc::string::String;

use abi::errno::{self, ret};
use abi::ferro::{self, Check};

use crate::arch::x86::msr;
use crate::domain::DomainCore;
use crate::vcpu::GuestCpu;

/// The fewest hostile hypercalls a `test=hostile` guest must have made.
pub const HOSTILE_MIN_CASES: u64 = 10;

/// Handles a report: `args[0]` = check id, `args[1]`, `args[2]` = observed values.
/// Returns 0 for PASS, 1 for FAIL, `-EINVAL` for an unknown check.
pub fn report(d: &mut DomainCore, cpu: &dyn GuestCpu, args: [u64; 5]) -> u64 {
    if args[0] == ferro::QUERY_RESTARTS {
        return u64::from(d.restarts);
    }
    let Some(check) = Check::from_id(args[0]) else {
        log::warn!("d{}: test report for unknown check {}", d.id, args[0]);
        return ret(errno::EINVAL);
    };
    let (v, v2) = (args[1], args[2]);
    let (pass, detail) = verdict(d, cpu, check, v, v2);
    d.flush_console_if_pending();
    if pass {
        d.counters.checks_passed += 1;
        log::info!("d{} check {}: PASS ({detail})", d.id, check.name());
        0
    } else {
        d.counters.checks_failed += 1;
        log::error!("d{} check {}: FAIL ({detail})", d.id, check.name());
        1
    }
}

fn verdict(d: &DomainCore, cpu: &dyn GuestCpu, check: Check, v: u64, v2: u64) -> (bool, String) {
    let c = &d.counters;
    match check {
        Check::Hypercall => {
            let want = u64::from((abi::XEN_VERSION_MAJOR << 16) | abi::XEN_VERSION_MINOR);
            (
                v == want,
                format!("xen_version returned {v:#x}, expected {want:#x}"),
            )
        }
        Check::CpuidSignature => {
            let [a, b, cc] = abi::XEN_CPUID_SIGNATURE;
            let ok = v == (u64::from(a) | (u64::from(b) << 32)) && v2 == u64::from(cc);
            let mut sig = [0u8; 12];
            sig[..8].copy_from_slice(&v.to_le_bytes());
            sig[8..].copy_from_slice(&(v2 as u32).to_le_bytes());
            let s: String = sig
                .iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
                .collect();
            (ok, format!("guest saw \"{s}\""))
        }
        Check::CpuidFeatures => {
            let ok = v & (1 << 31) != 0 && v2 & (1 << 2) == 0;
            (ok, format!("leaf 1 ecx {v:#x} (hypervisor bit set: {}), leaf 0x80000001 ecx {v2:#x} (SVM hidden: {})",
                v & (1 << 31) != 0, v2 & 4 == 0))
        }
        Check::IoOut => (
            v > 0 && v == c.debug_port_bytes,
            format!(
                "guest wrote {v} bytes to port 0xe9, hypervisor received {}",
                c.debug_port_bytes
            ),
        ),
        Check::IoIn => (
            v == 0xffff_ffff && v2 == 0xff && c.unclaimed_port_reads >= 2,
            format!(
                "inl {v:#x}, inb {v2:#x}, {} port reads emulated",
                c.unclaimed_port_reads
            ),
        ),
        Check::Msr => {
            let held = cpu.read_arch_msr(msr::SYSENTER_ESP).unwrap_or(0);
            (
                v == ferro::MSR_TEST_VALUE && held == v,
                format!("guest read back {v:#x}, VMCB holds {held:#x}"),
            )
        }
        Check::MsrGp => (
            v == 13 && c.last_gp_msr == Some(ferro::MSR_UNKNOWN),
            format!(
                "guest took vector {v}, hypervisor last injected #GP for MSR {}",
                c.last_gp_msr
                    .map_or(String::from("none"), |m| format!("{m:#x}"))
            ),
        ),
        Check::NpfRead => (
            v == 0xffff_ffff && c.unbacked_reads >= 1,
            format!(
                "read {v:#x} from unbacked gpa {:#x}, {} reads emulated",
                ferro::UNBACKED_GPA,
                c.unbacked_reads
            ),
        ),
        Check::NpfWrite => (
            v == 0xffff_ffff && c.unbacked_writes >= 1,
            format!(
                "read {v:#x} after a write, {} writes dropped",
                c.unbacked_writes
            ),
        ),
        Check::MemoryWrite => memory_write(d, v, v2),
        Check::DmaNic => {
            // The hypervisor's own evidence: the unit reported the NIC's writes to the
            // unmapped grant address and to the never-mapped one.
            let faults = crate::devices::faults_of(d.id);
            let at = |a: u64| faults.iter().any(|f| f.write && f.addr == a);
            let (g, n) = (at(ferro::DMA_GRANT_GPA), at(ferro::DMA_NEVER_MAPPED_GPA));
            (
                v == 0 && v2 >= 5 && g && n,
                format!(
                    "{v} of {v2} steps failed; DMA write faults seen at the unmapped grant address: {g}, at the never-mapped address: {n} ({} faults in all)",
                    faults.len()
                ),
            )
        }
        Check::PeerA | Check::PeerB | Check::DmaGranter => (
            v == 0 && v2 >= 5,
            format!("{v} of {v2} steps failed"),
        ),
        Check::Xenstore => {
            let want = ferro::fnv1a64(d.config.name.as_bytes());
            (
                v == want && v2 == 1,
                format!(
                    "guest read its name with FNV-1a {v:#x} (expected {want:#x}); wrote and read back data/ferro: {}",
                    v2 == 1
                ),
            )
        }
        Check::Restarts => (
            v >= 2 && u64::from(d.restarts) == v,
            format!("guest saw {v} restarts, the hypervisor made {}", d.restarts),
        ),
        Check::Hostile => (
            v == 0 && v2 >= HOSTILE_MIN_CASES,
            format!("{v} of {v2} hostile hypercalls got something other than Xen's error code"),
        ),
        Check::Ramdisk => match d.ramdisk {
            Some((gpa, len, sum)) => (
                v == sum && v2 == len,
                format!(
                    "guest read {v2} bytes with FNV-1a {v:#x}; loaded {len} bytes at {gpa:#x} with {sum:#x}"
                ),
            ),
            None => (false, String::from("the domain has no ramdisk")),
        },
    }
}

/// Reads the pattern back through the domain's NESTED page tables (not the guest's),
/// i.e. what the hardware mapped for that guest-physical address.
fn memory_write(d: &DomainCore, gpa: u64, len: u64) -> (bool, String) {
    if len != ferro::MEMORY_PATTERN_LEN || !gpa.is_multiple_of(4096) {
        return (false, format!("bad report: gpa {gpa:#x} len {len}"));
    }
    let Some((hpa, _perms, _size)) = d.npt.translate(&crate::arch::phys::HostPhysMem, gpa) else {
        return (
            false,
            format!("gpa {gpa:#x} is not mapped by the nested page tables"),
        );
    };
    if d.mem.translate(gpa).map(|(h, _)| h) != Some(hpa) {
        return (
            false,
            format!("nested tables map {gpa:#x} to {hpa:#x}, not to the domain's memory"),
        );
    }
    // The nested tables map gpa to exactly the frame the domain's memory holds there
    // (checked above), so reading the domain's memory reads what the guest wrote.
    let mut buf = [0u8; 4096];
    if !d.mem.read(gpa, &mut buf) {
        return (
            false,
            format!("gpa {gpa:#x} is outside the domain's memory"),
        );
    }
    let bad = (0..len)
        .filter(|&i| buf[i as usize] != ferro::memory_pattern(i))
        .count();
    (
        bad == 0,
        format!(
            "gpa {gpa:#x} -> hpa {hpa:#x}: {} of {len} bytes match the pattern",
            len as usize - bad
        ),
    )
}
