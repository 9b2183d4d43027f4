//! A scenario: one TOML file in `scenarios/`, read into these types.
//!
//! Steps run in order; each waits for its `at_ms` (from the start of the
//! load) and for the previous step to finish, so that ordering follows
//! events and `at_ms` only shapes the load. Adding a scenario is adding a
//! file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used on the command line (the file's stem by default).
    #[serde(default)]
    pub name: String,
    /// What it proves, in a sentence or two.
    pub description: String,
    /// How the subject is started.
    #[serde(default)]
    pub subject: SubjectSettings,
    /// The load that runs for the whole scenario.
    #[serde(default)]
    pub load: LoadSettings,
    /// What happens, in order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: Expectations,
}

/// How the subject is started.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectSettings {
    /// The successor's time to become ready.
    pub upgrade_timeout_ms: u64,
    /// The drain's quiet period for idle keep-alive connections.
    pub quiet_period_ms: u64,
    /// The fault of each generation (`"1" = "crash-before-ready"`); changed
    /// by `set-faults` steps.
    pub faults: BTreeMap<String, String>,
    /// Serve a Unix listener (and run the Unix load against it).
    pub unix: bool,
    /// The subject's `Options::rollback_window`; 0 for none.
    pub rollback_window_ms: u64,
}

impl Default for SubjectSettings {
    fn default() -> Self {
        SubjectSettings {
            upgrade_timeout_ms: 10_000,
            quiet_period_ms: 200,
            faults: BTreeMap::new(),
            unix: false,
            rollback_window_ms: 0,
        }
    }
}

/// The load: how many clients of each kind.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadSettings {
    /// Keep-alive HTTP clients, one request after another.
    pub http_keep_alive: usize,
    /// HTTP clients opening a new connection per request.
    pub http_new_connection: usize,
    /// Keep-alive HTTP clients that wait `idle_ms` between requests.
    pub http_idle: usize,
    /// The idle clients' pause, longer than the quiet period.
    pub idle_ms: u64,
    /// TCP echo connections, each kept for `connection_ms`.
    pub tcp: usize,
    /// Unix-socket echo connections, each kept for `connection_ms`.
    pub unix: usize,
    /// How long each echo connection lives before the client reconnects.
    pub connection_ms: u64,
    /// UDP clients, each sending a datagram and awaiting its echo.
    pub udp: usize,
    /// The whole scenario's load lasts at least this long (and until the
    /// last step has finished).
    pub duration_ms: u64,
}

impl Default for LoadSettings {
    fn default() -> Self {
        LoadSettings {
            http_keep_alive: 4,
            http_new_connection: 2,
            http_idle: 0,
            idle_ms: 600,
            tcp: 2,
            unix: 0,
            connection_ms: 500,
            udp: 1,
            duration_ms: 1000,
        }
    }
}

/// One step. (Unknown keys are refused by the action's own fields: serde
/// cannot deny them on a struct that flattens another.)
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Step {
    /// Not before this many milliseconds after the load started.
    #[serde(default)]
    pub at_ms: u64,
    /// What to do.
    #[serde(flatten)]
    pub action: Action,
}

/// What a step does.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// Ask the serving generation to upgrade (control port) and check the
    /// answer's reason (`ok`, `successor_exited`, `timeout`, ...). With
    /// `count` > 1, repeat every `every_ms`, each after the previous one
    /// has settled (its parent gone).
    Upgrade {
        /// The expected outcome: `ok` or an error reason.
        #[serde(default = "ok")]
        expect: String,
        /// How many upgrades.
        #[serde(default = "one")]
        count: usize,
        /// Pause between upgrades.
        #[serde(default)]
        every_ms: u64,
        /// Wait after success until the new generation's parent is gone.
        #[serde(default = "yes")]
        settle: bool,
    },
    /// Ask for an upgrade without waiting; `await-upgrade` collects it.
    StartUpgrade,
    /// Wait for the upgrade started by `start-upgrade` and check its outcome.
    AwaitUpgrade {
        /// The expected outcome: `ok` or an error reason.
        #[serde(default = "ok")]
        expect: String,
    },
    /// Ask for `count` upgrades at once: exactly one must succeed, the rest
    /// be refused as in progress.
    ConcurrentUpgrades {
        /// How many at once.
        count: usize,
    },
    /// SIGHUP to the serving generation and to any starting one, every
    /// `every_ms` for `duration_ms`.
    Storm {
        /// Between two rounds of signals.
        every_ms: u64,
        /// For how long.
        duration_ms: u64,
    },
    /// Send a signal to a generation.
    Signal {
        /// `SIGKILL`, `SIGSTOP`, `SIGCONT`, `SIGHUP`, `SIGTERM`.
        signal: String,
        /// `serving` (the newest ready generation) or `starting` (the
        /// newest started, not yet ready).
        target: String,
    },
    /// Wait for a subject event (`started`, `ready`, `parent-gone`, ...).
    Wait {
        /// The event's kind.
        event: String,
        /// Its generation.
        generation: u64,
    },
    /// Replace the faults for generations that start from now on.
    SetFaults {
        /// Generation number to fault.
        #[serde(default)]
        faults: BTreeMap<String, String>,
    },
    /// Replace the executable that upgrades start.
    ReplaceBinary {
        /// `broken` (not a program) or `good` (the subject again).
        with: String,
    },
    /// Start requests that take `ms` to answer.
    SlowRequests {
        /// How many.
        count: usize,
        /// How long each takes.
        ms: u64,
    },
    /// Let the load run for this long.
    Pause {
        /// How long.
        ms: u64,
    },
}

fn ok() -> String {
    "ok".into()
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// What must hold at the end.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expectations {
    /// Failed requests, connections and lost datagrams allowed (0 unless
    /// the scenario explains an allowance in its description).
    pub dropped: u64,
    /// The generation serving at the end.
    pub generation: Option<u64>,
    /// Successful upgrades, if the scenario knows the number.
    pub upgrades_ok: Option<usize>,
    /// The first and last generations hold as many descriptors.
    pub same_descriptors: bool,
    /// Rollbacks (`rolled-back` events), if the scenario knows the number.
    pub rolled_back: Option<usize>,
    /// A generation serves at the end (false: the scenario shows an outage,
    /// such as a crash after the rollback window).
    pub serves_at_end: bool,
    /// At least this many failures: a scenario that proves the harness sees
    /// a loss passes only if it sees it.
    pub min_dropped: u64,
}

impl Default for Expectations {
    fn default() -> Self {
        Expectations {
            dropped: 0,
            generation: None,
            upgrades_ok: None,
            same_descriptors: true,
            rolled_back: None,
            serves_at_end: true,
            min_dropped: 0,
        }
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut scenario: Scenario =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if scenario.name.is_empty() {
            scenario.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        for (generation, fault) in &scenario.subject.faults {
            format!("{generation}={fault}")
                .parse::<crate::fault::Faults>()
                .map_err(|e| format!("{}: subject.faults: {e}", path.display()))?;
        }
        Ok(scenario)
    }

    /// Every scenario in a directory, by name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>, String> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        paths.sort();
        paths.iter().map(|path| Scenario::load(path)).collect()
    }
}

/// `{ "1" = "hang" }` as the subject's `SUBJECT_FAULTS` text.
pub fn faults_text(faults: &BTreeMap<String, String>) -> String {
    faults
        .iter()
        .map(|(generation, fault)| format!("{generation}={fault}"))
        .collect::<Vec<_>>()
        .join(",")
}
