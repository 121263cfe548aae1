//! `HYPERVISOR_grant_table_op(cmd, args, count)` over a copy of the guest's argument
//! array (Xen's `do_grant_table_op`).
//!
//! The hypervisor copies [`args_len`] bytes from the guest's `args` pointer, calls
//! [`GrantEngine::grant_table_op`], and copies the buffer back. Each operation decodes
//! its own copy of one element, so a guest changing the array meanwhile changes
//! nothing. Only the fields Xen writes are modified in the buffer.

use abi::errno;
use abi::grant_table::{
    GnttabCopy, GnttabGetStatusFrames, GnttabGetVersion, GnttabMapGrantRef, GnttabQuerySize,
    GnttabSetVersion, GnttabSetupTable, GnttabSwapGrantRef, GnttabUnmapAndReplace,
    GnttabUnmapGrantRef, GNTST_BAD_VIRT_ADDR, GNTST_OKAY, GNTTABOP_CACHE_FLUSH, GNTTABOP_CMD_MASK,
    GNTTABOP_COPY, GNTTABOP_GET_STATUS_FRAMES, GNTTABOP_GET_VERSION, GNTTABOP_MAP_GRANT_REF,
    GNTTABOP_QUERY_SIZE, GNTTABOP_SETUP_TABLE, GNTTABOP_SET_VERSION, GNTTABOP_SWAP_GRANT_REF,
    GNTTABOP_TRANSFER, GNTTABOP_UNMAP_AND_REPLACE, GNTTABOP_UNMAP_GRANT_REF,
};

use alloc::vec::Vec;

use crate::host::GrantHost;
use crate::{status_code, DomId, GrantEngine, UNMAP_BATCH_SIZE};

/// Size of one argument element of `cmd` (the command part), `None` for commands this
/// hypervisor does not implement.
pub fn arg_size(cmd: u32) -> Option<usize> {
    Some(match cmd & GNTTABOP_CMD_MASK {
        GNTTABOP_MAP_GRANT_REF => GnttabMapGrantRef::SIZE,
        GNTTABOP_UNMAP_GRANT_REF => GnttabUnmapGrantRef::SIZE,
        GNTTABOP_SETUP_TABLE => GnttabSetupTable::SIZE,
        GNTTABOP_COPY => GnttabCopy::SIZE,
        GNTTABOP_QUERY_SIZE => GnttabQuerySize::SIZE,
        GNTTABOP_UNMAP_AND_REPLACE => GnttabUnmapAndReplace::SIZE,
        GNTTABOP_SET_VERSION => GnttabSetVersion::SIZE,
        GNTTABOP_GET_STATUS_FRAMES => GnttabGetStatusFrames::SIZE,
        GNTTABOP_GET_VERSION => GnttabGetVersion::SIZE,
        GNTTABOP_SWAP_GRANT_REF => GnttabSwapGrantRef::SIZE,
        _ => return None,
    })
}

/// Bytes of guest memory the call reads and writes: `count` elements for the batched
/// commands, one for `set_version` / `get_version` (which ignore `count`), `None` for
/// unimplemented commands. Saturates rather than overflowing: the caller should bound
/// it (and may split a large batch into several calls, as Xen's continuations do).
pub fn args_len(cmd: u32, count: u32) -> Option<usize> {
    let size = arg_size(cmd)?;
    Some(match cmd & GNTTABOP_CMD_MASK {
        GNTTABOP_SET_VERSION | GNTTABOP_GET_VERSION => size,
        _ => size.saturating_mul(count as usize),
    })
}

fn elem(args: &mut [u8], i: usize, size: usize) -> Option<&mut [u8]> {
    args.get_mut(i.checked_mul(size)?..i.checked_mul(size)?.checked_add(size)?)
}

/// Writes the guest frame numbers of `frames` (as domain `dom` knows them) to `ld`'s
/// list at `list`: the status of `setup_table` / `get_status_frames`.
fn frame_list_status<H: GrantHost + ?Sized>(
    host: &mut H,
    ld: DomId,
    dom: DomId,
    frames: &[u64],
    list: u64,
) -> i16 {
    let d = if dom == abi::event_channel::DOMID_SELF {
        ld
    } else {
        dom
    };
    let gfns: Vec<u64> = frames.iter().map(|f| host.guest_frame_of(d, *f)).collect();
    if host.write_frame_list(ld, list, &gfns) {
        GNTST_OKAY
    } else {
        GNTST_BAD_VIRT_ADDR
    }
}

fn put_status(b: &mut [u8], off: usize, s: i16) {
    b[off..off + 2].copy_from_slice(&s.to_le_bytes());
}

/// Runs an unmap-style op list in batches of [`UNMAP_BATCH_SIZE`] (each batch: removals,
/// one flush, releases), writing each op's status back at offset 20; a short read of
/// the argument list ends the call with `-EFAULT` after the ops before it.
#[allow(clippy::too_many_arguments)]
fn unmap_batches<T, H: GrantHost + ?Sized>(
    engine: &mut GrantEngine,
    ld: DomId,
    args: &mut [u8],
    n: usize,
    size: usize,
    read: fn(&[u8]) -> Option<T>,
    status: fn(&T) -> i16,
    run: fn(&mut GrantEngine, DomId, &mut [T], &mut H),
    host: &mut H,
) -> i64 {
    let mut i = 0;
    while i < n {
        let mut ops = Vec::new();
        while ops.len() < UNMAP_BATCH_SIZE && i + ops.len() < n {
            match elem(args, i + ops.len(), size).and_then(|b| read(b)) {
                Some(op) => ops.push(op),
                None => break,
            }
        }
        let fault = ops.len() < UNMAP_BATCH_SIZE && i + ops.len() < n;
        run(engine, ld, &mut ops, host);
        for (k, op) in ops.iter().enumerate() {
            if let Some(b) = elem(args, i + k, size) {
                put_status(b, 20, status(op));
            }
        }
        if fault {
            return -errno::EFAULT;
        }
        i += ops.len();
    }
    0
}

impl GrantEngine {
    /// One `HYPERVISOR_grant_table_op` by `ld`. Returns what the hypercall returns in
    /// rax: 0, or a negative errno (`-EINVAL` for a negative count or stray
    /// continuation bits, `-ENOSYS` for unknown / unimplemented commands, `-EOPNOTSUPP`
    /// for `transfer` (PV only), `-EFAULT` when `args` is shorter than the operation
    /// needs: elements before the short one are done, as in Xen). Per-op outcomes are in
    /// each element's `status`.
    pub fn grant_table_op<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        cmd: u32,
        args: &mut [u8],
        count: u32,
        host: &mut H,
    ) -> i64 {
        if (count as i32) < 0 {
            return -errno::EINVAL;
        }
        let c = cmd & GNTTABOP_CMD_MASK;
        if c != GNTTABOP_CACHE_FLUSH && cmd & !GNTTABOP_CMD_MASK != 0 {
            return -errno::EINVAL;
        }
        let n = count as usize;
        match c {
            GNTTABOP_MAP_GRANT_REF => {
                for i in 0..n {
                    let Some(b) = elem(args, i, GnttabMapGrantRef::SIZE) else {
                        return -errno::EFAULT;
                    };
                    let Some(mut op) = GnttabMapGrantRef::read(b) else {
                        return -errno::EFAULT;
                    };
                    self.map_grant_ref(ld, &mut op, host);
                    b.copy_from_slice(&op.to_bytes());
                }
                0
            }
            GNTTABOP_UNMAP_GRANT_REF => unmap_batches(
                self,
                ld,
                args,
                n,
                GnttabUnmapGrantRef::SIZE,
                GnttabUnmapGrantRef::read,
                |op| op.status,
                GrantEngine::unmap_grant_refs,
                host,
            ),
            GNTTABOP_UNMAP_AND_REPLACE => unmap_batches(
                self,
                ld,
                args,
                n,
                GnttabUnmapAndReplace::SIZE,
                GnttabUnmapAndReplace::read,
                |op| op.status,
                GrantEngine::unmap_and_replace,
                host,
            ),
            GNTTABOP_SETUP_TABLE => {
                if count != 1 {
                    return -errno::EINVAL;
                }
                let Some(b) = elem(args, 0, GnttabSetupTable::SIZE) else {
                    return -errno::EFAULT;
                };
                let Some(op) = GnttabSetupTable::read(b) else {
                    return -errno::EFAULT;
                };
                let status = match self.setup_table(ld, op.dom, op.nr_frames, host) {
                    Ok(frames) => frame_list_status(host, ld, op.dom, &frames, op.frame_list),
                    Err(e) => e.code(),
                };
                put_status(b, 8, status);
                0
            }
            GNTTABOP_TRANSFER => -errno::EOPNOTSUPP,
            GNTTABOP_COPY => {
                for i in 0..n {
                    let Some(b) = elem(args, i, GnttabCopy::SIZE) else {
                        return -errno::EFAULT;
                    };
                    let Some(op) = GnttabCopy::read(b) else {
                        return -errno::EFAULT;
                    };
                    let r = self.copy(ld, &op, host);
                    put_status(b, 36, status_code(&r));
                }
                0
            }
            GNTTABOP_QUERY_SIZE => {
                if count != 1 {
                    return -errno::EINVAL;
                }
                let Some(b) = elem(args, 0, GnttabQuerySize::SIZE) else {
                    return -errno::EFAULT;
                };
                let Some(mut op) = GnttabQuerySize::read(b) else {
                    return -errno::EFAULT;
                };
                match self.query_size(ld, op.dom) {
                    Ok((nr, max)) => {
                        op.nr_frames = nr;
                        op.max_nr_frames = max;
                        op.status = GNTST_OKAY;
                    }
                    Err(e) => op.status = e.code(),
                }
                b.copy_from_slice(&op.to_bytes());
                0
            }
            GNTTABOP_SET_VERSION => {
                let Some(b) = elem(args, 0, GnttabSetVersion::SIZE) else {
                    return -errno::EFAULT;
                };
                let Some(op) = GnttabSetVersion::read(b) else {
                    return -errno::EFAULT;
                };
                let out = self.set_version(ld, op.version, host);
                b.copy_from_slice(
                    &GnttabSetVersion {
                        version: out.version,
                    }
                    .to_bytes(),
                );
                out.ret
            }
            GNTTABOP_GET_STATUS_FRAMES => {
                if count != 1 {
                    return -errno::EINVAL;
                }
                let Some(b) = elem(args, 0, GnttabGetStatusFrames::SIZE) else {
                    return -errno::EFAULT;
                };
                let Some(op) = GnttabGetStatusFrames::read(b) else {
                    return -errno::EFAULT;
                };
                let status = match self.get_status_frames(ld, op.dom, op.nr_frames) {
                    Ok(frames) => frame_list_status(host, ld, op.dom, &frames, op.frame_list),
                    Err(e) => e.code(),
                };
                put_status(b, 6, status);
                0
            }
            GNTTABOP_GET_VERSION => {
                let Some(b) = elem(args, 0, GnttabGetVersion::SIZE) else {
                    return -errno::EFAULT;
                };
                let Some(op) = GnttabGetVersion::read(b) else {
                    return -errno::EFAULT;
                };
                match self.get_version(ld, op.dom) {
                    Ok(v) => {
                        b[4..8].copy_from_slice(&v.to_le_bytes());
                        0
                    }
                    Err(e) => e,
                }
            }
            GNTTABOP_SWAP_GRANT_REF => {
                for i in 0..n {
                    let Some(b) = elem(args, i, GnttabSwapGrantRef::SIZE) else {
                        return -errno::EFAULT;
                    };
                    let Some(op) = GnttabSwapGrantRef::read(b) else {
                        return -errno::EFAULT;
                    };
                    let r = self.swap_grant_ref(ld, op.ref_a, op.ref_b, host);
                    put_status(b, 8, status_code(&r));
                }
                0
            }
            // dump_table is gone from current Xen; cache_flush exists on Arm only.
            _ => -errno::ENOSYS,
        }
    }
}
