//! Message parsing and encoding: one xenstore message (header + payload) to a typed
//! [`Request`], and replies, errors and watch events back to wire bytes.
//!
//! [`parse`] is pure and total: any byte string gives `Ok` or a [`WireError`], never a
//! panic (fuzzed by `hypervisor/fuzz`, target `xenstore_parse`). The payload rules are
//! xenstored's (`tools/xenstored/core.c`, `watch.c`, `transaction.c`, `domain.c`):
//! - one-argument requests (READ, DIRECTORY, MKDIR, RM, GET_PERMS, TRANSACTION_END,
//!   RELEASE, RESUME, GET_DOMAIN_PATH, IS_DOMAIN_INTRODUCED) must hold exactly one NUL,
//!   at the end (`onearg()`);
//! - WRITE is `<path>|<value>`: at least one NUL, the value is everything after the
//!   first NUL (binary, not NUL-terminated);
//! - WATCH / UNWATCH hold exactly two NUL-terminated strings (bytes after the last NUL
//!   are ignored, as `get_strings()` does); the optional third `<depth>` argument is
//!   refused (`XENSTORE_SERVER_FEATURE_WATCHDEPTH` is not offered);
//! - SET_PERMS is `<path>|<perm>|+` with at least one permission;
//! - DIRECTORY_PART holds exactly two strings, the second an `atoi` offset;
//! - INTRODUCE holds at least three strings (`<domid>|<gfn>|<evtchn>|`), SET_TARGET two;
//! - TRANSACTION_START and RESET_WATCHES ignore their payload.
//!
//! Paths: characters `[A-Za-z0-9-/_@]`, not empty, no `//`, no trailing `/` (except
//! the root), `@` first only where special paths are allowed (WATCH, UNWATCH, GET_PERMS,
//! SET_PERMS), at most [`XENSTORE_ABS_PATH_MAX`] bytes. Relative paths are kept
//! relative here; the engine prefixes `/local/domain/<domid>/` and applies the
//! per-domain length limit.
//!
//! Every payload error is `EINVAL` in xenstored, but it is only reported after the
//! checks that precede payload parsing there (type → `ENOSYS`, privilege → `EACCES`,
//! transaction id → `ENOENT`): hence [`WireError::BadPayload`] carries the header.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::xs_wire::*;

use super::store::{Access, Perm};

/// The errors a xenstore server returns, as strings in `XS_ERROR` payloads
/// (`xsd_errors[]` in xs_wire.h; the discriminant is the index in [`XSD_ERRORS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XsError {
    /// `EINVAL`: malformed request.
    Einval = 0,
    /// `EACCES`: permission denied.
    Eacces = 1,
    /// `EEXIST`: already exists (duplicate watch).
    Eexist = 2,
    /// `EISDIR`.
    Eisdir = 3,
    /// `ENOENT`: no such node, transaction, watch or domain.
    Enoent = 4,
    /// `ENOMEM` (also: commit of a transaction that failed internally).
    Enomem = 5,
    /// `ENOSPC`: a quota is exceeded.
    Enospc = 6,
    /// `EIO`.
    Eio = 7,
    /// `ENOTEMPTY`.
    Enotempty = 8,
    /// `ENOSYS`: unknown or unsupported message type.
    Enosys = 9,
    /// `EROFS`.
    Erofs = 10,
    /// `EBUSY`: transaction start inside a transaction.
    Ebusy = 11,
    /// `EAGAIN`: transaction conflict, retry.
    Eagain = 12,
    /// `EISCONN`.
    Eisconn = 13,
    /// `E2BIG`: reply larger than `XENSTORE_PAYLOAD_MAX`.
    E2big = 14,
    /// `EPERM`: an unprivileged domain tried to change a node's owner.
    Eperm = 15,
}

impl XsError {
    /// The name xenstored sends, e.g. `"ENOENT"`.
    pub fn name(self) -> &'static str {
        XSD_ERRORS[self as usize]
    }

    /// The `XS_ERROR` payload: the name followed by a NUL.
    pub fn payload(self) -> Vec<u8> {
        let mut v = Vec::from(self.name().as_bytes());
        v.push(0);
        v
    }

    /// Looks an error up by name (as found in an `XS_ERROR` payload, without NUL).
    pub fn from_name(name: &[u8]) -> Option<Self> {
        const ALL: [XsError; 16] = [
            XsError::Einval,
            XsError::Eacces,
            XsError::Eexist,
            XsError::Eisdir,
            XsError::Enoent,
            XsError::Enomem,
            XsError::Enospc,
            XsError::Eio,
            XsError::Enotempty,
            XsError::Enosys,
            XsError::Erofs,
            XsError::Ebusy,
            XsError::Eagain,
            XsError::Eisconn,
            XsError::E2big,
            XsError::Eperm,
        ];
        ALL.into_iter().find(|e| e.name().as_bytes() == name)
    }
}

/// A decoded request operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `XS_DIRECTORY`.
    Directory {
        /// Path as sent (absolute or relative).
        path: String,
    },
    /// `XS_DIRECTORY_PART`.
    DirectoryPart {
        /// Path as sent.
        path: String,
        /// Byte offset into the child list (C `atoi`, wrapped to unsigned).
        offset: u32,
    },
    /// `XS_READ`.
    Read {
        /// Path as sent.
        path: String,
    },
    /// `XS_GET_PERMS` (special `@` paths allowed).
    GetPerms {
        /// Path as sent.
        path: String,
    },
    /// `XS_WATCH` (special `@` paths allowed; tx_id ignored).
    Watch {
        /// Watched path as sent.
        path: String,
        /// Token, any bytes but NUL.
        token: Vec<u8>,
    },
    /// `XS_UNWATCH` (tx_id ignored).
    Unwatch {
        /// Watched path as sent.
        path: String,
        /// Token.
        token: Vec<u8>,
    },
    /// `XS_TRANSACTION_START`.
    TransactionStart,
    /// `XS_TRANSACTION_END`: `T` commits, `F` aborts.
    TransactionEnd {
        /// `true` for `T`.
        commit: bool,
    },
    /// `XS_INTRODUCE` (privileged).
    Introduce {
        /// Domain introduced.
        domid: u16,
        /// Ring frame as sent (signed decimal; xenstored ignores it).
        gfn: i64,
        /// Event channel (`atoi`, must be > 0).
        port: u32,
    },
    /// `XS_RELEASE` (privileged).
    Release {
        /// Domain released.
        domid: u16,
    },
    /// `XS_GET_DOMAIN_PATH`.
    GetDomainPath {
        /// Domain asked about.
        domid: u16,
    },
    /// `XS_WRITE`.
    Write {
        /// Path as sent.
        path: String,
        /// Value: everything after the path's NUL.
        value: Vec<u8>,
    },
    /// `XS_MKDIR`.
    Mkdir {
        /// Path as sent.
        path: String,
    },
    /// `XS_RM`.
    Rm {
        /// Path as sent.
        path: String,
    },
    /// `XS_SET_PERMS` (special `@` paths allowed).
    SetPerms {
        /// Path as sent.
        path: String,
        /// New permissions; the first is the owner and the default for others.
        perms: Vec<Perm>,
    },
    /// `XS_IS_DOMAIN_INTRODUCED` (privileged).
    IsDomainIntroduced {
        /// Domain asked about (`DOMID_SELF` answers `T`).
        domid: u16,
    },
    /// `XS_RESUME` (privileged).
    Resume {
        /// Domain resumed.
        domid: u16,
    },
    /// `XS_SET_TARGET` (privileged).
    SetTarget {
        /// Domain given the rights of `target`.
        domid: u16,
        /// Target domain.
        target: u16,
    },
    /// `XS_RESET_WATCHES`.
    ResetWatches,
}

impl Op {
    /// The `XS_*` message type of this operation (also the type of its reply).
    pub fn msg_type(&self) -> u32 {
        match self {
            Op::Directory { .. } => XS_DIRECTORY,
            Op::DirectoryPart { .. } => XS_DIRECTORY_PART,
            Op::Read { .. } => XS_READ,
            Op::GetPerms { .. } => XS_GET_PERMS,
            Op::Watch { .. } => XS_WATCH,
            Op::Unwatch { .. } => XS_UNWATCH,
            Op::TransactionStart => XS_TRANSACTION_START,
            Op::TransactionEnd { .. } => XS_TRANSACTION_END,
            Op::Introduce { .. } => XS_INTRODUCE,
            Op::Release { .. } => XS_RELEASE,
            Op::GetDomainPath { .. } => XS_GET_DOMAIN_PATH,
            Op::Write { .. } => XS_WRITE,
            Op::Mkdir { .. } => XS_MKDIR,
            Op::Rm { .. } => XS_RM,
            Op::SetPerms { .. } => XS_SET_PERMS,
            Op::IsDomainIntroduced { .. } => XS_IS_DOMAIN_INTRODUCED,
            Op::Resume { .. } => XS_RESUME,
            Op::SetTarget { .. } => XS_SET_TARGET,
            Op::ResetWatches => XS_RESET_WATCHES,
        }
    }

    /// Encodes this operation as a request payload (the inverse of [`parse`]).
    pub fn payload(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut s = |b: &[u8]| {
            v.extend_from_slice(b);
            v.push(0);
        };
        match self {
            Op::Directory { path }
            | Op::Read { path }
            | Op::GetPerms { path }
            | Op::Mkdir { path }
            | Op::Rm { path } => s(path.as_bytes()),
            Op::DirectoryPart { path, offset } => {
                s(path.as_bytes());
                // sent as the signed value xenstored's atoi reads back
                s(format!("{}", *offset as i32).as_bytes());
            }
            Op::Watch { path, token } | Op::Unwatch { path, token } => {
                s(path.as_bytes());
                s(token);
            }
            Op::TransactionStart | Op::ResetWatches => s(b""),
            Op::TransactionEnd { commit } => s(if *commit { b"T" } else { b"F" }),
            Op::Introduce { domid, gfn, port } => {
                s(format!("{domid}").as_bytes());
                s(format!("{gfn}").as_bytes());
                s(format!("{port}").as_bytes());
            }
            Op::Release { domid }
            | Op::GetDomainPath { domid }
            | Op::IsDomainIntroduced { domid }
            | Op::Resume { domid } => s(format!("{domid}").as_bytes()),
            Op::SetTarget { domid, target } => {
                s(format!("{domid}").as_bytes());
                s(format!("{target}").as_bytes());
            }
            Op::Write { path, value } => {
                s(path.as_bytes());
                v.extend_from_slice(value);
            }
            Op::SetPerms { path, perms } => {
                s(path.as_bytes());
                for p in perms {
                    s(p.to_string_form().as_bytes());
                }
            }
        }
        v
    }

    /// Encodes this operation as a complete request message.
    pub fn encode(&self, req_id: u32, tx_id: u32) -> Vec<u8> {
        encode(self.msg_type(), req_id, tx_id, &self.payload())
    }
}

/// Whether messages of type `ty` are reserved to the privileged domain (xenstored's
/// `XS_FLAG_PRIV`).
pub fn type_is_privileged(ty: u32) -> bool {
    matches!(
        ty,
        XS_CONTROL
            | XS_INTRODUCE
            | XS_RELEASE
            | XS_IS_DOMAIN_INTRODUCED
            | XS_RESUME
            | XS_SET_TARGET
            | XS_SET_FEATURE
            | XS_GET_QUOTA
            | XS_SET_QUOTA
    )
}

/// Whether messages of type `ty` ignore the header's transaction id (`XS_FLAG_NOTID`).
pub fn type_ignores_tx(ty: u32) -> bool {
    matches!(ty, XS_WATCH | XS_UNWATCH)
}

/// Whether this server implements message type `ty` (the others get `ENOSYS`, as
/// xenstored answers types it has no handler for; CONTROL and the optional
/// GET/SET_FEATURE and GET/SET_QUOTA are not offered).
pub fn type_supported(ty: u32) -> bool {
    matches!(
        ty,
        XS_DIRECTORY
            | XS_READ
            | XS_GET_PERMS
            | XS_WATCH
            | XS_UNWATCH
            | XS_TRANSACTION_START
            | XS_TRANSACTION_END
            | XS_INTRODUCE
            | XS_RELEASE
            | XS_GET_DOMAIN_PATH
            | XS_WRITE
            | XS_MKDIR
            | XS_RM
            | XS_SET_PERMS
            | XS_IS_DOMAIN_INTRODUCED
            | XS_RESUME
            | XS_SET_TARGET
            | XS_RESET_WATCHES
            | XS_DIRECTORY_PART
    )
}

/// A parsed request message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id from the header (0: none).
    pub tx_id: u32,
    /// The operation.
    pub op: Op,
}

/// Why a message could not be turned into a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer than 16 bytes: no complete header. (Cannot happen on a ring, where the
    /// reader waits for more bytes.)
    Truncated,
    /// The buffer length disagrees with the header's `len`. (Cannot happen on a ring.)
    LengthMismatch {
        /// The header.
        header: XsdSockmsg,
        /// Bytes actually present after the header.
        actual: usize,
    },
    /// `len` > [`XENSTORE_PAYLOAD_MAX`]: xenstored stops talking to the client
    /// (connection error `XENSTORE_ERROR_PROTO`), no reply.
    PayloadTooLong(XsdSockmsg),
    /// Unknown, reply-only or unsupported type: reply `ENOSYS`.
    UnknownType(XsdSockmsg),
    /// The payload is malformed for its type: reply `error` (always `EINVAL`) once the
    /// privilege and transaction checks have passed.
    BadPayload {
        /// The header.
        header: XsdSockmsg,
        /// The error to return.
        error: XsError,
    },
}

impl WireError {
    /// The header, when one was decoded.
    pub fn header(&self) -> Option<XsdSockmsg> {
        match *self {
            WireError::Truncated => None,
            WireError::LengthMismatch { header, .. }
            | WireError::PayloadTooLong(header)
            | WireError::UnknownType(header)
            | WireError::BadPayload { header, .. } => Some(header),
        }
    }
}

/// Splits a header off a message buffer.
pub fn parse_header(bytes: &[u8]) -> Result<XsdSockmsg, WireError> {
    let h: &[u8; XsdSockmsg::SIZE] = bytes
        .get(..XsdSockmsg::SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(WireError::Truncated)?;
    Ok(XsdSockmsg::from_bytes(h))
}

/// Parses one complete message (16-byte header + exactly `len` payload bytes).
pub fn parse(bytes: &[u8]) -> Result<Request, WireError> {
    let header = parse_header(bytes)?;
    if header.len as usize > XENSTORE_PAYLOAD_MAX {
        return Err(WireError::PayloadTooLong(header));
    }
    let payload = &bytes[XsdSockmsg::SIZE..];
    if payload.len() != header.len as usize {
        return Err(WireError::LengthMismatch {
            header,
            actual: payload.len(),
        });
    }
    let op = parse_payload(&header, payload)?;
    Ok(Request {
        req_id: header.req_id,
        tx_id: header.tx_id,
        op,
    })
}

/// Decodes the payload of a message whose header has already been read (the ring
/// path). `payload.len()` should equal `header.len`; only the bytes given are looked at.
pub fn parse_payload(header: &XsdSockmsg, payload: &[u8]) -> Result<Op, WireError> {
    if header.len as usize > XENSTORE_PAYLOAD_MAX {
        return Err(WireError::PayloadTooLong(*header));
    }
    if !type_supported(header.ty) {
        return Err(WireError::UnknownType(*header));
    }
    let bad = |error| WireError::BadPayload {
        header: *header,
        error,
    };
    decode_op(header.ty, payload).map_err(bad)
}

/// NUL-terminated strings of a payload (bytes after the last NUL are ignored), as
/// xenstored's `get_strings()`.
fn strings(payload: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = payload.split(|&b| b == 0).collect();
    // The piece after the last NUL is not a string (empty when the payload ends in NUL).
    v.pop();
    v
}

/// The single argument of a one-argument request: exactly one NUL, at the end.
fn onearg(payload: &[u8]) -> Result<&[u8], XsError> {
    match payload.split_last() {
        Some((0, rest)) if !rest.contains(&0) => Ok(rest),
        _ => Err(XsError::Einval),
    }
}

fn decode_op(ty: u32, payload: &[u8]) -> Result<Op, XsError> {
    let path_of = |b: &[u8], special: bool| check_path(b, special).map(String::from);
    Ok(match ty {
        XS_DIRECTORY => Op::Directory {
            path: path_of(onearg(payload)?, false)?,
        },
        XS_READ => Op::Read {
            path: path_of(onearg(payload)?, false)?,
        },
        XS_GET_PERMS => Op::GetPerms {
            path: path_of(onearg(payload)?, true)?,
        },
        XS_MKDIR => Op::Mkdir {
            path: path_of(onearg(payload)?, false)?,
        },
        XS_RM => Op::Rm {
            path: path_of(onearg(payload)?, false)?,
        },
        XS_DIRECTORY_PART => {
            let v = strings(payload);
            if payload.iter().filter(|&&b| b == 0).count() != 2 {
                return Err(XsError::Einval);
            }
            Op::DirectoryPart {
                path: path_of(v[0], false)?,
                offset: atoi(v[1]) as u32,
            }
        }
        XS_WATCH | XS_UNWATCH => {
            let v = strings(payload);
            if v.len() != 2 {
                return Err(XsError::Einval);
            }
            let path = path_of(v[0], true)?;
            let token = Vec::from(v[1]);
            if ty == XS_WATCH {
                Op::Watch { path, token }
            } else {
                Op::Unwatch { path, token }
            }
        }
        XS_TRANSACTION_START => Op::TransactionStart,
        XS_RESET_WATCHES => Op::ResetWatches,
        XS_TRANSACTION_END => match onearg(payload)? {
            b"T" => Op::TransactionEnd { commit: true },
            b"F" => Op::TransactionEnd { commit: false },
            _ => return Err(XsError::Einval),
        },
        XS_WRITE => {
            let nul = payload
                .iter()
                .position(|&b| b == 0)
                .ok_or(XsError::Einval)?;
            Op::Write {
                path: path_of(&payload[..nul], false)?,
                value: Vec::from(&payload[nul + 1..]),
            }
        }
        XS_SET_PERMS => {
            let v = strings(payload);
            if v.len() < 2 {
                return Err(XsError::Einval);
            }
            let perms = v[1..]
                .iter()
                .map(|s| Perm::parse(s).ok_or(XsError::Einval))
                .collect::<Result<Vec<_>, _>>()?;
            Op::SetPerms {
                path: path_of(v[0], true)?,
                perms,
            }
        }
        XS_INTRODUCE => {
            let v = strings(payload);
            if v.len() < 3 {
                return Err(XsError::Einval);
            }
            let domid = parse_domid(v[0])?;
            let port = atoi(v[2]);
            if port <= 0 {
                return Err(XsError::Einval);
            }
            Op::Introduce {
                domid,
                gfn: atoll(v[1]),
                port: port as u32,
            }
        }
        XS_SET_TARGET => {
            let v = strings(payload);
            if v.len() < 2 {
                return Err(XsError::Einval);
            }
            Op::SetTarget {
                domid: parse_domid(v[0])?,
                target: parse_domid(v[1])?,
            }
        }
        XS_RELEASE => Op::Release {
            domid: parse_domid(onearg(payload)?)?,
        },
        XS_RESUME => Op::Resume {
            domid: parse_domid(onearg(payload)?)?,
        },
        XS_GET_DOMAIN_PATH => Op::GetDomainPath {
            domid: parse_domid(onearg(payload)?)?,
        },
        XS_IS_DOMAIN_INTRODUCED => Op::IsDomainIntroduced {
            domid: parse_domid(onearg(payload)?)?,
        },
        _ => return Err(XsError::Einval),
    })
}

/// A domain id in decimal, 0..=65535 (xenstored's `parse_domid`; unlike `strtoul`,
/// an empty string, a sign or spaces are refused).
pub fn parse_domid(s: &[u8]) -> Result<u16, XsError> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return Err(XsError::Einval);
    }
    let mut v: u32 = 0;
    for &c in s {
        v = v.saturating_mul(10).saturating_add(u32::from(c - b'0'));
    }
    u16::try_from(v).map_err(|_| XsError::Einval)
}

/// C `atoll` on a byte string: leading spaces, optional sign, digits; anything else
/// ends the number; saturates instead of overflowing.
fn atoll(s: &[u8]) -> i64 {
    let mut i = 0;
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut v: i64 = 0;
    while let Some(d) = s.get(i).filter(|c| c.is_ascii_digit()) {
        v = v.saturating_mul(10).saturating_add(i64::from(d - b'0'));
        i += 1;
    }
    if neg {
        -v
    } else {
        v
    }
}

/// C `atoi`: [`atoll`] clamped to `i32`.
fn atoi(s: &[u8]) -> i32 {
    atoll(s).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// Characters xenstored accepts in a path (`valid_chars()`).
pub fn valid_path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'@')
}

/// Checks the syntax of a path as sent (absolute, relative or, with `allow_special`,
/// an `@` special path) and returns it as a string. Lengths beyond
/// [`XENSTORE_ABS_PATH_MAX`] are refused here; the per-domain limit needs the domid
/// and is applied by the engine.
pub fn check_path(raw: &[u8], allow_special: bool) -> Result<&str, XsError> {
    if raw.is_empty()
        || raw.len() > XENSTORE_ABS_PATH_MAX
        || !raw.iter().copied().all(valid_path_char)
        || (raw[0] == b'@' && !allow_special)
        || (raw.len() > 1 && raw.ends_with(b"/"))
        || raw.windows(2).any(|w| w == b"//")
    {
        return Err(XsError::Einval);
    }
    // All characters are ASCII, so this cannot fail.
    core::str::from_utf8(raw).map_err(|_| XsError::Einval)
}

/// Encodes a message: header + payload.
pub fn encode(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let h = XsdSockmsg {
        ty,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut v = Vec::with_capacity(XsdSockmsg::SIZE + payload.len());
    v.extend_from_slice(&h.to_bytes());
    v.extend_from_slice(payload);
    v
}

/// Encodes an `XS_ERROR` reply (only req_id and tx_id are copied from the request).
pub fn encode_error(req_id: u32, tx_id: u32, err: XsError) -> Vec<u8> {
    encode(XS_ERROR, req_id, tx_id, &err.payload())
}

/// Encodes an `XS_WATCH_EVENT`: `<epath>|<token>|`, req_id and tx_id 0.
pub fn encode_watch_event(path: &[u8], token: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(path.len() + token.len() + 2);
    p.extend_from_slice(path);
    p.push(0);
    p.extend_from_slice(token);
    p.push(0);
    encode(XS_WATCH_EVENT, 0, 0, &p)
}

/// A decoded server-to-client message (used by tests and clients in the project).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A successful reply of the request's type.
    Ok {
        /// Message type.
        ty: u32,
        /// Echoed request id.
        req_id: u32,
        /// Echoed transaction id.
        tx_id: u32,
        /// Payload.
        payload: Vec<u8>,
    },
    /// `XS_ERROR`.
    Error {
        /// Echoed request id.
        req_id: u32,
        /// Echoed transaction id.
        tx_id: u32,
        /// The error (`None` if the name is not in the table).
        error: Option<XsError>,
    },
    /// `XS_WATCH_EVENT`.
    Event {
        /// Event path, in the form the watch was registered.
        path: Vec<u8>,
        /// Watch token.
        token: Vec<u8>,
    },
}

/// Decodes a server-to-client message; `None` if it is not well formed.
pub fn decode_reply(bytes: &[u8]) -> Option<Reply> {
    let h = parse_header(bytes).ok()?;
    let payload = bytes.get(XsdSockmsg::SIZE..)?;
    if payload.len() != h.len as usize {
        return None;
    }
    Some(match h.ty {
        XS_ERROR => Reply::Error {
            req_id: h.req_id,
            tx_id: h.tx_id,
            error: XsError::from_name(onearg(payload).ok()?),
        },
        XS_WATCH_EVENT => {
            let v = strings(payload);
            if v.len() != 2 {
                return None;
            }
            Reply::Event {
                path: Vec::from(v[0]),
                token: Vec::from(v[1]),
            }
        }
        ty => Reply::Ok {
            ty,
            req_id: h.req_id,
            tx_id: h.tx_id,
            payload: Vec::from(payload),
        },
    })
}

impl Perm {
    /// Parses `<letter><domid>` (`n`, `r`, `w`, `b`; decimal domid 0..=65535).
    /// xenstored uses `strtol(.., 0)` and so also takes hex, octal and negative ids;
    /// clients (Linux, libxenstore) send `%c%u`, which is all this accepts.
    pub fn parse(s: &[u8]) -> Option<Perm> {
        let (&l, id) = s.split_first()?;
        Some(Perm {
            domid: parse_domid(id).ok()?,
            access: Access::from_letter(l)?,
        })
    }

    /// The `<letter><domid>` form used by GET_PERMS / SET_PERMS.
    pub fn to_string_form(&self) -> String {
        format!("{}{}", self.access.letter() as char, self.domid)
    }
}
