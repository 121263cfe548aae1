//! The xenstore server: connections, permissions, watches, transactions, quotas.
//!
//! Domain 0 ([`PRIV_DOMID`]) is the privileged client: in ferrovisor, the hypervisor's
//! own toolstack. It always has a connection (no ring: it calls [`Xenstore::handle`] or
//! [`Xenstore::request`] and reads its events with [`Xenstore::take_output`]). Guest
//! domains get a connection from [`Xenstore::introduce`] (or `XS_INTRODUCE` from
//! domain 0) and talk over their ring through [`Xenstore::service_ring`].

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use abi::xs_wire::*;

use super::ring::{read_messages, ring_used, ring_write, MessageReader, RingSnapshot, RingUpdate};
use super::store::{
    basename, child_path, parent_of, Access, Node, Perm, Store, PERM_OWNER, PERM_READ, PERM_WRITE,
};
use super::wire::{
    check_path, encode, encode_error, encode_watch_event, parse, type_ignores_tx,
    type_is_privileged, Op, WireError, XsError,
};

/// The privileged domain (xenstored's `priv_domid`): may do anything.
pub const PRIV_DOMID: u16 = 0;
/// `DOMID_SELF` (xen.h): `XS_IS_DOMAIN_INTRODUCED` answers `T` for it.
pub const DOMID_SELF: u16 = 0x7ff0;
/// `DOMID_FIRST_RESERVED` (xen.h): ids from here on are not real domains.
pub const DOMID_FIRST_RESERVED: u16 = 0x7ff0;
/// The features this server offers in the ring page's `server_features` (the glue
/// writes this value when it sets up a ring): reconnection and the error field.
pub const SERVER_FEATURES: u32 =
    XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR;

/// Per-domain limits. They apply to unprivileged domains only; 0 disables a limit.
/// Defaults are xenstored's (`tools/xenstored/domain.c`, `quotas[]`), except the
/// output-queue limits, which stand in for its per-domain memory quota.
///
/// A limit is the largest count allowed (a domain may own 1000 nodes). xenstored
/// 4.22 refuses when the count *after* the operation reaches the quota (so 999 nodes,
/// 127 watches); earlier versions allowed the quota itself (and one more watch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own (`ACC_NODES`, 1000).
    pub entries: usize,
    /// Watches per connection (`ACC_WATCH`, 128).
    pub watches: usize,
    /// Open transactions per connection (`ACC_TRANS`, 10).
    pub transactions: usize,
    /// Accounted node size in bytes (`ACC_NODESZ`, 2048; see [`Node::acc_size`]).
    pub node_size: usize,
    /// Permission entries per node (`ACC_NPERM`, 5).
    pub perms: usize,
    /// Nodes accessed by one transaction (`ACC_TRANSNODES`, 1024).
    pub tx_nodes: usize,
    /// Path length after `/local/domain/<domid>/` (`ACC_PATHLEN`,
    /// `XENSTORE_REL_PATH_MAX` = 2048).
    pub path_len: usize,
    /// Bytes of queued output beyond which watch events are dropped.
    pub outbox_bytes: usize,
    /// Bytes of queued output beyond which no more requests are read from the ring
    /// (xenstored stops reading at 20 outstanding replies, `ACC_OUTST`).
    pub read_stop_bytes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            entries: 1000,
            watches: 128,
            transactions: 10,
            node_size: 2048,
            perms: 5,
            tx_nodes: 1024,
            path_len: XENSTORE_REL_PATH_MAX,
            outbox_bytes: 256 * 1024,
            read_stop_bytes: 32 * 1024,
        }
    }
}

fn over(limit: usize, value: usize) -> bool {
    limit != 0 && value > limit
}

/// Resource counts of one domain, for leak checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes the domain owns.
    pub entries: usize,
    /// Watches registered on its connection.
    pub watches: usize,
    /// Open transactions.
    pub transactions: usize,
    /// Messages queued for it (replies and events not yet on its ring).
    pub queued: usize,
    /// Bytes queued for it.
    pub queued_bytes: usize,
    /// Watch events dropped because its queue was full.
    pub dropped_events: u64,
    /// Whether it has a connection (introduced, not released).
    pub connected: bool,
    /// The `XENSTORE_ERROR_*` that ended its conversation, if any.
    pub error: Option<u32>,
}

/// What the toolstack writes for a new domain (as `libxl__domain_make` and
/// `libxl__build_pre`): see [`Xenstore::populate_domain`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainLayout {
    /// Domain name (`name`).
    pub name: String,
    /// Balloon target in KiB (`memory/target`).
    pub target_kib: u64,
    /// Maximum memory in KiB (`memory/static-max`).
    pub static_max_kib: u64,
    /// Number of vCPUs (`cpu/<n>/availability` = `online`).
    pub vcpus: u32,
    /// Xenstore event channel port in the guest (`store/port`).
    pub store_port: u32,
    /// Xenstore ring frame (`store/ring-ref`).
    pub store_ring_ref: u64,
}

/// Who is asking.
#[derive(Clone, Copy, Debug)]
struct Caller {
    domid: u16,
    target: Option<u16>,
}

impl Caller {
    fn privileged(&self) -> bool {
        self.domid == PRIV_DOMID
    }
}

/// What `perms` grant `who` (xenstored's `perm_for_conn`): the privileged domain and
/// the owner (or a domain whose target is the owner) get everything; otherwise the
/// first later entry naming the domain (or its target) decides, else the first entry.
fn perm_for(who: &Caller, perms: &[Perm]) -> u8 {
    let mine = |id: u16| id == who.domid || Some(id) == who.target;
    let Some(first) = perms.first() else {
        return 0;
    };
    if who.privileged() || mine(first.domid) {
        return PERM_READ | PERM_WRITE | PERM_OWNER;
    }
    perms[1..]
        .iter()
        .find(|p| mine(p.domid))
        .unwrap_or(first)
        .access
        .bits()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    /// Watches on exactly this path.
    Exact,
    /// Watches on this path or any of its parents.
    Subtree,
}

/// A modification to report to watchers, with the permissions needed to decide who
/// may see it (captured when it happened).
#[derive(Clone, Debug)]
struct Fire {
    path: String,
    kind: Match,
    node_perms: Option<Vec<Perm>>,
    parent_perms: Option<Vec<Perm>>,
    old_perms: Option<Vec<Perm>>,
}

/// xenstored's `watch_permitted`: the old permissions (permission changes), the node's
/// or its parent's must let the watcher read.
fn watch_permitted(who: &Caller, f: &Fire) -> bool {
    let readable = |p: &Option<Vec<Perm>>| {
        p.as_deref()
            .is_some_and(|p| perm_for(who, p) & PERM_READ != 0)
    };
    if readable(&f.old_perms) {
        return true;
    }
    if f.node_perms.is_none() {
        return false;
    }
    readable(&f.node_perms) || readable(&f.parent_perms)
}

#[derive(Clone, Debug)]
struct Watch {
    /// Canonical (absolute or special) path.
    path: String,
    token: Vec<u8>,
    /// Bytes to strip from event paths (relative watches: `/local/domain/<id>/`).
    prefix_len: usize,
}

impl Watch {
    fn matches(&self, f: &Fire) -> bool {
        match f.kind {
            Match::Exact => f.path == self.path,
            Match::Subtree => {
                if self.path == "/" {
                    f.path.starts_with('/')
                } else {
                    f.path
                        .strip_prefix(self.path.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                }
            }
        }
    }
}

/// One node as a transaction sees it.
#[derive(Clone, Debug)]
struct TxEntry {
    path: String,
    /// Global generation at first access (`None`: absent).
    first_gen: Option<u64>,
    /// Global permissions at first access (for watch permission checks at commit).
    orig_perms: Option<Vec<Perm>>,
    /// The transaction's version (`None`: absent/deleted).
    node: Option<Node>,
    modified: bool,
    fire: Option<Match>,
}

#[derive(Clone, Debug, Default)]
struct Transaction {
    entries: Vec<TxEntry>,
    index: BTreeMap<String, usize>,
    /// Change of owned-node counts per domain if committed now.
    owned_delta: BTreeMap<u16, i64>,
    /// Set when an operation failed half-way: the commit answers `ENOMEM`.
    fail: bool,
}

impl Transaction {
    fn record(&mut self, store: &Store, path: &str) -> usize {
        if let Some(&i) = self.index.get(path) {
            return i;
        }
        let g = store.get(path);
        self.entries.push(TxEntry {
            path: String::from(path),
            first_gen: g.map(|n| n.generation),
            orig_perms: g.map(|n| n.perms.clone()),
            node: g.cloned(),
            modified: false,
            fire: None,
        });
        self.index
            .insert(String::from(path), self.entries.len() - 1);
        self.entries.len() - 1
    }

    fn set(&mut self, store: &Store, path: &str, node: Option<Node>) {
        let i = self.record(store, path);
        let e = &mut self.entries[i];
        if let Some(o) = &e.node {
            *self.owned_delta.entry(o.owner()).or_insert(0) -= 1;
        }
        if let Some(n) = &node {
            *self.owned_delta.entry(n.owner()).or_insert(0) += 1;
        }
        e.node = node;
        e.modified = true;
    }
}

/// The tree as one request sees it: the global store, or a transaction's view of it.
enum View<'a> {
    Global {
        store: &'a mut Store,
        fires: &'a mut Vec<Fire>,
    },
    Tx {
        store: &'a mut Store,
        tx: &'a mut Transaction,
        max_nodes: usize,
    },
}

impl View<'_> {
    fn get(&mut self, path: &str) -> Result<Option<Node>, XsError> {
        match self {
            View::Global { store, .. } => Ok(store.get(path).cloned()),
            View::Tx {
                store,
                tx,
                max_nodes,
            } => {
                if let Some(&i) = tx.index.get(path) {
                    return Ok(tx.entries[i].node.clone());
                }
                if *max_nodes != 0 && tx.entries.len() >= *max_nodes {
                    tx.fail = true;
                    return Err(XsError::Enospc);
                }
                let i = tx.record(store, path);
                Ok(tx.entries[i].node.clone())
            }
        }
    }

    fn put(&mut self, path: &str, mut node: Node) {
        match self {
            View::Global { store, .. } => store.put(path, node),
            View::Tx { store, tx, .. } => {
                node.generation = store.next_generation();
                tx.set(store, path, Some(node));
            }
        }
    }

    fn del(&mut self, path: &str) {
        match self {
            View::Global { store, .. } => {
                store.remove(path);
            }
            View::Tx { store, tx, .. } => tx.set(store, path, None),
        }
    }

    fn owned(&self, domid: u16) -> usize {
        match self {
            View::Global { store, .. } => store.owned_by(domid),
            View::Tx { store, tx, .. } => {
                let d = tx.owned_delta.get(&domid).copied().unwrap_or(0);
                (store.owned_by(domid) as i64 + d).max(0) as usize
            }
        }
    }

    fn fire(&mut self, path: &str, kind: Match, node_perms: &[Perm], old: Option<&[Perm]>) {
        match self {
            View::Global { store, fires } => fires.push(Fire {
                path: String::from(path),
                kind,
                node_perms: Some(Vec::from(node_perms)),
                parent_perms: store.get(parent_of(path)).map(|n| n.perms.clone()),
                old_perms: old.map(Vec::from),
            }),
            View::Tx { tx, .. } => match tx.index.get(path) {
                // A non-exact event replaces an exact one, not the other way round.
                Some(&i) => {
                    let e = &mut tx.entries[i];
                    if e.fire != Some(Match::Subtree) {
                        e.fire = Some(kind);
                    }
                }
                None => tx.fail = true,
            },
        }
    }
}

/// Turns a path as sent into the canonical one (xenstored's `canonicalize`): relative
/// paths are prefixed with `/local/domain/<domid>/`; the result must respect
/// `XENSTORE_ABS_PATH_MAX` and, for unprivileged callers, the path-length quota
/// counted after `/local/domain/<n>/`. Returns the path and whether it was relative.
fn canonicalize(
    who: &Caller,
    q: &Quotas,
    raw: &str,
    allow_special: bool,
) -> Result<(String, bool), XsError> {
    check_path(raw.as_bytes(), allow_special)?;
    let relative = !raw.starts_with('/') && !raw.starts_with('@');
    let name = if relative {
        format!("/local/domain/{}/{}", who.domid, raw)
    } else {
        String::from(raw)
    };
    if name.len() > XENSTORE_ABS_PATH_MAX
        || (!who.privileged() && over(q.path_len, name.len() - local_off(&name)))
    {
        return Err(XsError::Einval);
    }
    Ok((name, relative))
}

/// Length of a leading `/local/domain/<1-5 digits>/`, else 0.
fn local_off(name: &str) -> usize {
    let Some(rest) = name.strip_prefix("/local/domain/") else {
        return 0;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=5).contains(&digits) && rest.as_bytes().get(digits) == Some(&b'/') {
        name.len() - rest.len() + digits + 1
    } else {
        0
    }
}

/// The node if `who` has all of `perm` on it; otherwise the error xenstored gives
/// (`get_node_chk_perm` + `errno_from_parents`): `EACCES` when the node exists, and
/// for a missing node `ENOENT` only if the nearest existing ancestor grants some of
/// `perm`, else `EACCES` (so existence is not leaked).
fn get_node_chk(v: &mut View, who: &Caller, path: &str, perm: u8) -> Result<Node, XsError> {
    match v.get(path)? {
        Some(n) if perm_for(who, &n.perms) & perm == perm => Ok(n),
        Some(_) => Err(errno_from_parents(v, who, path, XsError::Eacces, perm)),
        None => Err(errno_from_parents(v, who, path, XsError::Enoent, perm)),
    }
}

fn errno_from_parents(v: &mut View, who: &Caller, path: &str, err: XsError, perm: u8) -> XsError {
    let mut name = path;
    loop {
        name = parent_of(name);
        match v.get(name) {
            Err(e) => return e,
            Ok(Some(n)) => {
                return if perm_for(who, &n.perms) & perm != 0 {
                    err
                } else {
                    XsError::Eacces
                };
            }
            Ok(None) if name == "/" => return XsError::Eacces,
            Ok(None) => {}
        }
    }
}

fn check_size(who: &Caller, q: &Quotas, n: &Node) -> Result<(), XsError> {
    if !who.privileged() && over(q.node_size, n.acc_size()) {
        return Err(XsError::Enospc);
    }
    Ok(())
}

const OK: &[u8] = b"OK\0";

/// Creates `name` and any missing parents (xenstored's `create_node`): new nodes
/// inherit their parent's permissions, and an unprivileged creator becomes their
/// owner. All checks happen before anything is written. Returns the new node's
/// permissions.
fn create_node(
    v: &mut View,
    who: &Caller,
    q: &Quotas,
    name: &str,
    value: &[u8],
) -> Result<Vec<Perm>, XsError> {
    let mut missing = vec![name];
    let mut parent_name = parent_of(name);
    let parent = loop {
        match v.get(parent_name)? {
            Some(p) => break p,
            None if parent_name == "/" => return Err(XsError::Eio),
            None => {
                missing.push(parent_name);
                parent_name = parent_of(parent_name);
            }
        }
    };
    if !who.privileged() && over(q.entries, v.owned(who.domid) + missing.len()) {
        return Err(XsError::Enospc);
    }
    let mut writes: Vec<(&str, Node)> = Vec::with_capacity(missing.len() + 1);
    let (mut cur_name, mut cur) = (parent_name, parent);
    for &n in missing.iter().rev() {
        cur.children.push(String::from(basename(n)));
        let mut perms = cur.perms.clone();
        if !who.privileged() {
            perms[0].domid = who.domid;
        }
        writes.push((cur_name, core::mem::replace(&mut cur, Node::new(perms))));
        cur_name = n;
    }
    cur.value = Vec::from(value);
    writes.push((cur_name, cur));
    for (_, n) in &writes {
        check_size(who, q, n)?;
    }
    let perms = writes
        .last()
        .map(|(_, n)| n.perms.clone())
        .unwrap_or_default();
    for (p, n) in writes {
        v.put(p, n);
    }
    Ok(perms)
}

/// Deletes `name` and its subtree, children first, and unlinks it from its parent
/// (xenstored's `rm_node`). Every deleted node fires watches on exactly its path; the
/// subtree's root fires its own and its parents' watches.
fn rm_node(v: &mut View, name: &str) -> Result<(), XsError> {
    let parent_name = parent_of(name);
    let mut parent = v.get(parent_name)?.ok_or(XsError::Einval)?;
    // Pre-order collection; deleting in reverse removes descendants first.
    let mut order: Vec<(String, Vec<Perm>)> = Vec::new();
    let mut stack = vec![String::from(name)];
    while let Some(p) = stack.pop() {
        let Some(n) = v.get(&p)? else { continue };
        for c in n.children.iter().rev() {
            stack.push(child_path(&p, c));
        }
        order.push((p, n.perms));
    }
    for (p, perms) in order.iter().rev() {
        v.del(p);
        let kind = if p == name {
            Match::Subtree
        } else {
            Match::Exact
        };
        v.fire(p, kind, perms, None);
    }
    let base = basename(name);
    parent.children.retain(|c| c != base);
    v.put(parent_name, parent);
    Ok(())
}

/// A tree operation (READ, DIRECTORY, DIRECTORY_PART, GET_PERMS, WRITE, MKDIR, RM,
/// SET_PERMS) against a view. Returns the reply payload.
fn tree_op(v: &mut View, who: &Caller, q: &Quotas, op: &Op) -> Result<Vec<u8>, XsError> {
    match op {
        Op::Read { path } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            Ok(get_node_chk(v, who, &name, PERM_READ)?.value)
        }
        Op::Directory { path } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            Ok(children_bytes(&get_node_chk(v, who, &name, PERM_READ)?))
        }
        Op::DirectoryPart { path, offset } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            let n = get_node_chk(v, who, &name, PERM_READ)?;
            Ok(directory_part(&n, *offset as usize))
        }
        Op::GetPerms { path } => {
            let (name, _) = canonicalize(who, q, path, true)?;
            let n = get_node_chk(v, who, &name, PERM_READ)?;
            let mut out = Vec::new();
            for p in &n.perms {
                out.extend_from_slice(p.to_string_form().as_bytes());
                out.push(0);
            }
            Ok(out)
        }
        Op::Write { path, value } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            let perms = match get_node_chk(v, who, &name, PERM_WRITE) {
                Ok(mut n) => {
                    n.value.clone_from(value);
                    check_size(who, q, &n)?;
                    let perms = n.perms.clone();
                    v.put(&name, n);
                    perms
                }
                Err(XsError::Enoent) => create_node(v, who, q, &name, value)?,
                Err(e) => return Err(e),
            };
            v.fire(&name, Match::Subtree, &perms, None);
            Ok(Vec::from(OK))
        }
        Op::Mkdir { path } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            match get_node_chk(v, who, &name, PERM_WRITE) {
                Ok(_) => {}
                Err(XsError::Enoent) => {
                    let perms = create_node(v, who, q, &name, &[])?;
                    v.fire(&name, Match::Subtree, &perms, None);
                }
                Err(e) => return Err(e),
            }
            Ok(Vec::from(OK))
        }
        Op::Rm { path } => {
            let (name, _) = canonicalize(who, q, path, false)?;
            match get_node_chk(v, who, &name, PERM_WRITE) {
                Ok(_) if name == "/" => return Err(XsError::Einval),
                Ok(_) => rm_node(v, &name)?,
                // Not there: fine if the parent is.
                Err(XsError::Enoent) => {
                    v.get(parent_of(&name))?.ok_or(XsError::Enoent)?;
                }
                Err(e) => return Err(e),
            }
            Ok(Vec::from(OK))
        }
        Op::SetPerms { path, perms } => {
            if perms.is_empty() {
                return Err(XsError::Einval);
            }
            if !who.privileged() && over(q.perms, perms.len()) {
                return Err(XsError::Enospc);
            }
            let (name, _) = canonicalize(who, q, path, true)?;
            let mut n = get_node_chk(v, who, &name, PERM_WRITE | PERM_OWNER)?;
            if !who.privileged() && perms[0].domid != n.owner() {
                return Err(XsError::Eperm);
            }
            let old = core::mem::replace(&mut n.perms, perms.clone());
            check_size(who, q, &n)?;
            v.put(&name, n);
            v.fire(&name, Match::Subtree, perms, Some(&old));
            Ok(Vec::from(OK))
        }
        _ => Err(XsError::Einval),
    }
}

fn children_bytes(n: &Node) -> Vec<u8> {
    let mut out = Vec::with_capacity(n.children_len());
    for c in &n.children {
        out.extend_from_slice(c.as_bytes());
        out.push(0);
    }
    out
}

/// `XS_DIRECTORY_PART` (xenstored's `send_directory_part`): `<gencnt>|` then as many
/// whole names from byte `off` of the child list as fit in a payload; a final empty
/// string marks the end of the list.
fn directory_part(n: &Node, off: usize) -> Vec<u8> {
    let mut out = format!("{}", n.generation).into_bytes();
    out.push(0);
    let children = children_bytes(n);
    if off >= children.len() {
        out.push(0);
        return out;
    }
    let maxlen = XENSTORE_PAYLOAD_MAX - out.len() - 1;
    let mut len = 0;
    loop {
        let rest = &children[off + len..];
        let l = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if len + l >= maxlen {
            break;
        }
        len += l + 1;
        if off + len >= children.len() {
            break;
        }
    }
    let end = (off + len).min(children.len());
    out.extend_from_slice(&children[off..end]);
    if end == children.len() {
        out.push(0);
    }
    out
}

/// A queued server-to-client message.
#[derive(Clone, Debug)]
struct OutMsg {
    bytes: Vec<u8>,
    event: bool,
}

/// One client connection.
#[derive(Clone, Debug, Default)]
struct Conn {
    /// `(gfn, port)` from the introduction (none for domain 0).
    ring: Option<(i64, u32)>,
    target: Option<u16>,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Transaction>,
    next_tx: u32,
    outbox: VecDeque<OutMsg>,
    out_bytes: usize,
    /// Bytes of the front message already on the ring.
    out_sent: usize,
    reader: MessageReader,
    /// `XENSTORE_ERROR_*` once the conversation is over.
    broken: Option<u32>,
    /// Re-introduced: the ring indices must be reset before anything else.
    reset_ring: bool,
    dropped_events: u64,
}

impl Conn {
    fn reset(&mut self) {
        self.watches.clear();
        self.txs.clear();
        self.outbox.clear();
        self.out_bytes = 0;
        self.out_sent = 0;
        self.reader.reset();
    }

    fn push_reply(&mut self, bytes: Vec<u8>) {
        self.out_bytes += bytes.len();
        self.outbox.push_back(OutMsg {
            bytes,
            event: false,
        });
    }

    /// Queues a watch event as xenstored's `send_event`: over-long events are not sent,
    /// an identical pending event (special paths excepted) is not repeated, and a full
    /// queue drops it.
    fn push_event(&mut self, path: &[u8], token: &[u8], limit: usize) -> bool {
        if path.len() + token.len() + 2 > XENSTORE_PAYLOAD_MAX {
            return false;
        }
        let bytes = encode_watch_event(path, token);
        if path.first() != Some(&b'@') && self.outbox.iter().any(|m| m.event && m.bytes == bytes) {
            return false;
        }
        if over(limit, self.out_bytes + bytes.len()) {
            self.dropped_events += 1;
            return false;
        }
        self.out_bytes += bytes.len();
        self.outbox.push_back(OutMsg { bytes, event: true });
        true
    }
}

/// A watch event to queue: `(path, token)`.
type Event = (Vec<u8>, Vec<u8>);

/// Result of executing one operation.
struct Exec {
    payload: Vec<u8>,
    /// The initial event of a new watch, queued after the reply.
    after: Option<Event>,
}

impl Exec {
    fn ok(payload: Vec<u8>) -> Self {
        Self {
            payload,
            after: None,
        }
    }
}

/// The embedded xenstore.
#[derive(Clone, Debug)]
pub struct Xenstore {
    store: Store,
    conns: BTreeMap<u16, Conn>,
    quotas: Quotas,
    dirty: BTreeSet<u16>,
}

impl Default for Xenstore {
    fn default() -> Self {
        Self::new()
    }
}

impl Xenstore {
    /// A store with xenstored's initial tree, default quotas and a connection for
    /// domain 0.
    pub fn new() -> Self {
        Self::with_quotas(Quotas::default())
    }

    /// Like [`Self::new`] with other limits.
    pub fn with_quotas(quotas: Quotas) -> Self {
        let mut conns = BTreeMap::new();
        conns.insert(PRIV_DOMID, Conn::default());
        Self {
            store: Store::new(),
            conns,
            quotas,
            dirty: BTreeSet::new(),
        }
    }

    /// The limits in force.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The node tree (read-only).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `domid` has a connection.
    pub fn is_introduced(&self, domid: u16) -> bool {
        self.conns.contains_key(&domid)
    }

    /// `(gfn, event channel)` given when `domid` was introduced.
    pub fn ring_of(&self, domid: u16) -> Option<(i64, u32)> {
        self.conns.get(&domid).and_then(|c| c.ring)
    }

    /// Resource counts of `domid`.
    pub fn counts(&self, domid: u16) -> Counts {
        let c = self.conns.get(&domid);
        Counts {
            entries: self.store.owned_by(domid),
            watches: c.map_or(0, |c| c.watches.len()),
            transactions: c.map_or(0, |c| c.txs.len()),
            queued: c.map_or(0, |c| c.outbox.len()),
            queued_bytes: c.map_or(0, |c| c.out_bytes),
            dropped_events: c.map_or(0, |c| c.dropped_events),
            connected: c.is_some(),
            error: c.and_then(|c| c.broken),
        }
    }

    /// Total number of nodes.
    pub fn total_entries(&self) -> usize {
        self.store.len()
    }

    /// Checks internal consistency (tree invariants); for tests.
    pub fn check(&self) -> Result<(), String> {
        self.store.check()?;
        for (d, c) in &self.conns {
            let queued: usize = c.outbox.iter().map(|m| m.bytes.len()).sum();
            if queued != c.out_bytes {
                return Err(format!("dom{d}: queued bytes {queued} != {}", c.out_bytes));
            }
        }
        Ok(())
    }

    /// Introduces a domain (`XS_INTRODUCE`): creates its connection and fires
    /// `@introduceDomain`. Introducing a connected domain again resets its connection
    /// (watches, transactions, queued output; the next [`Self::service_ring`] resets
    /// the ring indices) and fires nothing. Domain 0 and reserved ids: `EINVAL`.
    pub fn introduce(&mut self, domid: u16, gfn: i64, port: u32) -> Result<(), XsError> {
        if domid == PRIV_DOMID || domid >= DOMID_FIRST_RESERVED || port == 0 {
            return Err(XsError::Einval);
        }
        if let Some(c) = self.conns.get_mut(&domid) {
            c.reset();
            c.broken = None;
            c.reset_ring = true;
            c.ring = Some((gfn, port));
            return Ok(());
        }
        self.conns.insert(
            domid,
            Conn {
                ring: Some((gfn, port)),
                next_tx: 1,
                ..Conn::default()
            },
        );
        self.fire_special("@introduceDomain");
        Ok(())
    }

    /// Destroys a domain's xenstore presence, as xenstored plus xl do: drops its
    /// connection (watches, transactions, queued output), removes
    /// `/local/domain/<domid>` as the toolstack does, then (xenstored's
    /// `domain_tree_remove`) removes every node the domain still owns and its
    /// permission entries elsewhere, and fires `@releaseDomain`. `ENOENT` if it has no
    /// connection; `EINVAL` for domain 0.
    pub fn release(&mut self, domid: u16) -> Result<(), XsError> {
        self.release_inner(domid, true)
    }

    fn release_inner(&mut self, domid: u16, remove_home: bool) -> Result<(), XsError> {
        if domid == PRIV_DOMID || domid >= DOMID_FIRST_RESERVED {
            return Err(XsError::Einval);
        }
        if self.conns.remove(&domid).is_none() {
            return Err(XsError::Enoent);
        }
        self.dirty.remove(&domid);
        if remove_home {
            let home = format!("/local/domain/{domid}");
            if self.store.get(&home).is_some() {
                self.rm_privileged(&home);
            }
        }
        // Orphans: byte order visits ancestors before descendants.
        let paths: Vec<String> = self.store.paths().map(String::from).collect();
        for p in paths {
            let Some(n) = self.store.get(&p) else {
                continue;
            };
            if n.owner() == domid && p != "/" {
                self.rm_privileged(&p);
            } else if n.perms[1..].iter().any(|x| x.domid == domid) {
                let mut perms = n.perms.clone();
                let first = perms.remove(0);
                perms.retain(|x| x.domid != domid);
                perms.insert(0, first);
                self.store.set_perms_raw(&p, perms);
            }
        }
        self.fire_special("@releaseDomain");
        Ok(())
    }

    /// Removes a subtree as the privileged domain outside any transaction.
    fn rm_privileged(&mut self, path: &str) {
        let mut fires = Vec::new();
        let mut v = View::Global {
            store: &mut self.store,
            fires: &mut fires,
        };
        if path.starts_with('@') {
            v.del(path);
        } else {
            // Cannot fail outside a transaction once the parent exists.
            let _ = rm_node(&mut v, path);
        }
        self.dispatch(fires);
    }

    fn fire_special(&mut self, name: &str) {
        let f = Fire {
            path: String::from(name),
            kind: Match::Exact,
            node_perms: self.store.get(name).map(|n| n.perms.clone()),
            parent_perms: self.store.get("/").map(|n| n.perms.clone()),
            old_perms: None,
        };
        self.dispatch(vec![f]);
    }

    /// Queues watch events for modifications.
    fn dispatch(&mut self, fires: Vec<Fire>) {
        let limit = self.quotas.outbox_bytes;
        for f in &fires {
            for (&d, c) in self.conns.iter_mut() {
                if c.broken.is_some() {
                    continue;
                }
                let who = Caller {
                    domid: d,
                    target: c.target,
                };
                if !watch_permitted(&who, f) {
                    continue;
                }
                let events: Vec<(Vec<u8>, Vec<u8>)> = c
                    .watches
                    .iter()
                    .filter(|w| w.matches(f))
                    .map(|w| {
                        let p = f.path.as_bytes();
                        (
                            Vec::from(p.get(w.prefix_len..).unwrap_or(p)),
                            w.token.clone(),
                        )
                    })
                    .collect();
                for (p, t) in events {
                    if c.push_event(&p, &t, limit) {
                        self.dirty.insert(d);
                    }
                }
            }
        }
    }

    /// Domains that have had output queued since the last call (their rings need
    /// [`Self::service_ring`], domain 0 needs [`Self::take_output`]).
    pub fn take_dirty(&mut self) -> Vec<u16> {
        core::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Takes every message queued for `domid` (replies to ring requests not yet
    /// written, and watch events), as wire bytes. For domain 0 these are its watch
    /// events.
    pub fn take_output(&mut self, domid: u16) -> Vec<Vec<u8>> {
        let Some(c) = self.conns.get_mut(&domid) else {
            return Vec::new();
        };
        let skip = c.out_sent;
        c.out_sent = 0;
        c.out_bytes = 0;
        self.dirty.remove(&domid);
        let mut v: Vec<Vec<u8>> = c.outbox.drain(..).map(|m| m.bytes).collect();
        if let Some(first) = v.first_mut() {
            first.drain(..skip.min(first.len()));
            if first.is_empty() {
                v.remove(0);
            }
        }
        v
    }

    /// Handles one complete wire message from `domid` and returns the wire reply.
    /// Watch events (including a new watch's initial event) are queued for
    /// [`Self::take_output`] / [`Self::service_ring`]. `None`: no connection, the
    /// conversation is over, or the message ended it (payload longer than
    /// `XENSTORE_PAYLOAD_MAX`, as xenstored). A buffer whose length disagrees with
    /// its header (impossible on a ring) is answered `EINVAL`.
    pub fn handle(&mut self, domid: u16, msg: &[u8]) -> Option<Vec<u8>> {
        if self.conns.get(&domid)?.broken.is_some() {
            return None;
        }
        let parsed = parse(msg);
        let header = match &parsed {
            Ok(_) => super::wire::parse_header(msg).ok()?,
            Err(WireError::Truncated) => return Some(encode_error(0, 0, XsError::Einval)),
            Err(WireError::LengthMismatch { header, .. }) => {
                return Some(encode_error(header.req_id, header.tx_id, XsError::Einval))
            }
            Err(WireError::PayloadTooLong(_)) => {
                self.break_conn(domid, XENSTORE_ERROR_PROTO);
                return None;
            }
            Err(e) => e.header()?,
        };
        let op = parsed.map(|r| r.op);
        let (reply, after) = self.process(domid, &header, op);
        if let Some((p, t)) = after {
            self.queue_event(domid, &p, &t);
        }
        Some(reply)
    }

    fn queue_event(&mut self, domid: u16, path: &[u8], token: &[u8]) {
        let limit = self.quotas.outbox_bytes;
        if let Some(c) = self.conns.get_mut(&domid) {
            if c.push_event(path, token, limit) {
                self.dirty.insert(domid);
            }
        }
    }

    /// Ends the conversation with `domid` (xenstored's `ignore_connection`): drops its
    /// watches, transactions and queued output; nothing more is read or written until
    /// a reconnection or a new introduction.
    fn break_conn(&mut self, domid: u16, err: u32) {
        if let Some(c) = self.conns.get_mut(&domid) {
            c.reset();
            c.broken = Some(err);
            self.dirty.remove(&domid);
        }
    }

    /// The checks of xenstored's `process_message`, in its order: type (`ENOSYS`),
    /// privilege (`EACCES`), transaction id (`ENOENT`), then the payload and the
    /// operation. Returns the wire reply and the initial watch event to queue after it.
    fn process(
        &mut self,
        domid: u16,
        h: &XsdSockmsg,
        op: Result<Op, WireError>,
    ) -> (Vec<u8>, Option<Event>) {
        let err = |e: XsError| (encode_error(h.req_id, h.tx_id, e), None);
        let op = match op {
            Err(WireError::UnknownType(_)) => return err(XsError::Enosys),
            Err(WireError::BadPayload { error, .. }) => Err(error),
            Err(_) => Err(XsError::Einval),
            Ok(op) => Ok(op),
        };
        let tx_id = if type_ignores_tx(h.ty) { 0 } else { h.tx_id };
        if let Err(e) = self.precheck(domid, h.ty, tx_id) {
            return err(e);
        }
        let op = match op {
            Ok(op) => op,
            Err(e) => return err(e),
        };
        match self.execute(domid, tx_id, &op) {
            Ok(x) if x.payload.len() > XENSTORE_PAYLOAD_MAX => err(XsError::E2big),
            Ok(x) => (encode(h.ty, h.req_id, h.tx_id, &x.payload), x.after),
            Err(e) => err(e),
        }
    }

    fn precheck(&self, domid: u16, ty: u32, tx_id: u32) -> Result<(), XsError> {
        let c = self.conns.get(&domid).ok_or(XsError::Enoent)?;
        if type_is_privileged(ty) && domid != PRIV_DOMID {
            return Err(XsError::Eacces);
        }
        if tx_id != 0 && !c.txs.contains_key(&tx_id) {
            return Err(XsError::Enoent);
        }
        Ok(())
    }

    /// Runs a typed request from `domid` (transaction `tx_id`, 0 for none) with the same
    /// checks as a wire request and returns the reply payload. A new watch's initial
    /// event is queued.
    pub fn request(&mut self, domid: u16, tx_id: u32, op: &Op) -> Result<Vec<u8>, XsError> {
        let ty = op.msg_type();
        let tx_id = if type_ignores_tx(ty) { 0 } else { tx_id };
        self.precheck(domid, ty, tx_id)?;
        let x = self.execute(domid, tx_id, op)?;
        if x.payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(XsError::E2big);
        }
        if let Some((p, t)) = x.after {
            self.queue_event(domid, &p, &t);
        }
        Ok(x.payload)
    }

    fn execute(&mut self, domid: u16, tx_id: u32, op: &Op) -> Result<Exec, XsError> {
        let conn = self.conns.get(&domid).ok_or(XsError::Enoent)?;
        let who = Caller {
            domid,
            target: conn.target,
        };
        let q = self.quotas;
        match op {
            Op::Read { .. }
            | Op::Directory { .. }
            | Op::DirectoryPart { .. }
            | Op::GetPerms { .. }
            | Op::Write { .. }
            | Op::Mkdir { .. }
            | Op::Rm { .. }
            | Op::SetPerms { .. } => {
                let mut fires = Vec::new();
                let res = if tx_id == 0 {
                    let mut v = View::Global {
                        store: &mut self.store,
                        fires: &mut fires,
                    };
                    tree_op(&mut v, &who, &q, op)
                } else {
                    let tx = self
                        .conns
                        .get_mut(&domid)
                        .and_then(|c| c.txs.get_mut(&tx_id))
                        .ok_or(XsError::Enoent)?;
                    let mut v = View::Tx {
                        store: &mut self.store,
                        tx,
                        max_nodes: if who.privileged() { 0 } else { q.tx_nodes },
                    };
                    tree_op(&mut v, &who, &q, op)
                };
                self.dispatch(fires);
                res.map(Exec::ok)
            }
            Op::Watch { path, token } => {
                let (name, relative) = canonicalize(&who, &q, path, true)?;
                let c = self.conns.get_mut(&domid).ok_or(XsError::Enoent)?;
                if c.watches
                    .iter()
                    .any(|w| w.path == name && &w.token == token)
                {
                    return Err(XsError::Eexist);
                }
                if !who.privileged() && over(q.watches, c.watches.len() + 1) {
                    return Err(XsError::Enospc);
                }
                let prefix_len = if relative {
                    format!("/local/domain/{domid}/").len()
                } else {
                    0
                };
                let event_path = Vec::from(&name.as_bytes()[prefix_len..]);
                c.watches.push(Watch {
                    path: name,
                    token: token.clone(),
                    prefix_len,
                });
                Ok(Exec {
                    payload: Vec::from(OK),
                    after: Some((event_path, token.clone())),
                })
            }
            Op::Unwatch { path, token } => {
                let (name, _) = canonicalize(&who, &q, path, true)?;
                let c = self.conns.get_mut(&domid).ok_or(XsError::Enoent)?;
                let i = c
                    .watches
                    .iter()
                    .position(|w| w.path == name && &w.token == token)
                    .ok_or(XsError::Enoent)?;
                c.watches.remove(i);
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::TransactionStart => {
                if tx_id != 0 {
                    return Err(XsError::Ebusy);
                }
                let c = self.conns.get_mut(&domid).ok_or(XsError::Enoent)?;
                if !who.privileged() && over(q.transactions, c.txs.len() + 1) {
                    return Err(XsError::Enospc);
                }
                let id = loop {
                    let id = c.next_tx;
                    c.next_tx = c.next_tx.wrapping_add(1);
                    if id != 0 && !c.txs.contains_key(&id) {
                        break id;
                    }
                };
                c.txs.insert(id, Transaction::default());
                Ok(Exec::ok(format!("{id}\0").into_bytes()))
            }
            Op::TransactionEnd { commit } => {
                if tx_id == 0 {
                    return Err(XsError::Enoent);
                }
                let c = self.conns.get_mut(&domid).ok_or(XsError::Enoent)?;
                let tx = c.txs.remove(&tx_id).ok_or(XsError::Enoent)?;
                if *commit {
                    self.commit(&who, tx)?;
                }
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::Introduce {
                domid: d,
                gfn,
                port,
            } => {
                self.introduce(*d, *gfn, *port)?;
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::Release { domid: d } => {
                self.release_inner(*d, false)?;
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::GetDomainPath { domid: d } => {
                Ok(Exec::ok(format!("/local/domain/{d}\0").into_bytes()))
            }
            Op::IsDomainIntroduced { domid: d } => {
                let yes = *d == DOMID_SELF || self.conns.contains_key(d);
                Ok(Exec::ok(Vec::from(if yes { &b"T\0"[..] } else { b"F\0" })))
            }
            Op::Resume { domid: d } => {
                if *d == PRIV_DOMID {
                    return Err(XsError::Einval);
                }
                if !self.conns.contains_key(d) {
                    return Err(XsError::Enoent);
                }
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::SetTarget { domid: d, target } => {
                if !self.conns.contains_key(target) {
                    return Err(XsError::Enoent);
                }
                let c = self.conns.get_mut(d).ok_or(XsError::Enoent)?;
                c.target = Some(*target);
                Ok(Exec::ok(Vec::from(OK)))
            }
            Op::ResetWatches => {
                let c = self.conns.get_mut(&domid).ok_or(XsError::Enoent)?;
                c.watches.clear();
                c.txs.clear();
                Ok(Exec::ok(Vec::from(OK)))
            }
        }
    }

    /// Commits a transaction (xenstored's `do_transaction_end` + `finalize_transaction`):
    /// `ENOMEM` if it failed internally, `ENOSPC` if the nodes it creates exceed an
    /// unprivileged owner's quota, `EAGAIN` if any node it accessed changed (or
    /// appeared, or vanished) since; else its changes become global and its watch
    /// events fire.
    fn commit(&mut self, who: &Caller, tx: Transaction) -> Result<(), XsError> {
        if tx.fail {
            return Err(XsError::Enomem);
        }
        if !who.privileged() && self.quotas.entries != 0 {
            let mut delta: BTreeMap<u16, i64> = BTreeMap::new();
            for e in tx.entries.iter().filter(|e| e.modified) {
                if let Some(o) = self.store.get(&e.path) {
                    *delta.entry(o.owner()).or_insert(0) -= 1;
                }
                if let Some(n) = &e.node {
                    *delta.entry(n.owner()).or_insert(0) += 1;
                }
            }
            for (&d, &n) in &delta {
                if d != PRIV_DOMID
                    && n > 0
                    && self.store.owned_by(d) + n as usize > self.quotas.entries
                {
                    return Err(XsError::Enospc);
                }
            }
        }
        for e in &tx.entries {
            if self.store.get(&e.path).map(|n| n.generation) != e.first_gen {
                return Err(XsError::Eagain);
            }
        }
        let mut fires = Vec::new();
        for e in tx.entries {
            if e.modified {
                match e.node {
                    Some(n) => self.store.put(&e.path, n),
                    None => {
                        self.store.remove(&e.path);
                    }
                }
            }
            if let Some(kind) = e.fire {
                fires.push(Fire {
                    node_perms: self.store.get(&e.path).map(|n| n.perms.clone()),
                    parent_perms: self.store.get(parent_of(&e.path)).map(|n| n.perms.clone()),
                    old_perms: e.orig_perms,
                    path: e.path,
                    kind,
                });
            }
        }
        self.dispatch(fires);
        Ok(())
    }

    /// Services `domid`'s ring from a copy of its page: handles a reconnection request
    /// or a pending reset, writes queued output, consumes and answers complete requests
    /// (keeping a partial one for next time), writes again. Inconsistent indices or an
    /// over-long payload end the conversation (the update sets the `error` field and
    /// nothing more is exchanged). Domains that received watch events meanwhile are
    /// reported by [`Self::take_dirty`].
    pub fn service_ring(&mut self, domid: u16, snap: &RingSnapshot) -> RingUpdate {
        let mut up = RingUpdate::default();
        let Some(c) = self.conns.get_mut(&domid) else {
            return up;
        };
        if snap.connection == XENSTORE_RECONNECT || c.reset_ring {
            c.reset();
            c.broken = None;
            c.reset_ring = false;
            up.reset_indices = true;
            up.error = Some(XENSTORE_ERROR_NONE);
            up.connection = Some(XENSTORE_CONNECTED);
            up.notify = true;
            return up;
        }
        if c.broken.is_some() {
            return up;
        }
        if ring_used(snap.req_cons, snap.req_prod).is_err()
            || ring_used(snap.rsp_cons, snap.rsp_prod).is_err()
        {
            self.break_conn(domid, XENSTORE_ERROR_RINGIDX);
            up.error = Some(XENSTORE_ERROR_RINGIDX);
            return up;
        }
        let mut rsp_prod = snap.rsp_prod;
        self.flush(domid, snap.rsp_cons, &mut rsp_prod, &mut up);
        let mut req_cons = snap.req_cons;
        let stop = self.quotas.read_stop_bytes;
        while let Some(c) = self.conns.get_mut(&domid) {
            if c.broken.is_some() || over(stop, c.out_bytes) || req_cons == snap.req_prod {
                break;
            }
            match read_messages(&mut c.reader, req_cons, snap.req_prod, &snap.req, 1) {
                Err(e) => {
                    self.break_conn(domid, e.code());
                    up.error = Some(e.code());
                    return up;
                }
                Ok((cons, msgs)) => {
                    req_cons = cons;
                    for (h, payload) in msgs {
                        let op = super::wire::parse_payload(&h, &payload);
                        let (reply, after) = self.process(domid, &h, op);
                        if let Some(c) = self.conns.get_mut(&domid) {
                            c.push_reply(reply);
                        }
                        if let Some((p, t)) = after {
                            self.queue_event(domid, &p, &t);
                        }
                    }
                }
            }
        }
        if req_cons != snap.req_cons {
            up.req_cons = Some(req_cons);
            up.notify = true;
        }
        self.flush(domid, snap.rsp_cons, &mut rsp_prod, &mut up);
        if let Some(c) = self.conns.get(&domid) {
            if c.outbox.is_empty() {
                self.dirty.remove(&domid);
            }
        }
        up
    }

    /// Moves queued output into the response ring's free space.
    fn flush(&mut self, domid: u16, rsp_cons: u32, rsp_prod: &mut u32, up: &mut RingUpdate) {
        let Some(c) = self.conns.get_mut(&domid) else {
            return;
        };
        while let Some(front) = c.outbox.front() {
            let rest = &front.bytes[c.out_sent..];
            let Ok(w) = ring_write(rsp_cons, *rsp_prod, rest) else {
                return;
            };
            if w.written == 0 {
                return;
            }
            for (area_off, data_off, len) in w.chunks {
                if len > 0 {
                    up.rsp_data
                        .push((area_off, Vec::from(&rest[data_off..data_off + len])));
                }
            }
            *rsp_prod = w.new_prod;
            up.rsp_prod = Some(w.new_prod);
            up.notify = true;
            c.out_sent += w.written;
            if c.out_sent == front.bytes.len() {
                c.out_bytes -= front.bytes.len();
                c.out_sent = 0;
                c.outbox.pop_front();
            }
        }
    }

    /// Writes what the toolstack writes for a new domain before introducing it (as
    /// libxl): `/local/domain/<domid>` readable by the domain (`n0`, `r<domid>`) with
    /// `name`, `domid`, `cpu/<n>/availability`, `memory/static-max` and
    /// `memory/target` (always both), `store/port`, `store/ring-ref`, `control` (with
    /// `platform-feature-multiprocessor-suspend`) and, owned by the domain (`n<domid>`):
    /// `device`, `control/shutdown`, `control/feature-{poweroff,reboot,suspend}`,
    /// `control/sysrq`, `data`, `drivers`, `feature`, `attr`, `error`.
    pub fn populate_domain(&mut self, domid: u16, layout: &DomainLayout) -> Result<(), XsError> {
        if domid == PRIV_DOMID || domid >= DOMID_FIRST_RESERVED {
            return Err(XsError::Einval);
        }
        let home = format!("/local/domain/{domid}");
        let ro = vec![Perm::new(0, Access::None), Perm::new(domid, Access::Read)];
        let rw = vec![Perm::new(domid, Access::None)];
        // A stale tree from an earlier domain with this id goes first (libxl ignores
        // the error when there is none).
        match self.request(PRIV_DOMID, 0, &Op::Rm { path: home.clone() }) {
            Ok(_) | Err(XsError::Enoent) => {}
            Err(e) => return Err(e),
        }
        let mut ops = vec![
            Op::Mkdir { path: home.clone() },
            Op::SetPerms {
                path: home.clone(),
                perms: ro,
            },
        ];
        let mut w = |k: &str, v: String| {
            ops.push(Op::Write {
                path: format!("{home}/{k}"),
                value: v.into_bytes(),
            })
        };
        w("name", layout.name.clone());
        w("domid", format!("{domid}"));
        w("memory/static-max", format!("{}", layout.static_max_kib));
        w("memory/target", format!("{}", layout.target_kib));
        w("store/port", format!("{}", layout.store_port));
        w("store/ring-ref", format!("{}", layout.store_ring_ref));
        for i in 0..layout.vcpus {
            w(&format!("cpu/{i}/availability"), String::from("online"));
        }
        w(
            "control/platform-feature-multiprocessor-suspend",
            String::from("1"),
        );
        for k in [
            "device",
            "control/shutdown",
            "control/feature-poweroff",
            "control/feature-reboot",
            "control/feature-suspend",
            "control/sysrq",
            "data",
            "drivers",
            "feature",
            "attr",
            "error",
        ] {
            let path = format!("{home}/{k}");
            ops.push(Op::Mkdir { path: path.clone() });
            ops.push(Op::SetPerms {
                path,
                perms: rw.clone(),
            });
        }
        for op in &ops {
            self.request(PRIV_DOMID, 0, op)?;
        }
        Ok(())
    }
}
