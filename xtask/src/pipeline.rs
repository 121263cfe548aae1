//! `cargo xtask test`: everything CI runs, in order: formatting, clippy, host unit
//! tests, the build, then the scenarios of the `ferrovisor-tests` catalogue: under QEMU
//! (AMD SVM) and under Bochs (Intel VMX; by default the exit paths and one Linux boot).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use ferrovisor_tests::{catalogue, judge, vmx_catalogue, Scenario};

use crate::guest::{self, LinuxGuest};
use crate::image::{self, Profile};
use crate::kernels::Guests;
use crate::{bundle, kernels, qemu, sys};

/// Options of `cargo xtask test`.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Only the scenarios of one backend: `svm` (QEMU TCG) or `vmx` (Bochs); default both
    /// (under Bochs, `vmx-exits` and `vmx-linux` unless `--full`).
    #[arg(long, value_name = "svm|vmx")]
    pub cpu: Option<String>,
    /// Also run the scenarios marked full-only (under Bochs: every scenario QEMU runs).
    #[arg(long)]
    pub full: bool,
    /// Run only this scenario (repeat for more); default: every scenario of the set.
    #[arg(long, value_name = "NAME")]
    pub scenario: Vec<String>,
    /// Go on after a failing step (fmt, clippy, unit tests) and report all at the end.
    #[arg(long)]
    pub keep_going: bool,
    /// Skip fmt, clippy and the unit tests: build and run the selected scenarios only
    /// (for iterating on one scenario; CI always runs every step).
    #[arg(long)]
    pub scenarios_only: bool,
    /// Physical CPUs (QEMU -smp) of every scenario that does not name its own.
    #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_HOST_CPUS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub host_cpus: u32,
}

/// Lines of a failing scenario's log printed under its verdict.
const LOG_TAIL_LINES: usize = 30;

/// The scenarios `args` selects, in catalogue order.
fn select(args: &TestArgs) -> Result<Vec<Scenario>> {
    let all: Vec<Scenario> = match args.cpu.as_deref() {
        None => catalogue().into_iter().chain(vmx_catalogue()).collect(),
        Some("svm") => catalogue(),
        Some("vmx") => vmx_catalogue(),
        Some(other) => bail!("--cpu {other}: unknown backend (`svm`: QEMU, `vmx`: Bochs)"),
    };
    if args.scenario.is_empty() {
        return Ok(all
            .into_iter()
            .filter(|s| args.full || !s.full_only)
            .collect());
    }
    for name in &args.scenario {
        if !all.iter().any(|s| s.name == name) {
            let known: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("unknown scenario '{name}'; known: {}", known.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| args.scenario.iter().any(|n| n == s.name))
        .collect())
}

fn header(step: usize, total: usize, what: &str) {
    println!();
    println!("==> [{step}/{total}] {what}");
}

/// Runs `cargo xtask test`.
pub fn test(args: TestArgs) -> Result<ExitCode> {
    let scenarios = select(&args)?;
    const STEPS: usize = 5;
    let mut failed_steps: Vec<&str> = Vec::new();
    let mut step = |n: usize, name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        header(n, STEPS, name);
        let start = Instant::now();
        match f() {
            Ok(()) => {
                println!("{name}: ok ({:.1} s)", start.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                println!("{name}: FAILED: {e:#}");
                failed_steps.push(name);
                if args.keep_going {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    };

    let skip = args.scenarios_only;
    if skip {
        println!("--scenarios-only: skipping fmt, clippy and the unit tests (steps 1-3)");
    }
    if !skip {
        step(1, "formatting (cargo fmt --check)", &mut || {
            sys::run(sys::cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        step(
            2,
            "clippy (host crates, then freestanding crates)",
            &mut || {
                let host = sys::run(sys::cargo().args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "boot",
                    "--exclude",
                    "testguest",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]));
                let image = image::run_freestanding(image::cargo_freestanding("clippy").args([
                    "-p",
                    "boot",
                    "-p",
                    "testguest",
                    "--",
                    "-D",
                    "warnings",
                ]));
                host.and(image)
            },
        )?;
        step(3, "host unit tests (cargo test)", &mut || {
            sys::run(sys::cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "boot",
                "--exclude",
                "testguest",
            ]))
        })?;
    }
    // Scenarios cannot run without the build: its failure always stops here.
    header(4, STEPS, "build (release)");
    if let Err(e) = image::build_all(Profile::Release) {
        println!("build (release): FAILED: {e:#}");
        failed_steps.push("build");
        println!();
        println!(
            "failed steps: {}; the QEMU scenarios were not run",
            failed_steps.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }

    let bochs_count = scenarios.iter().filter(|s| is_bochs(s)).count();
    header(
        5,
        STEPS,
        &format!(
            "scenarios ({} selected: {} on QEMU, {} on Bochs)",
            scenarios.len(),
            scenarios.len() - bochs_count,
            bochs_count
        ),
    );
    if bochs_count < scenarios.len() {
        sys::ensure(sys::QEMU)?;
    }
    if bochs_count > 0 {
        sys::ensure(crate::bochs::REQUIREMENTS)?;
        sys::ensure(crate::iso::REQUIREMENTS)?;
    }
    // Only download and build the Linux guest when a selected scenario boots it.
    let linux = if scenarios.iter().any(Scenario::needs_linux_guest) {
        println!("preparing the Linux guest (cargo xtask guest)...");
        Some(guest::prepare(false).map_err(|e| format!("{e:#}")))
    } else {
        None
    };
    let (passed, failed) = run_scenarios(&scenarios, linux.as_ref(), args.host_cpus)?;
    println!();
    println!("{passed} passed, {failed} failed");
    if !failed_steps.is_empty() {
        println!("failed steps: {}", failed_steps.join(", "));
    }
    Ok(if failed == 0 && failed_steps.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `scenarios` one after the other and returns (passed, failed). `linux` is the
/// Linux guest (or why it could not be prepared) when a scenario needs it.
fn run_scenarios(
    scenarios: &[Scenario],
    linux: Option<&Result<LinuxGuest, String>>,
    host_cpus: u32,
) -> Result<(usize, usize)> {
    let work = sys::workspace_root().join("target").join("xtask");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let image = image::hypervisor(Profile::Release);
    let testguest = image::testguest(Profile::Release);

    let (mut passed, mut failed) = (0, 0);
    let mut bochs_secs = 0.0;
    for s in scenarios {
        let cpus = s.host_cpus.unwrap_or(host_cpus);
        println!("--- {} ({cpus} host CPU(s)): {}", s.name, s.about);
        let log = logs.join(format!("{}.log", s.name));
        let start = Instant::now();
        let verdict = match linux {
            Some(Err(e)) if s.needs_linux_guest() => Err(format!("no Linux guest: {e}")),
            _ => {
                let guests = Guests {
                    testguest: &testguest,
                    linux: linux.and_then(|l| l.as_ref().ok()),
                };
                run_one(s, cpus, &work, &image, guests, &log)
            }
        };
        let secs = start.elapsed().as_secs_f64();
        if is_bochs(s) {
            bochs_secs += secs;
        }
        match verdict {
            Ok(()) => {
                passed += 1;
                println!("scenario {}: PASS ({secs:.1} s)", s.name);
            }
            Err(reason) => {
                failed += 1;
                println!("scenario {}: FAIL: {reason}", s.name);
                print_tail(&log);
            }
        }
    }
    if bochs_secs > 0.0 {
        println!("Bochs scenarios took {bochs_secs:.0} s in all");
    }
    Ok((passed, failed))
}

/// Whether the scenario boots Bochs (VMX) rather than QEMU.
fn is_bochs(s: &Scenario) -> bool {
    s.cpu.starts_with(crate::bochs::CPU_PREFIX)
}

/// Boots one scenario; `Err` holds the reason it failed.
fn run_one(
    s: &Scenario,
    host_cpus: u32,
    work: &Path,
    image: &Path,
    guests: Guests,
    log: &Path,
) -> Result<(), String> {
    let domains = kernels::prepare(&s.domains, guests, &work.join("kernels"), s.name)
        .map_err(|e| format!("preparing kernels: {e:#}"))?;
    let bundle_path = work.join(format!("{}.cpio", s.name));
    bundle::write(&bundle_path, &domains).map_err(|e| format!("{e:#}"))?;
    let _ = std::fs::remove_file(log);
    let qemu_out = log.with_extension("qemu.txt");

    let extra = match s.nic {
        Some(nic) => nic.qemu_args(free_udp_port().map_err(|e| format!("{e:#}"))?),
        None => Vec::new(),
    };
    let launch = crate::bochs::launch(
        &qemu::Boot {
            image,
            bundle: &bundle_path,
            cmdline: s.hv_cmdline,
            cpu: s.cpu,
            domain_memory_mib: s.domains.iter().map(|d| d.memory_mib).sum(),
            host_cpus,
            serial: qemu::Serial::File(log.to_path_buf()),
            extra: &extra,
        },
        &work.join("bochs").join(s.name),
    )
    .map_err(|e| format!("{e:#}"))?;
    println!("$ {}", sys::shell_line(launch.command()));
    let timeout = Duration::from_secs(s.timeout_secs);
    let (ended, bochs) = match launch {
        crate::bochs::Launch::Qemu(cmd) => (qemu::run_with_timeout(cmd, timeout, &qemu_out), false),
        crate::bochs::Launch::Bochs(run) => (
            crate::bochs::run_with_timeout(run, timeout, &qemu_out),
            true,
        ),
    };
    let ended = ended.map_err(|e| format!("{e:#}"))?;
    let serial = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    // Bochs' display is terminal escapes: not worth quoting.
    let qemu_said = if bochs {
        String::new()
    } else {
        std::fs::read_to_string(&qemu_out).unwrap_or_default()
    };
    let qemu_said = qemu_said.trim();

    let status = match ended {
        // Bochs exits with 1 however the run went: the image's verdict line stands for
        // the status QEMU's isa-debug-exit would give.
        qemu::Ended::Exited(_) if bochs => crate::bochs::verdict(&serial),
        qemu::Ended::Exited(status) => status,
        qemu::Ended::TimedOut => None,
    };
    let expect = match guests.linux {
        Some(g) => s.expect.with_linux_release(&g.release),
        None => s.expect.clone(),
    };
    let mut result = judge(&expect, status, &serial);
    if ended == qemu::Ended::TimedOut {
        result = Err(format!(
            "timed out after {} s (QEMU killed); {}",
            s.timeout_secs,
            result.err().unwrap_or_default()
        ));
    }
    result.map_err(|reason| {
        if qemu_said.is_empty() {
            reason
        } else {
            format!(
                "{reason}\n  QEMU said: {}",
                qemu_said.replace('\n', "\n    ")
            )
        }
    })
}

/// A UDP port on 127.0.0.1 that nothing uses right now (the OS picks it), for a
/// scenario NIC's `-netdev dgram` loop.
fn free_udp_port() -> Result<u16> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(sock.local_addr()?.port())
}

/// Prints where a scenario's serial log is and its last lines.
fn print_tail(log: &Path) {
    println!("  log: {}", log.display());
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        println!("  (the serial log is empty)");
        return;
    }
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    if from > 0 {
        println!("  last {LOG_TAIL_LINES} of {} lines:", lines.len());
    }
    for l in &lines[from..] {
        println!("  | {l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(full: bool, scenario: &[&str]) -> TestArgs {
        TestArgs {
            cpu: None,
            full,
            scenario: scenario.iter().map(|s| s.to_string()).collect(),
            keep_going: false,
            scenarios_only: false,
            host_cpus: 2,
        }
    }

    #[test]
    fn selection_by_name_keeps_catalogue_order() {
        let got = select(&args(false, &["no-svm", "exits"])).unwrap();
        let names: Vec<_> = got.iter().map(|s| s.name).collect();
        assert_eq!(names, ["exits", "no-svm"]);
        let err = select(&args(false, &["nope"])).unwrap_err().to_string();
        assert!(err.contains("unknown scenario 'nope'") && err.contains("exits"));
    }

    #[test]
    fn the_cpu_option_picks_the_backend() {
        let mut a = args(false, &[]);
        let both = select(&a).unwrap();
        a.cpu = Some("vmx".into());
        let vmx = select(&a).unwrap();
        let names: Vec<_> = vmx.iter().map(|s| s.name).collect();
        assert_eq!(names, ["vmx-exits", "vmx-linux"]);
        a.cpu = Some("svm".into());
        let svm = select(&a).unwrap();
        assert!(svm.iter().all(|s| !is_bochs(s)));
        assert_eq!(both.len(), svm.len() + vmx.len());
        a.cpu = Some("arm".into());
        assert!(select(&a).is_err());
    }

    #[test]
    fn default_set_leaves_out_full_only() {
        let default = select(&args(false, &[])).unwrap();
        assert!(default.iter().all(|s| !s.full_only));
        assert!(select(&args(true, &[])).unwrap().len() >= default.len());
    }
}
