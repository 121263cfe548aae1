//! Running programs, printing them the way a shell would take them, and installing the
//! system packages xtask needs (QEMU today; Bochs and GRUB later).

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

/// Whether xtask's own messages (and the output of the programs it runs for itself) go
/// to stderr, leaving stdout to a guest command's output (`cargo xtask run -- CMD`).
static CHATTER_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Sends xtask's messages to stderr from now on (see [`say`]).
pub fn chatter_to_stderr() {
    CHATTER_TO_STDERR.store(true, Ordering::Relaxed);
}

/// Prints one of xtask's own messages: to stdout, or to stderr after
/// [`chatter_to_stderr`]. Used through the `say!` macro.
pub fn say(args: fmt::Arguments) {
    if CHATTER_TO_STDERR.load(Ordering::Relaxed) {
        eprintln!("{args}");
    } else {
        println!("{args}");
    }
}

/// `println!` for xtask's own messages: see [`say`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::sys::say(format_args!($($arg)*))
    };
}

/// Points `cmd`'s stdout at stderr when xtask's messages go there.
fn chatter_stdout(cmd: &mut Command) {
    if CHATTER_TO_STDERR.load(Ordering::Relaxed) {
        use std::os::fd::AsFd;
        if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(Stdio::from(fd));
        }
    }
}

/// The workspace root (the directory above `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// A `cargo` command: the cargo that started xtask when there is one.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// Quotes one word for a POSIX shell when it needs it.
pub fn shell_word(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ',' | '=' | ':' | '+')
        });
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command line as one line a shell would run (environment changes not shown).
/// The cargo that started xtask is shown as plain `cargo`.
pub fn shell_line(cmd: &Command) -> String {
    let program = match std::env::var_os("CARGO") {
        Some(cargo) if cargo.as_os_str() == cmd.get_program() => "cargo".into(),
        _ => shell_word(cmd.get_program()),
    };
    std::iter::once(program)
        .chain(cmd.get_args().map(shell_word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints `cmd`, runs it with the terminal attached and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    say!("$ {}", shell_line(cmd));
    chatter_stdout(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    if !status.success() {
        bail!("`{}` failed ({status})", shell_line(cmd));
    }
    Ok(())
}

/// Whether `command` (a program looked up in `PATH`, or a path when it has a `/`) exists.
pub fn have(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    if command.contains('/') {
        return Path::new(command).exists();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(command))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Something xtask needs from the system and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Requirement {
    /// A program in `PATH`, or an absolute path to a file.
    pub command: &'static str,
    /// The Debian package providing it.
    pub package: &'static str,
    /// Why xtask needs it (printed before installing).
    pub why: &'static str,
    /// When true, a missing file that cannot be installed is only a warning.
    pub optional: bool,
}

/// QEMU for the x86 machine and its fast PVH-capable firmware.
pub const QEMU: &[Requirement] = &[
    Requirement {
        command: "qemu-system-x86_64",
        package: "qemu-system-x86",
        why: "boots the hypervisor image on an emulated AMD SVM machine",
        optional: false,
    },
    Requirement {
        command: crate::qemu::QBOOT,
        package: "qemu-system-data",
        why: "qboot firmware: boots PVH kernels faster than SeaBIOS",
        optional: true,
    },
];

/// Whether xtask runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn sudo_works() -> bool {
    Command::new("sudo")
        .args(["-n", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure every requirement is present, installing the missing packages with
/// `apt-get` when running as root (or through `sudo` when that works without a
/// password); otherwise stops with the exact command to run.
pub fn ensure(requirements: &[Requirement]) -> Result<()> {
    let missing: Vec<&Requirement> = requirements.iter().filter(|r| !have(r.command)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|r| r.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let install_line = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );

    let sudo = if is_root() {
        false
    } else if sudo_works() {
        true
    } else {
        if missing.iter().all(|r| r.optional) {
            for r in &missing {
                say!(
                    "warning: {} is missing (package {}: {}); going on without it",
                    r.command,
                    r.package,
                    r.why
                );
            }
            return Ok(());
        }
        let list: Vec<String> = missing
            .iter()
            .map(|r| format!("  {} (package {}): {}", r.command, r.package, r.why))
            .collect();
        bail!(
            "missing system packages:\n{}\ninstall them as root with:\n  sudo sh -c '{install_line}'",
            list.join("\n")
        );
    };

    say!(
        "installing system packages{}:",
        if sudo { " with sudo" } else { "" }
    );
    for r in &missing {
        say!("  {} for {}: {}", r.package, r.command, r.why);
    }
    let apt = |args: &[&str]| -> Command {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
            c
        } else {
            let mut c = Command::new("apt-get");
            c.env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        cmd.args(args).stdin(Stdio::null());
        cmd
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&packages);
    run(&mut install)?;

    let still: Vec<&str> = missing
        .iter()
        .filter(|r| !r.optional && !have(r.command))
        .map(|r| r.command)
        .collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word(OsStr::new("-m")), "-m");
        assert_eq!(shell_word(OsStr::new("file:/a/b.log")), "file:/a/b.log");
        assert_eq!(shell_word(OsStr::new("")), "''");
        assert_eq!(shell_word(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_word(OsStr::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn have_finds_programs_and_paths() {
        assert!(have("sh"));
        assert!(have("/"));
        assert!(!have("surely-no-such-program-here"));
    }
}
