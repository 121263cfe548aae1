//! `cargo xtask guest`: the Linux guest, Debian's kernel with a small busybox initramfs.
//!
//! `linux-image-amd64` is resolved to the versioned kernel package it depends on today
//! (`apt-cache depends`), which is fetched with `apt-get download` (never installed)
//! together with `busybox-static`. The result is cached per kernel release under
//! `target/guest/<release>/`:
//!
//! - `vmlinuz`: the kernel as Debian ships it (a bzImage; the hypervisor unpacks it);
//! - `initramfs.cpio`: an uncompressed newc archive: `/init` (`init.sh` beside this
//!   file), busybox, `/dev/console` and `/dev/null`, and the modules of [`MODULES`] with
//!   the modules they depend on, plus a `modules.dep` for them;
//! - `manifest`: what was built from what;
//! - `parts/`: busybox and the modules, so that a change of `/init` rebuilds the
//!   initramfs without downloading again.
//!
//! A command for the guest travels as a second cpio archive holding `/ferro/cmd`,
//! appended to the initramfs ([`ramdisk_with_command`]): Linux unpacks concatenated
//! archives in order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::cpio::Archive;
use crate::say;
use crate::sys::{self, Requirement};

/// The metapackage that names Debian's current kernel.
pub const META_PACKAGE: &str = "linux-image-amd64";
/// Statically linked busybox: the initramfs' shell and tools.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules put in the initramfs (with their dependencies); none is loaded at boot.
pub const MODULES: &[&str] = &["xen-netfront"];
/// The initramfs' `/init`.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Bumped whenever the initramfs' layout changes, so that caches are rebuilt.
const LAYOUT_VERSION: u32 = 1;

/// Debian tools `cargo xtask guest` runs.
pub const TOOLS: &[Requirement] = &[
    Requirement {
        command: "apt-get",
        package: "apt",
        why: "downloads the kernel and busybox packages",
        optional: false,
    },
    Requirement {
        command: "apt-cache",
        package: "apt",
        why: "finds the kernel package linux-image-amd64 stands for",
        optional: false,
    },
    Requirement {
        command: "dpkg-deb",
        package: "dpkg",
        why: "unpacks the downloaded packages",
        optional: false,
    },
];

/// The Linux guest, ready on disk.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// `target/guest/<release>/`.
    pub dir: PathBuf,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The initramfs (uncompressed cpio newc).
    pub initramfs: PathBuf,
}

/// `target/guest/`.
pub fn cache_root() -> PathBuf {
    sys::workspace_root().join("target").join("guest")
}

/// The options of `cargo xtask guest`.
#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// Download and build again even when the cache is complete.
    #[arg(long)]
    pub force: bool,
}

/// Runs `cargo xtask guest`.
pub fn guest(args: GuestArgs) -> Result<()> {
    let g = prepare(args.force)?;
    say!("manifest:  {}", g.dir.join("manifest").display());
    say!("kernel:    {}", g.vmlinuz.display());
    say!("initramfs: {}", g.initramfs.display());
    Ok(())
}

/// Makes sure the Linux guest of today's `linux-image-amd64` is in the cache (downloading
/// and building what is missing or stale) and returns it. With `force`, everything is
/// downloaded and built again.
pub fn prepare(force: bool) -> Result<LinuxGuest> {
    sys::ensure(TOOLS)?;
    let root = cache_root();
    let package = match resolve_kernel_package(&root)? {
        Resolved::Package(p) => p,
        Resolved::Cached(g) => return Ok(g),
    };
    let release = package
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_string();
    let dir = root.join(&release);
    let guest = LinuxGuest {
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        release: release.clone(),
        dir: dir.clone(),
    };

    if !force {
        match cache_state(&dir) {
            CacheState::Complete => {
                say!(
                    "Linux guest {release}: cached in {} (initramfs {})",
                    dir.display(),
                    human_size(file_len(&guest.initramfs))
                );
                return Ok(guest);
            }
            CacheState::StaleInitramfs(manifest) => {
                say!("Linux guest {release}: the initramfs recipe changed");
                rebuild_initramfs(&dir, &release, manifest)?;
                return Ok(guest);
            }
            CacheState::Missing => {}
        }
    }
    build_from_scratch(&root, &package, &release)?;
    Ok(guest)
}

enum Resolved {
    Package(String),
    /// apt knows nothing and cannot be updated here, but a guest is cached.
    Cached(LinuxGuest),
}

/// The versioned kernel package `linux-image-amd64` depends on, from `apt-cache depends`
/// output: the first `Depends: linux-image-...` that is a real package.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let dep = l
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        (dep.starts_with("linux-image-") && !dep.contains('<') && !dep.contains(' '))
            .then(|| dep.to_string())
    })
}

fn output_of(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", sys::shell_line(cmd)))
}

fn kernel_package_from_apt() -> Result<Option<String>> {
    let out = output_of(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
}

fn apt_get_update() -> Result<()> {
    sys::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

fn resolve_kernel_package(root: &Path) -> Result<Resolved> {
    if let Some(p) = kernel_package_from_apt()? {
        return Ok(Resolved::Package(p));
    }
    if sys::is_root() {
        say!("apt-cache knows no {META_PACKAGE}: updating the package lists");
        apt_get_update()?;
        if let Some(p) = kernel_package_from_apt()? {
            return Ok(Resolved::Package(p));
        }
        bail!("apt-cache still knows no {META_PACKAGE} after apt-get update: is a Debian mirror configured?");
    }
    if let Some(g) = newest_cached(root) {
        say!(
            "warning: apt-cache knows no {META_PACKAGE} (run `sudo apt-get update`); \
             using the cached Linux guest {}",
            g.release
        );
        return Ok(Resolved::Cached(g));
    }
    bail!(
        "apt-cache knows no {META_PACKAGE}: update the package lists first, as root:\n  \
         sudo apt-get update\nthen run `cargo xtask guest` again"
    )
}

/// The newest complete guest in the cache, by modification time of its manifest.
fn newest_cached(root: &Path) -> Option<LinuxGuest> {
    let mut best: Option<(std::time::SystemTime, LinuxGuest)> = None;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        if !matches!(cache_state(&dir), CacheState::Complete) {
            continue;
        }
        let release = entry.file_name().to_string_lossy().into_owned();
        let time = std::fs::metadata(dir.join("manifest"))
            .and_then(|m| m.modified())
            .ok()?;
        if best.as_ref().is_none_or(|(t, _)| time > *t) {
            best = Some((
                time,
                LinuxGuest {
                    vmlinuz: dir.join("vmlinuz"),
                    initramfs: dir.join("initramfs.cpio"),
                    release,
                    dir,
                },
            ));
        }
    }
    best.map(|(_, g)| g)
}

// ---------------------------------------------------------------------------------------
// The cache

/// A 64-bit FNV-1a hash: enough to notice that the initramfs recipe changed.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Fingerprint of how the initramfs is made from its parts.
fn recipe() -> String {
    format!(
        "{:016x}",
        fnv1a(&[
            &LAYOUT_VERSION.to_le_bytes(),
            INIT_SCRIPT.as_bytes(),
            MODULES.join(",").as_bytes(),
        ])
    )
}

/// `key = value` lines, `#` comments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest(BTreeMap<String, String>);

impl Manifest {
    /// Parses a manifest's text.
    pub fn parse(text: &str) -> Manifest {
        Manifest(
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn set(&mut self, key: &str, value: impl Into<String>) {
        self.0.insert(key.to_string(), value.into());
    }

    fn text(&self) -> String {
        let mut s = String::from(
            "# Linux guest of ferrovisor, made by `cargo xtask guest` (delete the directory \
             to make it again)\n",
        );
        for (k, v) in &self.0 {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s
    }
}

enum CacheState {
    Complete,
    /// Kernel and parts are there, the initramfs is missing or from another recipe.
    StaleInitramfs(Manifest),
    Missing,
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn cache_state(dir: &Path) -> CacheState {
    let Ok(text) = std::fs::read_to_string(dir.join("manifest")) else {
        return CacheState::Missing;
    };
    let m = Manifest::parse(&text);
    let size_ok = |key: &str, file: &str| {
        m.get(key).and_then(|v| v.parse::<u64>().ok()) == Some(file_len(&dir.join(file)))
    };
    if !size_ok("vmlinuz_bytes", "vmlinuz") || !dir.join("parts").is_dir() {
        return CacheState::Missing;
    }
    if m.get("recipe") == Some(recipe().as_str()) && size_ok("initramfs_bytes", "initramfs.cpio") {
        CacheState::Complete
    } else {
        CacheState::StaleInitramfs(m)
    }
}

// ---------------------------------------------------------------------------------------
// Downloading and unpacking

/// `Version:` and `Size:` of a package, from `apt-cache show`.
fn package_info(package: &str) -> Result<(String, Option<u64>)> {
    let out = output_of(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let version = field("Version:")
        .with_context(|| format!("apt-cache show {package}: no Version (unknown package?)"))?;
    Ok((version, field("Size:").and_then(|s| s.parse().ok())))
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.0} kB", bytes as f64 / 1e3)
    }
}

/// Downloads `package` into `dir` with `apt-get download` and returns the `.deb` and its
/// version.
fn download(package: &str, dir: &Path) -> Result<(PathBuf, String)> {
    let (version, size) = package_info(package)?;
    let size = size
        .map(|s| format!(" ({})", human_size(s)))
        .unwrap_or_default();
    say!("downloading {package} {version}{size}...");
    let start = Instant::now();
    let prefix = format!("{package}_");
    let debs = || -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                v.push(p);
            }
        }
        Ok(v)
    };
    for old in debs()? {
        std::fs::remove_file(old)?;
    }
    let fetch = || {
        output_of(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir),
        )
    };
    let mut out = fetch()?;
    if !out.status.success() && sys::is_root() {
        // Stale lists name files the mirror no longer has.
        say!("apt-get download failed; updating the package lists and trying again");
        apt_get_update()?;
        out = fetch()?;
    }
    if !out.status.success() {
        bail!(
            "`apt-get download {package}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let found = debs()?;
    ensure!(
        found.len() == 1,
        "apt-get download {package}: expected one {prefix}*.deb in {}, found {}",
        dir.display(),
        found.len()
    );
    let deb = found.into_iter().next().unwrap_or_default();
    say!(
        "  {} in {:.1} s",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        start.elapsed().as_secs_f64()
    );
    Ok((deb, version))
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    std::fs::create_dir_all(into)?;
    let out = output_of(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))?;
    ensure!(
        out.status.success(),
        "dpkg-deb -x {} failed: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn remove_dir_if_there(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn build_from_scratch(root: &Path, package: &str, release: &str) -> Result<()> {
    let start = Instant::now();
    let downloads = root.join("downloads");
    let partial = root.join(format!("{release}.partial"));
    let dir = root.join(release);
    remove_dir_if_there(&partial)?;
    std::fs::create_dir_all(&downloads)?;
    std::fs::create_dir_all(&partial)?;

    let (kernel_deb, kernel_version) = download(package, &downloads)?;
    let (busybox_deb, busybox_version) = download(BUSYBOX_PACKAGE, &downloads)?;

    say!("unpacking {package}...");
    let unpacked = partial.join("unpacked");
    extract(&kernel_deb, &unpacked)?;
    extract(&busybox_deb, &unpacked)?;

    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    ensure!(vmlinuz.is_file(), "{package} has no boot/vmlinuz-{release}");
    std::fs::rename(&vmlinuz, partial.join("vmlinuz"))?;

    let parts = partial.join("parts");
    let bin = parts.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::rename(unpacked.join("bin").join("busybox"), bin.join("busybox"))
        .context("busybox-static has no bin/busybox")?;

    let moddir = ["lib", "usr/lib"]
        .iter()
        .map(|l| unpacked.join(l).join("modules").join(release))
        .find(|d| d.is_dir())
        .with_context(|| format!("{package} has no lib/modules/{release}"))?;
    let modules = collect_modules(&moddir, MODULES)?;
    let dest = parts.join("lib").join("modules").join(release);
    for m in &modules {
        let to = dest.join(&m.path);
        std::fs::create_dir_all(to.parent().unwrap_or(&dest))?;
        std::fs::write(&to, &m.bytes)?;
    }
    std::fs::write(dest.join("modules.dep"), modules_dep(&modules))?;
    remove_dir_if_there(&unpacked)?;

    let mut manifest = Manifest::default();
    manifest.set("release", release);
    manifest.set("kernel_package", package);
    manifest.set("kernel_version", kernel_version);
    manifest.set("busybox_version", busybox_version);
    manifest.set("vmlinuz", "vmlinuz (as shipped in /boot: a bzImage)");
    manifest.set(
        "vmlinuz_bytes",
        file_len(&partial.join("vmlinuz")).to_string(),
    );
    manifest.set(
        "modules",
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    );
    rebuild_initramfs(&partial, release, manifest)?;

    remove_dir_if_there(&dir)?;
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    remove_dir_if_there(&downloads)?;
    say!(
        "Linux guest {release} ready in {} ({:.1} s)",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Modules

/// A module going into the initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Its name as `depends=` spells it (file name without `.ko`).
    pub name: String,
    /// Path under `lib/modules/<release>/`, always ending in `.ko` (decompressed).
    pub path: String,
    /// The modules it needs, by name.
    pub depends: Vec<String>,
    /// The uncompressed `.ko`.
    pub bytes: Vec<u8>,
}

/// Module names compare with `-` and `_` taken as the same.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// Splits a module file name into its module name and compression (`ko`, `ko.xz`, ...).
fn module_file(name: &str) -> Option<(&str, &str)> {
    ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .into_iter()
        .find_map(|ext| Some((name.strip_suffix(&format!(".{ext}"))?, ext)))
}

/// Every module file under `moddir/kernel`, by [`module_key`], as paths relative to
/// `moddir`.
fn index_modules(moddir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut todo = vec![moddir.join("kernel")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                todo.push(p);
            } else if let Some((name, _)) = module_file(&e.file_name().to_string_lossy()) {
                let rel = p.strip_prefix(moddir)?.to_path_buf();
                index.insert(module_key(name), rel);
            }
        }
    }
    Ok(index)
}

/// Reads a module file, decompressing it when it is compressed.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tool = match module_file(&name).map(|(_, ext)| ext) {
        Some("ko.xz") => ("xz", "xz-utils"),
        Some("ko.zst") => ("zstd", "zstd"),
        Some("ko.gz") => ("gzip", "gzip"),
        _ => return std::fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    sys::ensure(&[Requirement {
        command: tool.0,
        package: tool.1,
        why: "decompresses kernel modules",
        optional: false,
    }])?;
    let out = output_of(Command::new(tool.0).arg("-dc").arg(path))?;
    ensure!(
        out.status.success(),
        "{} -dc {} failed",
        tool.0,
        path.display()
    );
    Ok(out.stdout)
}

/// The `.modinfo` strings of a module (an ELF64 relocatable file), as key/value pairs.
pub fn modinfo(ko: &[u8]) -> Result<Vec<(String, String)>> {
    let u16_at = |o: usize| ko.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        ko.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        ko.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    ensure!(
        ko.get(..6) == Some(b"\x7fELF\x02\x01"),
        "not a little-endian ELF64 file"
    );
    let bad = || anyhow::anyhow!("malformed section headers");
    let shoff = usize::try_from(u64_at(0x28).ok_or_else(bad)?)?;
    let shentsize = usize::from(u16_at(0x3a).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(0x3e).ok_or_else(bad)?);
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let off = usize::try_from(u64_at(h + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(h + 0x20)?).ok()?;
        Some((u32_at(h)?, ko.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or_else(bad)?;
        let name = names
            .get(name_off as usize..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|s| {
                    let s = String::from_utf8_lossy(s);
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// The modules a module's `depends=` names.
fn depends_of(ko: &[u8]) -> Result<Vec<String>> {
    Ok(modinfo(ko)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// `wanted` and every module they depend on, dependencies first, read from the module
/// tree `moddir` (`lib/modules/<release>/`). Debian ships no `modules.dep` (depmod runs
/// at install time), so each module's `.modinfo` `depends=` is read.
pub fn collect_modules(moddir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let index = index_modules(moddir)?;
    let mut done: Vec<Module> = Vec::new();
    let mut seen = BTreeSet::new();
    // Depth-first, emitting a module after its dependencies.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        moddir: &Path,
        seen: &mut BTreeSet<String>,
        done: &mut Vec<Module>,
        chain: &mut Vec<String>,
    ) -> Result<()> {
        let key = module_key(name);
        if chain.contains(&key) {
            bail!("module dependency cycle: {} -> {name}", chain.join(" -> "));
        }
        if !seen.insert(key.clone()) {
            return Ok(());
        }
        let rel = index.get(&key).with_context(|| {
            format!(
                "module {name} is not in {}{}",
                moddir.display(),
                chain
                    .last()
                    .map(|c| format!(" (needed by {c})"))
                    .unwrap_or_default()
            )
        })?;
        let bytes = read_module(&moddir.join(rel))?;
        let depends = depends_of(&bytes).with_context(|| format!("module {name}"))?;
        chain.push(key);
        for d in &depends {
            visit(d, index, moddir, seen, done, chain)?;
        }
        chain.pop();
        let rel = rel.to_string_lossy();
        let path = match module_file(&rel) {
            Some((stem, _)) => format!("{stem}.ko"),
            None => rel.into_owned(),
        };
        done.push(Module {
            name: name.to_string(),
            path,
            depends,
            bytes,
        });
        Ok(())
    }
    for w in wanted {
        visit(w, &index, moddir, &mut seen, &mut done, &mut Vec::new())?;
    }
    Ok(done)
}

/// A `modules.dep` for `modules` (in [`collect_modules`] order; busybox modprobe reads
/// it): `path: dep-path ...`, every module needed, the one to load first last.
pub fn modules_dep(modules: &[Module]) -> String {
    let find = |name: &str| {
        modules
            .iter()
            .position(|m| module_key(&m.name) == module_key(name))
    };
    let mut s = String::new();
    for (i, m) in modules.iter().enumerate() {
        let mut needed = BTreeSet::new();
        let mut todo: Vec<&str> = m.depends.iter().map(String::as_str).collect();
        while let Some(d) = todo.pop() {
            if let Some(j) = find(d) {
                if needed.insert(j) {
                    todo.extend(modules[j].depends.iter().map(String::as_str));
                }
            }
        }
        s.push_str(&m.path);
        s.push(':');
        // `modules` lists dependencies first: the reverse puts the first to load last.
        for j in (0..i).rev().filter(|j| needed.contains(j)) {
            s.push(' ');
            s.push_str(&modules[j].path);
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------
// The initramfs

/// Builds the initramfs from `parts` (`bin/busybox`, `lib/modules/<release>/...`).
pub fn initramfs(parts: &Path, release: &str) -> Result<Vec<u8>> {
    let busybox = std::fs::read(parts.join("bin").join("busybox"))
        .with_context(|| format!("reading {}/bin/busybox", parts.display()))?;
    // Files under lib/modules/<release>/, relative to parts.
    let mut module_files: Vec<String> = Vec::new();
    let mut todo = vec![parts.join("lib").join("modules").join(release)];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                module_files.push(e.path().strip_prefix(parts)?.to_string_lossy().into_owned());
            }
        }
    }
    module_files.sort();

    let mut dirs: BTreeSet<String> = [
        "bin", "dev", "etc", "lib", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin",
        "usr/sbin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for f in &module_files {
        let mut p = Path::new(f).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }

    let mut a = Archive::new();
    // Sorted, so every directory comes after its parent.
    for d in &dirs {
        let perm = match d.as_str() {
            "tmp" => 0o1777,
            "root" => 0o700,
            "proc" | "sys" => 0o555,
            _ => 0o755,
        };
        a.add_dir(d, perm);
    }
    a.add_char_device("dev/console", 0o600, 5, 1);
    a.add_char_device("dev/null", 0o666, 1, 3);
    a.add_file_with_mode("bin/busybox", 0o755, &busybox);
    a.add_symlink("bin/sh", "busybox");
    a.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    a.add_file("etc/group", b"root:x:0:\n");
    for f in &module_files {
        let data = std::fs::read(parts.join(f))?;
        a.add_file(f, &data);
    }
    a.add_file_with_mode("init", 0o755, INIT_SCRIPT.as_bytes());
    Ok(a.finish())
}

/// (Re)writes `dir/initramfs.cpio` from `dir/parts` and the manifest (last, so a cache
/// is complete only once everything is written).
fn rebuild_initramfs(dir: &Path, release: &str, mut manifest: Manifest) -> Result<()> {
    say!("building initramfs...");
    let bytes = initramfs(&dir.join("parts"), release)?;
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    manifest.set("initramfs", "initramfs.cpio (cpio newc, uncompressed)");
    manifest.set("initramfs_bytes", bytes.len().to_string());
    manifest.set("recipe", recipe());
    std::fs::write(dir.join("manifest"), manifest.text())?;
    say!("  initramfs.cpio: {}", human_size(bytes.len() as u64));
    Ok(())
}

/// The archive that carries a command: `/ferro/cmd`, mode 0755, holding `cmd` (with a
/// final newline).
pub fn command_archive(cmd: &str) -> Vec<u8> {
    let mut script = cmd.to_string();
    if !script.ends_with('\n') {
        script.push('\n');
    }
    let mut a = Archive::new();
    a.add_dir("ferro", 0o755);
    a.add_file_with_mode("ferro/cmd", 0o755, script.as_bytes());
    a.finish()
}

/// Writes `out`: the archive `initramfs` followed by [`command_archive`]`(cmd)`.
pub fn ramdisk_with_command(initramfs: &Path, cmd: &str, out: &Path) -> Result<()> {
    let mut bytes =
        std::fs::read(initramfs).with_context(|| format!("reading {}", initramfs.display()))?;
    ensure!(
        bytes.len().is_multiple_of(4),
        "{} does not end on a 4-byte boundary",
        initramfs.display()
    );
    bytes.extend_from_slice(&command_archive(cmd));
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_package_is_found() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let text = "linux-image-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.12.9-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(parse_depends(""), None);
        assert_eq!(parse_depends("  Depends: kmod\n"), None);
    }

    #[test]
    fn the_init_script_speaks_the_protocol() {
        use ferrovisor_tests::{CMD_FLAG, EXIT_MARKER, INIT_RUNNING, INIT_UP};
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        for s in [INIT_UP, INIT_RUNNING, CMD_FLAG] {
            assert!(INIT_SCRIPT.contains(s), "{s}");
        }
        assert!(INIT_SCRIPT.contains(&format!("echo \"{EXIT_MARKER} $status\"")));
        assert!(INIT_SCRIPT.contains("sh /ferro/cmd </dev/null 2>&1"));
        // It never loads a module (comments may talk about it).
        let code: Vec<&str> = INIT_SCRIPT
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(code
            .iter()
            .all(|l| !l.contains("insmod") && !l.contains("modprobe")));
    }

    #[test]
    fn manifests_round_trip() {
        let mut m = Manifest::default();
        m.set("release", "6.1.0-56-amd64");
        m.set("vmlinuz_bytes", "123");
        assert_eq!(Manifest::parse(&m.text()), m);
    }

    /// A relocatable ELF64 with a `.modinfo` section holding `info` and a section name
    /// table.
    fn fake_ko(info: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let info_off = f.len();
        f.extend_from_slice(info);
        let names_off = f.len();
        f.extend_from_slice(names);
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, info_off, info.len());
        sh(10, names_off, names.len());
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        f
    }

    #[test]
    fn modinfo_is_read_from_the_section() {
        let ko = fake_ko(b"license=GPL\0depends=mii,libphy\0name=r8169\0");
        assert_eq!(depends_of(&ko).unwrap(), ["mii", "libphy"]);
        let ko = fake_ko(b"depends=\0name=xen_netfront\0");
        assert!(depends_of(&ko).unwrap().is_empty());
        assert!(modinfo(b"not elf").is_err());
        assert!(modinfo(&fake_ko(b"x")[..70]).is_err());
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let dir = std::env::temp_dir().join(format!("xtask-mods-{}", std::process::id()));
        let k = dir.join("kernel");
        std::fs::create_dir_all(k.join("net")).unwrap();
        std::fs::create_dir_all(k.join("lib")).unwrap();
        std::fs::write(k.join("net/top-a.ko"), fake_ko(b"depends=mid,base\0")).unwrap();
        std::fs::write(k.join("lib/mid.ko"), fake_ko(b"depends=base\0")).unwrap();
        std::fs::write(k.join("lib/base.ko"), fake_ko(b"depends=\0")).unwrap();
        std::fs::write(k.join("lib/loop1.ko"), fake_ko(b"depends=loop2\0")).unwrap();
        std::fs::write(k.join("lib/loop2.ko"), fake_ko(b"depends=loop1\0")).unwrap();
        let mods = collect_modules(&dir, &["top_a"]).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["base", "mid", "top_a"]);
        assert_eq!(mods[2].path, "kernel/net/top-a.ko");
        assert_eq!(
            modules_dep(&mods),
            "kernel/lib/base.ko:\nkernel/lib/mid.ko: kernel/lib/base.ko\n\
             kernel/net/top-a.ko: kernel/lib/mid.ko kernel/lib/base.ko\n"
        );
        let err = collect_modules(&dir, &["loop1"]).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
        let err = collect_modules(&dir, &["nope"]).unwrap_err().to_string();
        assert!(err.contains("module nope is not in"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_command_archive_follows_the_initramfs() {
        let a = command_archive("exit 3");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("ferro\0") && text.contains("ferro/cmd\0"));
        assert!(text.contains("exit 3\n"));
        // Directory first, then the 0755 file.
        assert!(text.find("000041ed").unwrap() < text.find("000081ed").unwrap());
    }
}
