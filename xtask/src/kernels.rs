//! Turns a scenario's [`KernelSource`] into a file on the host: the built test guest as
//! it is, the cached Linux guest, or one of the deliberately broken kernels the
//! hypervisor must refuse.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ferrovisor_tests::{Domain, KernelSource};

use crate::bundle::BundledDomain;
use crate::guest::{self, LinuxGuest};

/// The built guests kernels can come from.
#[derive(Clone, Copy, Debug)]
pub struct Guests<'a> {
    /// The built test guest.
    pub testguest: &'a Path,
    /// The Linux guest, when it was prepared (`cargo xtask guest`).
    pub linux: Option<&'a LinuxGuest>,
}

impl Guests<'_> {
    fn linux(&self) -> Result<&LinuxGuest> {
        match self.linux {
            Some(g) => Ok(g),
            None => bail!("the Linux guest was not prepared (`cargo xtask guest`)"),
        }
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift64*): the same seed gives the same file.
pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    // xorshift never leaves the all-zero state: replace a zero seed.
    let mut x = if seed == 0 {
        0x9e37_79b9_7f4a_7c15
    } else {
        seed
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where [`elf_without_pvh_note`] loads: the traditional 1 MiB kernel address.
const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal valid ELF64 x86-64 `ET_EXEC`: the file header, one `PT_LOAD` program
/// header mapping the whole file at 1 MiB, and four bytes of code (`cli; hlt; jmp
/// hlt`) as the entry point. No `PT_NOTE`, so no PVH entry note.
pub fn elf_without_pvh_note() -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let code: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
    let code_off = u64::from(EHDR + PHDR);
    let total = code_off + code.len() as u64;

    let mut f = Vec::with_capacity(total as usize);
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV, padding.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type = ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine = EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(LOAD_ADDR + code_off).to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no section headers
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&EHDR.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&PHDR.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // The one program header: PT_LOAD, R+X, the whole file at LOAD_ADDR.
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type = PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags = PF_R | PF_X
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&total.to_le_bytes()); // p_filesz
    f.extend_from_slice(&total.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(&code);
    debug_assert_eq!(f.len() as u64, total);
    f
}

/// The length of an ELF64 file's loadable part: the end of the furthest `PT_LOAD`
/// segment's bytes in the file. `None` when `elf` is not an ELF64 file with one.
///
/// A truncated kernel is cut at a percentage of this length, not of the whole file:
/// the test guest's debug information and section headers follow its segments and
/// make up most of the file, so cutting the whole file in half would leave every
/// segment intact.
pub fn loadable_len(elf: &[u8]) -> Option<usize> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    let mut end = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 1 {
            let seg_end = u64_at(ph + 8)?.checked_add(u64_at(ph + 32)?)?;
            end = end.max(Some(usize::try_from(seg_end).ok()?));
        }
    }
    end.filter(|&e| e <= elf.len())
}

/// Writes a generated file to `dir/<stem>/<file>` and returns its path.
fn generated_file(dir: &Path, stem: &str, file: &str, bytes: Vec<u8>) -> Result<PathBuf> {
    let dir = dir.join(stem);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(file);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes (when needed) the kernel described by `source` and returns its host path.
///
/// Generated kernels go to `dir/<stem>/`, named after the kind of breakage.
pub fn materialise(
    source: &KernelSource,
    guests: Guests,
    dir: &Path,
    stem: &str,
) -> Result<PathBuf> {
    let generated = |file: &str, bytes: Vec<u8>| generated_file(dir, stem, file, bytes);
    let testguest = guests.testguest;
    match source {
        KernelSource::TestGuest => Ok(testguest.to_path_buf()),
        KernelSource::LinuxGuest => Ok(guests.linux()?.vmlinuz.clone()),
        KernelSource::TruncatedLinux { keep_percent } => {
            ensure!(
                *keep_percent < 100,
                "a truncated kernel keeps less than 100%"
            );
            let path = &guests.linux()?.vmlinuz;
            let full =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let keep = full.len() * usize::from(*keep_percent) / 100;
            generated("vmlinuz", full[..keep].to_vec())
        }
        KernelSource::CorruptLinux => {
            let path = &guests.linux()?.vmlinuz;
            let mut full =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            // the middle of the file lies well inside the compressed payload
            let mid = full.len() / 2;
            ensure!(
                full.len() > 1 << 20,
                "{} is too small to be Debian's kernel",
                path.display()
            );
            for b in &mut full[mid..mid + 64] {
                *b = !*b;
            }
            generated("vmlinuz", full)
        }
        KernelSource::Path(p) => {
            ensure!(p.is_file(), "kernel {} is not a file", p.display());
            Ok(p.clone())
        }
        KernelSource::Garbage { len, seed } => generated("garbage.bin", garbage(*len, *seed)),
        KernelSource::ElfWithoutPvhNote => generated("no-pvh-note.elf", elf_without_pvh_note()),
        KernelSource::TruncatedTestGuest {
            keep_bytes_fraction_percent: pct,
        } => {
            ensure!(*pct < 100, "a truncated test guest keeps less than 100%");
            let full = std::fs::read(testguest)
                .with_context(|| format!("reading {}", testguest.display()))?;
            let keep = loadable_len(&full).unwrap_or(full.len()) * usize::from(*pct) / 100;
            generated("testguest-truncated", full[..keep].to_vec())
        }
    }
}

/// The ramdisk of a Linux guest domain: its initramfs, followed by the archive holding
/// `/ferro/cmd` when the domain has a command (written to `dir/<stem>/`).
fn linux_ramdisk(d: &Domain, guests: Guests, dir: &Path, stem: &str) -> Result<PathBuf> {
    let g = guests.linux()?;
    ensure!(
        d.ramdisk.is_none(),
        "domain {}: a Linux guest domain gets its initramfs, not a generated ramdisk",
        d.name
    );
    match &d.linux_cmd {
        None => Ok(g.initramfs.clone()),
        Some(cmd) => {
            let out = dir
                .join(stem)
                .join(format!("{}-initramfs+cmd.cpio", d.name));
            guest::ramdisk_with_command(&g.initramfs, cmd, &out)?;
            Ok(out)
        }
    }
}

/// Materialises every domain's kernel and describes the domains for the bundle.
///
/// Generated kernels are written to `dir/<stem>/` (`stem` is the scenario's name).
pub fn prepare(
    domains: &[Domain],
    guests: Guests,
    dir: &Path,
    stem: &str,
) -> Result<Vec<BundledDomain>> {
    domains
        .iter()
        .map(|d| {
            ensure!(
                d.linux_cmd.is_none() || d.kernel == KernelSource::LinuxGuest,
                "domain {}: only a Linux guest domain runs a command",
                d.name
            );
            Ok(BundledDomain {
                name: d.name.clone(),
                kernel: materialise(&d.kernel, guests, dir, stem)?,
                ramdisk: match d.ramdisk {
                    _ if d.kernel == KernelSource::LinuxGuest => {
                        Some(linux_ramdisk(d, guests, dir, stem)?)
                    }
                    Some((len, seed)) => Some(generated_file(
                        dir,
                        stem,
                        "ramdisk.bin",
                        garbage(len, seed),
                    )?),
                    None => None,
                },
                cmdline: d.cmdline.clone(),
                memory_mib: d.memory_mib,
                vcpus: d.vcpus,
                test_interface: d.test_interface,
                evtchn_fifo: d.evtchn_fifo,
                pci: d.pci.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn loadable_len_ends_at_the_last_segment() {
        let mut f = elf_without_pvh_note();
        let len = f.len();
        assert_eq!(loadable_len(&f), Some(len));
        f.extend_from_slice(&[0; 1000]); // debug info, section headers...
        assert_eq!(loadable_len(&f), Some(len));
        assert_eq!(loadable_len(&garbage(4096, 1)), None);
        assert_eq!(loadable_len(&f[..len - 1]), None, "segment past the end");
    }

    #[test]
    fn garbage_is_deterministic_and_not_elf() {
        let a = garbage(4096, 42);
        assert_eq!(a.len(), 4096);
        assert_eq!(a, garbage(4096, 42));
        assert_ne!(a, garbage(4096, 43));
        assert_ne!(&a[..4], b"\x7fELF");
        assert_eq!(garbage(3, 0).len(), 3);
        assert!(garbage(64, 0).iter().any(|&b| b != 0));
    }

    #[test]
    fn minimal_elf_is_well_formed() {
        let f = elf_without_pvh_note();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(f[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(&f, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&f, 18), 0x3e, "EM_X86_64");
        let phoff = u64_at(&f, 32) as usize;
        assert_eq!(u16_at(&f, 52), 64, "e_ehsize");
        assert_eq!(u16_at(&f, 54), 56, "e_phentsize");
        assert_eq!(u16_at(&f, 56), 1, "one program header");
        assert_eq!(u32_at(&f, phoff), 1, "PT_LOAD");
        assert_eq!(u64_at(&f, phoff + 16), LOAD_ADDR);
        let filesz = u64_at(&f, phoff + 32);
        assert_eq!(filesz, f.len() as u64);
        let entry = u64_at(&f, 24);
        assert!(entry >= LOAD_ADDR && entry < LOAD_ADDR + filesz);
        assert_eq!(f[(entry - LOAD_ADDR) as usize], 0xfa, "entry is the cli");
    }
}
