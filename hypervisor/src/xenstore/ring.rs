//! Ring plumbing as pure functions over copies of the ring page.
//!
//! The hypervisor's glue copies the guest's `struct xenstore_domain_interface` once
//! ([`RingSnapshot::from_page`]), hands it to [`super::Xenstore::service_ring`] and
//! writes back only what [`RingUpdate::page_writes`] lists (response bytes, then
//! `rsp_prod` / `req_cons`, then `error` / `connection`), in that order, then signals
//! the event channel if [`RingUpdate::notify`]. It never writes the guest's own fields
//! (`req_prod`, `rsp_cons`) except when a reconnection resets the ring.
//!
//! Index rules are xenstored's (`tools/xenstored/domain.c`): indices are free-running
//! `u32`s, the byte at index `i` sits at `i % 1024`, and `prod - cons > 1024` on either
//! ring is an inconsistency that ends the conversation (`XENSTORE_ERROR_RINGIDX`).
//! Messages may straddle the wrap and arrive over several calls: [`MessageReader`]
//! keeps the partial message; a header announcing more than `XENSTORE_PAYLOAD_MAX`
//! bytes ends the conversation (`XENSTORE_ERROR_PROTO`).

use alloc::vec::Vec;

use abi::xs_wire::*;

/// Ring size in bytes (`XENSTORE_RING_SIZE`).
pub const RING_SIZE: u32 = XENSTORE_RING_SIZE as u32;

/// The ring indices are inconsistent (`prod - cons > XENSTORE_RING_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingError;

/// Bytes waiting in a ring, after validating its indices.
pub fn ring_used(cons: u32, prod: u32) -> Result<u32, RingError> {
    let used = prod.wrapping_sub(cons);
    if used > RING_SIZE {
        Err(RingError)
    } else {
        Ok(used)
    }
}

/// Reads up to `max` bytes from a ring with indices `cons`/`prod` whose data area is
/// `area`, following the wrap. Returns the bytes; the new consumer index is
/// `cons + bytes.len()` (wrapping).
pub fn ring_read(
    cons: u32,
    prod: u32,
    area: &[u8; XENSTORE_RING_SIZE],
    max: usize,
) -> Result<Vec<u8>, RingError> {
    let n = (ring_used(cons, prod)? as usize).min(max);
    let start = (cons % RING_SIZE) as usize;
    let first = n.min(XENSTORE_RING_SIZE - start);
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(&area[start..start + first]);
    v.extend_from_slice(&area[..n - first]);
    Ok(v)
}

/// Where [`ring_write`] puts bytes: up to two chunks of the data area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingWrite {
    /// Bytes of the input written (`<= data.len()`, limited by free space).
    pub written: usize,
    /// The new producer index.
    pub new_prod: u32,
    /// `(offset in the data area, offset in the input, length)` of each chunk; unused
    /// chunks have length 0.
    pub chunks: [(usize, usize, usize); 2],
}

/// Plans writing as much of `data` as fits into a ring with indices `cons`/`prod`.
pub fn ring_write(cons: u32, prod: u32, data: &[u8]) -> Result<RingWrite, RingError> {
    let free = (RING_SIZE - ring_used(cons, prod)?) as usize;
    let n = free.min(data.len());
    let start = (prod % RING_SIZE) as usize;
    let first = n.min(XENSTORE_RING_SIZE - start);
    Ok(RingWrite {
        written: n,
        new_prod: prod.wrapping_add(n as u32),
        chunks: [(start, 0, first), (0, first, n - first)],
    })
}

/// A complete message: its header and payload.
pub type Message = (XsdSockmsg, Vec<u8>);

/// The header announced a payload longer than `XENSTORE_PAYLOAD_MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong(pub XsdSockmsg);

/// Reassembles messages from a byte stream (partial headers and payloads are kept
/// across calls).
#[derive(Clone, Debug, Default)]
pub struct MessageReader {
    hdr: [u8; XsdSockmsg::SIZE],
    hdr_len: usize,
    header: Option<XsdSockmsg>,
    payload: Vec<u8>,
}

impl MessageReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes needed to finish the current header or payload (never 0).
    pub fn needed(&self) -> usize {
        match self.header {
            None => XsdSockmsg::SIZE - self.hdr_len,
            Some(h) => (h.len as usize - self.payload.len()).max(1),
        }
    }

    /// Bytes of a partial message held.
    pub fn buffered(&self) -> usize {
        self.hdr_len + self.payload.len()
    }

    /// Drops any partial message.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Takes bytes from `data` until one message is complete or `data` is exhausted.
    /// Returns the number of bytes consumed and the completed message, if any.
    pub fn push(&mut self, data: &[u8]) -> Result<(usize, Option<Message>), TooLong> {
        let mut used = 0;
        if self.header.is_none() {
            let n = (XsdSockmsg::SIZE - self.hdr_len).min(data.len());
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[..n]);
            self.hdr_len += n;
            used += n;
            if self.hdr_len < XsdSockmsg::SIZE {
                return Ok((used, None));
            }
            let h = XsdSockmsg::from_bytes(&self.hdr);
            if h.len as usize > XENSTORE_PAYLOAD_MAX {
                self.reset();
                return Err(TooLong(h));
            }
            self.header = Some(h);
            self.payload = Vec::with_capacity(h.len as usize);
        }
        let h = self.header.unwrap_or_default();
        let n = (h.len as usize - self.payload.len()).min(data.len() - used);
        self.payload.extend_from_slice(&data[used..used + n]);
        used += n;
        if self.payload.len() < h.len as usize {
            return Ok((used, None));
        }
        let payload = core::mem::take(&mut self.payload);
        self.reset();
        Ok((used, Some((h, payload))))
    }
}

/// The error that ended a conversation while reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Inconsistent indices (`XENSTORE_ERROR_RINGIDX`).
    RingIndex,
    /// Payload too long (`XENSTORE_ERROR_PROTO`).
    Protocol,
}

impl ReadError {
    /// The `XENSTORE_ERROR_*` value for the ring page's `error` field.
    pub fn code(self) -> u32 {
        match self {
            ReadError::RingIndex => XENSTORE_ERROR_RINGIDX,
            ReadError::Protocol => XENSTORE_ERROR_PROTO,
        }
    }
}

/// Consumes complete messages from a request ring (at most `max_messages`), feeding
/// `reader` so that partial messages survive to the next call. Returns the new
/// consumer index and the messages; bytes of a trailing partial message are consumed
/// into the reader.
pub fn read_messages(
    reader: &mut MessageReader,
    cons: u32,
    prod: u32,
    area: &[u8; XENSTORE_RING_SIZE],
    max_messages: usize,
) -> Result<(u32, Vec<Message>), ReadError> {
    ring_used(cons, prod).map_err(|_| ReadError::RingIndex)?;
    let mut cons = cons;
    let mut out = Vec::new();
    while out.len() < max_messages && cons != prod {
        let bytes =
            ring_read(cons, prod, area, reader.needed()).map_err(|_| ReadError::RingIndex)?;
        let (used, msg) = reader.push(&bytes).map_err(|_| ReadError::Protocol)?;
        cons = cons.wrapping_add(used as u32);
        if let Some(m) = msg {
            out.push(m);
        }
    }
    Ok((cons, out))
}

/// A copy of the ring page's fields the server reads.
#[derive(Clone, Debug)]
pub struct RingSnapshot {
    /// The request data area.
    pub req: [u8; XENSTORE_RING_SIZE],
    /// `req_cons`.
    pub req_cons: u32,
    /// `req_prod`.
    pub req_prod: u32,
    /// `rsp_cons`.
    pub rsp_cons: u32,
    /// `rsp_prod`.
    pub rsp_prod: u32,
    /// `connection` (`XENSTORE_RECONNECT` asks for a reset).
    pub connection: u32,
}

impl Default for RingSnapshot {
    fn default() -> Self {
        Self {
            req: [0; XENSTORE_RING_SIZE],
            req_cons: 0,
            req_prod: 0,
            rsp_cons: 0,
            rsp_prod: 0,
            connection: XENSTORE_CONNECTED,
        }
    }
}

fn le32(page: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = page.get(off..off + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

impl RingSnapshot {
    /// Decodes a copy of the ring page (at least [`XS_RING_INTERFACE_SIZE`] bytes;
    /// missing bytes read as 0).
    pub fn from_page(page: &[u8]) -> Self {
        let mut req = [0u8; XENSTORE_RING_SIZE];
        let n = page.len().min(XENSTORE_RING_SIZE);
        req[..n].copy_from_slice(&page[..n]);
        Self {
            req,
            req_cons: le32(page, XS_RING_REQ_CONS_OFFSET),
            req_prod: le32(page, XS_RING_REQ_PROD_OFFSET),
            rsp_cons: le32(page, XS_RING_RSP_CONS_OFFSET),
            rsp_prod: le32(page, XS_RING_RSP_PROD_OFFSET),
            connection: le32(page, XS_RING_CONNECTION_OFFSET),
        }
    }
}

/// What the server changes in the ring page after [`super::Xenstore::service_ring`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingUpdate {
    /// Response bytes: `(offset in the rsp data area, bytes)`.
    pub rsp_data: Vec<(usize, Vec<u8>)>,
    /// New `rsp_prod`.
    pub rsp_prod: Option<u32>,
    /// New `req_cons`.
    pub req_cons: Option<u32>,
    /// Reconnection: set all four indices to 0 (before `connection`).
    pub reset_indices: bool,
    /// New `error` field (`XENSTORE_ERROR_*`).
    pub error: Option<u32>,
    /// New `connection` field.
    pub connection: Option<u32>,
    /// Signal the domain's event channel.
    pub notify: bool,
}

impl RingUpdate {
    /// The page writes, in the order they must reach the page: `(offset in the page,
    /// bytes)`. A write barrier belongs between the data and the index writes.
    pub fn page_writes(&self) -> Vec<(usize, Vec<u8>)> {
        let mut v: Vec<(usize, Vec<u8>)> = self
            .rsp_data
            .iter()
            .map(|(off, b)| (XS_RING_RSP_OFFSET + off, b.clone()))
            .collect();
        let w = |off: usize, val: u32| (off, val.to_le_bytes().to_vec());
        if self.reset_indices {
            v.push(w(XS_RING_REQ_CONS_OFFSET, 0));
            v.push(w(XS_RING_REQ_PROD_OFFSET, 0));
            v.push(w(XS_RING_RSP_CONS_OFFSET, 0));
            v.push(w(XS_RING_RSP_PROD_OFFSET, 0));
        }
        if let Some(p) = self.rsp_prod {
            v.push(w(XS_RING_RSP_PROD_OFFSET, p));
        }
        if let Some(c) = self.req_cons {
            v.push(w(XS_RING_REQ_CONS_OFFSET, c));
        }
        if let Some(e) = self.error {
            v.push(w(XS_RING_ERROR_OFFSET, e));
        }
        if let Some(c) = self.connection {
            v.push(w(XS_RING_CONNECTION_OFFSET, c));
        }
        v
    }

    /// Applies [`Self::page_writes`] to a page image (for tests and host tools).
    pub fn apply(&self, page: &mut [u8]) {
        for (off, b) in self.page_writes() {
            if let Some(dst) = page.get_mut(off..off + b.len()) {
                dst.copy_from_slice(&b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_and_validation() {
        assert_eq!(ring_used(0, 0), Ok(0));
        assert_eq!(ring_used(5, 1029), Ok(1024));
        assert_eq!(ring_used(5, 1030), Err(RingError));
        assert_eq!(ring_used(u32::MAX - 1, 3), Ok(5));
        assert_eq!(ring_used(10, 9), Err(RingError));
    }

    #[test]
    fn read_wraps() {
        let mut area = [0u8; XENSTORE_RING_SIZE];
        area[1022] = 1;
        area[1023] = 2;
        area[0] = 3;
        let cons = 3 * 1024 + 1022;
        assert_eq!(ring_read(cons, cons + 3, &area, 10).unwrap(), [1, 2, 3]);
        assert_eq!(ring_read(cons, cons + 3, &area, 2).unwrap(), [1, 2]);
    }

    #[test]
    fn write_wraps_and_respects_space() {
        let w = ring_write(1020, 1022, &[9; 10]).unwrap();
        assert_eq!(w.written, 10);
        assert_eq!(w.new_prod, 1032);
        assert_eq!(w.chunks, [(1022, 0, 2), (0, 2, 8)]);
        let w = ring_write(0, 1020, &[9; 10]).unwrap();
        assert_eq!(w.written, 4);
        assert_eq!(ring_write(0, 2000, &[1]), Err(RingError));
    }

    #[test]
    fn reader_assembles_across_pushes() {
        let msg = super::super::wire::encode(XS_READ, 7, 0, b"a\0");
        let mut r = MessageReader::new();
        let (u, m) = r.push(&msg[..5]).unwrap();
        assert_eq!((u, m), (5, None));
        assert_eq!(r.needed(), 11);
        let (u, m) = r.push(&msg[5..17]).unwrap();
        assert_eq!(u, 12);
        assert!(m.is_none());
        let (u, m) = r.push(&msg[17..]).unwrap();
        assert_eq!(u, 1);
        let (h, p) = m.unwrap();
        assert_eq!((h.ty, h.req_id, p.as_slice()), (XS_READ, 7, &b"a\0"[..]));
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn reader_refuses_oversize() {
        let h = XsdSockmsg {
            ty: XS_WRITE,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        };
        let mut r = MessageReader::new();
        assert_eq!(r.push(&h.to_bytes()), Err(TooLong(h)));
        let ok = XsdSockmsg { len: 4096, ..h };
        assert!(r.push(&ok.to_bytes()).is_ok());
    }

    #[test]
    fn zero_length_message() {
        let msg = super::super::wire::encode(XS_TRANSACTION_START, 1, 0, b"");
        let mut r = MessageReader::new();
        let (u, m) = r.push(&msg).unwrap();
        assert_eq!(u, 16);
        assert_eq!(m.unwrap().1.len(), 0);
    }
}
