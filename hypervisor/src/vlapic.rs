//! A virtual local APIC in x2APIC mode (MSR interface only), one per vCPU: what a
//! Linux PVH guest probes and uses (ID, version, TPR, SVR, EOI, ISR/IRR, LVTs, the
//! one-shot/periodic timer, ICR IPIs including INIT/SIPI for secondary vCPUs).
//!
//! It starts with x2APIC already enabled (as firmware may leave it), so the guest never
//! touches the xAPIC MMIO page. The timer counts at 1 GHz divided by TDCR, like Xen's
//! emulated APIC. Pure state machine: the domain applies its outputs (IPIs, wakes).

/// MSR range of the x2APIC registers.
pub const MSR_BASE: u32 = 0x800;
/// Last x2APIC MSR.
pub const MSR_LAST: u32 = 0x8ff;
/// IA32_APIC_BASE value: default base, global enable, x2APIC enable (BSP bit added per
/// vCPU).
pub const APIC_BASE_VALUE: u64 = 0xfee0_0000 | (1 << 11) | (1 << 10);

const LVT_MASKED: u32 = 1 << 16;

/// An IPI the guest sent through the ICR, for the domain to deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipi {
    /// Fixed interrupt `vector` to the vCPUs in `dest`.
    Fixed {
        /// Vector.
        vector: u8,
        /// Targets.
        dest: Dest,
    },
    /// INIT to `dest` (secondary vCPUs wait for SIPI).
    Init(Dest),
    /// Start-up IPI: begin in real mode at `vector << 12`.
    Startup {
        /// SIPI vector (page number below 1 MiB).
        vector: u8,
        /// Targets.
        dest: Dest,
    },
    /// NMI to `dest`.
    Nmi(Dest),
}

/// IPI destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// One x2APIC id (physical destination).
    One(u32),
    /// Every vCPU including the sender.
    AllIncludingSelf,
    /// Every vCPU but the sender.
    AllButSelf,
}

/// Result of a guest MSR access to the APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Done (a read returns the value).
    Ok(u64),
    /// The guest gets #GP (reserved register, read-only write, bad value).
    Fault,
    /// Done, and the guest sent this IPI.
    Sent(Ipi),
}

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct Vlapic {
    id: u32,
    base: u64,
    tpr: u32,
    svr: u32,
    esr: u32,
    icr: u64,
    /// LVT: CMCI, timer, thermal, PMC, LINT0, LINT1, error.
    lvt: [u32; 7],
    irr: [u64; 4],
    isr: [u64; 4],
    tmict: u32,
    tdcr: u32,
    /// (start ns, initial count, divide) while the timer runs.
    timer_start: Option<u64>,
}

fn divide(tdcr: u32) -> u64 {
    // TDCR bits 0,1,3: 0b111 = 1, else 2^(value+1)
    let v = (tdcr & 3) | ((tdcr >> 1) & 4);
    if v == 7 {
        1
    } else {
        2u64 << v
    }
}

impl Vlapic {
    /// The APIC of vCPU `id` after reset.
    pub fn new(id: u32) -> Vlapic {
        Vlapic {
            id,
            base: APIC_BASE_VALUE | if id == 0 { 1 << 8 } else { 0 },
            tpr: 0,
            svr: 0xff,
            esr: 0,
            icr: 0,
            lvt: [LVT_MASKED; 7],
            irr: [0; 4],
            isr: [0; 4],
            tmict: 0,
            tdcr: 0,
            timer_start: None,
        }
    }

    /// IA32_APIC_BASE.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Writes IA32_APIC_BASE: the base address and the BSP bit are fixed; leaving
    /// x2APIC mode is refused (#GP), as the architecture forbids x2APIC -> xAPIC.
    pub fn set_base(&mut self, v: u64) -> bool {
        let fixed = 0xfee0_0000 | (self.base & (1 << 8));
        if v & !(0xfee0_0000 | (1 << 8) | (1 << 10) | (1 << 11)) != 0
            || v & 0xfee0_0000 != 0xfee0_0000
        {
            return false;
        }
        if v & (1 << 10) == 0 && v & (1 << 11) != 0 {
            return false;
        }
        self.base = fixed | (v & ((1 << 10) | (1 << 11)));
        true
    }

    fn enabled(&self) -> bool {
        self.base & (1 << 11) != 0 && self.svr & 0x100 != 0
    }

    fn highest(bits: &[u64; 4]) -> Option<u8> {
        (0..4).rev().find_map(|w| {
            (bits[w] != 0).then(|| (w as u32 * 64 + 63 - bits[w].leading_zeros()) as u8)
        })
    }

    fn ppr(&self) -> u32 {
        let isrv = Self::highest(&self.isr).map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// Marks `vector` pending (from an IPI, the timer, or a device).
    pub fn raise(&mut self, vector: u8) {
        if vector >= 16 {
            self.irr[vector as usize / 64] |= 1 << (vector % 64);
        }
    }

    /// The vector to deliver next, if one beats the processor priority.
    pub fn deliverable(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = Self::highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The guest took `vector`: it moves from IRR to ISR.
    pub fn accepted(&mut self, vector: u8) {
        let (w, b) = (vector as usize / 64, vector % 64);
        self.irr[w] &= !(1 << b);
        self.isr[w] |= 1 << b;
    }

    /// Absolute time (ns) the timer expires, if armed.
    pub fn timer_deadline(&self) -> Option<u64> {
        let start = self.timer_start?;
        Some(start + u64::from(self.tmict) * divide(self.tdcr))
    }

    /// The timer expired at `now`: raise its vector (unless masked) and re-arm a
    /// periodic timer.
    pub fn timer_fire(&mut self, now: u64) {
        let Some(deadline) = self.timer_deadline() else {
            return;
        };
        if deadline > now {
            return;
        }
        let lvt = self.lvt[1];
        if lvt & LVT_MASKED == 0 {
            self.raise(lvt as u8);
        }
        let period = u64::from(self.tmict) * divide(self.tdcr);
        self.timer_start = if (lvt >> 17) & 3 == 1 && period > 0 {
            let missed = (now - deadline) / period;
            Some(deadline + missed * period)
        } else {
            None
        };
    }

    /// Reads x2APIC MSR `msr` at time `now`.
    pub fn read(&self, msr: u32, now: u64) -> Access {
        let v: u64 = match msr - MSR_BASE {
            0x02 => u64::from(self.id),
            0x03 => 0x0005_0014, // version 0x14, 6 LVT entries (max LVT 5)... plus CMCI
            0x08 => u64::from(self.tpr),
            0x0a => u64::from(self.ppr()),
            0x0d => u64::from(((self.id >> 4) << 16) | (1 << (self.id & 0xf))),
            0x0f => u64::from(self.svr),
            r @ 0x10..=0x17 => self.bitmap_word(&self.isr, r - 0x10),
            0x18..=0x1f => 0,
            r @ 0x20..=0x27 => self.bitmap_word(&self.irr, r - 0x20),
            0x28 => u64::from(self.esr),
            0x2f => u64::from(self.lvt[0]),
            0x30 => self.icr,
            r @ 0x32..=0x37 => u64::from(self.lvt[(r - 0x31) as usize]),
            0x38 => u64::from(self.tmict),
            0x39 => match self.timer_deadline() {
                Some(d) if d > now => (d - now) / divide(self.tdcr),
                _ => 0,
            },
            0x3e => u64::from(self.tdcr),
            _ => return Access::Fault,
        };
        Access::Ok(v)
    }

    fn bitmap_word(&self, bits: &[u64; 4], i: u32) -> u64 {
        (bits[i as usize / 2] >> ((i % 2) * 32)) & 0xffff_ffff
    }

    /// Writes x2APIC MSR `msr` with `v` at time `now`.
    pub fn write(&mut self, msr: u32, v: u64, now: u64) -> Access {
        let r = msr - MSR_BASE;
        if r != 0x30 && v >> 32 != 0 {
            return Access::Fault;
        }
        let v32 = v as u32;
        match r {
            0x08 => self.tpr = v32 & 0xff,
            0x0b => {
                if v32 != 0 {
                    return Access::Fault;
                }
                if let Some(vec) = Self::highest(&self.isr) {
                    self.isr[vec as usize / 64] &= !(1 << (vec % 64));
                }
            }
            0x0f => self.svr = v32 & 0x11ff,
            0x28 => self.esr = 0,
            0x2f => self.lvt[0] = v32 & 0x1_07ff,
            0x30 => {
                self.icr = v & !(1 << 12);
                return self.icr_send(v);
            }
            0x32 => {
                self.lvt[1] = v32 & 0x7_10ff;
            }
            r @ 0x33..=0x37 => self.lvt[(r - 0x31) as usize] = v32 & 0x1_17ff,
            0x38 => {
                self.tmict = v32;
                self.timer_start = (v32 != 0).then_some(now);
            }
            0x3e => self.tdcr = v32 & 0xb,
            0x3f => {
                self.raise(v32 as u8);
                return Access::Ok(0);
            }
            _ => return Access::Fault,
        }
        Access::Ok(0)
    }

    fn icr_send(&mut self, v: u64) -> Access {
        let vector = v as u8;
        let dest = match (v >> 18) & 3 {
            0 => Dest::One((v >> 32) as u32),
            1 => Dest::One(self.id),
            2 => Dest::AllIncludingSelf,
            _ => Dest::AllButSelf,
        };
        let ipi = match (v >> 8) & 7 {
            0 | 1 => Ipi::Fixed { vector, dest },
            4 => Ipi::Nmi(dest),
            5 => {
                // INIT level de-assert (trigger level, level 0) does nothing
                if (v >> 15) & 1 == 1 && (v >> 14) & 1 == 0 {
                    return Access::Ok(0);
                }
                Ipi::Init(dest)
            }
            6 => Ipi::Startup { vector, dest },
            _ => return Access::Fault,
        };
        Access::Sent(ipi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_version() {
        let a = Vlapic::new(3);
        assert_eq!(a.read(0x802, 0), Access::Ok(3));
        assert_eq!(a.read(0x80d, 0), Access::Ok(1 << 3));
        assert_eq!(a.base() & (1 << 8), 0);
        assert_ne!(Vlapic::new(0).base() & (1 << 8), 0);
        assert_eq!(a.read(0x801, 0), Access::Fault);
    }

    #[test]
    fn priority_and_eoi() {
        let mut a = Vlapic::new(0);
        assert_eq!(a.deliverable(), None); // software-disabled
        a.write(0x80f, 0x1ff, 0);
        a.raise(0x31);
        a.raise(0x51);
        assert_eq!(a.deliverable(), Some(0x51));
        a.accepted(0x51);
        assert_eq!(a.deliverable(), None); // 0x31 is below the in-service class
        a.write(0x80b, 0, 0);
        assert_eq!(a.deliverable(), Some(0x31));
        a.write(0x808, 0x40, 0);
        assert_eq!(a.deliverable(), None);
        assert_eq!(a.write(0x80b, 1, 0), Access::Fault);
    }

    #[test]
    fn one_shot_and_periodic_timer() {
        let mut a = Vlapic::new(0);
        a.write(0x80f, 0x1ff, 0);
        a.write(0x83e, 0xb, 0); // divide by 1
        a.write(0x832, 0xef, 0); // one-shot, vector 0xef
        a.write(0x838, 1000, 100);
        assert_eq!(a.timer_deadline(), Some(1100));
        assert_eq!(a.read(0x839, 600), Access::Ok(500));
        a.timer_fire(1100);
        assert_eq!(a.deliverable(), Some(0xef));
        assert_eq!(a.timer_deadline(), None);
        a.write(0x832, 0xef | (1 << 17), 2000); // periodic
        a.write(0x838, 100, 2000);
        a.timer_fire(2350);
        assert_eq!(a.timer_deadline(), Some(2400));
    }

    #[test]
    fn icr_ipis() {
        let mut a = Vlapic::new(0);
        assert_eq!(
            a.write(0x830, (2u64 << 32) | 0x4500, 0),
            Access::Sent(Ipi::Init(Dest::One(2)))
        );
        assert_eq!(
            a.write(0x830, (2u64 << 32) | 0x4608, 0),
            Access::Sent(Ipi::Startup {
                vector: 8,
                dest: Dest::One(2)
            })
        );
        assert_eq!(
            a.write(0x830, (3 << 18) | 0xf3, 0),
            Access::Sent(Ipi::Fixed {
                vector: 0xf3,
                dest: Dest::AllButSelf
            })
        );
        assert_eq!(a.write(0x830, 0x8500, 0), Access::Ok(0)); // INIT de-assert
    }

    #[test]
    fn base_msr_rules() {
        let mut a = Vlapic::new(1);
        assert!(!a.set_base(0xfee0_0000 | (1 << 11))); // x2APIC -> xAPIC refused
        assert!(a.set_base(0xfee0_0000 | (1 << 11) | (1 << 10)));
        assert!(!a.set_base(0xdead_0000 | (1 << 11) | (1 << 10)));
    }
}
