//! The grant engine: every domain's table and maptrack, and the operations over them.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use abi::errno;
use abi::event_channel::{DOMID_FIRST_RESERVED, DOMID_SELF};
use abi::grant_table::{
    GnttabCopy, GnttabMapGrantRef, GnttabUnmapAndReplace, GnttabUnmapGrantRef, GNTCOPY_DEST_GREF,
    GNTCOPY_SOURCE_GREF, GNTMAP_APPLICATION_MAP, GNTMAP_CONTAINS_PTE, GNTMAP_DEVICE_MAP,
    GNTMAP_HOST_MAP, GNTMAP_READONLY, GNTST_OKAY, GNTTAB_NR_RESERVED_ENTRIES, GTF_PAT, GTF_PCD,
    GTF_PERMIT_ACCESS, GTF_PWT, GTF_READING, GTF_SUB_PAGE, GTF_TRANSITIVE, GTF_TYPE_MASK,
    GTF_WRITING, XENMAPIDX_GRANT_TABLE_STATUS,
};

use crate::host::{FrameAlloc, GrantHost, GrantMemory, MapHost};
use crate::maptrack::{Maptrack, MaptrackEntry};
use crate::table::{
    grant_to_status_frames, pin_would_overflow, reduce_status_for_pin, set_status, split_hdr,
    Active, GrantTable, PAGE_SIZE, PIN_DEVR, PIN_DEVW, PIN_HSTR, PIN_HSTW, PIN_WRITE_MASK,
    STATUS_PER_FRAME, V1_PER_FRAME, V2_PER_FRAME,
};
use crate::{
    status_code, DomId, GntSt, DEFAULT_MAX_GRANT_FRAMES, DEFAULT_MAX_MAPTRACK_FRAMES,
    INITIAL_NR_GRANT_FRAMES, UNMAP_BATCH_SIZE,
};

/// Largest `max_grant_frames` accepted (keeps v1 entry numbers within `u32`).
const MAX_CONFIG_GRANT_FRAMES: u32 = 1 << 22;

/// Per-domain limits and properties, fixed at creation (Xen's `grant_table_init`
/// arguments and the domain's type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// Most shared frames the table may grow to (`max_grant_frames`, >= 1).
    pub max_grant_frames: u32,
    /// Most maptrack frames (256 handles each) for the mappings this domain holds.
    pub max_maptrack_frames: u32,
    /// Highest table version the domain may select (1 or 2).
    pub max_version: u32,
    /// Translated (HVM/PVH) domain: `host_addr` is a guest-physical address, device,
    /// application and PTE mappings are refused and so are grants with cache attributes,
    /// as Xen does (`paging_mode_external`).
    pub translated: bool,
    /// Non-translated domain whose IOMMU context must mirror its grant mappings (Xen's
    /// `gnttab_need_iommu_mapping`): the engine keeps per-frame counts and calls
    /// [`MapHost::iommu_map`] / [`MapHost::iommu_unmap`].
    pub iommu_sync: bool,
    /// May act on other domains' tables (`setup_table`, `query_size`,
    /// `get_status_frames`, `get_version` with a foreign `dom`: Xen's XSM_TARGET).
    pub privileged: bool,
}

impl Default for DomainConfig {
    /// Xen's defaults for a PVH domU.
    fn default() -> DomainConfig {
        DomainConfig {
            max_grant_frames: DEFAULT_MAX_GRANT_FRAMES,
            max_maptrack_frames: DEFAULT_MAX_MAPTRACK_FRAMES,
            max_version: 2,
            translated: true,
            iommu_sync: false,
            privileged: false,
        }
    }
}

/// Why [`GrantEngine::create_domain`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateError {
    /// The id is in use (possibly by a dying domain whose grants are still mapped).
    Exists,
    /// The id is reserved (`>= DOMID_FIRST_RESERVED`).
    BadId,
    /// `max_grant_frames` is 0 or too large, or `max_version` is not 1 or 2.
    BadConfig,
    /// No frame for the initial table.
    NoMemory,
}

/// Engine-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Successful maps.
    pub maps: u64,
    /// Failed maps.
    pub map_failures: u64,
    /// Successful unmaps that removed something.
    pub unmaps: u64,
    /// Failed unmaps.
    pub unmap_failures: u64,
    /// Successful copies (non-zero length).
    pub copies: u64,
    /// Failed copies.
    pub copy_failures: u64,
    /// Bytes copied by `GNTTABOP_copy`.
    pub bytes_copied: u64,
    /// Mappings released because their holder was destroyed.
    pub released_on_destroy: u64,
}

/// Counters of one domain (as mapper / copier).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainCounters {
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Successful copies.
    pub copies: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Mappings it holds now.
    pub live_mappings: u32,
}

/// Pin counts of one grant entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    /// Writable host mappings (and in-flight copy writes).
    pub host_write: u8,
    /// Read-only host mappings (and in-flight copy reads).
    pub host_read: u8,
    /// Writable device mappings.
    pub dev_write: u8,
    /// Read-only device mappings.
    pub dev_read: u8,
    /// The domain holding the pins (meaningful when any is non-zero).
    pub domid: DomId,
}

impl Pins {
    /// Any pin at all.
    pub fn any(&self) -> bool {
        self.host_write | self.host_read | self.dev_write | self.dev_read != 0
    }
    /// Any writable pin.
    pub fn writable(&self) -> bool {
        self.host_write | self.dev_write != 0
    }
}

/// A map request (the IN half of `gnttab_map_grant_ref`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapRequest {
    /// Where to map (translated domains: guest-physical address).
    pub host_addr: u64,
    /// `GNTMAP_*`.
    pub flags: u32,
    /// Grant reference.
    pub gref: u32,
    /// Granting domain (a real id: `DOMID_SELF` is not accepted, as in Xen).
    pub dom: DomId,
}

/// A successful map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOutcome {
    /// Handle to unmap with.
    pub handle: u32,
    /// Machine frame now mapped.
    pub mfn: u64,
    /// The granter's frame number it came from.
    pub gfn: u64,
    /// `dev_bus_addr` reported to the guest (`mfn << 12`, as Xen on x86).
    pub dev_bus_addr: u64,
    /// Read-only mapping.
    pub readonly: bool,
    /// A host mapping was created.
    pub host_map: bool,
    /// A device mapping was granted.
    pub device_map: bool,
}

/// An unmap request (`gnttab_unmap_grant_ref`, or `unmap_and_replace` with `new_addr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnmapRequest {
    /// Handle from map.
    pub handle: u32,
    /// Host mapping to remove (0: leave it).
    pub host_addr: u64,
    /// Device mapping to remove (0: leave it; else must equal the map's `dev_bus_addr`).
    pub dev_bus_addr: u64,
    /// `unmap_and_replace` only (PV); must be 0 for translated domains.
    pub new_addr: u64,
}

/// First half of an unmap: the mapping is gone from the maptrack (and the host mapping
/// removed), but the grant is still pinned until [`GrantEngine::unmap_complete`] is
/// given a [`Flushed`] newer than this token. Dropping it leaks the pin.
#[must_use = "the grant stays pinned until unmap_complete()"]
#[derive(Debug)]
pub struct PendingUnmap {
    ld: DomId,
    rd: DomId,
    gref: u32,
    done: u32,
    mfn: u64,
    gen: u64,
    status: Result<(), GntSt>,
}

impl PendingUnmap {
    /// The status to report for this unmap.
    pub fn status(&self) -> Result<(), GntSt> {
        self.status
    }
    /// Machine frame that was mapped (0 if nothing was done).
    pub fn mfn(&self) -> u64 {
        self.mfn
    }
    /// The granting domain (meaningful if something was done).
    pub fn granter(&self) -> DomId {
        self.rd
    }
    /// The host mapping was removed.
    pub fn host_unmapped(&self) -> bool {
        self.done & GNTMAP_HOST_MAP != 0
    }
    /// The device mapping was removed.
    pub fn device_unmapped(&self) -> bool {
        self.done & GNTMAP_DEVICE_MAP != 0
    }
    /// Nothing was removed (error, or both addresses 0): completing is a no-op.
    pub fn is_noop(&self) -> bool {
        self.done == 0
    }
}

/// Proof that [`MapHost::flush`] ran for a domain; made only by [`GrantEngine::flush`].
#[derive(Debug)]
pub struct Flushed {
    dom: DomId,
    gen: u64,
}

/// What [`GrantEngine::destroy_domain`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestroyReport {
    /// Mappings the domain held that were released (their pins dropped).
    pub mappings_released: u32,
    /// The domain's own table was freed now; `false`: other domains still map its
    /// grants, it stays (dying) until they unmap, then it is freed.
    pub table_freed: bool,
}

/// Result of `set_version`: Xen always reports the version in effect afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetVersionOutcome {
    /// Version in effect.
    pub version: u32,
    /// 0, or a negative errno (`-EINVAL`, `-ENOSYS`, `-EBUSY`, `-ERANGE`, `-ENOMEM`).
    pub ret: i64,
}

#[derive(Clone, Copy, Debug, Default)]
struct IommuRef {
    rd: u32,
    wr: u32,
}

#[derive(Debug)]
struct Domain {
    cfg: DomainConfig,
    dying: bool,
    table: GrantTable,
    maptrack: Maptrack,
    iommu_refs: BTreeMap<u64, IommuRef>,
    flush_gen: u64,
    counters: DomainCounters,
}

/// A grant acquired for a copy.
#[derive(Clone, Copy, Debug)]
struct Acquired {
    mfn: u64,
    off: u32,
    len: u32,
}

/// One side of a copy.
#[derive(Clone, Copy, Debug)]
struct Claim {
    dom: DomId,
    gref: Option<u32>,
    readonly: bool,
    buf: Acquired,
}

/// Every domain's grant state.
#[derive(Debug)]
pub struct GrantEngine {
    domains: BTreeMap<DomId, Domain>,
    counters: Counters,
    transitive: bool,
}

impl Default for GrantEngine {
    fn default() -> Self {
        Self::new()
    }
}

fn pin_dec(pin: u32, incr: u32) -> u32 {
    // Each counter is one byte; never borrow from a neighbour.
    let shift = incr.trailing_zeros();
    if (pin >> shift) & 0xff == 0 {
        debug_assert!(false, "pin underflow");
        return pin;
    }
    pin - incr
}

fn pins_of(a: &Active) -> Pins {
    Pins {
        host_write: a.pin as u8,
        host_read: (a.pin >> 8) as u8,
        dev_write: (a.pin >> 16) as u8,
        dev_read: (a.pin >> 24) as u8,
        domid: a.domid,
    }
}

/// Pin increments for a mapping with `flags`.
fn map_pin_incr(flags: u32) -> u32 {
    let ro = flags & GNTMAP_READONLY != 0;
    let mut incr = 0;
    if flags & GNTMAP_DEVICE_MAP != 0 {
        incr += if ro { PIN_DEVR } else { PIN_DEVW };
    }
    if flags & GNTMAP_HOST_MAP != 0 {
        incr += if ro { PIN_HSTR } else { PIN_HSTW };
    }
    incr
}

/// Allocates the frames to grow `t` to `req` shared frames (and the matching status
/// frames in v2); all or nothing (Xen's `gnttab_grow_table`).
fn grow<H: GrantMemory + FrameAlloc + ?Sized>(
    t: &mut GrantTable,
    req: u32,
    host: &mut H,
) -> Result<(), ()> {
    let req = req.max(INITIAL_NR_GRANT_FRAMES).min(t.max_frames);
    let mut new_shared = Vec::new();
    let mut new_status = Vec::new();
    let need_status = if t.version == 2 {
        grant_to_status_frames(req)
    } else {
        0
    };
    let mut ok = true;
    for _ in t.nr_frames()..req {
        match host.alloc_frame() {
            Some(f) => {
                host.zero_frame(f);
                new_shared.push(f);
            }
            None => {
                ok = false;
                break;
            }
        }
    }
    if ok {
        for _ in t.nr_status_frames()..need_status {
            match host.alloc_frame() {
                Some(f) => {
                    host.zero_frame(f);
                    new_status.push(f);
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
    }
    if !ok {
        for f in new_shared.into_iter().chain(new_status) {
            host.free_frame(f);
        }
        return Err(());
    }
    t.shared.extend(new_shared);
    t.status.extend(new_status);
    t.active
        .resize(t.shared.len() * V1_PER_FRAME as usize, Active::default());
    Ok(())
}

impl GrantEngine {
    /// An engine with no domains. Transitive grants are allowed (Xen's default).
    pub fn new() -> GrantEngine {
        GrantEngine {
            domains: BTreeMap::new(),
            counters: Counters::default(),
            transitive: true,
        }
    }

    /// Xen's `gnttab=[no-]transitive`: whether copies may follow v2 transitive grants.
    pub fn set_transitive_grants(&mut self, on: bool) {
        self.transitive = on;
    }

    // ----- domains -----

    /// Creates `id`'s grant state with one zeroed shared frame, version 1.
    pub fn create_domain<H: GrantMemory + FrameAlloc + ?Sized>(
        &mut self,
        id: DomId,
        cfg: DomainConfig,
        host: &mut H,
    ) -> Result<(), CreateError> {
        if id >= DOMID_FIRST_RESERVED {
            return Err(CreateError::BadId);
        }
        if self.domains.contains_key(&id) {
            return Err(CreateError::Exists);
        }
        if cfg.max_grant_frames < INITIAL_NR_GRANT_FRAMES
            || cfg.max_grant_frames > MAX_CONFIG_GRANT_FRAMES
            || !(1..=2).contains(&cfg.max_version)
        {
            return Err(CreateError::BadConfig);
        }
        let mut table = GrantTable::new(cfg.max_grant_frames, cfg.max_version);
        grow(&mut table, INITIAL_NR_GRANT_FRAMES, host).map_err(|()| CreateError::NoMemory)?;
        self.domains.insert(
            id,
            Domain {
                cfg,
                dying: false,
                table,
                maptrack: Maptrack::new(cfg.max_maptrack_frames),
                iommu_refs: BTreeMap::new(),
                flush_gen: 0,
                counters: DomainCounters::default(),
            },
        );
        Ok(())
    }

    /// Domain destruction (Xen's `gnttab_release_mappings` + `grant_table_destroy`):
    /// flushes `id` once (its vCPUs must be stopped), releases every mapping it holds
    /// (dropping those pins in the granters' tables), and frees its own table unless
    /// other domains still map its grants: then it stays, dying, refusing new maps and
    /// copies, until the last of those is unmapped. `None` if `id` is unknown or
    /// already dying.
    pub fn destroy_domain<H: GrantHost + ?Sized>(
        &mut self,
        id: DomId,
        host: &mut H,
    ) -> Option<DestroyReport> {
        let d = self.domains.get_mut(&id)?;
        if d.dying {
            return None;
        }
        d.dying = true;
        host.flush(id);
        d.flush_gen += 1;
        let held = d.maptrack.take_all();
        d.iommu_refs.clear();
        d.counters.live_mappings = 0;
        let mut granters = Vec::new();
        for (_, e) in &held {
            if let Some(rd) = self.domains.get_mut(&e.dom) {
                let t = &mut rd.table;
                if let Some(act) = t.active.get_mut(e.gref as usize) {
                    let ro = e.flags & GNTMAP_READONLY != 0;
                    if e.flags & GNTMAP_DEVICE_MAP != 0 {
                        act.pin = pin_dec(act.pin, if ro { PIN_DEVR } else { PIN_DEVW });
                    }
                    if e.flags & GNTMAP_HOST_MAP != 0 {
                        act.pin = pin_dec(act.pin, if ro { PIN_HSTR } else { PIN_HSTW });
                    }
                    let pin = act.pin;
                    reduce_status_for_pin(host, t, e.gref, pin, ro);
                }
                if e.dom != id && !granters.contains(&e.dom) {
                    granters.push(e.dom);
                }
            }
            self.counters.released_on_destroy += 1;
        }
        for g in granters {
            self.maybe_reap(g, host);
        }
        let table_freed = self.maybe_reap(id, host);
        Some(DestroyReport {
            mappings_released: held.len() as u32,
            table_freed,
        })
    }

    /// Frees a dying domain's table once nothing pins its grants.
    fn maybe_reap<H: FrameAlloc + ?Sized>(&mut self, id: DomId, host: &mut H) -> bool {
        let Some(d) = self.domains.get(&id) else {
            return false;
        };
        if !d.dying || d.table.any_pinned_from(0) || d.maptrack.in_use() != 0 {
            return false;
        }
        if let Some(d) = self.domains.remove(&id) {
            for f in d.table.shared.iter().chain(d.table.status.iter()) {
                host.free_frame(*f);
            }
        }
        true
    }

    /// `id`'s table, also while dying.
    pub fn table(&self, id: DomId) -> Option<&GrantTable> {
        self.domains.get(&id).map(|d| &d.table)
    }

    /// The mappings `id` holds.
    pub fn maptrack(&self, id: DomId) -> Option<&Maptrack> {
        self.domains.get(&id).map(|d| &d.maptrack)
    }

    /// `Some(true)` while `id` is dying (destroyed, grants still mapped elsewhere).
    pub fn is_dying(&self, id: DomId) -> Option<bool> {
        self.domains.get(&id).map(|d| d.dying)
    }

    /// Pin counts of `id`'s entry `gref`.
    pub fn pins(&self, id: DomId, gref: u32) -> Option<Pins> {
        let t = &self.domains.get(&id)?.table;
        if gref >= t.nr_entries() {
            return None;
        }
        t.active.get(gref as usize).map(pins_of)
    }

    /// Engine-wide counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// `id`'s counters.
    pub fn domain_counters(&self, id: DomId) -> Option<DomainCounters> {
        self.domains.get(&id).map(|d| d.counters)
    }

    fn live(&self, id: DomId) -> Option<&Domain> {
        self.domains.get(&id).filter(|d| !d.dying)
    }

    /// `rcu_lock_domain_by_any_id` + XSM_TARGET (self, or a privileged caller).
    fn target(&self, ld: DomId, dom: DomId) -> Result<DomId, GntSt> {
        let d = if dom == DOMID_SELF { ld } else { dom };
        self.live(d).ok_or(GntSt::BadDomain)?;
        if d != ld && !self.live(ld).is_some_and(|c| c.cfg.privileged) {
            return Err(GntSt::PermissionDenied);
        }
        Ok(d)
    }

    // ----- map -----

    /// `GNTTABOP_map_grant_ref` for one request by `ld`.
    pub fn map<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        req: &MapRequest,
        host: &mut H,
    ) -> Result<MapOutcome, GntSt> {
        let r = self.map_inner(ld, req, host);
        match r {
            Ok(_) => {
                self.counters.maps += 1;
                if let Some(d) = self.domains.get_mut(&ld) {
                    d.counters.maps += 1;
                    d.counters.live_mappings = d.maptrack.in_use();
                }
            }
            Err(_) => self.counters.map_failures += 1,
        }
        r
    }

    /// The wire form of [`GrantEngine::map`]: fills `status`, `handle`, `dev_bus_addr`.
    pub fn map_grant_ref<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        op: &mut GnttabMapGrantRef,
        host: &mut H,
    ) {
        let req = MapRequest {
            host_addr: op.host_addr,
            flags: op.flags,
            gref: op.r#ref,
            dom: op.dom,
        };
        match self.map(ld, &req, host) {
            Ok(o) => {
                op.status = GNTST_OKAY;
                op.handle = o.handle;
                op.dev_bus_addr = o.dev_bus_addr;
            }
            Err(e) => op.status = e.code(),
        }
    }

    fn map_inner<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        req: &MapRequest,
        host: &mut H,
    ) -> Result<MapOutcome, GntSt> {
        let flags = req.flags;
        let readonly = flags & GNTMAP_READONLY != 0;
        let pin_incr = map_pin_incr(flags);
        if pin_incr == 0 {
            return Err(GntSt::BadGntref);
        }
        let cfg = self.live(ld).ok_or(GntSt::GeneralError)?.cfg;
        if cfg.translated
            && flags & (GNTMAP_DEVICE_MAP | GNTMAP_APPLICATION_MAP | GNTMAP_CONTAINS_PTE) != 0
        {
            return Err(GntSt::GeneralError);
        }
        let rd = req.dom;
        if self.live(rd).is_none() {
            return Err(GntSt::BadDomain);
        }
        let handle = self
            .domains
            .get_mut(&ld)
            .and_then(|d| d.maptrack.get_handle())
            .ok_or(GntSt::NoSpace)?;
        match self.map_with_handle(ld, rd, req, pin_incr, cfg, host) {
            Ok((mfn, gfn)) => {
                if let Some(d) = self.domains.get_mut(&ld) {
                    d.maptrack.fill(
                        handle,
                        MaptrackEntry {
                            dom: rd,
                            gref: req.gref,
                            flags,
                            mfn,
                            host_addr: req.host_addr,
                        },
                    );
                }
                Ok(MapOutcome {
                    handle,
                    mfn,
                    gfn,
                    dev_bus_addr: mfn << 12,
                    readonly,
                    host_map: flags & GNTMAP_HOST_MAP != 0,
                    device_map: flags & GNTMAP_DEVICE_MAP != 0,
                })
            }
            Err(e) => {
                if let Some(d) = self.domains.get_mut(&ld) {
                    d.maptrack.put_handle(handle);
                }
                Err(e)
            }
        }
    }

    /// Pins the entry, creates the host mapping and IOMMU entry; undoes everything on
    /// failure. Returns (mfn, gfn).
    fn map_with_handle<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        rd: DomId,
        req: &MapRequest,
        pin_incr: u32,
        cfg: DomainConfig,
        host: &mut H,
    ) -> Result<(u64, u64), GntSt> {
        let flags = req.flags;
        let readonly = flags & GNTMAP_READONLY != 0;
        let r = req.gref;
        let (mfn, gfn, cache) = {
            let t = &mut self.domains.get_mut(&rd).ok_or(GntSt::BadDomain)?.table;
            if r >= t.nr_entries() {
                return Err(GntSt::BadGntref);
            }
            let act = t.active[r as usize];
            if act.pin != 0
                && (act.domid != ld || pin_would_overflow(act.pin, pin_incr) || act.is_sub_page)
            {
                return Err(GntSt::GeneralError);
            }
            let mut act = act;
            if act.pin == 0 || (!readonly && act.pin & PIN_WRITE_MASK == 0) {
                set_status(host, t, r, act.pin, readonly, true, ld)?;
                if act.pin == 0 {
                    let (emfn, eoff) = t.entry_loc(r);
                    let gfn = if t.version == 1 {
                        u64::from(host.load_u32(emfn, eoff + 4))
                    } else {
                        host.load_u64(emfn, eoff + 8)
                    };
                    match host.translate(rd, gfn, !readonly) {
                        Ok(mfn) => {
                            act = Active {
                                pin: 0,
                                domid: ld,
                                src_domid: rd,
                                trans_gref: r,
                                mfn,
                                gfn,
                                start: 0,
                                length: PAGE_SIZE,
                                is_sub_page: false,
                            };
                        }
                        Err(e) => {
                            reduce_status_for_pin(host, t, r, act.pin, readonly);
                            return Err(e);
                        }
                    }
                }
            }
            act.pin += pin_incr;
            t.active[r as usize] = act;
            let (emfn, eoff) = t.entry_loc(r);
            let cache = host.load_u16(emfn, eoff) & (GTF_PAT | GTF_PCD | GTF_PWT);
            (act.mfn, act.gfn, cache)
        };

        let mut host_created = false;
        let mut rc = Ok(());
        if flags & GNTMAP_HOST_MAP != 0 {
            if cfg.translated && (cache != 0 || flags & !GNTMAP_READONLY != GNTMAP_HOST_MAP) {
                rc = Err(GntSt::GeneralError);
            } else {
                rc = host.add_host_mapping(ld, req.host_addr, mfn, flags, cache);
                host_created = rc.is_ok();
            }
        }
        if rc.is_ok() && ld != rd && !cfg.translated && cfg.iommu_sync {
            rc = self.iommu_take(ld, mfn, readonly, host);
        }
        if let Err(e) = rc {
            if host_created {
                let _ = host.remove_host_mapping(ld, req.host_addr, mfn, 0, flags);
                let _ = self.flush(ld, host);
            }
            if let Some(d) = self.domains.get_mut(&rd) {
                let t = &mut d.table;
                let pin = pin_dec_all(t.active[r as usize].pin, pin_incr);
                t.active[r as usize].pin = pin;
                reduce_status_for_pin(host, t, r, pin, readonly);
            }
            return Err(e);
        }
        Ok((mfn, gfn))
    }

    fn iommu_take<H: MapHost + ?Sized>(
        &mut self,
        ld: DomId,
        mfn: u64,
        readonly: bool,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let d = self.domains.get_mut(&ld).ok_or(GntSt::GeneralError)?;
        let mut n = d.iommu_refs.get(&mfn).copied().unwrap_or_default();
        if readonly {
            n.rd += 1;
        } else {
            n.wr += 1;
        }
        let kind = if !readonly && n.wr == 1 {
            Some(true)
        } else if readonly && n.rd == 1 && n.wr == 0 {
            Some(false)
        } else {
            None
        };
        if let Some(w) = kind {
            host.iommu_map(ld, mfn, w)
                .map_err(|_| GntSt::GeneralError)?;
        }
        d.iommu_refs.insert(mfn, n);
        Ok(())
    }

    // ----- unmap -----

    /// Makes the host flush `ld`'s TLBs and IOTLB; the token lets pending unmaps of
    /// `ld` begun before it complete.
    pub fn flush<H: MapHost + ?Sized>(&mut self, ld: DomId, host: &mut H) -> Flushed {
        host.flush(ld);
        let gen = match self.domains.get_mut(&ld) {
            Some(d) => {
                d.flush_gen += 1;
                d.flush_gen
            }
            None => u64::MAX,
        };
        Flushed { dom: ld, gen }
    }

    /// First phase of `GNTTABOP_unmap_grant_ref` / `unmap_and_replace` (Xen's
    /// `unmap_common`): validates the handle, removes the host mapping at
    /// `req.host_addr` (if non-zero) and/or forgets the device mapping (if
    /// `req.dev_bus_addr` is non-zero), frees the handle once neither remains. With both
    /// addresses 0 nothing happens and the status is okay, as in Xen.
    pub fn unmap_begin<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        req: &UnmapRequest,
        host: &mut H,
    ) -> PendingUnmap {
        let mut p = PendingUnmap {
            ld,
            rd: 0,
            gref: 0,
            done: 0,
            mfn: 0,
            gen: 0,
            status: Ok(()),
        };
        p.status = self.unmap_inner(ld, req, &mut p, host);
        if p.status.is_ok() && p.done != 0 {
            self.counters.unmaps += 1;
            if let Some(d) = self.domains.get_mut(&ld) {
                d.counters.unmaps += 1;
            }
        } else if p.status.is_err() {
            self.counters.unmap_failures += 1;
        }
        if let Some(d) = self.domains.get_mut(&ld) {
            d.counters.live_mappings = d.maptrack.in_use();
        }
        p
    }

    fn unmap_inner<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        req: &UnmapRequest,
        p: &mut PendingUnmap,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let d = self.live(ld).ok_or(GntSt::GeneralError)?;
        let cfg = d.cfg;
        p.gen = d.flush_gen;
        if req.handle >= d.maptrack.limit() {
            return Err(GntSt::BadHandle);
        }
        let e = *d.maptrack.get(req.handle).ok_or(GntSt::BadHandle)?;
        let rd = e.dom;
        let t = &self.domains.get(&rd).ok_or(GntSt::GeneralError)?.table;
        if e.gref >= t.nr_entries() {
            return Err(GntSt::BadHandle);
        }
        let mfn = t.active[e.gref as usize].mfn;
        let flags = e.flags;
        if req.dev_bus_addr != 0 && flags & GNTMAP_DEVICE_MAP != 0 && req.dev_bus_addr != mfn << 12
        {
            return Err(GntSt::BadDevAddr);
        }
        let mut done = 0;
        let mut left = flags;
        if req.host_addr != 0 && flags & GNTMAP_HOST_MAP != 0 {
            if cfg.translated && (req.new_addr != 0 || flags & GNTMAP_CONTAINS_PTE != 0) {
                return Err(GntSt::GeneralError);
            }
            host.remove_host_mapping(ld, req.host_addr, mfn, req.new_addr, flags)?;
            left &= !GNTMAP_HOST_MAP;
            done |= GNTMAP_HOST_MAP | (flags & GNTMAP_READONLY);
        }
        if req.dev_bus_addr != 0 && flags & GNTMAP_DEVICE_MAP != 0 {
            left &= !GNTMAP_DEVICE_MAP;
            done |= GNTMAP_DEVICE_MAP | (flags & GNTMAP_READONLY);
        }
        p.rd = rd;
        p.gref = e.gref;
        p.mfn = mfn;
        p.done = done;
        let ldom = self.domains.get_mut(&ld).ok_or(GntSt::GeneralError)?;
        let mut rc = Ok(());
        if left & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
            ldom.maptrack.release(req.handle);
            if ld != rd && !cfg.translated && cfg.iommu_sync {
                rc = Self::iommu_put(ldom, ld, mfn, flags & GNTMAP_READONLY != 0, host);
            }
        } else if let Some(m) = ldom.maptrack.get_mut(req.handle) {
            m.flags = left;
        }
        rc
    }

    fn iommu_put<H: MapHost + ?Sized>(
        d: &mut Domain,
        ld: DomId,
        mfn: u64,
        readonly: bool,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let Some(mut n) = d.iommu_refs.get(&mfn).copied() else {
            return Ok(());
        };
        if readonly {
            n.rd = n.rd.saturating_sub(1);
        } else {
            n.wr = n.wr.saturating_sub(1);
        }
        let r = if n.rd == 0 && n.wr == 0 {
            host.iommu_unmap(ld, mfn)
        } else if !readonly && n.wr == 0 {
            host.iommu_map(ld, mfn, false)
        } else {
            Ok(())
        };
        if r.is_err() {
            // Like Xen: the counts stay as they were.
            return Err(GntSt::GeneralError);
        }
        if n.rd == 0 && n.wr == 0 {
            d.iommu_refs.remove(&mfn);
        } else {
            d.iommu_refs.insert(mfn, n);
        }
        Ok(())
    }

    /// Second phase (Xen's `unmap_common_complete`): drops the pins the removed mapping
    /// held and clears `GTF_reading`/`GTF_writing` when the last goes. Refuses (handing
    /// the token back) unless `flushed` was made for the same domain after the token.
    pub fn unmap_complete<H: GrantHost + ?Sized>(
        &mut self,
        p: PendingUnmap,
        flushed: &Flushed,
        host: &mut H,
    ) -> Result<(), PendingUnmap> {
        if p.done == 0 {
            return Ok(());
        }
        if self.domains.contains_key(&p.ld) && (flushed.dom != p.ld || flushed.gen <= p.gen) {
            return Err(p);
        }
        if let Some(d) = self.domains.get_mut(&p.rd) {
            let t = &mut d.table;
            if let Some(act) = t.active.get_mut(p.gref as usize) {
                let ro = p.done & GNTMAP_READONLY != 0;
                if p.done & GNTMAP_DEVICE_MAP != 0 {
                    act.pin = pin_dec(act.pin, if ro { PIN_DEVR } else { PIN_DEVW });
                }
                if p.done & GNTMAP_HOST_MAP != 0 {
                    act.pin = pin_dec(act.pin, if ro { PIN_HSTR } else { PIN_HSTW });
                }
                let pin = act.pin;
                reduce_status_for_pin(host, t, p.gref, pin, ro);
            }
        }
        self.maybe_reap(p.rd, host);
        Ok(())
    }

    /// `GNTTABOP_unmap_grant_ref` for a batch, as Xen runs it: per 32 ops, the first
    /// phases, one flush, the completions. Fills every `status`.
    pub fn unmap_grant_refs<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        ops: &mut [GnttabUnmapGrantRef],
        host: &mut H,
    ) {
        self.unmap_batched(
            ld,
            ops,
            host,
            |op| UnmapRequest {
                handle: op.handle,
                host_addr: op.host_addr,
                dev_bus_addr: op.dev_bus_addr,
                new_addr: 0,
            },
            |op, st| op.status = st,
        );
    }

    /// `GNTTABOP_unmap_and_replace` for a batch (host mappings only; `new_addr` must be
    /// 0 for translated domains, as Xen's `replace_grant_p2m_mapping` demands).
    pub fn unmap_and_replace<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        ops: &mut [GnttabUnmapAndReplace],
        host: &mut H,
    ) {
        self.unmap_batched(
            ld,
            ops,
            host,
            |op| UnmapRequest {
                handle: op.handle,
                host_addr: op.host_addr,
                dev_bus_addr: 0,
                new_addr: op.new_addr,
            },
            |op, st| op.status = st,
        );
    }

    /// Runs unmap ops in chunks of [`UNMAP_BATCH_SIZE`]: every first phase, one flush,
    /// every completion; `request` reads an op, `set_status` writes its result.
    fn unmap_batched<T, H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        ops: &mut [T],
        host: &mut H,
        request: impl Fn(&T) -> UnmapRequest,
        set_status: impl Fn(&mut T, i16),
    ) {
        for chunk in ops.chunks_mut(UNMAP_BATCH_SIZE) {
            let mut pending = Vec::with_capacity(chunk.len());
            for op in chunk.iter_mut() {
                let p = self.unmap_begin(ld, &request(op), host);
                set_status(op, status_code(&p.status()));
                pending.push(p);
            }
            self.finish_batch(ld, pending, host);
        }
    }

    fn finish_batch<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        pending: Vec<PendingUnmap>,
        host: &mut H,
    ) {
        let f = self.flush(ld, host);
        for p in pending {
            // Cannot fail: `f` is newer than every token of this batch.
            let _ = self.unmap_complete(p, &f, host);
        }
    }

    // ----- copy -----

    /// `GNTTABOP_copy` for one op by `ld` (Xen's `gnttab_copy_one`): both sides are
    /// acquired (pinned, `GTF_reading`/`GTF_writing` set), checked, copied with
    /// [`GrantMemory::copy_bytes`], and released before returning.
    pub fn copy<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        op: &GnttabCopy,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let r = self.copy_inner(ld, op, host);
        match r {
            Ok(()) if op.len != 0 => {
                self.counters.copies += 1;
                self.counters.bytes_copied += u64::from(op.len);
                if let Some(d) = self.domains.get_mut(&ld) {
                    d.counters.copies += 1;
                    d.counters.bytes_copied += u64::from(op.len);
                }
            }
            Ok(()) => {}
            Err(_) => self.counters.copy_failures += 1,
        }
        r
    }

    /// `GNTTABOP_copy` for a batch; fills every `status`.
    pub fn copy_batch<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        ops: &mut [GnttabCopy],
        host: &mut H,
    ) {
        for op in ops.iter_mut() {
            let r = self.copy(ld, op, host);
            op.status = status_code(&r);
        }
    }

    fn copy_domain(&self, ld: DomId, domid: DomId, is_gref: bool) -> Result<DomId, GntSt> {
        // Only DOMID_SELF may be referenced by frame.
        if domid != DOMID_SELF && !is_gref {
            return Err(GntSt::PermissionDenied);
        }
        let d = if domid == DOMID_SELF { ld } else { domid };
        self.live(d).ok_or(GntSt::BadDomain)?;
        Ok(d)
    }

    fn copy_inner<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        op: &GnttabCopy,
        host: &mut H,
    ) -> Result<(), GntSt> {
        if op.len == 0 {
            return Ok(());
        }
        self.live(ld).ok_or(GntSt::GeneralError)?;
        let src_gref = op.flags & GNTCOPY_SOURCE_GREF != 0;
        let dst_gref = op.flags & GNTCOPY_DEST_GREF != 0;
        let sd = self.copy_domain(ld, op.source_domid, src_gref)?;
        let dd = self.copy_domain(ld, op.dest_domid, dst_gref)?;
        let src = self.claim(ld, sd, src_gref, op.source_u, true, host)?;
        let dst = match self.claim(ld, dd, dst_gref, op.dest_u, false, host) {
            Ok(d) => d,
            Err(e) => {
                self.unclaim(&src, host);
                return Err(e);
            }
        };
        let rc = Self::copy_buf(op, &src.buf, &dst.buf, host);
        self.unclaim(&dst, host);
        self.unclaim(&src, host);
        rc
    }

    fn copy_buf<H: GrantMemory + ?Sized>(
        op: &GnttabCopy,
        src: &Acquired,
        dst: &Acquired,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let len = u32::from(op.len);
        let (so, doff) = (u32::from(op.source_offset), u32::from(op.dest_offset));
        if so + len > PAGE_SIZE || doff + len > PAGE_SIZE {
            return Err(GntSt::BadCopyArg);
        }
        if so < src.off || so + len > src.off + src.len {
            return Err(GntSt::GeneralError);
        }
        if doff < dst.off || doff + len > dst.off + dst.len {
            return Err(GntSt::GeneralError);
        }
        host.copy_bytes(dst.mfn, doff as usize, src.mfn, so as usize, len as usize);
        Ok(())
    }

    fn claim<H: GrantHost + ?Sized>(
        &mut self,
        ld: DomId,
        dom: DomId,
        is_gref: bool,
        u: u64,
        readonly: bool,
        host: &mut H,
    ) -> Result<Claim, GntSt> {
        if is_gref {
            let gref = u as u32;
            let buf = self.acquire(dom, gref, ld, readonly, self.transitive, host)?;
            Ok(Claim {
                dom,
                gref: Some(gref),
                readonly,
                buf,
            })
        } else {
            let mfn = host.translate(dom, u, !readonly)?;
            Ok(Claim {
                dom,
                gref: None,
                readonly,
                buf: Acquired {
                    mfn,
                    off: 0,
                    len: PAGE_SIZE,
                },
            })
        }
    }

    fn unclaim<H: GrantHost + ?Sized>(&mut self, c: &Claim, host: &mut H) {
        if let Some(g) = c.gref {
            self.release_for_copy(c.dom, g, c.readonly, host);
        }
    }

    /// Xen's `acquire_grant_for_copy`: pins `rd`'s entry `gref` for `ldom` for one copy,
    /// following one level of transitive grant when allowed.
    fn acquire<H: GrantHost + ?Sized>(
        &mut self,
        rd: DomId,
        gref: u32,
        ldom: DomId,
        readonly: bool,
        allow_transitive: bool,
        host: &mut H,
    ) -> Result<Acquired, GntSt> {
        let pin_incr = if readonly { PIN_HSTR } else { PIN_HSTW };
        let t = &mut self.domains.get_mut(&rd).ok_or(GntSt::BadDomain)?.table;
        if gref >= t.nr_entries() {
            return Err(GntSt::BadGntref);
        }
        let old = t.active[gref as usize];
        if old.pin != 0 && (old.domid != ldom || pin_would_overflow(old.pin, pin_incr)) {
            return Err(GntSt::GeneralError);
        }
        let (emfn, eoff) = t.entry_loc(gref);
        let v2 = t.version == 2;
        let need_status = old.pin == 0 || (!readonly && old.pin & PIN_WRITE_MASK == 0);
        let mut act = old;

        if v2 && host.load_u16(emfn, eoff) & GTF_TYPE_MASK == GTF_TRANSITIVE {
            if need_status {
                set_status(host, t, gref, old.pin, readonly, false, ldom)?;
            }
            let undo = |t: &GrantTable, host: &mut H| {
                reduce_status_for_pin(host, t, gref, old.pin, readonly);
            };
            if !allow_transitive {
                undo(t, host);
                return Err(GntSt::GeneralError);
            }
            let w4 = host.load_u32(emfn, eoff + 4);
            let trans_domid = w4 as u16;
            let trans_gref = host.load_u32(emfn, eoff + 8);
            if trans_domid == rd {
                undo(t, host);
                return Err(GntSt::GeneralError);
            }
            if self.live(trans_domid).is_none() {
                let t = &self.domains.get(&rd).ok_or(GntSt::BadDomain)?.table;
                undo(t, host);
                return Err(GntSt::GeneralError);
            }
            let inner = self.acquire(trans_domid, trans_gref, rd, readonly, false, host);
            let t = &mut self.domains.get_mut(&rd).ok_or(GntSt::BadDomain)?.table;
            let a = match inner {
                Ok(a) => a,
                Err(e) => {
                    undo(t, host);
                    return Err(e);
                }
            };
            if old.pin == 0 {
                act = Active {
                    pin: 0,
                    domid: ldom,
                    src_domid: trans_domid,
                    trans_gref,
                    mfn: a.mfn,
                    gfn: u64::MAX,
                    start: a.off,
                    length: a.len,
                    is_sub_page: true,
                };
            } else if old.mfn != a.mfn
                || old.start != a.off
                || old.length != a.len
                || old.src_domid != trans_domid
                || old.trans_gref != trans_gref
                || !old.is_sub_page
            {
                // The entry changed while pinned: Xen restarts the op; we fail it.
                undo(t, host);
                self.release_for_copy(trans_domid, trans_gref, readonly, host);
                return Err(GntSt::GeneralError);
            }
        } else if need_status {
            set_status(host, t, gref, old.pin, readonly, false, ldom)?;
            let (gfn, sub) = if !v2 {
                (u64::from(host.load_u32(emfn, eoff + 4)), None)
            } else if host.load_u16(emfn, eoff) & GTF_SUB_PAGE == 0 {
                (host.load_u64(emfn, eoff + 8), None)
            } else {
                let w4 = host.load_u32(emfn, eoff + 4);
                (host.load_u64(emfn, eoff + 8), Some((w4 & 0xffff, w4 >> 16)))
            };
            let mfn = match host.translate(rd, gfn, !readonly) {
                Ok(m) => m,
                Err(e) => {
                    reduce_status_for_pin(host, t, gref, old.pin, readonly);
                    return Err(e);
                }
            };
            let (start, length) = sub.unwrap_or((0, PAGE_SIZE));
            if old.pin == 0 {
                act = Active {
                    pin: 0,
                    domid: ldom,
                    src_domid: rd,
                    trans_gref: gref,
                    mfn,
                    gfn,
                    start,
                    length,
                    is_sub_page: sub.is_some(),
                };
            } else if old.mfn != mfn
                || old.src_domid != rd
                || old.trans_gref != gref
                || (old.is_sub_page
                    && (sub.is_none() || old.start != start || old.length != length))
            {
                reduce_status_for_pin(host, t, gref, old.pin, readonly);
                return Err(GntSt::GeneralError);
            }
        }
        act.pin += pin_incr;
        let t = &mut self.domains.get_mut(&rd).ok_or(GntSt::BadDomain)?.table;
        t.active[gref as usize] = act;
        Ok(Acquired {
            mfn: act.mfn,
            off: act.start,
            len: act.length,
        })
    }

    /// Xen's `release_grant_for_copy`.
    fn release_for_copy<H: GrantHost + ?Sized>(
        &mut self,
        rd: DomId,
        gref: u32,
        readonly: bool,
        host: &mut H,
    ) {
        let Some(d) = self.domains.get_mut(&rd) else {
            return;
        };
        let t = &mut d.table;
        let Some(act) = t.active.get_mut(gref as usize) else {
            return;
        };
        act.pin = pin_dec(act.pin, if readonly { PIN_HSTR } else { PIN_HSTW });
        let (pin, src, trans) = (act.pin, act.src_domid, act.trans_gref);
        reduce_status_for_pin(host, t, gref, pin, readonly);
        if t.version == 2 && src != rd {
            self.release_for_copy(src, trans, readonly, host);
        }
    }

    // ----- table management -----

    /// `GNTTABOP_setup_table`: grows `dom`'s table to at least `nr_frames` frames and
    /// returns the first `nr_frames` machine frames (the dispatcher turns them into the
    /// guest's frame numbers with [`MapHost::guest_frame_of`]).
    pub fn setup_table<H: GrantMemory + FrameAlloc + ?Sized>(
        &mut self,
        ld: DomId,
        dom: DomId,
        nr_frames: u32,
        host: &mut H,
    ) -> Result<Vec<u64>, GntSt> {
        let d = self.target(ld, dom)?;
        let t = &mut self.domains.get_mut(&d).ok_or(GntSt::BadDomain)?.table;
        if nr_frames > t.max_frames {
            return Err(GntSt::GeneralError);
        }
        if (nr_frames > t.nr_frames()
            || (t.version > 1 && grant_to_status_frames(nr_frames) > t.nr_status_frames()))
            && grow(t, nr_frames, host).is_err()
        {
            return Err(GntSt::GeneralError);
        }
        Ok(t.shared[..nr_frames as usize].to_vec())
    }

    /// `GNTTABOP_query_size`: (current frames, maximum frames).
    pub fn query_size(&self, ld: DomId, dom: DomId) -> Result<(u32, u32), GntSt> {
        let d = self.target(ld, dom)?;
        let t = &self.domains.get(&d).ok_or(GntSt::BadDomain)?.table;
        Ok((t.nr_frames(), t.max_frames))
    }

    /// `GNTTABOP_get_status_frames`: the first `nr_frames` status frames (machine).
    pub fn get_status_frames(
        &self,
        ld: DomId,
        dom: DomId,
        nr_frames: u32,
    ) -> Result<Vec<u64>, GntSt> {
        let d = self.target(ld, dom)?;
        let t = &self.domains.get(&d).ok_or(GntSt::BadDomain)?.table;
        if nr_frames > t.nr_status_frames() {
            return Err(GntSt::GeneralError);
        }
        Ok(t.status[..nr_frames as usize].to_vec())
    }

    /// `GNTTABOP_get_version`: `-ESRCH` for an unknown domain, `-EPERM` for another
    /// domain's table without privilege.
    pub fn get_version(&self, ld: DomId, dom: DomId) -> Result<u32, i64> {
        match self.target(ld, dom) {
            Ok(d) => Ok(self.domains.get(&d).map_or(1, |d| d.table.version)),
            Err(GntSt::PermissionDenied) => Err(-errno::EPERM),
            Err(_) => Err(-errno::ESRCH),
        }
    }

    /// `GNTTABOP_set_version` for the caller's own table (Xen's `gnttab_set_version`):
    /// only while no entry beyond the 8 reserved ones is pinned; the reserved entries
    /// are carried over, every other entry is cleared.
    pub fn set_version<H: GrantMemory + FrameAlloc + ?Sized>(
        &mut self,
        ld: DomId,
        version: u32,
        host: &mut H,
    ) -> SetVersionOutcome {
        let Some(d) = self.domains.get_mut(&ld).filter(|d| !d.dying) else {
            return SetVersionOutcome {
                version: 0,
                ret: -errno::ESRCH,
            };
        };
        let t = &mut d.table;
        let out = |t: &GrantTable, ret| SetVersionOutcome {
            version: t.version,
            ret,
        };
        if version != 1 && version != 2 {
            return out(t, -errno::EINVAL);
        }
        if version == 2 && t.max_version == 1 {
            return out(t, -errno::ENOSYS);
        }
        if t.version == version {
            return out(t, 0);
        }
        let nr_ents = t.nr_entries() as usize;
        if t.active[..nr_ents]
            .iter()
            .skip(GNTTAB_NR_RESERVED_ENTRIES as usize)
            .any(|a| a.pin != 0)
        {
            return out(t, -errno::EBUSY);
        }
        let nres = GNTTAB_NR_RESERVED_ENTRIES;
        if t.version == 1 {
            // Populate the status frames.
            let need = grant_to_status_frames(t.nr_frames());
            let mut new = Vec::new();
            for _ in t.nr_status_frames()..need {
                match host.alloc_frame() {
                    Some(f) => {
                        host.zero_frame(f);
                        new.push(f);
                    }
                    None => {
                        for f in new {
                            host.free_frame(f);
                        }
                        return out(t, -errno::ENOMEM);
                    }
                }
            }
            t.status.extend(new);
        } else {
            for i in 0..nres {
                let (m, o) = t.entry_loc(i);
                let ty = host.load_u16(m, o) & GTF_TYPE_MASK;
                if (ty == GTF_PERMIT_ACCESS && host.load_u64(m, o + 8) >> 32 != 0)
                    || ty == GTF_TRANSITIVE
                {
                    return out(t, -errno::ERANGE);
                }
            }
        }
        // Save the reserved entries in v1 form.
        let mut saved = [0u64; GNTTAB_NR_RESERVED_ENTRIES as usize];
        for (i, s) in saved.iter_mut().enumerate() {
            let i = i as u32;
            let (m, o) = t.entry_loc(i);
            *s = if t.version == 1 {
                host.load_u64(m, o)
            } else {
                let (flags, domid) = split_hdr(host.load_u32(m, o));
                if flags & GTF_TYPE_MASK == GTF_PERMIT_ACCESS {
                    let st = t.status_loc(i).map_or(0, |(sm, so)| host.load_u16(sm, so));
                    let frame = host.load_u64(m, o + 8) as u32;
                    u64::from(flags | st) | u64::from(domid) << 16 | u64::from(frame) << 32
                } else {
                    0
                }
            };
        }
        if version == 1 {
            for f in core::mem::take(&mut t.status) {
                host.free_frame(f);
            }
        }
        for f in &t.shared {
            host.zero_frame(*f);
        }
        t.version = version;
        for (i, s) in saved.iter().enumerate() {
            let i = i as u32;
            let (m, o) = t.entry_loc(i);
            if version == 1 {
                host.store_u64(m, o, *s);
            } else {
                let flags = *s as u16;
                let rw = GTF_READING | GTF_WRITING;
                if let Some((sm, so)) = t.status_loc(i) {
                    host.store_u16(sm, so, flags & rw);
                }
                let hdr = (*s & 0xffff_0000) | u64::from(flags & !rw);
                host.store_u64(m, o, hdr);
                host.store_u64(m, o + 8, *s >> 32);
            }
        }
        out(t, 0)
    }

    /// `GNTTABOP_swap_grant_ref`: swaps two unpinned entries of `ld`'s own table.
    pub fn swap_grant_ref<H: GrantMemory + ?Sized>(
        &mut self,
        ld: DomId,
        a: u32,
        b: u32,
        host: &mut H,
    ) -> Result<(), GntSt> {
        let t = &self.live(ld).ok_or(GntSt::GeneralError)?.table;
        if a >= t.nr_entries() || b >= t.nr_entries() {
            return Err(GntSt::BadGntref);
        }
        if a == b {
            return Ok(());
        }
        if t.active[a as usize].pin != 0 || t.active[b as usize].pin != 0 {
            return Err(GntSt::Eagain);
        }
        let (ma, oa) = t.entry_loc(a);
        let (mb, ob) = t.entry_loc(b);
        let words = if t.version == 1 { 1 } else { 2 };
        for w in 0..words {
            let x = host.load_u64(ma, oa + 8 * w);
            let y = host.load_u64(mb, ob + 8 * w);
            host.store_u64(ma, oa + 8 * w, y);
            host.store_u64(mb, ob + 8 * w, x);
        }
        if t.version == 2 {
            if let (Some((sa, xa)), Some((sb, xb))) = (t.status_loc(a), t.status_loc(b)) {
                let x = host.load_u16(sa, xa);
                let y = host.load_u16(sb, xb);
                host.store_u16(sa, xa, y);
                host.store_u16(sb, xb, x);
            }
        }
        Ok(())
    }

    /// `add_to_physmap(XENMAPSPACE_grant_table, idx)` support (Xen's
    /// `gnttab_map_frame_begin`): the machine frame of shared frame `idx`, or with
    /// [`XENMAPIDX_GRANT_TABLE_STATUS`] in a v2 table, of status frame
    /// `idx & !XENMAPIDX_GRANT_TABLE_STATUS`; the table grows on demand up to its
    /// maximum. `-EINVAL` beyond it (or if frames ran out).
    pub fn table_frame<H: GrantMemory + FrameAlloc + ?Sized>(
        &mut self,
        id: DomId,
        idx: u32,
        host: &mut H,
    ) -> Result<u64, i64> {
        let Some(d) = self.domains.get_mut(&id).filter(|d| !d.dying) else {
            return Err(-errno::ESRCH);
        };
        let t = &mut d.table;
        if t.version == 2 && idx & XENMAPIDX_GRANT_TABLE_STATUS != 0 {
            let idx = idx & !XENMAPIDX_GRANT_TABLE_STATUS;
            if idx >= t.nr_status_frames() {
                let nr_grant = (u64::from(idx) + 1) * u64::from(STATUS_PER_FRAME / V2_PER_FRAME);
                if nr_grant <= u64::from(t.max_frames) {
                    let _ = grow(t, nr_grant as u32, host);
                }
            }
            return t.status.get(idx as usize).copied().ok_or(-errno::EINVAL);
        }
        if idx >= t.nr_frames() && u64::from(idx) < u64::from(t.max_frames) {
            let _ = grow(t, idx + 1, host);
        }
        t.shared.get(idx as usize).copied().ok_or(-errno::EINVAL)
    }

    /// Live mapping `handle` of `ld`.
    pub fn mapping(&self, ld: DomId, handle: u32) -> Option<MaptrackEntry> {
        self.domains.get(&ld)?.maptrack.get(handle).copied()
    }
}

/// Removes a whole map increment (several counters at once).
fn pin_dec_all(mut pin: u32, incr: u32) -> u32 {
    for part in [PIN_HSTW, PIN_HSTR, PIN_DEVW, PIN_DEVR] {
        if incr & (part * 0xff) != 0 {
            pin = pin_dec(pin, part);
        }
    }
    pin
}
