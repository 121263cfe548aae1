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
    /// A generated ramdisk (`len` pseudo-random bytes from `seed`), or none.
    pub ramdisk: Option<(usize, u64)>,
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
            ramdisk: None,
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

/// What a scenario must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// QEMU's exit status.
    pub status: i32,
    /// Each must appear as a substring of some serial line, in this order (each on a
    /// later line than the previous one).
    pub lines: Vec<String>,
    /// None of these may appear anywhere in the serial output.
    pub forbidden: Vec<String>,
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
}

/// The `d<domid> check <name>: PASS` lines of every check, in the order the test guest
/// runs them.
pub fn all_checks_pass(domid: u32) -> Vec<String> {
    Check::ALL
        .iter()
        .map(|c| format!("d{domid} check {}: PASS", c.name()))
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
            lines: vec![line.to_string()],
            forbidden: strings(&["PANIC", "EXCEPTION"]),
        },
        timeout_secs: DEFAULT_TIMEOUT_SECS,
        full_only: false,
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

    let mut triple_lines = vec!["d1 (crasher) crashed: triple fault".to_string()];
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
        },
        Scenario {
            name: "host-exception",
            about: "an exception in the hypervisor itself is reported (vector, error code, RIP, CR2) and stops the run",
            cpu: CPU,
            hv_cmdline: "selftest=exception",
            domains: vec![Domain::test_guest("testguest", "test=exits")],
            expect: Expect {
                status: STATUS_PANIC,
                lines: strings(&[
                    "EXCEPTION: #UD invalid opcode (vector 6) in the hypervisor, error code 0x0",
                    "EXCEPTION: rip 0x",
                ]),
                forbidden: strings(&["PANIC", "check"]),
            },
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            full_only: false,
        },
    ]
}

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
        match lines[next..]
            .iter()
            .position(|l| l.contains(wanted.as_str()))
        {
            Some(i) => next += i + 1,
            None => {
                let anywhere = lines.iter().position(|l| l.contains(wanted.as_str()));
                problems.push(match anywhere {
                    Some(at) => format!(
                        "line \"{wanted}\" appeared (serial line {}) but out of order: \
                         expected after serial line {next}",
                        at + 1
                    ),
                    None if next == 0 => format!("missing line \"{wanted}\""),
                    None => format!("missing line \"{wanted}\" (after serial line {next})"),
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
            lines: strings(lines),
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
    fn catalogue_names_are_unique_and_sane() {
        let all = catalogue();
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
        assert_eq!(exits.expect.lines[0], "d1 check hypercall: PASS");
        assert_eq!(exits.expect.lines[9], "d1 check memory-write: PASS");
        assert_eq!(
            exits.expect.lines.last().unwrap(),
            "all domains finished: 1 ok, 0 failed"
        );
        // The judge accepts the output the expectation describes.
        let serial = exits.expect.lines.join("\n");
        assert_eq!(judge(&exits.expect, Some(STATUS_OK), &serial), Ok(()));
    }
}
