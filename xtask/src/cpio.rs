//! A writer for uncompressed cpio archives in the "newc" format (magic `070701`), the
//! format of the boot bundle the hypervisor receives as its one boot module.
//!
//! Each entry is a 110-byte ASCII header (the magic and thirteen 8-digit hex fields),
//! the NUL-terminated name padded so that header and name together are a multiple of 4
//! bytes, then the data padded to a multiple of 4. A `TRAILER!!!` entry ends the archive.
//! Only regular files are written; timestamps and owners are zero so that the same
//! inputs always give the same bytes.

/// Builds a newc archive in memory.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

/// Mode of the regular files written: `S_IFREG | 0644`.
const FILE_MODE: u32 = 0o100_644;

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Appends a regular file named `name` (a relative path such as `files/testguest`).
    pub fn add_file(&mut self, name: &str, data: &[u8]) {
        self.next_ino += 1;
        self.entry(self.next_ino, FILE_MODE, name, data);
    }

    /// Writes the trailer and returns the archive's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(0, 0, "TRAILER!!!", &[]);
        self.bytes
    }

    fn entry(&mut self, ino: u32, mode: u32, name: &str, data: &[u8]) {
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
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
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
