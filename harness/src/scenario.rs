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
    /// How the HTTP port is served: `http1` (the drain's HTTP/1.1 helper),
    /// `auto` (HTTP/1.1 and h2c on one port, drained), or `stock` (axum's
    /// own `with_graceful_shutdown`, no handover drain: it loses requests,
    /// and a scenario shows the harness sees it).
    pub http: String,
    /// Serve HTTP/1.1 and HTTP/2 over TLS on a port of its own, with a test
    /// certificate the harness makes and the clients trust.
    pub tls: bool,
    /// Serve the gRPC echo service (h2c) on a port of its own.
    pub grpc: bool,
    /// Serve WebSocket echo on a port of its own.
    pub websocket: bool,
}

impl Default for SubjectSettings {
    fn default() -> Self {
        SubjectSettings {
            upgrade_timeout_ms: 10_000,
            quiet_period_ms: 200,
            faults: BTreeMap::new(),
            unix: false,
            rollback_window_ms: 0,
            http: "http1".into(),
            tls: false,
            grpc: false,
            websocket: false,
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
    /// HTTP/2 prior-knowledge connections on the HTTP port (`subject.http = "auto"`).
    pub h2c: usize,
    /// HTTP/2 clients opening a new connection per request.
    pub h2c_new_connection: usize,
    /// Concurrent streams on each HTTP/2 connection (plain and TLS).
    pub h2_streams: usize,
    /// Keep-alive HTTP/1.1 clients over TLS (`subject.tls`).
    pub tls_http1: usize,
    /// HTTP/1.1 clients over TLS with a new connection (a handshake) per request.
    pub tls_http1_new_connection: usize,
    /// HTTP/2 connections over TLS (ALPN h2).
    pub tls_h2: usize,
    /// HTTP/2 clients over TLS with a new connection per request.
    pub tls_h2_new_connection: usize,
    /// Unary gRPC clients (`subject.grpc`).
    pub grpc_unary: usize,
    /// Server-streaming gRPC clients.
    pub grpc_streaming: usize,
    /// Replies per stream.
    pub grpc_stream_replies: u32,
    /// Between two replies of a stream.
    pub grpc_stream_interval_ms: u64,
    /// WebSocket echo clients (`subject.websocket`).
    pub websocket: usize,
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
            h2c: 0,
            h2c_new_connection: 0,
            h2_streams: 4,
            tls_http1: 0,
            tls_http1_new_connection: 0,
            tls_h2: 0,
            tls_h2_new_connection: 0,
            grpc_unary: 0,
            grpc_streaming: 0,
            grpc_stream_replies: 10,
            grpc_stream_interval_ms: 20,
            websocket: 0,
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
    /// p99 latency within 500 ms of an upgrade at most this many times the
    /// steady p99, for each of HTTP/2 and TLS (h2c, tls-http1, tls-h2)
    /// that ran.
    pub p99_ratio_max: Option<f64>,
    /// The last generation's TLS handshakes per second at most this many
    /// percent below the first generation's (faster is never a problem).
    pub tls_rate_within_pct: Option<f64>,
    /// At most this many full TLS handshakes (no session resumed) with
    /// generations after the first. Each client keeps its sessions and the
    /// subject hands its session-ticket keys on, so a client resumes with a
    /// new generation the session it had with the old one; without the
    /// keys, each client's first handshake with each new generation is a
    /// full one.
    pub tls_full_after_first_max: Option<u64>,
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
            p99_ratio_max: None,
            tls_rate_within_pct: None,
            tls_full_after_first_max: None,
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
        if !["http1", "auto", "stock"].contains(&scenario.subject.http.as_str()) {
            return Err(format!(
                "{}: subject.http: {:?} is none of http1, auto, stock",
                path.display(),
                scenario.subject.http
            ));
        }
        let load = &scenario.load;
        let needs = [
            (
                load.h2c + load.h2c_new_connection > 0 && scenario.subject.http != "auto",
                "load.h2c needs subject.http = \"auto\"",
            ),
            (
                load.tls_http1
                    + load.tls_http1_new_connection
                    + load.tls_h2
                    + load.tls_h2_new_connection
                    > 0
                    && !scenario.subject.tls,
                "the TLS load needs subject.tls = true",
            ),
            (
                load.grpc_unary + load.grpc_streaming > 0 && !scenario.subject.grpc,
                "the gRPC load needs subject.grpc = true",
            ),
            (
                load.websocket > 0 && !scenario.subject.websocket,
                "load.websocket needs subject.websocket = true",
            ),
        ];
        if let Some((_, problem)) = needs.iter().find(|(missing, _)| *missing) {
            return Err(format!("{}: {problem}", path.display()));
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
