//! `cargo xtask test`: everything CI runs, in order: formatting, clippy, host unit
//! tests, the build, then the QEMU scenarios of the `ferrovisor-tests` catalogue.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use ferrovisor_tests::{catalogue, judge, Scenario};

use crate::guest::{self, LinuxGuest};
use crate::image::{self, Profile};
use crate::kernels::Guests;
use crate::{bundle, kernels, qemu, sys};

/// Options of `cargo xtask test`.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Also run the scenarios marked full-only (none today: the same set as without it).
    #[arg(long)]
    pub full: bool,
    /// Run only this scenario (repeat for more); default: every scenario of the set.
    #[arg(long, value_name = "NAME")]
    pub scenario: Vec<String>,
    /// Go on after a failing step (fmt, clippy, unit tests) and report all at the end.
    #[arg(long)]
    pub keep_going: bool,
    /// Physical CPUs (QEMU -smp) of every scenario that does not name its own.
    #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_HOST_CPUS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub host_cpus: u32,
}

/// Lines of a failing scenario's log printed under its verdict.
const LOG_TAIL_LINES: usize = 30;

/// The scenarios `args` selects, in catalogue order.
fn select(args: &TestArgs) -> Result<Vec<Scenario>> {
    let all = catalogue();
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

    header(
        5,
        STEPS,
        &format!("QEMU scenarios ({} selected)", scenarios.len()),
    );
    sys::ensure(sys::QEMU)?;
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
    Ok((passed, failed))
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

    let cmd = qemu::command(&qemu::Boot {
        image,
        bundle: &bundle_path,
        cmdline: s.hv_cmdline,
        cpu: s.cpu,
        domain_memory_mib: s.domains.iter().map(|d| d.memory_mib).sum(),
        host_cpus,
        serial: qemu::Serial::File(log.to_path_buf()),
        extra: &[],
    });
    println!("$ {}", sys::shell_line(&cmd));
    let ended = qemu::run_with_timeout(cmd, Duration::from_secs(s.timeout_secs), &qemu_out)
        .map_err(|e| format!("{e:#}"))?;
    let serial = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let qemu_said = std::fs::read_to_string(&qemu_out).unwrap_or_default();
    let qemu_said = qemu_said.trim();

    let status = match ended {
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
            full,
            scenario: scenario.iter().map(|s| s.to_string()).collect(),
            keep_going: false,
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
    fn default_set_leaves_out_full_only() {
        let default = select(&args(false, &[])).unwrap();
        assert!(default.iter().all(|s| !s.full_only));
        assert!(select(&args(true, &[])).unwrap().len() >= default.len());
    }
}
