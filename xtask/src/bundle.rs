//! The boot bundle: the one module QEMU hands the hypervisor (`-initrd`), a cpio archive
//! holding one `domains/NN-<name>.cfg` per domain in `xl.cfg` syntax and every file those
//! configurations refer to under `files/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cpio::Archive;

/// A domain ready to be bundled: its kernel (and ramdisk) are files on the host.
#[derive(Clone, Debug)]
pub struct BundledDomain {
    /// `name = "..."`.
    pub name: String,
    /// Host path of the kernel.
    pub kernel: PathBuf,
    /// Host path of the ramdisk, if any.
    pub ramdisk: Option<PathBuf>,
    /// `cmdline = "..."`.
    pub cmdline: String,
    /// `memory = N` (MiB).
    pub memory_mib: u64,
    /// `vcpus = N`.
    pub vcpus: u32,
    /// `test_interface = 1` when set.
    pub test_interface: bool,
    /// `evtchn_fifo = 0` when clear (the hypervisor then refuses the FIFO ABI).
    pub evtchn_fifo: bool,
    /// `pci = [...]`: PCI devices assigned to the domain.
    pub pci: Vec<String>,
}

/// Quotes `s` as an `xl.cfg` string: double quotes, with backslash escapes for `"`,
/// `\`, newline, tab, carriage return and other control characters (`\xHH`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `xl.cfg` text of a domain whose kernel and ramdisk sit at `kernel` and `ramdisk`
/// inside the bundle.
pub fn domain_cfg(d: &BundledDomain, kernel: &str, ramdisk: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("name = {}\n", quote(&d.name)));
    s.push_str("type = \"pvh\"\n");
    s.push_str(&format!("kernel = {}\n", quote(kernel)));
    if let Some(r) = ramdisk {
        s.push_str(&format!("ramdisk = {}\n", quote(r)));
    }
    s.push_str(&format!("cmdline = {}\n", quote(&d.cmdline)));
    s.push_str(&format!("memory = {}\n", d.memory_mib));
    s.push_str(&format!("vcpus = {}\n", d.vcpus));
    if !d.evtchn_fifo {
        s.push_str("evtchn_fifo = 0\n");
    }
    if d.test_interface {
        s.push_str("test_interface = 1\n");
    }
    if !d.pci.is_empty() {
        let list: Vec<String> = d.pci.iter().map(|p| quote(p)).collect();
        s.push_str(&format!("pci = [ {} ]\n", list.join(", ")));
    }
    s
}

/// Makes a string safe as one path component of an archive name.
fn file_safe(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        "file".to_string()
    } else {
        cleaned
    }
}

/// Names files inside the bundle: `files/<basename>`, one entry per host file, with a
/// numeric prefix when two different host files share a basename.
#[derive(Default)]
struct FileNames {
    by_host_path: BTreeMap<PathBuf, String>,
    taken: BTreeSet<String>,
}

impl FileNames {
    /// Returns the bundle name of `path` and whether it is new (so must be stored).
    fn name_for(&mut self, path: &Path) -> (String, bool) {
        if let Some(n) = self.by_host_path.get(path) {
            return (n.clone(), false);
        }
        let base = file_safe(
            &path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut name = format!("files/{base}");
        let mut i = 2;
        while self.taken.contains(&name) {
            name = format!("files/{i}-{base}");
            i += 1;
        }
        self.taken.insert(name.clone());
        self.by_host_path.insert(path.to_path_buf(), name.clone());
        (name, true)
    }
}

/// Builds the bundle's bytes for `domains` (domain `i` gets `domains/NN-<name>.cfg`,
/// NN = i + 1 on two digits, so the hypervisor's lexical order is the given order).
pub fn build(domains: &[BundledDomain]) -> Result<Vec<u8>> {
    if domains.is_empty() {
        bail!("a boot bundle needs at least one domain");
    }
    if domains.len() > 99 {
        bail!("at most 99 domains fit the NN- prefix of the bundle's names");
    }
    let mut archive = Archive::new();
    let mut names = FileNames::default();
    let mut add = |archive: &mut Archive, path: &Path| -> Result<String> {
        let (name, new) = names.name_for(path);
        if new {
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            archive.add_file(&name, &data);
        }
        Ok(name)
    };
    for (i, d) in domains.iter().enumerate() {
        let kernel = add(&mut archive, &d.kernel)?;
        let ramdisk = match &d.ramdisk {
            Some(r) => Some(add(&mut archive, r)?),
            None => None,
        };
        let cfg = domain_cfg(d, &kernel, ramdisk.as_deref());
        let cfg_name = format!("domains/{:02}-{}.cfg", i + 1, file_safe(&d.name));
        archive.add_file(&cfg_name, cfg.as_bytes());
    }
    Ok(archive.finish())
}

/// Writes the bundle for `domains` to `out`, creating its directory.
pub fn write(out: &Path, domains: &[BundledDomain]) -> Result<()> {
    let bytes = build(domains)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, kernel: &Path) -> BundledDomain {
        BundledDomain {
            name: name.into(),
            kernel: kernel.into(),
            ramdisk: None,
            cmdline: "test=exits".into(),
            memory_mib: 32,
            vcpus: 1,
            test_interface: true,
            evtchn_fifo: true,
            pci: Vec::new(),
        }
    }

    #[test]
    fn quoting_escapes_what_xl_cfg_needs() {
        assert_eq!(quote("test=exits"), "\"test=exits\"");
        assert_eq!(quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(quote("x\ny\t\u{1}"), "\"x\\ny\\t\\x01\"");
    }

    #[test]
    fn cfg_matches_the_documented_shape() {
        let d = domain("testguest", Path::new("/x/testguest"));
        assert_eq!(
            domain_cfg(&d, "files/testguest", None),
            "name = \"testguest\"\ntype = \"pvh\"\nkernel = \"files/testguest\"\n\
             cmdline = \"test=exits\"\nmemory = 32\nvcpus = 1\ntest_interface = 1\n"
        );
        let d = BundledDomain {
            test_interface: false,
            ..d
        };
        let cfg = domain_cfg(&d, "files/k", Some("files/initrd"));
        assert!(cfg.contains("ramdisk = \"files/initrd\"\n"));
        assert!(!cfg.contains("test_interface"));
    }

    #[test]
    fn files_are_stored_once_and_names_do_not_clash() {
        let mut n = FileNames::default();
        assert_eq!(n.name_for(Path::new("/a/k")), ("files/k".to_string(), true));
        assert_eq!(
            n.name_for(Path::new("/a/k")),
            ("files/k".to_string(), false)
        );
        assert_eq!(
            n.name_for(Path::new("/b/k")),
            ("files/2-k".to_string(), true)
        );
        assert_eq!(
            n.name_for(Path::new("/b/a b")),
            ("files/a_b".to_string(), true)
        );
    }

    #[test]
    fn bundle_lists_domains_in_order() {
        let dir = std::env::temp_dir().join(format!("xtask-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("testguest");
        std::fs::write(&k, b"ELF").unwrap();
        let bytes = build(&[domain("crasher", &k), domain("testguest", &k)]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let kernel = text.find("files/testguest\0").unwrap();
        let first = text.find("domains/01-crasher.cfg\0").unwrap();
        let second = text.find("domains/02-testguest.cfg\0").unwrap();
        assert!(kernel < first && first < second);
        assert_eq!(text.matches("files/testguest\0").count(), 1);
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }
}
