//! `test=xenstore`: the test guest talks to the hypervisor's xenstore the way a
//! frontend's xenbus does: it finds its ring page and event channel through HVM
//! parameters, writes an XS_WRITE and an XS_READ request into the ring, signals the
//! port, waits, and reads the replies. It reports what it read back (the node it wrote
//! and its own `name`, relative paths under `/local/domain/<id>`).

use core::fmt::Write;
use core::sync::atomic::{compiler_fence, Ordering};

use abi::ferro::{self, Check};
use abi::hypercall as hc;

use crate::peer::{clear_pending, map_shared_info, poll};
use crate::{arch, console_write_bytes, report, shutdown, StackBuf};

const DOMID_SELF: u16 = 0x7ff0;
const HVM_PARAM_STORE_PFN: u32 = 1;
const HVM_PARAM_STORE_EVTCHN: u32 = 2;
const XS_READ: u32 = 2;
const XS_WRITE: u32 = 11;
const XS_ERROR: u32 = 16;
const RING: u32 = 1024;
const REQ_CONS: u64 = 2048;
const REQ_PROD: u64 = 2052;
const RSP_CONS: u64 = 2056;
const RSP_PROD: u64 = 2060;
const EVTCHNOP_SEND: u64 = 4;

fn hypercall(nr: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    // SAFETY: every pointer passed below names a live, identity-mapped buffer of the
    // size the hypercall reads or writes.
    unsafe { arch::hypercall(nr, a1, a2, a3) }
}

fn get_param(index: u32) -> Option<u64> {
    let mut a = [0u8; 16];
    a[0..2].copy_from_slice(&DOMID_SELF.to_le_bytes());
    a[4..8].copy_from_slice(&index.to_le_bytes());
    let rc = hypercall(hc::HVM_OP, hc::HVMOP_GET_PARAM, a.as_mut_ptr() as u64, 0);
    compiler_fence(Ordering::SeqCst);
    (rc == 0).then(|| u64::from_le_bytes(a[8..16].try_into().unwrap_or([0; 8])))
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: the ring page lies in this guest's identity map (below 4 GiB, checked by
    // the caller).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as in rd32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn wr8(addr: u64, v: u8) {
    // SAFETY: as in rd32.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: as in rd32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

struct Ring {
    page: u64,
    port: u32,
}

impl Ring {
    /// Sends one request and waits for its reply; returns (type, payload length) and
    /// copies the payload into `out`.
    fn call(&self, ty: u32, req_id: u32, payload: &[u8], out: &mut [u8]) -> Option<(u32, usize)> {
        let mut msg = [0u8; 16];
        msg[0..4].copy_from_slice(&ty.to_le_bytes());
        msg[4..8].copy_from_slice(&req_id.to_le_bytes());
        msg[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut prod = rd32(self.page + REQ_PROD);
        // the request must fit in the free part of the ring
        let used = prod.wrapping_sub(rd32(self.page + REQ_CONS));
        if used > RING || RING - used < (msg.len() + payload.len()) as u32 {
            return None;
        }
        for &b in msg.iter().chain(payload) {
            wr8(self.page + u64::from(prod % RING), b);
            prod = prod.wrapping_add(1);
        }
        compiler_fence(Ordering::SeqCst);
        wr32(self.page + REQ_PROD, prod);
        let p = self.port.to_le_bytes();
        hypercall(hc::EVENT_CHANNEL_OP, EVTCHNOP_SEND, p.as_ptr() as u64, 0);
        for _ in 0..1000 {
            let (cons, rprod) = (rd32(self.page + RSP_CONS), rd32(self.page + RSP_PROD));
            if rprod.wrapping_sub(cons) >= 16 {
                let at = |i: u32| rd8(self.page + u64::from(RING + cons.wrapping_add(i) % RING));
                let word = |o: u32| u32::from_le_bytes([at(o), at(o + 1), at(o + 2), at(o + 3)]);
                let (rty, rid, len) = (word(0), word(4), word(12));
                if rprod.wrapping_sub(cons) >= 16 + len {
                    let n = (len as usize).min(out.len());
                    for (i, o) in out.iter_mut().take(n).enumerate() {
                        *o = at(16 + i as u32);
                    }
                    compiler_fence(Ordering::SeqCst);
                    wr32(self.page + RSP_CONS, cons.wrapping_add(16 + len));
                    return (rid == req_id).then_some((rty, n));
                }
            }
            poll(self.port);
            clear_pending(self.port);
        }
        None
    }
}

/// The `test=xenstore` guest.
pub fn run() -> ! {
    map_shared_info();
    let (Some(pfn), Some(port)) = (
        get_param(HVM_PARAM_STORE_PFN),
        get_param(HVM_PARAM_STORE_EVTCHN),
    ) else {
        report(Check::Xenstore, u64::MAX, 0);
        shutdown(hc::SHUTDOWN_CRASH)
    };
    if pfn == 0 || pfn >= (1 << 20) {
        report(Check::Xenstore, u64::MAX, 1);
        shutdown(hc::SHUTDOWN_CRASH)
    }
    let ring = Ring {
        page: pfn << 12,
        port: port as u32,
    };
    let mut buf = [0u8; 128];
    // write data/ferro = "hello" (relative path, the domain owns data/), read it back
    let write_ok = matches!(
        ring.call(XS_WRITE, 1, b"data/ferro\0hello", &mut buf),
        Some((XS_WRITE, _))
    );
    let read_back = match ring.call(XS_READ, 2, b"data/ferro\0", &mut buf) {
        Some((XS_READ, n)) => &buf[..n] == b"hello",
        _ => false,
    };
    let name = match ring.call(XS_READ, 3, b"name\0", &mut buf) {
        Some((XS_READ, n)) => ferro::fnv1a64(&buf[..n]),
        Some((XS_ERROR, _)) | Some(_) | None => 0,
    };
    let mut line = StackBuf::<96>::new();
    let _ = writeln!(
        line,
        "testguest: xenstore: write {write_ok}, read back {read_back}"
    );
    console_write_bytes(line.as_bytes());
    report(Check::Xenstore, name, u64::from(write_ok && read_back));
    shutdown(hc::SHUTDOWN_POWEROFF)
}
