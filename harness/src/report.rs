//! What a scenario run reports: a row of the table, a JSON document, and a
//! picture of throughput and latency over time with each upgrade marked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::load::{Handshake, LoadReport, Protocol, Sample};
use crate::scenario::Scenario;

/// One upgrade asked for by a step.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeRecord {
    /// Milliseconds from the start of the load.
    pub at_ms: u32,
    /// `ok` or the error's reason.
    pub outcome: String,
    /// The handover latency the library measured (start to ready), if ok.
    pub latency_us: Option<u64>,
    /// The subject's whole answer.
    pub answer: String,
}

/// 100 ms of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Start of the bucket, from the start of the load.
    pub at_ms: u32,
    /// HTTP requests answered correctly.
    pub ok: u64,
    /// HTTP requests that failed.
    pub failed: u64,
    /// Latency percentiles of the bucket's requests.
    pub p50_us: u32,
    /// 99th percentile.
    pub p99_us: u32,
    /// Slowest.
    pub max_us: u32,
}

/// Request latency in the second around each successful upgrade, against
/// the rest of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AroundUpgrades {
    /// Median latency away from upgrades.
    pub steady_p50_us: u32,
    /// 99th percentile away from upgrades.
    pub steady_p99_us: u32,
    /// Median latency within 500 ms of an upgrade.
    pub around_p50_us: u32,
    /// 99th percentile within 500 ms of an upgrade.
    pub around_p99_us: u32,
    /// Slowest request within 500 ms of an upgrade.
    pub around_max_us: u32,
    /// Requests per second away from upgrades.
    pub steady_rps: f64,
    /// Requests per second within 500 ms of an upgrade.
    pub around_rps: f64,
}

/// Everything about one scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// What it proves.
    pub description: String,
    /// Whether every expectation held.
    pub passed: bool,
    /// What did not hold.
    pub problems: Vec<String>,
    /// Wall time.
    pub duration_ms: u64,
    /// HTTP requests answered correctly.
    pub requests: u64,
    /// Echo round trips answered correctly.
    pub echoes: u64,
    /// UDP datagrams sent.
    pub udp_sent: u64,
    /// Failures by class (`refused`, `reset`, `timeout`, `wrong`, `udp_lost`, `slow`).
    pub failures: BTreeMap<String, u64>,
    /// The first few failures.
    pub failure_examples: Vec<String>,
    /// Failures on connections a generation held when it crashed (the
    /// `crash-after-ready:MS` fault): not in `failures`, which counts what
    /// the library is to blame for.
    pub with_crashed: u64,
    /// The last lines the subject wrote on stderr, for a scenario that
    /// failed (empty when it passed).
    pub stderr_tail: Vec<String>,
    /// Every upgrade asked for.
    pub upgrades: Vec<UpgradeRecord>,
    /// Handover latency (library-measured) percentiles over successful upgrades.
    pub handover_p50_us: Option<u64>,
    /// 99th percentile.
    pub handover_p99_us: Option<u64>,
    /// The generation serving at the end.
    pub serving_generation: Option<u64>,
    /// The highest generation that started.
    pub generations: u64,
    /// Descriptors of the first and the last generation.
    pub descriptors: (Option<usize>, Option<usize>),
    /// Request latency around upgrades against steady state.
    pub around_upgrades: AroundUpgrades,
    /// The run in 100 ms buckets.
    pub timeline: Vec<Bucket>,
    /// Each protocol's answers and latency near upgrades (empty for a run
    /// of plain HTTP/1.1 alone).
    pub protocols: BTreeMap<String, ProtocolSummary>,
    /// Replies of streaming RPCs received in order.
    pub grpc_replies: u64,
    /// WebSocket connections the server closed with 1001, going away.
    pub ws_going_away: u64,
    /// TLS handshakes by the generation that served them.
    pub tls_handshakes: Vec<HandshakeRate>,
    /// TLS handshakes with generations after the first that answered one
    /// (all of them, upgrades or not), and how many of those resumed a
    /// session.
    pub tls_later: TlsResumption,
}

/// TLS handshakes, and how many of them resumed a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TlsResumption {
    /// Handshakes.
    pub handshakes: u64,
    /// Of which resumed (abbreviated, no certificate).
    pub resumed: u64,
}

impl TlsResumption {
    /// Handshakes with a generation after the first generation that
    /// answered one.
    fn later(handshakes: &[Handshake]) -> TlsResumption {
        let first = handshakes.iter().filter_map(|h| h.generation).min();
        let later = handshakes
            .iter()
            .filter(|h| h.generation.is_some() && h.generation > first);
        let (mut count, mut resumed) = (0, 0);
        for handshake in later {
            count += 1;
            resumed += u64::from(handshake.resumed);
        }
        TlsResumption {
            handshakes: count,
            resumed,
        }
    }

    /// Full handshakes: no session resumed.
    pub fn full(&self) -> u64 {
        self.handshakes - self.resumed
    }
}

/// One protocol's part of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProtocolSummary {
    /// Answered correctly.
    pub ok: u64,
    /// Failed.
    pub failed: u64,
    /// Latency near upgrades against steady state.
    pub around_upgrades: AroundUpgrades,
}

impl ProtocolSummary {
    /// p99 latency within 500 ms of an upgrade over the steady p99.
    pub fn p99_ratio(&self) -> Option<f64> {
        let around = &self.around_upgrades;
        (around.steady_p99_us > 0 && around.around_p99_us > 0)
            .then(|| f64::from(around.around_p99_us) / f64::from(around.steady_p99_us))
    }
}

/// The TLS handshakes one generation served.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeRate {
    /// The generation.
    pub generation: u64,
    /// How many.
    pub count: u64,
    /// Per second over the time it served them (first to last).
    pub per_second: f64,
    /// Median handshake time.
    pub p50_us: u32,
    /// How many of them resumed a session.
    pub resumed: u64,
}

impl ScenarioReport {
    /// A report of a run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scenario: &Scenario,
        load: LoadReport,
        slow_failures: u64,
        upgrades: Vec<UpgradeRecord>,
        problems: Vec<String>,
        serving_generation: Option<u64>,
        generations: u64,
        descriptors: (Option<usize>, Option<usize>),
        duration: Duration,
    ) -> ScenarioReport {
        let mut failures: BTreeMap<String, u64> = load
            .failures
            .iter()
            .map(|(class, n)| (class.to_string(), *n))
            .collect();
        if load.udp_lost > 0 {
            failures.insert("udp_lost".into(), load.udp_lost);
        }
        if slow_failures > 0 {
            failures.insert("slow".into(), slow_failures);
        }
        let mut handover: Vec<u64> = upgrades
            .iter()
            .filter(|u| u.outcome == "ok")
            .filter_map(|u| u.latency_us)
            .collect();
        handover.sort_unstable();
        let upgrade_times: Vec<u32> = upgrades
            .iter()
            .filter(|u| u.outcome == "ok")
            .map(|u| u.at_ms)
            .collect();
        // A stream's latency is its length: it would read as a slow request.
        let requests: Vec<Sample> = load
            .samples
            .iter()
            .filter(|s| !matches!(s.protocol, Protocol::GrpcStream | Protocol::GrpcWatch))
            .copied()
            .collect();
        let mut protocols = protocol_summaries(&load.samples, &upgrade_times);
        if protocols.keys().all(|p| p == "http1") {
            protocols.clear();
        }
        ScenarioReport {
            name: scenario.name.clone(),
            description: scenario.description.trim().to_owned(),
            passed: problems.is_empty(),
            problems,
            duration_ms: duration.as_millis() as u64,
            requests: load.ok,
            echoes: load.echoes,
            udp_sent: load.udp_sent,
            failures,
            with_crashed: 0,
            stderr_tail: Vec::new(),
            failure_examples: load.examples.clone(),
            handover_p50_us: percentile(&handover, 50),
            handover_p99_us: percentile(&handover, 99),
            upgrades,
            serving_generation,
            generations,
            descriptors,
            around_upgrades: around_upgrades(&requests, &upgrade_times),
            timeline: timeline(&load.samples),
            protocols,
            grpc_replies: load.grpc_replies,
            ws_going_away: load.ws_going_away,
            tls_handshakes: handshake_rates(&load.handshakes, &upgrade_times),
            tls_later: TlsResumption::later(&load.handshakes),
        }
    }

    /// A scenario whose subject could not even start.
    pub fn failed_to_start(scenario: &Scenario, problem: String) -> ScenarioReport {
        ScenarioReport::new(
            scenario,
            LoadReport::default(),
            0,
            Vec::new(),
            vec![problem],
            None,
            0,
            (None, None),
            Duration::ZERO,
        )
    }

    /// Failed requests, round trips and datagrams.
    pub fn dropped(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The new generation's TLS handshakes per second against the first
    /// generation's, as a ratio (1.0 = the same), when both served enough
    /// (50 each) to say.
    pub fn handshake_rate_ratio(&self) -> Option<f64> {
        let first = self.tls_handshakes.first()?;
        let last = self.tls_handshakes.last()?;
        (first.generation != last.generation
            && first.count >= 50
            && last.count >= 50
            && first.per_second > 0.0)
            .then(|| last.per_second / first.per_second)
    }

    /// Upgrades that succeeded and that failed.
    pub fn upgrade_counts(&self) -> (usize, usize) {
        let ok = self.upgrades.iter().filter(|u| u.outcome == "ok").count();
        (ok, self.upgrades.len() - ok)
    }
}

fn percentile<T: Copy>(sorted: &[T], p: usize) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let index = (sorted.len() * p)
        .div_ceil(100)
        .saturating_sub(1)
        .min(sorted.len() - 1);
    Some(sorted[index])
}

/// The run in 100 ms buckets; the last one, cut short when the load
/// stopped, is left out so that it does not read as a dip.
fn timeline(samples: &[Sample]) -> Vec<Bucket> {
    let mut buckets: BTreeMap<u32, (u64, u64, Vec<u32>)> = BTreeMap::new();
    for sample in samples {
        let entry = buckets.entry(sample.at_ms / 100 * 100).or_default();
        if sample.ok {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
        entry.2.push(sample.latency_us);
    }
    if buckets.len() > 1 {
        buckets.pop_last();
    }
    buckets
        .into_iter()
        .map(|(at_ms, (ok, failed, mut latencies))| {
            latencies.sort_unstable();
            Bucket {
                at_ms,
                ok,
                failed,
                p50_us: percentile(&latencies, 50).unwrap_or(0),
                p99_us: percentile(&latencies, 99).unwrap_or(0),
                max_us: latencies.last().copied().unwrap_or(0),
            }
        })
        .collect()
}

/// Each protocol's counts and latency near upgrades.
fn protocol_summaries(samples: &[Sample], upgrades: &[u32]) -> BTreeMap<String, ProtocolSummary> {
    let mut by_protocol: BTreeMap<Protocol, Vec<Sample>> = BTreeMap::new();
    for sample in samples {
        by_protocol
            .entry(sample.protocol)
            .or_default()
            .push(*sample);
    }
    by_protocol
        .into_iter()
        .map(|(protocol, samples)| {
            let ok = samples.iter().filter(|s| s.ok).count() as u64;
            let summary = ProtocolSummary {
                ok,
                failed: samples.len() as u64 - ok,
                around_upgrades: around_upgrades(&samples, upgrades),
            };
            (protocol.to_string(), summary)
        })
        .collect()
}

/// Handshakes per second of each generation in steady state, over the
/// span in which it served them: handshakes within 500 ms of an upgrade
/// (when two generations share the machine) and in the load's first 200 ms
/// (clients still connecting) are left out, and so are those no answer
/// followed.
fn handshake_rates(handshakes: &[Handshake], upgrades: &[u32]) -> Vec<HandshakeRate> {
    const WINDOW_MS: u32 = 500;
    const WARM_UP_MS: u32 = 200;
    let near = |at: u32| {
        at < WARM_UP_MS
            || upgrades
                .iter()
                .any(|&u| at + WINDOW_MS >= u && at <= u + WINDOW_MS)
    };
    let mut by_generation: BTreeMap<u64, Vec<&Handshake>> = BTreeMap::new();
    for handshake in handshakes.iter().filter(|h| !near(h.at_ms)) {
        if let Some(generation) = handshake.generation {
            by_generation.entry(generation).or_default().push(handshake);
        }
    }
    by_generation
        .into_iter()
        .map(|(generation, handshakes)| {
            let first = handshakes.iter().map(|h| h.at_ms).min().unwrap_or(0);
            let last = handshakes.iter().map(|h| h.at_ms).max().unwrap_or(0);
            let mut times: Vec<u32> = handshakes.iter().map(|h| h.us).collect();
            times.sort_unstable();
            let span_s = f64::from(last - first) / 1000.0;
            HandshakeRate {
                generation,
                count: handshakes.len() as u64,
                per_second: if span_s > 0.0 {
                    handshakes.len() as f64 / span_s
                } else {
                    0.0
                },
                p50_us: percentile(&times, 50).unwrap_or(0),
                resumed: handshakes.iter().filter(|h| h.resumed).count() as u64,
            }
        })
        .collect()
}

fn around_upgrades(samples: &[Sample], upgrades: &[u32]) -> AroundUpgrades {
    around_upgrades_within(samples, upgrades, 500)
}

/// Request latency within `window_ms` of an upgrade (at `upgrades`, in ms
/// from the start of the load) against the rest of the run: for runs whose
/// upgrades come closer together than a second.
pub fn around_upgrades_within(
    samples: &[Sample],
    upgrades: &[u32],
    window_ms: u32,
) -> AroundUpgrades {
    let near = |at: u32| {
        upgrades
            .iter()
            .any(|&u| at + window_ms >= u && at <= u + window_ms)
    };
    let (mut around, mut steady): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    for sample in samples.iter().filter(|s| s.ok) {
        if near(sample.at_ms) {
            around.push(sample.latency_us);
        } else {
            steady.push(sample.latency_us);
        }
    }
    around.sort_unstable();
    steady.sort_unstable();
    let span = samples.last().map_or(0, |s| s.at_ms) as f64 / 1000.0;
    // Windows may overlap; count each millisecond once.
    let around_ms = (0..=samples.last().map_or(0, |s| s.at_ms))
        .filter(|&ms| near(ms))
        .count() as f64;
    let around_s = around_ms / 1000.0;
    let steady_s = (span - around_s).max(0.0);
    AroundUpgrades {
        steady_p50_us: percentile(&steady, 50).unwrap_or(0),
        steady_p99_us: percentile(&steady, 99).unwrap_or(0),
        around_p50_us: percentile(&around, 50).unwrap_or(0),
        around_p99_us: percentile(&around, 99).unwrap_or(0),
        around_max_us: around.last().copied().unwrap_or(0),
        steady_rps: if steady_s > 0.0 {
            steady.len() as f64 / steady_s
        } else {
            0.0
        },
        around_rps: if around_s > 0.0 {
            around.len() as f64 / around_s
        } else {
            0.0
        },
    }
}

/// The table printed at the end of a run.
pub fn table(reports: &[ScenarioReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<30} {:>9} {:>8} {:>7} {:<20} {:>11} {:>4} {:>17} {:>29}  verdict",
        "scenario",
        "requests",
        "echoes",
        "udp",
        "failures",
        "upgrades",
        "gen",
        "handover p50/p99",
        "near upgrade: p99/steady, rps"
    );
    for r in reports {
        let mut failures = if r.failures.is_empty() {
            "0".to_owned()
        } else {
            r.failures
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if r.with_crashed > 0 {
            // Not the library's: on connections a crashed generation held.
            failures.push_str(&format!(" +{} crashed", r.with_crashed));
        }
        let (ok, failed) = r.upgrade_counts();
        let ms =
            |us: Option<u64>| us.map_or("-".to_owned(), |us| format!("{:.1}", us as f64 / 1000.0));
        let around = &r.around_upgrades;
        let _ = writeln!(
            out,
            "{:<30} {:>9} {:>8} {:>7} {:<20} {:>11} {:>4} {:>17} {:>29}  {}",
            r.name,
            r.requests,
            r.echoes,
            r.udp_sent,
            failures,
            format!("{ok} ok/{failed} fail"),
            r.serving_generation
                .map_or("-".to_owned(), |g| g.to_string()),
            format!("{}/{} ms", ms(r.handover_p50_us), ms(r.handover_p99_us)),
            if around.steady_rps > 0.0 && around.around_rps > 0.0 {
                format!(
                    "{:.2}/{:.2} ms, {:.0}%",
                    around.around_p99_us as f64 / 1000.0,
                    around.steady_p99_us as f64 / 1000.0,
                    100.0 * around.around_rps / around.steady_rps
                )
            } else {
                "-".to_owned()
            },
            if r.passed { "PASS" } else { "FAIL" }
        );
        for (protocol, summary) in &r.protocols {
            let around = &summary.around_upgrades;
            let _ = writeln!(
                out,
                "    {protocol:<12} ok {:>8}  failed {:>5}  p99 near upgrades/steady {}",
                summary.ok,
                summary.failed,
                match summary.p99_ratio() {
                    Some(ratio) => format!(
                        "{:.2}/{:.2} ms ({ratio:.2}x)",
                        f64::from(around.around_p99_us) / 1000.0,
                        f64::from(around.steady_p99_us) / 1000.0
                    ),
                    None => "-".to_owned(),
                }
            );
        }
        if r.grpc_replies > 0 || r.ws_going_away > 0 {
            let _ = writeln!(
                out,
                "    stream replies {}, WebSocket closes 1001 {}",
                r.grpc_replies, r.ws_going_away
            );
        }
        if let (Some(first), Some(last)) = (r.tls_handshakes.first(), r.tls_handshakes.last())
            && first.generation != last.generation
        {
            let _ = writeln!(
                out,
                "    TLS handshakes/s: generation {} {:.0} ({}, {} resumed, p50 {:.2} ms), generation {} {:.0} ({}, {} resumed, p50 {:.2} ms){}",
                first.generation,
                first.per_second,
                first.count,
                first.resumed,
                f64::from(first.p50_us) / 1000.0,
                last.generation,
                last.per_second,
                last.count,
                last.resumed,
                f64::from(last.p50_us) / 1000.0,
                r.handshake_rate_ratio()
                    .map_or(String::new(), |ratio| format!(
                        ": {:+.1}%",
                        (ratio - 1.0) * 100.0
                    ))
            );
        }
        if r.tls_later.handshakes > 0 {
            let _ = writeln!(
                out,
                "    TLS handshakes with later generations: {}, of which full (no session resumed) {}",
                r.tls_later.handshakes,
                r.tls_later.full()
            );
        }
        for problem in &r.problems {
            let _ = writeln!(out, "    - {problem}");
        }
        if !r.stderr_tail.is_empty() {
            let _ = writeln!(out, "    the subject's stderr, last lines:");
            for line in &r.stderr_tail {
                let _ = writeln!(out, "    | {line}");
            }
        }
    }
    out
}

/// An SVG picture of one run: throughput and p99 latency per 100 ms, each
/// successful upgrade a green line, each failed one a red line.
pub fn svg(report: &ScenarioReport) -> String {
    let (width, height, margin) = (900.0, 260.0, 50.0);
    let plot_w = width - 2.0 * margin;
    let panel_h = (height - 3.0 * margin / 2.0) / 2.0;
    let end_ms = report
        .duration_ms
        .max(report.timeline.last().map_or(1, |b| b.at_ms as u64 + 100)) as f64;
    let x = |ms: f64| margin + ms / end_ms * plot_w;
    let max_rps = report
        .timeline
        .iter()
        .map(|b| (b.ok + b.failed) * 10)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_p99 = report
        .timeline
        .iter()
        .map(|b| b.p99_us)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">"#,
        height + 30.0
    );
    let verdict = if report.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        r#"<text x="{margin}" y="16" font-size="13" font-weight="bold">{} — {verdict}, {} requests, {} failed, {} upgrades ok</text>"#,
        escape(&report.name),
        report.requests,
        report.dropped(),
        report.upgrade_counts().0
    );
    for (panel, (label, max, color)) in [
        ("requests/s", max_rps, "#2b6cb0"),
        ("p99 latency µs", max_p99, "#b7791f"),
    ]
    .into_iter()
    .enumerate()
    {
        let top = 30.0 + panel as f64 * (panel_h + margin / 2.0);
        let bottom = top + panel_h;
        let _ = writeln!(
            out,
            r##"<rect x="{margin}" y="{top}" width="{plot_w}" height="{panel_h}" fill="none" stroke="#ccc"/><text x="4" y="{}" >{label}</text><text x="4" y="{}">{max:.0}</text>"##,
            top + panel_h / 2.0,
            top + 10.0
        );
        let points: Vec<String> = report
            .timeline
            .iter()
            .map(|b| {
                let value = if panel == 0 {
                    ((b.ok + b.failed) * 10) as f64
                } else {
                    b.p99_us as f64
                };
                format!(
                    "{:.1},{:.1}",
                    x(b.at_ms as f64 + 50.0),
                    bottom - value / max * panel_h
                )
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        for bucket in report
            .timeline
            .iter()
            .filter(|b| b.failed > 0 && panel == 0)
        {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#c53030"/>"##,
                x(bucket.at_ms as f64 + 50.0),
                bottom - 3.0
            );
        }
        for upgrade in &report.upgrades {
            let color = if upgrade.outcome == "ok" {
                "#2f855a"
            } else {
                "#c53030"
            };
            let _ = writeln!(
                out,
                r#"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{bottom}" stroke="{color}" stroke-opacity="0.6"><title>{1}</title></line>"#,
                x(upgrade.at_ms as f64),
                escape(&upgrade.answer)
            );
        }
    }
    let axis = height + 10.0;
    for second in 0..=(end_ms / 1000.0) as u64 {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis}" text-anchor="middle">{second}s</text>"#,
            x(second as f64 * 1000.0)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{margin}" y="{}" fill="#555">green: upgrade ok · red line: upgrade failed · red dot: failed requests</text></svg>"##,
        axis + 16.0
    );
    out
}

/// An HTML page with the table and every scenario's picture.
pub fn html(reports: &[ScenarioReport]) -> String {
    let mut out = String::from(
        "<!doctype html><meta charset=\"utf-8\"><title>handover chaos report</title>\
         <style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}</style>\
         <h1>handover chaos report</h1><pre>",
    );
    out.push_str(&escape(&table(reports)));
    out.push_str("</pre>");
    for report in reports {
        let _ = write!(
            out,
            "<h2>{}</h2><p>{}</p>",
            escape(&report.name),
            escape(&report.description)
        );
        out.push_str(&svg(report));
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_values() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), Some(50));
        assert_eq!(percentile(&values, 99), Some(99));
        assert_eq!(percentile(&[7u32], 99), Some(7));
        assert_eq!(percentile::<u32>(&[], 50), None);
    }

    #[test]
    fn handshake_rates_count_each_generation_in_steady_state() {
        let handshake = |at_ms, generation| Handshake {
            at_ms,
            us: 1000,
            generation: Some(generation),
            resumed: at_ms % 20 == 0,
        };
        // Generation 0 from 0 to 1000 ms, an upgrade at 1500, generation 1
        // from 1100 to 3000: the first 200 ms and 1000..=2000 are left out.
        let mut handshakes: Vec<Handshake> = (0..=100).map(|i| handshake(i * 10, 0)).collect();
        handshakes.extend((110..=300).map(|i| handshake(i * 10, 1)));
        handshakes.push(Handshake {
            at_ms: 2500,
            us: 1000,
            generation: None,
            resumed: false,
        });
        let rates = handshake_rates(&handshakes, &[1500]);
        assert_eq!(rates.len(), 2);
        // 200..=990: 80 handshakes over 790 ms.
        assert_eq!((rates[0].generation, rates[0].count), (0, 80));
        assert!((rates[0].per_second - 80.0 / 0.79).abs() < 0.01);
        // 2010..=3000: 100 over 990 ms; the one no answer followed is left out.
        assert_eq!((rates[1].generation, rates[1].count), (1, 100));
        assert_eq!(rates[1].p50_us, 1000);
        // Every other one resumed (the even tens of ms).
        assert_eq!((rates[0].resumed, rates[1].resumed), (40, 50));
        // Later: generation 1's 191, of which 96 resumed; none without
        // a generation.
        assert_eq!(
            TlsResumption::later(&handshakes),
            TlsResumption {
                handshakes: 191,
                resumed: 96
            }
        );
    }

    #[test]
    fn timeline_buckets_by_100_ms() {
        let sample = |at_ms, latency_us, ok| Sample {
            at_ms,
            latency_us,
            ok,
            protocol: Protocol::Http1,
        };
        let samples = [
            sample(10, 100, true),
            sample(99, 300, false),
            sample(150, 200, true),
            sample(210, 900, true),
        ];
        let buckets = timeline(&samples);
        assert_eq!(buckets.len(), 2, "the last, partial bucket is left out");
        assert_eq!(
            (buckets[0].ok, buckets[0].failed, buckets[0].max_us),
            (1, 1, 300)
        );
        assert_eq!((buckets[1].at_ms, buckets[1].ok), (100, 1));
    }
}
