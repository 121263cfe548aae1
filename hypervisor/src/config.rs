//! Domain configuration in `xl.cfg` syntax (the subset Xen users write for PVH
//! guests; see `man xl.cfg`).
//!
//! Syntax: `KEY = VALUE` statements, one per line or separated by `;`. A value is a
//! `"double"` or `'single'` quoted string (backslash escapes `\\ \" \' \n \t \r \xHH`),
//! an integer (decimal or `0x` hex) or a `[ ... ]` list of strings/integers separated
//! by commas (it may span lines; a trailing comma is allowed). `#` starts a comment.
//! As in xl, a key given twice takes its last value; unknown keys are reported as
//! warnings, not errors.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// What to do when a domain powers off, reboots or crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Destroy the domain.
    Destroy,
    /// Destroy it and start it again from the same configuration.
    Restart,
    /// Leave it in memory (for inspection).
    Preserve,
}

/// A parsed domain configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// `name` (required).
    pub name: String,
    /// `kernel`: the kernel image's name (required).
    pub kernel: String,
    /// `ramdisk`: the initial ramdisk's name.
    pub ramdisk: Option<String>,
    /// The kernel command line: `cmdline`, else built from `root` and `extra` as xl
    /// does (`root=<root> <extra>`), else empty.
    pub cmdline: String,
    /// `memory` in MiB (default 128).
    pub memory_mib: u64,
    /// `vcpus` (default 1, at most 128).
    pub vcpus: u32,
    /// `vif`: one raw specification string per network interface.
    pub vifs: Vec<String>,
    /// `uuid` (Xen's domain handle), or [`abi::ferro::default_uuid`] of the name.
    pub uuid: [u8; 16],
    /// `pci`: PCI devices given to the domain, as (bus, device, function) on
    /// segment 0 (xl's `[SSSS:]BB:DD.F` syntax; per-device options are refused).
    pub pci: Vec<(u8, u8, u8)>,
    /// `on_poweroff` (default destroy).
    pub on_poweroff: Action,
    /// `on_reboot` (default restart).
    pub on_reboot: Action,
    /// `on_crash` (default destroy).
    pub on_crash: Action,
    /// `test_interface` (ferrovisor extension, 0 or 1): answer the project's test
    /// hypercalls for this domain.
    pub test_interface: bool,
    /// `evtchn_fifo` (ferrovisor extension, 0 or 1, default 1): offer the FIFO
    /// event-channel ABI; 0 refuses `EVTCHNOP_init_control` so the guest keeps 2-level.
    pub evtchn_fifo: bool,
    /// Things worth telling the user that are not errors (unknown keys, ignored ones).
    pub warnings: Vec<String>,
}

/// A configuration error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of the problem; 0 when it concerns the whole file (a missing key).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        line,
        message: message.into(),
    })
}

/// Largest `memory` accepted: 16 TiB.
const MAX_MEMORY_MIB: u64 = 1 << 24;
/// Largest `vcpus` / `maxvcpus` accepted.
pub const MAX_VCPUS: u32 = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(u64),
    Eq,
    LBracket,
    RBracket,
    Comma,
    Semi,
    Newline,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(_) => "a string".to_owned(),
            Tok::Int(_) => "an integer".to_owned(),
            Tok::Eq => "`=`".to_owned(),
            Tok::LBracket => "`[`".to_owned(),
            Tok::RBracket => "`]`".to_owned(),
            Tok::Comma => "`,`".to_owned(),
            Tok::Semi => "`;`".to_owned(),
            Tok::Newline => "the end of the line".to_owned(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ConfigError> {
    let mut toks = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                toks.push((Tok::Newline, line));
                line += 1;
            }
            c if c.is_whitespace() => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '=' => toks.push((Tok::Eq, line)),
            '[' => toks.push((Tok::LBracket, line)),
            ']' => toks.push((Tok::RBracket, line)),
            ',' => toks.push((Tok::Comma, line)),
            ';' => toks.push((Tok::Semi, line)),
            '"' | '\'' => {
                let quote = c;
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None | Some('\n') => {
                            return err(
                                line,
                                format!("unterminated string (missing closing {quote})"),
                            );
                        }
                        Some(c) if c == quote => break,
                        Some('\\') => s.push(unescape(&mut chars, line)?),
                        Some(c) => s.push(c),
                    }
                }
                toks.push((Tok::Str(s), line));
            }
            c if c.is_ascii_digit() => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                    word.push(c);
                }
                let value = match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16).ok(),
                    None => word.parse::<u64>().ok(),
                };
                match value {
                    Some(v) => toks.push((Tok::Int(v), line)),
                    None => return err(line, format!("bad integer `{word}`")),
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                    word.push(c);
                }
                toks.push((Tok::Ident(word), line));
            }
            c => {
                return err(
                    line,
                    format!("unexpected character `{}`", c.escape_default()),
                )
            }
        }
    }
    Ok(toks)
}

fn unescape(
    chars: &mut core::iter::Peekable<core::str::Chars<'_>>,
    line: usize,
) -> Result<char, ConfigError> {
    Ok(match chars.next() {
        Some('n') => '\n',
        Some('t') => '\t',
        Some('r') => '\r',
        Some('\\') => '\\',
        Some('"') => '"',
        Some('\'') => '\'',
        Some('x') => {
            let hi = chars.next().and_then(|c| c.to_digit(16));
            let lo = chars.next().and_then(|c| c.to_digit(16));
            match (hi, lo) {
                (Some(hi), Some(lo)) => char::from((hi * 16 + lo) as u8),
                _ => return err(line, "bad `\\x` escape in string (two hex digits expected)"),
            }
        }
        None | Some('\n') => return err(line, "unterminated string"),
        Some(c) => {
            return err(
                line,
                format!("unknown escape `\\{}` in string", c.escape_default()),
            )
        }
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Str(String),
    Int(u64),
    List(Vec<Value>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::List(_) => "a list",
        }
    }
}

struct Setting {
    key: String,
    line: usize,
    value: Value,
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&(Tok, usize)> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<(Tok, usize)> {
        let t = self.toks.get(self.pos).cloned();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn skip_newlines(&mut self) {
        while matches!(self.peek(), Some((Tok::Newline, _))) {
            self.pos += 1;
        }
    }

    fn settings(&mut self) -> Result<Vec<Setting>, ConfigError> {
        let mut out = Vec::new();
        loop {
            while matches!(self.peek(), Some((Tok::Newline | Tok::Semi, _))) {
                self.pos += 1;
            }
            let Some((tok, line)) = self.next() else {
                break;
            };
            let Tok::Ident(key) = tok else {
                return err(
                    line,
                    format!("expected a setting name, found {}", tok.describe()),
                );
            };
            match self.next() {
                Some((Tok::Eq, _)) => {}
                Some((t, l)) => {
                    return err(
                        l,
                        format!("expected `=` after `{key}`, found {}", t.describe()),
                    )
                }
                None => return err(line, format!("expected `=` after `{key}`")),
            }
            let value = match self.next() {
                Some((Tok::Str(s), _)) => Value::Str(s),
                Some((Tok::Int(v), _)) => Value::Int(v),
                Some((Tok::LBracket, l)) => self.list(l)?,
                Some((t, l)) => {
                    return err(
                        l,
                        format!("expected a value for `{key}`, found {}", t.describe()),
                    )
                }
                None => return err(line, format!("expected a value for `{key}`")),
            };
            match self.next() {
                None | Some((Tok::Newline | Tok::Semi, _)) => {}
                Some((t, l)) => {
                    return err(
                        l,
                        format!(
                            "unexpected {} after the value of `{key}` (one setting per line, or separate them with `;`)",
                            t.describe()
                        ),
                    )
                }
            }
            out.push(Setting { key, line, value });
        }
        Ok(out)
    }

    /// After `[` (on `open_line`): items, commas, optional trailing comma, `]`.
    fn list(&mut self, open_line: usize) -> Result<Value, ConfigError> {
        let unterminated = || err(open_line, "unterminated list (missing `]`)");
        let mut items = Vec::new();
        loop {
            self.skip_newlines();
            match self.next() {
                None => return unterminated(),
                Some((Tok::RBracket, _)) => break,
                Some((Tok::Str(s), _)) => items.push(Value::Str(s)),
                Some((Tok::Int(v), _)) => items.push(Value::Int(v)),
                Some((Tok::LBracket, l)) => return err(l, "nested lists are not supported"),
                Some((t, l)) => {
                    return err(
                        l,
                        format!("expected a list item or `]`, found {}", t.describe()),
                    )
                }
            }
            self.skip_newlines();
            match self.next() {
                None => return unterminated(),
                Some((Tok::Comma, _)) => {}
                Some((Tok::RBracket, _)) => break,
                Some((t, l)) => {
                    return err(
                        l,
                        format!("expected `,` or `]` in list, found {}", t.describe()),
                    )
                }
            }
        }
        Ok(Value::List(items))
    }
}

/// The settings, with lookups that take the last occurrence of a key.
struct Settings(Vec<Setting>);

impl Settings {
    fn get(&self, key: &str) -> Option<&Setting> {
        self.0.iter().rev().find(|s| s.key == key)
    }

    fn string(&self, key: &str) -> Result<Option<(String, usize)>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Setting {
                value: Value::Str(s),
                line,
                ..
            }) => Ok(Some((s.clone(), *line))),
            Some(s) => err(
                s.line,
                format!("`{key}` must be a string in quotes, not {}", s.value.kind()),
            ),
        }
    }

    fn int(&self, key: &str) -> Result<Option<(u64, usize)>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Setting {
                value: Value::Int(v),
                line,
                ..
            }) => Ok(Some((*v, *line))),
            Some(s) => err(
                s.line,
                format!(
                    "`{key}` must be an integer (without quotes), not {}",
                    s.value.kind()
                ),
            ),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Setting {
                value: Value::List(items),
                line,
                ..
            }) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    other => err(
                        *line,
                        format!(
                            "`{key}` items must be strings in quotes, not {}",
                            other.kind()
                        ),
                    ),
                })
                .collect(),
            Some(s) => err(
                s.line,
                format!(
                    "`{key}` must be a list of strings, like {key} = [ '...' ], not {}",
                    s.value.kind()
                ),
            ),
        }
    }

    fn action(&self, key: &str, default: Action) -> Result<Action, ConfigError> {
        let Some((v, line)) = self.string(key)? else {
            return Ok(default);
        };
        match v.as_str() {
            "destroy" => Ok(Action::Destroy),
            "restart" => Ok(Action::Restart),
            "preserve" => Ok(Action::Preserve),
            "rename-restart" | "coredump-destroy" | "coredump-restart" | "soft-reset" => err(
                line,
                format!("{key} = \"{v}\" is not supported (use destroy, restart or preserve)"),
            ),
            _ => err(
                line,
                format!("unknown action `{v}` for `{key}` (use destroy, restart or preserve)"),
            ),
        }
    }
}

const KNOWN: &[&str] = &[
    "name",
    "type",
    "builder",
    "kernel",
    "ramdisk",
    "cmdline",
    "extra",
    "root",
    "memory",
    "vcpus",
    "maxvcpus",
    "vif",
    "pci",
    "uuid",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "test_interface",
    "evtchn_fifo",
];

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex, either case).
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}

/// Parses one `pci = [...]` entry: `[SSSS:]BB:DD.F` in hex (segment 0 only).
pub fn parse_bdf(spec: &str) -> Result<(u8, u8, u8), String> {
    let bad =
        || format!("`pci` entry '{spec}' is not a PCI address like '00:03.0' or '0000:00:03.0'");
    if spec.contains(',') || spec.contains('@') {
        return Err(format!(
            "`pci` entry '{spec}': per-device options and virtual slots are not supported; give the address alone"
        ));
    }
    let (rest, func) = spec.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (seg, bus, dev) = match parts.as_slice() {
        [b, d] => ("0", *b, *d),
        [s, b, d] => (*s, *b, *d),
        _ => return Err(bad()),
    };
    let hex = |t: &str, max: u32| {
        (!t.is_empty() && t.len() <= 4)
            .then(|| u32::from_str_radix(t, 16).ok())
            .flatten()
            .filter(|&v| v <= max)
    };
    let (Some(seg), Some(bus), Some(dev), Some(func)) = (
        hex(seg, 0xffff),
        hex(bus, 0xff),
        hex(dev, 0x1f),
        hex(func, 7),
    ) else {
        return Err(bad());
    };
    if seg != 0 {
        return Err(format!(
            "`pci` entry '{spec}': only PCI segment 0 is supported"
        ));
    }
    Ok((bus as u8, dev as u8, func as u8))
}

/// Parses an `xl.cfg`-syntax domain configuration.
pub fn parse(text: &str) -> Result<DomainConfig, ConfigError> {
    let toks = lex(text)?;
    let settings = Settings(Parser { toks, pos: 0 }.settings()?);
    let mut warnings = Vec::new();

    if let Some(s) = settings.get("builder") {
        return err(
            s.line,
            "`builder` is not supported (it is xl's old way to choose the guest type): \
             ferrovisor runs PVH guests only, write type = \"pvh\"",
        );
    }
    if let Some((t, line)) = settings.string("type")? {
        if t != "pvh" {
            return err(
                line,
                format!("type = \"{t}\" is not supported: only type = \"pvh\" is supported"),
            );
        }
    }

    let name = match settings.string("name")? {
        Some((n, line)) if n.is_empty() => return err(line, "`name` must not be empty"),
        Some((n, _)) => n,
        None => return err(0, "missing `name` (e.g. name = \"guest1\")"),
    };
    let kernel = match settings.string("kernel")? {
        Some((k, line)) if k.is_empty() => return err(line, "`kernel` must not be empty"),
        Some((k, _)) => k,
        None => return err(0, "missing `kernel` (the kernel image to boot)"),
    };
    let ramdisk = settings.string("ramdisk")?.map(|(r, _)| r);

    let extra = settings.string("extra")?;
    let root = settings.string("root")?;
    let cmdline = match settings.string("cmdline")? {
        Some((c, _)) => {
            if extra.is_some() || root.is_some() {
                warnings.push("`cmdline` is set: `root` and `extra` are ignored".to_string());
            }
            c
        }
        None => match (root, extra) {
            (Some((r, _)), Some((e, _))) => format!("root={r} {e}"),
            (Some((r, _)), None) => format!("root={r}"),
            (None, Some((e, _))) => e,
            (None, None) => String::new(),
        },
    };

    let memory_mib = match settings.int("memory")? {
        None => 128,
        Some((0, line)) => return err(line, "`memory` must be at least 1 (MiB)"),
        Some((m, line)) if m > MAX_MEMORY_MIB => {
            return err(
                line,
                format!("`memory` = {m} MiB is too large (at most {MAX_MEMORY_MIB})"),
            )
        }
        Some((m, _)) => m,
    };

    let vcpus = match settings.int("vcpus")? {
        None => 1,
        Some((v, line)) => match u32::try_from(v) {
            Ok(v) if (1..=MAX_VCPUS).contains(&v) => v,
            _ => {
                return err(
                    line,
                    format!("`vcpus` must be between 1 and {MAX_VCPUS}, not {v}"),
                )
            }
        },
    };
    if let Some((m, line)) = settings.int("maxvcpus")? {
        if m < u64::from(vcpus) || m > u64::from(MAX_VCPUS) {
            return err(
                line,
                format!("`maxvcpus` must be between `vcpus` ({vcpus}) and {MAX_VCPUS}, not {m}"),
            );
        }
    }

    let vifs = settings.strings("vif")?;
    let uuid = match settings.get("uuid") {
        None => abi::ferro::default_uuid(&name),
        Some(set) => match &set.value {
            Value::Str(text) => parse_uuid(text).ok_or_else(|| ConfigError {
                line: set.line,
                message: format!(
                    "`uuid` '{text}' is not a UUID like 'a8cc0dd0-2a26-4e25-9d5e-3e1f2b6a7c01'"
                ),
            })?,
            _ => return err(set.line, "`uuid` must be a string"),
        },
    };
    let pci_line = settings.get("pci").map_or(0, |s| s.line);
    let pci = settings
        .strings("pci")?
        .iter()
        .map(|spec| {
            parse_bdf(spec).map_err(|m| ConfigError {
                line: pci_line,
                message: m,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let on_poweroff = settings.action("on_poweroff", Action::Destroy)?;
    let on_reboot = settings.action("on_reboot", Action::Restart)?;
    let on_crash = settings.action("on_crash", Action::Destroy)?;
    let test_interface = match settings.int("test_interface")? {
        None | Some((0, _)) => false,
        Some((1, _)) => true,
        Some((v, line)) => return err(line, format!("`test_interface` must be 0 or 1, not {v}")),
    };

    let evtchn_fifo = match settings.int("evtchn_fifo")? {
        None | Some((1, _)) => true,
        Some((0, _)) => false,
        Some((v, line)) => return err(line, format!("`evtchn_fifo` must be 0 or 1, not {v}")),
    };

    let mut unknown: Vec<&str> = Vec::new();
    for s in &settings.0 {
        if !KNOWN.contains(&s.key.as_str()) && !unknown.contains(&s.key.as_str()) {
            unknown.push(&s.key);
            warnings.push(format!("line {}: unknown key `{}` ignored", s.line, s.key));
        }
    }

    Ok(DomainConfig {
        name,
        kernel,
        ramdisk,
        cmdline,
        memory_mib,
        vcpus,
        vifs,
        uuid,
        pci,
        on_poweroff,
        on_reboot,
        on_crash,
        test_interface,
        evtchn_fifo,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: &str = "name = \"g1\"\nkernel = \"vmlinux\"\n";

    fn with(extra: &str) -> Result<DomainConfig, ConfigError> {
        parse(&format!("{MIN}{extra}"))
    }

    fn err_of(text: &str) -> ConfigError {
        parse(text).unwrap_err()
    }

    #[test]
    fn minimal_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(
            c,
            DomainConfig {
                name: "g1".into(),
                kernel: "vmlinux".into(),
                ramdisk: None,
                cmdline: String::new(),
                memory_mib: 128,
                vcpus: 1,
                vifs: vec![],
                uuid: abi::ferro::default_uuid("g1"),
                pci: vec![],
                on_poweroff: Action::Destroy,
                on_reboot: Action::Restart,
                on_crash: Action::Destroy,
                test_interface: false,
                evtchn_fifo: true,
                warnings: vec![],
            }
        );
    }

    #[test]
    fn full_example() {
        let text = r#"
# A Debian guest
name = "debian"   # trailing comment
type = 'pvh'
kernel = "/boot/vmlinuz-6.1"; ramdisk = "initrd.img"
extra = "console=hvc0"
root = "/dev/xvda1"
memory = 0x200
vcpus = 4
maxvcpus = 8;
vif = [ 'mac=00:16:3e:00:00:01,bridge=xenbr0,queues=4',
        "mac=00:16:3e:00:00:02",   # second NIC
      ]
on_poweroff = "preserve"
on_reboot = "destroy"
on_crash = "restart"
test_interface = 1
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.name, "debian");
        assert_eq!(c.kernel, "/boot/vmlinuz-6.1");
        assert_eq!(c.ramdisk.as_deref(), Some("initrd.img"));
        assert_eq!(c.cmdline, "root=/dev/xvda1 console=hvc0");
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.vcpus, 4);
        assert_eq!(
            c.vifs,
            vec![
                "mac=00:16:3e:00:00:01,bridge=xenbr0,queues=4",
                "mac=00:16:3e:00:00:02"
            ]
        );
        assert_eq!(c.on_poweroff, Action::Preserve);
        assert_eq!(c.on_reboot, Action::Destroy);
        assert_eq!(c.on_crash, Action::Restart);
        assert!(c.test_interface);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn required_keys() {
        let e = err_of("kernel = \"k\"");
        assert_eq!(e.line, 0);
        assert!(e.to_string().starts_with("missing `name`"), "{e}");
        assert!(err_of("name = \"n\"").message.contains("missing `kernel`"));
        assert_eq!(err_of("name = ''\nkernel = 'k'").line, 1);
        assert_eq!(err_of("name = 'a'\nkernel = ''").line, 2);
        assert!(err_of("").message.contains("missing"));
    }

    #[test]
    fn type_and_builder() {
        assert!(with("type = \"pvh\"").is_ok());
        let e = with("type = \"hvm\"").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(
            e.message.contains("only type = \"pvh\" is supported"),
            "{e}"
        );
        let e = with("builder = \"generic\"").unwrap_err();
        assert!(e.message.contains("`builder` is not supported"), "{e}");
        assert!(with("builder = \"hvm\"").is_err());
        assert!(with("type = 3")
            .unwrap_err()
            .message
            .contains("must be a string"));
    }

    #[test]
    fn memory_and_vcpus() {
        assert_eq!(with("memory = 1").unwrap().memory_mib, 1);
        assert_eq!(with("memory = 0").unwrap_err().line, 3);
        assert!(with("memory = 99999999999").is_err());
        assert!(with("memory = \"512\"")
            .unwrap_err()
            .message
            .contains("must be an integer"));
        assert_eq!(with("vcpus = 128").unwrap().vcpus, 128);
        assert!(with("vcpus = 0").is_err());
        assert!(with("vcpus = 129").is_err());
        assert!(with("vcpus = 0x100000001").is_err());
        assert!(with("vcpus = 2\nmaxvcpus = 2").is_ok());
        assert!(with("vcpus = 2\nmaxvcpus = 4").is_ok());
        assert!(with("vcpus = 2\nmaxvcpus = 1")
            .unwrap_err()
            .message
            .contains("maxvcpus"));
        assert!(with("maxvcpus = 200").is_err());
    }

    #[test]
    fn command_line_rules() {
        assert_eq!(with("extra = \"quiet\"").unwrap().cmdline, "quiet");
        assert_eq!(
            with("root = \"/dev/xvda\"").unwrap().cmdline,
            "root=/dev/xvda"
        );
        assert_eq!(
            with("root = 'r'\nextra = 'e f'").unwrap().cmdline,
            "root=r e f"
        );
        let c = with("extra = 'e'\ncmdline = 'console=hvc0'\nroot = 'x'").unwrap();
        assert_eq!(c.cmdline, "console=hvc0");
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(with("cmdline = 'a b'").unwrap().warnings.len(), 0);
    }

    #[test]
    fn actions() {
        for (v, a) in [
            ("destroy", Action::Destroy),
            ("restart", Action::Restart),
            ("preserve", Action::Preserve),
        ] {
            let c = with(&format!(
                "on_crash = '{v}'\non_reboot = \"{v}\"\non_poweroff='{v}'"
            ))
            .unwrap();
            assert_eq!((c.on_crash, c.on_reboot, c.on_poweroff), (a, a, a));
        }
        for v in ["rename-restart", "coredump-destroy", "coredump-restart"] {
            let e = with(&format!("on_crash = '{v}'")).unwrap_err();
            assert!(e.message.contains("not supported"), "{e}");
        }
        assert!(with("on_reboot = 'explode'")
            .unwrap_err()
            .message
            .contains("unknown action"));
        assert!(with("on_reboot = 1").is_err());
    }

    #[test]
    fn test_interface_values() {
        assert!(!with("test_interface = 0").unwrap().test_interface);
        assert!(with("test_interface = 1").unwrap().test_interface);
        assert!(with("test_interface = 2").is_err());
        assert!(with("test_interface = '1'").is_err());
        assert!(with("evtchn_fifo = 0").is_ok_and(|c| !c.evtchn_fifo));
        assert!(with("evtchn_fifo = 2").is_err());
    }

    #[test]
    fn unknown_keys_and_duplicates() {
        let c = with("foo = 1\nbar = [ ]\nfoo = 'x'\nmemory = 256\nmemory = 512").unwrap();
        assert_eq!(c.memory_mib, 512);
        assert_eq!(
            c.warnings,
            vec![
                "line 3: unknown key `foo` ignored",
                "line 4: unknown key `bar` ignored"
            ]
        );
        // Last wins even across types: the earlier bad value does not matter.
        assert_eq!(with("vcpus = 'x'\nvcpus = 2").unwrap().vcpus, 2);
        assert_eq!(parse("name='a'\nname='b'\nkernel='k'").unwrap().name, "b");
    }

    #[test]
    fn lists() {
        assert_eq!(with("vif = []").unwrap().vifs, Vec::<String>::new());
        assert_eq!(with("vif = ['a',]").unwrap().vifs, vec!["a"]);
        assert_eq!(
            with("vif = [\n\n'a'\n,\n'b'\n\n]").unwrap().vifs,
            vec!["a", "b"]
        );
        assert_eq!(
            with("vif = [ 'a' # comment, not a ]\n ]").unwrap().vifs,
            vec!["a"]
        );
        let e = with("vif = [ 'a',\n 'b'\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("unterminated list"), "{e}");
        assert!(with("vif = 'a'").unwrap_err().message.contains("list"));
        assert!(with("vif = [ 1 ]").unwrap_err().message.contains("strings"));
        assert!(with("vif = [ ['a'] ]")
            .unwrap_err()
            .message
            .contains("nested"));
        assert!(with("vif = [ 'a' 'b' ]").is_err());
        assert!(with("vif = [ , ]").is_err());
        // Unknown keys may have integer lists.
        assert!(with("cpus = [1, 2, 0x3]").is_ok());
    }

    #[test]
    fn uuids() {
        let c = with("uuid = 'A8CC0DD0-2a26-4e25-9d5e-3e1f2b6a7c01'").unwrap();
        assert_eq!(c.uuid[0], 0xa8);
        assert_eq!(c.uuid[15], 0x01);
        assert_eq!(with("").unwrap().uuid, abi::ferro::default_uuid("g1"));
        for bad in ["'a8cc0dd0'", "'a8cc0dd0-2a26-4e25-9d5e-3e1f2b6a7c0g'", "1"] {
            assert!(with(&format!("uuid = {bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(with("pci = [ '00:03.0' ]").unwrap().pci, vec![(0, 3, 0)]);
        assert_eq!(
            with("pci = [ '0000:3a:1f.7', \"01:00.1\" ]").unwrap().pci,
            vec![(0x3a, 0x1f, 7), (1, 0, 1)]
        );
        assert!(with("").unwrap().pci.is_empty());
        for bad in [
            "3.0",
            "00:20.0",
            "00:03.8",
            "zz:03.0",
            "00:03",
            "1:00:03.0",
            "0:0:0:0.0",
        ] {
            let e = with(&format!("pci = [ '{bad}' ]")).unwrap_err();
            assert!(e.message.contains(bad), "{bad}: {e}");
        }
        let e = with("pci = [ '00:03.0,permissive=1' ]").unwrap_err();
        assert!(e.message.contains("options"), "{e}");
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            with(r#"extra = "a \"q\" \\ \x41\t""#).unwrap().cmdline,
            "a \"q\" \\ A\t"
        );
        assert_eq!(with(r"extra = 'it\'s'").unwrap().cmdline, "it's");
        assert_eq!(with("extra = 'say \"hi\"'").unwrap().cmdline, "say \"hi\"");
        assert!(with(r"extra = '\q'")
            .unwrap_err()
            .message
            .contains("unknown escape"));
        assert!(with(r"extra = '\x4'").is_err());
        let e = with("extra = \"abc\nmemory = 3").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("unterminated string"), "{e}");
        assert!(with("extra = 'abc").is_err());
        assert!(with("extra = 'abc\\").is_err());
        assert_eq!(with("extra = 'ünïcode ✓'").unwrap().cmdline, "ünïcode ✓");
    }

    #[test]
    fn syntax_errors() {
        let e = err_of("name = 'a'\nkernel 'k'");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("expected `=` after `kernel`"), "{e}");
        assert!(err_of("name").message.contains("expected `=`"));
        assert!(err_of("name =").message.contains("expected a value"));
        assert!(err_of("name =\n'a'").message.contains("expected a value"));
        assert!(err_of("name = 'a' kernel = 'k'")
            .message
            .contains("one setting per line"));
        assert!(err_of("= 3").message.contains("expected a setting name"));
        assert!(err_of("'x' = 3")
            .message
            .contains("expected a setting name"));
        let e = err_of("memory = 12ab");
        assert_eq!(e.to_string(), "line 1: bad integer `12ab`");
        assert!(err_of("memory = 0x").message.contains("bad integer"));
        assert!(err_of("memory = 99999999999999999999999")
            .message
            .contains("bad integer"));
        assert!(err_of("memory = -1")
            .message
            .contains("unexpected character `-`"));
        assert!(parse("name = 'a' ]").is_err());
        // Semicolons and blank statements are fine.
        assert!(parse(";;\nname='a';kernel='k';;\n\n;").is_ok());
        assert!(parse("name='a'\r\nkernel='k'\r\n").is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = parse(&s);
        }

        #[test]
        fn config_like_strings_never_panic(s in "[a-z_=\\[\\]'\",;#0-9xX \\\\\n-]{0,120}") {
            let _ = parse(&s);
            let _ = parse(&format!("{MIN}{s}"));
        }

        #[test]
        fn error_lines_are_in_the_file(s in "[a-z_=\\[\\]'\",;#0-9 \n]{0,120}") {
            if let Err(e) = parse(&s) {
                prop_assert!(e.line <= s.lines().count() + 1);
            }
        }
    }
}
