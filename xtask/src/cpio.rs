//! A writer for uncompressed cpio archives in the "newc" format (magic `070701`), the
//! format of the boot bundle the hypervisor receives as its one boot module and of the
//! Linux guest's initramfs.
//!
//! Each entry is a 110-byte ASCII header (the magic and thirteen 8-digit hex fields),
//! the NUL-terminated name padded so that header and name together are a multiple of 4
//! bytes, then the data padded to a multiple of 4. A `TRAILER!!!` entry ends the archive.
//! Regular files, directories, symbolic links (the target is the data) and character
//! devices are written; timestamps and owners are zero so that the same inputs always
//! give the same bytes. Every entry has its own inode number and one link, so Linux never
//! takes two entries for hard links of each other, even across concatenated archives.

/// The (name, data) of every entry of a newc archive, in order, up to the trailer;
/// `Err` for a malformed archive.
pub fn entries(bytes: &[u8]) -> anyhow::Result<Vec<(String, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let field = |h: &[u8], i: usize| -> anyhow::Result<usize> {
        let text = std::str::from_utf8(&h[6 + i * 8..14 + i * 8])?;
        Ok(usize::from_str_radix(text, 16)?)
    };
    loop {
        let Some(h) = bytes.get(at..at + 110) else {
            anyhow::bail!("cpio archive truncated at byte {at}");
        };
        if &h[..6] != b"070701" {
            anyhow::bail!("no cpio newc header at byte {at}");
        }
        let (filesize, namesize) = (field(h, 6)?, field(h, 11)?);
        let name_end = at + 110 + namesize;
        let name = bytes
            .get(at + 110..name_end.saturating_sub(1))
            .ok_or_else(|| anyhow::anyhow!("cpio name truncated at byte {at}"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_at = name_end.next_multiple_of(4);
        let data = bytes
            .get(data_at..data_at + filesize)
            .ok_or_else(|| anyhow::anyhow!("cpio entry '{name}' truncated"))?;
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        out.push((name, data));
        at = (data_at + filesize).next_multiple_of(4);
    }
}

/// Builds a newc archive in memory.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

/// Mode of the regular files written by [`Archive::add_file`]: `S_IFREG | 0644`.
const FILE_MODE: u32 = 0o100_644;
/// File type bits of a regular file.
const S_IFREG: u32 = 0o100_000;
/// File type bits of a directory.
const S_IFDIR: u32 = 0o040_000;
/// File type bits of a symbolic link.
const S_IFLNK: u32 = 0o120_000;
/// File type bits of a character device.
const S_IFCHR: u32 = 0o020_000;

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Appends a regular file named `name` (a relative path such as `files/testguest`).
    pub fn add_file(&mut self, name: &str, data: &[u8]) {
        self.next(FILE_MODE, name, data, (0, 0));
    }

    /// Appends a regular file with permission bits `perm` (e.g. `0o755`).
    pub fn add_file_with_mode(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.next(S_IFREG | (perm & 0o7777), name, data, (0, 0));
    }

    /// Appends a directory with permission bits `perm`. Linux creates entries in archive
    /// order, so a directory must come before what it holds.
    pub fn add_dir(&mut self, name: &str, perm: u32) {
        self.next(S_IFDIR | (perm & 0o7777), name, &[], (0, 0));
    }

    /// Appends a symbolic link `name` pointing to `target`.
    pub fn add_symlink(&mut self, name: &str, target: &str) {
        self.next(S_IFLNK | 0o777, name, target.as_bytes(), (0, 0));
    }

    /// Appends a character device node `major:minor` with permission bits `perm`.
    pub fn add_char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.next(S_IFCHR | (perm & 0o7777), name, &[], (major, minor));
    }

    /// Writes the trailer and returns the archive's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(0, 0, "TRAILER!!!", &[], (0, 0));
        self.bytes
    }

    fn next(&mut self, mode: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
        self.next_ino += 1;
        self.entry(self.next_ino, mode, name, data, rdev);
    }

    fn entry(&mut self, ino: u32, mode: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
        let namesize = name.len() + 1;
        let filesize = u32::try_from(data.len()).expect("cpio newc entries are below 4 GiB");
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            filesize,
            0,      // devmajor
            0,      // devminor
            rdev.0, // rdevmajor
            rdev.1, // rdevminor
            u32::try_from(namesize).expect("short name"),
            0, // check (only used by the "crc" variant)
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad4();
        self.bytes.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_what_was_written() {
        let mut a = Archive::new();
        a.add_file("domains/a.cfg", b"name = \"a\"\n");
        a.add_dir("files", 0o755);
        a.add_file("files/k", &[1, 2, 3, 4, 5]);
        let bytes = a.finish();
        let e = super::entries(&bytes).unwrap();
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["domains/a.cfg", "files", "files/k"]);
        assert_eq!(e[2].1, &[1, 2, 3, 4, 5]);
        assert!(super::entries(&bytes[..bytes.len() - 130]).is_err());
    }

    #[test]
    fn one_file_archive_has_known_bytes() {
        let mut a = Archive::new();
        a.add_file("a/b", b"hello");
        let got = a.finish();

        let mut want = Vec::new();
        // magic, ino 1, mode 0100644, uid, gid, nlink 1, mtime, filesize 5,
        // devmajor, devminor, rdevmajor, rdevminor, namesize 4, check
        want.extend_from_slice(
            b"070701\
              00000001000081a4000000000000000000000001\
              000000000000000500000000000000000000000000000000\
              0000000400000000",
        );
        want.extend_from_slice(b"a/b\0"); // 110 + 4 = 114 -> pad to 116
        want.extend_from_slice(b"\0\0");
        want.extend_from_slice(b"hello\0\0\0"); // 5 -> pad to 8
        want.extend_from_slice(
            b"070701\
              00000000000000000000000000000000000000010000000000000000\
              00000000000000000000000000000000\
              0000000b00000000",
        );
        want.extend_from_slice(b"TRAILER!!!\0"); // 110 + 11 = 121 -> pad to 124
        want.extend_from_slice(b"\0\0\0");

        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(got, want);
        assert_eq!(got.len(), 116 + 8 + 124);
    }

    /// Every entry of a newc archive as (name, mode, rdevmajor, rdevminor, data).
    fn entries(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        let field = |b: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        loop {
            let h = &bytes[at..at + 110];
            assert_eq!(&h[..6], b"070701");
            let (mode, size, rmaj, rmin, namesize) = (
                field(h, 1),
                field(h, 6),
                field(h, 9),
                field(h, 10),
                field(h, 11),
            );
            let name_at = at + 110;
            let name = std::str::from_utf8(&bytes[name_at..name_at + namesize as usize - 1])
                .unwrap()
                .to_string();
            let data_at = (name_at + namesize as usize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size as usize].to_vec();
            at = (data_at + size as usize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len());
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn every_kind_of_entry_round_trips() {
        let mut a = Archive::new();
        a.add_dir("dev", 0o755);
        a.add_char_device("dev/console", 0o600, 5, 1);
        a.add_file_with_mode("init", 0o755, b"#!/bin/sh\n");
        a.add_symlink("bin/sh", "busybox");
        let got = entries(&a.finish());
        assert_eq!(
            got,
            vec![
                ("dev".into(), 0o040_755, 0, 0, vec![]),
                ("dev/console".into(), 0o020_600, 5, 1, vec![]),
                ("init".into(), 0o100_755, 0, 0, b"#!/bin/sh\n".to_vec()),
                ("bin/sh".into(), 0o120_777, 0, 0, b"busybox".to_vec()),
            ]
        );
    }

    #[test]
    fn headers_stay_aligned_for_any_name_length() {
        for n in 1..12 {
            let name = "x".repeat(n);
            let mut a = Archive::new();
            a.add_file(&name, &vec![7; n]);
            a.add_file("second", b"");
            let bytes = a.finish();
            assert_eq!(bytes.len() % 4, 0);
            // The second header starts on a 4-byte boundary right after the first entry.
            let first = (110 + n + 1).next_multiple_of(4) + n.next_multiple_of(4);
            assert_eq!(&bytes[first..first + 6], b"070701", "name length {n}");
        }
    }
}
