//! The signals a service can name for upgrades and stops: the library's
//! own type, so that its public API does not tie users to a version of
//! `nix`.

use std::fmt;
use std::str::FromStr;

/// A signal the library can catch for [`Options::upgrade_signal`] and
/// [`Options::stop_signals`]. Those that kill, stop or mean a fault
/// (SIGKILL, SIGSTOP, SIGSEGV, ...) are not here: catching them would be a
/// mistake.
///
/// [`Options::upgrade_signal`]: crate::Options::upgrade_signal
/// [`Options::stop_signals`]: crate::Options::stop_signals
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[allow(clippy::upper_case_acronyms)]
pub enum Signal {
    /// Hangup: the conventional "reload" (the default upgrade signal).
    SIGHUP,
    /// Interrupt (Ctrl-C).
    SIGINT,
    /// Quit.
    SIGQUIT,
    /// Termination: what service managers send to stop.
    SIGTERM,
    /// User-defined 1.
    SIGUSR1,
    /// User-defined 2 (nginx's "upgrade the binary").
    SIGUSR2,
    /// Window size change (nginx's "stop the workers").
    SIGWINCH,
}

impl Signal {
    /// Every signal this type names.
    pub const ALL: [Signal; 7] = [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ];

    /// Its name, as `kill -l` prints it with the `SIG` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Signal::SIGHUP => "SIGHUP",
            Signal::SIGINT => "SIGINT",
            Signal::SIGQUIT => "SIGQUIT",
            Signal::SIGTERM => "SIGTERM",
            Signal::SIGUSR1 => "SIGUSR1",
            Signal::SIGUSR2 => "SIGUSR2",
            Signal::SIGWINCH => "SIGWINCH",
        }
    }

    /// Its number on this platform (SIGUSR1 is 10 on Linux, 30 on macOS).
    pub fn number(self) -> i32 {
        self.to_nix() as i32
    }

    pub(crate) fn to_nix(self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal as Nix;
        match self {
            Signal::SIGHUP => Nix::SIGHUP,
            Signal::SIGINT => Nix::SIGINT,
            Signal::SIGQUIT => Nix::SIGQUIT,
            Signal::SIGTERM => Nix::SIGTERM,
            Signal::SIGUSR1 => Nix::SIGUSR1,
            Signal::SIGUSR2 => Nix::SIGUSR2,
            Signal::SIGWINCH => Nix::SIGWINCH,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`Signal`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown signal {0:?} (one of SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH)"
)]
pub struct UnknownSignal(pub String);

impl FromStr for Signal {
    type Err = UnknownSignal;

    /// `SIGHUP`, `HUP` or `hup`.
    fn from_str(text: &str) -> Result<Signal, UnknownSignal> {
        let upper = text.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        Signal::ALL
            .into_iter()
            .find(|signal| &signal.name()[3..] == name)
            .ok_or_else(|| UnknownSignal(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_an_operator_writes_them() {
        for signal in Signal::ALL {
            assert_eq!(signal.name().parse::<Signal>(), Ok(signal));
            assert_eq!(signal.name()[3..].parse::<Signal>(), Ok(signal));
            assert_eq!(signal.name().to_lowercase().parse::<Signal>(), Ok(signal));
            assert_eq!(signal.to_string(), signal.name());
        }
        assert_eq!(
            "SIGKILL".parse::<Signal>(),
            Err(UnknownSignal("SIGKILL".into()))
        );
        assert!("".parse::<Signal>().is_err());
        assert!("SIG".parse::<Signal>().is_err());
    }

    #[test]
    fn numbers_are_the_platforms() {
        assert_eq!(Signal::SIGHUP.number(), nix::libc::SIGHUP);
        assert_eq!(Signal::SIGUSR1.number(), nix::libc::SIGUSR1);
        assert_eq!(Signal::SIGWINCH.number(), nix::libc::SIGWINCH);
    }
}
