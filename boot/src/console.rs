//! The serial console (COM1) and the `log` backend.
//!
//! Hypervisor lines look like `(XEN) [   1.234] INFO message`... without the Xen: the
//! prefix is `(HV)`; guest consoles are printed by the hypervisor crate as `(dN) ...`.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

struct Serial(Option<Uart16550<PioBackend>>);

static SERIAL: Mutex<Serial> = Mutex::new(Serial(None));

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(u) = self.0.as_mut() {
            for b in s.bytes() {
                if b == b'\n' {
                    u.send_bytes_exact(b"\r\n");
                } else {
                    u.send_bytes_exact(&[b]);
                }
            }
        }
        Ok(())
    }
}

/// Initialises COM1 at 0x3f8 (115200 8N1).
pub fn init() {
    // SAFETY: COM1's eight ports at 0x3f8 belong to the hypervisor, which is the only
    // software on the machine.
    let uart = unsafe { Uart16550::new_port(0x3f8) };
    if let Ok(mut u) = uart {
        if u.init(Config::default()).is_ok() {
            SERIAL.lock().0 = Some(u);
        }
    }
    log::set_logger(&LOGGER).ok();
    log::set_max_level(log::LevelFilter::Info);
    hypervisor::console::install(write_fmt);
    hypervisor::console::install_reader(read_byte);
}

/// A received byte, if the UART has one.
pub fn read_byte() -> Option<u8> {
    SERIAL.lock().0.as_mut()?.try_receive_byte().ok()
}

/// Writes formatted text to the console.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let _ = SERIAL.lock().write_fmt(args);
}

/// Takes the console even if a CPU died holding its lock (panic/exception paths).
pub fn force_write_fmt(args: fmt::Arguments<'_>) {
    // SAFETY: only called on the way to stopping the machine; the lock holder (if any)
    // is this CPU, interrupted, and will never run again.
    unsafe { SERIAL.force_unlock() };
    write_fmt(args);
}

/// Sets the log level from the hypervisor command line (`loglvl=debug|info|warn|error`).
pub fn set_level(name: &str) {
    let l = match name {
        "trace" => log::LevelFilter::Trace,
        "debug" => log::LevelFilter::Debug,
        "warn" => log::LevelFilter::Warn,
        "error" => log::LevelFilter::Error,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(l);
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            hypervisor::console::close_open_line();
            let t = crate::time::uptime_ms();
            write_fmt(format_args!(
                "(HV) [{:4}.{:03}] {:5} {}\n",
                t / 1000,
                t % 1000,
                r.level(),
                r.args()
            ));
        }
    }
    fn flush(&self) {}
}
