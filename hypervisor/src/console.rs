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
