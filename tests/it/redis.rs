//! A real in-memory database at the memory `run` gives by default: the fixture redis (Debian's
//! redis-server, configured like the official image) boots without `-m`, takes 200,000 values
//! of 200 bytes from the host's `redis-cli --pipe` over the forwarded port and still answers;
//! or, should they not fit, the guest says it ran out of memory and `run` fails, never hangs.
//! SIGTERM to `run` then stops redis cleanly.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{wait_until, Guest};
use crate::util::*;

/// How long a boot may take until redis answers (TCG on a busy machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// How long the load may take: 200,000 SETs, about 48 MB of protocol through QEMU's user-mode
/// network, into a guest under TCG.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long one `redis-cli` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `run` may take to end once it was asked to, or once redis was killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How many keys the load writes, and each value's size.
const KEYS: usize = 200_000;
const VALUE_BYTES: usize = 200;

/// What `run` gives without `-m`: the recorded need plus this, at least [`MEMORY_FLOOR_MIB`].
const MEMORY_ROOM_MIB: u64 = 256;
const MEMORY_FLOOR_MIB: u64 = 512;

/// What the guest's init prints when the kernel's OOM killer acted.
const OOM: &str = "oci2uk: out of memory:";

/// Key `i`.
fn key(i: usize) -> String {
    format!("key:{i:06}")
}

/// Key `i`'s value: [`VALUE_BYTES`] bytes that name `i`, so a GET shows which key it read.
fn value(i: usize) -> String {
    let unit = format!("value-{i:06}.");
    unit.repeat(VALUE_BYTES / unit.len() + 1)[..VALUE_BYTES].to_string()
}

/// Writes the SETs of every key as Redis protocol (RESP) to `path`, for `redis-cli --pipe`.
fn write_load(path: &Path) {
    let mut w = BufWriter::new(File::create(path).unwrap());
    for i in 0..KEYS {
        let (k, v) = (key(i), value(i));
        write!(
            w,
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        )
        .unwrap();
    }
    w.flush().unwrap();
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS...`, its stdin from `stdin` (or nothing), ended after
/// `timeout` (redis-cli has no timeout of its own for a server that accepts and never answers):
/// its stdout, or why it failed. Its output goes through files in `dir`, so that a large one
/// cannot block it while it is waited for.
fn cli(
    dir: &Path,
    port: u16,
    args: &[&str],
    stdin: Option<&Path>,
    timeout: Duration,
) -> Result<String, String> {
    let (out, err) = (dir.join("redis-cli.out"), dir.join("redis-cli.err"));
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(stdin.map_or_else(Stdio::null, |p| File::open(p).unwrap().into()))
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("run redis-cli (apt-get install redis-tools)");
    let mut status = None;
    wait_until(timeout, Duration::from_millis(50), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    match status {
        Some(st) if st.success() => Ok(read(&out).trim().to_string()),
        Some(st) => Err(format!("{st}: {}{}", read(&err), read(&out))
            .trim()
            .to_string()),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("redis-cli {args:?}: no answer after {timeout:?}"))
        }
    }
}

/// Waits until redis answers PING on `port`; panics with the console and redis-cli's last
/// error when the guest ends first or `timeout` passes.
fn wait_ready(vm: &mut Guest, dir: &Path, port: u16, timeout: Duration) {
    vm.wait_answering("redis", timeout, || {
        match cli(dir, port, &["ping"], None, COMMAND_TIMEOUT) {
            Ok(out) if out == "PONG" => Ok(()),
            Ok(out) | Err(out) => Err(format!("redis-cli: {out}")),
        }
    });
}

/// The memory `run` said it gave the guest and the need the file records, from its line
/// `oci2uk: guest memory N MiB (the file needs M MiB, plus room to work; -m to change)`.
fn memory_line(console: &str) -> (u64, u64) {
    let line = console
        .lines()
        .find(|l| l.starts_with("oci2uk: guest memory "))
        .unwrap_or_else(|| panic!("run named no guest memory; console:\n{console}"));
    let number_after = |prefix: &str| -> u64 {
        let at = line
            .find(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} in {line:?}"))
            + prefix.len();
        line[at..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {prefix:?} in {line:?}"))
    };
    assert!(
        line.ends_with("plus room to work; -m to change)"),
        "not the default memory: {line:?}"
    );
    (
        number_after("oci2uk: guest memory "),
        number_after("the file needs "),
    )
}

/// A field of `INFO memory`.
fn info_field<'a>(info: &'a str, name: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in INFO memory:\n{info}"))
}

#[test]
fn redis_holds_200k_values_at_the_default_memory() {
    let started = Instant::now();
    let s = Scratch::new();
    let image = format!("oci:{}:redis", env("OCI2UK_TEST_LAYOUT"));
    let t = Instant::now();
    assert_ok(&s.oci2uk(&["build", &image, "-o", "redis.elf", "--quiet"]));
    let build = t.elapsed();
    let elf = s.path().join("work/redis.elf");
    let load = s.path().join("load.resp");
    write_load(&load);
    let dir = s.path();

    let _one = one_vm();
    let port = free_port();
    let t = Instant::now();
    // No -m: the default memory is what this test is about.
    let mut vm = Guest::run(
        &elf,
        &["-p", &format!("127.0.0.1:{port}:6379")],
        s.path().join("console"),
    );
    wait_ready(&mut vm, dir, port, BOOT_TIMEOUT);
    let ready = t.elapsed();
    let (given, needs) = memory_line(&vm.console());
    assert_eq!(
        given,
        (needs + MEMORY_ROOM_MIB).max(MEMORY_FLOOR_MIB),
        "console:\n{}",
        vm.console()
    );
    // The image's redis.conf took effect: no snapshots that would take memory.
    let save = cli(dir, port, &["config", "get", "save"], None, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", vm.console()));
    assert_eq!(save, "save", "console:\n{}", vm.console());

    let t = Instant::now();
    let loaded = cli(dir, port, &["--pipe"], Some(&load), LOAD_TIMEOUT);
    let load_time = t.elapsed();
    let want = format!("errors: 0, replies: {KEYS}");
    match &loaded {
        Ok(out) if out.contains(&want) => {}
        _ => {
            // Did not fit: the guest must say so and `run` must fail, within a bound.
            let st = vm.wait(STOP_TIMEOUT);
            let console = vm.console();
            assert!(
                console.contains(OOM),
                "the load failed ({loaded:?}) but the console names no out-of-memory; \
                 {st}; console:\n{console}"
            );
            assert_ne!(st.code(), Some(0), "console:\n{console}");
            assert!(
                vm.qemus_gone(Duration::from_secs(5)),
                "{:?}",
                vm.live_qemus()
            );
            let oom = console.lines().find(|l| l.contains(OOM)).unwrap();
            eprintln!(
                "redis: OUT OF MEMORY at the default {given} MiB (the file needs {needs} MiB) \
                 after {load_time:.1?} of loading; run ended {st}; the console said:\n{oom}"
            );
            return;
        }
    }

    let cmd = |args: &[&str]| {
        cli(dir, port, args, None, COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}; console:\n{}", vm.console()))
    };
    assert_eq!(cmd(&["dbsize"]), KEYS.to_string());
    let i = 123_456;
    assert_eq!(cmd(&["get", &key(i)]), value(i));
    assert_eq!(cmd(&["get", &key(KEYS - 1)]), value(KEYS - 1));
    assert_eq!(cmd(&["ping"]), "PONG");
    let info = cmd(&["info", "memory"]);
    let used = info_field(&info, "used_memory_human").to_string();
    let rss = info_field(&info, "used_memory_rss_human").to_string();
    assert!(vm.poll().is_none(), "console:\n{}", vm.console());
    assert!(!vm.console().contains(OOM), "console:\n{}", vm.console());

    // A supervisor's stop: the image's stop signal, SIGTERM, which redis answers by shutting
    // down cleanly.
    vm.signal("TERM");
    let t = Instant::now();
    let st = vm.wait(STOP_TIMEOUT);
    let stop = t.elapsed();
    let console = vm.console();
    assert_eq!(st.code(), Some(0), "{st}; console:\n{console}");
    assert!(
        console.contains("Received SIGTERM scheduling shutdown"),
        "console:\n{console}"
    );
    assert!(
        console.contains("Redis is now ready to exit"),
        "console:\n{console}"
    );
    assert!(
        console.contains("oci2uk: exit status 0"),
        "console:\n{console}"
    );
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "{:?}",
        vm.live_qemus()
    );
    eprintln!(
        "redis: build {build:.1?}; guest memory {given} MiB (the file needs {needs} MiB); \
         ready in {ready:.1?}; {KEYS} values of {VALUE_BYTES} bytes loaded in {load_time:.1?}; \
         used_memory_human {used}, used_memory_rss_human {rss}; stopped by SIGTERM in \
         {stop:.1?}; total {:.1?}",
        started.elapsed()
    );
}
