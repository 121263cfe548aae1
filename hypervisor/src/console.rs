//! The serial console as the hypervisor crate sees it: the image installs the writer,
//! guest console output goes out as it arrives, each line started with a `(d<id>) `
//! prefix (partial lines too, so an interactive prompt shows before its newline).
//! A hypervisor log line first closes a guest line left open.

use core::sync::atomic::{AtomicU32, Ordering};

static WRITER: spin::Once<fn(core::fmt::Arguments<'_>)> = spin::Once::new();
static READER: spin::Once<fn() -> Option<u8>> = spin::Once::new();
/// Domain whose console line is open (its last byte was not a newline), or 0.
static OPEN_LINE: AtomicU32 = AtomicU32::new(0);

/// Installs the function that writes to the machine's console (once, at boot).
pub fn install(writer: fn(core::fmt::Arguments<'_>)) {
    WRITER.call_once(|| writer);
}

/// Installs the function that returns a byte typed on the console, if any (once).
pub fn install_reader(reader: fn() -> Option<u8>) {
    READER.call_once(|| reader);
}

/// A byte of console input, if one is waiting.
pub fn read_byte() -> Option<u8> {
    READER.get().and_then(|r| r())
}

/// Ends a guest line left open, so that what follows starts on a line of its own.
pub fn close_open_line() {
    if OPEN_LINE.swap(0, Ordering::Relaxed) != 0 {
        if let Some(w) = WRITER.get() {
            w(format_args!("\n"));
        }
    }
}

/// Prints guest console output: printable ASCII, tab and newline pass, carriage
/// returns and NULs are dropped, anything else shows as `.`.
pub fn guest_output(domid: u16, bytes: &[u8]) {
    let Some(w) = WRITER.get() else { return };
    let id = u32::from(domid);
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let text: alloc::string::String = line
            .iter()
            .filter(|&&c| c != b'\r' && c != 0 && c != b'\n')
            .map(|&c| {
                if (0x20..0x7f).contains(&c) || c == b'\t' {
                    c as char
                } else {
                    '.'
                }
            })
            .collect();
        let ends = line.last() == Some(&b'\n');
        if text.is_empty() && !ends {
            continue;
        }
        let open = OPEN_LINE.load(Ordering::Relaxed);
        if open != id {
            if open != 0 {
                w(format_args!("\n"));
            }
            w(format_args!("(d{domid}) "));
        }
        w(format_args!("{text}{}", if ends { "\n" } else { "" }));
        OPEN_LINE.store(if ends { 0 } else { id }, Ordering::Relaxed);
    }
}

/// Where typed input goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    /// A domain's console.
    Domain(u16),
    /// The hypervisor's debug keys.
    Hypervisor,
}

/// What a typed byte means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Typed {
    /// Input for that domain's console.
    ToDomain(u16, u8),
    /// A debug key for the hypervisor.
    DebugKey(u8),
    /// Three Ctrl-A in a row: the input focus moved.
    Switched(Focus),
}

/// Console input switching, as Xen's: three Ctrl-A in a row move the input focus to
/// the next domain, then to the hypervisor (whose keys are debug keys), then back to
/// the first domain. A Ctrl-A not followed by two more is passed on.
#[derive(Debug)]
pub struct InputSwitch {
    ctrl_a: u8,
    focus: Option<Focus>,
}

impl Default for InputSwitch {
    fn default() -> Self {
        Self::new()
    }
}

const CTRL_A: u8 = 0x01;

impl InputSwitch {
    /// Input goes to the first domain until switched.
    pub const fn new() -> InputSwitch {
        InputSwitch {
            ctrl_a: 0,
            focus: None,
        }
    }

    /// The current focus given the running `domains` (ids in order).
    pub fn focus(&self, domains: &[u16]) -> Option<Focus> {
        match self.focus {
            Some(Focus::Domain(id)) if domains.contains(&id) => Some(Focus::Domain(id)),
            Some(Focus::Hypervisor) => Some(Focus::Hypervisor),
            _ => domains.first().map(|&id| Focus::Domain(id)),
        }
    }

    /// Interprets one typed byte; may yield up to three results (held Ctrl-As
    /// released by a byte that breaks the sequence).
    pub fn feed(&mut self, b: u8, domains: &[u16]) -> heapless_vec::Out {
        let mut out = heapless_vec::Out::default();
        if b == CTRL_A {
            self.ctrl_a += 1;
            if self.ctrl_a == 3 {
                self.ctrl_a = 0;
                let next = match self.focus(domains) {
                    Some(Focus::Domain(id)) => {
                        let i = domains.iter().position(|&d| d == id).unwrap_or(0);
                        domains
                            .get(i + 1)
                            .map_or(Focus::Hypervisor, |&d| Focus::Domain(d))
                    }
                    Some(Focus::Hypervisor) | None => domains
                        .first()
                        .map_or(Focus::Hypervisor, |&d| Focus::Domain(d)),
                };
                self.focus = Some(next);
                out.push(Typed::Switched(next));
            }
            return out;
        }
        let held = core::mem::take(&mut self.ctrl_a);
        let deliver = |c: u8, out: &mut heapless_vec::Out, f: Option<Focus>| match f {
            Some(Focus::Domain(id)) => out.push(Typed::ToDomain(id, c)),
            Some(Focus::Hypervisor) => out.push(Typed::DebugKey(c)),
            None => {}
        };
        let f = self.focus(domains);
        for _ in 0..held {
            deliver(CTRL_A, &mut out, f);
        }
        deliver(b, &mut out, f);
        out
    }
}

/// A tiny fixed-capacity list for [`InputSwitch::feed`].
pub mod heapless_vec {
    use super::Typed;

    /// Up to three results.
    #[derive(Debug, Default)]
    pub struct Out {
        items: [Option<Typed>; 3],
        len: usize,
    }

    impl Out {
        pub(super) fn push(&mut self, t: Typed) {
            if self.len < self.items.len() {
                self.items[self.len] = Some(t);
                self.len += 1;
            }
        }
    }

    impl Iterator for Out {
        type Item = Typed;
        fn next(&mut self) -> Option<Typed> {
            let first = self.items.first_mut()?.take();
            self.items.rotate_left(1);
            first
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(s: &mut InputSwitch, bytes: &[u8], doms: &[u16]) -> Vec<Typed> {
        bytes.iter().flat_map(|&b| s.feed(b, doms)).collect()
    }

    #[test]
    fn typing_goes_to_the_first_domain() {
        let mut s = InputSwitch::new();
        assert_eq!(
            feed_all(&mut s, b"ls", &[1, 2]),
            [Typed::ToDomain(1, b'l'), Typed::ToDomain(1, b's')]
        );
    }

    #[test]
    fn three_ctrl_a_cycle_domains_then_the_hypervisor() {
        let mut s = InputSwitch::new();
        let d = [1, 2];
        assert_eq!(
            feed_all(&mut s, &[1, 1, 1], &d),
            [Typed::Switched(Focus::Domain(2))]
        );
        assert_eq!(feed_all(&mut s, b"x", &d), [Typed::ToDomain(2, b'x')]);
        assert_eq!(
            feed_all(&mut s, &[1, 1, 1], &d),
            [Typed::Switched(Focus::Hypervisor)]
        );
        assert_eq!(feed_all(&mut s, b"h", &d), [Typed::DebugKey(b'h')]);
        assert_eq!(
            feed_all(&mut s, &[1, 1, 1], &d),
            [Typed::Switched(Focus::Domain(1))]
        );
    }

    #[test]
    fn a_broken_sequence_passes_the_ctrl_a_on() {
        let mut s = InputSwitch::new();
        assert_eq!(
            feed_all(&mut s, &[1, 1, b'c'], &[3]),
            [
                Typed::ToDomain(3, 1),
                Typed::ToDomain(3, 1),
                Typed::ToDomain(3, b'c')
            ]
        );
    }

    #[test]
    fn focus_falls_back_when_the_domain_is_gone() {
        let mut s = InputSwitch::new();
        feed_all(&mut s, &[1, 1, 1], &[1, 2]);
        assert_eq!(s.focus(&[1]), Some(Focus::Domain(1)));
        assert_eq!(s.focus(&[]), None);
    }
}
