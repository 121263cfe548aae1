//! `cargo xtask bench`: the Linux guest's boot time under the hypervisor against the same
//! kernel and initramfs booted directly by QEMU.
//!
//! Each round boots the guest with the command [`BENCH_COMMAND`] under the hypervisor
//! (as `run -- true`), then bare (as `run --bare -- true`), one after the other, and
//! records for each boot the time from QEMU's start to `ferro-init: up` and to
//! `FERRO-EXIT`. The report is a table of min/median/max and the ratio of the medians,
//! the hypervisor's own counters from the last boot under it, and
//! `target/xtask/bench-boot.json`.
//!
//! Under TCG the timings depend on the host's load and speed: only the ratios between
//! boots of one run mean something. Nothing here asserts a timing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use ferrovisor_tests::{INIT_UP, LINUX_MEMORY_MIB};

use crate::image::{self, Profile};
use crate::run::{self, CommandBoot, LinuxBoot};
use crate::transcript::Source;
use crate::{guest, qemu, say, sys};

/// The command each boot runs.
pub const BENCH_COMMAND: &str = "true";

/// Where the results go, under the workspace root.
pub const JSON_PATH: &str = "target/xtask/bench-boot.json";

/// Serial lines of the hypervisor that explain its share of the boot time: the kernel's
/// decompression, the exit counters and the busiest I/O ports.
const HV_LINE_MARKERS: &[&str] = &[
    "is a bzImage",
    " exits: hypercall ",
    " busiest ports: ",
    " slices, ",
    "at once: ",
];

/// Options of `cargo xtask bench`.
#[derive(Args, Debug)]
#[command(
    about = "Boot-time benchmark: the Linux guest under the hypervisor against bare QEMU",
    long_about = "Boot-time benchmark: the Linux guest under the hypervisor against bare QEMU.\n\n\
        Each round boots Debian's Linux guest with the command `true` under the hypervisor \
        (as `run -- true`), then the same kernel and initramfs directly in QEMU (as \
        `run --bare -- true`), and records the time from QEMU's start to `ferro-init: up` \
        and to `FERRO-EXIT`. Prints min/median/max of each, the ratio of the medians \
        (ferrovisor / bare) and the hypervisor's exit counters of one boot, and writes \
        target/xtask/bench-boot.json.\n\n\
        Timings under QEMU TCG are noisy and depend on the host: only the ratios within \
        one run are meaningful; do not compare absolute times across machines or runs."
)]
pub struct BenchArgs {
    /// Rounds; each boots once under the hypervisor and once bare.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Guest vCPUs (the domain's vCPUs; bare QEMU's -smp).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: u32,
    /// Physical CPUs of the machine under the hypervisor (its QEMU -smp).
    #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_HOST_CPUS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub host_cpus: u32,
    /// Kill a boot whose command has not finished after SECS (and stop the benchmark).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
}

/// Which way a boot ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ferrovisor,
    Bare,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ferrovisor => "ferrovisor",
            Mode::Bare => "bare",
        }
    }
}

/// The two times of one boot, in seconds from QEMU's start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// To `ferro-init: up`.
    pub up: f64,
    /// To `FERRO-EXIT`.
    pub exit: f64,
}

/// Min, median and max of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Smallest value.
    pub min: f64,
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
}

/// The summary of `values`; `None` when there are none.
pub fn summarise(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

/// Everything a benchmark run measured.
#[derive(Clone, Debug)]
pub struct Results {
    /// The guest kernel's release.
    pub release: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Physical CPUs under the hypervisor.
    pub host_cpus: u32,
    /// The boots under the hypervisor, in order.
    pub ferrovisor: Vec<Timing>,
    /// The bare boots, in order.
    pub bare: Vec<Timing>,
    /// The hypervisor's explanatory lines (see [`HV_LINE_MARKERS`]) from its last boot.
    pub hv_lines: Vec<String>,
}

fn ups(t: &[Timing]) -> Vec<f64> {
    t.iter().map(|t| t.up).collect()
}

fn exits(t: &[Timing]) -> Vec<f64> {
    t.iter().map(|t| t.exit).collect()
}

/// `a / b` for medians, `None` when either side is missing or `b` is zero.
fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

impl Results {
    /// The table printed at the end.
    pub fn table(&self) -> String {
        let rows = [
            ("ferrovisor", "ferro-init: up", ups(&self.ferrovisor)),
            ("ferrovisor", "FERRO-EXIT", exits(&self.ferrovisor)),
            ("bare", "ferro-init: up", ups(&self.bare)),
            ("bare", "FERRO-EXIT", exits(&self.bare)),
        ];
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<11} {:<15} {:>8} {:>8} {:>8}",
            "boot", "QEMU start to", "min s", "median s", "max s"
        );
        for (mode, what, values) in &rows {
            if let Some(m) = summarise(values) {
                let _ = writeln!(
                    s,
                    "{mode:<11} {what:<15} {:>8.2} {:>8.2} {:>8.2}",
                    m.min, m.median, m.max
                );
            }
        }
        let fmt = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        let _ = writeln!(
            s,
            "ratio of medians (ferrovisor / bare): ferro-init: up {}, FERRO-EXIT {}",
            fmt(ratio(
                summarise(&ups(&self.ferrovisor)),
                summarise(&ups(&self.bare))
            )),
            fmt(ratio(
                summarise(&exits(&self.ferrovisor)),
                summarise(&exits(&self.bare))
            )),
        );
        s
    }

    /// The results as JSON (`target/xtask/bench-boot.json`).
    pub fn json(&self) -> String {
        let list = |v: &[f64]| {
            let items: Vec<String> = v.iter().map(|x| json_number(*x)).collect();
            format!("[{}]", items.join(", "))
        };
        let summary = |v: &[f64]| match summarise(v) {
            Some(m) => format!(
                "{{\"min\": {}, \"median\": {}, \"max\": {}}}",
                json_number(m.min),
                json_number(m.median),
                json_number(m.max)
            ),
            None => "null".to_string(),
        };
        let side = |t: &[Timing]| {
            format!(
                "{{\n    \"up_s\": {},\n    \"exit_s\": {},\n    \"up\": {},\n    \"exit\": {}\n  }}",
                list(&ups(t)),
                list(&exits(t)),
                summary(&ups(t)),
                summary(&exits(t))
            )
        };
        let opt = |r: Option<f64>| r.map_or("null".to_string(), json_number);
        let lines: Vec<String> = self.hv_lines.iter().map(|l| json_string(l)).collect();
        format!(
            "{{\n  \"command\": {},\n  \"kernel_release\": {},\n  \"memory_mib\": {},\n  \
             \"vcpus\": {},\n  \"host_cpus\": {},\n  \"runs\": {},\n  \
             \"note\": \"seconds from QEMU start; TCG timings are noisy, only ratios within one run are meaningful\",\n  \
             \"ferrovisor\": {},\n  \"bare\": {},\n  \
             \"ratio_of_medians\": {{\"up\": {}, \"exit\": {}}},\n  \
             \"hypervisor_lines\": [{}]\n}}\n",
            json_string(BENCH_COMMAND),
            json_string(&self.release),
            self.memory_mib,
            self.vcpus,
            self.host_cpus,
            self.ferrovisor.len().max(self.bare.len()),
            side(&self.ferrovisor),
            side(&self.bare),
            opt(ratio(
                summarise(&ups(&self.ferrovisor)),
                summarise(&ups(&self.bare))
            )),
            opt(ratio(
                summarise(&exits(&self.ferrovisor)),
                summarise(&exits(&self.bare))
            )),
            lines.join(", ")
        )
    }
}

/// A JSON number with millisecond precision (`null` for NaN or infinities).
fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".to_string()
    }
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The hypervisor's lines of `serial` that [`HV_LINE_MARKERS`] pick, without the
/// `(HV) [time] LEVEL` prefix.
pub fn hypervisor_lines(serial: &str) -> Vec<String> {
    serial
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("(HV)") && HV_LINE_MARKERS.iter().any(|m| l.contains(m)))
        .map(|l| l.to_string())
        .collect()
}

/// Runs `cargo xtask bench`.
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    sys::ensure(sys::QEMU)?;
    let work = sys::workspace_root().join("target").join("xtask");
    let g = guest::prepare(false)?;
    let image = image::build_hypervisor(Profile::Release)?;
    let cpu = run::qemu_cpu("svm")?;
    let ramdisk = work.join("bench-initramfs+cmd.cpio");
    guest::ramdisk_with_command(&g.initramfs, BENCH_COMMAND, &ramdisk)?;
    let boot = LinuxBoot {
        guest: &g,
        ramdisk: &ramdisk,
        with_cmd: true,
        append: "",
        memory_mib: LINUX_MEMORY_MIB,
        vcpus: args.vcpus,
        serial: qemu::Serial::Pipe,
        extra: &[],
    };
    let bundle_path = work.join("bench.cpio");
    run::write_bundle(&bundle_path, &boot.domain())?;
    let logs = work.join("logs");
    let log_of = |mode: Mode| logs.join(format!("bench-{}.log", mode.name()));
    let timeout = Duration::from_secs(args.timeout);

    say!(
        "benchmark: {} rounds of `{BENCH_COMMAND}` in Linux {} ({} MiB, {} vCPU), \
         under ferrovisor ({} host CPU(s)) then bare QEMU",
        args.runs,
        g.release,
        boot.memory_mib,
        boot.vcpus,
        args.host_cpus
    );
    say!(
        "$ {}",
        sys::shell_line(&boot.hypervisor_command(&image, &bundle_path, "", cpu, args.host_cpus))
    );
    say!("$ {}", sys::shell_line(&boot.bare_command()));
    say!("(TCG timings are noisy: compare the ratios, not the absolute times)");

    let mut results = Results {
        release: g.release.clone(),
        memory_mib: boot.memory_mib,
        vcpus: boot.vcpus,
        host_cpus: args.host_cpus,
        ferrovisor: Vec::new(),
        bare: Vec::new(),
        hv_lines: Vec::new(),
    };
    for round in 1..=args.runs {
        print!("round {round}/{}:", args.runs);
        for (i, mode) in [Mode::Ferrovisor, Mode::Bare].into_iter().enumerate() {
            print!("{} {}... ", if i == 0 { "" } else { ";" }, mode.name());
            let _ = std::io::stdout().flush();
            let (cmd, source) = match mode {
                Mode::Ferrovisor => (
                    boot.hypervisor_command(&image, &bundle_path, "", cpu, args.host_cpus),
                    Source::Hypervisor { domid: 1 },
                ),
                Mode::Bare => (boot.bare_command(), Source::Bare),
            };
            let b = run::boot_command(
                crate::bochs::Launch::Qemu(cmd),
                source,
                &log_of(mode),
                Some(timeout),
                false,
            )?;
            let t = timing(&b)?;
            print!("{:.1} s (up {:.1} s)", t.exit, t.up);
            let _ = std::io::stdout().flush();
            match mode {
                Mode::Ferrovisor => results.ferrovisor.push(t),
                Mode::Bare => results.bare.push(t),
            }
        }
        println!();
    }

    let serial = std::fs::read_to_string(log_of(Mode::Ferrovisor)).unwrap_or_default();
    results.hv_lines = hypervisor_lines(&serial);

    println!();
    print!("{}", results.table());
    if !results.hv_lines.is_empty() {
        println!();
        println!("the hypervisor's own account of its last boot:");
        for l in &results.hv_lines {
            println!("  {l}");
        }
    }
    let json_path: PathBuf = sys::workspace_root().join(JSON_PATH);
    std::fs::write(&json_path, results.json())?;
    println!();
    println!(
        "results: {} (serial logs of the last round: {})",
        json_path.display(),
        log_of(Mode::Ferrovisor)
            .with_file_name("bench-*.log")
            .display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The timing of a boot that went right; an error (with the serial tail shown) otherwise.
fn timing(b: &CommandBoot) -> Result<Timing> {
    let fail = |what: String| -> Result<Timing> {
        println!();
        b.show_tail();
        bail!("{what}; serial log: {}", b.log.display())
    };
    let Some((status, exit)) = b.exit else {
        return fail(format!(
            "the guest ended without reporting FERRO-EXIT ({}; {})",
            b.phase(),
            b.qemu_end()
        ));
    };
    if status != 0 {
        return fail(format!("`{BENCH_COMMAND}` exited with status {status}"));
    }
    let Some(up) = b.up_at else {
        return fail(format!(
            "FERRO-EXIT came without a `{INIT_UP}` line before it"
        ));
    };
    if !b.clean() {
        // The times up to FERRO-EXIT are still good.
        eprint!("(warning: after the command, {}) ", b.qemu_end());
    }
    Ok(Timing {
        up: up.as_secs_f64(),
        exit: exit.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_take_the_middle() {
        assert_eq!(summarise(&[]), None);
        let s = summarise(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = summarise(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 4.0));
    }

    fn sample() -> Results {
        Results {
            release: "6.1.0-56-amd64".into(),
            memory_mib: 256,
            vcpus: 1,
            host_cpus: 2,
            ferrovisor: vec![
                Timing { up: 8.0, exit: 9.0 },
                Timing {
                    up: 10.0,
                    exit: 11.0,
                },
            ],
            bare: vec![Timing { up: 4.0, exit: 5.0 }, Timing { up: 6.0, exit: 5.0 }],
            hv_lines: vec!["(HV) [  1.0] INFO  d1 exits: hypercall 1 \"x\"".into()],
        }
    }

    #[test]
    fn the_table_has_every_row_and_the_ratios() {
        let t = sample().table();
        assert!(
            t.contains("ferrovisor  ferro-init: up      8.00     9.00    10.00"),
            "{t}"
        );
        assert!(
            t.contains("bare        FERRO-EXIT          5.00     5.00     5.00"),
            "{t}"
        );
        assert!(
            t.contains(
                "ratio of medians (ferrovisor / bare): ferro-init: up 1.80, FERRO-EXIT 2.00"
            ),
            "{t}"
        );
    }

    #[test]
    fn json_is_well_formed_enough() {
        let j = sample().json();
        assert!(j.contains("\"up_s\": [8.000, 10.000]"), "{j}");
        assert!(j.contains("\"host_cpus\": 2,"), "{j}");
        assert!(
            j.contains("\"ratio_of_medians\": {\"up\": 1.800, \"exit\": 2.000}"),
            "{j}"
        );
        assert!(j.contains(r#"hypercall 1 \"x\""#), "{j}");
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(j.matches('[').count(), j.matches(']').count());
        assert_eq!(json_string("a\u{1}\n"), "\"a\\u0001\\n\"");
        assert_eq!(json_number(f64::NAN), "null");
    }

    #[test]
    fn the_hypervisor_lines_are_picked() {
        let serial = "(HV) [   2.452] INFO  d1: kernel 'files/vmlinuz' is a bzImage with a xz payload\n\
                      (d1) exits: hypercall 3 (a guest line)\n\
                      (HV) [  11.693] INFO  d1 exits: hypercall 2306 cpuid 1189 intr 355 other 0\r\n\
                      (HV) [  11.694] INFO  d1 busiest ports: 0x42: 100006\n\
                      (HV) [  11.696] INFO  all domains finished: 1 ok, 0 failed\n";
        let l = hypervisor_lines(serial);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[1].ends_with("intr 355 other 0"));
    }
}
