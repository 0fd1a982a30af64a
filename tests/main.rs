//! The integration tests: one test binary (`cargo test --test it`), one
//! module per file beside this one, sharing `common`. One binary links once
//! instead of once per file, and its tests share one pool of test threads,
//! so a file whose last test runs long no longer holds the others back.
//! Run one file's tests with a filter: `cargo test --test it failover::`.

mod common;

mod alerts;
mod architecture;
mod bench;
mod cancel_job;
mod claim_modes;
mod cli;
mod cluster;
mod code_size;
mod console;
mod counter_sync;
mod dead_letter;
mod docs;
mod failover;
mod faults;
mod go_schema;
mod happy_path;
mod http_surface;
mod journal;
mod kubernetes;
mod listen;
mod memory_limit;
mod metrics;
mod not_the_rows_fault;
mod outages;
mod partial_failure;
mod passwords;
mod pause;
mod pgbouncer;
mod poison;
mod privileges;
mod redis_acl;
mod redis_durability;
mod redis_memory;
mod reference_cli;
mod reference_config;
mod scale_out;
mod secrets;
mod sentinel;
mod settle_refusals;
mod shutdown;
mod soak;
mod status;
mod supervision;
mod tls;
mod two_relays;
mod verify;
mod wake_storm;
mod wedge;

/// With `autotests = false`, a file of `tests/` that is not declared above
/// would never be compiled or run: every one must be, and every file of a
/// directory module (`tests/console/`, `tests/common/`) in its `mod.rs`.
#[test]
fn every_file_of_tests_is_a_module_of_this_binary() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests"));
    let main = include_str!("main.rs");
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("tests/").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().join("mod.rs").is_file() {
            let parent = std::fs::read_to_string(entry.path().join("mod.rs")).expect("mod.rs");
            assert!(
                main.lines().any(|l| l == format!("mod {name};")),
                "tests/{name}/ is not declared in tests/main.rs: its tests never run"
            );
            for inner in std::fs::read_dir(entry.path())
                .expect("a directory of tests/")
                .flatten()
            {
                let file = inner.file_name().to_string_lossy().into_owned();
                let Some(module) = file.strip_suffix(".rs").filter(|m| *m != "mod") else {
                    continue;
                };
                files += 1;
                assert!(
                    parent
                        .lines()
                        .any(|l| l == format!("mod {module};") || l == format!("pub mod {module};")),
                    "tests/{name}/{file} is not declared in tests/{name}/mod.rs: it never runs"
                );
            }
            continue;
        }
        let Some(module) = name.strip_suffix(".rs") else {
            continue;
        };
        if module == "main" {
            continue;
        }
        files += 1;
        assert!(
            main.lines().any(|l| l == format!("mod {module};")),
            "tests/{name} is not declared in tests/main.rs: its tests never run"
        );
    }
    assert!(files >= 50, "test files found: {files}");
}
