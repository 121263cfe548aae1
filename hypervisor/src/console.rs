//! The serial console as the hypervisor crate sees it: the image installs the writer,
//! guest console lines go out with a `(d<id>) ` prefix next to the hypervisor's log.

static WRITER: spin::Once<fn(core::fmt::Arguments<'_>)> = spin::Once::new();
static READER: spin::Once<fn() -> Option<u8>> = spin::Once::new();

/// Installs the function that returns a byte typed on the console, if any (once).
pub fn install_reader(reader: fn() -> Option<u8>) {
    READER.call_once(|| reader);
}

/// A byte of console input, if one is waiting.
pub fn read_byte() -> Option<u8> {
    READER.get().and_then(|r| r())
}

/// Installs the function that writes to the machine's console (once, at boot).
pub fn install(writer: fn(core::fmt::Arguments<'_>)) {
    WRITER.call_once(|| writer);
}

/// Prints one line of a guest's console output.
pub fn guest_line(domid: u16, line: &str) {
    if let Some(w) = WRITER.get() {
        w(format_args!("(d{domid}) {line}\n"));
    }
}
