//! The inheritance environment: what a generation tells its successor.
//!
//! Pure encoding and decoding, no system calls. One environment variable,
//! `HANDOVER`, holds a `;`-separated list of `key=value` fields:
//!
//! ```text
//! v1;gen=4;parent=1234;link=3;blocked=1;fd=tcp,http;fd=udp,dns,activated
//! ```
//!
//! `blocked` (optional) is the number of the signal the parent started the
//! successor with blocked (its own upgrade signal), which the successor
//! unblocks whatever signal its own options name. The descriptors
//! themselves travel on the handshake link (`SCM_RIGHTS`), in the order the
//! `fd` fields list them; the variable says what each one is. Names are
//! percent-encoded outside `[A-Za-z0-9._-]`. The optional flag `activated`
//! marks a socket that systemd passed to generation 0: the name, not the
//! configured address, decides in every generation. Decoding checks
//! everything it can without the kernel (version, ranges, duplicates,
//! sizes) and never panics; whether the descriptors arrived and are of the
//! claimed kind is checked afterwards by the registry.

use std::fmt;
use std::os::fd::RawFd;

use nix::sys::signal::Signal;

use crate::kind::Kind;

/// The environment variable that carries the inheritance.
pub const VAR: &str = "HANDOVER";

/// The only version this library writes and reads.
const VERSION: &str = "v1";
/// Larger inputs are refused before they are parsed.
pub const MAX_LEN: usize = 1 << 20;
/// At most this many named descriptors.
pub const MAX_FDS: usize = 4096;
/// A link descriptor number above this is refused (far above any sane limit).
pub const MAX_FD: RawFd = 1 << 20;
/// Longest descriptor name, in bytes.
pub const MAX_NAME: usize = 255;

/// What a generation inherits from its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inheritance {
    /// This generation's number (the parent's plus one).
    pub generation: u64,
    /// The parent's process id.
    pub parent: i32,
    /// The descriptor of the handshake link to the parent.
    pub link: RawFd,
    /// The signal the parent started this process with blocked.
    pub blocked: Option<Signal>,
    /// The named descriptors, in the order the parent sends them.
    pub fds: Vec<InheritedFd>,
}

/// One named descriptor in the inheritance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedFd {
    /// The name both generations use for it.
    pub name: String,
    /// What kind of object the parent says it is.
    pub kind: Kind,
    /// Passed by systemd's socket activation to generation 0.
    pub activated: bool,
}

/// Why an inheritance string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireError {
    /// The byte offset in the variable where the problem was found.
    pub position: usize,
    /// What is wrong there.
    pub problem: String,
}

impl WireError {
    pub(crate) fn new(position: usize, problem: impl Into<String>) -> Self {
        WireError {
            position,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.position, self.problem)
    }
}

impl std::error::Error for WireError {}

/// Checks a descriptor name; the same rules apply when it is registered and
/// when it is decoded.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("a name must not be empty")
    } else if name.len() > MAX_NAME {
        Err("a name must be at most 255 bytes")
    } else {
        Ok(())
    }
}

/// Encodes an inheritance into the value of [`VAR`].
pub fn encode(inheritance: &Inheritance) -> String {
    let mut out = format!(
        "{VERSION};gen={};parent={};link={}",
        inheritance.generation, inheritance.parent, inheritance.link
    );
    if let Some(signal) = inheritance.blocked {
        out.push_str(&format!(";blocked={}", signal as i32));
    }
    for entry in &inheritance.fds {
        out.push_str(";fd=");
        out.push_str(entry.kind.token());
        out.push(',');
        escape_into(&entry.name, &mut out);
        if entry.activated {
            out.push_str(",activated");
        }
    }
    out
}

fn escape_into(name: &str, out: &mut String) {
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

/// Decodes the value of [`VAR`], checking everything that can be checked
/// without the kernel.
pub fn decode(text: &str) -> Result<Inheritance, WireError> {
    if text.len() > MAX_LEN {
        return Err(WireError::new(
            MAX_LEN,
            format!("{} bytes is longer than the limit of {MAX_LEN}", text.len()),
        ));
    }
    let mut fields = Fields { text, offset: 0 };
    let (start, version) = fields.next().ok_or_else(|| WireError::new(0, "empty"))?;
    if version != VERSION {
        return Err(WireError::new(
            start,
            format!("unknown version {:?}, expected {VERSION:?}", clip(version)),
        ));
    }

    let mut generation = None;
    let mut parent = None;
    let mut link = None;
    let mut blocked = None;
    let mut fds: Vec<InheritedFd> = Vec::new();
    for (at, field) in fields {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| WireError::new(at, format!("field {:?} has no '='", clip(field))))?;
        let value_at = at + key.len() + 1;
        match key {
            "gen" => set_once(&mut generation, number::<u64>(value, value_at)?, at, key)?,
            "parent" => {
                let pid = number::<i32>(value, value_at)?;
                if pid <= 0 {
                    return Err(WireError::new(
                        value_at,
                        format!("parent pid {pid} is not a process"),
                    ));
                }
                set_once(&mut parent, pid, at, key)?
            }
            "link" => set_once(&mut link, descriptor(value, value_at)?, at, key)?,
            "blocked" => set_once(&mut blocked, signal(value, value_at)?, at, key)?,
            "fd" => {
                if fds.len() == MAX_FDS {
                    return Err(WireError::new(
                        at,
                        format!("more than {MAX_FDS} descriptors"),
                    ));
                }
                fds.push(entry(value, value_at)?);
            }
            other => {
                return Err(WireError::new(
                    at,
                    format!("unknown field {:?}", clip(other)),
                ));
            }
        }
    }
    let end = text.len();
    let generation = generation.ok_or_else(|| WireError::new(end, "missing field gen"))?;
    let parent = parent.ok_or_else(|| WireError::new(end, "missing field parent"))?;
    let link = link.ok_or_else(|| WireError::new(end, "missing field link"))?;
    if generation == 0 {
        return Err(WireError::new(end, "an inherited generation cannot be 0"));
    }

    let mut names: Vec<&str> = fds.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(WireError::new(
            end,
            format!("name {:?} is listed twice", pair[0]),
        ));
    }
    Ok(Inheritance {
        generation,
        parent,
        link,
        blocked,
        fds,
    })
}

/// `;`-separated fields with their byte offsets.
struct Fields<'a> {
    text: &'a str,
    offset: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset > self.text.len() {
            return None;
        }
        let rest = &self.text[self.offset..];
        let field = rest.split(';').next().unwrap_or(rest);
        let at = self.offset;
        self.offset += field.len() + 1;
        Some((at, field))
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, at: usize, key: &str) -> Result<(), WireError> {
    if slot.replace(value).is_some() {
        return Err(WireError::new(at, format!("field {key} appears twice")));
    }
    Ok(())
}

fn number<T: std::str::FromStr>(value: &str, at: usize) -> Result<T, WireError> {
    // `FromStr` for integers accepts a leading '+'; the encoder never writes one.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(WireError::new(
            at,
            format!("{:?} is not a number", clip(value)),
        ));
    }
    value
        .parse()
        .map_err(|_| WireError::new(at, format!("{:?} is out of range", clip(value))))
}

fn descriptor(value: &str, at: usize) -> Result<RawFd, WireError> {
    let fd = number::<RawFd>(value, at)?;
    if !(3..=MAX_FD).contains(&fd) {
        return Err(WireError::new(
            at,
            format!("descriptor {fd} is outside 3..={MAX_FD}"),
        ));
    }
    Ok(fd)
}

fn signal(value: &str, at: usize) -> Result<Signal, WireError> {
    let number = number::<i32>(value, at)?;
    Signal::try_from(number)
        .map_err(|_| WireError::new(at, format!("{number} is not a signal this system knows")))
}

fn entry(value: &str, at: usize) -> Result<InheritedFd, WireError> {
    let mut parts = value.splitn(3, ',');
    let (kind, name, flag) = match (parts.next(), parts.next(), parts.next()) {
        (Some(kind), Some(name), flag) => (kind, name, flag),
        _ => {
            return Err(WireError::new(
                at,
                format!("{:?} is not <kind>,<name>[,activated]", clip(value)),
            ));
        }
    };
    let kind = Kind::from_token(kind)
        .ok_or_else(|| WireError::new(at, format!("unknown kind {:?}", clip(kind))))?;
    let name_at = at + kind.token().len() + 1;
    let name_text = name;
    let name = unescape(name_text, name_at)?;
    check_name(&name).map_err(|problem| WireError::new(name_at, problem))?;
    let activated = match flag {
        None => false,
        Some("activated") => true,
        Some(other) => {
            return Err(WireError::new(
                name_at + name_text.len() + 1,
                format!("unknown flag {:?}", clip(other)),
            ));
        }
    };
    Ok(InheritedFd {
        name,
        kind,
        activated,
    })
}

fn unescape(text: &str, at: usize) -> Result<String, WireError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| WireError::new(at + i, "bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            out.push(byte);
            i += 1;
        } else {
            return Err(WireError::new(
                at + i,
                format!("byte 0x{byte:02x} must be escaped"),
            ));
        }
    }
    String::from_utf8(out).map_err(|_| WireError::new(at, "name is not UTF-8"))
}

/// Keeps quoted input in error messages short.
fn clip(text: &str) -> &str {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn sample() -> Inheritance {
        Inheritance {
            generation: 4,
            parent: 1234,
            link: 3,
            blocked: Some(Signal::SIGHUP),
            fds: vec![
                InheritedFd {
                    name: "http".into(),
                    kind: Kind::TcpListener,
                    activated: false,
                },
                InheritedFd {
                    name: "dns over udp; ünïcode=%".into(),
                    kind: Kind::Udp,
                    activated: true,
                },
            ],
        }
    }

    #[test]
    fn encodes_to_the_documented_shape() {
        assert_eq!(
            encode(&sample()),
            "v1;gen=4;parent=1234;link=3;blocked=1;fd=tcp,http;fd=udp,dns%20over%20udp%3B%20%C3%BCn%C3%AFcode%3D%25,activated"
        );
    }

    #[test]
    fn round_trips_the_sample() {
        assert_eq!(decode(&encode(&sample())), Ok(sample()));
    }

    #[rstest]
    #[case::empty("", 0, "unknown version")]
    #[case::garbage("garbage", 0, "unknown version")]
    #[case::future_version("v2;gen=1;parent=1;link=3", 0, "unknown version")]
    #[case::no_equals("v1;gen", 3, "has no '='")]
    #[case::truncated("v1;gen=1;parent=1", 17, "missing field link")]
    #[case::unknown_field("v1;colour=red", 3, "unknown field")]
    #[case::generation_zero("v1;gen=0;parent=1;link=3", 24, "cannot be 0")]
    #[case::not_a_number("v1;gen=x;parent=1;link=3", 7, "not a number")]
    #[case::plus_sign("v1;gen=+1;parent=1;link=3", 7, "not a number")]
    #[case::enormous("v1;gen=99999999999999999999999;parent=1;link=3", 7, "out of range")]
    #[case::enormous_fd("v1;gen=1;parent=1;link=2147483647", 23, "outside")]
    #[case::negative_fd("v1;gen=1;parent=1;link=-4", 23, "outside")]
    #[case::stdio("v1;gen=1;parent=1;link=1", 23, "outside")]
    #[case::bad_parent("v1;gen=1;parent=0;link=3", 16, "not a process")]
    #[case::unknown_signal("v1;gen=1;parent=1;link=3;blocked=0", 33, "not a signal")]
    #[case::huge_signal("v1;gen=1;parent=1;link=3;blocked=4096", 33, "not a signal")]
    #[case::signal_name("v1;gen=1;parent=1;link=3;blocked=HUP", 33, "not a number")]
    #[case::blocked_twice("v1;gen=1;parent=1;link=3;blocked=1;blocked=1", 35, "appears twice")]
    #[case::twice("v1;gen=1;gen=2;parent=1;link=3", 9, "appears twice")]
    #[case::duplicate_name("v1;gen=1;parent=1;link=3;fd=tcp,a;fd=udp,a", 42, "listed twice")]
    #[case::unknown_kind("v1;gen=1;parent=1;link=3;fd=sctp,a", 28, "unknown kind")]
    #[case::short_entry("v1;gen=1;parent=1;link=3;fd=tcp", 28, "not <kind>,<name>")]
    #[case::unknown_flag("v1;gen=1;parent=1;link=3;fd=tcp,a,sticky", 34, "unknown flag")]
    #[case::empty_name("v1;gen=1;parent=1;link=3;fd=tcp,", 32, "must not be empty")]
    #[case::raw_space("v1;gen=1;parent=1;link=3;fd=tcp,a b", 33, "must be escaped")]
    #[case::bad_escape("v1;gen=1;parent=1;link=3;fd=tcp,a%g1", 33, "bad percent escape")]
    #[case::cut_escape("v1;gen=1;parent=1;link=3;fd=tcp,a%4", 33, "bad percent escape")]
    #[case::not_utf8("v1;gen=1;parent=1;link=3;fd=tcp,%FF", 32, "not UTF-8")]
    fn refuses_bad_input_saying_where(
        #[case] text: &str,
        #[case] position: usize,
        #[case] problem: &str,
    ) {
        let err = decode(text).expect_err(text);
        assert!(
            err.problem.contains(problem),
            "{text:?}: expected {problem:?}, got {err}"
        );
        assert_eq!(err.position, position, "{text:?}: {err}");
    }

    #[test]
    fn refuses_oversized_input_without_parsing_it() {
        let text = format!("v1;gen=1;parent=1;link=3;{}", "x".repeat(MAX_LEN));
        assert!(decode(&text).unwrap_err().problem.contains("longer than"));
    }

    #[test]
    fn refuses_too_many_descriptors() {
        let mut text = String::from("v1;gen=1;parent=1;link=3");
        for i in 0..=MAX_FDS {
            text.push_str(&format!(";fd=fd,n{i}"));
        }
        assert!(decode(&text).unwrap_err().problem.contains("more than"));
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop::sample::select(Kind::ALL.to_vec())
    }

    fn signal() -> impl Strategy<Value = Option<Signal>> {
        prop::option::of(prop::sample::select(Signal::iterator().collect::<Vec<_>>()))
    }

    fn inheritance() -> impl Strategy<Value = Inheritance> {
        (
            1..u64::MAX,
            1..i32::MAX,
            signal(),
            prop::collection::btree_map(".{1,20}", (kind(), any::<bool>()), 0..8),
        )
            .prop_map(|(generation, parent, blocked, named)| Inheritance {
                generation,
                parent,
                link: 3,
                blocked,
                fds: named
                    .into_iter()
                    .map(|(name, (kind, activated))| InheritedFd {
                        name,
                        kind,
                        activated,
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn any_inheritance_round_trips(value in inheritance()) {
            prop_assert_eq!(decode(&encode(&value)), Ok(value));
        }

        /// Every mutation of a valid encoding decodes to a value or a typed
        /// error, never a panic; a value it decodes to encodes back the same.
        #[test]
        fn any_mutation_decodes_or_errs(
            value in inheritance(),
            at in any::<prop::sample::Index>(),
            cut in any::<bool>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encode(&value).into_bytes();
            let i = at.index(bytes.len());
            if cut {
                bytes.truncate(i);
            } else {
                bytes[i] = byte;
            }
            // The variable reaches us as a string; non-UTF-8 is refused earlier.
            if let Ok(text) = String::from_utf8(bytes) {
                match decode(&text) {
                    Ok(decoded) => prop_assert_eq!(decode(&encode(&decoded)), Ok(decoded)),
                    Err(err) => prop_assert!(err.position <= text.len().max(MAX_LEN)),
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = decode(&text);
        }
    }
}
