//! Reading the Linux guest's command protocol out of the serial output, line by line.
//!
//! The guest's `/init` prints [`INIT_UP`], then (command mode) [`INIT_RUNNING`], the
//! command's output, and `FERRO-EXIT <status>` ([`EXIT_MARKER`]). Under the hypervisor
//! the guest's console lines carry a `(d<domid>) ` prefix, which is taken off; lines of
//! the hypervisor itself (`(HV) ...`) or of other domains are not the command's output
//! and come out as [`Event::Diagnostic`]. On bare QEMU every line is the guest's.
//!
//! The first `FERRO-EXIT <n>` line after [`INIT_RUNNING`] ends the command, also when
//! text precedes it on the line (a command whose output does not end with a newline):
//! that text is the output's last line.

use ferrovisor_tests::{console_text, EXIT_MARKER, INIT_RUNNING, INIT_UP};

/// Where the serial output comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The hypervisor, with the guest as domain `domid`.
    Hypervisor {
        /// The guest's domain id.
        domid: u32,
    },
    /// The guest kernel booted directly by QEMU.
    Bare,
}

/// What one serial line meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `/init` is up.
    Up,
    /// The command starts.
    Running,
    /// A line of the command's output.
    Output(String),
    /// A line of the hypervisor (or of another domain) while the command runs.
    Diagnostic(String),
    /// The command ended with this status.
    Exit(i32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Booting,
    Running,
    Finished,
}

/// The parser: feed it serial lines in order.
#[derive(Clone, Debug)]
pub struct Transcript {
    source: Source,
    state: State,
}

/// `Some((text before, status))` when `text` ends with `FERRO-EXIT <digits>`.
pub fn exit_marker(text: &str) -> Option<(&str, i32)> {
    let text = text.trim_end();
    let at = text.rfind(EXIT_MARKER)?;
    let digits = text[at + EXIT_MARKER.len()..].strip_prefix(' ')?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((&text[..at], digits.parse().ok()?))
}

impl Transcript {
    /// A parser for serial output from `source`.
    pub fn new(source: Source) -> Transcript {
        Transcript {
            source,
            state: State::Booting,
        }
    }

    /// Whether the command has started (its `FERRO-EXIT` may have been seen too).
    pub fn started(&self) -> bool {
        self.state != State::Booting
    }

    /// The guest's text of a serial line, or `None` for a line that is not the guest's.
    fn guest_text<'a>(&self, line: &'a str) -> Option<&'a str> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match self.source {
            Source::Bare => Some(line),
            Source::Hypervisor { domid } => match console_text(line) {
                (Some(d), text) if d == domid => Some(text),
                (Some(_), _) => None,
                (None, _) if line.starts_with("(HV)") => None,
                // Not prefixed: take it as the guest's (a raw console).
                (None, text) => Some(text),
            },
        }
    }

    /// Reads one serial line (without its `\n`) and says what it meant.
    pub fn feed(&mut self, line: &str) -> Vec<Event> {
        let text = self.guest_text(line);
        match (self.state, text) {
            (State::Booting, Some(t)) if t.trim_end() == INIT_RUNNING => {
                self.state = State::Running;
                vec![Event::Running]
            }
            (State::Booting, Some(t)) if t.starts_with(INIT_UP) => vec![Event::Up],
            (State::Running, Some(t)) => match exit_marker(t) {
                Some((before, status)) => {
                    self.state = State::Finished;
                    let mut v = Vec::new();
                    if !before.is_empty() {
                        v.push(Event::Output(before.to_string()));
                    }
                    v.push(Event::Exit(status));
                    v
                }
                None => vec![Event::Output(t.to_string())],
            },
            (State::Running, None) => {
                let line = line.strip_suffix('\r').unwrap_or(line);
                vec![Event::Diagnostic(line.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(source: Source, serial: &str) -> Vec<Event> {
        let mut t = Transcript::new(source);
        serial.lines().flat_map(|l| t.feed(l)).collect()
    }

    fn out(s: &str) -> Event {
        Event::Output(s.into())
    }

    #[test]
    fn bare_output_between_the_markers() {
        let serial = "[    0.1] Linux version\r\nferro-init: up (6.1, 0.9 s)\r\n\
                      ferro-init: running command\r\nLinux version 6.1\r\n\r\n\
                      FERRO-EXIT 3\r\n[    2.0] reboot: Power down\r\n";
        assert_eq!(
            run(Source::Bare, serial),
            [
                Event::Up,
                Event::Running,
                out("Linux version 6.1"),
                out(""),
                Event::Exit(3)
            ]
        );
    }

    #[test]
    fn hypervisor_prefixes_are_stripped_and_its_lines_kept_apart() {
        let serial = "(HV) ferrovisor\n(d1) ferro-init: up\n(d1) ferro-init: running command\n\
                      (d1) (d1) x\n(HV) warning: odd hypercall\n(d2) other\nraw line\n\
                      (d1) FERRO-EXIT 0\n(HV) all domains finished: 1 ok, 0 failed\n";
        assert_eq!(
            run(Source::Hypervisor { domid: 1 }, serial),
            [
                Event::Up,
                Event::Running,
                out("(d1) x"),
                Event::Diagnostic("(HV) warning: odd hypercall".into()),
                Event::Diagnostic("(d2) other".into()),
                out("raw line"),
                Event::Exit(0)
            ]
        );
    }

    #[test]
    fn output_without_a_final_newline_and_late_markers() {
        let serial = "ferro-init: running command\nabcFERRO-EXIT 1\nFERRO-EXIT 2\n";
        assert_eq!(
            run(Source::Bare, serial),
            [Event::Running, out("abc"), Event::Exit(1)]
        );
        // Before the running marker nothing counts.
        assert_eq!(run(Source::Bare, "FERRO-EXIT 0\nhello\n"), []);
    }

    #[test]
    fn exit_markers_need_a_number() {
        assert_eq!(exit_marker("FERRO-EXIT 0"), Some(("", 0)));
        assert_eq!(exit_marker("FERRO-EXIT 255  "), Some(("", 255)));
        assert_eq!(exit_marker("x FERRO-EXIT 7"), Some(("x ", 7)));
        assert_eq!(exit_marker("FERRO-EXIT $status"), None);
        assert_eq!(exit_marker("FERRO-EXIT"), None);
        assert_eq!(exit_marker("FERRO-EXIT 1x"), None);
        assert_eq!(exit_marker("FERRO-EXIT -1"), None);
    }
}
