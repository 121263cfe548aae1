//! Kernel images as Xen users pass them in `kernel =`: a plain ELF (`vmlinux`) or a Linux
//! bzImage (`/boot/vmlinuz-*`), whose compressed payload is an ELF `vmlinux` that Xen's PVH
//! loader decompresses itself.
//!
//! [`identify`] reads the bzImage's real-mode setup header (Linux
//! `Documentation/arch/x86/boot.rst`): `setup_sects` at 0x1f1 (0 means 4), the magic `"HdrS"`
//! at 0x202, the boot protocol `version` at 0x206 (2.08 or later describes the payload), and
//! `payload_offset`/`payload_length` at 0x248/0x24c, relative to the protected-mode code that
//! starts at `(setup_sects + 1) * 512`. The payload's last four bytes are the uncompressed
//! size (little-endian; Linux's `mkpiggy` reads it there, and for gzip it is the gzip
//! trailer's `ISIZE`). [`decompress`] then writes the ELF into a buffer the caller allocated
//! with that size (for Debian's 6.1 kernel, 63 MiB taken from guest frames rather than the
//! heap).
//!
//! Decoders, all writing straight into the caller's buffer, which doubles as the history
//! window (Linux's and Xen's boot decompressors work the same way):
//! - xz (Debian, Ubuntu): this module's own single-call xz decoder (LZMA2, the x86 BCJ
//!   filter, CRC32/CRC64 checks). Heap: 28 KiB of LZMA probabilities. No dictionary buffer:
//!   a stream-decoding crate such as `xz4rust` needs one as large as the stream declares
//!   (32 MiB for Linux kernels, the whole hypervisor heap), hence the own decoder.
//! - gzip: `miniz_oxide`'s inflater in non-wrapping mode. Heap: its ~11 KiB state.
//! - zstd (Arch, Fedora): `ruzstd`. Heap: the frame's window (refused above
//!   [`ZSTD_MAX_WINDOW`]) plus about 1.2 MiB of buffers. Linux builds its zstd payloads with
//!   `zstd -22 --ultra`, whose 128 MiB window exceeds that limit: such kernels are reported
//!   as unsupported (pass the decompressed `vmlinux` instead).
//!
//! bzip2, lzma, lzo and lz4 payloads are recognised and reported as unsupported. All input
//! is untrusted: every offset is checked and malformed data yields a [`BzImageError`], never
//! a panic.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use core::fmt;

/// What [`identify`] found in a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat<'a> {
    /// An ELF file (load it as it is).
    Elf(&'a [u8]),
    /// A Linux bzImage with a payload to decompress into `decompressed_len` bytes.
    BzImage {
        /// The payload, including the 4-byte size trailer.
        payload: &'a [u8],
        /// How the payload is compressed.
        compression: Compression,
        /// The size of the decompressed ELF in bytes, from the payload's size trailer
        /// (checked to be at most [`MAX_DECOMPRESSED`]).
        decompressed_len: usize,
    },
}

/// A supported payload compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (RFC 1952).
    Gzip,
    /// xz (LZMA2, optionally behind the x86 BCJ filter).
    Xz,
    /// Zstandard.
    Zstd,
    /// The payload is already an ELF file.
    Uncompressed,
}

impl Compression {
    /// The format's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Uncompressed => "uncompressed",
        }
    }
}

/// Largest decompressed kernel accepted (512 MiB).
pub const MAX_DECOMPRESSED: usize = 512 << 20;

/// Largest zstd window accepted (8 MiB): `ruzstd` keeps a window-sized buffer on the heap.
pub const ZSTD_MAX_WINDOW: u64 = 8 << 20;

/// Why a kernel file cannot be used. The `Display` text completes a sentence that starts
/// with the file's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// Neither ELF magic nor a bzImage setup header.
    NotAKernel {
        /// The first bytes of the file (zero-padded if shorter).
        first_bytes: [u8; 4],
    },
    /// A structure runs past the end of the file (or of the payload).
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        need: u64,
        /// Bytes available.
        len: u64,
    },
    /// A boot protocol older than 2.08, which does not describe its payload.
    OldBootProtocol(u16),
    /// `payload_offset`/`payload_length` point outside the file.
    BadPayload {
        /// The payload's offset in the file.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A compression format (or a feature of one) that cannot be decoded here; the text
    /// names it.
    UnsupportedCompression(&'static str),
    /// The payload does not decode: the decoder's name and its error.
    Corrupt(&'static str, String),
    /// The decompressed data would exceed `limit` bytes (the output buffer, or
    /// [`MAX_DECOMPRESSED`]).
    OutputTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The payload decoded to a different size than its size trailer says.
    SizeMismatch {
        /// The size trailer's value.
        header: usize,
        /// Bytes actually decoded.
        actual: usize,
    },
}

/// Formats a byte count the way a user reads memory sizes.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", b >> 20)
        } else if b != 0 && b.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", b >> 10)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BzImageError::NotAKernel { first_bytes: b } => write!(
                f,
                "is neither an ELF kernel nor a Linux bzImage (it starts with {:02x} {:02x} {:02x} {:02x})",
                b[0], b[1], b[2], b[3]
            ),
            BzImageError::Truncated { what, need, len } => write!(
                f,
                "is truncated: the {what} needs {need} bytes but only {len} are there"
            ),
            BzImageError::OldBootProtocol(v) => write!(
                f,
                "is a bzImage with boot protocol {}.{:02}, older than 2.08: it does not describe its compressed kernel",
                v >> 8,
                v & 0xff
            ),
            BzImageError::BadPayload { offset, len, file_len } => write!(
                f,
                "is a bzImage whose payload ({len} bytes at offset {offset:#x}) runs past the end of the file ({file_len} bytes)"
            ),
            BzImageError::UnsupportedCompression(what) => write!(
                f,
                "is a bzImage whose payload uses {what}, which is not supported: use a kernel compressed with xz, gzip or zstd, or the uncompressed vmlinux"
            ),
            BzImageError::Corrupt(decoder, msg) => {
                write!(f, "is a bzImage whose {decoder} payload is corrupt: {msg}")
            }
            BzImageError::OutputTooLarge { limit } => write!(
                f,
                "is a bzImage whose payload decompresses to more than {}",
                Size(*limit as u64)
            ),
            BzImageError::SizeMismatch { header, actual } => write!(
                f,
                "is a bzImage whose payload decompressed to {actual} bytes but its size trailer says {header}"
            ),
        }
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Recognises a kernel file: ELF magic gives [`KernelFormat::Elf`], a bzImage setup header
/// (`"HdrS"` at 0x202, protocol 2.08 or later) gives [`KernelFormat::BzImage`] after every
/// offset and length in it has been checked.
///
/// # Errors
/// Anything else, or a bzImage whose header, payload bounds, payload format or size
/// trailer is unusable: see [`BzImageError`].
pub fn identify(image: &[u8]) -> Result<KernelFormat<'_>, BzImageError> {
    if image.starts_with(ELF_MAGIC) {
        return Ok(KernelFormat::Elf(image));
    }
    if image.get(0x202..0x206) != Some(b"HdrS") {
        let mut first_bytes = [0u8; 4];
        for (d, s) in first_bytes.iter_mut().zip(image) {
            *d = *s;
        }
        return Err(BzImageError::NotAKernel { first_bytes });
    }
    let file_len = image.len() as u64;
    if image.len() < 0x208 {
        return Err(BzImageError::Truncated {
            what: "bzImage setup header",
            need: 0x250,
            len: file_len,
        });
    }
    let version = le16(image, 0x206);
    if version < 0x208 {
        return Err(BzImageError::OldBootProtocol(version));
    }
    if image.len() < 0x250 {
        return Err(BzImageError::Truncated {
            what: "bzImage setup header",
            need: 0x250,
            len: file_len,
        });
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    if pm_start > file_len {
        return Err(BzImageError::Truncated {
            what: "bzImage real-mode setup code",
            need: pm_start,
            len: file_len,
        });
    }
    let offset = pm_start + u64::from(le32(image, 0x248));
    let len = u64::from(le32(image, 0x24c));
    if offset + len > file_len {
        return Err(BzImageError::BadPayload {
            offset,
            len,
            file_len,
        });
    }
    // Both fit in the file, hence in usize.
    let payload = &image[offset as usize..(offset + len) as usize];
    let compression = payload_format(payload)?;
    let decompressed_len = if compression == Compression::Uncompressed {
        payload.len()
    } else {
        if payload.len() < 8 {
            return Err(BzImageError::Truncated {
                what: "bzImage payload",
                need: 8,
                len,
            });
        }
        le32(payload, payload.len() - 4) as usize
    };
    if decompressed_len > MAX_DECOMPRESSED {
        return Err(BzImageError::OutputTooLarge {
            limit: MAX_DECOMPRESSED,
        });
    }
    if decompressed_len < 64 {
        return Err(BzImageError::Corrupt(
            compression.name(),
            alloc::format!(
                "it says it decompresses to {decompressed_len} bytes, too few for an ELF kernel"
            ),
        ));
    }
    Ok(KernelFormat::BzImage {
        payload,
        compression,
        decompressed_len,
    })
}

/// Names the payload's format from its magic bytes.
fn payload_format(p: &[u8]) -> Result<Compression, BzImageError> {
    const UNSUPPORTED: [(&[u8], &str); 4] = [
        (b"BZh", "bzip2 compression"),
        (b"\x5d\x00\x00", "lzma compression"),
        (b"\x89LZO", "lzo compression"),
        (b"\x02\x21\x4c\x18", "lz4 compression"),
    ];
    if p.starts_with(b"\x1f\x8b") {
        return Ok(Compression::Gzip);
    }
    if p.starts_with(xz::MAGIC) {
        return Ok(Compression::Xz);
    }
    if p.starts_with(b"\x28\xb5\x2f\xfd") {
        return Ok(Compression::Zstd);
    }
    if p.starts_with(ELF_MAGIC) {
        return Ok(Compression::Uncompressed);
    }
    for (magic, name) in UNSUPPORTED {
        if p.starts_with(magic) {
            return Err(BzImageError::UnsupportedCompression(name));
        }
    }
    Err(BzImageError::UnsupportedCompression(
        "an unrecognised compression format",
    ))
}

/// Decompresses a bzImage `payload` (as [`identify`] returned it, size trailer included)
/// into `out`, which the caller sized from `decompressed_len`; returns the bytes written.
///
/// Fails if the output would exceed `out`, if the stream is corrupt or truncated (including
/// integrity checks: xz CRC32/CRC64, gzip CRC32, zstd XXH64), or if the result's size
/// differs from the size trailer. The heap is used only for small decoder state (see the
/// module documentation).
///
/// # Errors
/// [`BzImageError::OutputTooLarge`], [`BzImageError::Corrupt`] (including truncation),
/// [`BzImageError::UnsupportedCompression`] (an xz filter or check, or a zstd window,
/// beyond what is supported), [`BzImageError::SizeMismatch`].
pub fn decompress(payload: &[u8], c: Compression, out: &mut [u8]) -> Result<usize, BzImageError> {
    if c == Compression::Uncompressed {
        let limit = out.len();
        let dst = out
            .get_mut(..payload.len())
            .ok_or(BzImageError::OutputTooLarge { limit })?;
        dst.copy_from_slice(payload);
        return Ok(payload.len());
    }
    if payload.len() < 8 {
        return Err(BzImageError::Truncated {
            what: "bzImage payload",
            need: 8,
            len: payload.len() as u64,
        });
    }
    let trailer = le32(payload, payload.len() - 4) as usize;
    let stream = &payload[..payload.len() - 4];
    let written = match c {
        // The size trailer is the gzip trailer's ISIZE: the stream is the whole payload.
        Compression::Gzip => gunzip(payload, out)?,
        Compression::Xz => xz::decode(stream, out)?,
        Compression::Zstd => unzstd(stream, out)?,
        Compression::Uncompressed => unreachable!("handled above"),
    };
    if written != trailer {
        return Err(BzImageError::SizeMismatch {
            header: trailer,
            actual: written,
        });
    }
    Ok(written)
}

fn gzip_err(msg: &str) -> BzImageError {
    BzImageError::Corrupt("gzip", msg.to_string())
}

/// Decodes one gzip member (RFC 1952) into `out`, checking its CRC32 and ISIZE.
fn gunzip(p: &[u8], out: &mut [u8]) -> Result<usize, BzImageError> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;

    const FHCRC: u8 = 1 << 1;
    const FEXTRA: u8 = 1 << 2;
    const FNAME: u8 = 1 << 3;
    const FCOMMENT: u8 = 1 << 4;
    let truncated = || gzip_err("the stream is truncated");
    if p.len() < 10 {
        return Err(truncated());
    }
    if p[..2] != [0x1f, 0x8b] {
        return Err(gzip_err("its magic is wrong"));
    }
    if p[2] != 8 {
        return Err(gzip_err("its compression method is not deflate"));
    }
    let flags = p[3];
    if flags & 0xe0 != 0 {
        return Err(gzip_err("its header has reserved flags set"));
    }
    let mut pos = 10usize;
    if flags & FEXTRA != 0 {
        let xlen = p.get(pos..pos + 2).ok_or_else(truncated)?;
        pos += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let rest = p.get(pos..).ok_or_else(truncated)?;
            let nul = rest.iter().position(|&b| b == 0).ok_or_else(truncated)?;
            pos += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        pos += 2;
    }
    let deflate = p.get(pos..).ok_or_else(truncated)?;
    // About 11 KiB of decoder state; the output buffer is the window.
    let mut state: Box<DecompressorOxide> = Box::default();
    let (status, consumed, written) = decompress(
        &mut state,
        deflate,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Done => {}
        TINFLStatus::HasMoreOutput => {
            return Err(BzImageError::OutputTooLarge { limit: out.len() })
        }
        TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
            return Err(truncated())
        }
        _ => return Err(gzip_err("its deflate data is invalid")),
    }
    let trailer = deflate.get(consumed..consumed + 8).ok_or_else(truncated)?;
    if le32(trailer, 0) != crc::crc32(0, &out[..written]) {
        return Err(gzip_err("its CRC32 does not match the data"));
    }
    if le32(trailer, 4) != written as u32 {
        return Err(gzip_err("its ISIZE does not match the data"));
    }
    Ok(written)
}

/// Decodes zstd frames into `out` with `ruzstd`, refusing windows above
/// [`ZSTD_MAX_WINDOW`] and checking the last frame's content checksum if it has one.
fn unzstd(stream: &[u8], out: &mut [u8]) -> Result<usize, BzImageError> {
    use ruzstd::decoding::errors::FrameDecoderError;
    use ruzstd::decoding::FrameDecoder;

    let mut dec = FrameDecoder::new();
    dec.set_max_window_size(ZSTD_MAX_WINDOW);
    let written = dec.decode_all(stream, out).map_err(|e| match e {
        FrameDecoderError::TargetTooSmall => BzImageError::OutputTooLarge { limit: out.len() },
        FrameDecoderError::WindowSizeTooBig { .. } => BzImageError::UnsupportedCompression(
            "zstd with a window above 8 MiB (the decoder keeps the window on the heap; `zstd -22 --ultra`, as Linux uses, needs 128 MiB)",
        ),
        e => BzImageError::Corrupt("zstd", e.to_string()),
    })?;
    if let (Some(stored), Some(computed)) =
        (dec.get_checksum_from_data(), dec.get_calculated_checksum())
    {
        if stored != computed {
            return Err(BzImageError::Corrupt(
                "zstd",
                "its content checksum does not match the data".to_string(),
            ));
        }
    }
    Ok(written)
}

/// CRC-32 (IEEE, as in gzip and xz) and CRC-64 (ECMA-182, as in xz), table-driven.
mod crc {
    const fn crc32_tables() -> [[u32; 256]; 8] {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut s = 1;
        while s < 8 {
            let mut i = 0;
            while i < 256 {
                let prev = t[s - 1][i];
                t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                i += 1;
            }
            s += 1;
        }
        t
    }

    const fn crc64_table() -> [u64; 256] {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xc96c_5795_d787_0f42
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }

    static CRC32: [[u32; 256]; 8] = crc32_tables();
    static CRC64: [u64; 256] = crc64_table();

    /// Continues a CRC-32 (start with 0).
    pub(super) fn crc32(crc: u32, data: &[u8]) -> u32 {
        let t = &CRC32;
        let mut c = !crc;
        let mut chunks = data.chunks_exact(8);
        for ch in &mut chunks {
            let lo = c ^ u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
            let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
        }
        !c
    }

    /// Continues a CRC-64 (start with 0).
    pub(super) fn crc64(crc: u64, data: &[u8]) -> u64 {
        let mut c = !crc;
        for &b in data {
            c = (c >> 8) ^ CRC64[((c ^ u64::from(b)) & 0xff) as usize];
        }
        !c
    }
}

/// A single-call xz decoder: the whole stream is in memory and the output buffer is the
/// LZMA2 dictionary, so no dictionary is allocated. Supports what Linux's and Xen's boot
/// decoders support: LZMA2 behind at most one x86 BCJ filter; checks none, CRC32, CRC64.
mod xz {
    use super::crc::{crc32, crc64};
    use super::{le32, BzImageError};
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Stream header magic.
    pub(super) const MAGIC: &[u8; 6] = b"\xfd7zXZ\x00";
    const FOOTER_MAGIC: &[u8; 2] = b"YZ";
    const FILTER_X86: u64 = 0x04;
    const FILTER_LZMA2: u64 = 0x21;

    fn corrupt(msg: &str) -> BzImageError {
        BzImageError::Corrupt("xz", msg.to_string())
    }

    fn truncated() -> BzImageError {
        corrupt("the stream is truncated")
    }

    /// A cursor over untrusted bytes.
    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn byte(&mut self) -> Result<u8, BzImageError> {
            let b = *self.buf.get(self.pos).ok_or_else(truncated)?;
            self.pos += 1;
            Ok(b)
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], BzImageError> {
            let end = self.pos.checked_add(n).ok_or_else(truncated)?;
            let s = self.buf.get(self.pos..end).ok_or_else(truncated)?;
            self.pos = end;
            Ok(s)
        }

        /// A variable-length integer: 7 bits a byte, at most 9 bytes, minimal encoding.
        fn vli(&mut self) -> Result<u64, BzImageError> {
            let mut v = 0u64;
            for i in 0..9 {
                let b = self.byte()?;
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    if b == 0 && i != 0 {
                        return Err(corrupt("an integer is not minimally encoded"));
                    }
                    return Ok(v);
                }
            }
            Err(corrupt("an integer is longer than 9 bytes"))
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Check {
        None,
        Crc32,
        Crc64,
    }

    impl Check {
        fn size(self) -> usize {
            match self {
                Check::None => 0,
                Check::Crc32 => 4,
                Check::Crc64 => 8,
            }
        }
    }

    /// Running summary of the blocks, compared with the index.
    #[derive(Default, PartialEq, Eq)]
    struct Records {
        count: u64,
        unpadded: u64,
        uncompressed: u64,
        crc: u32,
    }

    impl Records {
        fn add(&mut self, unpadded: u64, uncompressed: u64) {
            self.count += 1;
            self.unpadded = self.unpadded.wrapping_add(unpadded);
            self.uncompressed = self.uncompressed.wrapping_add(uncompressed);
            let mut rec = [0u8; 16];
            rec[..8].copy_from_slice(&unpadded.to_le_bytes());
            rec[8..].copy_from_slice(&uncompressed.to_le_bytes());
            self.crc = crc32(self.crc, &rec);
        }
    }

    /// Decodes the first xz stream in `input` into `out`; returns the bytes written.
    /// Anything after the stream (padding, the bzImage size trailer) is ignored.
    pub(super) fn decode(input: &[u8], out: &mut [u8]) -> Result<usize, BzImageError> {
        let mut r = Reader { buf: input, pos: 0 };
        let header = r.take(12)?;
        if &header[..6] != MAGIC {
            return Err(corrupt("its stream header magic is wrong"));
        }
        let flags = [header[6], header[7]];
        if crc32(0, &flags) != le32(header, 8) {
            return Err(corrupt("its stream header CRC32 does not match"));
        }
        if flags[0] != 0 || flags[1] & 0xf0 != 0 {
            return Err(BzImageError::UnsupportedCompression(
                "xz with unknown stream flags",
            ));
        }
        let check = match flags[1] {
            0 => Check::None,
            1 => Check::Crc32,
            4 => Check::Crc64,
            10 => {
                return Err(BzImageError::UnsupportedCompression(
                    "xz with a SHA-256 integrity check",
                ))
            }
            _ => {
                return Err(BzImageError::UnsupportedCompression(
                    "xz with an unknown integrity check",
                ))
            }
        };
        // LZMA probabilities, reused by every block (28 KiB).
        let mut lzma = Lzma::new();
        let mut out_pos = 0usize;
        let mut blocks = Records::default();
        while *input.get(r.pos).ok_or_else(truncated)? != 0 {
            let (unpadded, uncompressed) = block(&mut r, out, &mut out_pos, check, &mut lzma)?;
            blocks.add(unpadded, uncompressed);
        }

        // Index: indicator, record count, records, padding, CRC32.
        let index_start = r.pos;
        r.byte()?;
        let count = r.vli()?;
        if count != blocks.count {
            return Err(corrupt("its index lists a different number of blocks"));
        }
        let mut listed = Records::default();
        for _ in 0..count {
            let unpadded = r.vli()?;
            let uncompressed = r.vli()?;
            listed.add(unpadded, uncompressed);
        }
        if listed != blocks {
            return Err(corrupt("its index does not match its blocks"));
        }
        while !(r.pos - index_start).is_multiple_of(4) {
            if r.byte()? != 0 {
                return Err(corrupt("its index padding is not zero"));
            }
        }
        let index_crc = crc32(0, &input[index_start..r.pos]);
        if le32(r.take(4)?, 0) != index_crc {
            return Err(corrupt("its index CRC32 does not match"));
        }
        let index_size = (r.pos - index_start) as u64;

        // Footer: CRC32, backward size, stream flags, "YZ".
        let footer = r.take(12)?;
        if &footer[10..] != FOOTER_MAGIC {
            return Err(corrupt("its stream footer magic is wrong"));
        }
        if crc32(0, &footer[4..10]) != le32(footer, 0) {
            return Err(corrupt("its stream footer CRC32 does not match"));
        }
        if footer[8..10] != flags {
            return Err(corrupt("its stream footer flags differ from the header's"));
        }
        if (u64::from(le32(footer, 4)) + 1) * 4 != index_size {
            return Err(corrupt("its stream footer gives the wrong index size"));
        }
        Ok(out_pos)
    }

    /// Decodes one block; returns its unpadded size and its uncompressed size.
    fn block(
        r: &mut Reader<'_>,
        out: &mut [u8],
        out_pos: &mut usize,
        check: Check,
        lzma: &mut Lzma,
    ) -> Result<(u64, u64), BzImageError> {
        let input = r.buf;
        let header_start = r.pos;
        let header_size = (usize::from(r.byte()?) + 1) * 4;
        r.pos = header_start;
        let header = r.take(header_size)?;
        let (body, stored_crc) = header.split_at(header_size - 4);
        if crc32(0, body) != le32(stored_crc, 0) {
            return Err(corrupt("a block header CRC32 does not match"));
        }
        let flags = body[1];
        if flags & 0x3c != 0 {
            return Err(BzImageError::UnsupportedCompression(
                "xz with unknown block header flags",
            ));
        }
        let mut h = Reader { buf: body, pos: 2 };
        let compressed_size = if flags & 0x40 != 0 {
            Some(
                h.vli()
                    .map_err(|_| corrupt("a block header is malformed"))?,
            )
        } else {
            None
        };
        let uncompressed_size = if flags & 0x80 != 0 {
            Some(
                h.vli()
                    .map_err(|_| corrupt("a block header is malformed"))?,
            )
        } else {
            None
        };
        let filters = usize::from(flags & 3) + 1;
        let mut x86 = false;
        for i in 0..filters {
            let malformed = |_| corrupt("a block header is malformed");
            let id = h.vli().map_err(malformed)?;
            let props_len = h.vli().map_err(malformed)?;
            let props = h
                .take(usize::try_from(props_len).unwrap_or(usize::MAX))
                .map_err(malformed)?;
            let last = i + 1 == filters;
            match (id, last) {
                (FILTER_LZMA2, true) => {
                    if props.len() != 1 || props[0] > 40 {
                        return Err(corrupt("its LZMA2 filter properties are invalid"));
                    }
                }
                (FILTER_LZMA2, false) => {
                    return Err(corrupt("its LZMA2 filter is not the last filter"))
                }
                (FILTER_X86, false) if !x86 => {
                    // An optional 4-byte start offset; only 0 is supported (Linux never
                    // sets one).
                    if !(props.is_empty() || props == [0, 0, 0, 0]) {
                        return Err(BzImageError::UnsupportedCompression(
                            "xz with an x86 BCJ filter start offset",
                        ));
                    }
                    x86 = true;
                }
                (_, true) => {
                    return Err(BzImageError::UnsupportedCompression(
                        "xz whose last filter is not LZMA2",
                    ))
                }
                (0x03, false) => {
                    return Err(BzImageError::UnsupportedCompression(
                        "xz with the delta filter",
                    ))
                }
                (0x05..=0x0b, false) => {
                    return Err(BzImageError::UnsupportedCompression(
                        "xz with a BCJ filter for another processor",
                    ))
                }
                _ => {
                    return Err(BzImageError::UnsupportedCompression(
                        "xz with an unknown filter chain",
                    ))
                }
            }
        }
        if body[h.pos..].iter().any(|&b| b != 0) {
            return Err(corrupt("a block header's padding is not zero"));
        }

        let data_start = r.pos;
        let data_end = match compressed_size {
            Some(c) => usize::try_from(c)
                .ok()
                .and_then(|c| data_start.checked_add(c))
                .filter(|&e| e <= input.len())
                .ok_or_else(truncated)?,
            None => input.len(),
        };
        let out_start = *out_pos;
        let consumed = lzma2(&input[data_start..data_end], out, out_pos, lzma)?;
        let produced = *out_pos - out_start;
        if compressed_size.is_some_and(|c| c != consumed as u64) {
            return Err(corrupt("a block's compressed size differs from its header"));
        }
        if uncompressed_size.is_some_and(|u| u != produced as u64) {
            return Err(corrupt(
                "a block's uncompressed size differs from its header",
            ));
        }
        let decoded = &mut out[out_start..*out_pos];
        if x86 {
            bcj_x86(decoded);
        }
        r.pos = data_start + consumed;
        while !(r.pos - data_start).is_multiple_of(4) {
            if r.byte()? != 0 {
                return Err(corrupt("a block's padding is not zero"));
            }
        }
        let stored = r.take(check.size())?;
        let ok = match check {
            Check::None => true,
            Check::Crc32 => le32(stored, 0) == crc32(0, decoded),
            Check::Crc64 => {
                let mut v = [0u8; 8];
                v.copy_from_slice(stored);
                u64::from_le_bytes(v) == crc64(0, decoded)
            }
        };
        if !ok {
            return Err(corrupt("a block's integrity check does not match its data"));
        }
        let unpadded = (header_size + consumed + check.size()) as u64;
        Ok((unpadded, produced as u64))
    }

    /// Decodes LZMA2 chunks from `data` up to and including the end marker, appending
    /// to `out` at `out_pos`; returns the bytes of `data` consumed.
    fn lzma2(
        data: &[u8],
        out: &mut [u8],
        out_pos: &mut usize,
        lzma: &mut Lzma,
    ) -> Result<usize, BzImageError> {
        let mut r = Reader { buf: data, pos: 0 };
        let mut need_dict_reset = true;
        let mut need_props = true;
        let mut dict_start = *out_pos;
        loop {
            let control = r.byte()?;
            if control == 0 {
                return Ok(r.pos);
            }
            if control >= 0xe0 || control == 0x01 {
                need_props = true;
                need_dict_reset = false;
                dict_start = *out_pos;
            } else if need_dict_reset {
                return Err(corrupt(
                    "its first LZMA2 chunk does not reset the dictionary",
                ));
            }
            if control >= 0x80 {
                let size = r.take(4)?;
                let unpacked = (usize::from(control & 0x1f) << 16)
                    + (usize::from(size[0]) << 8)
                    + usize::from(size[1])
                    + 1;
                let packed = (usize::from(size[2]) << 8) + usize::from(size[3]) + 1;
                if control >= 0xc0 {
                    let props = r.byte()?;
                    lzma.set_props(props)?;
                    need_props = false;
                    lzma.reset();
                } else if need_props {
                    return Err(corrupt("an LZMA2 chunk lacks its LZMA properties"));
                } else if control >= 0xa0 {
                    lzma.reset();
                }
                let chunk = r.take(packed)?;
                lzma.chunk(chunk, out, out_pos, unpacked, dict_start)?;
            } else if control <= 0x02 {
                let size = r.take(2)?;
                let len = (usize::from(size[0]) << 8) + usize::from(size[1]) + 1;
                let src = r.take(len)?;
                let limit = out.len();
                let dst = out
                    .get_mut(*out_pos..*out_pos + len)
                    .ok_or(BzImageError::OutputTooLarge { limit })?;
                dst.copy_from_slice(src);
                *out_pos += len;
            } else {
                return Err(corrupt("an LZMA2 control byte is invalid"));
            }
        }
    }

    // Probability array layout (counts of u16 probabilities).
    const STATES: usize = 12;
    const POS_STATES_MAX: usize = 16;
    const IS_MATCH: usize = 0;
    const IS_REP: usize = IS_MATCH + STATES * POS_STATES_MAX;
    const IS_REP0: usize = IS_REP + STATES;
    const IS_REP1: usize = IS_REP0 + STATES;
    const IS_REP2: usize = IS_REP1 + STATES;
    const IS_REP0_LONG: usize = IS_REP2 + STATES;
    const DIST_SLOT: usize = IS_REP0_LONG + STATES * POS_STATES_MAX;
    const DIST_SPECIAL: usize = DIST_SLOT + 4 * 64;
    const DIST_ALIGN: usize = DIST_SPECIAL + (128 - 14);
    const MATCH_LEN: usize = DIST_ALIGN + 16;
    const LEN_CHOICE: usize = 0;
    const LEN_CHOICE2: usize = 1;
    const LEN_LOW: usize = 2;
    const LEN_MID: usize = LEN_LOW + POS_STATES_MAX * 8;
    const LEN_HIGH: usize = LEN_MID + POS_STATES_MAX * 8;
    const LEN_CODER: usize = LEN_HIGH + 256;
    const REP_LEN: usize = MATCH_LEN + LEN_CODER;
    const LITERAL: usize = REP_LEN + LEN_CODER;
    const LITERAL_CODER: usize = 0x300;
    /// lc + lp is at most 4 in LZMA2.
    const PROBS: usize = LITERAL + LITERAL_CODER * 16;

    const PROB_INIT: u16 = 1 << 10;
    const TOP: u32 = 1 << 24;

    /// The range decoder over one LZMA2 chunk. Reading past the chunk yields zero bytes
    /// and is detected afterwards (`pos > data.len()`).
    struct Rc<'a> {
        data: &'a [u8],
        pos: usize,
        range: u32,
        code: u32,
    }

    impl<'a> Rc<'a> {
        fn new(data: &'a [u8]) -> Result<Self, BzImageError> {
            if data.len() < 5 || data[0] != 0 {
                return Err(corrupt("an LZMA2 chunk has a bad range coder start"));
            }
            Ok(Rc {
                data,
                pos: 5,
                range: u32::MAX,
                code: u32::from_be_bytes([data[1], data[2], data[3], data[4]]),
            })
        }

        fn overrun(&self) -> bool {
            self.pos > self.data.len()
        }

        #[inline(always)]
        fn normalize(&mut self) {
            if self.range < TOP {
                let b = self.data.get(self.pos).copied().unwrap_or(0);
                self.pos += 1;
                self.range <<= 8;
                self.code = (self.code << 8) | u32::from(b);
            }
        }

        #[inline(always)]
        fn bit(&mut self, p: &mut u16) -> usize {
            self.normalize();
            let bound = (self.range >> 11) * u32::from(*p);
            if self.code < bound {
                self.range = bound;
                *p += ((1 << 11) - *p) >> 5;
                0
            } else {
                self.range -= bound;
                self.code -= bound;
                *p -= *p >> 5;
                1
            }
        }

        /// A `bits`-bit symbol, most significant bit first; `probs[1..1 << bits]` used.
        #[inline(always)]
        fn tree(&mut self, probs: &mut [u16], bits: u32) -> usize {
            let mut s = 1;
            for _ in 0..bits {
                s = (s << 1) | self.bit(&mut probs[s]);
            }
            s - (1 << bits)
        }

        /// A `bits`-bit symbol, least significant bit first.
        #[inline(always)]
        fn tree_reverse(&mut self, probs: &mut [u16], bits: u32) -> u32 {
            let mut s = 1;
            let mut v = 0;
            for i in 0..bits {
                let b = self.bit(&mut probs[s]);
                s = (s << 1) | b;
                v |= (b as u32) << i;
            }
            v
        }

        /// `bits` bits with fixed probability one half.
        fn direct(&mut self, bits: u32) -> u32 {
            let mut v = 0;
            for _ in 0..bits {
                self.normalize();
                self.range >>= 1;
                let b = u32::from(self.code >= self.range);
                self.code -= self.range & 0u32.wrapping_sub(b);
                v = (v << 1) | b;
            }
            v
        }
    }

    /// LZMA decoder state that survives across chunks.
    struct Lzma {
        probs: Box<[u16]>,
        lc: u32,
        lp_mask: usize,
        pb_mask: usize,
        state: usize,
        reps: [u32; 4],
    }

    impl Lzma {
        fn new() -> Self {
            let probs: Vec<u16> = vec![PROB_INIT; PROBS];
            Lzma {
                probs: probs.into_boxed_slice(),
                lc: 0,
                lp_mask: 0,
                pb_mask: 0,
                state: 0,
                reps: [0; 4],
            }
        }

        fn set_props(&mut self, props: u8) -> Result<(), BzImageError> {
            if props >= 9 * 5 * 5 {
                return Err(corrupt("its LZMA properties byte is invalid"));
            }
            let lc = u32::from(props % 9);
            let lp = u32::from(props / 9 % 5);
            let pb = u32::from(props / 45);
            if lc + lp > 4 {
                return Err(corrupt("its LZMA properties have lc + lp above 4"));
            }
            self.lc = lc;
            self.lp_mask = (1 << lp) - 1;
            self.pb_mask = (1 << pb) - 1;
            Ok(())
        }

        fn reset(&mut self) {
            self.probs.fill(PROB_INIT);
            self.state = 0;
            self.reps = [0; 4];
        }

        /// Decodes a match or rep length (2..=273) with the length coder at `base`.
        #[inline(always)]
        fn len(probs: &mut [u16], rc: &mut Rc<'_>, base: usize, pos_state: usize) -> usize {
            let l = &mut probs[base..base + LEN_CODER];
            if rc.bit(&mut l[LEN_CHOICE]) == 0 {
                let o = LEN_LOW + pos_state * 8;
                2 + rc.tree(&mut l[o..o + 8], 3)
            } else if rc.bit(&mut l[LEN_CHOICE2]) == 0 {
                let o = LEN_MID + pos_state * 8;
                10 + rc.tree(&mut l[o..o + 8], 3)
            } else {
                18 + rc.tree(&mut l[LEN_HIGH..LEN_HIGH + 256], 8)
            }
        }

        /// Decodes one LZMA chunk of `unpacked` bytes from `data` into `out` at `out_pos`.
        /// Positions and distances count from `dict_start`, the last dictionary reset.
        fn chunk(
            &mut self,
            data: &[u8],
            out: &mut [u8],
            out_pos: &mut usize,
            unpacked: usize,
            dict_start: usize,
        ) -> Result<(), BzImageError> {
            let end = out_pos
                .checked_add(unpacked)
                .filter(|&e| e <= out.len())
                .ok_or(BzImageError::OutputTooLarge { limit: out.len() })?;
            let mut rc = Rc::new(data)?;
            let probs = &mut self.probs[..];
            let lc = self.lc;
            let (lp_mask, pb_mask) = (self.lp_mask, self.pb_mask);
            let mut state = self.state;
            let [mut rep0, mut rep1, mut rep2, mut rep3] = self.reps;
            let mut pos = *out_pos;
            while pos < end {
                if rc.overrun() {
                    break;
                }
                let rel = pos - dict_start;
                let pos_state = rel & pb_mask;
                if rc.bit(&mut probs[IS_MATCH + state * POS_STATES_MAX + pos_state]) == 0 {
                    let prev = if rel > 0 {
                        usize::from(out[pos - 1])
                    } else {
                        0
                    };
                    let coder = ((rel & lp_mask) << lc) + (prev >> (8 - lc));
                    let base = LITERAL + LITERAL_CODER * coder;
                    let lit = &mut probs[base..base + LITERAL_CODER];
                    let byte = if state < 7 {
                        rc.tree(lit, 8)
                    } else {
                        // A "matched" literal, coded relative to the byte at rep0.
                        let at = (rep0 as usize)
                            .checked_add(1)
                            .and_then(|d| pos.checked_sub(d))
                            .filter(|&i| i >= dict_start)
                            .ok_or_else(|| corrupt("a literal refers before the data start"))?;
                        let mut match_byte = usize::from(out[at]) << 1;
                        let mut offset = 0x100;
                        let mut s = 1;
                        while s < 0x100 {
                            let match_bit = match_byte & offset;
                            match_byte <<= 1;
                            let b = rc.bit(&mut lit[offset + match_bit + s]);
                            s = (s << 1) | b;
                            if b == 1 {
                                offset = match_bit;
                            } else {
                                offset ^= match_bit;
                            }
                        }
                        s - 0x100
                    };
                    out[pos] = byte as u8;
                    pos += 1;
                    state = match state {
                        0..=3 => 0,
                        4..=9 => state - 3,
                        _ => state - 6,
                    };
                    continue;
                }
                let len;
                if rc.bit(&mut probs[IS_REP + state]) == 0 {
                    // A new match: length, then distance.
                    state = if state < 7 { 7 } else { 10 };
                    rep3 = rep2;
                    rep2 = rep1;
                    rep1 = rep0;
                    len = Self::len(probs, &mut rc, MATCH_LEN, pos_state);
                    let len_state = (len - 2).min(3);
                    let o = DIST_SLOT + len_state * 64;
                    let slot = rc.tree(&mut probs[o..o + 64], 6) as u32;
                    if slot < 4 {
                        rep0 = slot;
                    } else {
                        let bits = (slot >> 1) - 1;
                        let base = (2 | (slot & 1)) << bits;
                        if slot < 14 {
                            let o = DIST_SPECIAL + (base - slot) as usize - 1;
                            rep0 = base + rc.tree_reverse(&mut probs[o..], bits);
                        } else {
                            let high = rc.direct(bits - 4) << 4;
                            let low = rc.tree_reverse(&mut probs[DIST_ALIGN..DIST_ALIGN + 16], 4);
                            rep0 = base + high + low;
                        }
                    }
                } else if rc.bit(&mut probs[IS_REP0 + state]) == 0 {
                    if rc.bit(&mut probs[IS_REP0_LONG + state * POS_STATES_MAX + pos_state]) == 0 {
                        // A short rep: one byte at rep0.
                        state = if state < 7 { 9 } else { 11 };
                        len = 1;
                    } else {
                        state = if state < 7 { 8 } else { 11 };
                        len = Self::len(probs, &mut rc, REP_LEN, pos_state);
                    }
                } else {
                    let dist;
                    if rc.bit(&mut probs[IS_REP1 + state]) == 0 {
                        dist = rep1;
                    } else {
                        if rc.bit(&mut probs[IS_REP2 + state]) == 0 {
                            dist = rep2;
                        } else {
                            dist = rep3;
                            rep3 = rep2;
                        }
                        rep2 = rep1;
                    }
                    rep1 = rep0;
                    rep0 = dist;
                    state = if state < 7 { 8 } else { 11 };
                    len = Self::len(probs, &mut rc, REP_LEN, pos_state);
                }
                let dist = rep0 as usize + 1;
                if dist > pos - dict_start {
                    return Err(corrupt("a match refers before the data start"));
                }
                if len > end - pos {
                    return Err(corrupt("a match runs past the end of its LZMA2 chunk"));
                }
                let from = pos - dist;
                if dist >= len {
                    out.copy_within(from..from + len, pos);
                } else if dist == 1 {
                    let b = out[from];
                    out[pos..pos + len].fill(b);
                } else {
                    for i in 0..len {
                        out[pos + i] = out[from + i];
                    }
                }
                pos += len;
            }
            // The encoder flushes so that a normalized decoder ends exactly at the chunk's
            // end with a zero code.
            rc.normalize();
            if rc.overrun() || rc.pos != data.len() || rc.code != 0 {
                return Err(corrupt(
                    "an LZMA2 chunk's compressed size does not match its data",
                ));
            }
            self.state = state;
            self.reps = [rep0, rep1, rep2, rep3];
            *out_pos = pos;
            Ok(())
        }
    }

    /// Undoes the x86 BCJ filter over one block's output: CALL/JMP (E8/E9) targets were
    /// turned from relative into absolute addresses, positions counted from the block's
    /// start. The last four bytes are never converted.
    pub(super) fn bcj_x86(buf: &mut [u8]) {
        const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
        const BIT_NUM: [u32; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
        fn is_00_or_ff(b: u8) -> bool {
            b == 0x00 || b == 0xff
        }
        if buf.len() <= 4 {
            return;
        }
        let limit = buf.len() - 4;
        let mut prev_pos = usize::MAX;
        let mut prev_mask = 0usize;
        let mut i = 0;
        while i < limit {
            if buf[i] & 0xfe != 0xe8 {
                i += 1;
                continue;
            }
            let gap = i.wrapping_sub(prev_pos);
            if gap > 3 {
                prev_mask = 0;
            } else {
                prev_mask = (prev_mask << (gap - 1)) & 7;
                if prev_mask != 0 {
                    let b = buf[i + 4 - BIT_NUM[prev_mask] as usize];
                    if !ALLOWED[prev_mask] || is_00_or_ff(b) {
                        prev_pos = i;
                        prev_mask = (prev_mask << 1) | 1;
                        i += 1;
                        continue;
                    }
                }
            }
            prev_pos = i;
            if is_00_or_ff(buf[i + 4]) {
                let mut src = le32(buf, i + 1);
                let mut dest;
                loop {
                    dest = src.wrapping_sub((i as u32).wrapping_add(5));
                    if prev_mask == 0 {
                        break;
                    }
                    let j = BIT_NUM[prev_mask] * 8;
                    if !is_00_or_ff((dest >> (24 - j)) as u8) {
                        break;
                    }
                    src = dest ^ ((1u32 << (32 - j)) - 1);
                }
                dest &= 0x01ff_ffff;
                dest |= 0u32.wrapping_sub(dest & 0x0100_0000);
                buf[i + 1..i + 5].copy_from_slice(&dest.to_le_bytes());
                i += 5;
            } else {
                prev_mask = (prev_mask << 1) | 1;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;
    use std::io::Write;

    /// Deterministic test data resembling a kernel: an ELF magic, x86-like code with
    /// E8/E9 call and jump opcodes, repeated text and incompressible stretches.
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(ELF_MAGIC);
        while v.len() < len {
            match rnd() % 4 {
                0 => {
                    // A call or jump with a small relative target.
                    v.push(0xe8 | (rnd() & 1) as u8);
                    let rel = (rnd() % 0x4000) as i32 - 0x2000;
                    v.extend_from_slice(&rel.to_le_bytes());
                }
                1 => v.extend_from_slice(b"static const char banner[] = \"ferrovisor\";\n"),
                2 => {
                    let n = (rnd() % 64) as usize;
                    for _ in 0..n {
                        v.push(rnd() as u8);
                    }
                }
                _ => {
                    // Repeat an earlier stretch (long-distance matches).
                    if v.len() > 300 {
                        let from = (rnd() as usize) % (v.len() - 300);
                        let n = (rnd() % 300) as usize;
                        v.extend_from_within(from..from + n);
                    }
                }
            }
        }
        v.truncate(len);
        v
    }

    fn with_trailer(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&(size as u32).to_le_bytes());
        stream
    }

    struct XzOpts {
        check: lzma_rust2::CheckType,
        x86: bool,
        preset: u32,
        lc: u32,
        lp: u32,
        pb: u32,
        block_size: Option<u64>,
    }

    impl Default for XzOpts {
        fn default() -> Self {
            XzOpts {
                check: lzma_rust2::CheckType::Crc32,
                x86: true,
                preset: 6,
                lc: 3,
                lp: 0,
                pb: 2,
                block_size: None,
            }
        }
    }

    fn xz(data: &[u8], o: &XzOpts) -> Vec<u8> {
        let mut opts = lzma_rust2::XzOptions::with_preset(o.preset);
        opts.set_check_sum_type(o.check);
        opts.lzma_options.lc = o.lc;
        opts.lzma_options.lp = o.lp;
        opts.lzma_options.pb = o.pb;
        opts.lzma_options.dict_size = 1 << 16;
        opts.set_block_size(o.block_size.and_then(core::num::NonZeroU64::new));
        if o.x86 {
            opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        }
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    /// A kernel payload as Linux builds it: `xz --check=crc32 --x86 --lzma2` plus the
    /// size trailer.
    fn xz_payload(data: &[u8]) -> Vec<u8> {
        with_trailer(xz(data, &XzOpts::default()), data.len())
    }

    fn gzip_payload(data: &[u8]) -> Vec<u8> {
        // 10-byte header with FNAME, as `gzip` writes for a named file.
        let mut v = vec![0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 3];
        v.extend_from_slice(b"vmlinux.bin\0");
        v.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 9));
        v.extend_from_slice(&crc::crc32(0, data).to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v
    }

    fn zstd_payload(data: &[u8]) -> Vec<u8> {
        let stream =
            ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest);
        with_trailer(stream, data.len())
    }

    /// A bzImage around `payload`: setup header fields as boot.rst places them.
    fn bzimage(payload: &[u8], setup_sects: u8, version: u16) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            usize::from(setup_sects)
        };
        let pm_start = (sects + 1) * 512;
        let payload_offset = 0x3c0usize;
        let mut v = vec![0u8; pm_start + payload_offset];
        v[0..2].copy_from_slice(b"MZ");
        v[0x1f1] = setup_sects;
        v[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        v[0x248..0x24c].copy_from_slice(&(payload_offset as u32).to_le_bytes());
        v[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v.extend_from_slice(&[0xcc; 100]); // trailing setup data, as real images have
        v
    }

    /// identify() then decompress() into a buffer of the advertised size.
    fn unpack(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
        match identify(image)? {
            KernelFormat::Elf(e) => Ok(e.to_vec()),
            KernelFormat::BzImage {
                payload,
                compression,
                decompressed_len,
            } => {
                let mut out = vec![0u8; decompressed_len];
                let n = decompress(payload, compression, &mut out)?;
                out.truncate(n);
                Ok(out)
            }
        }
    }

    #[test]
    fn elf_is_passed_through() {
        let elf = sample(1000, 1);
        assert_eq!(identify(&elf), Ok(KernelFormat::Elf(&elf[..])));
    }

    #[test]
    fn round_trip_each_format() {
        let data = sample(300_000, 2);
        for (payload, c) in [
            (xz_payload(&data), Compression::Xz),
            (gzip_payload(&data), Compression::Gzip),
            (zstd_payload(&data), Compression::Zstd),
            (data.clone(), Compression::Uncompressed),
        ] {
            for sects in [0, 1, 15, 39] {
                let image = bzimage(&payload, sects, 0x20f);
                match identify(&image).unwrap() {
                    KernelFormat::BzImage {
                        compression,
                        decompressed_len,
                        ..
                    } => {
                        assert_eq!(compression, c);
                        assert_eq!(decompressed_len, data.len());
                    }
                    other => panic!("{other:?}"),
                }
                assert_eq!(unpack(&image).unwrap(), data, "{c:?}");
            }
        }
    }

    #[test]
    fn xz_variants() {
        use lzma_rust2::CheckType;
        let data = sample(200_000, 3);
        let mut cases = vec![];
        for check in [CheckType::None, CheckType::Crc32, CheckType::Crc64] {
            for x86 in [false, true] {
                cases.push(XzOpts {
                    check,
                    x86,
                    ..XzOpts::default()
                });
            }
        }
        for preset in [0, 1, 3, 9] {
            cases.push(XzOpts {
                preset,
                ..XzOpts::default()
            });
        }
        for (lc, lp, pb) in [
            (0, 0, 0),
            (4, 0, 4),
            (0, 4, 0),
            (1, 3, 1),
            (2, 2, 3),
            (3, 1, 2),
        ] {
            cases.push(XzOpts {
                lc,
                lp,
                pb,
                ..XzOpts::default()
            });
        }
        // Several blocks, each restarting the dictionary and the BCJ position.
        cases.push(XzOpts {
            block_size: Some(70_001),
            ..XzOpts::default()
        });
        cases.push(XzOpts {
            block_size: Some(65_536),
            x86: false,
            ..XzOpts::default()
        });
        for o in &cases {
            let stream = xz(&data, o);
            let mut out = vec![0u8; data.len()];
            let n = xz::decode(&stream, &mut out).unwrap();
            assert_eq!(n, data.len());
            assert!(
                out == data,
                "preset {} lc {} lp {} pb {} x86 {}",
                o.preset,
                o.lc,
                o.lp,
                o.pb,
                o.x86
            );
        }
    }

    #[test]
    fn xz_small_and_incompressible() {
        // Random data makes the encoder emit uncompressed LZMA2 chunks.
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..150_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        for len in [0, 1, 4, 5, 6, 100, 4096, 150_000] {
            for data in [&noise[..len], &sample(len, 9)[..]] {
                let stream = xz(data, &XzOpts::default());
                let mut out = vec![0u8; len];
                assert_eq!(xz::decode(&stream, &mut out).unwrap(), len);
                assert_eq!(out, data);
            }
        }
    }

    #[test]
    fn bcj_leaves_short_buffers_and_the_tail_alone() {
        let mut b = [0xe8, 0, 0, 0, 0];
        xz::bcj_x86(&mut b[..4]);
        assert_eq!(b, [0xe8, 0, 0, 0, 0]);
        // E8 at 0 with absolute target 0x105 becomes relative 0x100.
        let mut b = [0xe8, 0x05, 0x01, 0, 0, 0x90];
        xz::bcj_x86(&mut b);
        assert_eq!(b, [0xe8, 0x00, 0x01, 0, 0, 0x90]);
        // The same call in the last four bytes' reach is not converted.
        let mut b = [0x90, 0x90, 0xe8, 0x05, 0x01, 0];
        xz::bcj_x86(&mut b);
        assert_eq!(b, [0x90, 0x90, 0xe8, 0x05, 0x01, 0]);
    }

    #[test]
    fn crc_known_values() {
        assert_eq!(crc::crc32(0, b"123456789"), 0xcbf4_3926);
        assert_eq!(crc::crc64(0, b"123456789"), 0x995d_c9bb_df19_39fa);
        let data = sample(1000, 4);
        let split = crc::crc32(crc::crc32(0, &data[..333]), &data[333..]);
        assert_eq!(split, crc::crc32(0, &data));
    }

    #[test]
    fn output_limits() {
        let data = sample(50_000, 5);
        for (payload, c) in [
            (xz_payload(&data), Compression::Xz),
            (gzip_payload(&data), Compression::Gzip),
            (zstd_payload(&data), Compression::Zstd),
            (data.clone(), Compression::Uncompressed),
        ] {
            let mut small = vec![0u8; data.len() - 1];
            assert_eq!(
                decompress(&payload, c, &mut small),
                Err(BzImageError::OutputTooLarge {
                    limit: data.len() - 1
                }),
                "{c:?}"
            );
            let mut big = vec![0u8; data.len() + 10];
            assert_eq!(decompress(&payload, c, &mut big), Ok(data.len()), "{c:?}");
            assert_eq!(&big[..data.len()], &data[..]);
        }
        // A size trailer that lies.
        let mut payload = xz_payload(&data);
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        let mut out = vec![0u8; data.len() + 1];
        assert_eq!(
            decompress(&payload, Compression::Xz, &mut out),
            Err(BzImageError::SizeMismatch {
                header: data.len() + 1,
                actual: data.len()
            })
        );
    }

    #[test]
    fn truncation_never_panics() {
        let data = sample(20_000, 6);
        for (payload, c) in [
            (xz_payload(&data), Compression::Xz),
            (gzip_payload(&data), Compression::Gzip),
            (zstd_payload(&data), Compression::Zstd),
        ] {
            let mut out = vec![0u8; data.len()];
            for len in 0..payload.len() {
                assert!(
                    decompress(&payload[..len], c, &mut out).is_err(),
                    "{c:?} at {len}"
                );
            }
            let image = bzimage(&payload, 0, 0x20f);
            // The payload ends 100 bytes before the image.
            for len in (0..image.len() - 100).step_by(7) {
                assert!(unpack(&image[..len]).is_err(), "{c:?} image at {len}");
            }
        }
    }

    #[test]
    fn corruption_is_detected() {
        let data = sample(20_000, 7);
        for (payload, c) in [
            (xz_payload(&data), Compression::Xz),
            (gzip_payload(&data), Compression::Gzip),
            (zstd_payload(&data), Compression::Zstd),
        ] {
            let mut out = vec![0u8; data.len()];
            for at in 0..payload.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut p = payload.clone();
                    p[at] ^= flip;
                    out.fill(0);
                    let r = decompress(&p, c, &mut out);
                    // xz and gzip carry checksums: a change is an error, or harmless
                    // (gzip's time stamp and name, unused bits after the last deflate
                    // block). The zstd stream here has no checksum: it must not panic.
                    if c != Compression::Zstd {
                        assert!(
                            r.is_err() || out == data,
                            "{c:?}: flip {flip:#x} at {at} corrupted the output silently"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn header_errors() {
        let data = sample(5000, 8);
        let payload = xz_payload(&data);
        let good = bzimage(&payload, 0, 0x20f);
        assert!(unpack(&good).is_ok());

        assert_eq!(
            identify(b"\x01\x02"),
            Err(BzImageError::NotAKernel {
                first_bytes: [1, 2, 0, 0]
            })
        );
        assert!(matches!(
            identify(&[]),
            Err(BzImageError::NotAKernel { .. })
        ));
        let mut no_magic = good.clone();
        no_magic[0x203] = b'x';
        assert_eq!(
            identify(&no_magic),
            Err(BzImageError::NotAKernel {
                first_bytes: *b"MZ\0\0"
            })
        );
        assert!(matches!(
            identify(&good[..0x207]),
            Err(BzImageError::Truncated { .. })
        ));
        assert!(matches!(
            identify(&good[..0x24f]),
            Err(BzImageError::Truncated { .. })
        ));
        assert_eq!(
            identify(&bzimage(&payload, 0, 0x207)),
            Err(BzImageError::OldBootProtocol(0x207))
        );
        // setup_sects pointing past the end of the file.
        let mut img = good[..0x1000].to_vec();
        img[0x1f1] = 200;
        assert!(
            matches!(identify(&img), Err(BzImageError::Truncated { need, .. }) if need == 201 * 512)
        );
        // payload_offset / payload_length out of range, including u32 extremes.
        for (field, value) in [
            (0x248, u32::MAX),
            (0x24c, u32::MAX),
            (0x24c, payload.len() as u32 + 1000),
        ] {
            let mut img = good.clone();
            img[field..field + 4].copy_from_slice(&value.to_le_bytes());
            assert!(
                matches!(identify(&img), Err(BzImageError::BadPayload { .. })),
                "{field:#x}"
            );
        }
        // Size trailer beyond the cap, and too small.
        let mut p = payload.clone();
        let n = p.len();
        p[n - 4..].copy_from_slice(&(MAX_DECOMPRESSED as u32 + 1).to_le_bytes());
        assert_eq!(
            identify(&bzimage(&p, 0, 0x20f)),
            Err(BzImageError::OutputTooLarge {
                limit: MAX_DECOMPRESSED
            })
        );
        p[n - 4..].copy_from_slice(&10u32.to_le_bytes());
        assert!(matches!(
            identify(&bzimage(&p, 0, 0x20f)),
            Err(BzImageError::Corrupt("xz", _))
        ));
        // A payload too short to hold a stream and its trailer.
        assert!(matches!(
            identify(&bzimage(b"\x1f\x8b\x08", 0, 0x20f)),
            Err(BzImageError::Truncated { .. })
        ));
        // Other compressions are named.
        for (magic, name) in [
            (&b"BZh91AY&SY"[..], "bzip2"),
            (b"\x5d\x00\x00\x80\x00", "lzma"),
            (b"\x89LZO\x00\x0d\x0a", "lzo"),
            (b"\x02\x21\x4c\x18\x00", "lz4"),
            (b"\x00\x00\x00\x00\x00", "unrecognised"),
        ] {
            let mut p = magic.to_vec();
            p.extend_from_slice(&[0; 16]);
            match identify(&bzimage(&p, 0, 0x20f)) {
                Err(e @ BzImageError::UnsupportedCompression(what)) => {
                    assert!(what.contains(name), "{what}");
                    assert!(std::format!("{e}").contains("not supported"));
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn zstd_window_limit() {
        // A frame header declaring a 16 MiB window (window descriptor exponent 14).
        let mut p = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 14 << 3];
        p.extend_from_slice(&[0; 16]);
        let mut out = vec![0u8; 1024];
        assert!(matches!(
            decompress(&p, Compression::Zstd, &mut out),
            Err(BzImageError::UnsupportedCompression(w)) if w.contains("window")
        ));
    }

    #[test]
    fn messages_read_after_a_file_name() {
        let cases: [(BzImageError, &str); 6] = [
            (
                BzImageError::Corrupt("xz", "its index CRC32 does not match".to_string()),
                "is a bzImage whose xz payload is corrupt: its index CRC32 does not match",
            ),
            (
                BzImageError::OldBootProtocol(0x206),
                "boot protocol 2.06, older than 2.08",
            ),
            (
                BzImageError::OutputTooLarge { limit: 512 << 20 },
                "more than 512 MiB",
            ),
            (
                BzImageError::NotAKernel {
                    first_bytes: *b"#!/b",
                },
                "(it starts with 23 21 2f 62)",
            ),
            (
                BzImageError::SizeMismatch {
                    header: 10,
                    actual: 9,
                },
                "decompressed to 9 bytes but its size trailer says 10",
            ),
            (
                BzImageError::BadPayload {
                    offset: 0x5000,
                    len: 10,
                    file_len: 20,
                },
                "payload (10 bytes at offset 0x5000) runs past the end of the file (20 bytes)",
            ),
        ];
        for (e, want) in cases {
            let s = std::format!("{e}");
            assert!(s.contains(want), "{s}");
        }
    }

    proptest! {
        #[test]
        fn identify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..0x1400)) {
            let _ = identify(&bytes);
        }

        #[test]
        fn identify_never_panics_with_a_header(
            sects in any::<u8>(),
            version in any::<u16>(),
            offset in any::<u32>(),
            len in any::<u32>(),
            tail in proptest::collection::vec(any::<u8>(), 0..0x3000),
        ) {
            let mut img = vec![0u8; 0x250];
            img[0x1f1] = sects;
            img[0x202..0x206].copy_from_slice(b"HdrS");
            img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
            img[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
            img[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
            img.extend_from_slice(&tail);
            if let Ok(KernelFormat::BzImage { payload, compression, decompressed_len }) = identify(&img) {
                prop_assert!(decompressed_len <= MAX_DECOMPRESSED);
                let mut out = vec![0u8; decompressed_len.min(1 << 16)];
                let _ = decompress(payload, compression, &mut out);
            }
        }

        #[test]
        fn decompress_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            prefix in 0usize..4,
            out_len in 0usize..5000,
        ) {
            let magic: [&[u8]; 4] = [b"", xz::MAGIC, b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd"];
            let mut p = magic[prefix].to_vec();
            p.extend_from_slice(&bytes);
            let mut out = vec![0u8; out_len];
            for c in [Compression::Xz, Compression::Gzip, Compression::Zstd, Compression::Uncompressed] {
                if let Ok(n) = decompress(&p, c, &mut out) {
                    prop_assert!(n <= out_len);
                }
            }
        }

        #[test]
        fn mutated_streams_never_panic(
            seed in any::<u64>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let data = sample(3000, seed);
            for (payload, c) in [
                (xz_payload(&data), Compression::Xz),
                (gzip_payload(&data), Compression::Gzip),
                (zstd_payload(&data), Compression::Zstd),
            ] {
                let mut p = payload;
                for &(at, b) in &edits {
                    let i = at % p.len();
                    p[i] = b;
                }
                let mut out = vec![0u8; data.len()];
                let _ = decompress(&p, c, &mut out);
            }
        }
    }

    /// Decompresses a real bzImage: `FERRO_BZIMAGE=/path/to/vmlinuz cargo test --release
    /// -p hypervisor --lib bzimage::tests::real_bzimage -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs FERRO_BZIMAGE=path to a real bzImage"]
    fn real_bzimage() {
        let Ok(path) = std::env::var("FERRO_BZIMAGE") else {
            std::eprintln!("FERRO_BZIMAGE is not set: nothing to do");
            return;
        };
        let image = std::fs::read(&path).unwrap();
        let KernelFormat::BzImage {
            payload,
            compression,
            decompressed_len,
        } = identify(&image).unwrap()
        else {
            panic!("{path} is not a bzImage");
        };
        let mut out = vec![0u8; decompressed_len];
        let start = std::time::Instant::now();
        let n = decompress(payload, compression, &mut out).unwrap();
        let took = start.elapsed();
        let plan = crate::loader::parse_pvh(&out[..n]).unwrap();
        std::eprintln!(
            "{path}: {} payload of {} bytes -> {n} bytes in {:.3} s ({:.1} MB/s); PVH entry {:#x}, {} segments, {:#x}..{:#x}",
            compression.name(),
            payload.len(),
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64() / 1e6,
            plan.entry,
            plan.segments.len(),
            plan.lowest,
            plan.end
        );
        if let Ok(reference) = std::env::var("FERRO_VMLINUX") {
            assert!(std::fs::read(reference).unwrap() == out[..n]);
            std::eprintln!("matches FERRO_VMLINUX");
        }
    }
}
