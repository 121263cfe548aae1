//! `cargo xtask run --domain FILE`: domains described by the user's own xl.cfg files.
//!
//! Each file goes into the boot bundle as it is written, except its `kernel` and
//! `ramdisk` values: those name files on the host (relative to the config's directory)
//! and are stored in the bundle under `files/`, the config pointing there. Three names
//! stand for the project's own guests: `@linux` (Debian's kernel from `cargo xtask
//! guest`), `@linux-initramfs` (its busybox initramfs) and `@testguest`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cpio::Archive;

/// What a `kernel`/`ramdisk` value may refer to.
pub struct Known<'a> {
    /// The built test guest, for `@testguest`.
    pub testguest: Option<&'a Path>,
    /// Debian's kernel and initramfs, for `@linux` and `@linux-initramfs`.
    pub linux: Option<(&'a Path, &'a Path)>,
}

/// One user config with the host files it refers to.
#[derive(Debug, PartialEq, Eq)]
pub struct UserDomain {
    /// The text with `kernel`/`ramdisk` values replaced by their bundle names.
    pub text: String,
    /// (bundle name, host path) of every file the text refers to.
    pub files: Vec<(String, PathBuf)>,
    /// `memory` in MiB (xl's default 128 when absent).
    pub memory_mib: u64,
    /// `name`, or the file's stem.
    pub name: String,
}

/// Does `value` need the Linux guest prepared?
pub fn needs_linux(text: &str) -> bool {
    text.contains("\"@linux")
}

/// Does `value` need the test guest built?
pub fn needs_testguest(text: &str) -> bool {
    text.contains("\"@testguest\"")
}

fn value_of(line: &str, key: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix(key)?.trim_start();
    let rest = rest.strip_prefix('=')?.trim();
    let rest = rest.strip_suffix(';').unwrap_or(rest).trim();
    let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let inner = rest.strip_prefix(quote)?.strip_suffix(quote)?;
    (!inner.contains(quote) && !inner.contains('\\')).then(|| inner.to_string())
}

/// Reads `file` and rewrites its kernel/ramdisk lines (file `index` gets bundle names
/// `files/dNN-<kernel|ramdisk>-<basename>`).
pub fn load(file: &Path, index: usize, known: &Known) -> Result<UserDomain> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading domain config {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut out = String::new();
    let mut files = Vec::new();
    let (mut memory_mib, mut name) = (128, None);
    for line in text.lines() {
        let mut line = line.to_string();
        for key in ["kernel", "ramdisk"] {
            let Some(v) = value_of(&line, key) else {
                continue;
            };
            let host = match v.as_str() {
                "@testguest" => known.testguest.map(Path::to_path_buf),
                "@linux" => known.linux.map(|(k, _)| k.to_path_buf()),
                "@linux-initramfs" => known.linux.map(|(_, r)| r.to_path_buf()),
                p if p.starts_with('@') => bail!("{}: `{key} = \"{p}\"`: unknown name (known: @linux, @linux-initramfs, @testguest)", file.display()),
                p => Some(dir.join(p)),
            };
            let Some(host) = host else {
                bail!("{}: `{key} = \"{v}\"` is not available", file.display())
            };
            if !host.is_file() {
                bail!("{}: {key} {} is not a file", file.display(), host.display());
            }
            let base = host
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let safe: String = base
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let bundled = format!("files/d{:02}-{key}-{safe}", index + 1);
            line = format!("{key} = \"{bundled}\"");
            files.push((bundled, host));
        }
        if let Some(m) = line
            .trim_start()
            .strip_prefix("memory")
            .and_then(|r| r.trim_start().strip_prefix('='))
        {
            if let Ok(v) = m.trim().trim_end_matches(';').trim().parse::<u64>() {
                memory_mib = v;
            }
        }
        if let Some(n) = value_of(&line, "name") {
            name = Some(n);
        }
        out.push_str(&line);
        out.push('\n');
    }
    if !files.iter().any(|(n, _)| n.contains("-kernel-")) {
        bail!("{}: no `kernel = \"...\"` line", file.display());
    }
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "domain".into());
    Ok(UserDomain {
        text: out,
        files,
        memory_mib,
        name: name.unwrap_or(stem),
    })
}

/// The boot bundle for `domains`: `domains/NN-<name>.cfg` in the given order, plus the
/// files they refer to.
pub fn bundle(domains: &[UserDomain]) -> Result<Vec<u8>> {
    if domains.is_empty() || domains.len() > 99 {
        bail!("between 1 and 99 --domain files, not {}", domains.len());
    }
    let mut archive = Archive::new();
    for (i, d) in domains.iter().enumerate() {
        for (name, host) in &d.files {
            let data =
                std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            archive.add_file(name, &data);
        }
        let safe: String = d
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        archive.add_file(
            &format!("domains/{:02}-{safe}.cfg", i + 1),
            d.text.as_bytes(),
        );
    }
    Ok(archive.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_ramdisk_are_rewritten_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("ferro-domains-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("rd.img"), b"r").unwrap();
        let cfg = dir.join("a.cfg");
        std::fs::write(&cfg, "name = \"alpha\"\nkernel = \"vmlinux\"\nramdisk='rd.img';\nmemory = 64\non_reboot = \"restart\"\n").unwrap();
        let known = Known {
            testguest: None,
            linux: None,
        };
        let d = load(&cfg, 0, &known).unwrap();
        assert_eq!(d.name, "alpha");
        assert_eq!(d.memory_mib, 64);
        assert_eq!(
            d.text,
            "name = \"alpha\"\nkernel = \"files/d01-kernel-vmlinux\"\nramdisk = \"files/d01-ramdisk-rd.img\"\nmemory = 64\non_reboot = \"restart\"\n"
        );
        assert_eq!(d.files.len(), 2);
        assert!(!bundle(&[d]).unwrap().is_empty());
        std::fs::write(&cfg, "name = \"b\"\nkernel = \"@nothing\"\n").unwrap();
        assert!(load(&cfg, 0, &known)
            .unwrap_err()
            .to_string()
            .contains("unknown name"));
        std::fs::write(&cfg, "name = \"b\"\n").unwrap();
        assert!(load(&cfg, 0, &known)
            .unwrap_err()
            .to_string()
            .contains("no `kernel"));
        std::fs::write(&cfg, "kernel = \"@testguest\"\n").unwrap();
        assert!(load(&cfg, 0, &known)
            .unwrap_err()
            .to_string()
            .contains("not available"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn values_parse_like_xl() {
        assert_eq!(value_of("kernel = \"x\"", "kernel").as_deref(), Some("x"));
        assert_eq!(value_of("  kernel='y' ;", "kernel").as_deref(), Some("y"));
        assert_eq!(value_of("kernelx = \"x\"", "kernel"), None);
        assert_eq!(value_of("# kernel = \"x\"", "kernel"), None);
    }
}
