//! A real database on a disk volume, run as a user runs one: the fixture postgres (Debian's
//! postgresql-15 with an entrypoint after the official image's) makes its cluster on a new
//! volume, takes a table over the forwarded port from the host's `psql`, shuts down cleanly
//! through its stop signal when `run` gets ctrl-C, and a second `run` with the same volume
//! finds the row without making a cluster again.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::Guest;
use crate::util::*;

/// How long a boot may take until postgres answers (TCG on a busy machine; the first run
/// also runs initdb).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// How long `run` may take to end once it was asked to.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the entrypoint prints when it makes a cluster.
const INITDB: &str = "docker-entrypoint: initializing a database cluster";

/// `psql` against the guest on `port` as postgres, one command: its output, or its error.
fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-w", "-X", "-At"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql (apt-get install postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Waits until postgres answers `select 1` on `port`; panics with the console and psql's last
/// error when the guest ends first or `timeout` passes.
fn wait_ready(vm: &mut Guest, port: u16, timeout: Duration) {
    vm.wait_answering("postgres", timeout, || match psql(port, "select 1") {
        Ok(out) if out == "1" => Ok(()),
        Ok(out) | Err(out) => Err(format!("psql: {out}")),
    });
}

/// `oci2uk run ELF` with the port and the volume.
fn start(elf: &Path, port: u16, vol: &str, console: std::path::PathBuf) -> Guest {
    Guest::run(
        elf,
        &["-p", &format!("127.0.0.1:{port}:5432"), "-v", vol],
        console,
    )
}

/// The console from `run`'s stop message on: what shows the shutdown, for the test's report.
fn shutdown_lines(console: &str) -> &str {
    console
        .find("oci2uk: SIG")
        .map_or(console, |i| &console[i..])
}

#[test]
fn postgres_keeps_its_data_on_a_volume_and_stops_cleanly() {
    let started = Instant::now();
    let s = Scratch::new();
    let image = format!("oci:{}:postgres", env("OCI2UK_TEST_LAYOUT"));
    let t = Instant::now();
    assert_ok(&s.oci2uk(&["build", &image, "-o", "postgres.elf", "--quiet"]));
    let build = t.elapsed();
    let elf = s.path().join("work/postgres.elf");
    let vol = format!(
        "{}:/var/lib/postgresql/data",
        s.path().join("pgdata.img").display()
    );

    let _one = one_vm();
    // First run: a new volume, so the entrypoint makes the cluster.
    let port = free_port();
    let t = Instant::now();
    let mut vm = start(&elf, port, &vol, s.path().join("first"));
    wait_ready(&mut vm, port, BOOT_TIMEOUT);
    let first_ready = t.elapsed();
    psql(
        port,
        "create table kept (id int primary key, note text); \
         insert into kept values (1, 'written before ctrl-C')",
    )
    .unwrap_or_else(|e| panic!("psql: {e}; console:\n{}", vm.console()));
    // ctrl-C: the init sends the image's stop signal, SIGINT, postgres's fast shutdown.
    vm.signal("INT");
    let t_stop = Instant::now();
    let st = vm.wait(STOP_TIMEOUT);
    let first_stop = t_stop.elapsed();
    let first = vm.console();
    assert_eq!(st.code(), Some(0), "{st}; console:\n{first}");
    assert!(first.contains(INITDB), "console:\n{first}");
    assert!(
        first.contains("received fast shutdown request"),
        "console:\n{first}"
    );
    assert!(
        first.contains("database system is shut down"),
        "console:\n{first}"
    );
    assert!(first.contains("oci2uk: exit status 0"), "console:\n{first}");
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "{:?}",
        vm.live_qemus()
    );
    drop(vm);

    // Second run, same volume: the cluster is there, the row too; SIGTERM (a supervisor's
    // stop) goes through the same stop signal.
    let port = free_port();
    let t = Instant::now();
    let mut vm = start(&elf, port, &vol, s.path().join("second"));
    wait_ready(&mut vm, port, BOOT_TIMEOUT);
    let second_ready = t.elapsed();
    let row = psql(port, "select id, note from kept")
        .unwrap_or_else(|e| panic!("psql: {e}; console:\n{}", vm.console()));
    assert_eq!(row, "1|written before ctrl-C", "console:\n{}", vm.console());
    vm.signal("TERM");
    let st = vm.wait(STOP_TIMEOUT);
    let second = vm.console();
    assert_eq!(st.code(), Some(0), "{st}; console:\n{second}");
    assert!(!second.contains(INITDB), "initdb again; console:\n{second}");
    assert!(
        second.contains("holds a database; skipping initialization"),
        "console:\n{second}"
    );
    // A clean shutdown before means no crash recovery now.
    assert!(
        !second.contains("automatic recovery in progress"),
        "console:\n{second}"
    );
    assert!(
        second.contains("database system is shut down"),
        "console:\n{second}"
    );
    eprintln!(
        "postgres: build {build:.1?}; first run ready (initdb included) in {first_ready:.1?}, \
         stopped by SIGINT in {first_stop:.1?}; second run ready in {second_ready:.1?}; \
         total {:.1?}\nfirst run's shutdown:\n{}",
        started.elapsed(),
        shutdown_lines(&first)
    );
}
