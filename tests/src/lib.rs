//! Host side of ferrovisor's integration tests: the catalogue of QEMU scenarios and the
//! judge that decides, from QEMU's exit status and the captured serial output, whether a
//! scenario passed.
//!
//! Everything here is plain data and pure logic so that it is unit-tested without QEMU;
//! `cargo xtask test` materialises the kernels, writes the boot bundles, boots QEMU and
//! hands the result to [`judge`].
//!
//! The hypervisor ends QEMU through the `isa-debug-exit` device: it writes a verdict `v`
//! and QEMU exits with status `(v << 1) | 1` (see the `STATUS_*` constants).

use std::path::PathBuf;

use abi::ferro::Check;

/// QEMU status when every domain finished cleanly and every check passed (verdict 0).
pub const STATUS_OK: i32 = 1;
/// QEMU status when the hypervisor is fine but a domain crashed or a check failed (verdict 1).
pub const STATUS_DOMAIN_FAILED: i32 = 3;
/// QEMU status for a fatal error at boot, explained by a `FATAL:` line (verdict 2).
pub const STATUS_FATAL: i32 = 5;
/// QEMU status for a hypervisor panic or unexpected exception (verdict 3).
pub const STATUS_PANIC: i32 = 7;

/// Default time a scenario may take before QEMU is killed.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// The Linux guest's command line under the hypervisor, before `ferro.cmd=1` and the
/// user's additions: its console is the Xen console ring (`hvc0`), early messages go
/// through the `console_io` hypercall.
pub const LINUX_CMDLINE: &str = "console=hvc0 earlyprintk=xen";
/// Guest memory of a Linux domain unless told otherwise, in MiB.
pub const LINUX_MEMORY_MIB: u64 = 256;

/// Protocol of the Linux guest's `/init` (written by `cargo xtask guest`): the line it
/// prints once proc, sys and devtmpfs are mounted (more text may follow on the line).
pub const INIT_UP: &str = "ferro-init: up";
/// The line `/init` prints right before it runs `/ferro/cmd` (command mode only).
pub const INIT_RUNNING: &str = "ferro-init: running command";
/// `/init` ends command mode with the line `FERRO-EXIT <status>` and powers off.
pub const EXIT_MARKER: &str = "FERRO-EXIT";
/// The kernel command line word that asks `/init` for command mode.
pub const CMD_FLAG: &str = "ferro.cmd=1";

/// Where, in a scenario's expected lines, the release of the cached Linux kernel goes
/// (`uname -r`, e.g. `6.1.0-56-amd64`); see [`Expect::with_linux_release`].
pub const LINUX_RELEASE: &str = "{linux-release}";

/// The Linux guest's command line: [`LINUX_CMDLINE`], then [`CMD_FLAG`] when a command is
/// to run, then `append` when it is not empty.
pub fn linux_cmdline(with_cmd: bool, append: &str) -> String {
    cmdline_with(LINUX_CMDLINE, with_cmd, append)
}

/// `base`, then [`CMD_FLAG`] when a command is to run, then `append` when it is not
/// empty: the Linux guest's command line around a given console setting.
pub fn cmdline_with(base: &str, with_cmd: bool, append: &str) -> String {
    let mut s = base.to_string();
    if with_cmd {
        s.push(' ');
        s.push_str(CMD_FLAG);
    }
    if !append.trim().is_empty() {
        s.push(' ');
        s.push_str(append.trim());
    }
    s
}

/// Splits a serial line into the domain whose console printed it (the hypervisor prints
/// guest console lines as `(d<domid>) text`) and the text; `None` and the whole line
/// (less a trailing carriage return) when it has no such prefix.
pub fn console_text(line: &str) -> (Option<u32>, &str) {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if let Some(rest) = line.strip_prefix("(d") {
        if let Some((id, text)) = rest.split_once(") ") {
            if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(domid) = id.parse() {
                    return (Some(domid), text);
                }
            }
        }
    }
    (None, line)
}

/// What a QEMU exit status means under the hypervisor's exit protocol.
pub fn status_meaning(status: i32) -> &'static str {
    match status {
        STATUS_OK => "every domain finished cleanly and every check passed",
        STATUS_DOMAIN_FAILED => "the hypervisor is fine but a domain crashed or a check failed",
        STATUS_FATAL => "fatal error at boot, explained by a FATAL: line",
        STATUS_PANIC => {
            "hypervisor panic or unexpected exception, explained by a PANIC: or EXCEPTION: line"
        }
        _ => "QEMU ended without the hypervisor's verdict",
    }
}

/// Where a domain's kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// The project's test guest (`tests/guests/testguest`) as built by `cargo xtask build`.
    TestGuest,
    /// `len` deterministic pseudo-random bytes derived from `seed`: not an ELF file.
    Garbage {
        /// Length of the file in bytes.
        len: usize,
        /// Seed of the generator; the same seed always gives the same bytes.
        seed: u64,
    },
    /// A minimal valid ELF64 x86-64 executable with one `PT_LOAD` and no notes.
    ElfWithoutPvhNote,
    /// The first part of the built test guest: cut at a percentage of its loadable
    /// part (from the file's start to the end of its last `PT_LOAD` segment's bytes), so
    /// that a segment is cut short. (Debug information and section headers follow the
    /// segments and make up most of the file.)
    TruncatedTestGuest {
        /// How much to keep, in percent of the loadable part's length.
        keep_bytes_fraction_percent: u8,
    },
    /// A file on the host.
    Path(PathBuf),
    /// Debian's bzImage cut at `keep_percent` of its length (its payload runs past the
    /// end of the file).
    TruncatedLinux {
        /// How much of the file to keep, in percent.
        keep_percent: u8,
    },
    /// Debian's bzImage with 64 bytes in the middle of its compressed payload inverted.
    CorruptLinux,
    /// The Linux guest prepared by `cargo xtask guest`: Debian's kernel as shipped (a
    /// bzImage), with the project's busybox initramfs as its ramdisk (plus `/ferro/cmd`
    /// when the domain has a [`Domain::linux_cmd`]).
    LinuxGuest,
}

/// One domain the hypervisor creates at boot, described as in an `xl.cfg` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// The domain's name (`name = "..."`).
    pub name: String,
    /// Its kernel.
    pub kernel: KernelSource,
    /// The guest's command line (`cmdline = "..."`).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Whether the hypervisor answers the project's test interface for this domain.
    pub test_interface: bool,
    /// Whether the hypervisor offers this domain the FIFO event-channel ABI.
    pub evtchn_fifo: bool,
    /// A generated ramdisk (`len` pseudo-random bytes from `seed`), or none. A
    /// [`KernelSource::LinuxGuest`] domain gets its initramfs without this.
    pub ramdisk: Option<(usize, u64)>,
    /// For a [`KernelSource::LinuxGuest`] domain: a shell command its `/init` runs (its
    /// command line must then hold [`CMD_FLAG`]; [`Domain::linux_guest`] sees to that).
    pub linux_cmd: Option<String>,
    /// PCI devices assigned to the domain (`pci = [...]`, bus:dev.fn), e.g. [`NIC_BDF`].
    pub pci: Vec<String>,
}

impl Domain {
    /// A test guest domain with the project's defaults (32 MiB, one vCPU, test interface on).
    pub fn test_guest(name: &str, cmdline: &str) -> Domain {
        Domain {
            name: name.to_string(),
            kernel: KernelSource::TestGuest,
            cmdline: cmdline.to_string(),
            memory_mib: 32,
            vcpus: 1,
            test_interface: true,
            evtchn_fifo: true,
            ramdisk: None,
            linux_cmd: None,
            pci: Vec::new(),
        }
    }

    /// The Linux guest with its defaults ([`LINUX_MEMORY_MIB`], one vCPU, command line
    /// from [`linux_cmdline`]), running `cmd` and powering off when one is given, else
    /// starting a shell on its console.
    pub fn linux_guest(name: &str, cmd: Option<&str>) -> Domain {
        Domain {
            name: name.to_string(),
            kernel: KernelSource::LinuxGuest,
            cmdline: linux_cmdline(cmd.is_some(), ""),
            memory_mib: LINUX_MEMORY_MIB,
            vcpus: 1,
            test_interface: false,
            evtchn_fifo: true,
            ramdisk: None,
            linux_cmd: cmd.map(str::to_string),
            pci: Vec::new(),
        }
    }

    /// A test-guest-like domain whose kernel is `kernel` (used for broken kernels).
    pub fn with_kernel(name: &str, kernel: KernelSource) -> Domain {
        Domain {
            kernel,
            ..Domain::test_guest(name, "test=exits")
        }
    }
}

/// One expected serial line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// A line containing this text.
    Contains(String),
    /// A line that is exactly this text once a guest console prefix `(d<domid>) ` and
    /// trailing whitespace are taken off (see [`console_text`]).
    Exact(String),
    /// A line containing this text anywhere in the output, in no particular order with
    /// the other expected lines: for what domains running at the same time on several
    /// physical CPUs print in an order nobody decides.
    Anywhere(String),
}

impl Line {
    /// Whether the serial line `line` is this one.
    pub fn matches(&self, line: &str) -> bool {
        match self {
            Line::Contains(text) | Line::Anywhere(text) => line.contains(text.as_str()),
            Line::Exact(text) => console_text(line).1.trim_end() == text,
        }
    }

    /// How a failure message quotes it.
    fn describe(&self) -> String {
        match self {
            Line::Contains(text) => format!("\"{text}\""),
            Line::Exact(text) => format!("exactly \"{text}\""),
            Line::Anywhere(text) => format!("\"{text}\" (anywhere)"),
        }
    }

    fn map(&self, f: impl Fn(&str) -> String) -> Line {
        match self {
            Line::Contains(t) => Line::Contains(f(t)),
            Line::Exact(t) => Line::Exact(f(t)),
            Line::Anywhere(t) => Line::Anywhere(f(t)),
        }
    }
}

impl From<&str> for Line {
    fn from(text: &str) -> Line {
        Line::Contains(text.to_string())
    }
}

impl From<String> for Line {
    fn from(text: String) -> Line {
        Line::Contains(text)
    }
}

/// What a scenario must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// QEMU's exit status.
    pub status: i32,
    /// Each must match some serial line, in this order (each on a later line than the
    /// previous one); a [`Line::Anywhere`] may match any line and leaves the order alone.
    pub lines: Vec<Line>,
    /// None of these may appear anywhere in the serial output.
    pub forbidden: Vec<String>,
}

impl Expect {
    /// The expectation with [`LINUX_RELEASE`] replaced by `release` in every line.
    pub fn with_linux_release(&self, release: &str) -> Expect {
        Expect {
            lines: self
                .lines
                .iter()
                .map(|l| l.map(|t| t.replace(LINUX_RELEASE, release)))
                .collect(),
            ..self.clone()
        }
    }
}

/// One QEMU boot of the hypervisor with a set of domains, and what it must produce.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique name (used by `--scenario` and for log file names).
    pub name: &'static str,
    /// One line saying what the scenario checks.
    pub about: &'static str,
    /// The QEMU `-cpu` value.
    pub cpu: &'static str,
    /// The hypervisor's own command line (QEMU `-append`).
    pub hv_cmdline: &'static str,
    /// The domains, in creation order (domids 1, 2, ...).
    pub domains: Vec<Domain>,
    /// The expected outcome.
    pub expect: Expect,
    /// Seconds before QEMU is killed and the scenario fails.
    pub timeout_secs: u64,
    /// Only run by `cargo xtask test --full`.
    pub full_only: bool,
    /// QEMU gets an Intel IOMMU and an e1000e NIC at [`NIC_BDF`] whose frames come back
    /// to it (`-netdev dgram` to its own loopback port).
    pub nic: Option<NicSetup>,
    /// Physical CPUs of the machine (QEMU `-smp`); `None`: `cargo xtask test
    /// --host-cpus` (2 unless told otherwise).
    pub host_cpus: Option<u32>,
}

/// Where the e1000e NIC of a [`NicSetup`] scenario sits (QEMU `addr=0x3` on q35's root bus).
pub const NIC_BDF: &str = "00:03.0";

/// The emulated IOMMU and NIC of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicSetup {
    /// Extra `-device intel-iommu` options (e.g. `,caching-mode=on`), or empty.
    pub iommu_options: &'static str,
}

impl NicSetup {
    /// The QEMU arguments, the NIC's frames going to UDP `port` on 127.0.0.1 and coming
    /// back from it (nothing leaves the machine).
    pub fn qemu_args(&self, port: u16) -> Vec<String> {
        let ep = |side: &str| format!("{side}.type=inet,{side}.host=127.0.0.1,{side}.port={port}");
        vec![
            "-device".into(),
            format!("intel-iommu{}", self.iommu_options),
            "-netdev".into(),
            format!("dgram,id=n0,{},{}", ep("local"), ep("remote")),
            "-device".into(),
            "e1000e,netdev=n0,addr=0x3,mac=02:66:65:72:72:00".into(),
        ]
    }
}

impl Scenario {
    /// Whether a domain runs the Linux guest (so `cargo xtask guest` must have run).
    pub fn needs_linux_guest(&self) -> bool {
        self.domains.iter().any(|d| {
            matches!(
                d.kernel,
                KernelSource::LinuxGuest
                    | KernelSource::TruncatedLinux { .. }
                    | KernelSource::CorruptLinux
            )
        })
    }
}

/// The command the `linux-boot` scenario runs in the Linux guest.
/// It prints the hypervisor type, the release, the CPU count, then one line of dmesg for
/// each fact the judge checks, in a fixed order.
pub const LINUX_BOOT_CMD: &str =
    "cat /sys/hypervisor/type; uname -r; nproc; cat /sys/hypervisor/uuid; \
    for p in 'Booting kernel on Xen PVH' 'Grant table initialized' 'xen:events: Using' \
    'callback vector for event delivery' \
    'smp: Brought up' 'Switched to clocksource xen'; do dmesg | grep -m1 \"$p\"; done";

/// The command of the `linux-2level` scenario.
pub const LINUX_2LEVEL_CMD: &str = "cat /sys/hypervisor/type; dmesg | grep -m1 'xen:events: Using'";

/// `linux-pair`, domain A: on its first boot (domid 1) it waits for B to come up, then
/// reboots; rebuilt as a new domain, it says so and powers off.
pub const LINUX_PAIR_A_CMD: &str = "id=$(xenstore-read domid); n=$(xenstore-read name); \
    if [ \"$id\" = 1 ]; then echo \"a: domid $id, name $n: rebooting in 10 s\"; sleep 10; \
    reboot -f; sleep 30; fi; echo \"a: domid $id, name $n: second boot\"";

/// Two-second ticks domain B of `linux-pair` counts while A reboots.
pub const LINUX_PAIR_B_TICKS: u32 = 30;

/// `linux-pair`, domain B: counts [`LINUX_PAIR_B_TICKS`] two-second ticks (A reboots
/// meanwhile), then checks its xenstore nodes and that the kernel logged nothing new.
pub const LINUX_PAIR_B_CMD: &str = "echo \"b: domid $(xenstore-read domid), name $(xenstore-read name)\"; \
    before=$(dmesg | wc -l); i=0; while [ $i -lt 30 ]; do sleep 2; i=$((i+1)); \
    echo \"b: tick $i\"; done; after=$(dmesg | wc -l); \
    echo \"b: domid $(xenstore-read domid), name $(xenstore-read name), $((after - before)) new kernel messages\"; \
    dmesg | tail -n $((after - before)) | sed 's/^/b: new: /'";

/// vCPUs of the `linux-boot` guest: it proves SMP bring-up in the same boot.
pub const LINUX_BOOT_VCPUS: u32 = 2;

/// A domain owning QEMU's e1000e behind intel-iommu (`iommu_options` added to the
/// device) receives a frame into a page another domain granted it, then unmaps the
/// grant: the same DMA and one to an address it never mapped must fault.
fn iommu_dma(name: &'static str, iommu_options: &'static str) -> Scenario {
    Scenario {
        name,
        about: if iommu_options.is_empty() {
            "a NIC owned by d2 DMAs a received frame straight into a page d1 granted (IOMMU \
             entry created by the grant map); after the unmap the same DMA faults with the \
             NIC's source id and address and the page is unchanged; a DMA to an address d2 \
             never mapped faults too"
        } else {
            "iommu-dma with the IOMMU in caching mode (caching-mode=on: maps are flushed too)"
        },
        cpu: "max",
        hv_cmdline: "",
        domains: vec![
            Domain::test_guest("granter", "test=dma-granter peer=2"),
            Domain {
                pci: vec![NIC_BDF.to_string()],
                ..Domain::test_guest("nic", "test=dma-nic peer=1")
            },
        ],
        expect: Expect {
            status: STATUS_OK,
            lines: vec![
                "translation on, DMA blocked for every device until a domain owns it".into(),
                format!("d2: PCI {NIC_BDF} assigned").into(),
                "(d2) testguest: dma-nic: frame 1 received into the grant mapping (length): ok"
                    .into(),
                "(d1) testguest: dma-granter: frame 1 is in the granted page (DMA through the IOMMU): ok"
                    .into(),
                format!("iommu: DMA fault: PCI {NIC_BDF} (d2) write at 0x100000000").into(),
                format!("iommu: DMA fault: PCI {NIC_BDF} (d2) write at 0x140000000").into(),
                "(d1) testguest: dma-granter: page unchanged after the unmap (bytes written): ok (0)"
                    .into(),
                "d1 check dma-granter: PASS".into(),
                "d2 check dma-nic: PASS".into(),
                "iommu: no mappings left".into(),
                "all domain memory returned".into(),
                "all domains finished: 2 ok, 0 failed".into(),
            ],
            forbidden: strings(&["FAIL", "WRONG", "PANIC", "EXCEPTION", "FATAL"]),
        },
        timeout_secs: DEFAULT_TIMEOUT_SECS,
        full_only: false,
        host_cpus: None,
        nic: Some(NicSetup { iommu_options }),
    }
}

/// The `d<domid> check <name>: PASS` lines of every check, in the order the test guest
/// runs them.
pub fn all_checks_pass(domid: u32) -> Vec<Line> {
    Check::ALL
        .iter()
        .map(|c| Line::from(format!("d{domid} check {}: PASS", c.name())))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A scenario where the hypervisor must stop at boot with a `FATAL:` line containing
/// `line`.
fn fatal(
    name: &'static str,
    about: &'static str,
    cpu: &'static str,
    domain: Domain,
    line: &str,
) -> Scenario {
    Scenario {
        name,
        about,
        cpu,
        hv_cmdline: "",
        domains: vec![domain],
        expect: Expect {
            status: STATUS_FATAL,
            lines: vec![line.into()],
            forbidden: strings(&["PANIC", "EXCEPTION"]),
        },
        timeout_secs: DEFAULT_TIMEOUT_SECS,
        full_only: false,
        nic: None,
        host_cpus: None,
    }
}

/// Every scenario `cargo xtask test` knows, default set first.
pub fn catalogue() -> Vec<Scenario> {
    const CPU: &str = "max";
    let mut exits_lines = all_checks_pass(1);
    exits_lines.push("d1 (testguest) shut down: poweroff".into());
    exits_lines.push("all domains finished: 1 ok, 0 failed".into());

    let mut ramdisk_lines = all_checks_pass(1);
    ramdisk_lines.push("d1 check ramdisk: PASS".into());
    ramdisk_lines.push("all domains finished: 1 ok, 0 failed".into());

    // the crasher and the second domain start at the same time on two physical CPUs
    let mut triple_lines = vec![Line::Anywhere("d1 (crasher) crashed: triple fault".into())];
    triple_lines.extend(all_checks_pass(2));
    triple_lines.push("d2 (testguest) shut down: poweroff".into());
    triple_lines.push("all domains finished: 1 ok, 1 failed".into());

    vec![
        Scenario {
            name: "exits",
            about: "the test guest runs every check (hypercall, CPUID, I/O, MSR, NPF, memory) and powers off",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain::test_guest("testguest", "test=exits")],
            expect: Expect {
                status: STATUS_OK,
                lines: exits_lines,
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        fatal(
            "not-elf",
            "a kernel of random bytes is refused at boot",
            CPU,
            Domain::with_kernel(
                "not-elf",
                KernelSource::Garbage {
                    len: 4096,
                    seed: 0x5eed_f00d,
                },
            ),
            "is not an ELF file",
        ),
        fatal(
            "no-pvh-note",
            "an ELF kernel without the PVH entry note is refused at boot",
            CPU,
            Domain::with_kernel("no-pvh-note", KernelSource::ElfWithoutPvhNote),
            "has no PVH entry note",
        ),
        fatal(
            "truncated-elf",
            "the test guest cut in the middle of its segments is refused as truncated",
            CPU,
            Domain::with_kernel(
                "truncated-elf",
                KernelSource::TruncatedTestGuest {
                    keep_bytes_fraction_percent: 50,
                },
            ),
            "is truncated",
        ),
        fatal(
            "no-svm",
            "a CPU without AMD SVM is reported",
            "qemu64,-svm",
            Domain::test_guest("testguest", "test=exits"),
            "FATAL: this CPU has no AMD SVM",
        ),
        fatal(
            "no-npt",
            "a CPU with SVM but without nested paging is reported",
            "qemu64,+svm",
            Domain::test_guest("testguest", "test=exits"),
            "FATAL: this CPU has SVM but no nested paging (NPT)",
        ),
        fatal(
            "no-vmx",
            "an Intel CPU without VMX is reported with the firmware setting to change",
            "qemu64,vendor=GenuineIntel,-svm",
            Domain::test_guest("testguest", "test=exits"),
            "FATAL: this Intel CPU has no VMX (CPUID.1:ECX bit 5 is clear): enable \"Intel Virtualization Technology\"",
        ),
        Scenario {
            name: "triple-fault",
            about: "a guest that triple-faults is crashed while a second domain completes its checks",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("crasher", "test=triple-fault"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_DOMAIN_FAILED,
                lines: triple_lines,
                forbidden: strings(&["PANIC", "EXCEPTION", ": FAIL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "ramdisk",
            about: "a ramdisk reaches the guest through hvm_start_info's module list, byte for byte",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                ramdisk: Some((300 * 1024 + 17, 0x0dd_ba11)),
                ..Domain::test_guest("testguest", "test=exits")
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: ramdisk_lines,
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "host-exception",
            about: "an exception in the hypervisor itself is reported (vector, error code, RIP, CR2) and stops the run",
            cpu: CPU,
            hv_cmdline: "selftest=exception",
            domains: vec![Domain::test_guest("testguest", "test=exits")],
            expect: Expect {
                status: STATUS_PANIC,
                lines: vec![
                    "EXCEPTION: #UD invalid opcode (vector 6) in the hypervisor, error code 0x0"
                        .into(),
                    "EXCEPTION: rip 0x".into(),
                ],
                forbidden: strings(&["PANIC", "check"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "linux-boot",
            about: "Debian's Linux kernel boots as a PVH domU from the busybox initramfs, \
                    sees Xen and runs a command",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                vcpus: LINUX_BOOT_VCPUS,
                ..Domain::linux_guest("linux", Some(LINUX_BOOT_CMD))
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    INIT_UP.into(),
                    INIT_RUNNING.into(),
                    Line::Exact("xen".into()),
                    Line::Exact(LINUX_RELEASE.into()),
                    Line::Exact(LINUX_BOOT_VCPUS.to_string()),
                    // XENVER_guest_handle: the domain's UUID (derived from its name)
                    Line::Exact(
                        abi::ferro::uuid_string(&abi::ferro::default_uuid("linux"))
                            .as_str()
                            .to_string(),
                    ),
                    "Booting kernel on Xen PVH".into(),
                    "Grant table initialized".into(),
                    "xen:events: Using FIFO-based ABI".into(),
                    "Xen HVM callback vector for event delivery is enabled".into(),
                    format!("smp: Brought up 1 node, {LINUX_BOOT_VCPUS} CPUs").into(),
                    "clocksource: Switched to clocksource xen".into(),
                    Line::Exact(format!("{EXIT_MARKER} 0")),
                    // xenbus talked to the embedded xenstore (watches were registered)
                    "d1 xenstore: ".into(),
                    "(linux) shut down: poweroff".into(),
                    "xenstore back to ".into(),
                ],
                forbidden: strings(&["PANIC", "EXCEPTION", "FATAL", "Kernel panic"]),
            },
            timeout_secs: 600,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        fatal(
            "truncated-bzimage",
            "Debian's bzImage cut in half is refused, naming the kernel file",
            CPU,
            Domain::with_kernel("linux", KernelSource::TruncatedLinux { keep_percent: 50 }),
            "FATAL: kernel 'files/vmlinuz' of domain 'linux' is a bzImage whose payload",
        ),
        fatal(
            "corrupt-bzimage",
            "Debian's bzImage with a damaged xz payload is refused, naming the kernel file",
            CPU,
            Domain::with_kernel("linux", KernelSource::CorruptLinux),
            "FATAL: kernel 'files/vmlinuz' of domain 'linux' is a bzImage whose xz payload is corrupt",
        ),
        Scenario {
            name: "linux-2level",
            about: "the hypervisor refuses the FIFO event-channel ABI (evtchn_fifo = 0): Linux \
                    falls back to 2-level event channels and still boots",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                evtchn_fifo: false,
                ..Domain::linux_guest("linux", Some(LINUX_2LEVEL_CMD))
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    INIT_RUNNING.into(),
                    Line::Exact("xen".into()),
                    "xen:events: Using 2-level ABI".into(),
                    Line::Exact(format!("{EXIT_MARKER} 0")),
                ],
                forbidden: strings(&["PANIC", "EXCEPTION", "FATAL", "Kernel panic", "FIFO-based"]),
            },
            timeout_secs: 600,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "grant-peers",
            about: "A grants a page to B; B maps it, reads A's bytes, writes its own, \
                    unmaps; an interdomain event channel signals both ways; after A ends \
                    access B's second map fails with GNTST_general_error",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("peer-a", "test=peer-a peer=2"),
                Domain::test_guest("peer-b", "test=peer-b peer=1"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "(d2) testguest: peer-b: grant mapped: ok".into(),
                    "(d2) testguest: peer-b: peer's pattern read through the mapping: ok".into(),
                    "(d1) testguest: peer-a: peer's pattern in the shared page: ok".into(),
                    "(d2) testguest: peer-b: second map after the peer ended access fails: ok (-1)".into(),
                    // the two report at the same time on two physical CPUs
                    Line::Anywhere("d2 check peer-b: PASS".into()),
                    Line::Anywhere("d1 check peer-a: PASS".into()),
                    "all domain memory returned".into(),
                    "all domains finished: 2 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "WRONG", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        iommu_dma("iommu-dma", ""),
        iommu_dma("iommu-dma-cm", ",caching-mode=on"),
        Scenario {
            name: "restart",
            about: "a domain that reboots is rebuilt from its config (on_reboot defaults to \
                    restart, as in xl: a new domain with the next id) twice, then powers off; a second domain runs on and all \
                    memory comes back",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("rebooter", "test=reboot-twice"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "(d1) testguest: restarted 0 times".into(),
                    "d1 (rebooter) shut down: reboot".into(),
                    "d1 (rebooter) restarted as d3 (restart 1)".into(),
                    "(d3) testguest: restarted 1 times".into(),
                    "d3 (rebooter) restarted as d4 (restart 2)".into(),
                    "(d4) testguest: restarted 2 times".into(),
                    "d4 check restarts: PASS".into(),
                    "d4 (rebooter) shut down: poweroff".into(),
                    "all domain memory returned".into(),
                    "all domains finished: 2 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "linux-pair",
            about: "two Linux domains side by side: 'linux-a' reboots (on_reboot = restart \
                    rebuilds it as a new domain) while 'linux-b' runs on without a new \
                    kernel message; both read their own xenstore nodes",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::linux_guest("linux-a", Some(LINUX_PAIR_A_CMD)),
                Domain::linux_guest("linux-b", Some(LINUX_PAIR_B_CMD)),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    Line::Exact("b: domid 2, name linux-b".into()),
                    "d1 (linux-a) shut down: reboot".into(),
                    "d1 (linux-a) restarted as d3 (restart 1)".into(),
                    Line::Exact("a: domid 3, name linux-a: second boot".into()),
                    "d3 (linux-a) shut down: poweroff".into(),
                    Line::Exact(format!("b: tick {LINUX_PAIR_B_TICKS}")),
                    Line::Exact("b: domid 2, name linux-b, 0 new kernel messages".into()),
                    "d2 (linux-b) shut down: poweroff".into(),
                    "xenstore back to ".into(),
                    "all domain memory returned".into(),
                    "all domains finished: 2 ok, 0 failed".into(),
                ],
                forbidden: strings(&["PANIC", "EXCEPTION", "FATAL", "Kernel panic", "FAIL"]),
            },
            timeout_secs: 400,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "create-destroy-100",
            about: "a small guest reboots and is rebuilt 100 times: frames, grant tables, \
                    event channels and xenstore nodes end where they started",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                memory_mib: 16,
                ..Domain::test_guest("cycler", "test=reboot-cycles count=100")
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "d1 (cycler) restarted as d2 (restart 1)".into(),
                    "d100 (cycler) restarted as d101 (restart 100)".into(),
                    "(d101) testguest: restarted 100 times".into(),
                    "d101 check restarts: PASS".into(),
                    "d101 (cycler) shut down: poweroff".into(),
                    "xenstore back to ".into(),
                    "all domain memory returned".into(),
                    "all domains finished: 1 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "leak"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "xenstore",
            about: "a test guest finds its xenstore ring through HVM parameters, writes and \
                    reads back a node under its home and reads its own name, as xenbus does",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                memory_mib: 16,
                ..Domain::test_guest("xsguest", "test=xenstore")
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "(d1) testguest: xenstore: write true, read back true".into(),
                    "d1 check xenstore: PASS".into(),
                    "xenstore back to ".into(),
                    "all domains finished: 1 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "leak"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "hostile",
            about: "a guest passing garbage to hypercalls (bad pointers, sub-ops, lengths, \
                    vCPUs) gets Xen's error codes; it and a second domain run on",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("hostile", "test=hostile"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: {
                    let mut l = vec![Line::from("d1 check hostile-hypercalls: PASS")];
                    l.push("d1 (hostile) shut down: poweroff".into());
                    l.push("all domains finished: 2 ok, 0 failed".into());
                    l
                },
                forbidden: strings(&["FAIL", "WRONG", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "preemption",
            about: "a guest that computes without exits is preempted: a second domain \
                    completes all its checks meanwhile",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("spinner", "test=spin"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: {
                    // with two physical CPUs both start at once (`one-host-cpu` is
                    // this scenario on one CPU)
                    let mut l = vec![Line::Anywhere(
                        "(d1) testguest: spinning without exits".into(),
                    )];
                    l.extend(all_checks_pass(2));
                    l.push("d2 (testguest) shut down: poweroff".into());
                    l.push("(d1) testguest: done spinning".into());
                    l.push("d1 (spinner) shut down: poweroff".into());
                    l.push("all domains finished: 2 ok, 0 failed".into());
                    l
                },
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: None,
        },
        Scenario {
            name: "smp-parallel",
            about: "two test guests that compute without exits run on the two physical CPUs \
                    at the same time: both CPUs run slices and the hypervisor sees guests on \
                    both at once",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("worker-a", WORK_CMDLINE),
                Domain::test_guest("worker-b", WORK_CMDLINE),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "2 physical CPU(s) up".into(),
                    "scheduling 2 domain(s) on 2 physical CPU(s)".into(),
                    "testguest: work done".into(),
                    "testguest: work done".into(),
                    "physical CPUs that ran guests: 2 of 2".into(),
                    "guests ran on two or more physical CPUs at once: yes".into(),
                    "all domain memory returned".into(),
                    "all domains finished: 2 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "did not answer"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(2),
        },
        Scenario {
            name: "smp-preemption",
            about: "two guests spin without exits on the two physical CPUs; a third domain \
                    still gets slices and completes its checks before they finish",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("spinner-a", "test=spin"),
                Domain::test_guest("spinner-b", "test=spin"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: {
                    let mut l = vec![Line::from("scheduling 3 domain(s) on 2 physical CPU(s)")];
                    l.extend(all_checks_pass(3));
                    l.push("d3 (testguest) shut down: poweroff".into());
                    l.push("testguest: done spinning".into());
                    l.push("all domains finished: 3 ok, 0 failed".into());
                    l
                },
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(2),
        },
        Scenario {
            name: "maxcpus-1",
            about: "maxcpus=1 on a two-CPU machine: the second CPU is not started and two \
                    computing guests share the boot CPU",
            cpu: CPU,
            hv_cmdline: "maxcpus=1",
            domains: vec![
                Domain::test_guest("worker-a", WORK_CMDLINE),
                Domain::test_guest("worker-b", WORK_CMDLINE),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "maxcpus=1: not starting the other 1 CPU(s)".into(),
                    "1 physical CPU(s) up".into(),
                    "testguest: work done".into(),
                    "testguest: work done".into(),
                    "physical CPUs that ran guests: 1 of 1".into(),
                    "guests ran on two or more physical CPUs at once: no".into(),
                    "all domains finished: 2 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "cpu1"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(2),
        },
        Scenario {
            name: "smp-shutdown",
            about: "a two-vCPU guest powers off while its second vCPU computes on the other \
                    physical CPU: that CPU is kicked out of the guest and the domain is \
                    destroyed once no vCPU of it runs",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![Domain {
                vcpus: 2,
                ..Domain::test_guest("smp", "test=smp-shutdown")
            }],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "d1: vcpu1 started by SIPI at 0x8000".into(),
                    "(d1) testguest: vcpu1 is counting".into(),
                    "destroyed once its vCPUs running elsewhere stop (vcpu1 on cpu".into(),
                    "d1 (smp) shut down: poweroff".into(),
                    "all domain memory returned".into(),
                    "all domains finished: 1 ok, 0 failed".into(),
                ],
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "never counted"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(2),
        },
        Scenario {
            name: "absent-cpu",
            about: "a CPU that never answers its start-up IPIs (selftest=absent-cpu adds an \
                    APIC id nobody has) is reported after its timeout and the hypervisor goes \
                    on with the CPUs that did",
            cpu: CPU,
            hv_cmdline: "selftest=absent-cpu",
            domains: vec![Domain::test_guest("testguest", "test=exits")],
            expect: Expect {
                status: STATUS_OK,
                lines: {
                    let mut l = vec![
                        Line::from("cpu1 up (apic id 1)"),
                        "the CPU with APIC id 126 did not answer its start-up IPIs within 1000 ms \
                         (it never reached the trampoline): going on without it"
                            .into(),
                        "2 physical CPU(s) up: cpu0 (apic id 0), cpu1 (apic id 1)".into(),
                        "scheduling 1 domain(s) on 2 physical CPU(s)".into(),
                    ];
                    l.extend(all_checks_pass(1));
                    l.push("all domains finished: 1 ok, 0 failed".into());
                    l
                },
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL", "cpu2"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(2),
        },
        Scenario {
            name: "one-host-cpu",
            about: "a one-CPU machine (-smp 1): a spinning guest is preempted so that a \
                    second domain completes its checks first",
            cpu: CPU,
            hv_cmdline: "",
            domains: vec![
                Domain::test_guest("spinner", "test=spin"),
                Domain::test_guest("testguest", "test=exits"),
            ],
            expect: Expect {
                status: STATUS_OK,
                lines: {
                    let mut l = vec![
                        Line::from("1 physical CPU(s) up"),
                        "(d1) testguest: spinning without exits".into(),
                    ];
                    l.extend(all_checks_pass(2));
                    l.push("d2 (testguest) shut down: poweroff".into());
                    l.push("(d1) testguest: done spinning".into());
                    l.push("physical CPUs that ran guests: 1 of 1".into());
                    l.push("all domains finished: 2 ok, 0 failed".into());
                    l
                },
                forbidden: strings(&["FAIL", "PANIC", "EXCEPTION", "FATAL"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(1),
        },
    ]
}

/// The `Scenario::cpu` of scenarios booted under Bochs (an Intel CPU with VMX, EPT,
/// unrestricted guest and VPID): `bochs:` and the Bochs CPU model.
pub const BOCHS_CPU: &str = "bochs:corei7_skylake_x";

/// The command of the `vmx-linux` scenario (what `cargo xtask run --cpu vmx -- CMD` runs).
pub const XEN_TYPE_CMD: &str = "cat /sys/hypervisor/type";

/// Time a Linux boot under Bochs may take (xz decompression of the kernel alone takes
/// ~75 s of the emulated CPU).
pub const BOCHS_LINUX_TIMEOUT_SECS: u64 = 900;

/// The scenarios run under Bochs (the VMX backend). By default `vmx-exits` (the exit
/// paths) and `vmx-linux` (Debian's Linux boots and prints `xen`); with `--full` also
/// every scenario of [`catalogue`] that does not depend on QEMU's CPU model, as
/// `vmx-<name>`, and `vmx-no-ept` (Bochs' Core 2 has VMX without EPT).
pub fn vmx_catalogue() -> Vec<Scenario> {
    let mut out = Vec::new();
    for s in catalogue() {
        if s.cpu != "max" || s.nic.is_some() {
            continue; // chosen QEMU CPU models (no SVM, no NPT, no VMX); QEMU's IOMMU and NIC
        }
        let default = s.name == "exits";
        let name: &'static str = Box::leak(format!("vmx-{}", s.name).into_boxed_str());
        let timeout_secs = if s.needs_linux_guest() {
            BOCHS_LINUX_TIMEOUT_SECS
        } else {
            s.timeout_secs.max(DEFAULT_TIMEOUT_SECS)
        };
        out.push(Scenario {
            name,
            cpu: BOCHS_CPU,
            timeout_secs,
            full_only: !default,
            nic: None,
            host_cpus: None,
            ..s
        });
    }
    out.insert(
        1,
        Scenario {
            name: "vmx-linux",
            about: "Debian's Linux boots as a PVH domU on VMX and EPT and reads                     /sys/hypervisor/type",
            cpu: BOCHS_CPU,
            hv_cmdline: "",
            domains: vec![Domain::linux_guest("linux", Some(XEN_TYPE_CMD))],
            expect: Expect {
                status: STATUS_OK,
                lines: vec![
                    "VMX enabled: EPT".into(),
                    INIT_UP.into(),
                    INIT_RUNNING.into(),
                    Line::Exact("xen".into()),
                    Line::Exact(format!("{EXIT_MARKER} 0")),
                    "(linux) shut down: poweroff".into(),
                    "all domain memory returned".into(),
                ],
                forbidden: strings(&["PANIC", "EXCEPTION", "FATAL", "Kernel panic", "crashed"]),
            },
            timeout_secs: BOCHS_LINUX_TIMEOUT_SECS,
            full_only: false,
            nic: None,
            host_cpus: Some(1),
        },
    );
    out.push(Scenario {
        cpu: "bochs:core2_penryn_t9600",
        ..fatal(
            "vmx-no-ept",
            "an Intel CPU with VMX but without EPT is reported",
            BOCHS_CPU,
            Domain::test_guest("testguest", "test=exits"),
            "FATAL: this CPU's VMX has no EPT (extended page tables)",
        )
    });
    if let Some(last) = out.last_mut() {
        last.full_only = true;
    }
    out
}

/// The test guests' command line in the SMP scenarios: computation without exits
/// that takes a few hundred milliseconds of CPU under QEMU TCG.
pub const WORK_CMDLINE: &str = "test=work count=200";

/// Decides whether a run met `expect`. `status` is QEMU's exit status (`None` when it
/// had none: killed on timeout or by a signal) and `serial` the captured serial output.
///
/// On failure the reason names everything that went wrong: a wrong status with its
/// meaning, the first expected line that was missing (and where the search stopped), and
/// the first forbidden text that appeared (quoting the line).
pub fn judge(expect: &Expect, status: Option<i32>, serial: &str) -> Result<(), String> {
    let mut problems = Vec::new();

    match status {
        Some(s) if s == expect.status => {}
        Some(s) => problems.push(format!(
            "QEMU exit status {s} ({}), expected {} ({})",
            status_meaning(s),
            expect.status,
            status_meaning(expect.status)
        )),
        None => problems.push(format!(
            "QEMU had no exit status (killed), expected {} ({})",
            expect.status,
            status_meaning(expect.status)
        )),
    }

    let lines: Vec<&str> = serial.lines().collect();
    let mut next = 0;
    for wanted in &expect.lines {
        if let Line::Anywhere(_) = wanted {
            if !lines.iter().any(|l| wanted.matches(l)) {
                problems.push(format!("missing line {}", wanted.describe()));
                break;
            }
            continue;
        }
        match lines[next..].iter().position(|l| wanted.matches(l)) {
            Some(i) => next += i + 1,
            None => {
                let anywhere = lines.iter().position(|l| wanted.matches(l));
                let w = wanted.describe();
                problems.push(match anywhere {
                    Some(at) => format!(
                        "line {w} appeared (serial line {}) but out of order: \
                         expected after serial line {next}",
                        at + 1
                    ),
                    None if next == 0 => format!("missing line {w}"),
                    None => format!("missing line {w} (after serial line {next})"),
                });
                break;
            }
        }
    }

    'forbidden: for bad in &expect.forbidden {
        for (i, line) in lines.iter().enumerate() {
            if line.contains(bad.as_str()) {
                problems.push(format!(
                    "forbidden \"{bad}\" appeared on serial line {}: \"{}\"",
                    i + 1,
                    line.trim_end()
                ));
                break 'forbidden;
            }
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(status: i32, lines: &[&str], forbidden: &[&str]) -> Expect {
        Expect {
            status,
            lines: lines.iter().map(|&l| l.into()).collect(),
            forbidden: strings(forbidden),
        }
    }

    #[test]
    fn judge_accepts_lines_in_order_as_substrings() {
        let e = expect(1, &["check a: PASS", "check b: PASS"], &["FAIL"]);
        let serial = "boot\nd1 check a: PASS (x)\n(d1) hello\nd1 check b: PASS\n";
        assert_eq!(judge(&e, Some(1), serial), Ok(()));
    }

    #[test]
    fn anywhere_lines_match_in_any_order_and_leave_the_order_alone() {
        let e = Expect {
            status: 1,
            lines: vec![
                "b".into(),
                Line::Anywhere("a".into()),
                "c".into(),
                Line::Anywhere("z".into()),
            ],
            forbidden: vec![],
        };
        let err = judge(&e, Some(1), "a\nb\nc\n").unwrap_err();
        assert!(err.contains("missing line \"z\" (anywhere)"), "{err}");
        assert_eq!(judge(&e, Some(1), "a\nb\nc\nz\n"), Ok(()));
        assert_eq!(judge(&e, Some(1), "z\nb\nc\na\n"), Ok(()));
        // the ordered lines keep their order
        assert!(judge(&e, Some(1), "a\nc\nb\nz\n").is_err());
    }

    #[test]
    fn judge_reports_a_missing_line() {
        let e = expect(1, &["first", "second"], &[]);
        let err = judge(&e, Some(1), "first\nthird\n").unwrap_err();
        assert!(err.contains("missing line \"second\""), "{err}");
        assert!(err.contains("after serial line 1"), "{err}");
    }

    #[test]
    fn judge_reports_lines_out_of_order() {
        let e = expect(1, &["first", "second"], &[]);
        let err = judge(&e, Some(1), "second\nfirst\n").unwrap_err();
        assert!(
            err.contains("\"second\" appeared (serial line 1) but out of order"),
            "{err}"
        );
    }

    #[test]
    fn judge_needs_a_later_line_for_each_expectation() {
        let e = expect(1, &["PASS", "PASS"], &[]);
        assert!(judge(&e, Some(1), "PASS PASS\n").is_err());
        assert!(judge(&e, Some(1), "PASS\nPASS\n").is_ok());
    }

    #[test]
    fn judge_quotes_a_forbidden_line() {
        let e = expect(1, &["ok"], &["FAIL"]);
        let err = judge(&e, Some(1), "ok\nd1 check msr: FAIL (got 0)\n").unwrap_err();
        assert!(
            err.contains(
                "forbidden \"FAIL\" appeared on serial line 2: \"d1 check msr: FAIL (got 0)\""
            ),
            "{err}"
        );
    }

    #[test]
    fn judge_explains_a_wrong_status() {
        let e = expect(STATUS_OK, &[], &[]);
        let err = judge(&e, Some(STATUS_PANIC), "").unwrap_err();
        assert!(err.contains("exit status 7 (hypervisor panic"), "{err}");
        assert!(
            err.contains("expected 1 (every domain finished cleanly"),
            "{err}"
        );
        let err = judge(&e, Some(0), "").unwrap_err();
        assert!(err.contains("without the hypervisor's verdict"), "{err}");
        let err = judge(&e, None, "").unwrap_err();
        assert!(err.contains("no exit status"), "{err}");
    }

    #[test]
    fn vmx_scenarios_boot_bochs_and_default_to_two() {
        let vmx = vmx_catalogue();
        let default: Vec<_> = vmx
            .iter()
            .filter(|s| !s.full_only)
            .map(|s| s.name)
            .collect();
        assert_eq!(default, ["vmx-exits", "vmx-linux"]);
        assert!(vmx.iter().all(|s| s.cpu.starts_with("bochs:")));
        assert!(vmx.iter().all(|s| s.name.starts_with("vmx-")));
        // QEMU CPU-model scenarios do not carry over
        assert!(!vmx
            .iter()
            .any(|s| s.name == "vmx-no-svm" || s.name == "vmx-no-vmx"));
        let linux = vmx.iter().find(|s| s.name == "vmx-linux").unwrap();
        assert_eq!(linux.domains[0].linux_cmd.as_deref(), Some(XEN_TYPE_CMD));
        assert!(linux.expect.lines.contains(&Line::Exact("xen".into())));
    }

    #[test]
    fn catalogue_names_are_unique_and_sane() {
        let all: Vec<Scenario> = catalogue().into_iter().chain(vmx_catalogue()).collect();
        let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate scenario names");
        for s in &all {
            assert!(!s.name.is_empty() && !s.about.is_empty());
            assert!(
                s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}: names become file names",
                s.name
            );
            assert!(!s.domains.is_empty(), "{}", s.name);
            assert!(s.timeout_secs > 0, "{}", s.name);
            assert_eq!(s.expect.status & 1, 1, "{}: statuses are odd", s.name);
        }
    }

    #[test]
    fn exits_expects_every_check_in_order() {
        let exits = catalogue().into_iter().find(|s| s.name == "exits").unwrap();
        assert_eq!(exits.expect.lines[0], "d1 check hypercall: PASS".into());
        assert_eq!(exits.expect.lines[9], "d1 check memory-write: PASS".into());
        assert_eq!(
            exits.expect.lines.last().unwrap(),
            &"all domains finished: 1 ok, 0 failed".into()
        );
        // The judge accepts the output the expectation describes.
        let serial = exits
            .expect
            .lines
            .iter()
            .map(|l| match l {
                Line::Contains(t) | Line::Exact(t) | Line::Anywhere(t) => t.as_str(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(judge(&exits.expect, Some(STATUS_OK), &serial), Ok(()));
    }

    #[test]
    fn exact_lines_ignore_the_console_prefix_only() {
        let e = Expect {
            status: 1,
            lines: vec![Line::Exact("xen".into()), "done".into()],
            forbidden: vec![],
        };
        assert_eq!(judge(&e, Some(1), "(d1) xen\r\n(HV) done\n"), Ok(()));
        assert_eq!(judge(&e, Some(1), "xen  \ndone\n"), Ok(()));
        let err = judge(&e, Some(1), "(d1) xenbus: ok\n(d1) Xen\ndone\n").unwrap_err();
        assert!(err.contains("missing line exactly \"xen\""), "{err}");
    }

    #[test]
    fn console_prefixes_are_split_off() {
        assert_eq!(console_text("(d1) hello\r"), (Some(1), "hello"));
        assert_eq!(console_text("(d12) (d1) x"), (Some(12), "(d1) x"));
        assert_eq!(console_text("(HV) boot"), (None, "(HV) boot"));
        assert_eq!(console_text("(d) x"), (None, "(d) x"));
        assert_eq!(console_text("(dx) x"), (None, "(dx) x"));
        assert_eq!(console_text("plain"), (None, "plain"));
    }

    #[test]
    fn linux_cmdline_adds_the_flag_and_the_user_text() {
        assert_eq!(linux_cmdline(false, ""), "console=hvc0 earlyprintk=xen");
        assert_eq!(
            linux_cmdline(true, " loglevel=8 "),
            "console=hvc0 earlyprintk=xen ferro.cmd=1 loglevel=8"
        );
    }

    #[test]
    fn linux_boot_expects_the_release_of_the_cached_kernel() {
        let s = catalogue()
            .into_iter()
            .find(|s| s.name == "linux-boot")
            .unwrap();
        assert!(s.needs_linux_guest());
        assert!(s.domains[0].cmdline.contains(CMD_FLAG));
        assert!(s.domains[0].linux_cmd.is_some());
        assert_eq!(s.domains[0].vcpus, LINUX_BOOT_VCPUS);
        let e = s.expect.with_linux_release("6.1.0-56-amd64");
        let serial = "(HV) ferrovisor\n(d1) ferro-init: up (6.1.0-56-amd64)\n\
                      (d1) ferro-init: running command\n(d1) xen\n(d1) 6.1.0-56-amd64\n(d1) 2\n\
                      (d1) 5cad04a9-f1a5-405d-8477-930d3e15fc8d\n\
                      (d1) [    3.8] Booting kernel on Xen PVH\n\
                      (d1) [    4.4] Grant table initialized\n\
                      (d1) [    4.4] xen:events: Using FIFO-based ABI\n\
                      (d1) [    4.4] xen:events: Xen HVM callback vector for event delivery is enabled\n\
                      (d1) [    4.7] smp: Brought up 1 node, 2 CPUs\n\
                      (d1) [    4.6] clocksource: Switched to clocksource xen\n\
                      (d1) FERRO-EXIT 0\n\
                      (HV) d1 xenstore: 11 nodes, 6 watches, 0 transactions open at the end\n\
                      (HV) d1 (linux) shut down: poweroff\n\
                      (HV) xenstore back to 7 entries\n";
        assert_eq!(judge(&e, Some(STATUS_OK), serial), Ok(()));
        let err = judge(&s.expect, Some(STATUS_OK), serial).unwrap_err();
        assert!(err.contains(LINUX_RELEASE), "unresolved placeholder: {err}");
    }
}
