//! The node tree: absolute path → [`Node`] (value, permissions, children, generation),
//! with a count of the nodes each domain owns (the "entries" quota).
//!
//! Paths are canonical absolute paths (`/`, `/local/domain/1/name`) or special paths
//! (`@introduceDomain`, `@releaseDomain`), which have no parent in the tree.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Access granted by one permission entry (`n`, `r`, `w`, `b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

/// Read permission bit (`XS_PERM_READ`).
pub const PERM_READ: u8 = 1;
/// Write permission bit (`XS_PERM_WRITE`).
pub const PERM_WRITE: u8 = 2;
/// Owner bit (`XS_PERM_OWNER`): set for the owner and the privileged domain.
pub const PERM_OWNER: u8 = 8;

impl Access {
    /// The letter used on the wire.
    pub fn letter(self) -> u8 {
        match self {
            Access::None => b'n',
            Access::Read => b'r',
            Access::Write => b'w',
            Access::Both => b'b',
        }
    }

    /// Parses a wire letter.
    pub fn from_letter(l: u8) -> Option<Self> {
        Some(match l {
            b'n' => Access::None,
            b'r' => Access::Read,
            b'w' => Access::Write,
            b'b' => Access::Both,
            _ => return None,
        })
    }

    /// [`PERM_READ`] / [`PERM_WRITE`] bits.
    pub fn bits(self) -> u8 {
        match self {
            Access::None => 0,
            Access::Read => PERM_READ,
            Access::Write => PERM_WRITE,
            Access::Both => PERM_READ | PERM_WRITE,
        }
    }
}

/// One permission entry: a domain and what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Domain the entry is about (for the first entry: the owner).
    pub domid: u16,
    /// Access granted.
    pub access: Access,
}

impl Perm {
    /// A permission entry.
    pub const fn new(domid: u16, access: Access) -> Self {
        Self { domid, access }
    }
}

/// One node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The value (binary, usually ASCII without NUL).
    pub value: Vec<u8>,
    /// Permissions; never empty. The first entry names the owner (full access) and
    /// gives the access of domains without an entry of their own.
    pub perms: Vec<Perm>,
    /// Names (last path component) of the children, in creation order.
    pub children: Vec<String>,
    /// Generation count: changes on every modification (transaction conflicts,
    /// `XS_DIRECTORY_PART`).
    pub generation: u64,
}

impl Node {
    /// An empty node with the given permissions.
    pub fn new(perms: Vec<Perm>) -> Self {
        Self {
            value: Vec::new(),
            perms,
            children: Vec::new(),
            generation: 0,
        }
    }

    /// The owning domain.
    pub fn owner(&self) -> u16 {
        self.perms.first().map_or(0, |p| p.domid)
    }

    /// Bytes of the child list on the wire (each name followed by a NUL).
    pub fn children_len(&self) -> usize {
        self.children.iter().map(|c| c.len() + 1).sum()
    }

    /// The size xenstored accounts for a node (`calc_node_acc_size`: 16-byte header,
    /// 8 bytes per permission, value, child list), checked against the node-size quota.
    pub fn acc_size(&self) -> usize {
        16 + 8 * self.perms.len() + self.value.len() + self.children_len()
    }
}

/// The parent of a path: everything before the last `/` after the first character,
/// or `/` (also for special paths such as `@releaseDomain`), as xenstored's
/// `get_parent()`.
pub fn parent_of(path: &str) -> &str {
    match path.get(1..).and_then(|p| p.rfind('/')) {
        Some(i) => &path[..i + 1],
        None => "/",
    }
}

/// The last component of a path (not meaningful for `/`).
pub fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// The path of child `name` of `parent`.
pub fn child_path(parent: &str, name: &str) -> String {
    let mut s = String::with_capacity(parent.len() + 1 + name.len());
    s.push_str(parent);
    if parent != "/" {
        s.push('/');
    }
    s.push_str(name);
    s
}

/// The node tree.
#[derive(Clone, Debug)]
pub struct Store {
    nodes: BTreeMap<String, Node>,
    generation: u64,
    owned: BTreeMap<u16, usize>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// The initial tree xenstored builds (`setup_structure`): `/`, `/tool`,
    /// `/tool/xenstored`, `@releaseDomain`, `@introduceDomain`, all owned by domain 0
    /// with no access for others.
    pub fn new() -> Self {
        let mut s = Self {
            nodes: BTreeMap::new(),
            generation: 0,
            owned: BTreeMap::new(),
        };
        let n0 = || vec![Perm::new(0, Access::None)];
        let mut root = Node::new(n0());
        root.children.push(String::from("tool"));
        s.insert("/", root);
        let mut tool = Node::new(n0());
        tool.children.push(String::from("xenstored"));
        s.insert("/tool", tool);
        s.insert("/tool/xenstored", Node::new(n0()));
        s.insert("@releaseDomain", Node::new(n0()));
        s.insert("@introduceDomain", Node::new(n0()));
        s
    }

    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Number of nodes (special nodes included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty (never: the root always exists).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of nodes owned by `domid`.
    pub fn owned_by(&self, domid: u16) -> usize {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// All paths, in byte order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// The current global generation count.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A fresh generation number (the global count, incremented first).
    pub(crate) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn count(&mut self, domid: u16, add: bool) {
        let c = self.owned.entry(domid).or_insert(0);
        if add {
            *c += 1;
        } else {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.owned.remove(&domid);
            }
        }
    }

    /// Inserts or replaces a node as given (generation included), keeping the owner
    /// counts right. Parent child lists are the caller's business.
    pub(crate) fn insert(&mut self, path: &str, node: Node) {
        let owner = node.owner();
        if let Some(old) = self.nodes.insert(String::from(path), node) {
            self.count(old.owner(), false);
        }
        self.count(owner, true);
    }

    /// Stores a modified or new node with a fresh generation.
    pub(crate) fn put(&mut self, path: &str, mut node: Node) {
        node.generation = self.next_generation();
        self.insert(path, node);
    }

    /// Removes one node (not its children), keeping the owner counts right.
    pub(crate) fn remove(&mut self, path: &str) -> Option<Node> {
        let old = self.nodes.remove(path)?;
        self.count(old.owner(), false);
        Some(old)
    }

    /// Replaces the permissions of a node without changing its generation (used when a
    /// domain goes away, as xenstored's `domain_tree_remove`).
    pub(crate) fn set_perms_raw(&mut self, path: &str, perms: Vec<Perm>) {
        if let Some(mut n) = self.nodes.remove(path) {
            self.count(n.owner(), false);
            n.perms = perms;
            self.insert(path, n);
        }
    }

    /// Checks the tree's invariants: every non-special node but `/` is listed once by
    /// its parent, every listed child exists, permissions are never empty and the
    /// owner counts match. Returns a description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut owned: BTreeMap<u16, usize> = BTreeMap::new();
        for (path, node) in &self.nodes {
            if node.perms.is_empty() {
                return Err(alloc::format!("{path}: no permissions"));
            }
            *owned.entry(node.owner()).or_insert(0) += 1;
            for c in &node.children {
                let cp = child_path(path, c);
                if !self.nodes.contains_key(&cp) {
                    return Err(alloc::format!("{path}: missing child {cp}"));
                }
                if node.children.iter().filter(|x| *x == c).count() != 1 {
                    return Err(alloc::format!("{path}: duplicate child {c}"));
                }
            }
            if path != "/" && !path.starts_with('@') {
                let parent = parent_of(path);
                let listed = self
                    .nodes
                    .get(parent)
                    .is_some_and(|p| p.children.iter().any(|c| c == basename(path)));
                if !listed {
                    return Err(alloc::format!("{path}: not listed by {parent}"));
                }
            }
        }
        if owned != self.owned {
            return Err(alloc::format!(
                "owner counts {:?} != {:?}",
                self.owned,
                owned
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        assert_eq!(parent_of("/"), "/");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert_eq!(parent_of("@releaseDomain"), "/");
        assert_eq!(parent_of("@a/b"), "@a");
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
    }

    #[test]
    fn initial_tree() {
        let s = Store::new();
        s.check().unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s.owned_by(0), 5);
        assert_eq!(s.get("/").unwrap().children, vec![String::from("tool")]);
    }

    #[test]
    fn owner_counts_follow_changes() {
        let mut s = Store::new();
        let mut n = Node::new(vec![Perm::new(3, Access::None)]);
        n.value = b"x".to_vec();
        s.put("/x", n);
        assert_eq!(s.owned_by(3), 1);
        s.set_perms_raw("/x", vec![Perm::new(4, Access::Read)]);
        assert_eq!(s.owned_by(3), 0);
        assert_eq!(s.owned_by(4), 1);
        s.remove("/x");
        assert_eq!(s.owned_by(4), 0);
    }
}
