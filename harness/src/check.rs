//! `handover-harness check`: the upgrade scenarios against anyone's HTTP/1.1
//! server (or HTTP/2, TLS, gRPC through the standard health service,
//! WebSocket), seen from outside.
//!
//! The server is started by the harness (a fresh one for every scenario),
//! put under the strict load of [`crate::load`], and upgraded the way its
//! owner says: a signal to the pid in its PID file, or a command. What an
//! upgrade did is read from outside ([`crate::blackbox`]): the process tree
//! under the started process, the PID file, the answers (a header or body
//! word naming the pid or generation, when the server has one), and the
//! upgrade command's exit. Each upgrade gets two times:
//!
//! - *ready*: the new generation serves. By the first available of: a
//!   new identity in the answers (`--ready-header`, `--ready-body`), the
//!   upgrade command's exit, a new pid in the PID file, a new process.
//! - *old gone*: every process that was there at the trigger and exits
//!   has exited, and the server has as many processes as it had at the
//!   start (nginx's and HAProxy's masters stay; their old workers go).
//!
//! Each scenario is a [`ScenarioReport`] like `run`'s (same table, JSON and
//! picture) with a [`BlackBox`] section: processes left, zombies,
//! descriptors of the serving generation before and after, and every
//! upgrade's times.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::blackbox::{State, Watch, descriptors};
use crate::load::{
    Clients, FailureClass, HttpCheck, Identity, Load, LoadPlan, LoadReport, Mode, Target,
    TlsTarget, grpc_health_probe, h2_get, websocket_probe,
};

/// Concurrent streams on each kept HTTP/2 connection of `--http2`.
const H2_STREAMS: usize = 4;
/// Between two messages of a `--websocket` client: a chat's pace, fast
/// enough that a message is on its way at most upgrades.
const WS_PACE: Duration = Duration::from_millis(20);
use crate::report::{ScenarioReport, UpgradeRecord, around_upgrades_within};
use crate::scenario::Scenario;

/// How a new generation is seen to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadySource {
    /// The first available of: answer, command, PID file, processes.
    Auto,
    /// An answer names a new pid or generation (`--ready-header`, `--ready-body`).
    Answer,
    /// The upgrade command exited (with status 0).
    Command,
    /// The PID file names another pid.
    PidFile,
    /// A process appeared under the server.
    Processes,
}

/// Everything `check` needs to know about the server and the run.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The command that starts the server, with placeholders.
    pub server: String,
    /// Where it listens, if its own configuration says so (else `{addr}`).
    pub addr: Option<SocketAddr>,
    /// Its PID file, if its own configuration names it (else `{pidfile}`).
    pub pid_file: Option<PathBuf>,
    /// The signal that asks for an upgrade (to the pid in the PID file).
    pub upgrade_signal: Signal,
    /// A command that asks for an upgrade instead, with placeholders.
    pub upgrade_cmd: Option<String>,
    /// How readiness is seen.
    pub ready: ReadySource,
    /// Where answers name the process or generation.
    pub identity: Identity,
    /// The path, Host and body every load request checks.
    pub http: HttpCheck,
    /// A path whose answers take long (the long in-flight scenario).
    pub slow_path: Option<String>,
    /// How long a slow answer may take.
    pub slow_timeout: Duration,
    /// A command that makes the next upgrade fail, and one that undoes it.
    pub broken_upgrade: Option<String>,
    /// Undoes `broken_upgrade`.
    pub restore_upgrade: Option<String>,
    /// Each scenario's load lasts this long.
    pub duration: Duration,
    /// Between two upgrades.
    pub interval: Duration,
    /// Client connections.
    pub connections: usize,
    /// A new generation must be ready, and the old one gone, within this.
    pub upgrade_timeout: Duration,
    /// The server must answer within this after it is started.
    pub start_timeout: Duration,
    /// Scenarios to run (all if empty).
    pub only: Vec<String>,
    /// Print a progress line.
    pub progress: bool,
    /// Load over HTTP/2 (prior knowledge, or ALPN h2 with TLS) instead of
    /// HTTP/1.1, where a scenario's clients can be either.
    pub http2: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            server: String::new(),
            addr: None,
            pid_file: None,
            upgrade_signal: Signal::SIGHUP,
            upgrade_cmd: None,
            ready: ReadySource::Auto,
            identity: Identity::None,
            http: HttpCheck::default(),
            slow_path: None,
            slow_timeout: Duration::from_secs(30),
            broken_upgrade: None,
            restore_upgrade: None,
            duration: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            connections: 8,
            upgrade_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            only: Vec::new(),
            progress: false,
            http2: false,
        }
    }
}

/// The black-box scenarios, in the order they run.
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "keep-alive",
        "Keep-alive HTTP/1.1 clients, one request after another, while the server upgrades every interval: no request may fail.",
    ),
    (
        "new-connections",
        "A new connection per request while the server upgrades every interval: no connection refused, no request lost.",
    ),
    (
        "idle-keep-alive",
        "Keep-alive clients that idle for 3/4 of an interval between requests, across upgrades: a connection the old generation closes must not take a request with it.",
    ),
    (
        "long-in-flight",
        "Requests to --slow-path in flight when each upgrade is asked for must all be answered in full (skipped without --slow-path).",
    ),
    (
        "upgrade-storm",
        "Upgrades asked for every interval/20 for half the run, under load: no request fails, and the server settles to as many processes as it started with.",
    ),
    (
        "sigkill-old-during-start",
        "The old generation is SIGKILLed as soon as its successor's process appears: the successor serves, no connection is refused (requests in flight on the killed processes' connections may fail: at most one per connection per kill).",
    ),
    (
        "broken-successor",
        "After --broken-upgrade, upgrades fail: the old generation must keep serving without a failed request; after --restore-upgrade, an upgrade succeeds (skipped without --broken-upgrade).",
    ),
];

/// One upgrade as seen from outside; times in ms from its trigger.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpgradeTiming {
    /// From the start of the load.
    pub at_ms: u32,
    /// How it was asked for.
    pub trigger: String,
    /// The first new process appeared.
    pub new_process_ms: Option<f64>,
    /// An answer named a new pid or generation.
    pub answer_ms: Option<f64>,
    /// The PID file named another pid.
    pub pid_file_ms: Option<f64>,
    /// The upgrade command exited.
    pub command_ms: Option<f64>,
    /// Its exit status.
    pub command_status: Option<i32>,
    /// Ready, by the run's ready source.
    pub ready_ms: Option<f64>,
    /// Every process of the old generation had exited.
    pub old_gone_ms: Option<f64>,
    /// `ok`, or what went wrong.
    pub outcome: String,
}

/// What `check` saw of the server's processes in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlackBox {
    /// The server's command, placeholders filled in.
    pub server: String,
    /// How readiness was seen.
    pub ready_source: String,
    /// Processes of the server once it first answered.
    pub steady_processes: usize,
    /// Processes left at the end, after the last upgrade settled.
    pub processes_left: Vec<i32>,
    /// Zombies under the server at the end.
    pub zombies: Vec<i32>,
    /// Descriptors of the serving generation before the load: (pid, count).
    pub descriptors_before: Option<(i32, usize)>,
    /// And after it.
    pub descriptors_after: Option<(i32, usize)>,
    /// Trigger to ready, median and 99th percentile, ms.
    pub ready_p50_ms: Option<f64>,
    /// 99th percentile.
    pub ready_p99_ms: Option<f64>,
    /// Trigger to old gone, median, ms.
    pub old_gone_p50_ms: Option<f64>,
    /// 99th percentile.
    pub old_gone_p99_ms: Option<f64>,
    /// "Near an upgrade" means within this of a trigger.
    pub near_window_ms: u32,
    /// Every upgrade.
    pub upgrades: Vec<UpgradeTiming>,
    /// Notes that are not failures.
    pub notes: Vec<String>,
    /// The server's last lines of output, when the scenario failed.
    pub log_tail: Vec<String>,
}

/// A scenario's report: `run`'s, plus what was seen from outside.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The same report as `run`'s.
    #[serde(flatten)]
    pub scenario: ScenarioReport,
    /// The black-box observations.
    pub blackbox: BlackBox,
}

/// A scenario left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Its name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// The placeholders' values.
#[derive(Debug, Clone)]
pub struct Places {
    /// `{addr}`.
    pub addr: SocketAddr,
    /// `{pidfile}`.
    pub pid_file: PathBuf,
    /// `{control}`.
    pub control: PathBuf,
    /// Where the server's output goes.
    pub log: PathBuf,
}

impl Places {
    /// `template` with `{addr}`, `{port}`, `{pidfile}`, `{control}` filled in.
    pub fn fill(&self, template: &str) -> String {
        template
            .replace("{addr}", &self.addr.to_string())
            .replace("{port}", &self.addr.port().to_string())
            .replace("{pidfile}", &self.pid_file.display().to_string())
            .replace("{control}", &self.control.display().to_string())
    }
}

/// A port nobody listens on now, on 127.0.0.1, for a server that binds it
/// itself.
///
/// Taken below the kernel's range of ephemeral ports, so that no outgoing
/// connection (this check's own load, or anything else on the machine) can
/// be given it between this choice and the server's bind. A port from
/// `bind(0)` is an ephemeral one, and on a busy machine one was taken in
/// that gap: haproxy then "exited as it started". Where the range cannot be
/// read (no `/proc`), or leaves no room below it, a port from `bind(0)`.
pub fn free_addr() -> io::Result<SocketAddr> {
    let room = first_ephemeral_port().and_then(ports_below_ephemeral);
    if let Some(ports) = room {
        let span = u32::from(ports.end - ports.start);
        let start = u32::try_from(spread() % u64::from(span)).unwrap_or(0);
        for step in 0..span {
            let offset = u16::try_from((start + step) % span).unwrap_or(0);
            let addr = SocketAddr::from(([127, 0, 0, 1], ports.start + offset));
            if std::net::TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The first port of the kernel's ephemeral range (Linux).
fn first_ephemeral_port() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// The ports [`free_addr`] chooses from: 20,000 to 10,000 below the first
/// ephemeral one (12768..22768 with Linux's default 32768), apart from the
/// 10,000 just below it that the systemd proof (`handover_harness::systemd`) takes its services' ports
/// from; none under 1024.
fn ports_below_ephemeral(first: u16) -> Option<std::ops::Range<u16>> {
    let start = first.saturating_sub(20_000).max(1024);
    let end = first.saturating_sub(10_000);
    (end > start).then_some(start..end)
}

/// A different starting point for each call and process, so that checks
/// running at the same time rarely try the same port first.
fn spread() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::from(elapsed.subsec_nanos()));
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    (u64::from(std::process::id()) << 20 ^ nanos).wrapping_add(call.wrapping_mul(7919))
}

/// Checks the options for mistakes a run would only find late.
pub fn validate(options: &CheckOptions) -> Result<(), String> {
    let known: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    if let Some(unknown) = options.only.iter().find(|n| !known.contains(&n.as_str())) {
        return Err(format!(
            "no such scenario: {unknown} (there are: {})",
            known.join(", ")
        ));
    }
    if options.addr.is_none()
        && !options.server.contains("{addr}")
        && !options.server.contains("{port}")
    {
        return Err(
            "--server has neither {addr} nor {port}: say where the server listens with --addr"
                .into(),
        );
    }
    if options.ready == ReadySource::Answer && options.identity == Identity::None {
        return Err("--ready answer needs --ready-header or --ready-body".into());
    }
    if options.ready == ReadySource::Command && options.upgrade_cmd.is_none() {
        return Err("--ready command needs --upgrade-cmd".into());
    }
    if options.ready == ReadySource::PidFile && !uses_pid_file(options) {
        return Err("--ready pid-file needs --pid-file or {pidfile} in --server".into());
    }
    if options.restore_upgrade.is_some() && options.broken_upgrade.is_none() {
        return Err("--restore-upgrade without --broken-upgrade".into());
    }
    if options.duration < Duration::from_millis(500) || options.interval < Duration::from_millis(20)
    {
        return Err("--duration must be at least 500ms and --interval at least 20ms".into());
    }
    if options.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let http = &options.http;
    if http.grpc.is_some() && (http.websocket.is_some() || options.http2) {
        return Err("--grpc speaks HTTP/2 on its own: not with --http2 or --websocket".into());
    }
    if http.websocket.is_some() && options.http2 {
        return Err("--websocket speaks HTTP/1.1 (its upgrade): not with --http2".into());
    }
    if (http.grpc.is_some() || http.websocket.is_some()) && options.identity != Identity::None {
        return Err(
            "--ready-header and --ready-body read HTTP answers: not with --grpc or --websocket (readiness by PID file, command or processes)"
                .into(),
        );
    }
    if http
        .websocket
        .as_ref()
        .is_some_and(|path| !path.starts_with('/'))
    {
        return Err("--websocket PATH must start with /".into());
    }
    Ok(())
}

fn uses_pid_file(options: &CheckOptions) -> bool {
    options.pid_file.is_some() || options.server.contains("{pidfile}")
}

/// The ready source `Auto` resolves to for these options.
pub fn ready_source(options: &CheckOptions) -> ReadySource {
    match options.ready {
        ReadySource::Auto if options.identity != Identity::None => ReadySource::Answer,
        ReadySource::Auto if options.upgrade_cmd.is_some() => ReadySource::Command,
        ReadySource::Auto if uses_pid_file(options) => ReadySource::PidFile,
        ReadySource::Auto => ReadySource::Processes,
        chosen => chosen,
    }
}

/// Runs the chosen scenarios, one fresh server each.
pub fn check(options: &CheckOptions, dir: &Path) -> (Vec<CheckReport>, Vec<Skipped>) {
    let addr = options.addr.map_or_else(free_addr, Ok);
    let places = Places {
        addr: addr.unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        pid_file: options
            .pid_file
            .clone()
            .unwrap_or_else(|| dir.join("server.pid")),
        control: dir.join("control.sock"),
        log: dir.join("server.log"),
    };
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for (name, description) in SCENARIOS {
        if !options.only.is_empty() && !options.only.iter().any(|n| n == name) {
            continue;
        }
        let other = options.http.grpc.is_some() || options.http.websocket.is_some();
        let reason = match *name {
            "idle-keep-alive" | "long-in-flight" if other => {
                Some("HTTP only (not with --grpc or --websocket)")
            }
            "new-connections" if options.http.websocket.is_some() => {
                Some("not with --websocket (its connections live long: see keep-alive)")
            }
            "long-in-flight" if options.slow_path.is_none() => Some("no --slow-path"),
            "broken-successor" if options.broken_upgrade.is_none() => Some("no --broken-upgrade"),
            _ => None,
        };
        if let Some(reason) = reason {
            skipped.push(Skipped {
                name: (*name).into(),
                reason: reason.into(),
            });
            continue;
        }
        let scenario = Scenario {
            name: (*name).into(),
            description: (*description).into(),
            subject: Default::default(),
            load: Default::default(),
            steps: Vec::new(),
            expect: Default::default(),
        };
        let places = Places {
            log: dir.join(format!("{name}.log")),
            ..places.clone()
        };
        let report = match Session::start(options, &places) {
            Ok(session) => session.run(&scenario),
            Err(problem) => CheckReport {
                scenario: ScenarioReport::failed_to_start(&scenario, problem),
                blackbox: BlackBox {
                    server: places.fill(&options.server),
                    log_tail: log_tail(&places.log),
                    ..BlackBox::default()
                },
            },
        };
        if options.progress {
            eprintln!(
                "  {:<26} {}",
                report.scenario.name,
                if report.scenario.passed {
                    "PASS"
                } else {
                    "FAIL"
                }
            );
        }
        reports.push(report);
    }
    (reports, skipped)
}

/// One scenario's server, from its start to its stop.
struct Session<'a> {
    options: &'a CheckOptions,
    places: &'a Places,
    source: ReadySource,
    watch: Watch,
    /// Processes once the server first answered.
    steady: usize,
    /// Processes that stayed through an upgrade (a master).
    persistent: Option<BTreeSet<i32>>,
    /// Identities the answers have named so far.
    identities: BTreeSet<String>,
    load_started: Instant,
    upgrades: Vec<UpgradeRecord>,
    timings: Vec<UpgradeTiming>,
    problems: Vec<String>,
    notes: Vec<String>,
    /// Failures allowed (the SIGKILL scenario), by class.
    allowed_resets: u64,
    slow: Vec<JoinHandle<Result<(), (FailureClass, String)>>>,
    upgrades_done: Arc<AtomicU64>,
}

impl<'a> Session<'a> {
    fn start(options: &'a CheckOptions, places: &'a Places) -> Result<Session<'a>, String> {
        if options.pid_file.is_none() {
            let _ = std::fs::remove_file(&places.pid_file);
        }
        let command = places.fill(&options.server);
        let pid_file = uses_pid_file(options).then(|| places.pid_file.clone());
        let watch = Watch::start(&command, pid_file.clone(), &places.log)
            .map_err(|e| format!("cannot start `{command}`: {e}"))?;
        let mut session = Session {
            options,
            places,
            source: ready_source(options),
            watch,
            steady: 0,
            persistent: None,
            identities: BTreeSet::new(),
            load_started: Instant::now(),
            upgrades: Vec::new(),
            timings: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            allowed_resets: 0,
            slow: Vec::new(),
            upgrades_done: Arc::new(AtomicU64::new(0)),
        };
        let deadline = Instant::now() + options.start_timeout;
        loop {
            if session.watch.state().live().is_empty() {
                return Err(format!("the server exited as it started (`{command}`)"));
            }
            let pid_ok = pid_file.is_none() || session.pid_file_names_a_member();
            let answer = session.probe();
            if pid_ok && let Ok(answer) = &answer {
                if let Some(identity) = answer {
                    session.identities.insert(identity.clone());
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the server did not answer 200 on {}://{}{}{} within {:?} (`{command}`; last answer: {})",
                    if options.http.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    },
                    places.addr,
                    options.http.path,
                    if pid_ok {
                        ""
                    } else {
                        " with its PID file naming one of its processes"
                    },
                    options.start_timeout,
                    answer.err().unwrap_or_else(|| "200".into())
                ));
            }
            // Polling a server that gives no sign of readiness but its answers.
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its process count, once it holds still (workers forked after the
        // first answer are counted).
        let mut last = (usize::MAX, 0u64);
        session.steady = session
            .watch
            .wait_until(Instant::now() + options.start_timeout, |s| {
                let live = s.live().len();
                if live != last.0 {
                    last = (live, s.scans);
                }
                (s.scans >= last.1 + 50).then_some(live)
            })
            .unwrap_or(last.0);
        Ok(session)
    }

    fn pid_file_names_a_member(&self) -> bool {
        let state = self.watch.state();
        state
            .pid_file
            .is_some_and(|pid| state.live().contains(&pid))
    }

    /// One request on a new connection: the identity the answer names.
    fn probe(&self) -> Result<Option<String>, String> {
        probe(self.places.addr, &self.options.http, &self.options.identity)
    }

    /// The process that serves now: the one the answers name, else the
    /// PID file's, else the newest.
    fn serving_pid(&self) -> Option<i32> {
        let named = self
            .probe()
            .ok()
            .flatten()
            .and_then(|identity| identity.parse::<i32>().ok());
        let state = self.watch.state();
        let live = state.live();
        named
            .filter(|pid| live.contains(pid))
            .or(state.pid_file.filter(|pid| live.contains(pid)))
            .or_else(|| state.newest())
    }

    fn serving_descriptors(&self) -> Option<(i32, usize)> {
        let pid = self.serving_pid()?;
        Some((pid, descriptors(pid)?))
    }

    fn run(mut self, scenario: &Scenario) -> CheckReport {
        let options = self.options;
        let descriptors_before = self.serving_descriptors();
        let half = options.connections.div_ceil(2);
        let mut plan = LoadPlan {
            http: Some(self.places.addr),
            http_check: Some(options.http.clone()),
            ..LoadPlan::default()
        };
        match scenario.name.as_str() {
            "keep-alive" => plan.keep_alive = options.connections,
            "new-connections" => plan.new_connection = options.connections,
            "idle-keep-alive" => plan.idle = vec![(options.connections, options.interval * 3 / 4)],
            "long-in-flight" => plan.keep_alive = half,
            _ => {
                plan.keep_alive = half;
                plan.new_connection = options.connections - half;
            }
        }
        if options.http2 {
            // The same connections, over HTTP/2: a few streams on each
            // kept one, one stream on each new one. Idle clients and slow
            // requests stay HTTP/1.1.
            let target = Target {
                addr: self.places.addr,
                tls: options.http.tls.clone(),
            };
            for (count, mode) in [
                (std::mem::take(&mut plan.keep_alive), Mode::KeepAlive),
                (
                    std::mem::take(&mut plan.new_connection),
                    Mode::NewConnection,
                ),
            ] {
                if count > 0 {
                    plan.clients.push(Clients::Http2 {
                        target: target.clone(),
                        mode,
                        streams: H2_STREAMS,
                        count,
                    });
                }
            }
        }
        let target = Target {
            addr: self.places.addr,
            tls: options.http.tls.clone(),
        };
        if let Some(service) = &options.http.grpc {
            // Health `Check` calls where HTTP had requests; on the kept
            // connections' side, half are `Watch` streams held open across
            // every upgrade.
            let kept = std::mem::take(&mut plan.keep_alive);
            let new = std::mem::take(&mut plan.new_connection);
            let watching = kept / 2;
            for (count, watch, mode) in [
                (kept - watching, false, Mode::KeepAlive),
                (watching, true, Mode::KeepAlive),
                (new, false, Mode::NewConnection),
            ] {
                if count > 0 {
                    plan.clients.push(Clients::GrpcHealth {
                        target: target.clone(),
                        service: service.clone(),
                        watch,
                        mode,
                        count,
                    });
                }
            }
        }
        if let Some(path) = &options.http.websocket {
            // Every client a WebSocket connection of its own.
            let count =
                std::mem::take(&mut plan.keep_alive) + std::mem::take(&mut plan.new_connection);
            let scheme = if target.tls.is_some() { "wss" } else { "ws" };
            plan.clients.push(Clients::WebSocketAt {
                target: target.clone(),
                url: format!("{scheme}://{}{path}", options.http.host),
                pace: WS_PACE,
                count,
            });
        }
        self.load_started = Instant::now();
        let load = Load::run(plan);
        let progress = options
            .progress
            .then(|| progress_line(&scenario.name, &load, &self.upgrades_done));
        let end = self.load_started + options.duration;
        match scenario.name.as_str() {
            "upgrade-storm" => self.storm(end),
            "sigkill-old-during-start" => self.sigkill_old(end),
            "broken-successor" => self.broken(end),
            "long-in-flight" => self.every_interval(end, true),
            _ => self.every_interval(end, false),
        }
        // The scenario's length: the load runs on to the end.
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let load_report = load.finish();
        if let Some((stop, thread)) = progress {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        let slow_failures = self.collect_slow();
        self.finish(scenario, load_report, slow_failures, descriptors_before)
    }

    fn elapsed_ms(&self) -> u32 {
        self.load_started.elapsed().as_millis() as u32
    }

    /// Requests in flight at once at most: what a SIGKILL may cut. Over
    /// HTTP/2 each kept connection carries several streams.
    fn in_flight_at_most(&self) -> u64 {
        let connections = self.options.connections as u64;
        if self.options.http2 {
            let kept = connections.div_ceil(2);
            kept * H2_STREAMS as u64 + (connections - kept)
        } else {
            connections
        }
    }

    /// Upgrades every interval until `end`, each waited for (ready and old
    /// gone); with `slow`, slow requests are in flight at each trigger.
    fn every_interval(&mut self, end: Instant, slow: bool) {
        let mut next = self.load_started + self.options.interval / 2;
        while next < end {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if slow {
                self.start_slow_requests();
            }
            self.upgrade("upgrade");
            next = (next + self.options.interval).max(Instant::now());
        }
    }

    /// Asks for an upgrade; the helper command if there is one.
    fn trigger(&self) -> Result<(String, Option<Child>), String> {
        if let Some(template) = &self.options.upgrade_cmd {
            let command = self.places.fill(template);
            let child = self
                .watch
                .helper(&command, &self.places.log)
                .map_err(|e| format!("cannot run `{command}`: {e}"))?;
            return Ok((command, Some(child)));
        }
        let target = {
            let state = self.watch.state();
            state
                .pid_file
                .or_else(|| state.members.keys().next().copied())
                .ok_or("no process to signal")?
        };
        self.watch.signal(target, self.options.upgrade_signal)?;
        Ok((format!("{} to {target}", self.options.upgrade_signal), None))
    }

    /// One upgrade, waited for: its record and its times.
    fn upgrade(&mut self, label: &str) -> UpgradeTiming {
        let before = self.watch.state().live();
        let pid_file_before = self.watch.state().pid_file;
        let at_ms = self.elapsed_ms();
        let t0 = Instant::now();
        let since = self.watch.at(t0);
        let deadline = t0 + self.options.upgrade_timeout;
        let (trigger, command) = match self.trigger() {
            Ok(triggered) => triggered,
            Err(problem) => {
                return self.record(UpgradeTiming {
                    at_ms,
                    trigger: label.into(),
                    outcome: format!("cannot ask: {problem}"),
                    ..UpgradeTiming::default()
                });
            }
        };
        let answer = (self.options.identity != Identity::None).then(|| {
            watch_answers(
                self.places.addr,
                self.options.http.clone(),
                self.options.identity.clone(),
                self.identities.clone(),
                before.clone(),
                deadline,
            )
        });
        let command = command.map(|child| wait_command(child, deadline));
        let source = self.source;
        let ready = self.watch.wait_until(deadline, |s| {
            let done = match source {
                ReadySource::Answer => answer.as_ref().is_some_and(|a| a.done()),
                ReadySource::Command => command.as_ref().is_some_and(|c| c.done()),
                ReadySource::PidFile => s.pid_file != pid_file_before && s.pid_file.is_some(),
                ReadySource::Processes | ReadySource::Auto => {
                    new_process(s, &before, since).is_some()
                }
            };
            done.then_some(())
        });
        let steady = self.steady;
        let old_gone = self.watch.wait_until(deadline, |s| {
            let exited = before
                .iter()
                .filter_map(|pid| s.members.get(pid)?.gone)
                .max();
            exited.filter(|_| s.live().len() <= steady)
        });
        let answer = answer.map(|a| a.finish());
        let command = command.map(|c| c.finish());
        let ms = |at: Duration| at.saturating_sub(since).as_secs_f64() * 1000.0;
        let state = self.watch.state();
        let new_process_ms = new_process(&state, &before, since).map(ms);
        let pid_file_ms = (state.pid_file != pid_file_before && state.pid_file.is_some())
            .then(|| ms(state.pid_file_changed));
        drop(state);
        let answer_ms = answer
            .as_ref()
            .and_then(|a| a.as_ref())
            .map(|(at, identity)| {
                self.identities.insert(identity.clone());
                ms(self.watch.at(*at))
            });
        let (command_ms, command_status) = match &command {
            Some(Some((at, status))) => (Some(ms(self.watch.at(*at))), Some(*status)),
            _ => (None, None),
        };
        let ready_ms = ready.and(match source {
            ReadySource::Answer => answer_ms,
            ReadySource::Command => command_ms,
            ReadySource::PidFile => pid_file_ms,
            ReadySource::Processes | ReadySource::Auto => new_process_ms,
        });
        let old_gone_ms = old_gone.map(ms);
        let outcome = if command_status.is_some_and(|status| status != 0) {
            format!(
                "the upgrade command exited {}",
                command_status.unwrap_or(-1)
            )
        } else if command.is_some() && command_ms.is_none() {
            format!(
                "the upgrade command did not exit within {:?}",
                self.options.upgrade_timeout
            )
        } else if ready_ms.is_none() {
            format!(
                "no new generation ({}) within {:?}",
                source_name(source),
                self.options.upgrade_timeout
            )
        } else if old_gone_ms.is_none() {
            format!(
                "the old generation did not leave within {:?}",
                self.options.upgrade_timeout
            )
        } else {
            "ok".into()
        };
        if old_gone.is_some() && self.persistent.is_none() {
            let live = self.watch.state().live();
            self.persistent = Some(before.intersection(&live).copied().collect());
        }
        self.record(UpgradeTiming {
            at_ms,
            trigger,
            new_process_ms,
            answer_ms,
            pid_file_ms,
            command_ms,
            command_status,
            ready_ms,
            old_gone_ms,
            outcome,
        })
    }

    fn record(&mut self, timing: UpgradeTiming) -> UpgradeTiming {
        self.upgrades.push(UpgradeRecord {
            at_ms: timing.at_ms,
            outcome: if timing.outcome == "ok" {
                "ok".into()
            } else {
                "failed".into()
            },
            latency_us: timing.ready_ms.map(|ms| (ms * 1000.0) as u64),
            answer: describe(&timing),
        });
        self.upgrades_done.fetch_add(1, Ordering::Relaxed);
        self.timings.push(timing.clone());
        timing
    }

    /// Triggers every interval/20 (at least 5 ms) for half the run, each
    /// without waiting for the last; then the server must settle.
    fn storm(&mut self, end: Instant) {
        let start = self.load_started + self.options.interval / 2;
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        let every = (self.options.interval / 20).max(Duration::from_millis(5));
        let until = start + self.options.duration / 2;
        let mut commands: Vec<Child> = Vec::new();
        let mut sent = 0u32;
        let mut refused = Vec::new();
        while Instant::now() < until {
            let at_ms = self.elapsed_ms();
            match self.trigger() {
                Ok((trigger, child)) => {
                    sent += 1;
                    commands.extend(child);
                    self.upgrades.push(UpgradeRecord {
                        at_ms,
                        outcome: "ok".into(),
                        latency_us: None,
                        answer: format!("storm: {trigger}"),
                    });
                    self.upgrades_done.fetch_add(1, Ordering::Relaxed);
                }
                // A process may just have left: the next round targets its successor.
                Err(problem) => refused.push(problem),
            }
            // The storm's pace.
            std::thread::sleep(every);
        }
        let deadline = Instant::now() + self.options.upgrade_timeout;
        let mut failed_commands = 0;
        for child in commands {
            match wait_command(child, deadline).finish() {
                Some((_, 0)) => {}
                _ => failed_commands += 1,
            }
        }
        self.notes.push(format!(
            "storm: {sent} upgrades asked for, every {every:?}; {} could not be sent (no process to signal at that instant); {failed_commands} commands failed",
            refused.len()
        ));
        if sent == 0 {
            self.problems
                .push(format!("no upgrade could be asked for: {refused:?}"));
        }
        if !self.settle(deadline.max(Instant::now() + self.options.upgrade_timeout)) {
            return;
        }
        // A known end: one more upgrade, waited for, must succeed.
        if Instant::now() < end {
            let timing = self.upgrade("upgrade after the storm");
            if timing.outcome != "ok" {
                self.problems
                    .push(format!("the upgrade after the storm: {}", timing.outcome));
            }
        }
    }

    /// Waits until the server has its steady number of processes and
    /// answers; a problem if it does not by `deadline`.
    fn settle(&mut self, deadline: Instant) -> bool {
        let steady = self.steady;
        let pid_file = uses_pid_file(self.options);
        let mut last = (usize::MAX, 0u64);
        let settled = self.watch.wait_until(deadline, |s| {
            let live = s.live();
            let named = !pid_file || s.pid_file.is_some_and(|pid| live.contains(&pid));
            let key = if named && live.len() == steady {
                steady
            } else {
                usize::MAX
            };
            if key != last.0 {
                last = (key, s.scans);
            }
            (key == steady && s.scans >= last.1 + 25).then_some(())
        });
        if settled.is_none() {
            let live = self.watch.state().live();
            self.problems.push(format!(
                "the server did not settle within {:?}: {} processes {live:?} (it started with {steady})",
                self.options.upgrade_timeout,
                live.len()
            ));
            return false;
        }
        true
    }

    /// Each interval: an upgrade, and the processes of the old generation
    /// SIGKILLed as soon as a new process appears.
    fn sigkill_old(&mut self, end: Instant) {
        let start = self.load_started + self.options.interval / 2;
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        // One plain upgrade first: which processes stay through an upgrade
        // (a master) is learnt from it, and they are not the old generation.
        let warm_up = self.upgrade("upgrade (learns which processes stay)");
        if warm_up.outcome != "ok" {
            self.problems
                .push(format!("the first, plain upgrade: {}", warm_up.outcome));
            return;
        }
        let persistent = self.persistent.clone().unwrap_or_default();
        let mut next = Instant::now() + self.options.interval / 2;
        while next < end {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let before = self.watch.state().live();
            let victims: BTreeSet<i32> = before.difference(&persistent).copied().collect();
            let at_ms = self.elapsed_ms();
            let t0 = Instant::now();
            let since = self.watch.at(t0);
            let deadline = t0 + self.options.upgrade_timeout;
            let (trigger, command) = match self.trigger() {
                Ok(triggered) => triggered,
                Err(problem) => {
                    self.problems
                        .push(format!("cannot ask for an upgrade: {problem}"));
                    return;
                }
            };
            let command = command.map(|child| wait_command(child, deadline));
            let appeared = self
                .watch
                .wait_until(deadline, |s| new_process(s, &before, since));
            let mut killed = Vec::new();
            for &pid in &victims {
                if self.watch.signal(pid, Signal::SIGKILL).is_ok() {
                    killed.push(pid);
                }
            }
            self.allowed_resets += self.in_flight_at_most();
            let ms = |at: Duration| at.saturating_sub(since).as_secs_f64() * 1000.0;
            let new_process_ms = appeared.map(ms);
            let recovered = self.settle(deadline) && self.probe().is_ok();
            let command = command.and_then(|c| c.finish());
            if killed.is_empty() {
                self.notes.push(format!(
                    "at {at_ms} ms the old generation {victims:?} had left before it could be killed"
                ));
            }
            let outcome = if recovered {
                "ok".to_owned()
            } else {
                "the server did not recover".to_owned()
            };
            self.record(UpgradeTiming {
                at_ms,
                trigger: format!("{trigger}, then SIGKILL to {killed:?}"),
                new_process_ms,
                command_ms: command.map(|(at, _)| ms(self.watch.at(at))),
                command_status: command.map(|(_, status)| status),
                ready_ms: None,
                old_gone_ms: None,
                outcome,
                ..UpgradeTiming::default()
            });
            if !recovered {
                return;
            }
            next = (next + self.options.interval).max(Instant::now());
        }
    }

    /// Upgrades after `--broken-upgrade` must fail with the old generation
    /// serving on; after `--restore-upgrade`, one must succeed.
    fn broken(&mut self, end: Instant) {
        let start = self.load_started + self.options.interval / 2;
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        let Some(breaking) = self.options.broken_upgrade.clone() else {
            return;
        };
        if let Err(problem) = self.hook(&breaking) {
            self.problems.push(format!("--broken-upgrade: {problem}"));
            return;
        }
        let attempts = 2;
        for _ in 0..attempts {
            let before = self.watch.state().live();
            let pid_file_before = self.watch.state().pid_file;
            let at_ms = self.elapsed_ms();
            let t0 = Instant::now();
            let since = self.watch.at(t0);
            let window = self.options.interval.max(Duration::from_secs(1));
            let (trigger, command) = match self.trigger() {
                Ok(triggered) => triggered,
                Err(problem) => {
                    self.problems
                        .push(format!("cannot ask for an upgrade: {problem}"));
                    return;
                }
            };
            // The attempt is over when the command exits, or when a process
            // that appeared has gone again, or after the window.
            let command =
                command.and_then(|c| wait_command(c, t0 + self.options.upgrade_timeout).finish());
            if command.is_none() {
                self.watch.wait_until(t0 + window, |s| {
                    let new: Vec<_> = s
                        .members
                        .iter()
                        .filter(|(pid, m)| !before.contains(pid) && m.seen >= since)
                        .collect();
                    (!new.is_empty() && new.iter().all(|(_, m)| m.gone.is_some())).then_some(())
                });
            }
            let ms = |at: Duration| at.saturating_sub(since).as_secs_f64() * 1000.0;
            let state = self.watch.state();
            let lost: Vec<i32> = before
                .iter()
                .copied()
                .filter(|pid| !state.live().contains(pid))
                .collect();
            let pid_file_after = state.pid_file;
            let new_process_ms = state
                .members
                .iter()
                .filter(|(pid, m)| !before.contains(pid) && m.seen >= since)
                .map(|(_, m)| m.seen)
                .min()
                .map(ms);
            drop(state);
            let outcome = if !lost.is_empty() {
                format!("the old generation left ({lost:?}) though its successor was broken")
            } else if pid_file_after != pid_file_before {
                format!(
                    "the PID file changed from {pid_file_before:?} to {pid_file_after:?} though the successor was broken"
                )
            } else {
                "kept serving".into()
            };
            if outcome != "kept serving" {
                self.problems.push(outcome.clone());
            }
            self.upgrades.push(UpgradeRecord {
                at_ms,
                outcome: "failed".into(),
                latency_us: None,
                answer: format!("broken successor: {trigger}: {outcome}"),
            });
            self.timings.push(UpgradeTiming {
                at_ms,
                trigger: format!("{trigger} (broken)"),
                new_process_ms,
                command_ms: command.map(|(at, _)| ms(self.watch.at(at))),
                command_status: command.map(|(_, status)| status),
                outcome: outcome.clone(),
                ..UpgradeTiming::default()
            });
            self.upgrades_done.fetch_add(1, Ordering::Relaxed);
            if outcome != "kept serving" || Instant::now() >= end {
                break;
            }
        }
        if let Some(restore) = self.options.restore_upgrade.clone()
            && let Err(problem) = self.hook(&restore)
        {
            self.problems.push(format!("--restore-upgrade: {problem}"));
            return;
        }
        if self.options.restore_upgrade.is_some() {
            let timing = self.upgrade("upgrade after --restore-upgrade");
            if timing.outcome != "ok" {
                self.problems.push(format!(
                    "the upgrade after --restore-upgrade: {}",
                    timing.outcome
                ));
            }
        }
    }

    fn hook(&self, template: &str) -> Result<(), String> {
        let command = self.places.fill(template);
        let child = self
            .watch
            .helper(&command, &self.places.log)
            .map_err(|e| format!("cannot run `{command}`: {e}"))?;
        match wait_command(child, Instant::now() + Duration::from_secs(30)).finish() {
            Some((_, 0)) => Ok(()),
            Some((_, status)) => Err(format!("`{command}` exited {status}")),
            None => Err(format!("`{command}` did not finish within 30s")),
        }
    }

    /// Requests to the slow path, each in flight before this returns.
    fn start_slow_requests(&mut self) {
        let Some(path) = self.options.slow_path.clone() else {
            return;
        };
        let count = self.options.connections.div_ceil(2);
        let (sent, written) = std::sync::mpsc::channel();
        for _ in 0..count {
            let sent = sent.clone();
            let addr = self.places.addr;
            let path = path.clone();
            let host = self.options.http.host.clone();
            let tls = self.options.http.tls.clone();
            let timeout = self.options.slow_timeout;
            self.slow.push(std::thread::spawn(move || {
                slow_request(addr, tls.as_ref(), &path, &host, timeout, sent)
            }));
        }
        drop(sent);
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..count {
            if written
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                break;
            }
        }
        // Written is not yet read: give the server a moment to take the
        // requests in before the upgrade is asked for.
        std::thread::sleep((self.options.interval / 4).min(Duration::from_millis(100)));
    }

    fn collect_slow(&mut self) -> Vec<(FailureClass, String)> {
        self.slow
            .drain(..)
            .filter_map(|request| match request.join() {
                Ok(Ok(())) => None,
                Ok(Err(failure)) => Some(failure),
                Err(_) => Some((FailureClass::Reset, "the request's thread panicked".into())),
            })
            .collect()
    }

    fn finish(
        mut self,
        scenario: &Scenario,
        mut load: LoadReport,
        slow_failures: Vec<(FailureClass, String)>,
        descriptors_before: Option<(i32, usize)>,
    ) -> CheckReport {
        let options = self.options;
        // Slow requests are few: their failures go first among the examples.
        for (class, detail) in slow_failures.iter().take(3).rev() {
            load.examples.insert(0, format!("slow {class}: {detail}"));
        }
        load.examples.truncate(5);
        // What a SIGKILLed generation cuts: a request on a connection, a
        // handshake under way, an HTTP/2 stream.
        let resets: u64 = [
            FailureClass::Reset,
            FailureClass::Tls,
            FailureClass::StreamReset,
            FailureClass::GoAwayRefused,
            // A call or message on a killed process's connection.
            FailureClass::GrpcUnavailable,
            FailureClass::GrpcCancelled,
            FailureClass::GrpcOther,
            FailureClass::WsAbnormal,
            FailureClass::WsLost,
        ]
        .iter()
        .filter_map(|class| load.failures.get(class))
        .sum();
        let unexplained =
            load.failed() + slow_failures.len() as u64 - resets.min(self.allowed_resets);
        if unexplained > 0 {
            let classes: Vec<String> = load
                .failures
                .iter()
                .map(|(class, n)| format!("{class}={n}"))
                .chain((!slow_failures.is_empty()).then(|| format!("slow={}", slow_failures.len())))
                .collect();
            self.problems.insert(
                0,
                format!(
                    "{} requests failed ({}){}: {:?}",
                    load.failed() + slow_failures.len() as u64,
                    classes.join(" "),
                    if self.allowed_resets > 0 {
                        format!(", {} resets allowed", self.allowed_resets)
                    } else {
                        String::new()
                    },
                    load.examples
                ),
            );
        }
        for timing in self
            .timings
            .iter()
            .filter(|t| t.outcome != "ok" && t.outcome != "kept serving")
        {
            let problem = format!("upgrade at {} ms: {}", timing.at_ms, timing.outcome);
            if !self.problems.contains(&problem) && self.problems.len() < 12 {
                self.problems.push(problem);
            }
        }
        // What is left once the last upgrade has settled.
        self.settle(Instant::now() + options.upgrade_timeout);
        let processes_left: Vec<i32> = self.watch.state().live().into_iter().collect();
        let zombies = self.watch.state().zombies();
        if !zombies.is_empty() {
            self.problems
                .push(format!("zombies under the server: {zombies:?}"));
        }
        if let Err(problem) = self.probe() {
            self.problems
                .push(format!("the server does not answer at the end: {problem}"));
        }
        if uses_pid_file(options) && !self.pid_file_names_a_member() {
            let named = self.watch.state().pid_file;
            self.problems.push(format!(
                "the PID file {} names {named:?}, not a process of the server",
                self.places.pid_file.display()
            ));
        }
        // The load's connections are closed: the serving generation's
        // descriptors come back down to what they were, or it leaks.
        let mut descriptors_after = self.serving_descriptors();
        if let (Some((_, before)), Some(_)) = (descriptors_before, descriptors_after) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while descriptors_after.is_some_and(|(_, after)| after > before)
                && Instant::now() < deadline
            {
                // The server closes what the clients closed, in its own time.
                std::thread::sleep(Duration::from_millis(20));
                descriptors_after = self.serving_descriptors();
            }
        }
        if let (Some((_, before)), Some((pid, after))) = (descriptors_before, descriptors_after) {
            if after > before {
                self.problems.push(format!(
                    "descriptors of the serving generation: {before} before, {after} after (pid {pid})"
                ));
            } else if after < before {
                // Not a leak: the first generation held descriptors its
                // launcher left open without close-on-exec, which a
                // successor started by the library does not inherit.
                self.notes.push(format!(
                    "descriptors of the serving generation: {before} before, {after} after (pid {pid}): the first held {} its launcher passed it",
                    before - after
                ));
            }
        }
        let generations = self.timings.iter().filter(|t| t.outcome == "ok").count() as u64;
        let failed = !self.problems.is_empty();
        let mut report = ScenarioReport::new(
            scenario,
            load.clone(),
            0,
            std::mem::take(&mut self.upgrades),
            std::mem::take(&mut self.problems),
            Some(generations),
            generations,
            (
                descriptors_before.map(|d| d.1),
                descriptors_after.map(|d| d.1),
            ),
            self.load_started.elapsed(),
        );
        for (class, _) in &slow_failures {
            *report.failures.entry(format!("slow-{class}")).or_default() += 1;
        }
        let window = (options.interval.as_millis() as u32 / 4).clamp(10, 500);
        let triggers: Vec<u32> = self.timings.iter().map(|t| t.at_ms).collect();
        report.around_upgrades = around_upgrades_within(&load.samples, &triggers, window);
        let ready: Vec<f64> = self.timings.iter().filter_map(|t| t.ready_ms).collect();
        let gone: Vec<f64> = self.timings.iter().filter_map(|t| t.old_gone_ms).collect();
        let blackbox = BlackBox {
            server: self.places.fill(&options.server),
            ready_source: source_name(self.source).into(),
            steady_processes: self.steady,
            processes_left,
            zombies,
            descriptors_before,
            descriptors_after,
            ready_p50_ms: percentile(&ready, 50.0),
            ready_p99_ms: percentile(&ready, 99.0),
            old_gone_p50_ms: percentile(&gone, 50.0),
            old_gone_p99_ms: percentile(&gone, 99.0),
            near_window_ms: window,
            upgrades: std::mem::take(&mut self.timings),
            notes: std::mem::take(&mut self.notes),
            log_tail: if failed {
                log_tail(&self.places.log)
            } else {
                Vec::new()
            },
        };
        let killed = self.watch.stop(Duration::from_secs(5));
        let mut report = CheckReport {
            scenario: report,
            blackbox,
        };
        if !killed.is_empty() {
            report.blackbox.notes.push(format!(
                "the server did not stop within 5s of SIGTERM: SIGKILL to {killed:?}"
            ));
        }
        report
    }
}

/// When the first process of the server appeared that was not there
/// `since` (the live set `before`).
fn new_process(state: &State, before: &BTreeSet<i32>, since: Duration) -> Option<Duration> {
    state
        .members
        .iter()
        .filter(|(pid, m)| !before.contains(pid) && m.seen >= since)
        .map(|(_, m)| m.seen)
        .min()
}

fn source_name(source: ReadySource) -> &'static str {
    match source {
        ReadySource::Auto => "auto",
        ReadySource::Answer => "answer names a new pid or generation",
        ReadySource::Command => "upgrade command exited",
        ReadySource::PidFile => "PID file names a new pid",
        ReadySource::Processes => "a new process appeared",
    }
}

fn describe(t: &UpgradeTiming) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
    format!(
        "{}: {} (ready {}, old gone {}, new process {}, PID file {}, command {}{})",
        t.trigger,
        t.outcome,
        ms(t.ready_ms),
        ms(t.old_gone_ms),
        ms(t.new_process_ms),
        ms(t.pid_file_ms),
        ms(t.command_ms),
        t.command_status
            .map_or(String::new(), |s| format!(", exit {s}"))
    )
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 * p / 100.0).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    Some(sorted[index])
}

fn log_tail(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..]
        .iter()
        .map(|l| l.chars().take(300).collect())
        .collect()
}

/// A thread that watches for a result, joined with a deadline.
struct Pending<T> {
    result: Arc<Mutex<Option<T>>>,
    thread: JoinHandle<()>,
}

impl<T> Pending<T> {
    fn done(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn finish(self) -> Option<T> {
        let _ = self.thread.join();
        self.result.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Waits for a helper command, killing it (by its pid) past `deadline`.
fn wait_command(mut child: Child, deadline: Instant) -> Pending<(Instant, i32)> {
    let result = Arc::new(Mutex::new(None));
    let out = Arc::clone(&result);
    let thread = std::thread::spawn(move || {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or(-1);
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), code));
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    // A command's exit gives no event to wait on but this.
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    });
    Pending { result, thread }
}

/// Probes on new connections until an answer names an identity that is
/// neither among `seen` nor a pid of `before`, or `deadline`.
fn watch_answers(
    addr: SocketAddr,
    http: HttpCheck,
    identity: Identity,
    seen: BTreeSet<String>,
    before: BTreeSet<i32>,
    deadline: Instant,
) -> Pending<(Instant, String)> {
    let result = Arc::new(Mutex::new(None));
    let out = Arc::clone(&result);
    let thread = std::thread::spawn(move || {
        while Instant::now() < deadline {
            if let Ok(Some(named)) = probe(addr, &http, &identity) {
                let old_pid = named.parse::<i32>().is_ok_and(|pid| before.contains(&pid));
                if !seen.contains(&named) && !old_pid {
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), named));
                    return;
                }
            }
            // One probe a millisecond: the probes are load too.
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    Pending { result, thread }
}

/// `GET` on a new connection; `Ok` on a 200 with the expected body, with
/// the identity it names. With `--grpc` a health `Check` (SERVING), with
/// `--websocket` a message answered: `Ok(None)`, no identity.
pub fn probe(
    addr: SocketAddr,
    http: &HttpCheck,
    identity: &Identity,
) -> Result<Option<String>, String> {
    let timeout = Duration::from_secs(5);
    if http.grpc.is_some() || http.websocket.is_some() {
        return probe_other(addr, http, timeout).map(|()| None);
    }
    let (status, headers, body) = if http.http2 {
        get_h2(addr, http, timeout)
    } else {
        get(addr, http.tls.as_ref(), &http.path, &http.host, timeout)
    }
    .map_err(|(_, e)| e)?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    if let Some(text) = &http.body_contains
        && !body.contains(text.as_str())
    {
        return Err(format!("body without {text:?}: {body:?}"));
    }
    Ok(identity.of(&headers, &body))
}

type Answer = (u16, Vec<(String, String)>, String);

/// A `GET` on a new connection with `Connection: close`, read to the end
/// (or to its `Content-Length`).
fn get(
    addr: SocketAddr,
    tls: Option<&TlsTarget>,
    path: &str,
    host: &str,
    timeout: Duration,
) -> Result<Answer, (FailureClass, String)> {
    let mut stream = connect(addr, tls, timeout)?;
    send_get(&mut stream, path, host)?;
    read_answer(stream)
}

/// A `GET` over HTTP/2 on a new connection, from this thread.
fn get_h2(
    addr: SocketAddr,
    http: &HttpCheck,
    timeout: Duration,
) -> Result<Answer, (FailureClass, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (FailureClass::Reset, format!("a runtime for the probe: {e}")))?;
    let target = Target {
        addr,
        tls: http.tls.clone(),
    };
    runtime.block_on(async {
        tokio::time::timeout(timeout, h2_get(&target, &http.host, &http.path))
            .await
            .unwrap_or_else(|_| Err((FailureClass::Timeout, "h2: no answer".into())))
    })
}

/// A gRPC health `Check` or a WebSocket message on a new connection, from
/// this thread.
fn probe_other(addr: SocketAddr, http: &HttpCheck, timeout: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the probe: {e}"))?;
    let target = Target {
        addr,
        tls: http.tls.clone(),
    };
    let scheme = if target.tls.is_some() { "wss" } else { "ws" };
    runtime
        .block_on(async {
            let probe = async {
                match (&http.grpc, &http.websocket) {
                    (Some(service), _) => grpc_health_probe(&target, &http.host, service).await,
                    (None, Some(path)) => {
                        let url = format!("{scheme}://{}{path}", http.host);
                        websocket_probe(&target, &url).await
                    }
                    (None, None) => Ok(()),
                }
            };
            tokio::time::timeout(timeout, probe)
                .await
                .unwrap_or_else(|_| Err((FailureClass::Timeout, "no answer".into())))
        })
        .map_err(|(class, detail)| format!("{class}: {detail}"))
}

/// A blocking connection, plain or TLS, for probes and slow requests.
enum Connection {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Connection {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.read(buffer),
            Connection::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.write(buffer),
            Connection::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Plain(stream) => stream.flush(),
            Connection::Tls(stream) => stream.flush(),
        }
    }
}

fn connect(
    addr: SocketAddr,
    tls: Option<&TlsTarget>,
    timeout: Duration,
) -> Result<Connection, (FailureClass, String)> {
    let stream = connect_tcp(addr, timeout)?;
    let Some(tls) = tls else {
        return Ok(Connection::Plain(stream));
    };
    let client =
        rustls::ClientConnection::new(std::sync::Arc::clone(&tls.config), tls.name.clone())
            .map_err(|e| (FailureClass::Tls, format!("TLS: {e}")))?;
    let mut stream = rustls::StreamOwned::new(client, stream);
    // The handshake now, so that its failure is told apart from the request's.
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| (FailureClass::Tls, format!("TLS handshake: {e}")))?;
    }
    Ok(Connection::Tls(Box::new(stream)))
}

fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, (FailureClass, String)> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        let class = match e.kind() {
            io::ErrorKind::ConnectionRefused => FailureClass::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureClass::Timeout,
            _ => FailureClass::Reset,
        };
        (class, format!("connect: {e}"))
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| (FailureClass::Reset, e.to_string()))?;
    Ok(stream)
}

fn send_get(stream: &mut Connection, path: &str, host: &str) -> Result<(), (FailureClass, String)> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .map_err(|e| (FailureClass::Reset, format!("send: {e}")))
}

fn read_answer(mut stream: Connection) -> Result<Answer, (FailureClass, String)> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // Read to the end, or to the body's length: a server may keep the
    // connection open whatever `Connection: close` asked.
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]);
            let length = head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|length| raw.len() >= end + 4 + length) {
                break;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let class = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailureClass::Timeout,
                    _ => FailureClass::Reset,
                };
                return Err((class, format!("after {} bytes: {e}", raw.len())));
            }
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err((FailureClass::Reset, format!("no complete answer: {text:?}")));
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| (FailureClass::WrongResponse, format!("not HTTP: {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    if let Some(length) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        && body.len() < length
    {
        return Err((
            FailureClass::Reset,
            format!("answer cut short: {} of {length} bytes", body.len()),
        ));
    }
    Ok((status, headers, body.to_owned()))
}

/// A request to the slow path: `written` is told once it is sent; `Ok`
/// when the whole answer is a 200.
fn slow_request(
    addr: SocketAddr,
    tls: Option<&TlsTarget>,
    path: &str,
    host: &str,
    timeout: Duration,
    written: std::sync::mpsc::Sender<()>,
) -> Result<(), (FailureClass, String)> {
    let mut stream = connect(addr, tls, timeout);
    if let Ok(stream) = &mut stream {
        let sent = send_get(stream, path, host);
        let _ = written.send(());
        sent?;
    } else {
        let _ = written.send(());
    }
    let (status, _, body) = read_answer(stream?)?;
    if status != 200 {
        return Err((FailureClass::WrongResponse, format!("{status} {body:?}")));
    }
    Ok(())
}

/// A thread that rewrites one status line until told to stop.
fn progress_line(
    name: &str,
    load: &Load,
    upgrades: &Arc<AtomicU64>,
) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let live = load.live();
    let name = name.to_owned();
    let started = Instant::now();
    let upgrades = Arc::clone(upgrades);
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut err = io::stderr();
            while !stop.load(Ordering::Relaxed) {
                let _ = write!(
                    err,
                    "\r  {name:<26} {:>5.1}s  ok {:>8}  failed {:>5}  upgrades {:>4}   ",
                    started.elapsed().as_secs_f64(),
                    live.ok.load(Ordering::Relaxed),
                    live.failed.load(Ordering::Relaxed),
                    upgrades.load(Ordering::Relaxed),
                );
                // A person's refresh rate.
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = write!(err, "\r{:100}\r", "");
        })
    };
    (stop, thread)
}

/// The summary a person reads in five seconds: one line per scenario.
pub fn summary(reports: &[CheckReport], skipped: &[Skipped]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for r in reports {
        let s = &r.scenario;
        let b = &r.blackbox;
        let failures = if s.failures.is_empty() {
            "0 failed".to_owned()
        } else {
            format!(
                "{} failed ({})",
                s.dropped(),
                s.failures
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let (ok, failed) = s.upgrade_counts();
        let descriptors = match (b.descriptors_before, b.descriptors_after) {
            (Some((_, a)), Some((_, z))) => format!("fds {a}->{z}"),
            _ => "fds n/a".into(),
        };
        let _ = writeln!(
            out,
            "  {} {:<25} {:>7} requests, {failures}; upgrades {ok} ok/{failed} failed; ready p50/p99 {}/{} ms, old gone {}/{} ms; processes {}/{}, zombies {}, {descriptors}",
            if s.passed { "PASS" } else { "FAIL" },
            s.name,
            s.requests,
            ms(b.ready_p50_ms),
            ms(b.ready_p99_ms),
            ms(b.old_gone_p50_ms),
            ms(b.old_gone_p99_ms),
            b.processes_left.len(),
            b.steady_processes,
            b.zombies.len(),
        );
        for problem in &s.problems {
            let _ = writeln!(out, "       - {problem}");
        }
    }
    for s in skipped {
        let _ = writeln!(out, "  SKIP {:<25} {}", s.name, s.reason);
    }
    out
}

/// An HTML page: `run`'s report, then every scenario's upgrades as seen
/// from outside.
pub fn html(reports: &[CheckReport], skipped: &[Skipped]) -> String {
    let scenarios: Vec<ScenarioReport> = reports.iter().map(|r| r.scenario.clone()).collect();
    let mut page = crate::report::html(&scenarios)
        .replace("handover chaos report</h1>", "handover-harness check</h1>");
    page.push_str("<h2>Seen from outside</h2><pre>");
    page.push_str(&escape(&summary(reports, skipped)));
    for r in reports {
        page.push_str(&escape(&format!(
            "\n{}: {}\n",
            r.scenario.name, r.blackbox.server
        )));
        for t in &r.blackbox.upgrades {
            page.push_str(&escape(&format!("  at {} ms: {}\n", t.at_ms, describe(t))));
        }
        for note in &r.blackbox.notes {
            page.push_str(&escape(&format!("  note: {note}\n")));
        }
    }
    page.push_str("</pre>");
    page
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        let places = Places {
            addr: "127.0.0.1:8080".parse().unwrap(),
            pid_file: "/tmp/x/server.pid".into(),
            control: "/tmp/x/control.sock".into(),
            log: "/tmp/x/log".into(),
        };
        assert_eq!(
            places
                .fill("srv --listen {addr} --port {port} --pid-file {pidfile} --control {control}"),
            "srv --listen 127.0.0.1:8080 --port 8080 --pid-file /tmp/x/server.pid --control /tmp/x/control.sock"
        );
    }

    #[test]
    fn identities_are_read_from_a_header_or_a_body_word() {
        let headers = vec![("X-Pid".to_owned(), " 42 ".to_owned())];
        assert_eq!(
            Identity::Header("x-pid".into()).of(&headers, ""),
            Some("42".into())
        );
        assert_eq!(
            Identity::BodyPrefix("pid=".into()).of(&[], "pid=7 generation=2\n"),
            Some("7".into())
        );
        assert_eq!(Identity::BodyPrefix("gen=".into()).of(&[], "pid=7"), None);
    }

    #[test]
    fn options_without_an_address_are_refused() {
        let options = CheckOptions {
            server: "nginx -c /etc/nginx.conf".into(),
            ..CheckOptions::default()
        };
        assert!(validate(&options).unwrap_err().contains("--addr"));
        let options = CheckOptions {
            server: "srv {addr}".into(),
            only: vec!["nope".into()],
            ..CheckOptions::default()
        };
        assert!(validate(&options).unwrap_err().contains("nope"));
    }

    #[test]
    fn grpc_and_websocket_refuse_what_they_cannot_do() {
        let grpc = CheckOptions {
            server: "srv {addr}".into(),
            http: HttpCheck {
                grpc: Some(String::new()),
                ..HttpCheck::default()
            },
            ..CheckOptions::default()
        };
        assert_eq!(validate(&grpc), Ok(()));
        let with_http2 = CheckOptions {
            http2: true,
            ..grpc.clone()
        };
        assert!(validate(&with_http2).unwrap_err().contains("--http2"));
        let with_body = CheckOptions {
            identity: Identity::BodyPrefix("pid=".into()),
            ..grpc
        };
        assert!(validate(&with_body).unwrap_err().contains("--ready-body"));
        let websocket = CheckOptions {
            server: "srv {addr}".into(),
            http: HttpCheck {
                websocket: Some("ws".into()),
                ..HttpCheck::default()
            },
            ..CheckOptions::default()
        };
        assert!(validate(&websocket).unwrap_err().contains("start with /"));
    }

    #[test]
    fn auto_readiness_prefers_what_is_most_direct() {
        let mut options = CheckOptions {
            server: "srv {addr} {pidfile}".into(),
            ..CheckOptions::default()
        };
        assert_eq!(ready_source(&options), ReadySource::PidFile);
        options.upgrade_cmd = Some("reload".into());
        assert_eq!(ready_source(&options), ReadySource::Command);
        options.identity = Identity::Header("X-Pid".into());
        assert_eq!(ready_source(&options), ReadySource::Answer);
        options.server = "srv {addr}".into();
        options.upgrade_cmd = None;
        options.identity = Identity::None;
        assert_eq!(ready_source(&options), ReadySource::Processes);
    }

    /// A server given a port that an outgoing connection can be given too
    /// may find it taken when it binds (a fresh-clone test run saw haproxy
    /// exit as it started): the port comes from below the ephemeral range.
    #[test]
    fn a_free_address_is_never_an_ephemeral_port() {
        let Some(first) = first_ephemeral_port() else {
            return;
        };
        let ports = ports_below_ephemeral(first).expect("room below the ephemeral ports");
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let addr = free_addr().unwrap();
            assert!(
                addr.port() < first,
                "{addr} is an ephemeral port (from {first})"
            );
            assert!(ports.contains(&addr.port()), "{addr} outside {ports:?}");
            seen.insert(addr.port());
        }
        assert!(seen.len() > 1, "every call chose {seen:?}");
    }

    #[test]
    fn the_ports_below_the_ephemeral_ones_leave_out_the_privileged_ones() {
        assert_eq!(ports_below_ephemeral(32768), Some(12768..22768));
        assert_eq!(ports_below_ephemeral(15000), Some(1024..5000));
        assert_eq!(ports_below_ephemeral(11000), None);
        assert_eq!(ports_below_ephemeral(0), None);
    }

    #[test]
    fn a_cut_answer_is_a_reset() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 256];
            let _ = stream.read(&mut request).unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                .unwrap();
        });
        let failure = get(addr, None, "/", "x", Duration::from_secs(5)).unwrap_err();
        server.join().unwrap();
        assert_eq!(failure.0, FailureClass::Reset, "{failure:?}");
    }
}
