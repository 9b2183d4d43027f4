//! Every scenario in `scenarios/`, on real processes under load: part of
//! `cargo test --features chaos`. A failing scenario prints the harness's
//! table, with what did not hold.
#![cfg(feature = "chaos")]

use std::path::{Path, PathBuf};

use handover_harness::report::table;
use handover_harness::runner::{RunOptions, run};
use handover_harness::scenario::Scenario;

#[test]
fn every_scenario_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let scenarios = Scenario::load_dir(&dir).expect("readable scenarios");
    assert!(
        scenarios.len() >= 19,
        "the scenarios of the contract are all there"
    );
    let options = RunOptions {
        subject: PathBuf::from(env!("CARGO_BIN_EXE_handover-subject")),
        subject_args: Vec::new(),
        progress: false,
    };
    let reports: Vec<_> = scenarios
        .iter()
        .map(|scenario| run(scenario, &options))
        .collect();
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{}", table(&reports));
    for (scenario, report) in scenarios.iter().zip(&reports) {
        // The stock-shutdown scenario passes when it sees losses; every
        // other one loses nothing.
        if scenario.expect.min_dropped == 0 {
            assert_eq!(report.dropped(), 0, "{}", report.name);
        }
    }
}

/// A scenario file with a mistake is refused with the file and the field.
#[test]
fn a_scenario_with_an_unknown_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "description = \"x\"\n[load]\nhttp_keepalive = 3\n").unwrap();
    let problem = Scenario::load(&path).unwrap_err();
    assert!(
        problem.contains("typo.toml") && problem.contains("http_keepalive"),
        "{problem}"
    );
}
