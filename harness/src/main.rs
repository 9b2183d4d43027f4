//! `handover-harness`: runs chaos scenarios against the subject service, or
//! the black-box upgrade scenarios against anyone's server.
//!
//! ```text
//! handover-harness run [--scenarios DIR] [--out DIR] [--quiet] [NAME...]
//! handover-harness list [--scenarios DIR]
//! handover-harness check --server 'CMD {addr} {pidfile}' [OPTIONS]
//! handover-harness load ADDR [OPTIONS]  # strict HTTP/1.1 load, until stopped
//! handover-harness subject [FLAGS]      # the subject service itself
//! ```
//!
//! `run` runs the named scenarios (all of them by default), prints a live
//! progress line and a table, and writes `report.json` and `report.html`
//! (the table and a picture per scenario) into the output directory. It
//! exits 0 only if every scenario passed. `check` does the same for a
//! server the harness did not write (see `handover-harness check --help`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use handover_harness::check::{self, CheckOptions, ReadySource};
use handover_harness::load::{HttpCheck, Identity, TlsTarget};
use handover_harness::report::{ScenarioReport, html, table};
use handover_harness::runner::{RunOptions, run};
use handover_harness::scenario::Scenario;
use handover_harness::tls::Trust;
use nix::sys::signal::Signal;

#[derive(Parser)]
#[command(
    name = "handover-harness",
    version,
    about = "Chaos scenarios for the handover library's subject, and upgrade checks of anyone's HTTP server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the scenarios (all by default) against the subject.
    Run {
        /// Where the scenario files are [default: $HANDOVER_SCENARIOS, else
        /// ./scenarios, else the nearest scenarios/ above the executable].
        #[arg(long, value_name = "DIR")]
        scenarios: Option<PathBuf>,
        /// Where report.json and report.html go.
        #[arg(long, default_value = "target/harness-report")]
        out: PathBuf,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// Scenarios to run.
        names: Vec<String>,
    },
    /// Lists the scenarios.
    List {
        /// Where the scenario files are [default: as for `run`].
        #[arg(long, value_name = "DIR")]
        scenarios: Option<PathBuf>,
    },
    /// Checks that anyone's HTTP server (HTTP/1.1 or HTTP/2, plain or TLS; gRPC; WebSocket) survives upgrades, seen from outside.
    #[command(long_about = CHECK_ABOUT)]
    Check(Box<CheckArgs>),
    /// Puts an HTTP/1.1 server under strict load until stopped, and counts every failed request by class.
    #[command(long_about = LOAD_ABOUT)]
    Load(LoadArgs),
}

const LOAD_ABOUT: &str = "Puts an HTTP/1.1 server under strict load until SIGTERM, SIGINT, --stop-file or --duration, then prints what it saw; for scripts that upgrade a server and must know whether a request was lost; the same clients count failed requests in the chaos harness and the systemd proof.

The clients never retry: every request sent that did not get a 200 whose body contains --expect-body is a failure, by class: refused, reset, timeout (no answer in 10 s), wrong (another status or body), other. A connection the server closes while no request is on it is no failure (nothing was lost): the client opens a new one, as a pooled client does.

The client mix: --keep-alive clients keep their connection for as long as the server allows, --new-connection clients open one per request (Connection: close), both pausing --pace before each request; each --idle N:PAUSE group has N keep-alive clients that leave their connection idle for PAUSE between requests and check, before reusing it, that the server has not closed it (a draining server keeps an idle connection until its quiet period ends: a pause shorter than that keeps the drain busy until the next request, a longer one sees the close). The defaults suit a 1 s quiet period (the library's default): 600 ms stays clear of it even on a loaded machine, where a client 100 ms short of it (900 ms, tried) sometimes sends as the server closes, a race of HTTP keep-alive itself that every client which does not retry loses.

Output: `load: every client answered (N clients)` once each client has had a correct answer (wait for this line, not for a time), `load: a request failed` at the first failure, then at the end one line `load: OK ok, FAILED failed (CLASS=N ...), ...` and, with --json FILE, the same as JSON: ok, refused, reset, timeout, wrong, other, failed, reconnects, identities (the --identity words that answered, as numbers), examples. Exit status 0 when no request failed and at least one was answered, 1 otherwise, 2 for a usage error.

Example:
  handover-harness load 127.0.0.1:8080 --json load.json &
  ... reload the server ...
  kill -TERM $!; wait $!";

/// `load`: strict HTTP/1.1 clients until stopped.
#[derive(clap::Args)]
struct LoadArgs {
    /// The server's address.
    addr: SocketAddr,
    /// Keep-alive clients, one request after another.
    #[arg(long, default_value_t = 2, value_name = "N")]
    keep_alive: usize,
    /// Clients that open a new connection for each request.
    #[arg(long, default_value_t = 2, value_name = "N")]
    new_connection: usize,
    /// N keep-alive clients idle for PAUSE between requests (repeatable; `--idle 0:1s` for none).
    #[arg(long, value_name = "N:PAUSE", value_parser = parse_idle, default_values = ["4:600ms", "2:2500ms"])]
    idle: Vec<(usize, Duration)>,
    /// The keep-alive and new-connection clients' pause before each request.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pace: Duration,
    /// The path every request asks for.
    #[arg(long, default_value = "/")]
    path: String,
    /// The Host header of every request.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Text every answer's body must contain (empty: any 200 is correct).
    #[arg(long, value_name = "TEXT", default_value = "generation=")]
    expect_body: String,
    /// The prefix of the body word that names who answered (the example's `pid=`).
    #[arg(long, value_name = "PREFIX", default_value = "pid=")]
    identity: String,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop once this file exists.
    #[arg(long, value_name = "PATH")]
    stop_file: Option<PathBuf>,
    /// Write the summary as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// `4:600ms`: four clients idle for 600 ms between requests.
fn parse_idle(text: &str) -> Result<(usize, Duration), String> {
    let (count, pause) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: want N:PAUSE, as in 4:600ms"))?;
    let count = count
        .parse()
        .map_err(|e| format!("{text:?}: the number of clients {count:?}: {e}"))?;
    let pause = humantime::parse_duration(pause)
        .map_err(|e| format!("{text:?}: the pause {pause:?}: {e}"))?;
    Ok((count, pause))
}

const CHECK_ABOUT: &str = "Checks that an HTTP server (HTTP/1.1 or HTTP/2, plain or TLS; gRPC; WebSocket), in any language, survives its own upgrades (or reloads) without losing a request.

Each scenario starts the server afresh with --server, puts it under strict load (clients that never retry: every request that got no complete 200 is a failure, by class: refused, reset, timeout, wrong), asks for upgrades, and watches from outside: the processes under the started one (and those re-parented to the harness), the PID file, the answers, the upgrade command's exit. It reports failed requests by class, processes left, zombies, the serving generation's descriptors before and after (Linux), the time from each trigger to a ready new generation and to the old one gone, and p99 latency near upgrades against steady state: a table, report.json and report.html (same as `run`). Exit status 0 only if every scenario passed.

Placeholders in --server, --upgrade-cmd, --broken-upgrade and --restore-upgrade: {addr} (a free 127.0.0.1 port), {port}, {pidfile} and {control} (paths in a temporary directory). The server is run as `sh -c 'exec CMD'`.

Scenarios: keep-alive, new-connections, idle-keep-alive, long-in-flight (needs --slow-path), upgrade-storm, sigkill-old-during-start, broken-successor (needs --broken-upgrade).

Ready and old gone: ready is the first available of an answer naming a new pid or generation (--ready-header, --ready-body), the upgrade command's exit, a new pid in the PID file (this library writes it when the old generation exits), a new process. Old gone: every process present at the trigger that leaves has left and the server is back to its starting number of processes (a master, as nginx's or HAProxy's, stays).

TLS (--tls, trusting --ca-file or --insecure): every request, probe and slow request over TLS; the report adds each generation's TLS handshakes per second. HTTP/2 (--http2): the keep-alive and new-connection clients speak HTTP/2 (prior knowledge in the clear, ALPN h2 over TLS), several streams on each kept connection; idle clients and slow requests stay HTTP/1.1. A request refused because the server's GOAWAY came first is no failure (nothing was sent); a stream cut by GOAWAY or a reset is (h2_reset).

gRPC (--grpc): clients call the standard health service (grpc.health.v1.Health, which servers in any language commonly register; no proto of the server's needed) over h2c, or h2 with --tls: `Check` calls on kept and on new connections, and `Watch` streams held open across upgrades. A call fails on any status but OK (grpc_unavailable, grpc_cancelled, grpc_other), a reset or a timeout; a call refused because the server's GOAWAY came first was never sent, and a `Watch` the server ends with OK (its drain sending the client elsewhere) is no failure; one cut without a status is. WebSocket (--websocket PATH): every client holds a connection to PATH and sends a text message every 20 ms; each needs an answer (text or binary). A close 1001 or 1000 before a message is sent is no failure (the client reconnects); a message left unanswered (ws_lost), an abnormal close or a reset (ws_abnormal), a reconnect that fails, are. With --grpc or --websocket the probes speak it too, readiness is seen by the PID file, a command or the processes, and the HTTP-only scenarios are skipped.

Examples:
  handover-harness check --server 'target/release/examples/http_server --listen {addr} --pid-file {pidfile}' --ready-body pid=
  handover-harness check --server 'target/release/examples/grpc --listen {addr} --pid-file {pidfile}' --grpc
  handover-harness check --server 'target/release/examples/axum --listen {addr} --pid-file {pidfile}' --websocket /ws
  handover-harness check --server 'nginx -c /tmp/n/nginx.conf -p /tmp/n' --addr 127.0.0.1:8080 --pid-file /tmp/n/nginx.pid --upgrade-cmd 'nginx -c /tmp/n/nginx.conf -p /tmp/n -s reload' --ready-header X-Pid";

/// `check`: one fresh server per scenario, under load, upgraded again and
/// again.
#[derive(clap::Args)]
struct CheckArgs {
    /// The command that starts the server, in the foreground (placeholders {addr} {port} {pidfile} {control}).
    #[arg(long, value_name = "CMD")]
    server: String,
    /// Where the server listens, when its own configuration says (instead of {addr}).
    #[arg(long, value_name = "ADDR")]
    addr: Option<SocketAddr>,
    /// The server's PID file, when its own configuration names it (instead of {pidfile}).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// The signal that asks for an upgrade, sent to the pid in the PID file (or to the started process).
    #[arg(long, value_name = "NAME", default_value = "SIGHUP", value_parser = parse_signal)]
    upgrade_signal: Signal,
    /// A command that asks for an upgrade instead of the signal (placeholders too).
    #[arg(long, value_name = "CMD")]
    upgrade_cmd: Option<String>,
    /// How a new generation is seen to be ready.
    #[arg(long, value_enum, default_value = "auto")]
    ready: Ready,
    /// A response header that names the pid or generation that answered.
    #[arg(long, value_name = "NAME", conflicts_with = "ready_body")]
    ready_header: Option<String>,
    /// The prefix of a body word that names the pid or generation (`pid=` for `pid=123 generation=4`).
    #[arg(long, value_name = "PREFIX")]
    ready_body: Option<String>,
    /// The path every load request asks for.
    #[arg(long, default_value = "/")]
    path: String,
    /// The Host header of every request.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Text every answer's body must contain.
    #[arg(long, value_name = "TEXT")]
    expect_body: Option<String>,
    /// A path whose answers take long: requests to it are in flight at each upgrade.
    #[arg(long, value_name = "PATH")]
    slow_path: Option<String>,
    /// How long an answer from --slow-path may take.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    slow_timeout: Duration,
    /// A command that makes the next upgrade fail (replace the binary by one that exits 1, break the config).
    #[arg(long, value_name = "CMD")]
    broken_upgrade: Option<String>,
    /// A command that undoes --broken-upgrade; an upgrade after it must succeed.
    #[arg(long, value_name = "CMD", requires = "broken_upgrade")]
    restore_upgrade: Option<String>,
    /// Each scenario's load lasts this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Between two upgrades.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// A new generation must be ready, and the old one gone, within this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    upgrade_timeout: Duration,
    /// The server must answer within this of its start.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
    /// Run only these scenarios (repeatable, or comma-separated).
    #[arg(long = "scenario", value_name = "NAME", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Where report.json, report.html and the server's logs go.
    #[arg(long, default_value = "target/check-report")]
    out: PathBuf,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// The server speaks TLS: every request, probe and handshake over TLS (trust: --ca-file or --insecure).
    #[arg(long)]
    tls: bool,
    /// Trust the certificates (a CA, or the server's self-signed one) in this PEM file.
    #[arg(
        long,
        value_name = "PATH",
        requires = "tls",
        conflicts_with = "insecure"
    )]
    ca_file: Option<PathBuf>,
    /// Trust any certificate (a self-signed one the harness was not given); the server must still hold its key.
    #[arg(long, requires = "tls")]
    insecure: bool,
    /// The TLS server name (SNI, and the name the certificate must carry); --host by default.
    #[arg(long, value_name = "NAME", requires = "tls")]
    tls_name: Option<String>,
    /// Load and probes over HTTP/2 (prior knowledge in the clear, ALPN h2 with --tls); idle clients and slow requests stay HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Load and probes speak gRPC (h2c, or h2 with --tls): the standard health service, grpc.health.v1.Health, `Check` calls and `Watch` streams held open across upgrades.
    #[arg(long, conflicts_with_all = ["http2", "websocket"])]
    grpc: bool,
    /// The service the health calls ask about ("" is the server as a whole).
    #[arg(long, value_name = "NAME", default_value = "", requires = "grpc")]
    grpc_service: String,
    /// Load and probes are WebSocket clients of ws://ADDR/PATH (wss with --tls): a text message every 20 ms on each, any answer to each.
    #[arg(long, value_name = "PATH", conflicts_with = "http2")]
    websocket: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Ready {
    Auto,
    Answer,
    Command,
    PidFile,
    Processes,
}

fn parse_signal(name: &str) -> Result<Signal, String> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse()
        .map_err(|_| format!("not a signal: {name} (SIGHUP, USR2, ...)"))
}

/// The scenarios directory: the one given, else `$HANDOVER_SCENARIOS`, else
/// `./scenarios`, else the nearest `scenarios/` in a directory above the
/// executable (`target/release/handover-harness` in a checkout finds the
/// checkout's). Found when it runs, not fixed when it was built.
fn scenarios_dir(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(dir) = given.or_else(|| std::env::var_os("HANDOVER_SCENARIOS").map(PathBuf::from)) {
        return Ok(dir);
    }
    let here = PathBuf::from("scenarios");
    if here.is_dir() {
        return Ok(here);
    }
    let executable =
        std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    executable
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("scenarios"))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| {
            format!(
                "no scenarios directory: give --scenarios DIR or HANDOVER_SCENARIOS, or run from a directory that has scenarios/ (none above {} either)",
                executable.display()
            )
        })
}

fn main() -> ExitCode {
    let mut words = std::env::args();
    if words.nth(1).as_deref() == Some("subject") {
        return handover_harness::subject::main(words);
    }
    match Cli::parse().command {
        Command::List { scenarios } => {
            let scenarios = match scenarios_dir(scenarios).and_then(|dir| Scenario::load_dir(&dir))
            {
                Ok(scenarios) => scenarios,
                Err(problem) => return usage(&problem),
            };
            for scenario in &scenarios {
                println!(
                    "{:<30} {}",
                    scenario.name,
                    scenario.description.trim().replace('\n', " ")
                );
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            scenarios,
            out,
            quiet,
            names,
        } => {
            let scenarios = match scenarios_dir(scenarios).and_then(|dir| Scenario::load_dir(&dir))
            {
                Ok(scenarios) => scenarios,
                Err(problem) => return usage(&problem),
            };
            let unknown: Vec<&String> = names
                .iter()
                .filter(|name| !scenarios.iter().any(|s| &s.name == *name))
                .collect();
            if !unknown.is_empty() {
                return usage(&format!(
                    "no such scenario: {unknown:?} (see `handover-harness list`)"
                ));
            }
            let chosen: Vec<&Scenario> = scenarios
                .iter()
                .filter(|s| names.is_empty() || names.contains(&s.name))
                .collect();
            run_all(&chosen, &out, !quiet && std::io::stderr().is_terminal())
        }
        Command::Check(args) => check_command(*args),
        Command::Load(args) => load_command(args),
    }
}

/// How often `load` looks for its --stop-file: a file has no event to wait
/// for on every platform, so it is looked for.
const STOP_FILE_LOOK: Duration = Duration::from_millis(20);

fn load_command(args: LoadArgs) -> ExitCode {
    use handover_harness::load::{Load, LoadPlan};
    use tokio::signal::unix::{SignalKind, signal};

    let plan = LoadPlan {
        http: Some(args.addr),
        keep_alive: args.keep_alive,
        new_connection: args.new_connection,
        idle: args.idle.clone(),
        pace: (!args.pace.is_zero()).then_some(args.pace),
        http_check: Some(HttpCheck {
            path: args.path.clone(),
            host: args.host.clone(),
            body_contains: Some(args.expect_body.clone()),
            identity: Identity::BodyPrefix(args.identity.clone()),
            ..HttpCheck::default()
        }),
        ..LoadPlan::default()
    };
    let clients = plan.http_clients();
    if clients == 0 {
        return usage("load: no clients (--keep-alive, --new-connection and --idle are all 0)");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return usage(&format!("load: no tokio runtime: {e}")),
    };
    // Signals are caught before the first client runs: a SIGTERM sent as
    // soon as the ready line is read must stop the load, not kill it.
    let signals = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    });
    let (mut terminate, mut interrupt) = match signals {
        Ok(signals) => signals,
        Err(e) => return usage(&format!("load: cannot catch SIGTERM/SIGINT: {e}")),
    };
    let load = Load::run(plan);
    let live = load.live();
    let why = runtime.block_on(async {
        let deadline = args
            .duration
            .map(|duration| tokio::time::Instant::now() + duration);
        let until_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let stop_file = async {
            let Some(path) = &args.stop_file else {
                return std::future::pending().await;
            };
            let mut look = tokio::time::interval(STOP_FILE_LOOK);
            while !path.exists() {
                look.tick().await;
            }
        };
        let answered = async {
            live.all_answered(clients).await;
            println!("load: every client answered ({clients} clients)");
            std::future::pending::<std::convert::Infallible>().await
        };
        let failure = async {
            live.first_failure().await;
            println!("load: a request failed");
            std::future::pending::<std::convert::Infallible>().await
        };
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            () = until_deadline => "--duration",
            () = stop_file => "--stop-file",
            never = answered => match never {},
            never = failure => match never {},
        }
    });
    let report = load.finish();
    println!("load: {} (stopped by {why})", report.summary_line());
    if let Some(path) = &args.json {
        let json = report.summary_json().to_string() + "\n";
        // Written whole, then renamed: a reader never sees half of it.
        let partial = path.with_extension("partial");
        if let Err(e) =
            std::fs::write(&partial, json).and_then(|()| std::fs::rename(&partial, path))
        {
            eprintln!(
                "handover-harness: load: cannot write {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    if report.failed() == 0 && report.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("handover-harness: {problem}");
    ExitCode::from(2)
}

fn run_all(scenarios: &[&Scenario], out: &Path, progress: bool) -> ExitCode {
    let subject = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => return usage(&format!("cannot find this executable: {e}")),
    };
    let options = RunOptions {
        subject,
        subject_args: vec!["subject".into()],
        progress,
        timing_gates: true,
    };
    let mut reports: Vec<ScenarioReport> = Vec::new();
    for scenario in scenarios {
        let report = run(scenario, &options);
        eprintln!(
            "  {:<30} {}",
            report.name,
            if report.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", report.problems.join("; "))
            }
        );
        reports.push(report);
    }
    println!("\n{}", table(&reports));
    write_report(
        out,
        &serde_json::to_string_pretty(&reports).unwrap_or_default(),
        &html(&reports),
    );
    let passed = reports.iter().filter(|r| r.passed).count();
    println!(
        "scenarios: {passed} passed, {} failed",
        reports.len() - passed
    );
    if passed == reports.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_report(out: &Path, json: &str, page: &str) {
    let written = std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(out.join("report.json"), json))
        .and_then(|()| std::fs::write(out.join("report.html"), page));
    match written {
        Ok(()) => println!(
            "report: {}/report.json, picture: {}/report.html",
            out.display(),
            out.display()
        ),
        Err(e) => eprintln!(
            "handover-harness: cannot write the report to {}: {e}",
            out.display()
        ),
    }
}

/// The TLS clients' configuration from `--tls`, `--ca-file`, `--insecure`.
fn tls_target(args: &CheckArgs) -> Result<Option<TlsTarget>, String> {
    if !args.tls {
        return Ok(None);
    }
    let trust = match (&args.ca_file, args.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => {
            return Err(
                "--tls needs --ca-file PATH (the CA or the server's certificate) or --insecure"
                    .into(),
            );
        }
    };
    let config = handover_harness::tls::client_config(&trust, &[b"http/1.1"])?;
    let name = args.tls_name.as_deref().unwrap_or(&args.host);
    let name = if let Some(bracketed) = name.strip_prefix('[') {
        // `[::1]:8443`: an IPv6 address.
        bracketed.split(']').next().unwrap_or(bracketed)
    } else {
        // A Host header may carry a port; a TLS name does not.
        match name.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => name,
        }
    };
    Ok(Some(TlsTarget {
        config: std::sync::Arc::new(config),
        name: handover_harness::tls::server_name(name)?,
    }))
}

fn check_command(args: CheckArgs) -> ExitCode {
    let tls = match tls_target(&args) {
        Ok(tls) => tls,
        Err(problem) => return usage(&problem),
    };
    let identity = match (&args.ready_header, &args.ready_body) {
        (Some(name), _) => Identity::Header(name.clone()),
        (None, Some(prefix)) => Identity::BodyPrefix(prefix.clone()),
        (None, None) => Identity::None,
    };
    let options = CheckOptions {
        server: args.server,
        addr: args.addr,
        pid_file: args.pid_file,
        upgrade_signal: args.upgrade_signal,
        upgrade_cmd: args.upgrade_cmd,
        ready: match args.ready {
            Ready::Auto => ReadySource::Auto,
            Ready::Answer => ReadySource::Answer,
            Ready::Command => ReadySource::Command,
            Ready::PidFile => ReadySource::PidFile,
            Ready::Processes => ReadySource::Processes,
        },
        identity,
        http: HttpCheck {
            path: args.path,
            host: args.host,
            body_contains: args.expect_body,
            identity: Identity::None,
            tls,
            http2: args.http2,
            grpc: args.grpc.then(|| args.grpc_service.clone()),
            websocket: args.websocket.clone(),
        },
        slow_path: args.slow_path,
        slow_timeout: args.slow_timeout,
        broken_upgrade: args.broken_upgrade,
        restore_upgrade: args.restore_upgrade,
        duration: args.duration,
        interval: args.interval,
        connections: args.connections,
        upgrade_timeout: args.upgrade_timeout,
        start_timeout: args.start_timeout,
        only: args.scenarios,
        progress: !args.quiet && std::io::stderr().is_terminal(),
        http2: args.http2,
    };
    let options = CheckOptions {
        http: HttpCheck {
            identity: options.identity.clone(),
            ..options.http.clone()
        },
        ..options
    };
    if let Err(problem) = check::validate(&options) {
        return usage(&problem);
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return usage(&format!("cannot create {}: {e}", args.out.display()));
    }
    // The servers' logs and PID files live as long as the report.
    let dir = match tempfile::Builder::new()
        .prefix("check-")
        .tempdir_in(&args.out)
    {
        Ok(dir) => dir.keep(),
        Err(e) => {
            return usage(&format!(
                "cannot create a directory in {}: {e}",
                args.out.display()
            ));
        }
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let (reports, skipped) = check::check(&options, &dir);
    let scenarios: Vec<ScenarioReport> = reports.iter().map(|r| r.scenario.clone()).collect();
    println!("\n{}", table(&scenarios));
    print!("{}", check::summary(&reports, &skipped));
    write_report(
        &args.out,
        &serde_json::to_string_pretty(&reports).unwrap_or_default(),
        &check::html(&reports, &skipped),
    );
    println!("server logs: {}", dir.display());
    let passed = reports.iter().filter(|r| r.scenario.passed).count();
    if passed < reports.len() {
        println!("reproduce: {}", reproduce());
    }
    println!(
        "scenarios: {passed} passed, {} failed",
        reports.len() - passed
    );
    if passed == reports.len() && !reports.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// This very command line, quoted for a shell.
fn reproduce() -> String {
    std::env::args()
        .map(|word| {
            if !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                word
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
