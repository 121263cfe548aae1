//! Reader for the boot bundle: an uncompressed cpio archive in "newc" format (magic
//! `070701`, or `070702` whose data checksums are verified), as written by
//! `cpio -H newc` and by xtask.
//!
//! Each entry is a 110-byte ASCII header (the magic and 13 fields of 8 hex digits),
//! the NUL-terminated name padded so that header + name is a multiple of 4, then the
//! data padded to 4. The archive ends with an entry named `TRAILER!!!`.
//!
//! The archive is untrusted input: every field and length is checked; nothing here
//! panics.

use core::fmt;

/// One archive member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Its path inside the archive, as stored (without the terminating NUL).
    pub name: &'a str,
    /// Its contents.
    pub data: &'a [u8],
    /// The `mode` field: file type and permission bits (`0o100644` for a file).
    pub mode: u32,
}

/// Why the archive cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleError {
    /// The entry at `offset` does not start with `070701` or `070702`.
    BadMagic {
        /// Offset of the entry header.
        offset: usize,
    },
    /// A header field is not 8 hex digits, or has an impossible value.
    BadHeader {
        /// Offset of the entry header.
        offset: usize,
        /// Name of the field.
        field: &'static str,
    },
    /// The entry at `offset` runs past the end of the archive.
    Truncated {
        /// Offset of the entry header.
        offset: usize,
    },
    /// The name of the entry at `offset` is not UTF-8.
    NameNotUtf8 {
        /// Offset of the entry header.
        offset: usize,
    },
    /// The archive ends without a `TRAILER!!!` entry.
    MissingTrailer,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BundleError::BadMagic { offset } => write!(
                f,
                "boot bundle: no cpio newc header at offset {offset} (expected magic 070701)"
            ),
            BundleError::BadHeader { offset, field } => write!(
                f,
                "boot bundle: bad `{field}` field in the cpio header at offset {offset}"
            ),
            BundleError::Truncated { offset } => {
                write!(
                    f,
                    "boot bundle: the cpio entry at offset {offset} is truncated"
                )
            }
            BundleError::NameNotUtf8 { offset } => write!(
                f,
                "boot bundle: the cpio entry at offset {offset} has a name that is not UTF-8"
            ),
            BundleError::MissingTrailer => {
                f.write_str("boot bundle: the cpio archive ends without its TRAILER!!! entry")
            }
        }
    }
}

const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const FIELDS: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

fn align4(v: usize) -> Option<usize> {
    v.checked_add(3).map(|x| x & !3)
}

fn hex8(bytes: &[u8]) -> Option<u32> {
    if bytes.len() != 8 {
        return None;
    }
    bytes.iter().try_fold(0u32, |acc, &b| {
        let d = char::from(b).to_digit(16)?;
        Some((acc << 4) | d)
    })
}

/// Iterator over the entries of an archive; see [`entries`].
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    archive: &'a [u8],
    offset: usize,
    done: bool,
}

/// Iterates over the entries of `archive` (the trailer itself is not yielded). The
/// iterator stops after the trailer or after yielding the first error.
pub fn entries(archive: &[u8]) -> Entries<'_> {
    Entries {
        archive,
        offset: 0,
        done: false,
    }
}

impl<'a> Entries<'a> {
    /// Parses the entry at `self.offset`; returns it and the next entry's offset.
    fn parse(&self) -> Result<(Entry<'a>, usize), BundleError> {
        let offset = self.offset;
        let a = self.archive;
        if offset >= a.len() {
            return Err(BundleError::MissingTrailer);
        }
        let truncated = BundleError::Truncated { offset };
        let rest = a.get(offset..).unwrap_or(&[]);
        let magic = rest.get(..6).unwrap_or(rest);
        let crc = if b"070702".starts_with(magic) && magic.len() == 6 {
            true
        } else if b"070701".starts_with(magic) || b"070702".starts_with(magic) {
            false
        } else {
            return Err(BundleError::BadMagic { offset });
        };
        let header = rest.get(..HEADER_LEN).ok_or(truncated)?;
        let mut fields = [0u32; 13];
        for (i, (value, name)) in fields.iter_mut().zip(FIELDS).enumerate() {
            let start = 6 + 8 * i;
            *value = header
                .get(start..start + 8)
                .and_then(hex8)
                .ok_or(BundleError::BadHeader {
                    offset,
                    field: name,
                })?;
        }
        let [_, mode, _, _, _, _, filesize, _, _, _, _, namesize, check] = fields;
        if namesize == 0 {
            return Err(BundleError::BadHeader {
                offset,
                field: "namesize",
            });
        }
        let namesize = usize::try_from(namesize).map_err(|_| truncated)?;
        let filesize = usize::try_from(filesize).map_err(|_| truncated)?;
        let name_start = offset + HEADER_LEN;
        let name_end = name_start.checked_add(namesize).ok_or(truncated)?;
        let name_bytes = a.get(name_start..name_end).ok_or(truncated)?;
        let Some((&0, name_bytes)) = name_bytes.split_last() else {
            return Err(BundleError::BadHeader {
                offset,
                field: "namesize",
            });
        };
        let name =
            core::str::from_utf8(name_bytes).map_err(|_| BundleError::NameNotUtf8 { offset })?;
        let data_start = align4(name_end).ok_or(truncated)?;
        let data_end = data_start.checked_add(filesize).ok_or(truncated)?;
        let data = a.get(data_start..data_end).ok_or(truncated)?;
        if crc {
            let sum = data.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
            if sum != check {
                return Err(BundleError::BadHeader {
                    offset,
                    field: "check",
                });
            }
        }
        let next = align4(data_end).ok_or(truncated)?;
        Ok((Entry { name, data, mode }, next))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, BundleError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.parse() {
            Ok((entry, next)) => {
                if entry.name == TRAILER {
                    self.done = true;
                    return None;
                }
                self.offset = next;
                Some(Ok(entry))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn strip_dot_slash(name: &str) -> &str {
    name.strip_prefix("./").unwrap_or(name)
}

/// Finds the member called `name` (a leading `./` on either side is ignored). The
/// whole archive is read and must be valid; if a name occurs more than once, the last
/// one wins (as when extracting).
pub fn find<'a>(archive: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, BundleError> {
    let wanted = strip_dot_slash(name);
    let mut found = None;
    for entry in entries(archive) {
        let entry = entry?;
        if strip_dot_slash(entry.name) == wanted {
            found = Some(entry.data);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small newc writer: each (name, data) as a regular file, then the trailer.
    fn write_newc(files: &[(&str, &[u8])], magic: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let push = |out: &mut Vec<u8>, name: &str, data: &[u8], mode: u32, ino: u32| {
            let check = if magic == "070702" {
                data.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
            } else {
                0
            };
            let fields = [
                ino,
                mode,
                0,
                0,
                1,
                0,
                data.len() as u32,
                0,
                0,
                0,
                0,
                name.len() as u32 + 1,
                check,
            ];
            out.extend(magic.as_bytes());
            for f in fields {
                out.extend(format!("{f:08X}").as_bytes());
            }
            out.extend(name.as_bytes());
            out.push(0);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out.extend(data);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        for (i, (name, data)) in files.iter().enumerate() {
            push(&mut out, name, data, 0o100644, i as u32 + 1);
        }
        push(&mut out, TRAILER, &[], 0, 0);
        out
    }

    fn collect(archive: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
        entries(archive)
            .map(|e| e.map(|e| (e.name.to_string(), e.data.to_vec())))
            .collect()
    }

    #[test]
    fn reads_entries_and_finds() {
        let files: [(&str, &[u8]); 4] = [
            ("domain.cfg", b"name = \"a\"\n"),
            ("./vmlinux", &[0x7f, b'E', b'L', b'F', 1]),
            ("dir/initrd.img", &[]),
            ("x", b"abcd"),
        ];
        let a = write_newc(&files, "070701");
        let got = collect(&a).unwrap();
        assert_eq!(got.len(), 4);
        for ((name, data), (gn, gd)) in files.iter().zip(&got) {
            assert_eq!((*name, *data), (gn.as_str(), gd.as_slice()));
        }
        let first = entries(&a).next().unwrap().unwrap();
        assert_eq!(first.mode, 0o100644);
        assert_eq!(
            find(&a, "domain.cfg").unwrap(),
            Some(&b"name = \"a\"\n"[..])
        );
        assert_eq!(find(&a, "vmlinux").unwrap().map(|d| d.len()), Some(5));
        assert_eq!(find(&a, "./vmlinux").unwrap().map(|d| d.len()), Some(5));
        assert_eq!(find(&a, "./x").unwrap(), Some(&b"abcd"[..]));
        assert_eq!(find(&a, "dir/initrd.img").unwrap(), Some(&[][..]));
        assert_eq!(find(&a, "missing").unwrap(), None);
        assert_eq!(find(&a, TRAILER).unwrap(), None);
    }

    #[test]
    fn last_duplicate_wins_and_crc_format() {
        let a = write_newc(&[("k", b"one"), ("./k", b"two")], "070702");
        assert_eq!(find(&a, "k").unwrap(), Some(&b"two"[..]));
        let mut bad = a.clone();
        let pos = bad.windows(3).position(|w| w == b"one").unwrap();
        bad[pos] = b'O';
        assert_eq!(
            find(&bad, "k"),
            Err(BundleError::BadHeader {
                offset: 0,
                field: "check"
            })
        );
    }

    #[test]
    fn empty_archive_and_trailer_only() {
        assert_eq!(collect(&[]), Err(BundleError::MissingTrailer));
        assert_eq!(find(&[], "x"), Err(BundleError::MissingTrailer));
        let a = write_newc(&[], "070701");
        assert_eq!(collect(&a), Ok(vec![]));
        // Padding after the trailer (cpio pads to 512) is ignored.
        let mut padded = write_newc(&[("a", b"1")], "070701");
        padded.resize(1024, 0);
        assert_eq!(find(&padded, "a").unwrap(), Some(&b"1"[..]));
    }

    #[test]
    fn errors() {
        let a = write_newc(&[("abc", b"hello")], "070701");
        // Missing trailer: cut right after the first entry.
        let first_len = align4(align4(HEADER_LEN + 4).unwrap() + 5).unwrap();
        assert_eq!(collect(&a[..first_len]), Err(BundleError::MissingTrailer));
        // Bad magic, at the second entry.
        let mut bad = a.clone();
        bad[first_len] = b'1';
        assert_eq!(
            collect(&bad),
            Err(BundleError::BadMagic { offset: first_len })
        );
        let mut bad = a.clone();
        bad[..6].copy_from_slice(b"070707");
        assert_eq!(collect(&bad), Err(BundleError::BadMagic { offset: 0 }));
        // Bad hex in each field.
        for (i, field) in FIELDS.iter().enumerate() {
            let mut bad = a.clone();
            bad[6 + 8 * i + 3] = b'g';
            assert_eq!(
                collect(&bad),
                Err(BundleError::BadHeader { offset: 0, field })
            );
        }
        // namesize 0, and a name without its NUL.
        let mut bad = a.clone();
        bad[6 + 8 * 11..6 + 8 * 12].copy_from_slice(b"00000000");
        assert_eq!(
            collect(&bad),
            Err(BundleError::BadHeader {
                offset: 0,
                field: "namesize"
            })
        );
        let mut bad = a.clone();
        bad[6 + 8 * 11..6 + 8 * 12].copy_from_slice(b"00000003");
        assert_eq!(
            collect(&bad),
            Err(BundleError::BadHeader {
                offset: 0,
                field: "namesize"
            })
        );
        // Not UTF-8.
        let mut bad = a.clone();
        bad[HEADER_LEN] = 0xff;
        assert_eq!(collect(&bad), Err(BundleError::NameNotUtf8 { offset: 0 }));
        // Huge filesize.
        let mut bad = a.clone();
        bad[6 + 8 * 6..6 + 8 * 7].copy_from_slice(b"FFFFFFFF");
        assert_eq!(collect(&bad), Err(BundleError::Truncated { offset: 0 }));
        // Every prefix fails (and never panics).
        for n in 0..a.len() {
            assert!(collect(&a[..n]).is_err(), "prefix {n}");
        }
        // Iteration stops after the first error.
        let mut it = entries(b"garbage");
        assert!(matches!(
            it.next(),
            Some(Err(BundleError::BadMagic { offset: 0 }))
        ));
        assert!(it.next().is_none());
        for e in [
            BundleError::BadMagic { offset: 1 },
            BundleError::BadHeader {
                offset: 2,
                field: "mode",
            },
            BundleError::Truncated { offset: 3 },
            BundleError::NameNotUtf8 { offset: 4 },
            BundleError::MissingTrailer,
        ] {
            assert!(e.to_string().starts_with("boot bundle: "));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn round_trip(
            files in proptest::collection::vec(
                ("[a-zA-Z0-9_./-]{1,24}", proptest::collection::vec(any::<u8>(), 0..300)),
                0..8,
            ),
            crc in any::<bool>(),
        ) {
            let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            let a = write_newc(&refs, if crc { "070702" } else { "070701" });
            let got = collect(&a).unwrap();
            prop_assert_eq!(got, files.clone());
            for (name, _) in &files {
                let last = files.iter().rev().find(|(n, _)| strip_dot_slash(n) == strip_dot_slash(name)).unwrap();
                prop_assert_eq!(find(&a, name).unwrap(), Some(last.1.as_slice()));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), name in ".{0,12}") {
            let _ = collect(&bytes);
            let _ = find(&bytes, &name);
            // With a valid magic so that parsing gets further.
            let mut b = b"070701".to_vec();
            b.extend(&bytes);
            let _ = collect(&b);
        }

        #[test]
        fn mutations_never_panic(i in any::<prop::sample::Index>(), v in any::<u8>()) {
            let mut a = write_newc(&[("one", b"1234567"), ("two/three", &[9; 40])], "070702");
            let i = i.index(a.len());
            a[i] = v;
            let _ = collect(&a);
            let _ = find(&a, "two/three");
        }
    }
}
