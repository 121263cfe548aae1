//! Domains: a guest's memory, nested page tables, vCPUs, console and counters, built
//! from an xl.cfg description and the boot bundle.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::start_info::{
    HvmMemmapEntry, HvmModlistEntry, HvmStartInfo, HVM_START_MAGIC, MEMMAP_TYPE_RAM,
};

use crate::arch::phys::HostPhysMem;
use crate::arch::svm::{PvhEntry, SvmCpu, SvmVcpu};
use crate::config::DomainConfig;
use crate::loader;
use crate::memory::{GuestMemory, CHUNK};
use crate::paging::{Npt, PageSize, PageTable, Perms};

/// Counters kept per domain.
#[derive(Default, Debug)]
pub struct Counters {
    /// Exits by kind: hypercall, cpuid, io, msr, npf, hlt, xsetbv, intr, other.
    pub exits: [u64; 9],
    /// Hypercalls by number.
    pub hypercalls: alloc::collections::BTreeMap<u64, u64>,
    /// Bytes written to the debug port.
    pub debug_port_bytes: u64,
    /// Reads from ports nothing decodes.
    pub unclaimed_port_reads: u64,
    /// Emulated reads/writes of unbacked guest-physical memory.
    pub unbacked_reads: u64,
    /// See `unbacked_reads`.
    pub unbacked_writes: u64,
    /// #GP injected for an MSR access (last MSR number).
    pub msr_gp_injected: u64,
    /// Last MSR that got a #GP.
    pub last_gp_msr: Option<u32>,
    /// Test checks passed / failed.
    pub checks_passed: u32,
    /// See `checks_passed`.
    pub checks_failed: u32,
}

/// How a domain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainEnd {
    /// SCHEDOP_shutdown (or a halt with interrupts off, which Xen treats as poweroff).
    Shutdown(u32),
    /// The domain was stopped for a fault; the text says what happened.
    Crashed(String),
}

/// Everything of a domain except its vCPUs (so exit handlers can borrow both).
pub struct DomainCore {
    /// Domain id.
    pub id: u16,
    /// Its configuration.
    pub config: DomainConfig,
    /// Guest RAM.
    pub mem: GuestMemory,
    /// Nested page tables mirroring `mem`.
    pub npt: PageTable<Npt>,
    /// Counters.
    pub counters: Counters,
    /// The ramdisk as loaded: (guest-physical address, length, FNV-1a of its bytes).
    pub ramdisk: Option<(u64, u64, u64)>,
    /// Partial console line (flushed at newline).
    console: Vec<u8>,
    /// Things already logged once (unknown hypercalls, MSRs, ports).
    logged: BTreeSet<(u8, u64)>,
}

/// A domain.
pub struct Domain {
    /// Memory, tables, counters.
    pub core: DomainCore,
    /// Virtual CPUs (vCPU 0 runs first; secondary vCPUs wait for the guest to start them).
    pub vcpus: Vec<Box<SvmVcpu>>,
}

/// Why a domain could not be built. Printed after "domain '<name>': ".
#[derive(Debug)]
pub enum BuildError {
    /// A file the config names is not in the boot bundle.
    MissingFile { what: &'static str, path: String },
    /// The kernel is not a loadable PVH image.
    Kernel {
        path: String,
        error: loader::LoadError,
    },
    /// Not enough memory.
    OutOfMemory { wanted: u64, free: u64 },
    /// The ramdisk or boot information does not fit in the domain's memory.
    TooSmall {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// Nested page tables could not be built.
    Paging(String),
}

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BuildError::MissingFile { what, path } => {
                write!(f, "{what} '{path}' is not in the boot bundle")
            }
            BuildError::Kernel { path, error } => write!(f, "kernel '{path}' {error}"),
            BuildError::OutOfMemory { wanted, free } => write!(
                f,
                "needs {} MiB but only {} MiB are free: lower `memory` or give the machine more",
                wanted >> 20,
                free >> 20
            ),
            BuildError::TooSmall { what, need, have } => write!(
                f,
                "{what} needs memory up to {need:#x} but the domain has {} MiB: raise `memory`",
                have >> 20
            ),
            BuildError::Paging(e) => write!(f, "nested page tables: {e}"),
        }
    }
}

fn page_up(x: u64) -> u64 {
    x.next_multiple_of(4096)
}

impl Domain {
    /// Builds a domain from `config`, taking files from the boot `bundle`: allocates
    /// memory, loads the PVH kernel (and ramdisk), writes `hvm_start_info`, builds the
    /// nested page tables and vCPU 0 at the kernel's PVH entry.
    pub fn build(
        id: u16,
        config: DomainConfig,
        bundle: &[u8],
        cpu: &SvmCpu,
    ) -> Result<Domain, BuildError> {
        let find = |what: &'static str, path: &str| match crate::bundle::find(bundle, path) {
            Ok(Some(d)) => Ok(d),
            _ => Err(BuildError::MissingFile {
                what,
                path: path.into(),
            }),
        };
        let kernel = find("kernel", &config.kernel)?;
        let kerr = |error| BuildError::Kernel {
            path: config.kernel.clone(),
            error,
        };
        let plan = loader::parse_pvh(kernel).map_err(kerr)?;
        let size = config.memory_mib << 20;
        let mut mem = GuestMemory::allocate(size).map_err(|e| BuildError::OutOfMemory {
            wanted: e.wanted,
            free: e.free,
        })?;
        loader::load(&plan, kernel, &mut mem, size).map_err(kerr)?;

        // Boot information goes in the pages after the kernel (and ramdisk): the
        // module list, start_info, memory map and command line, all below 1 GiB.
        let mut next = page_up(plan.end);
        let mut modules = Vec::new();
        let mut ramdisk = None;
        if let Some(path) = &config.ramdisk {
            let rd = find("ramdisk", path)?;
            let end = next + rd.len() as u64;
            if end > size || !mem.write(next, rd) {
                return Err(BuildError::TooSmall {
                    what: "ramdisk",
                    need: end,
                    have: size,
                });
            }
            ramdisk = Some((next, rd.len() as u64, abi::ferro::fnv1a64(rd)));
            modules.push(HvmModlistEntry {
                paddr: next,
                size: rd.len() as u64,
                cmdline_paddr: 0,
                reserved: 0,
            });
            next = page_up(end);
        }
        let info_gpa = next;
        let memmap = [HvmMemmapEntry {
            addr: 0,
            size,
            type_: MEMMAP_TYPE_RAM,
            reserved: 0,
        }];
        let modlist_gpa = info_gpa + 64;
        let memmap_gpa = modlist_gpa + 32 * modules.len() as u64;
        let cmdline_gpa = memmap_gpa + 24 * memmap.len() as u64;
        let cmdline = config.cmdline.as_bytes();
        let info_end = cmdline_gpa + cmdline.len() as u64 + 1;
        if info_end > size.min(1 << 30) {
            return Err(BuildError::TooSmall {
                what: "boot information",
                need: info_end,
                have: size,
            });
        }
        let info = HvmStartInfo {
            magic: HVM_START_MAGIC,
            version: 1,
            flags: 0,
            nr_modules: modules.len() as u32,
            modlist_paddr: if modules.is_empty() { 0 } else { modlist_gpa },
            cmdline_paddr: cmdline_gpa,
            rsdp_paddr: 0,
            memmap_paddr: memmap_gpa,
            memmap_entries: memmap.len() as u32,
            reserved: 0,
        };
        let mut blob = Vec::new();
        blob.extend_from_slice(&struct_bytes_start_info(&info));
        blob.resize(64, 0);
        for m in &modules {
            for v in [m.paddr, m.size, m.cmdline_paddr, m.reserved] {
                blob.extend_from_slice(&v.to_le_bytes());
            }
        }
        for e in &memmap {
            blob.extend_from_slice(&e.addr.to_le_bytes());
            blob.extend_from_slice(&e.size.to_le_bytes());
            blob.extend_from_slice(&e.type_.to_le_bytes());
            blob.extend_from_slice(&e.reserved.to_le_bytes());
        }
        blob.extend_from_slice(cmdline);
        blob.push(0);
        if !mem.write(info_gpa, &blob) {
            return Err(BuildError::TooSmall {
                what: "boot information",
                need: info_end,
                have: size,
            });
        }

        let mut pm = HostPhysMem;
        let mut npt =
            PageTable::<Npt>::new(&mut pm, 4).map_err(|e| BuildError::Paging(format!("{e}")))?;
        let rwx = Perms {
            read: true,
            write: true,
            exec: true,
            user: true,
        };
        for e in mem.extents() {
            let max = if e.gpa % CHUNK == 0 && e.hpa % CHUNK == 0 {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            npt.map_range(&mut pm, e.gpa, e.hpa, e.len, rwx, max)
                .map_err(|e| BuildError::Paging(format!("{e}")))?;
        }

        let entry = PvhEntry {
            entry: plan.entry,
            start_info: info_gpa,
        };
        let vcpus = (0..config.vcpus.max(1))
            .map(|i| {
                Box::new(SvmVcpu::new_pvh(
                    cpu,
                    u32::from(id) * 256 + i + 1,
                    npt.root(),
                    &entry,
                ))
            })
            .collect();
        log::info!(
            "d{id} ({}): {} MiB, {} vCPU(s), kernel '{}' entry {:#x}, start_info at {:#x}, cmdline \"{}\"",
            config.name,
            config.memory_mib,
            config.vcpus,
            config.kernel,
            plan.entry,
            info_gpa,
            config.cmdline
        );
        Ok(Domain {
            core: DomainCore {
                id,
                config,
                mem,
                npt,
                counters: Counters::default(),
                ramdisk,
                console: Vec::new(),
                logged: BTreeSet::new(),
            },
            vcpus,
        })
    }

    /// Releases the domain's memory and page tables.
    pub fn destroy(self) {
        let Domain { core, vcpus } = self;
        drop(vcpus);
        core.npt.destroy(&mut HostPhysMem);
        drop(core.mem);
    }
}

fn struct_bytes_start_info(i: &HvmStartInfo) -> [u8; 56] {
    let mut b = [0u8; 56];
    b[0..4].copy_from_slice(&i.magic.to_le_bytes());
    b[4..8].copy_from_slice(&i.version.to_le_bytes());
    b[8..12].copy_from_slice(&i.flags.to_le_bytes());
    b[12..16].copy_from_slice(&i.nr_modules.to_le_bytes());
    b[16..24].copy_from_slice(&i.modlist_paddr.to_le_bytes());
    b[24..32].copy_from_slice(&i.cmdline_paddr.to_le_bytes());
    b[32..40].copy_from_slice(&i.rsdp_paddr.to_le_bytes());
    b[40..48].copy_from_slice(&i.memmap_paddr.to_le_bytes());
    b[48..52].copy_from_slice(&i.memmap_entries.to_le_bytes());
    b
}

impl DomainCore {
    /// Appends guest console output, printing whole lines with the domain prefix.
    pub fn console_write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.console.len() >= 512 {
                self.flush_console();
            } else if b != b'\r' {
                self.console.push(b);
            }
        }
    }

    /// Prints a pending partial console line.
    pub fn flush_console(&mut self) {
        let line: String = self
            .console
            .iter()
            .map(|&c| {
                if (0x20..0x7f).contains(&c) || c == b'\t' {
                    c as char
                } else {
                    '.'
                }
            })
            .collect();
        crate::console::guest_line(self.id, &line);
        self.console.clear();
    }

    /// Prints a pending partial console line, so verdicts do not interleave with it.
    pub fn flush_console_if_pending(&mut self) {
        if !self.console.is_empty() {
            self.flush_console();
        }
    }

    /// True the first time `(kind, key)` is seen: for log-once messages.
    pub fn first_time(&mut self, kind: u8, key: u64) -> bool {
        self.logged.insert((kind, key))
    }

    /// The domain's display name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
}
