//! Handover latency beside its floor, measured in the same run.
//!
//! - `floor`: this binary started bare (posix_spawn and exec, build the tokio
//!   runtime, write one byte to a pipe): what starting a process costs
//!   without the library.
//! - `upgrade/N`: from `upgrade()` to its success, for a successor (this
//!   binary again) that is ready as soon as it has its N inherited listeners
//!   and the same runtime.
//! - `old_gone`: from asking a separate old generation to upgrade to that
//!   process having exited, with nothing to drain.
//! - `service/upgrade` and `service/old_gone`: the same two for generations
//!   shaped as services are: a `tracing` subscriber, a default multi-thread
//!   runtime (`Runtime::new`), an HTTP/1.1 accept loop (hyper, through
//!   `handover::drain`) and a PID file in a disk-backed directory, which the
//!   old generation renames at its exit (in `service/old_gone`).
//!
//! This binary plays every role: which one comes from its environment. After
//! criterion's report it prints each median beside the floor's, as a ratio,
//! then a paired measurement: rounds that take the floor and every figure
//! in turn, so that all of them live through the same moments of a noisy
//! machine (criterion measures one figure after another). The targets are
//! read from the paired table. `HANDOVER_BENCH_ROUNDS` sets its rounds
//! (default 200; 0 skips it; skipped too when criterion gets a filter).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use handover::{Kind, Options, Upgrader};

const ROLE: &str = "HANDOVER_BENCH_ROLE";
const SIZES: [usize; 3] = [1, 16, 256];

fn main() {
    // A successor is whatever this binary is when it inherits a handover.
    if std::env::var_os("HANDOVER").is_some() {
        return successor();
    }
    match std::env::var(ROLE).as_deref() {
        Ok("floor") => return floor(),
        Ok("old") => return old_generation(),
        Ok("old-service") => return old_service(),
        _ => {}
    }
    become_subreaper();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = criterion.benchmark_group("handover");
    group.bench_function("floor", |b| {
        b.iter_custom(|n| (0..n).map(|_| spawn_floor()).sum())
    });
    // The same bare spawn from a parent that holds as many descriptors as
    // upgrade/256's parent (256 listeners, each with the caller's copy): how
    // much of upgrade/256 is only the cost of spawning from a process with
    // that many descriptors (the kernel copies the table, exec closes them).
    group.bench_function("floor_holding_256", |b| {
        let held: Vec<std::net::TcpListener> = (0..512)
            .map(|_| std::net::TcpListener::bind(loopback()).expect("bind"))
            .collect();
        b.iter_custom(|n| (0..n).map(|_| spawn_floor()).sum());
        drop(held);
    });
    for size in SIZES {
        group.bench_with_input(BenchmarkId::new("upgrade", size), &size, |b, &size| {
            b.iter_custom(|n| (0..n).map(|_| one_upgrade(size)).sum())
        });
    }
    group.bench_function("old_gone", |b| {
        b.iter_custom(|n| (0..n).map(|_| old_gone()).sum())
    });
    group.bench_function("service/upgrade", |b| {
        b.iter_custom(|n| (0..n).map(|_| one_service_upgrade()).sum())
    });
    group.bench_function("service/old_gone", |b| {
        b.iter_custom(|n| (0..n).map(|_| old_gone_as("old-service")).sum())
    });
    group.finish();
    criterion.final_summary();
    print_ratios();
    print_paired(paired_rounds());
}

/// Rounds of the paired measurement: `HANDOVER_BENCH_ROUNDS`, else 200
/// (a few seconds), or none when criterion was asked for a subset.
fn paired_rounds() -> usize {
    if let Ok(rounds) = std::env::var("HANDOVER_BENCH_ROUNDS") {
        return rounds.parse().unwrap_or(0);
    }
    let filtered = std::env::args().skip(1).any(|arg| !arg.starts_with('-'));
    if filtered { 0 } else { 200 }
}

/// Each figure and the floor sampled in turn, round after round, so that
/// they live through the same moments of a noisy machine; the medians and
/// their ratios come from the same rounds. Criterion's figures above are
/// measured one after another, minutes apart.
fn print_paired(rounds: usize) {
    if rounds == 0 {
        return;
    }
    let mut floor = Vec::with_capacity(rounds);
    let mut upgrades: Vec<Vec<Duration>> =
        SIZES.iter().map(|_| Vec::with_capacity(rounds)).collect();
    let mut gone = Vec::with_capacity(rounds);
    let mut service_upgrade = Vec::with_capacity(rounds);
    let mut service_gone = Vec::with_capacity(rounds);
    // Each round takes the figures in a fresh order (a Fisher-Yates shuffle
    // driven by xorshift, fixed seed), so that no figure always follows the
    // same one: whatever a figure leaves behind (sockets closing, caches)
    // falls on all of them alike.
    let figures = SIZES.len() + 4;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..rounds {
        let mut order: Vec<usize> = (0..figures).collect();
        for i in (1..figures).rev() {
            order.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        for figure in order {
            match figure {
                0 => floor.push(spawn_floor()),
                i if i <= SIZES.len() => upgrades[i - 1].push(one_upgrade(SIZES[i - 1])),
                i if i == SIZES.len() + 1 => gone.push(old_gone()),
                i if i == SIZES.len() + 2 => service_upgrade.push(one_service_upgrade()),
                _ => service_gone.push(old_gone_as("old-service")),
            }
        }
    }
    let median = |samples: &mut Vec<Duration>| -> f64 {
        samples.sort_unstable();
        samples[samples.len() / 2].as_secs_f64() * 1e3
    };
    let floor_ms = median(&mut floor);
    let upgrade_ms: Vec<f64> = upgrades.iter_mut().map(&median).collect();
    let gone_ms = median(&mut gone);
    let service_upgrade_ms = median(&mut service_upgrade);
    let service_gone_ms = median(&mut service_gone);
    println!(
        "\npaired medians ({rounds} rounds; each round takes every figure once, in a shuffled order):"
    );
    println!("  {:<18} {:>9.3} ms   1.00 x floor", "floor", floor_ms);
    for (ms, size) in upgrade_ms.iter().zip(SIZES) {
        println!(
            "  {:<18} {:>9.3} ms   {:.2} x floor",
            format!("upgrade/{size}"),
            ms,
            ms / floor_ms
        );
    }
    println!(
        "  {:<18} {:>9.3} ms   {:.2} x floor",
        "old_gone",
        gone_ms,
        gone_ms / floor_ms
    );
    for (id, ms) in [
        ("service/upgrade", service_upgrade_ms),
        ("service/old_gone", service_gone_ms),
    ] {
        println!("  {id:<18} {ms:>9.3} ms   {:.2} x floor", ms / floor_ms);
    }
    // upgrade/1's successor and old_gone's are the same program with one
    // listener; the difference is the old process's exit after readiness.
    let after_ready_ms = gone_ms - upgrade_ms[0];

    println!("\ntargets, read from the paired medians:");
    let verdict = |met: bool| if met { "met" } else { "NOT MET" };
    for (ms, size) in upgrade_ms.iter().zip(SIZES) {
        let limit = 1.25;
        let ratio = ms / floor_ms;
        println!(
            "  {:<32} {:>5.2} x floor        at most {limit:.2} x   {}",
            format!("handover latency, upgrade/{size}"),
            ratio,
            verdict(ratio <= limit)
        );
    }
    println!(
        "  {:<32} {:>5.3} ms after ready   at most 2 ms     {}",
        "old generation gone",
        after_ready_ms,
        verdict(after_ready_ms <= 2.0)
    );
    // The service's old generation, gone after its request: at most 1.5
    // times a bare start, as for the example (benches/example.rs).
    let ratio = service_gone_ms / floor_ms;
    println!(
        "  {:<32} {:>5.2} x floor        at most 1.50 x   {}",
        "service-shaped old gone",
        ratio,
        verdict(ratio <= 1.5)
    );
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("a constant address")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The floor's child: the runtime, then one byte on stdout.
fn floor() {
    let _runtime = runtime();
    std::io::stdout().write_all(b"R").expect("stdout is a pipe");
}

/// Time to start the floor child and read its byte.
fn spawn_floor() -> Duration {
    let exe = std::env::current_exe().expect("this binary");
    let started = Instant::now();
    let mut child = Command::new(exe)
        .env(ROLE, "floor")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the floor child");
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .expect("piped")
        .read_exact(&mut byte)
        .expect("the floor child's byte");
    let elapsed = started.elapsed();
    child.wait().expect("reap the floor child");
    elapsed
}

/// The name of the service-shaped generations' listener: a successor that
/// inherits it is service-shaped too.
const SERVICE_LISTENER: &str = "service-http";

/// The successor: ready as soon as it holds its listeners.
fn successor() {
    let mut options = Options::default();
    if let Some(path) = std::env::var_os(PID_FILE) {
        options = options.pid_file(path);
    }
    let upgrader = Upgrader::new(options).expect("a valid inheritance");
    if upgrader
        .descriptors()
        .iter()
        .any(|(name, _)| name == SERVICE_LISTENER)
    {
        return service(upgrader, None);
    }
    let _runtime = runtime();
    let listeners: Vec<_> = upgrader
        .descriptors()
        .into_iter()
        .filter(|(_, kind)| *kind == Kind::TcpListener)
        .map(|(name, _)| {
            upgrader
                .tcp_listener(&name, loopback())
                .expect("inherited listener")
        })
        .collect();
    upgrader.ready().expect("ready");
    drop(listeners);
    // It has been measured. It leaves once its parent is gone (a separate
    // old generation's exit), or is ended by the bench (the parent is an
    // in-process generation): one gone before its parent heard it was ready
    // would fail the upgrade.
    upgrader.wait_for_parent_blocking();
    std::process::exit(0);
}

/// One upgrade of a fresh in-process generation with `size` listeners.
fn one_upgrade(size: usize) -> Duration {
    let upgrader = Upgrader::new(Options::default().upgrade_signal(None)).expect("an upgrader");
    let _listeners: Vec<_> = (0..size)
        .map(|i| {
            upgrader
                .tcp_listener(&format!("l{i}"), loopback())
                .expect("bind")
        })
        .collect();
    upgrader.ready().expect("ready");
    let started = Instant::now();
    let upgraded = upgrader.upgrade_blocking().expect("the upgrade succeeds");
    let elapsed = started.elapsed();
    drop(upgrader);
    end(upgraded.pid);
    elapsed
}

/// The old generation for `old_gone`: serves nothing, upgrades on a byte
/// from stdin, and exits as soon as `exit()` resolves.
fn old_generation() {
    let upgrader = Upgrader::new(Options::default().upgrade_signal(None)).expect("an upgrader");
    let runtime = runtime();
    let _listener = upgrader.tcp_listener("http", loopback()).expect("bind");
    upgrader.ready().expect("ready");
    let mut stdout = std::io::stdout();
    stdout.write_all(b"ready\n").expect("stdout");
    stdout.flush().expect("stdout");
    let mut trigger = [0u8; 1];
    std::io::stdin()
        .read_exact(&mut trigger)
        .expect("a trigger");
    let upgraded = runtime.block_on(async {
        let upgraded = upgrader.upgrade().await.expect("the upgrade succeeds");
        upgrader.exit().await;
        upgraded
    });
    writeln!(stdout, "{}", upgraded.pid).expect("stdout");
    std::process::exit(0);
}

/// Time from asking an old generation to upgrade to its exit.
fn old_gone() -> Duration {
    old_gone_as("old")
}

/// The same, for the old generation role `role`.
fn old_gone_as(role: &str) -> Duration {
    let exe = std::env::current_exe().expect("this binary");
    let mut old = Command::new(exe)
        .env(ROLE, role)
        .env(PID_FILE, service_pid_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the old generation");
    let mut lines = BufReader::new(old.stdout.take().expect("piped"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("its ready line");
    let started = Instant::now();
    old.stdin
        .as_mut()
        .expect("piped")
        .write_all(b"U")
        .expect("trigger");
    old.wait().expect("reap the old generation");
    let elapsed = started.elapsed();
    line.clear();
    lines.read_line(&mut line).expect("its successor's pid");
    // The old generation is gone: its successor is our child now (subreaper)
    // or was reaped by it.
    reap(line.trim().parse().expect("a pid"));
    elapsed
}

/// The service-shaped generations' PID file, named by the bench to its old
/// generation and inherited by its successor.
const PID_FILE: &str = "HANDOVER_BENCH_PID_FILE";

/// A PID file in a disk-backed directory (the target directory).
fn service_pid_file() -> std::path::PathBuf {
    let dir = target_dir().join("bench-service");
    std::fs::create_dir_all(&dir).expect("the PID file's directory");
    dir.join("service.pid")
}

/// A generation shaped as services are (see the module's documentation),
/// serving HTTP/1.1 until `exit()` resolves. `trigger`: for the old
/// generation of `service/old_gone`, a byte on stdin asks it to upgrade,
/// and it then exits as the example does, naming its successor in its PID
/// file. Without: a successor, which leaves once its parent is gone.
fn service(upgrader: Upgrader, trigger: Option<()>) {
    use handover::drain::{Drain, DrainOptions};
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .try_init();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(
            upgrader
                .tcp_listener(SERVICE_LISTENER, loopback())
                .expect("the listener"),
        )
        .expect("register the listener");
        upgrader.ready().expect("ready");
        let drain = Drain::new(DrainOptions::default());
        let exit = upgrader.exit();
        let accept = {
            let drain = drain.clone();
            async move {
                tokio::pin!(exit);
                loop {
                    tokio::select! {
                        biased;
                        _ = &mut exit => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let hello = hyper::service::service_fn(|_| async {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::from("hello")),
                                ))
                            });
                            tokio::spawn(drain.serve_http1(stream, hello));
                        }
                    }
                }
            }
        };
        match trigger {
            None => {
                tokio::spawn(accept);
                // Measured already; it leaves once its parent is gone.
                upgrader.wait_for_parent().await;
            }
            Some(()) => {
                let mut stdout = std::io::stdout();
                stdout.write_all(b"ready\n").expect("stdout");
                stdout.flush().expect("stdout");
                let serving = tokio::spawn(accept);
                let upgraded = tokio::task::spawn_blocking(|| {
                    let mut byte = [0u8; 1];
                    std::io::stdin().read_exact(&mut byte).expect("a trigger");
                })
                .await
                .map(|()| upgrader.upgrade());
                let upgraded = upgraded
                    .expect("the trigger")
                    .await
                    .expect("the upgrade succeeds");
                let _ = serving.await;
                drain.wait().await;
                writeln!(stdout, "{}", upgraded.pid).expect("stdout");
            }
        }
    });
    // As a service's main returns: the runtime is dropped, and the exit
    // renames the PID file.
    drop(runtime);
    std::process::exit(0);
}

/// The old generation of `service/old_gone`.
fn old_service() {
    let path = std::env::var_os(PID_FILE).expect("the bench names the PID file");
    let upgrader =
        Upgrader::new(Options::default().upgrade_signal(None).pid_file(path)).expect("an upgrader");
    service(upgrader, Some(()));
}

/// One upgrade of a fresh in-process generation whose successor is
/// service-shaped.
fn one_service_upgrade() -> Duration {
    let upgrader = Upgrader::new(Options::default().upgrade_signal(None)).expect("an upgrader");
    let _listener = upgrader
        .tcp_listener(SERVICE_LISTENER, loopback())
        .expect("bind");
    upgrader.ready().expect("ready");
    let started = Instant::now();
    let upgraded = upgrader.upgrade_blocking().expect("the upgrade succeeds");
    let elapsed = started.elapsed();
    drop(upgrader);
    end(upgraded.pid);
    elapsed
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Ends a successor of an in-process generation: that generation never
/// exits (its supervisor stays, detached, until this process exits), so its
/// successor would wait for it forever.
fn end(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    reap(pid);
}

fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

fn become_subreaper() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
}

/// Each median beside the floor's, from criterion's own estimates.
fn print_ratios() {
    let dir = target_dir().join("criterion/handover");
    let median = |id: &str| -> Option<f64> {
        let text = std::fs::read_to_string(dir.join(id).join("new/estimates.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["median"]["point_estimate"].as_f64()
    };
    let Some(floor) = median("floor") else {
        return;
    };
    println!("\ncriterion medians beside the floor (same run, one figure after another):");
    println!("  {:<18} {:>9.3} ms   1.00 x floor", "floor", floor / 1e6);
    let mut ids: Vec<String> = SIZES.iter().map(|n| format!("upgrade/{n}")).collect();
    ids.push("old_gone".into());
    ids.push("service/upgrade".into());
    ids.push("service/old_gone".into());
    ids.push("floor_holding_256".into());
    for id in ids {
        if let Some(m) = median(&id) {
            println!(
                "  {:<18} {:>9.3} ms   {:.2} x floor",
                id,
                m / 1e6,
                m / floor
            );
        }
    }
    if let (Some(upgrade), Some(holding)) = (median("upgrade/256"), median("floor_holding_256")) {
        println!(
            "  upgrade/256 / floor_holding_256: {:.2} (the library's own share with 256 descriptors)",
            upgrade / holding
        );
    }
}
