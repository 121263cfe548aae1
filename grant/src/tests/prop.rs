//! Property tests: random sequences of grant operations by three domains against a
//! small reference model, and arbitrary hypercall bytes.

use std::collections::{BTreeMap, HashMap};

use abi::event_channel::DOMID_SELF;
use abi::grant_table::*;
use proptest::prelude::*;

use super::*;
use crate::{status_code, DomainConfig, GntSt, GrantEngine};

const DOMS: [DomId; 3] = [1, 2, 3];
/// Refs the ops use: some valid from the start, some only after growth, some never.
const REFS: [u32; 8] = [0, 1, 2, 9, 255, 511, 512, 700];
const MAX_FRAMES: u32 = 3;
const RW: u16 = GTF_READING | GTF_WRITING;

#[derive(Clone, Debug)]
struct Side {
    /// Pick one of the entries granted to the copier (when there is one).
    steer: Option<u8>,
    gref: bool,
    dom: u8,
    idx: u8,
    off: u8,
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        g: u8,
        r: u8,
        to: u8,
        gfn: u8,
        ro: bool,
    },
    Revoke {
        g: u8,
        r: u8,
    },
    /// Hostile rewrite of an entry (type, readonly, cache and sub-page bits, domid,
    /// frame), leaving only the hypervisor-owned reading/writing bits alone.
    Rewrite {
        g: u8,
        r: u8,
        to: u8,
        gfn: u8,
        flags: u16,
    },
    /// `steer`: map one of the entries granted to `m` (when there is one).
    Map {
        m: u8,
        g: u8,
        r: u8,
        ro: bool,
        kind: u8,
        steer: Option<u8>,
    },
    Unmap {
        m: u8,
        sel: u8,
        raw: bool,
        zero: bool,
    },
    Copy {
        m: u8,
        src: Side,
        dst: Side,
        len: u8,
    },
    Setup {
        d: u8,
        nr: u8,
    },
    Destroy {
        d: u8,
    },
}

/// Mostly the first three refs (so grants, maps and copies meet), sometimes any.
fn ref_idx() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 0..3u8, 1 => 0..8u8]
}

/// Mostly RAM, sometimes beyond it.
fn gfn() -> impl Strategy<Value = u8> {
    prop_oneof![9 => 0..RAM_FRAMES as u8, 1 => 0..70u8]
}

/// Mostly a real domain (index 0..3), sometimes a missing one.
fn dom_idx() -> impl Strategy<Value = u8> {
    prop_oneof![9 => 0..3u8, 1 => 0..4u8]
}

fn side() -> impl Strategy<Value = Side> {
    let dom = prop_oneof![8 => 0..4u8, 1 => 0..5u8];
    let idx = prop_oneof![3 => ref_idx(), 2 => gfn()];
    let off = prop_oneof![4 => 0..2u8, 1 => 0..4u8];
    let steer = proptest::option::weighted(0.6, any::<u8>());
    (steer, proptest::bool::weighted(0.7), dom, idx, off).prop_map(
        |(steer, gref, dom, idx, off)| Side {
            steer,
            gref,
            dom,
            idx,
            off,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let flag_bits =
        (0..4u16, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(ty, ro, pwt, sub)| {
            ty | if ro { GTF_READONLY } else { 0 }
                | if pwt { GTF_PWT } else { 0 }
                | if sub { GTF_SUB_PAGE } else { 0 }
        });
    prop_oneof![
        6 => (0..3u8, ref_idx(), dom_idx(), gfn(), proptest::bool::weighted(0.3))
            .prop_map(|(g, r, to, gfn, ro)| Op::Grant { g, r, to, gfn, ro }),
        1 => (0..3u8, ref_idx()).prop_map(|(g, r)| Op::Revoke { g, r }),
        1 => (0..3u8, ref_idx(), dom_idx(), gfn(), flag_bits)
            .prop_map(|(g, r, to, gfn, flags)| Op::Rewrite { g, r, to, gfn, flags }),
        10 => (
            0..3u8,
            dom_idx(),
            ref_idx(),
            any::<bool>(),
            prop_oneof![8 => 0..3u8, 1 => 0..6u8],
            proptest::option::weighted(0.7, any::<u8>()),
        )
            .prop_map(|(m, g, r, ro, kind, steer)| Op::Map { m, g, r, ro, kind, steer }),
        5 => (0..3u8, any::<u8>(), proptest::bool::weighted(0.1), proptest::bool::weighted(0.1))
            .prop_map(|(m, sel, raw, zero)| Op::Unmap { m, sel, raw, zero }),
        5 => (0..3u8, side(), side(), prop_oneof![4 => 1..5u8, 1 => 0..6u8])
            .prop_map(|(m, src, dst, len)| Op::Copy { m, src, dst, len }),
        1 => (0..3u8, 0..5u8).prop_map(|(d, nr)| Op::Setup { d, nr }),
        1 => (0..3u8).prop_map(|d| Op::Destroy { d }),
    ]
}

#[derive(Clone, Copy, Debug, Default)]
struct MEntry {
    flags: u16,
    domid: DomId,
    gfn: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct MPin {
    hr: u32,
    hw: u32,
    domid: DomId,
    gfn: u64,
}

impl MPin {
    fn any(&self) -> bool {
        self.hr + self.hw > 0
    }
}

#[derive(Clone, Debug)]
struct MDom {
    live: bool,
    nr_frames: u32,
    entries: HashMap<u32, MEntry>,
}

#[derive(Clone, Copy, Debug)]
struct MHandle {
    g: DomId,
    r: u32,
    ro: bool,
    addr: u64,
}

struct Model {
    version: u32,
    doms: BTreeMap<DomId, MDom>,
    pins: HashMap<(DomId, u32), MPin>,
    handles: BTreeMap<(DomId, u32), MHandle>,
}

impl Model {
    /// The `sel`-th entry (of a live granter, in range) that names `m`.
    fn granted_to(&self, m: DomId, sel: u8) -> Option<(DomId, u32)> {
        let mut c: Vec<(DomId, u32)> = Vec::new();
        for (g, d) in &self.doms {
            if !d.live {
                continue;
            }
            for (r, e) in &d.entries {
                if e.domid == m && *r < self.nr_entries(*g) {
                    c.push((*g, *r));
                }
            }
        }
        c.sort();
        (!c.is_empty()).then(|| c[sel as usize % c.len()])
    }

    fn live(&self, d: DomId) -> bool {
        self.doms.get(&d).is_some_and(|x| x.live)
    }
    fn nr_entries(&self, d: DomId) -> u32 {
        let per = if self.version == 1 { 512 } else { 256 };
        self.doms.get(&d).map_or(0, |x| x.nr_frames * per)
    }
    fn entry(&self, d: DomId, r: u32) -> MEntry {
        self.doms[&d].entries.get(&r).copied().unwrap_or_default()
    }

    fn map(&self, m: DomId, g: DomId, r: u32, flags: u32) -> Result<MPin, GntSt> {
        let ro = flags & GNTMAP_READONLY != 0;
        if flags & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
            return Err(GntSt::BadGntref);
        }
        if flags & GNTMAP_DEVICE_MAP != 0 {
            return Err(GntSt::GeneralError);
        }
        if !self.live(g) {
            return Err(GntSt::BadDomain);
        }
        if r >= self.nr_entries(g) {
            return Err(GntSt::BadGntref);
        }
        let mut p = self.pins.get(&(g, r)).copied().unwrap_or_default();
        let cnt = if ro { p.hr } else { p.hw };
        if p.any() && (p.domid != m || cnt >= 128) {
            return Err(GntSt::GeneralError);
        }
        let e = self.entry(g, r);
        if !p.any() || (!ro && p.hw == 0) {
            let mask = GTF_TYPE_MASK | GTF_SUB_PAGE;
            if !p.any() && (e.flags & mask != GTF_PERMIT_ACCESS || e.domid != m) {
                return Err(GntSt::GeneralError);
            }
            if !ro && e.flags & GTF_READONLY != 0 {
                return Err(GntSt::GeneralError);
            }
            if !p.any() {
                if e.gfn >= RAM_FRAMES {
                    return Err(GntSt::BadPage);
                }
                p.domid = m;
                p.gfn = e.gfn;
            }
        }
        // Translated mapper: cache attributes (read now) and unknown flags refused.
        if e.flags & (GTF_PAT | GTF_PCD | GTF_PWT) != 0
            || flags & !GNTMAP_READONLY != GNTMAP_HOST_MAP
        {
            return Err(GntSt::GeneralError);
        }
        if ro {
            p.hr += 1;
        } else {
            p.hw += 1;
        }
        Ok(p)
    }

    /// (region start, region length, gfn) of an acquired grant; `pins` includes any
    /// transient pin of the other side of the same copy.
    fn acquire(
        &self,
        pins: &HashMap<(DomId, u32), MPin>,
        g: DomId,
        r: u32,
        ldom: DomId,
        ro: bool,
    ) -> Result<(u32, u32, u64, MPin), GntSt> {
        if r >= self.nr_entries(g) {
            return Err(GntSt::BadGntref);
        }
        let mut p = pins.get(&(g, r)).copied().unwrap_or_default();
        let cnt = if ro { p.hr } else { p.hw };
        if p.any() && (p.domid != ldom || cnt >= 128) {
            return Err(GntSt::GeneralError);
        }
        let e = self.entry(g, r);
        if self.version == 2 && e.flags & GTF_TYPE_MASK == GTF_TRANSITIVE {
            // trans_domid is always 0 here: no such domain.
            return Err(GntSt::GeneralError);
        }
        let mut region = (0, 4096);
        if !p.any() || (!ro && p.hw == 0) {
            if !p.any() && (e.flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || e.domid != ldom) {
                return Err(GntSt::GeneralError);
            }
            if !ro && e.flags & GTF_READONLY != 0 {
                return Err(GntSt::GeneralError);
            }
            if e.gfn >= RAM_FRAMES {
                return Err(GntSt::BadPage);
            }
            let sub = self.version == 2 && e.flags & GTF_SUB_PAGE != 0;
            if !p.any() {
                p.domid = ldom;
                p.gfn = e.gfn;
                if sub {
                    region = (0, 0);
                }
            } else if p.gfn != e.gfn {
                return Err(GntSt::GeneralError);
            }
        }
        if ro {
            p.hr += 1;
        } else {
            p.hw += 1;
        }
        Ok((region.0, region.1, p.gfn, p))
    }
}

fn dom_of(i: u8) -> DomId {
    [1, 2, 3, 9][(i % 4) as usize]
}

fn check_invariants(e: &GrantEngine, h: &FakeHost, model: &Model) {
    for d in [1u16, 2, 3] {
        assert_eq!(
            e.table(d).is_some(),
            model.doms.contains_key(&d),
            "d{d} existence"
        );
        if let Some(md) = model.doms.get(&d) {
            assert_eq!(e.is_dying(d), Some(!md.live));
            assert_eq!(e.table(d).unwrap().nr_frames(), md.nr_frames);
            for r in REFS {
                if r >= model.nr_entries(d) {
                    continue;
                }
                let p = model.pins.get(&(d, r)).copied().unwrap_or_default();
                let want =
                    if p.any() { GTF_READING } else { 0 } | if p.hw > 0 { GTF_WRITING } else { 0 };
                assert_eq!(rw_bits(e, h, d, r), want, "d{d} ref {r} flags vs pins");
                let ep = e.pins(d, r).unwrap();
                assert_eq!(
                    (u32::from(ep.host_read), u32::from(ep.host_write)),
                    (p.hr, p.hw),
                    "d{d} ref {r} pins"
                );
                assert_eq!((ep.dev_read, ep.dev_write), (0, 0));
                if model.version == 1 {
                    assert_eq!(flags(e, h, d, r) & !RW, model.entry(d, r).flags & !RW);
                }
            }
        }
        let held = model.handles.keys().filter(|(m, _)| *m == d).count() as u32;
        if model.live(d) {
            assert_eq!(
                e.domain_counters(d).unwrap().live_mappings,
                held,
                "d{d} live mappings"
            );
        } else {
            assert_eq!(held, 0);
        }
    }
}

fn run(ops: Vec<Op>, version: u32) {
    let cfg = DomainConfig {
        max_grant_frames: MAX_FRAMES,
        ..DomainConfig::default()
    };
    let (mut e, mut h) = setup(&DOMS, cfg);
    let mut model = Model {
        version,
        doms: DOMS
            .iter()
            .map(|d| {
                (
                    *d,
                    MDom {
                        live: true,
                        nr_frames: 1,
                        entries: HashMap::new(),
                    },
                )
            })
            .collect(),
        pins: HashMap::new(),
        handles: BTreeMap::new(),
    };
    for d in DOMS {
        assert_eq!(e.set_version(d, version, &mut h).ret, 0);
    }
    let mut next_addr = 0x1_0000_0000u64;
    for op in ops {
        match op {
            Op::Grant { g, r, .. } | Op::Rewrite { g, r, .. }
                if !model.live(DOMS[g as usize])
                    || REFS[r as usize] >= model.nr_entries(DOMS[g as usize]) => {}
            Op::Grant { g, r, to, gfn, ro } => {
                let (g, r, to) = (DOMS[g as usize], REFS[r as usize], dom_of(to));
                grant(&e, &mut h, g, r, to, u64::from(gfn), ro);
                let ent = MEntry {
                    flags: GTF_PERMIT_ACCESS | if ro { GTF_READONLY } else { 0 },
                    domid: to,
                    gfn: u64::from(gfn),
                };
                model.doms.get_mut(&g).unwrap().entries.insert(r, ent);
            }
            Op::Rewrite {
                g,
                r,
                to,
                gfn,
                flags: fl,
            } => {
                let (g, r, to) = (DOMS[g as usize], REFS[r as usize], dom_of(to));
                let t = e.table(g).unwrap();
                let fl = fl & !RW;
                if version == 1 {
                    let (m, o) = (
                        t.shared_frames()[(r / 512) as usize],
                        (r % 512) as usize * 8,
                    );
                    let cur = h.mem.get_u16(m, o) & RW;
                    h.mem.write(m, o, &(fl | cur).to_le_bytes());
                    h.mem.write(m, o + 2, &to.to_le_bytes());
                    h.mem.write(m, o + 4, &u32::from(gfn).to_le_bytes());
                } else {
                    let (m, o) = (
                        t.shared_frames()[(r / 256) as usize],
                        (r % 256) as usize * 16,
                    );
                    h.mem.write(m, o, &fl.to_le_bytes());
                    h.mem.write(m, o + 2, &to.to_le_bytes());
                    h.mem.write(m, o + 8, &u64::from(gfn).to_le_bytes());
                }
                let ent = MEntry {
                    flags: fl,
                    domid: to,
                    gfn: u64::from(gfn),
                };
                model.doms.get_mut(&g).unwrap().entries.insert(r, ent);
            }
            Op::Revoke { g, r } => {
                let (g, r) = (DOMS[g as usize], REFS[r as usize]);
                if !model.live(g) || r >= model.nr_entries(g) {
                    continue;
                }
                let t = e.table(g).unwrap();
                let busy = model.pins.get(&(g, r)).is_some_and(|p| p.any());
                let (sf, st) = (t.shared_frames().to_vec(), t.status_frames().to_vec());
                if version == 1 {
                    let ended = guest::end_access_v1(&mut h, &sf, r).unwrap();
                    assert_eq!(ended, !busy);
                    if ended {
                        model
                            .doms
                            .get_mut(&g)
                            .unwrap()
                            .entries
                            .entry(r)
                            .or_default()
                            .flags = 0;
                    }
                } else {
                    let ended = guest::end_access_v2(&mut h, &sf, &st, r).unwrap();
                    assert_eq!(ended, !busy);
                    model
                        .doms
                        .get_mut(&g)
                        .unwrap()
                        .entries
                        .entry(r)
                        .or_default()
                        .flags = 0;
                }
            }
            Op::Map {
                m,
                g,
                r,
                ro,
                kind,
                steer,
            } => {
                let (m, g, r) = (DOMS[m as usize], dom_of(g), REFS[r as usize]);
                if !model.live(m) {
                    continue;
                }
                let (g, r) = steer
                    .and_then(|sel| model.granted_to(m, sel))
                    .unwrap_or((g, r));
                let ro_bit = if ro { GNTMAP_READONLY } else { 0 };
                let flags = match kind {
                    0..=2 => GNTMAP_HOST_MAP | ro_bit,
                    3 => GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP | ro_bit,
                    4 => ro_bit,
                    _ => GNTMAP_HOST_MAP | ro_bit | 1 << 20,
                };
                next_addr += 0x1000;
                let req = crate::MapRequest {
                    host_addr: next_addr,
                    flags,
                    gref: r,
                    dom: g,
                };
                let want = model.map(m, g, r, flags);
                let got = e.map(m, &req, &mut h);
                assert_eq!(
                    got.map(|_| ()),
                    want.map(|_| ()),
                    "map d{m} -> d{g} ref {r} {flags:#x}"
                );
                if let (Ok(o), Ok(p)) = (got, want) {
                    assert_eq!(o.mfn, ram_mfn(g, p.gfn));
                    model.pins.insert((g, r), p);
                    let prev = model.handles.insert(
                        (m, o.handle),
                        MHandle {
                            g,
                            r,
                            ro,
                            addr: next_addr,
                        },
                    );
                    assert!(prev.is_none(), "handle {} handed out twice", o.handle);
                }
            }
            Op::Unmap { m, sel, raw, zero } => {
                let m = DOMS[m as usize];
                if !model.live(m) {
                    continue;
                }
                let mine: Vec<(u32, MHandle)> = model
                    .handles
                    .iter()
                    .filter(|((d, _), _)| *d == m)
                    .map(|((_, hd), x)| (*hd, *x))
                    .collect();
                let (handle, addr) = if raw || mine.is_empty() {
                    (u32::from(sel) * 7 + 3, 0x1234_5000)
                } else {
                    let (hd, x) = mine[sel as usize % mine.len()];
                    (hd, x.addr)
                };
                let addr = if zero { 0 } else { addr };
                let want = match model.handles.get(&(m, handle)) {
                    None => Err(GntSt::BadHandle),
                    Some(x) if addr != x.addr && addr != 0 => Err(GntSt::GeneralError),
                    Some(_) => Ok(()),
                };
                let got = unmap(&mut e, &mut h, m, handle, addr);
                assert_eq!(got, want, "unmap d{m} handle {handle}");
                if want.is_ok() && addr != 0 {
                    let x = model.handles.remove(&(m, handle)).unwrap();
                    let p = model.pins.get_mut(&(x.g, x.r)).unwrap();
                    if x.ro {
                        p.hr -= 1;
                    } else {
                        p.hw -= 1;
                    }
                    reap(&mut model);
                }
            }
            Op::Copy { m, src, dst, len } => {
                let m = DOMS[m as usize];
                if !model.live(m) {
                    continue;
                }
                let len = [0u16, 1, 96, 97, 4096, 4097][len as usize];
                let offs = [0u16, 100, 4000, 4095];
                let mk = |s: &Side| -> (bool, DomId, u64, u16) {
                    if let Some((g, r)) = s
                        .steer
                        .filter(|_| s.gref)
                        .and_then(|x| model.granted_to(m, x))
                    {
                        return (true, g, u64::from(r), offs[s.off as usize]);
                    }
                    let dom = if s.gref {
                        [1, 2, 3, DOMID_SELF, 9][(s.dom % 5) as usize]
                    } else {
                        // Frames: DOMID_SELF mostly, sometimes a numeric id (refused).
                        [DOMID_SELF, DOMID_SELF, DOMID_SELF, DOMID_SELF, m][(s.dom % 5) as usize]
                    };
                    let u = if s.gref {
                        u64::from(REFS[(s.idx % 8) as usize])
                    } else {
                        u64::from(s.idx)
                    };
                    (s.gref, dom, u, offs[s.off as usize])
                };
                let (s, d) = (mk(&src), mk(&dst));
                let op = GnttabCopy {
                    source_u: s.2,
                    source_domid: s.1,
                    source_offset: s.3,
                    dest_u: d.2,
                    dest_domid: d.1,
                    dest_offset: d.3,
                    len,
                    flags: if s.0 { GNTCOPY_SOURCE_GREF } else { 0 }
                        | if d.0 { GNTCOPY_DEST_GREF } else { 0 },
                    ..Default::default()
                };
                let want = model_copy(&model, m, s, d, len);
                let snapshot = match want {
                    Ok(Some((sm, _))) => Some(h.mem.read(sm, usize::from(s.3), usize::from(len))),
                    _ => None,
                };
                let got = e.copy(m, &op, &mut h);
                assert_eq!(got, want.map(|_| ()), "copy {op:?}");
                if let (Some(b), Ok(Some((_, dm)))) = (snapshot, want) {
                    assert_eq!(h.mem.read(dm, usize::from(d.3), usize::from(len)), b);
                }
            }
            Op::Setup { d, nr } => {
                let d = DOMS[d as usize];
                if !model.live(d) {
                    continue;
                }
                let nr = u32::from(nr);
                let got = e.setup_table(d, DOMID_SELF, nr, &mut h);
                if nr > MAX_FRAMES {
                    assert_eq!(got, Err(GntSt::GeneralError));
                } else {
                    assert_eq!(got.unwrap().len() as u32, nr);
                    let md = model.doms.get_mut(&d).unwrap();
                    md.nr_frames = md.nr_frames.max(nr);
                }
            }
            Op::Destroy { d } => {
                let d = DOMS[d as usize];
                if !model.live(d) {
                    continue;
                }
                let held: Vec<_> = model
                    .handles
                    .keys()
                    .filter(|(m, _)| *m == d)
                    .copied()
                    .collect();
                let rep = e.destroy_domain(d, &mut h).unwrap();
                assert_eq!(rep.mappings_released as usize, held.len());
                for k in held {
                    let x = model.handles.remove(&k).unwrap();
                    let p = model.pins.get_mut(&(x.g, x.r)).unwrap();
                    if x.ro {
                        p.hr -= 1;
                    } else {
                        p.hw -= 1;
                    }
                }
                model.doms.get_mut(&d).unwrap().live = false;
                reap(&mut model);
                // The hypervisor tears the dead domain's nested page tables down.
                h.host_maps.retain(|(dom, _), _| *dom != d);
            }
        }
        check_invariants(&e, &h, &model);
    }
    // Destroy everything: every frame comes back, nothing stays mapped.
    for d in DOMS {
        if model.live(d) {
            e.destroy_domain(d, &mut h).unwrap();
            h.host_maps.retain(|(dom, _), _| *dom != d);
        }
    }
    for d in DOMS {
        assert!(e.table(d).is_none());
    }
    assert!(h.allocated.is_empty(), "frames leaked: {:?}", h.allocated);
    assert!(h.host_maps.is_empty());
}

/// Drops pins that reached zero and dying domains nobody pins any more.
fn reap(model: &mut Model) {
    model.pins.retain(|_, p| p.any());
    let dead: Vec<DomId> = model
        .doms
        .iter()
        .filter(|(d, x)| !x.live && !model.pins.keys().any(|(g, _)| g == *d))
        .map(|(d, _)| *d)
        .collect();
    for d in dead {
        model.doms.remove(&d);
    }
}

/// Expected outcome of a copy; on success the (source, destination) machine frames
/// (`None` for a zero-length copy, which touches nothing).
fn model_copy(
    model: &Model,
    m: DomId,
    s: (bool, DomId, u64, u16),
    d: (bool, DomId, u64, u16),
    len: u16,
) -> Result<Option<(u64, u64)>, GntSt> {
    if len == 0 {
        return Ok(None);
    }
    let dom = |(gref, dom, _, _): (bool, DomId, u64, u16)| -> Result<DomId, GntSt> {
        if dom != DOMID_SELF && !gref {
            return Err(GntSt::PermissionDenied);
        }
        let x = if dom == DOMID_SELF { m } else { dom };
        if model.live(x) {
            Ok(x)
        } else {
            Err(GntSt::BadDomain)
        }
    };
    let sd = dom(s)?;
    let dd = dom(d)?;
    let mut pins = model.pins.clone();
    let src = if s.0 {
        let r = s.2 as u32;
        let (st, ln, gfn, p) = model.acquire(&pins, sd, r, m, true)?;
        pins.insert((sd, r), p);
        (st, ln, ram_mfn(sd, gfn))
    } else {
        if s.2 >= RAM_FRAMES {
            return Err(GntSt::BadPage);
        }
        (0, 4096, ram_mfn(sd, s.2))
    };
    let dst = if d.0 {
        let (st, ln, gfn, _) = model.acquire(&pins, dd, d.2 as u32, m, false)?;
        (st, ln, ram_mfn(dd, gfn))
    } else {
        if d.2 >= RAM_FRAMES {
            return Err(GntSt::BadPage);
        }
        (0, 4096, ram_mfn(dd, d.2))
    };
    let (len, so, doff) = (u32::from(len), u32::from(s.3), u32::from(d.3));
    if so + len > 4096 || doff + len > 4096 {
        return Err(GntSt::BadCopyArg);
    }
    if so < src.0 || so + len > src.0 + src.1 || doff < dst.0 || doff + len > dst.0 + dst.1 {
        return Err(GntSt::GeneralError);
    }
    Ok(Some((src.2, dst.2)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_match_the_model_v1(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, 1);
    }

    #[test]
    fn random_sequences_match_the_model_v2(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, 2);
    }
}

// ---------------------------------------------------------------- arbitrary hypercall bytes

#[derive(Clone, Debug)]
struct Call {
    ld: u8,
    cmd: u32,
    count: u32,
    args: Vec<u8>,
}

/// Plausible argument arrays for the common commands, built from seeds (small refs,
/// real domains, meaningful flags, handles that exist), so the fuzz also gets past the
/// first checks.
fn plausible(cmd: u32, seeds: &[[u8; 4]]) -> Vec<u8> {
    let dom = |x: u8| [1, 2, 3, DOMID_SELF, 9][usize::from(x % 5)];
    let mut out = Vec::new();
    for &[a, b, c, d] in seeds {
        match cmd {
            GNTTABOP_MAP_GRANT_REF => out.extend(
                GnttabMapGrantRef {
                    host_addr: 0x1000 * (u64::from(a % 4) + 1),
                    flags: [
                        GNTMAP_HOST_MAP,
                        GNTMAP_HOST_MAP | GNTMAP_READONLY,
                        GNTMAP_DEVICE_MAP,
                        0,
                    ][usize::from(b % 4)],
                    r#ref: u32::from(c % 5),
                    dom: dom(d),
                    ..Default::default()
                }
                .to_bytes(),
            ),
            GNTTABOP_UNMAP_GRANT_REF | GNTTABOP_UNMAP_AND_REPLACE => out.extend(
                GnttabUnmapGrantRef {
                    host_addr: if b % 8 == 0 {
                        0
                    } else {
                        0x1000 * (u64::from(a % 4) + 1)
                    },
                    dev_bus_addr: 0,
                    handle: u32::from(c % 4),
                    status: 0,
                }
                .to_bytes(),
            ),
            GNTTABOP_COPY => out.extend(
                GnttabCopy {
                    source_u: u64::from(a % 5),
                    source_domid: dom(b),
                    source_offset: [0, 100, 4000][usize::from(c % 3)],
                    dest_u: u64::from(b % 5),
                    dest_domid: dom(a),
                    dest_offset: [0, 2000, 4095][usize::from(d % 3)],
                    len: [0, 8, 97, 4096][usize::from(d % 4)],
                    flags: u16::from(c % 4),
                    ..Default::default()
                }
                .to_bytes(),
            ),
            GNTTABOP_SET_VERSION => out.extend(
                GnttabSetVersion {
                    version: u32::from(a % 4),
                }
                .to_bytes(),
            ),
            GNTTABOP_SETUP_TABLE => out.extend(
                GnttabSetupTable {
                    dom: dom(a),
                    nr_frames: u32::from(b % 6),
                    status: 0,
                    frame_list: 0x9000,
                }
                .to_bytes(),
            ),
            GNTTABOP_SWAP_GRANT_REF => out.extend(
                GnttabSwapGrantRef {
                    ref_a: u32::from(a % 6),
                    ref_b: u32::from(b % 6),
                    status: 0,
                }
                .to_bytes(),
            ),
            _ => out.extend([a, b, c, d]),
        }
    }
    out
}

fn call() -> impl Strategy<Value = Call> {
    let cmd = prop_oneof![
        4 => Just(GNTTABOP_MAP_GRANT_REF),
        3 => Just(GNTTABOP_UNMAP_GRANT_REF),
        3 => Just(GNTTABOP_COPY),
        4 => 0..13u32,
        1 => any::<u32>(),
    ];
    let count = prop_oneof![8 => 0..6u32, 1 => any::<u32>()];
    // Plausible arrays, arrays of small byte values, or anything at all.
    let args = prop_oneof![
        3 => proptest::collection::vec(any::<[u8; 4]>(), 0..6).prop_map(|s| (true, s, Vec::new())),
        2 => proptest::collection::vec(0..4u8, 0..260).prop_map(|b| (false, Vec::new(), b)),
        1 => proptest::collection::vec(any::<u8>(), 0..260).prop_map(|b| (false, Vec::new(), b)),
    ];
    (0..3u8, cmd, count, args).prop_map(|(ld, cmd, count, (structured, seeds, raw))| {
        let (count, args) = if structured {
            let n = seeds.len() as u32;
            (
                if cmd < 13 { n.max(count.min(1)) } else { count },
                plausible(cmd, &seeds),
            )
        } else {
            (count, raw)
        };
        Call {
            ld,
            cmd,
            count,
            args,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_hypercalls_never_panic_and_keep_flags_consistent(
        calls in proptest::collection::vec(call(), 1..40),
    ) {
        let cfg = DomainConfig { max_grant_frames: 4, max_maptrack_frames: 1, ..DomainConfig::default() };
        let (mut e, mut h) = setup(&DOMS, cfg);
        // Some real grants so that small numbers hit something.
        for g in DOMS {
            for r in 0..4u32 {
                grant(&e, &mut h, g, r, DOMS[(r % 3) as usize], u64::from(r), r == 3);
            }
        }
        for c in calls {
            let mut args = c.args.clone();
            let ld = DOMS[c.ld as usize];
            let ret = e.grant_table_op(ld, c.cmd, &mut args, c.count, &mut h);
            prop_assert!(ret <= 0);
            prop_assert_eq!(args.len(), c.args.len());
        }
        // Whatever happened, GTF_reading/GTF_writing match the pins.
        for g in DOMS {
            let Some(t) = e.table(g) else { continue };
            for r in 0..t.nr_entries().min(600) {
                let p = e.pins(g, r).unwrap();
                let want = if p.any() { GTF_READING } else { 0 } | if p.writable() { GTF_WRITING } else { 0 };
                prop_assert_eq!(rw_bits(&e, &h, g, r), want);
            }
        }
        // And everything can still be torn down to nothing.
        for g in DOMS {
            e.destroy_domain(g, &mut h).unwrap();
        }
        prop_assert!(h.allocated.is_empty());
        let c = e.counters();
        prop_assert_eq!(c.maps, c.unmaps + c.released_on_destroy);
        let _ = status_code::<()>(&Ok(()));
    }
}
