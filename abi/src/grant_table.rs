//! `HYPERVISOR_grant_table_op` (hypercall 20): `GNTTABOP_*` numbers, the shared grant
//! entry formats (v1, v2, status words), `GTF_*`, `GNTMAP_*`, `GNTCOPY_*`, `GNTST_*` and
//! every operation's argument structure.
//!
//! Source read (xen-project/xen, staging, 2026): `xen/include/public/grant_table.h`.
//! Layouts are x86_64 (`domid_t` = u16, `grant_ref_t` = `grant_handle_t` = u32,
//! `xen_pfn_t` = u64, a `XEN_GUEST_HANDLE` is one 8-byte pointer, natural alignment);
//! every size and offset below was also checked by compiling that header with gcc, and
//! is pinned here by `const` assertions.
//!
//! Every argument struct has `SIZE`, `from_bytes(&[u8; SIZE])`, `to_bytes()` and
//! `read(&[u8])`: the hypervisor copies the guest's structure ONCE, decodes the copy and
//! writes back the encoding of the updated copy. Unions are kept as their widest member
//! with accessors for the narrower views.

/// `__HYPERVISOR_grant_table_op`.
pub const HYPERVISOR_GRANT_TABLE_OP: u64 = 20;

/// `GNTTABOP_map_grant_ref` ([`GnttabMapGrantRef`]).
pub const GNTTABOP_MAP_GRANT_REF: u32 = 0;
/// `GNTTABOP_unmap_grant_ref` ([`GnttabUnmapGrantRef`]).
pub const GNTTABOP_UNMAP_GRANT_REF: u32 = 1;
/// `GNTTABOP_setup_table` ([`GnttabSetupTable`]).
pub const GNTTABOP_SETUP_TABLE: u32 = 2;
/// `GNTTABOP_dump_table` ([`GnttabDumpTable`]); current Xen no longer implements it.
pub const GNTTABOP_DUMP_TABLE: u32 = 3;
/// `GNTTABOP_transfer` ([`GnttabTransfer`]; PV guests only).
pub const GNTTABOP_TRANSFER: u32 = 4;
/// `GNTTABOP_copy` ([`GnttabCopy`]).
pub const GNTTABOP_COPY: u32 = 5;
/// `GNTTABOP_query_size` ([`GnttabQuerySize`]).
pub const GNTTABOP_QUERY_SIZE: u32 = 6;
/// `GNTTABOP_unmap_and_replace` ([`GnttabUnmapAndReplace`]).
pub const GNTTABOP_UNMAP_AND_REPLACE: u32 = 7;
/// `GNTTABOP_set_version` ([`GnttabSetVersion`]).
pub const GNTTABOP_SET_VERSION: u32 = 8;
/// `GNTTABOP_get_status_frames` ([`GnttabGetStatusFrames`]).
pub const GNTTABOP_GET_STATUS_FRAMES: u32 = 9;
/// `GNTTABOP_get_version` ([`GnttabGetVersion`]).
pub const GNTTABOP_GET_VERSION: u32 = 10;
/// `GNTTABOP_swap_grant_ref` ([`GnttabSwapGrantRef`]).
pub const GNTTABOP_SWAP_GRANT_REF: u32 = 11;
/// `GNTTABOP_cache_flush` ([`GnttabCacheFlush`]; Arm only in Xen).
pub const GNTTABOP_CACHE_FLUSH: u32 = 12;

/// Bits of the command word below this shift are the command; the bits above carry a
/// continuation argument (only `GNTTABOP_cache_flush` may have one). Xen internal, but
/// visible: a guest passing high bits gets `-EINVAL`.
pub const GNTTABOP_CONTINUATION_ARG_SHIFT: u32 = 12;
/// Mask of the command part of the command word.
pub const GNTTABOP_CMD_MASK: u32 = (1 << GNTTABOP_CONTINUATION_ARG_SHIFT) - 1;

/// Entries reserved at the start of every table for the toolstack (console, xenstore);
/// preserved across version changes.
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;
/// Reserved entry for the console ring.
pub const GNTTAB_RESERVED_CONSOLE: u32 = 0;
/// Reserved entry for the xenstore ring.
pub const GNTTAB_RESERVED_XENSTORE: u32 = 1;

/// `GTF_invalid`: the entry grants nothing.
pub const GTF_INVALID: u16 = 0;
/// `GTF_permit_access`: `domid` may map/access `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_accept_transfer`: `domid` may transfer a frame to this guest.
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// `GTF_transitive` (v2 only): `domid` may use `gref` of `trans_domid` (copy only).
pub const GTF_TRANSITIVE: u16 = 3;
/// `GTF_type_mask`.
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_readonly`: read-only mappings and accesses only. [GST]
pub const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading`: currently mapped/accessed for reading. [XEN]
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: currently mapped/accessed for writing. [XEN]
pub const GTF_WRITING: u16 = 1 << 4;
/// `GTF_PWT` (x86 cache attribute of mappings). [GST]
pub const GTF_PWT: u16 = 1 << 5;
/// `GTF_PCD` (x86 cache attribute of mappings). [GST]
pub const GTF_PCD: u16 = 1 << 6;
/// `GTF_PAT` (x86 cache attribute of mappings). [GST]
pub const GTF_PAT: u16 = 1 << 7;
/// `GTF_sub_page` (v2): only `[page_off, page_off + length)` may be copied; no maps.
pub const GTF_SUB_PAGE: u16 = 1 << 8;
/// `GTF_transfer_committed` (subflag of `GTF_accept_transfer`).
pub const GTF_TRANSFER_COMMITTED: u16 = 1 << 2;
/// `GTF_transfer_completed` (subflag of `GTF_accept_transfer`).
pub const GTF_TRANSFER_COMPLETED: u16 = 1 << 3;

/// `GNTMAP_device_map`: map for access by I/O devices.
pub const GNTMAP_DEVICE_MAP: u32 = 1 << 0;
/// `GNTMAP_host_map`: map for access by host CPUs.
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// `GNTMAP_readonly`: the mapping is read-only.
pub const GNTMAP_READONLY: u32 = 1 << 2;
/// `GNTMAP_application_map` (PV): mapping usable by the current application too.
pub const GNTMAP_APPLICATION_MAP: u32 = 1 << 3;
/// `GNTMAP_contains_pte` (PV): `host_addr` is the machine address of a PTE.
pub const GNTMAP_CONTAINS_PTE: u32 = 1 << 4;
/// `_GNTMAP_guest_avail0`: first of the PTE-available bits (PV, feature-gated).
pub const GNTMAP_GUEST_AVAIL0_SHIFT: u32 = 16;
/// `GNTMAP_guest_avail_mask`.
pub const GNTMAP_GUEST_AVAIL_MASK: u32 = !0u32 << GNTMAP_GUEST_AVAIL0_SHIFT;

/// `GNTCOPY_source_gref`: the source is a grant reference (else a frame of the caller).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`: the destination is a grant reference (else a frame).
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `GNTTAB_CACHE_CLEAN` ([`GnttabCacheFlush::op`]).
pub const GNTTAB_CACHE_CLEAN: u32 = 1 << 0;
/// `GNTTAB_CACHE_INVAL`.
pub const GNTTAB_CACHE_INVAL: u32 = 1 << 1;
/// `GNTTAB_CACHE_SOURCE_GREF`.
pub const GNTTAB_CACHE_SOURCE_GREF: u32 = 1 << 31;

/// `XENMAPIDX_grant_table_status` (memory.h): in `add_to_physmap` with
/// `XENMAPSPACE_grant_table`, selects a v2 status frame instead of a shared frame.
pub const XENMAPIDX_GRANT_TABLE_STATUS: u32 = 0x8000_0000;

/// `GNTST_okay`.
pub const GNTST_OKAY: i16 = 0;
/// `GNTST_general_error`: general undefined error.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_domain`: unrecognised domain id.
pub const GNTST_BAD_DOMAIN: i16 = -2;
/// `GNTST_bad_gntref`: unrecognised or inappropriate grant reference.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_bad_handle`: unrecognised or inappropriate handle.
pub const GNTST_BAD_HANDLE: i16 = -4;
/// `GNTST_bad_virt_addr`: inappropriate virtual address to map.
pub const GNTST_BAD_VIRT_ADDR: i16 = -5;
/// `GNTST_bad_dev_addr`: inappropriate device address to unmap.
pub const GNTST_BAD_DEV_ADDR: i16 = -6;
/// `GNTST_no_device_space`: out of space in the I/O MMU.
pub const GNTST_NO_DEVICE_SPACE: i16 = -7;
/// `GNTST_permission_denied`: not enough privilege for the operation.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// `GNTST_bad_page`: specified page was invalid for the operation.
pub const GNTST_BAD_PAGE: i16 = -9;
/// `GNTST_bad_copy_arg`: copy arguments cross a page boundary.
pub const GNTST_BAD_COPY_ARG: i16 = -10;
/// `GNTST_address_too_big`: transfer page address too large.
pub const GNTST_ADDRESS_TOO_BIG: i16 = -11;
/// `GNTST_eagain`: operation not done; try again.
pub const GNTST_EAGAIN: i16 = -12;
/// `GNTST_no_space`: out of space (handles etc.).
pub const GNTST_NO_SPACE: i16 = -13;

use crate::wire::wire_struct;

wire_struct! {
    /// `struct grant_entry_v1`: one entry of a version-1 shared grant table (512 per
    /// 4 KiB frame).
    GrantEntryV1, 8, {
        /// `GTF_*` type and flags. [XEN, GST]
        flags: u16 = 0,
        /// The domain being granted access. [GST]
        domid: u16 = 2,
        /// `GTF_permit_access`: GFN the grantee may map/access. [GST]
        frame: u32 = 4,
    }
}

wire_struct! {
    /// `struct grant_entry_header`: the prefix shared by v1 and v2 entries. Xen reads and
    /// compare-exchanges it as one 32-bit word (flags in the low half).
    GrantEntryHeader, 4, {
        /// `GTF_*` type and flags.
        flags: u16 = 0,
        /// The domain being granted access.
        domid: u16 = 2,
    }
}

wire_struct! {
    /// `union grant_entry_v2` (16 bytes, 256 per frame), kept as header plus two raw
    /// words; use the accessors for the `full_page`, `sub_page` and `transitive` views.
    GrantEntryV2, 16, {
        /// `hdr.flags`: `GTF_*` type and flags (no `GTF_reading`/`GTF_writing`: in v2
        /// those live in the status frames).
        flags: u16 = 0,
        /// `hdr.domid`: the domain being granted access.
        domid: u16 = 2,
        /// Bytes 4..8: `full_page.pad0`, or `sub_page.page_off | sub_page.length << 16`,
        /// or `transitive.trans_domid | transitive.pad0 << 16`.
        word4: u32 = 4,
        /// Bytes 8..16: `full_page.frame`, `sub_page.frame`, or `transitive.gref` (low
        /// 32 bits).
        word8: u64 = 8,
    }
}

impl GrantEntryV2 {
    /// `full_page.frame` / `sub_page.frame`.
    pub const fn frame(&self) -> u64 {
        self.word8
    }
    /// `sub_page.page_off`.
    pub const fn page_off(&self) -> u16 {
        self.word4 as u16
    }
    /// `sub_page.length`.
    pub const fn length(&self) -> u16 {
        (self.word4 >> 16) as u16
    }
    /// `transitive.trans_domid`.
    pub const fn trans_domid(&self) -> u16 {
        self.word4 as u16
    }
    /// `transitive.gref`.
    pub const fn trans_gref(&self) -> u32 {
        self.word8 as u32
    }
}

/// `grant_status_t`: one v2 status word (`GTF_reading | GTF_writing`), 2048 per frame.
pub type GrantStatus = u16;

wire_struct! {
    /// `struct gnttab_map_grant_ref`.
    GnttabMapGrantRef, 32, {
        /// IN: where to map (HVM/PVH: guest-physical address; PV: VA or PTE address).
        host_addr: u64 = 0,
        /// IN: `GNTMAP_*`.
        flags: u32 = 8,
        /// IN: grant reference in `dom`'s table.
        r#ref: u32 = 12,
        /// IN: the granting domain.
        dom: u16 = 16,
        /// OUT: `GNTST_*`.
        status: i16 = 18,
        /// OUT: handle to pass to unmap.
        handle: u32 = 20,
        /// OUT: bus address of the frame (machine address on x86).
        dev_bus_addr: u64 = 24,
    }
}

wire_struct! {
    /// `struct gnttab_unmap_grant_ref`. A zero `host_addr` / `dev_bus_addr` leaves that
    /// part of the mapping alone.
    GnttabUnmapGrantRef, 24, {
        /// IN: the host mapping to remove (0: none).
        host_addr: u64 = 0,
        /// IN: the device mapping to remove (0: none).
        dev_bus_addr: u64 = 8,
        /// IN: handle from map.
        handle: u32 = 16,
        /// OUT: `GNTST_*`.
        status: i16 = 20,
    }
}

wire_struct! {
    /// `struct gnttab_setup_table`.
    GnttabSetupTable, 24, {
        /// IN: domain (`DOMID_SELF` allowed).
        dom: u16 = 0,
        /// IN: frames wanted (the table grows to at least this many).
        nr_frames: u32 = 4,
        /// OUT: `GNTST_*`.
        status: i16 = 8,
        /// IN: guest handle of an array of `nr_frames` `xen_pfn_t` (OUT values).
        frame_list: u64 = 16,
    }
}

wire_struct! {
    /// `struct gnttab_dump_table`.
    GnttabDumpTable, 4, {
        /// IN: domain.
        dom: u16 = 0,
        /// OUT: `GNTST_*`.
        status: i16 = 2,
    }
}

wire_struct! {
    /// `struct gnttab_transfer`.
    GnttabTransfer, 24, {
        /// IN: frame to transfer.
        mfn: u64 = 0,
        /// IN: receiving domain.
        domid: u16 = 8,
        /// IN: receiver's grant reference.
        r#ref: u32 = 12,
        /// OUT: `GNTST_*`.
        status: i16 = 16,
    }
}

wire_struct! {
    /// `struct gnttab_copy`. `source`/`dest` are flattened: the union `u` is a `u64`
    /// (`gmfn`) whose low 32 bits are `ref` (see [`GnttabCopy::source_ref`]).
    GnttabCopy, 40, {
        /// IN: `source.u` (`ref` or `gmfn`).
        source_u: u64 = 0,
        /// IN: `source.domid`.
        source_domid: u16 = 8,
        /// IN: `source.offset`.
        source_offset: u16 = 10,
        /// IN: `dest.u` (`ref` or `gmfn`).
        dest_u: u64 = 16,
        /// IN: `dest.domid`.
        dest_domid: u16 = 24,
        /// IN: `dest.offset`.
        dest_offset: u16 = 26,
        /// Tail padding of the C `struct gnttab_copy_ptr` (ignored; written as 0).
        dest_pad: u32 = 28,
        /// IN: bytes to copy.
        len: u16 = 32,
        /// IN: `GNTCOPY_*`.
        flags: u16 = 34,
        /// OUT: `GNTST_*`.
        status: i16 = 36,
    }
}

impl GnttabCopy {
    /// `source.u.ref`.
    pub const fn source_ref(&self) -> u32 {
        self.source_u as u32
    }
    /// `dest.u.ref`.
    pub const fn dest_ref(&self) -> u32 {
        self.dest_u as u32
    }
}

wire_struct! {
    /// `struct gnttab_query_size`.
    GnttabQuerySize, 16, {
        /// IN: domain (`DOMID_SELF` allowed).
        dom: u16 = 0,
        /// OUT: current frames.
        nr_frames: u32 = 4,
        /// OUT: maximum frames.
        max_nr_frames: u32 = 8,
        /// OUT: `GNTST_*`.
        status: i16 = 12,
    }
}

wire_struct! {
    /// `struct gnttab_unmap_and_replace`.
    GnttabUnmapAndReplace, 24, {
        /// IN: host mapping to remove.
        host_addr: u64 = 0,
        /// IN: mapping whose PTE replaces it (PV only; must be 0 for HVM/PVH).
        new_addr: u64 = 8,
        /// IN: handle from map.
        handle: u32 = 16,
        /// OUT: `GNTST_*`.
        status: i16 = 20,
    }
}

wire_struct! {
    /// `struct gnttab_set_version`.
    GnttabSetVersion, 4, {
        /// IN: version wanted; OUT: version in effect.
        version: u32 = 0,
    }
}

wire_struct! {
    /// `struct gnttab_get_status_frames`.
    GnttabGetStatusFrames, 16, {
        /// IN: number of frames the list can take.
        nr_frames: u32 = 0,
        /// IN: domain (`DOMID_SELF` allowed).
        dom: u16 = 4,
        /// OUT: `GNTST_*`.
        status: i16 = 6,
        /// IN: guest handle of an array of `uint64_t` (OUT values).
        frame_list: u64 = 8,
    }
}

wire_struct! {
    /// `struct gnttab_get_version`.
    GnttabGetVersion, 8, {
        /// IN: domain (`DOMID_SELF` allowed).
        dom: u16 = 0,
        /// Padding.
        pad: u16 = 2,
        /// OUT: version.
        version: u32 = 4,
    }
}

wire_struct! {
    /// `struct gnttab_swap_grant_ref`.
    GnttabSwapGrantRef, 12, {
        /// IN: first reference.
        ref_a: u32 = 0,
        /// IN: second reference.
        ref_b: u32 = 4,
        /// OUT: `GNTST_*`.
        status: i16 = 8,
    }
}

wire_struct! {
    /// `struct gnttab_cache_flush` (the union `a` as a `u64`; `a.ref` is its low half).
    GnttabCacheFlush, 16, {
        /// IN: `a.dev_bus_addr` or `a.ref`.
        a: u64 = 0,
        /// IN: offset from the start of the grant.
        offset: u16 = 8,
        /// IN: size within the grant.
        length: u16 = 10,
        /// IN: `GNTTAB_CACHE_*`.
        op: u32 = 12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_grant_ref_round_trip() {
        let m = GnttabMapGrantRef {
            host_addr: 0x1234_5000,
            flags: GNTMAP_HOST_MAP | GNTMAP_READONLY,
            r#ref: 9,
            dom: 3,
            status: GNTST_BAD_GNTREF,
            handle: 0xdead,
            dev_bus_addr: 0xabc_d000,
        };
        let b = m.to_bytes();
        assert_eq!(&b[16..18], &3u16.to_le_bytes());
        assert_eq!(&b[18..20], &(-3i16).to_le_bytes());
        assert_eq!(GnttabMapGrantRef::from_bytes(&b), m);
        assert_eq!(GnttabMapGrantRef::read(&b[..31]), None);
    }

    #[test]
    fn copy_union_low_half_is_ref() {
        let mut b = [0u8; GnttabCopy::SIZE];
        b[0..4].copy_from_slice(&77u32.to_le_bytes());
        b[4..8].copy_from_slice(&[0xff; 4]); // garbage above a 32-bit ref
        b[16..24].copy_from_slice(&0x1_0000_0005u64.to_le_bytes());
        let c = GnttabCopy::from_bytes(&b);
        assert_eq!(c.source_ref(), 77);
        assert_eq!(c.dest_u, 0x1_0000_0005);
        assert_eq!(c.dest_ref(), 5);
    }

    #[test]
    fn v2_entry_views() {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&(GTF_PERMIT_ACCESS | GTF_SUB_PAGE).to_le_bytes());
        b[2..4].copy_from_slice(&4u16.to_le_bytes());
        b[4..6].copy_from_slice(&100u16.to_le_bytes());
        b[6..8].copy_from_slice(&200u16.to_le_bytes());
        b[8..16].copy_from_slice(&0x42u64.to_le_bytes());
        let e = GrantEntryV2::from_bytes(&b);
        assert_eq!((e.page_off(), e.length(), e.frame()), (100, 200, 0x42));
        assert_eq!((e.trans_domid(), e.trans_gref()), (100, 0x42));
        assert_eq!(e.to_bytes(), b);
    }
}
