//! The xenstore wire protocol and ring page (`xen/include/public/io/xs_wire.h`).
//!
//! Sources read (xen-project/xen, staging, 2026, and tag RELEASE-4.22.0):
//! `xen/include/public/io/xs_wire.h` (message types, `xsd_errors`, `xsd_sockmsg`,
//! `xenstore_domain_interface`, limits, feature and error values),
//! `docs/misc/xenstore.txt` (payload syntax of every message type) and
//! `docs/misc/xenstore-ring.txt` (ring page layout, reconnection and error fields).
//!
//! Message type 20 was `XS_RESTRICT`; it has been removed and is invalid (`ENOSYS`).
//! Layouts are pinned by `const` assertions on size and field offsets.
#![warn(missing_docs)]

/// `XS_CONTROL` (alias `XS_DEBUG`): implementation-specific control commands.
pub const XS_CONTROL: u32 = 0;
/// `XS_DEBUG`, the deprecated name of [`XS_CONTROL`].
pub const XS_DEBUG: u32 = XS_CONTROL;
/// `XS_DIRECTORY`: `<path>|` → `<child-leaf-name>|*`.
pub const XS_DIRECTORY: u32 = 1;
/// `XS_READ`: `<path>|` → `<value|>`.
pub const XS_READ: u32 = 2;
/// `XS_GET_PERMS`: `<path>|` → `<perm-as-string>|+`.
pub const XS_GET_PERMS: u32 = 3;
/// `XS_WATCH`: `<wpath>|<token>|`.
pub const XS_WATCH: u32 = 4;
/// `XS_UNWATCH`: `<wpath>|<token>|`.
pub const XS_UNWATCH: u32 = 5;
/// `XS_TRANSACTION_START`: `|` → `<transid>|`.
pub const XS_TRANSACTION_START: u32 = 6;
/// `XS_TRANSACTION_END`: `T|` (commit) or `F|` (abort).
pub const XS_TRANSACTION_END: u32 = 7;
/// `XS_INTRODUCE`: `<domid>|<gfn>|<evtchn>|` (privileged).
pub const XS_INTRODUCE: u32 = 8;
/// `XS_RELEASE`: `<domid>|` (privileged).
pub const XS_RELEASE: u32 = 9;
/// `XS_GET_DOMAIN_PATH`: `<domid>|` → `<path>|`.
pub const XS_GET_DOMAIN_PATH: u32 = 10;
/// `XS_WRITE`: `<path>|<value|>`.
pub const XS_WRITE: u32 = 11;
/// `XS_MKDIR`: `<path>|`.
pub const XS_MKDIR: u32 = 12;
/// `XS_RM`: `<path>|`.
pub const XS_RM: u32 = 13;
/// `XS_SET_PERMS`: `<path>|<perm-as-string>|+`.
pub const XS_SET_PERMS: u32 = 14;
/// `XS_WATCH_EVENT`: `<epath>|<token>|` (server to client only).
pub const XS_WATCH_EVENT: u32 = 15;
/// `XS_ERROR`: `E<something>|` (server to client only).
pub const XS_ERROR: u32 = 16;
/// `XS_IS_DOMAIN_INTRODUCED`: `<domid>|` → `T|` or `F|` (privileged).
pub const XS_IS_DOMAIN_INTRODUCED: u32 = 17;
/// `XS_RESUME`: `<domid>|` (privileged).
pub const XS_RESUME: u32 = 18;
/// `XS_SET_TARGET`: `<domid>|<tdomid>|` (privileged).
pub const XS_SET_TARGET: u32 = 19;
/// Former `XS_RESTRICT`; removed, the value is invalid.
pub const XS_RESTRICT_REMOVED: u32 = 20;
/// `XS_RESET_WATCHES`: `|` — drops all watches and transactions of the caller.
pub const XS_RESET_WATCHES: u32 = 21;
/// `XS_DIRECTORY_PART`: `<path>|<offset>` → `<gencnt>|<child-leaf-name>|*`.
pub const XS_DIRECTORY_PART: u32 = 22;
/// `XS_GET_FEATURE` (optional).
pub const XS_GET_FEATURE: u32 = 23;
/// `XS_SET_FEATURE` (optional).
pub const XS_SET_FEATURE: u32 = 24;
/// `XS_GET_QUOTA` (optional).
pub const XS_GET_QUOTA: u32 = 25;
/// `XS_SET_QUOTA` (optional).
pub const XS_SET_QUOTA: u32 = 26;
/// `XS_TYPE_COUNT`: number of message type values (0..XS_TYPE_COUNT).
pub const XS_TYPE_COUNT: u32 = 27;
/// `XS_INVALID`: guaranteed to remain an invalid type.
pub const XS_INVALID: u32 = 0xffff;

/// `XS_WATCH_PATH`: index of the path in a watch event's strings.
pub const XS_WATCH_PATH: u32 = 0;
/// `XS_WATCH_TOKEN`: index of the token in a watch event's strings.
pub const XS_WATCH_TOKEN: u32 = 1;

/// The error names of `xsd_errors[]`, in Xen's order; an `XS_ERROR` payload is one of
/// these followed by a NUL. xenstored sends `EINVAL` for an errno not in the table.
pub const XSD_ERRORS: [&str; 16] = [
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
];

/// `struct xsd_sockmsg`: the 16-byte header before every message's payload
/// (little-endian on x86).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XsdSockmsg {
    /// `XS_*` message type.
    pub ty: u32,
    /// Request identifier, echoed in the daemon's response.
    pub req_id: u32,
    /// Transaction id (0 if not related to a transaction).
    pub tx_id: u32,
    /// Length of the payload following the header.
    pub len: u32,
}

impl XsdSockmsg {
    /// Size of the header in bytes.
    pub const SIZE: usize = 16;

    /// Decodes a header from its wire bytes.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            ty: w(0),
            req_id: w(4),
            tx_id: w(8),
            len: w(12),
        }
    }

    /// Encodes the header into its wire bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.ty.to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

const _: () = assert!(core::mem::size_of::<XsdSockmsg>() == XsdSockmsg::SIZE);
const _: () = assert!(core::mem::offset_of!(XsdSockmsg, req_id) == 4);
const _: () = assert!(core::mem::offset_of!(XsdSockmsg, tx_id) == 8);
const _: () = assert!(core::mem::offset_of!(XsdSockmsg, len) == 12);

/// `XENSTORE_RING_SIZE`: bytes in each direction's circular buffer.
pub const XENSTORE_RING_SIZE: usize = 1024;
/// `XENSTORE_PAYLOAD_MAX`: maximum payload length in either direction. A client
/// exceeding it has its connection killed.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: longest absolute path.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: longest relative path (xenstored's default "path length"
/// quota, measured after `/local/domain/<domid>/`).
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

/// `XENSTORE_SERVER_FEATURE_RECONNECTION`: the ring can be reconnected.
pub const XENSTORE_SERVER_FEATURE_RECONNECTION: u32 = 1;
/// `XENSTORE_SERVER_FEATURE_ERROR`: the `error` field of the ring page is valid.
pub const XENSTORE_SERVER_FEATURE_ERROR: u32 = 2;
/// `XENSTORE_SERVER_FEATURE_WATCHDEPTH`: `XS_WATCH` takes a `<depth>` parameter.
pub const XENSTORE_SERVER_FEATURE_WATCHDEPTH: u32 = 4;
/// `XENSTORE_SERVER_FEATURE_DOMID_ANY`: `DOMID_ANY` usable in node permissions.
pub const XENSTORE_SERVER_FEATURE_DOMID_ANY: u32 = 8;

/// `XENSTORE_CONNECTED`: connection field value in the steady state.
pub const XENSTORE_CONNECTED: u32 = 0;
/// `XENSTORE_RECONNECT`: connection field value while a reconnect is in progress.
pub const XENSTORE_RECONNECT: u32 = 1;

/// `XENSTORE_ERROR_NONE`: no error.
pub const XENSTORE_ERROR_NONE: u32 = 0;
/// `XENSTORE_ERROR_COMM`: communication problem.
pub const XENSTORE_ERROR_COMM: u32 = 1;
/// `XENSTORE_ERROR_RINGIDX`: invalid ring index.
pub const XENSTORE_ERROR_RINGIDX: u32 = 2;
/// `XENSTORE_ERROR_PROTO`: protocol violation (payload too long).
pub const XENSTORE_ERROR_PROTO: u32 = 3;

/// `struct xenstore_domain_interface`: the shared ring page.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct XenstoreDomainInterface {
    /// Requests to the xenstore server.
    pub req: [u8; XENSTORE_RING_SIZE],
    /// Replies and asynchronous watch events.
    pub rsp: [u8; XENSTORE_RING_SIZE],
    /// Request consumer index (written by the server).
    pub req_cons: u32,
    /// Request producer index (written by the guest).
    pub req_prod: u32,
    /// Response consumer index (written by the guest).
    pub rsp_cons: u32,
    /// Response producer index (written by the server).
    pub rsp_prod: u32,
    /// Bitmap of `XENSTORE_SERVER_FEATURE_*` (written by the server).
    pub server_features: u32,
    /// `XENSTORE_CONNECTED` / `XENSTORE_RECONNECT`.
    pub connection: u32,
    /// `XENSTORE_ERROR_*` (valid with [`XENSTORE_SERVER_FEATURE_ERROR`]).
    pub error: u32,
    /// Event channel for the server to signal (dom0less; used when non-zero).
    pub evtchn_port: u32,
}

/// Offset of `req` in the ring page.
pub const XS_RING_REQ_OFFSET: usize = 0;
/// Offset of `rsp` in the ring page.
pub const XS_RING_RSP_OFFSET: usize = 1024;
/// Offset of `req_cons` in the ring page.
pub const XS_RING_REQ_CONS_OFFSET: usize = 2048;
/// Offset of `req_prod` in the ring page.
pub const XS_RING_REQ_PROD_OFFSET: usize = 2052;
/// Offset of `rsp_cons` in the ring page.
pub const XS_RING_RSP_CONS_OFFSET: usize = 2056;
/// Offset of `rsp_prod` in the ring page.
pub const XS_RING_RSP_PROD_OFFSET: usize = 2060;
/// Offset of `server_features` in the ring page.
pub const XS_RING_SERVER_FEATURES_OFFSET: usize = 2064;
/// Offset of `connection` in the ring page.
pub const XS_RING_CONNECTION_OFFSET: usize = 2068;
/// Offset of `error` in the ring page.
pub const XS_RING_ERROR_OFFSET: usize = 2072;
/// Offset of `evtchn_port` in the ring page.
pub const XS_RING_EVTCHN_PORT_OFFSET: usize = 2076;
/// Bytes of the page covered by [`XenstoreDomainInterface`].
pub const XS_RING_INTERFACE_SIZE: usize = 2080;

const _: () = {
    use core::mem::{offset_of, size_of};
    type I = XenstoreDomainInterface;
    assert!(size_of::<I>() == XS_RING_INTERFACE_SIZE);
    assert!(offset_of!(I, req) == XS_RING_REQ_OFFSET);
    assert!(offset_of!(I, rsp) == XS_RING_RSP_OFFSET);
    assert!(offset_of!(I, req_cons) == XS_RING_REQ_CONS_OFFSET);
    assert!(offset_of!(I, req_prod) == XS_RING_REQ_PROD_OFFSET);
    assert!(offset_of!(I, rsp_cons) == XS_RING_RSP_CONS_OFFSET);
    assert!(offset_of!(I, rsp_prod) == XS_RING_RSP_PROD_OFFSET);
    assert!(offset_of!(I, server_features) == XS_RING_SERVER_FEATURES_OFFSET);
    assert!(offset_of!(I, connection) == XS_RING_CONNECTION_OFFSET);
    assert!(offset_of!(I, error) == XS_RING_ERROR_OFFSET);
    assert!(offset_of!(I, evtchn_port) == XS_RING_EVTCHN_PORT_OFFSET);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = XsdSockmsg {
            ty: XS_WRITE,
            req_id: 0x0102_0304,
            tx_id: 7,
            len: 4096,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], &[11, 0, 0, 0]);
        assert_eq!(XsdSockmsg::from_bytes(&b), h);
    }

    #[test]
    fn error_table_matches_xen_order() {
        assert_eq!(XSD_ERRORS[0], "EINVAL");
        assert_eq!(XSD_ERRORS[4], "ENOENT");
        assert_eq!(XSD_ERRORS[14], "E2BIG");
        assert_eq!(XSD_ERRORS[15], "EPERM");
    }

    #[test]
    fn type_numbers() {
        assert_eq!(XS_SET_TARGET, 19);
        assert_eq!(XS_RESET_WATCHES, XS_SET_TARGET + 2);
        assert_eq!(XS_DIRECTORY_PART, 22);
        assert_eq!(XS_SET_QUOTA + 1, XS_TYPE_COUNT);
    }
}
