//! A simulated VT-d unit for host tests, written from the spec's behaviour (and
//! QEMU 7.2's where VTD.md records it), independently of the driver's encoders:
//!
//! - registers: CAP/ECAP, GCMD -> GSTS (TE, QIE, SRTP -> RTPS, WBF), RTADDR latched
//!   on SRTP (which also drops every cache, as QEMU does), CCMD and IOTLB registers
//!   (ignored once QIE=1), the invalidation queue processed when IQT is written,
//!   FSTS/FRCD with write-1-to-clear; a 64-bit access to a 32-bit-only register
//!   panics (QEMU aborts), and so does a wait descriptor with SW and IF;
//! - memory: frames plus a CPU cache overlay. With ECAP.C=0 CPU writes stay in the
//!   overlay until `flush_cache`, and the unit's walks read memory only, so a missing
//!   clflush is seen as a stale entry;
//! - a context cache keyed by source id and an IOTLB keyed by (source id, page)
//!   tagged with the domain id, dropped only by matching invalidations (with CM=1,
//!   failed translations are cached too);
//! - DMA: `dma()` translates through the caches or the tables, records faults in
//!   the fault recording registers (PFO when the next one is full) and reads or
//!   writes memory.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use pagetable::PhysMem;

use crate::regs::{is_32bit_only, Mmio};
use crate::unit::Platform;

pub const QEMU_CAP: u64 = 0xd2_008c_2226_0206;
pub const QEMU_ECAP: u64 = 0xf42;
const LINE: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtxEntry {
    pub did: u16,
    pub slptptr: u64,
    pub levels: u8,
    pub pass_through: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    pub did: u16,
    /// None: a cached failed translation (CM=1 only).
    pub pa: Option<u64>,
    pub size: u64,
    pub read: bool,
    pub write: bool,
}

/// What the unit processed, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Context-cache invalidation: granularity 1..3, did, sid.
    Cc {
        g: u8,
        did: u16,
        sid: u16,
        queued: bool,
    },
    /// IOTLB invalidation: granularity, did, addr, am.
    Iotlb {
        g: u8,
        did: u16,
        addr: u64,
        am: u8,
        queued: bool,
    },
    /// Wait descriptor with status write.
    Wait {
        data: u32,
        addr: u64,
    },
    Srtp,
    Wbf,
    Gcmd(u32),
}

pub struct Sim {
    pub cap: u64,
    pub ecap: u64,
    // memory
    pub frames: HashMap<u64, Box<[u8; 4096]>>,
    pub cache: HashMap<u64, [u8; 64]>,
    pub next_frame: u64,
    pub free_frames: Vec<u64>,
    pub table_frames: BTreeSet<u64>,
    pub alloc_limit: Option<usize>,
    // registers
    pub gsts: u32,
    pub rtaddr: u64,
    pub root: Option<u64>,
    pub ccmd: u64,
    pub iva: u64,
    pub iotlb_reg: u64,
    pub iqa: u64,
    pub iqh: u64,
    pub iqt: u64,
    pub ics: u32,
    pub fsts: u32,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    pub frcd: Vec<[u64; 2]>,
    pub next_frcd: usize,
    /// FSTS.FRI: the record the first pending fault went to.
    pub fri: usize,
    // caches
    pub ctx_cache: HashMap<u16, CtxEntry>,
    pub iotlb: HashMap<(u16, u64), TlbEntry>,
    // test knobs and logs
    pub events: Vec<Event>,
    pub clock_us: u64,
    /// GSTS bits that never change (a hung unit).
    pub stuck: u32,
    /// Wait descriptors are not processed.
    pub drop_waits: bool,
    /// IOTLB descriptors are rejected (FSTS.IQE).
    pub reject_iotlb: bool,
    pub gcmd_writes: u32,
}

pub type Shared = Rc<RefCell<Sim>>;

impl Sim {
    pub fn new(cap: u64, ecap: u64) -> Shared {
        let nfr = ((cap >> 40) & 0xff) as usize + 1;
        Rc::new(RefCell::new(Sim {
            cap,
            ecap,
            frames: HashMap::new(),
            cache: HashMap::new(),
            next_frame: 0x10_0000,
            free_frames: Vec::new(),
            table_frames: BTreeSet::new(),
            alloc_limit: None,
            gsts: 0,
            rtaddr: 0,
            root: None,
            ccmd: 0,
            iva: 0,
            iotlb_reg: 0,
            iqa: 0,
            iqh: 0,
            iqt: 0,
            ics: 0,
            fsts: 0,
            fectl: 1 << 31,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            frcd: vec![[0, 0]; nfr],
            next_frcd: 0,
            fri: 0,
            ctx_cache: HashMap::new(),
            iotlb: HashMap::new(),
            events: Vec::new(),
            clock_us: 0,
            stuck: 0,
            drop_waits: false,
            reject_iotlb: false,
            gcmd_writes: 0,
        }))
    }

    fn coherent(&self) -> bool {
        self.ecap & 1 != 0
    }
    fn cm(&self) -> bool {
        self.cap & (1 << 7) != 0
    }
    fn mgaw(&self) -> u32 {
        ((self.cap >> 16) & 0x3f) as u32 + 1
    }
    fn iro(&self) -> usize {
        ((self.ecap >> 8) & 0x3ff) as usize * 16
    }
    fn fro(&self) -> usize {
        ((self.cap >> 24) & 0x3ff) as usize * 16
    }

    // ---- memory -------------------------------------------------------------

    fn frame(&mut self, pa: u64) -> &mut [u8; 4096] {
        self.frames
            .entry(pa & !0xfff)
            .or_insert_with(|| Box::new([0; 4096]))
    }

    /// Memory as the unit (DMA) sees it: with C=1 it snoops the CPU cache.
    pub fn hw_read(&mut self, pa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = pa + i as u64;
            let cached = if self.coherent() {
                self.cache
                    .get(&(a & !(LINE - 1)))
                    .map(|l| l[(a % LINE) as usize])
            } else {
                None
            };
            *b = cached.unwrap_or_else(|| self.frame(a)[(a & 0xfff) as usize]);
        }
    }

    pub fn hw_read_u64(&mut self, pa: u64) -> u64 {
        let mut b = [0; 8];
        self.hw_read(pa, &mut b);
        u64::from_le_bytes(b)
    }

    /// DMA writes are always coherent: memory and any cached copy are updated.
    pub fn hw_write(&mut self, pa: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = pa + i as u64;
            self.frame(a)[(a & 0xfff) as usize] = b;
            if let Some(l) = self.cache.get_mut(&(a & !(LINE - 1))) {
                l[(a % LINE) as usize] = b;
            }
        }
    }

    /// The CPU's view.
    pub fn cpu_read(&mut self, pa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = pa + i as u64;
            *b = match self.cache.get(&(a & !(LINE - 1))) {
                Some(l) => l[(a % LINE) as usize],
                None => self.frame(a)[(a & 0xfff) as usize],
            };
        }
    }

    pub fn cpu_write(&mut self, pa: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = pa + i as u64;
            if self.coherent() {
                self.frame(a)[(a & 0xfff) as usize] = b;
            } else {
                let line = a & !(LINE - 1);
                if !self.cache.contains_key(&line) {
                    let mut l = [0u8; 64];
                    let f = self.frame(line);
                    let off = (line & 0xfff) as usize;
                    l.copy_from_slice(&f[off..off + 64]);
                    self.cache.insert(line, l);
                }
                self.cache.get_mut(&line).unwrap()[(a % LINE) as usize] = b;
            }
        }
    }

    pub fn writeback(&mut self, pa: u64, len: u64) {
        let mut line = pa & !(LINE - 1);
        while line < pa + len {
            if let Some(l) = self.cache.remove(&line) {
                let off = (line & 0xfff) as usize;
                self.frame(line)[off..off + 64].copy_from_slice(&l);
            }
            line += LINE;
        }
    }

    // ---- registers ----------------------------------------------------------

    fn reg_read(&mut self, off: usize, wide: bool) -> u64 {
        let fro = self.fro();
        let nfr = self.frcd.len();
        let iro = self.iro();
        let v = match off & !7 {
            0x00 => 0x10,
            0x08 => self.cap,
            0x10 => self.ecap,
            0x18 => u64::from(self.gsts) << 32,
            0x20 => self.rtaddr,
            0x28 => self.ccmd,
            0x30 => u64::from(self.fsts_value()) << 32,
            0x38 => u64::from(self.fectl) | u64::from(self.fedata) << 32,
            0x40 => u64::from(self.feaddr) | u64::from(self.feuaddr) << 32,
            0x80 => self.iqh << 4,
            0x88 => self.iqt << 4,
            0x90 => self.iqa,
            0x98 => u64::from(self.ics) << 32,
            o if o == iro => self.iva,
            o if o == iro + 8 => self.iotlb_reg,
            o if o >= fro && o < fro + 16 * nfr => {
                let r = &self.frcd[(o - fro) / 16];
                r[((o - fro) % 16) / 8]
            }
            _ => 0,
        };
        if wide {
            v
        } else if off % 8 == 4 {
            v >> 32
        } else {
            v & 0xffff_ffff
        }
    }

    pub fn fsts_value_for_test(&self) -> u32 {
        self.fsts_value()
    }

    fn fsts_value(&self) -> u32 {
        let pending = self.frcd.iter().any(|r| r[1] >> 63 != 0);
        let mut v = self.fsts & !(0xff02);
        if pending {
            v |= 2 | (self.fri as u32) << 8;
        }
        v
    }

    fn write32(&mut self, off: usize, v: u32) {
        let fro = self.fro();
        let nfr = self.frcd.len();
        match off {
            0x18 => self.gcmd(v),
            0x34 => self.fsts &= !(v & 0x7d),
            0x38 => self.fectl = v & (1 << 31),
            0x3c => self.fedata = v,
            0x40 => self.feaddr = v,
            0x44 => self.feuaddr = v,
            0x9c => self.ics &= !(v & 1),
            o if o >= fro && o < fro + 16 * nfr && (o - fro) % 16 == 12 => {
                if v & (1 << 31) != 0 {
                    self.frcd[(o - fro) / 16][1] &= !(1 << 63);
                }
            }
            o => {
                // 32-bit halves of 64-bit registers.
                let base = o & !7;
                let cur = self.reg_read(base, true);
                let new = if o % 8 == 4 {
                    (cur & 0xffff_ffff) | u64::from(v) << 32
                } else {
                    (cur & !0xffff_ffff) | u64::from(v)
                };
                self.write64(base, new);
            }
        }
    }

    fn write64(&mut self, off: usize, v: u64) {
        let iro = self.iro();
        let fro = self.fro();
        let nfr = self.frcd.len();
        match off {
            0x20 => self.rtaddr = v,
            0x28 => {
                if self.gsts & (1 << 26) != 0 {
                    // Ignored with QI on: ICC stays set, the driver would time out.
                    self.ccmd = v;
                    return;
                }
                let g = ((v >> 61) & 3) as u8;
                self.cc_invalidate(g, v as u16, (v >> 16) as u16, false);
                self.ccmd = (v & !(1 << 63)) | u64::from(g) << 59;
            }
            0x88 => {
                self.iqt = (v >> 4) & 0x7fff;
                self.process_queue();
            }
            0x90 => self.iqa = v,
            o if o == iro => self.iva = v,
            o if o == iro + 8 => {
                if self.gsts & (1 << 26) != 0 {
                    self.iotlb_reg = v;
                    return;
                }
                let g = ((v >> 60) & 3) as u8;
                let did = (v >> 32) as u16;
                self.iotlb_invalidate(g, did, self.iva & !0xfff, (self.iva & 0x3f) as u8, false);
                self.iotlb_reg = (v & !(1 << 63)) | u64::from(g) << 57;
            }
            o if o >= fro && o < fro + 16 * nfr && (o - fro) % 16 == 8 && v >> 63 != 0 => {
                self.frcd[(o - fro) / 16][1] &= !(1 << 63);
            }
            _ => {}
        }
    }

    fn gcmd(&mut self, v: u32) {
        self.gcmd_writes += 1;
        self.events.push(Event::Gcmd(v));
        let keep = self.gsts & self.stuck;
        // Persistent enables follow the written value.
        for bit in [31u32, 26, 25, 28, 23] {
            let m = 1 << bit;
            if bit == 26 && v & m != 0 && self.gsts & m == 0 {
                self.iqh = 0;
            }
            self.gsts = (self.gsts & !m) | (v & m);
        }
        if v & (1 << 30) != 0 {
            self.root = Some(self.rtaddr & !0xfff);
            self.gsts |= 1 << 30;
            // QEMU resets its caches on SRTP.
            self.ctx_cache.clear();
            self.iotlb.clear();
            self.events.push(Event::Srtp);
        }
        if v & (1 << 27) != 0 {
            self.events.push(Event::Wbf);
        }
        self.gsts = (self.gsts & !self.stuck) | keep;
    }

    fn process_queue(&mut self) {
        if self.gsts & (1 << 26) == 0 || self.fsts & (1 << 4) != 0 {
            return;
        }
        let base = self.iqa & !0xfff;
        let entries = 256u64 << (self.iqa & 7);
        while self.iqh != self.iqt {
            let slot = base + self.iqh * 16;
            let lo = self.hw_read_u64(slot);
            let hi = self.hw_read_u64(slot + 8);
            let ok = match lo & 0xf {
                1 => {
                    let g = ((lo >> 4) & 3) as u8;
                    g != 0 && {
                        self.cc_invalidate(g, (lo >> 16) as u16, (lo >> 32) as u16, true);
                        true
                    }
                }
                2 => {
                    let g = ((lo >> 4) & 3) as u8;
                    let am = (hi & 0x3f) as u8;
                    let mamv = ((self.cap >> 48) & 0x3f) as u8;
                    let addr = hi & !0xfff;
                    let aligned = addr & ((0x1000u64 << am) - 1) == 0;
                    !self.reject_iotlb && (g != 0 && (g != 3 || (am <= mamv && aligned))) && {
                        self.iotlb_invalidate(g, (lo >> 16) as u16, addr, am, true);
                        true
                    }
                }
                5 => {
                    let sw = lo & (1 << 5) != 0;
                    let iflag = lo & (1 << 4) != 0;
                    assert!(
                        !(sw && iflag),
                        "wait descriptor with SW and IF: QEMU 7.2 asserts"
                    );
                    if self.drop_waits {
                        return;
                    }
                    if sw {
                        let data = (lo >> 32) as u32;
                        let addr = hi & !3;
                        self.hw_write(addr, &data.to_le_bytes());
                        self.events.push(Event::Wait { data, addr });
                    }
                    if iflag {
                        self.ics |= 1;
                    }
                    true
                }
                _ => false,
            };
            if !ok {
                self.fsts |= 1 << 4; // IQE; IQH stays at the bad descriptor
                return;
            }
            self.iqh = (self.iqh + 1) % entries;
        }
    }

    fn cc_invalidate(&mut self, g: u8, did: u16, sid: u16, queued: bool) {
        self.events.push(Event::Cc {
            g,
            did,
            sid,
            queued,
        });
        match g {
            1 => self.ctx_cache.clear(),
            2 => self.ctx_cache.retain(|_, e| e.did != did),
            3 => {
                self.ctx_cache.remove(&sid);
            }
            _ => {}
        }
    }

    pub fn iotlb_invalidate(&mut self, g: u8, did: u16, addr: u64, am: u8, queued: bool) {
        self.events.push(Event::Iotlb {
            g,
            did,
            addr,
            am,
            queued,
        });
        match g {
            1 => self.iotlb.clear(),
            2 => self.iotlb.retain(|_, e| e.did != did),
            3 => {
                let end = addr + (0x1000u64 << am);
                self.iotlb
                    .retain(|&(_, base), e| !(e.did == did && base < end && base + e.size > addr));
            }
            _ => {}
        }
    }

    // ---- DMA ----------------------------------------------------------------

    fn record_fault(&mut self, sid: u16, addr: u64, reason: u8, write: bool) {
        let n = self.next_frcd;
        if self.frcd[n][1] >> 63 != 0 {
            self.fsts |= 1; // PFO: dropped
            return;
        }
        if self
            .frcd
            .iter()
            .any(|r| r[1] >> 63 != 0 && r[1] as u16 == sid)
        {
            return; // collapsed with a pending fault of the same source
        }
        if self.frcd.iter().all(|r| r[1] >> 63 == 0) {
            self.fri = n;
        }
        let t = if write { 0 } else { 1u64 << 62 };
        self.frcd[n] = [
            addr & !0xfff,
            u64::from(sid) | u64::from(reason) << 32 | t | 1 << 63,
        ];
        self.next_frcd = (n + 1) % self.frcd.len();
    }

    fn context(&mut self, sid: u16) -> Result<CtxEntry, u8> {
        if let Some(e) = self.ctx_cache.get(&sid) {
            return Ok(*e);
        }
        let root = self.root.ok_or(1u8)?;
        let re = self.hw_read_u64(root + u64::from(sid >> 8) * 16);
        if re & 1 == 0 {
            return Err(1);
        }
        let slot = (re & !0xfff) + u64::from(sid & 0xff) * 16;
        let lo = self.hw_read_u64(slot);
        let hi = self.hw_read_u64(slot + 8);
        if lo & 1 == 0 {
            return Err(2);
        }
        let tt = (lo >> 2) & 3;
        let aw = (hi & 7) as u8;
        let levels = aw + 2;
        let sagaw = ((self.cap >> 8) & 0x1f) as u8;
        if (tt == 2 && self.ecap & (1 << 6) == 0) || tt == 1 || tt == 3 {
            return Err(3);
        }
        if tt == 0 && sagaw & (1 << aw) == 0 {
            return Err(3);
        }
        if lo & 0xff0 != 0 || hi & 0xffff_ffff_ff00_0080 != 0 {
            return Err(0xb);
        }
        let e = CtxEntry {
            did: (hi >> 8) as u16,
            slptptr: lo & !0xfff,
            levels,
            pass_through: tt == 2,
        };
        self.ctx_cache.insert(sid, e);
        Ok(e)
    }

    fn walk(&mut self, ctx: CtxEntry, iova: u64, write: bool) -> Result<TlbEntry, u8> {
        let denied = if write { 5 } else { 6 };
        let mut table = ctx.slptptr;
        let sllps = ((self.cap >> 34) & 0xf) as u8;
        let sc = self.ecap & (1 << 7) != 0;
        let (mut r, mut w) = (true, true);
        for level in (1..=ctx.levels).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let e = self.hw_read_u64(table + ((iova >> shift) & 511) * 8);
            if e & 3 == 0 {
                return Err(denied);
            }
            let ps = e & (1 << 7) != 0;
            let leaf = level == 1 || ps;
            // Reserved bits: PS at levels 4/5 or for a size SLLPS lacks; SNP without
            // SC or in a non-leaf entry; address bits above the MGAW.
            let bad_ps = ps
                && (level > 3 || (level == 3 && sllps & 2 == 0) || (level == 2 && sllps & 1 == 0));
            let bad_snp = e & (1 << 11) != 0 && (!sc || !leaf);
            let bad_addr = (e & 0x000f_ffff_ffff_f000) >> self.mgaw() != 0;
            if bad_ps || bad_snp || bad_addr {
                return Err(0xc);
            }
            r &= e & 1 != 0;
            w &= e & 2 != 0;
            if leaf {
                let size = 1u64 << shift;
                return Ok(TlbEntry {
                    did: ctx.did,
                    pa: Some(e & 0x000f_ffff_ffff_f000 & !(size - 1)),
                    size,
                    read: r,
                    write: w,
                });
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        Err(denied)
    }

    /// A DMA of `buf.len()` bytes (within one page) by `sid` at `iova`: reads fill
    /// `buf`, writes store it. Returns the host address or the fault reason (the
    /// fault is recorded).
    pub fn dma(&mut self, sid: u16, iova: u64, write: bool, buf: &mut [u8]) -> Result<u64, u8> {
        let r = self.translate(sid, iova, write);
        match r {
            Ok(hpa) => {
                if write {
                    self.hw_write(hpa, buf);
                } else {
                    self.hw_read(hpa, buf);
                }
                Ok(hpa)
            }
            Err(reason) => {
                self.record_fault(sid, iova, reason, write);
                Err(reason)
            }
        }
    }

    fn translate(&mut self, sid: u16, iova: u64, write: bool) -> Result<u64, u8> {
        if self.gsts & (1 << 31) == 0 {
            return Ok(iova);
        }
        let ctx = self.context(sid)?;
        if ctx.pass_through {
            return Ok(iova);
        }
        let width = (12 + 9 * u32::from(ctx.levels)).min(self.mgaw());
        if iova >> width != 0 {
            return Err(4);
        }
        for size in [1u64 << 12, 1 << 21, 1 << 30] {
            if let Some(e) = self.iotlb.get(&(sid, iova & !(size - 1))) {
                if e.size != size || e.did != ctx.did {
                    continue;
                }
                let Some(pa) = e.pa else {
                    return Err(if write { 5 } else { 6 });
                };
                if (write && !e.write) || (!write && !e.read) {
                    return Err(if write { 5 } else { 6 });
                }
                return Ok(pa | (iova & (size - 1)));
            }
        }
        match self.walk(ctx, iova, write) {
            Ok(e) => {
                let pa = e.pa.unwrap();
                self.iotlb.insert((sid, iova & !(e.size - 1)), e);
                if (write && !e.write) || (!write && !e.read) {
                    return Err(if write { 5 } else { 6 });
                }
                Ok(pa | (iova & (e.size - 1)))
            }
            Err(reason) => {
                if self.cm() && (reason == 5 || reason == 6) {
                    self.iotlb.insert(
                        (sid, iova & !0xfff),
                        TlbEntry {
                            did: ctx.did,
                            pa: None,
                            size: 4096,
                            read: false,
                            write: false,
                        },
                    );
                }
                Err(reason)
            }
        }
    }

    /// Events of one kind since index `from`.
    pub fn iotlb_events(&self, from: usize) -> Vec<Event> {
        self.events[from..]
            .iter()
            .filter(|e| matches!(e, Event::Iotlb { .. }))
            .copied()
            .collect()
    }

    pub fn waits(&self, from: usize) -> usize {
        self.events[from..]
            .iter()
            .filter(|e| matches!(e, Event::Wait { .. }))
            .count()
    }
}

/// The unit's registers.
pub struct SimRegs(pub Shared);

impl Mmio for SimRegs {
    fn read32(&self, off: usize) -> u32 {
        assert_eq!(off % 4, 0);
        self.0.borrow_mut().reg_read(off, false) as u32
    }
    fn write32(&mut self, off: usize, value: u32) {
        assert_eq!(off % 4, 0);
        self.0.borrow_mut().write32(off, value);
    }
    fn read64(&self, off: usize) -> u64 {
        assert_eq!(off % 8, 0);
        assert!(
            !is_32bit_only(off),
            "64-bit read of 32-bit register {off:#x}: QEMU aborts"
        );
        self.0.borrow_mut().reg_read(off, true)
    }
    fn write64(&mut self, off: usize, value: u64) {
        assert_eq!(off % 8, 0);
        assert!(
            !is_32bit_only(off),
            "64-bit write of 32-bit register {off:#x}: QEMU aborts"
        );
        self.0.borrow_mut().write64(off, value);
    }
}

/// Table memory: frames from a simple allocator, CPU view.
pub struct SimMem(pub Shared);

impl PhysMem for SimMem {
    fn read(&self, pa: u64) -> u64 {
        assert_eq!(pa % 8, 0);
        let mut b = [0; 8];
        self.0.borrow_mut().cpu_read(pa, &mut b);
        u64::from_le_bytes(b)
    }
    fn write(&mut self, pa: u64, value: u64) {
        assert_eq!(pa % 8, 0);
        let mut s = self.0.borrow_mut();
        assert!(
            s.table_frames.contains(&(pa & !0xfff)),
            "write to {pa:#x} outside an allocated frame"
        );
        s.cpu_write(pa, &value.to_le_bytes());
    }
    fn alloc_table(&mut self) -> Option<u64> {
        let mut s = self.0.borrow_mut();
        if s.alloc_limit.is_some_and(|l| s.table_frames.len() >= l) {
            return None;
        }
        let pa = match s.free_frames.pop() {
            Some(pa) => pa,
            None => {
                let pa = s.next_frame;
                s.next_frame += 0x1000;
                pa
            }
        };
        // Zeroed by the CPU (stays in the cache on a non-coherent unit until flushed).
        s.cpu_write(pa, &[0; 4096]);
        s.table_frames.insert(pa);
        Some(pa)
    }
    fn free_table(&mut self, pa: u64) {
        let mut s = self.0.borrow_mut();
        assert!(
            s.table_frames.remove(&pa),
            "double free or foreign frame {pa:#x}"
        );
        // Poison: a unit still walking a freed table sees garbage.
        s.cpu_write(pa, &[0xff; 4096]);
        s.writeback(pa, 4096);
        s.free_frames.push(pa);
    }
}

/// Cache flushes, the status dword and a clock that moves on every poll.
pub struct SimHost(pub Shared);

impl Platform for SimHost {
    fn flush_cache(&mut self, pa: u64, len: u64) {
        self.0.borrow_mut().writeback(pa, len);
    }
    fn read_u32(&self, pa: u64) -> u32 {
        let mut b = [0; 4];
        self.0.borrow_mut().cpu_read(pa, &mut b);
        u32::from_le_bytes(b)
    }
    fn write_u32(&mut self, pa: u64, value: u32) {
        self.0.borrow_mut().cpu_write(pa, &value.to_le_bytes());
    }
    fn now_us(&self) -> u64 {
        self.0.borrow().clock_us
    }
    fn relax(&mut self) {
        self.0.borrow_mut().clock_us += 1;
    }
}

pub type SimUnit = crate::unit::Unit<SimRegs, SimMem, SimHost>;

/// Counts the frames the sim's table allocator has handed out and not got back.
pub fn live_frames(sim: &Shared) -> usize {
    sim.borrow().table_frames.len()
}
