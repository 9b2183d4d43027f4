//! The faults a generation of the subject can play, chosen per generation.
//!
//! `SUBJECT_FAULTS="1=crash-before-ready,2=slow-init:300"` gives generation 1
//! a crash before `ready()` and generation 2 a 300 ms init. Every other
//! generation plays `none`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

/// The variable that carries the faults; successors inherit it.
pub const VAR: &str = "SUBJECT_FAULTS";
/// A file with the same content, read by each generation when it starts,
/// so that a test can change the fault between two attempts at an upgrade.
pub const FILE_VAR: &str = "SUBJECT_FAULTS_FILE";

/// One generation's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Exit with code 3 before asking for any listener.
    CrashBeforeListen,
    /// Exit with code 4 after taking the listeners, before `ready()`.
    CrashBeforeReady,
    /// Panic during init (exit code 101).
    Panic,
    /// Exit with code 0 before `ready()`.
    ExitZero,
    /// Never call `ready()`.
    Hang,
    /// Take this long to initialise, then call `ready()`.
    SlowInit(Duration),
    /// Abort (SIGABRT) during init.
    Abort,
    /// Exit with code 5 right after `ready()`.
    CrashAfterReady,
    /// Exit with code 5 this long after `ready()` (`crash-after-ready:MS`),
    /// having served meanwhile: a release that dies on its first requests.
    /// It first announces `event=crashing` with the client ports of the TCP
    /// connections it holds (the only ones its death may fail), and stops
    /// reading UDP, so that it takes no datagram with it.
    CrashAfterReadyIn(Duration),
    /// Hang before the library starts: the successor reads nothing at all
    /// (not even the state its parent hands over).
    HangBeforeStart,
    /// Before the library starts, announce `event=gated` with the numbers of
    /// the descriptors this process was started with (`fds=0,1,2,3`), and
    /// wait until a writer opens the FIFO named by [`GATE_VAR`]: a test can
    /// act while a successor has not yet read anything its parent sent it.
    GateBeforeStart,
    /// With the library started and the listeners taken, just before
    /// `ready()`: announce `event=init-gated` and wait at the FIFO named by
    /// [`GATE_VAR`], like `gate-before-start`. A test can act while a
    /// successor is in its init for as long as it needs (what
    /// `slow-init:MS` can only make likely).
    GateBeforeReady,
    /// After `ready()`, serve until a writer opens the FIFO named by
    /// [`GATE_VAR`], then exit with code 5: a release that dies when the
    /// test says, within its parent's rollback window.
    CrashAtGate,
    /// Once its work is done and its `Upgrader` dropped, announce
    /// `event=lingering` and wait, like `gate-before-start`, before the
    /// process exits: a test can signal a generation in its last moments.
    LingerAfterExit,
    /// A release that upgrades only through the API (no upgrade signal) and
    /// reloads its configuration on SIGHUP: each SIGHUP is announced as
    /// `event=reloaded`.
    SighupReloads,
}

/// The FIFO a `gate-before-start` generation waits on.
pub const GATE_VAR: &str = "SUBJECT_GATE";

/// The FIFO the gate faults wait at (`gate-before-start`,
/// `gate-before-ready`, `crash-at-gate`, `linger-after-exit`): give the
/// subject [`env`](Self::env), and [`open`](Self::open) it to let the
/// waiting generation go on.
#[derive(Debug)]
pub struct Gate {
    path: std::path::PathBuf,
}

impl Gate {
    /// A new FIFO `gate` in `dir`.
    pub fn new(dir: &std::path::Path) -> std::io::Result<Gate> {
        let path = dir.join("gate");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU)?;
        Ok(Gate { path })
    }

    /// The subject's environment variable that names it.
    pub fn env(&self) -> (String, String) {
        (GATE_VAR.into(), self.path.display().to_string())
    }

    /// Lets the generation waiting at it go on: opens it for writing,
    /// which waits until that generation has opened it for reading.
    pub fn open(&self) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map(drop)
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Fault, String> {
        Ok(match text {
            "none" => Fault::None,
            "crash-before-listen" => Fault::CrashBeforeListen,
            "crash-before-ready" => Fault::CrashBeforeReady,
            "panic" => Fault::Panic,
            "exit-zero" => Fault::ExitZero,
            "hang" => Fault::Hang,
            "abort" => Fault::Abort,
            "crash-after-ready" => Fault::CrashAfterReady,
            "hang-before-start" => Fault::HangBeforeStart,
            "gate-before-start" => Fault::GateBeforeStart,
            "gate-before-ready" => Fault::GateBeforeReady,
            "crash-at-gate" => Fault::CrashAtGate,
            "linger-after-exit" => Fault::LingerAfterExit,
            "sighup-reloads" => Fault::SighupReloads,
            other => {
                let millis = |prefix: &str| {
                    other
                        .strip_prefix(prefix)
                        .and_then(|ms| ms.parse::<u64>().ok())
                        .map(Duration::from_millis)
                };
                if let Some(duration) = millis("slow-init:") {
                    Fault::SlowInit(duration)
                } else if let Some(duration) = millis("crash-after-ready:") {
                    Fault::CrashAfterReadyIn(duration)
                } else {
                    return Err(format!("unknown fault {other:?}"));
                }
            }
        })
    }
}

impl Fault {
    /// Plays the part of the fault that comes before the library starts.
    pub fn before_start(self) {
        match self {
            Fault::HangBeforeStart => loop {
                std::thread::park();
            },
            Fault::GateBeforeStart => {
                let fds: Vec<String> = crate::open_descriptor_numbers()
                    .iter()
                    .map(i32::to_string)
                    .collect();
                println!(
                    "event=gated gen={} pid={} fds={}",
                    Faults::generation_to_be(),
                    std::process::id(),
                    fds.join(",")
                );
                // Opening a FIFO for reading blocks until a writer opens it.
                if let Some(path) = std::env::var_os(GATE_VAR) {
                    let _ = std::fs::File::open(path);
                }
            }
            _ => {}
        }
    }

    /// Plays the part of the fault that comes before the listeners.
    pub fn before_listen(self) {
        if self == Fault::CrashBeforeListen {
            std::process::exit(3);
        }
    }

    /// Plays the part of the fault that comes between listeners and `ready()`.
    pub async fn before_ready(self, generation: u64) {
        match self {
            Fault::CrashBeforeReady => std::process::exit(4),
            Fault::Panic => panic!("fault: panic during init"),
            Fault::ExitZero => std::process::exit(0),
            Fault::Abort => std::process::abort(),
            Fault::Hang => std::future::pending().await,
            Fault::SlowInit(duration) => tokio::time::sleep(duration).await,
            Fault::GateBeforeReady => {
                println!(
                    "event=init-gated gen={generation} pid={}",
                    std::process::id()
                );
                if let Some(path) = std::env::var_os(GATE_VAR) {
                    // Opening a FIFO for reading blocks until a writer opens it.
                    let _ = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await;
                }
            }
            Fault::None
            | Fault::CrashBeforeListen
            | Fault::CrashAfterReady
            | Fault::CrashAfterReadyIn(_)
            | Fault::HangBeforeStart
            | Fault::GateBeforeStart
            | Fault::CrashAtGate
            | Fault::LingerAfterExit
            | Fault::SighupReloads => {}
        }
    }

    /// Plays the part of the fault that comes after everything else, just
    /// before the process exits.
    pub fn before_exit(self, generation: u64) {
        if self == Fault::LingerAfterExit {
            println!(
                "event=lingering gen={generation} pid={}",
                std::process::id()
            );
            if let Some(path) = std::env::var_os(GATE_VAR) {
                let _ = std::fs::File::open(path);
            }
        }
    }

    /// Plays the part of the fault that comes after `ready()`.
    pub fn after_ready(self) {
        match self {
            Fault::CrashAfterReady => std::process::exit(5),
            Fault::CrashAtGate => {
                if let Some(path) = std::env::var_os(GATE_VAR) {
                    std::thread::spawn(move || {
                        // Opening a FIFO for reading blocks until a writer opens it.
                        let _ = std::fs::File::open(path);
                        std::process::exit(5);
                    });
                }
            }
            _ => {}
        }
    }
}

/// The faults of every generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults(BTreeMap<u64, Fault>);

impl Faults {
    /// Reads [`FILE_VAR`]'s file if set, else [`VAR`]; neither means no faults.
    pub fn from_env() -> Result<Faults, String> {
        if let Some(path) = std::env::var_os(FILE_VAR) {
            return match std::fs::read_to_string(&path) {
                Ok(text) => text.parse(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Faults::default()),
                Err(e) => Err(format!("{}: {e}", path.to_string_lossy())),
            };
        }
        match std::env::var(VAR) {
            Ok(text) => text.parse(),
            Err(_) => Ok(Faults::default()),
        }
    }

    /// The generation this process will be, read before the library starts
    /// (from its inheritance variable; 0 without one).
    pub fn generation_to_be() -> u64 {
        std::env::var("HANDOVER")
            .ok()
            .and_then(|text| {
                let start = text.find(";gen=")? + 5;
                let digits: String = text[start..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    }

    /// The fault of generation `generation`.
    pub fn for_generation(&self, generation: u64) -> Fault {
        self.0.get(&generation).copied().unwrap_or_default()
    }
}

impl FromStr for Faults {
    type Err = String;

    fn from_str(text: &str) -> Result<Faults, String> {
        let mut faults = BTreeMap::new();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (generation, fault) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not <generation>=<fault>"))?;
            let generation: u64 = generation
                .parse()
                .map_err(|_| format!("{generation:?} is not a generation number"))?;
            faults.insert(generation, fault.parse()?);
        }
        Ok(Faults(faults))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_fault_per_generation() {
        let faults: Faults = "1=crash-before-ready, 3=slow-init:250".parse().unwrap();
        assert_eq!(faults.for_generation(0), Fault::None);
        assert_eq!(faults.for_generation(1), Fault::CrashBeforeReady);
        assert_eq!(
            faults.for_generation(3),
            Fault::SlowInit(Duration::from_millis(250))
        );
    }

    #[test]
    fn refuses_unknown_faults() {
        assert!(
            "1=explode"
                .parse::<Faults>()
                .unwrap_err()
                .contains("explode")
        );
        assert!("x=hang".parse::<Faults>().is_err());
    }
}
