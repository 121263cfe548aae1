//! The embedded xenstore: xenstored's semantics behind pure functions.
//!
//! Nothing here touches hardware or guest memory. The glue copies a domain's ring page,
//! calls [`Xenstore::service_ring`], writes back what the [`RingUpdate`] lists and
//! signals the event channel; domain 0 (the hypervisor's toolstack) calls
//! [`Xenstore::request`] / [`Xenstore::handle`] directly.
//!
//! # Modules
//! - [`wire`]: [`parse`] (one message → [`Request`], total, fuzzed), encoders, errors.
//! - [`store`]: the node tree with owner counts.
//! - [`ring`]: index validation, wrap-around reads and writes, message reassembly.
//! - [`engine`]: connections, permissions, watches, transactions, quotas.
//!
//! # Semantics (read from Xen's `tools/xenstored/{core,watch,transaction,domain}.c`,
//! `tools/include/xen-tools/xenstore-common.h`, `docs/misc/xenstore.txt`,
//! `docs/misc/xenstore-ring.txt`, staging 2026 / RELEASE-4.22.0)
//! - Permissions: the first entry is the owner (full access) and the access of every
//!   domain without its own entry; domain 0 may do anything; only the owner (or
//!   domain 0) may SET_PERMS, and only domain 0 may change the owner (`EPERM`). A missing
//!   node is `ENOENT` only if its nearest existing ancestor grants the access asked
//!   for, else `EACCES`. New nodes inherit their parent's permissions; an
//!   unprivileged creator becomes the owner. Watch events reach a watcher only if it
//!   can read the node, its parent, or (permission changes) the node's old
//!   permissions; special events only if it can read the special node.
//! - WRITE creates missing parents; MKDIR of an existing node is a no-op; RM of a
//!   missing node is fine if its parent exists (else `ENOENT`); RM of `/` is `EINVAL`.
//! - Watches fire once on registration (after the `OK`), with the path as registered
//!   (relative stays relative), on every change of the path or a descendant, and on
//!   removal of an ancestor (with the watched path). Duplicate watch: `EEXIST`; too
//!   many: `ENOSPC` (xenstored up to 4.21 said `E2BIG`). `@introduceDomain` fires when
//!   a domain is introduced, `@releaseDomain` when one is released. Identical pending
//!   events are not queued twice.
//! - Transactions see the store as of their first access to each node; the commit fails
//!   with `EAGAIN` if any node they accessed changed since (the transaction ends either
//!   way); their watch events fire at commit. Start inside a transaction: `EBUSY`;
//!   unknown transaction id: `ENOENT`.
//! - Message checks in xenstored's order: type (`ENOSYS`), privilege (`EACCES`),
//!   transaction (`ENOENT`), payload (`EINVAL`). A payload over 4096 bytes or bad
//!   ring indices end the conversation with that domain only (ring `error` field
//!   `XENSTORE_ERROR_PROTO` / `XENSTORE_ERROR_RINGIDX`), with no reply.
//! - Quotas for unprivileged domains ([`Quotas`]): 1000 nodes, 128 watches, 10
//!   transactions, 2048-byte nodes, 5 permissions, 1024 nodes per transaction, 2048
//!   bytes of path after `/local/domain/<n>/` (`EINVAL`); others `ENOSPC`.
//!
//! # Not here
//! XS_CONTROL and the optional GET/SET_FEATURE, GET/SET_QUOTA (`ENOSYS`); watch depth
//! (`XENSTORE_SERVER_FEATURE_WATCHDEPTH` is not offered); `DOMID_ANY` permissions;
//! shutdown tracking for `@releaseDomain` (the hypervisor calls [`Xenstore::release`]
//! when a domain dies); write rate limiting.
#![warn(missing_docs)]

pub mod engine;
pub mod ring;
pub mod store;
pub mod wire;

#[cfg(test)]
mod tests;

pub use engine::{
    Counts, DomainLayout, Quotas, Xenstore, DOMID_FIRST_RESERVED, DOMID_SELF, PRIV_DOMID,
    SERVER_FEATURES,
};
pub use ring::{
    read_messages, ring_read, ring_used, ring_write, Message, MessageReader, ReadError, RingError,
    RingSnapshot, RingUpdate, RingWrite,
};
pub use store::{Access, Node, Perm, Store};
pub use wire::{
    decode_reply, encode, encode_error, encode_watch_event, parse, parse_header, parse_payload, Op,
    Reply, Request, WireError, XsError,
};
