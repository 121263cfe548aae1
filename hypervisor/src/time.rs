//! System time: nanoseconds since boot from the TSC, with the same scale factors the
//! guests get in their pvclock (`vcpu_time_info`), so that deadlines a guest computes
//! from its clock and the hypervisor's own clock agree exactly.

use crate::arch::x86;

/// The TSC-to-nanoseconds scale: `ns = ((delta << shift) * mul) >> 32` (a negative
/// shift shifts right), the pvclock formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    /// Multiplier (32.32 fixed point, below 1.0).
    pub mul: u32,
    /// Pre-shift of the TSC delta.
    pub shift: i8,
}

impl Scale {
    /// The scale for a TSC running at `tsc_hz`.
    pub fn for_hz(tsc_hz: u64) -> Scale {
        const NS: u64 = 1_000_000_000;
        let mut tps = tsc_hz.max(1);
        let mut shift: i8 = 0;
        while tps >= 2 * NS {
            tps >>= 1;
            shift -= 1;
        }
        while tps <= NS {
            tps <<= 1;
            shift += 1;
        }
        Scale {
            mul: ((u128::from(NS) << 32) / u128::from(tps)) as u32,
            shift,
        }
    }

    /// Nanoseconds for `delta` TSC ticks.
    pub fn apply(self, delta: u64) -> u64 {
        let d = if self.shift >= 0 {
            delta << self.shift
        } else {
            delta >> -self.shift
        };
        ((u128::from(d) * u128::from(self.mul)) >> 32) as u64
    }
}

#[derive(Clone, Copy)]
struct Clock {
    tsc0: u64,
    tsc_khz: u64,
    scale: Scale,
}

static CLOCK: spin::Once<Clock> = spin::Once::new();

/// Starts system time now, with a TSC of `tsc_khz` (calibrated by the image).
pub fn init(tsc_khz: u64) {
    CLOCK.call_once(|| Clock {
        tsc0: x86::rdtsc(),
        tsc_khz,
        scale: Scale::for_hz(tsc_khz * 1000),
    });
}

fn clock() -> Clock {
    *CLOCK.get().unwrap_or(&Clock {
        tsc0: 0,
        tsc_khz: 1_000_000,
        scale: Scale {
            mul: 1 << 31,
            shift: 1,
        },
    })
}

/// Nanoseconds since [`init`].
pub fn now_ns() -> u64 {
    let c = clock();
    c.scale.apply(x86::rdtsc().saturating_sub(c.tsc0))
}

/// The TSC value at system time `ns` (rounded up, so waiting until it is reached never
/// ends early).
pub fn tsc_at(ns: u64) -> u64 {
    let c = clock();
    c.tsc0 + (u128::from(ns) * u128::from(c.tsc_khz)).div_ceil(1_000_000) as u64
}

/// What a guest's pvclock holds: system time 0 at TSC `tsc0`, and the scale.
pub fn pvclock() -> (u64, Scale) {
    let c = clock();
    (c.tsc0, c.scale)
}

/// Calibrated TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    clock().tsc_khz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_converts_common_frequencies() {
        for hz in [
            100_000_000u64,
            999_999_999,
            1_000_000_000,
            2_600_000_000,
            3_999_999_999,
            10_000_000_000,
        ] {
            let s = Scale::for_hz(hz);
            // one second of ticks is one second, within 1 ppm
            let ns = s.apply(hz);
            assert!(
                ns.abs_diff(1_000_000_000) <= 1000,
                "{hz} Hz gave {ns} ns ({s:?})"
            );
            let ns = s.apply(hz * 3600);
            assert!(
                ns.abs_diff(3_600_000_000_000) <= 3_600_000,
                "{hz} Hz drifted: {ns}"
            );
        }
    }

    #[test]
    fn mul_stays_below_one() {
        for hz in [1u64, 1_000, 1_000_000_000, 1_000_000_001, u64::MAX / 4] {
            let s = Scale::for_hz(hz);
            assert!(s.shift >= -32 && s.shift <= 40, "{s:?}");
        }
    }
}
