//! Real Xen guests: bundles booted by Xen 4.17 in the test host that `testxen/up.sh DIR`
//! starts (Xen and a Debian dom0 under QEMU with software emulation). `OCI2UK_XEN_DIR` names
//! DIR; without a running host these tests fail. DIR is `/share` in dom0: the bundles are
//! written under it and the dom0 commands run as its jobs (`testxen/job.sh`'s protocol:
//! `jobs/NAME.sh`, then `jobs/NAME.out` and `jobs/NAME.rc`), one at a time; the guests'
//! consoles are `console/guest-DOMAIN.log`. dom0 has the bridge `xenbr0` (10.0.0.1/24) with a
//! DHCP server on it.
//!
//! Each test boots one guest and checks all it can on it, holding the lock the QEMU tests
//! hold, so that one guest runs at a time on the two emulated CPUs:
//! - nginx as a PVH guest from `xen-pvh.cfg` as written, `xl create` started in `/`: DHCP,
//!   HTTP 200 to dom0, `xl shutdown` ends it with status 0;
//! - nginx built with `--net`, as a PV guest through `xen.sh` after the bundle was moved:
//!   HTTP 200 at its address, `xl shutdown` ends it with status 0;
//! - busybox whose application prints a variable and exits 7, through `xen.sh --pvh -e`:
//!   the Xenstore key changes the variable baked in, status 7, the domain goes.
//!
//! `OCI2UK_XEN_PREFIX` (default `it-`) starts every job, domain and directory name, so that
//! runs sharing a host do not meet.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::*;

/// What dom0 calls the host's directory.
const SHARE: &str = "/share";

/// How long a job may wait for the ones before it and run.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// Boot to the first HTTP answer: PVH under nested emulation is the slow one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(360);

/// The running test host.
struct Host {
    dir: PathBuf,
    /// This run's names start with it.
    prefix: String,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::var("OCI2UK_XEN_DIR").unwrap_or_else(|_| {
            panic!(
                "OCI2UK_XEN_DIR is not set: start the Xen test host with \
                 `testxen/up.sh DIR` and set OCI2UK_XEN_DIR=DIR"
            )
        });
        let dir = fs::canonicalize(&dir)
            .unwrap_or_else(|e| panic!("OCI2UK_XEN_DIR={dir}: {e}; run testxen/up.sh {dir}"));
        let host = Host {
            prefix: format!(
                "{}{}",
                std::env::var("OCI2UK_XEN_PREFIX").unwrap_or_else(|_| "it-".into()),
                std::process::id()
            ),
            dir,
        };
        assert!(
            host.dir.join("ready").exists(),
            "the Xen test host in {} is not ready (no `ready`): run testxen/up.sh",
            host.dir.display()
        );
        assert!(
            host.alive(),
            "the Xen test host in {} is not running",
            host.dir.display()
        );
        fs::create_dir_all(host.run_dir()).unwrap();
        host
    })
}

/// A job's output and whether it exited 0.
struct JobOut {
    ok: bool,
    rc: i32,
    out: String,
}

/// A dom0 job's status for "the domain is gone".
const GONE: i32 = 3;

impl Host {
    fn alive(&self) -> bool {
        fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    /// This run's directory on the share.
    fn run_dir(&self) -> PathBuf {
        self.dir.join(&self.prefix)
    }

    /// A host path under the share as dom0 names it.
    fn in_dom0(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.dir).expect("a path on the share");
        format!("{SHARE}/{}", rel.display())
    }

    /// A domain name of this run.
    fn domain(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// Runs `script` with bash in dom0 (from `/share`) and waits for it, as `testxen/job.sh`
    /// does. The job's files stay: dom0 lists the jobs before it runs them, and would run a
    /// removed one again.
    fn job(&self, label: &str, script: &str) -> JobOut {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}-{:03}-{label}",
            self.prefix,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let jobs = self.dir.join("jobs");
        let file = |ext: &str| jobs.join(format!("{name}.{ext}"));
        let tmp = jobs.join(format!(".{name}.sh"));
        fs::write(&tmp, script).unwrap();
        fs::rename(&tmp, file("sh")).unwrap();
        let start = Instant::now();
        while !file("rc").exists() {
            assert!(
                self.alive(),
                "the Xen test host stopped during job {name}; its console:\n{}",
                tail(&self.dir.join("serial.log"), 40)
            );
            assert!(
                start.elapsed() < JOB_TIMEOUT,
                "job {name} not done after {JOB_TIMEOUT:?}:\n{script}\noutput:\n{}",
                fs::read_to_string(file("out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let rc = fs::read_to_string(file("rc")).unwrap();
        let out = fs::read_to_string(file("out")).unwrap_or_default();
        let rc = rc.trim().parse().unwrap_or(-1);
        JobOut {
            ok: rc == 0,
            rc,
            out,
        }
    }

    /// Runs `script`, which must succeed; its output.
    fn run(&self, label: &str, script: &str) -> String {
        let r = self.job(label, script);
        assert!(
            r.ok,
            "dom0 job {label} failed:\n{script}\noutput:\n{}",
            r.out
        );
        r.out
    }

    /// The guest's console so far.
    fn console(&self, domain: &str) -> String {
        let bytes =
            fs::read(self.dir.join(format!("console/guest-{domain}.log"))).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A guest this test started: destroyed when the test ends, however it ends.
struct Domain {
    name: String,
}

impl Domain {
    fn console(&self) -> String {
        host().console(&self.name)
    }

    /// Panics with the console and `what`.
    fn fail(&self, what: &str) -> ! {
        panic!("{}: {what}; console:\n{}", self.name, self.console())
    }

    /// Waits until the console holds `text`.
    fn wait_console(&self, text: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.console().contains(text) {
            if start.elapsed() > timeout {
                self.fail(&format!("no {text:?} after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether xl still lists the domain.
    fn listed(&self) -> bool {
        host()
            .job("list", &format!("xl list {} >/dev/null 2>&1", self.name))
            .ok
    }

    /// Waits until the domain is gone.
    fn wait_gone(&self, timeout: Duration) {
        let start = Instant::now();
        while self.listed() {
            if start.elapsed() > timeout {
                self.fail(&format!("the domain is still there after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// GETs `/` from dom0 at the guest's address (`None`: the DHCP lease of its interface)
    /// until it answers 200; the page.
    fn wait_page(&self, addr: Option<&str>) -> String {
        let find = match addr {
            Some(a) => format!("addr={a}"),
            None => format!(
                // dom0's udhcpd writes its leases file every second (`auto_time 1`); a
                // SIGUSR1 instead would restart the ARP probe it makes before an offer.
                "mac=$(xl network-list {name} | awk 'NR == 2 {{ print $3 }}')\n\
                 addr=$(dumpleases -f /var/lib/misc/udhcpd.leases | \
                 awk -v m=\"$mac\" 'tolower($1) == tolower(m) {{ print $2 }}' | head -1)\n\
                 [ -n \"$addr\" ] || {{ echo \"no lease for $mac\"; exit 1; }}",
                name = self.name
            ),
        };
        // busybox's static `wget -T` crashes; `timeout` bounds it.
        let script = format!(
            "xl list {name} >/dev/null 2>&1 || {{ echo gone; exit {GONE}; }}\n\
             {find}\necho \"address $addr\"\ntimeout 10 wget -q -O- \"http://$addr/\"\n",
            name = self.name
        );
        let start = Instant::now();
        loop {
            let r = host().job("get", &script);
            if r.ok {
                return r.out;
            }
            if r.rc == GONE {
                self.fail("the domain ended before it served a page");
            }
            if start.elapsed() > BOOT_TIMEOUT {
                self.fail(&format!(
                    "no page after {BOOT_TIMEOUT:?}; last try:\n{}",
                    r.out
                ));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// `xl shutdown`, then the application's end with status 0 and the domain gone.
    fn shutdown_cleanly(&self) {
        host().run("shutdown", &format!("xl shutdown {}", self.name));
        self.wait_console("oci2uk: exit status 0", Duration::from_secs(120));
        self.wait_gone(Duration::from_secs(60));
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = host().job(
            "destroy",
            &format!("xl destroy {} >/dev/null 2>&1 || true", self.name),
        );
    }
}

/// Builds `image` (a fixture of the OCI layout) into a bundle on the share, named `name`,
/// with `args`.
fn bundle(s: &Scratch, image: &str, name: &str, args: &[&str]) -> PathBuf {
    let out = host().run_dir().join(format!("{name}.bundle"));
    let image = format!("oci:{}:{image}", env("OCI2UK_TEST_LAYOUT"));
    let mut all = vec![
        "build",
        &image,
        "--format",
        "bundle",
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ];
    all.extend_from_slice(args);
    assert_ok(&s.oci2uk(&all));
    out
}

/// The nginx bundles, built once: DHCP, and `--net` at the address returned.
fn nginx_bundles() -> &'static (PathBuf, PathBuf, String) {
    static B: OnceLock<(PathBuf, PathBuf, String)> = OnceLock::new();
    B.get_or_init(|| {
        let s = Scratch::new();
        let dhcp = bundle(&s, "nginx", "nginx-dhcp", &[]);
        // Outside the DHCP pool (.100-.200), and apart from other runs on a shared host.
        let addr = format!("10.0.0.{}", 20 + std::process::id() % 60);
        let net = format!("{addr}/24,10.0.0.1");
        let fixed = bundle(&s, "nginx", "nginx-net", &["--net", &net]);
        (dhcp, fixed, addr)
    })
}

/// The baked file in a bundle.
fn elf_in(bundle: &Path) -> PathBuf {
    fs::read_dir(bundle)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "elf"))
        .expect("a baked file in the bundle")
}

fn assert_nginx_page(page: &str, dom: &Domain) {
    assert!(
        page.to_ascii_lowercase().contains("nginx"),
        "{}: not nginx's page:\n{page}\nconsole:\n{}",
        dom.name,
        dom.console()
    );
}

/// nginx from the bundle's `cfg` as written, with `xl` started from `/`: served over DHCP,
/// then stopped by `xl shutdown`.
fn serve_from_cfg_started_elsewhere(cfg: &str, what: &str) {
    let h = host();
    let (dhcp, _, _) = nginx_bundles();
    let cfg = dhcp.join(cfg);
    let text = fs::read_to_string(&cfg).unwrap();
    // The file names the baked file by the path the bundle was written to.
    let kernel = format!("kernel = \"{}\"", elf_in(dhcp).display());
    assert!(text.contains(&kernel), "{kernel} in:\n{text}");
    let _one = one_vm();
    let dom = Domain {
        name: h.domain(what),
    };
    // dom0 sees the host's directory at /share: the same directory at the same path, as a
    // network file system mounted alike on both would be, lets the file be used unchanged.
    let real = h.dir.display();
    h.run(
        "create",
        &format!(
            "mkdir -p \"$(dirname {real})\" && {{ [ -e {real} ] || ln -s {SHARE} {real}; }}\n\
             cd / && xl create {cfg} 'name=\"{name}\"'",
            cfg = cfg.display(),
            name = dom.name,
        ),
    );
    let page = dom.wait_page(None);
    assert_nginx_page(&page, &dom);
    dom.shutdown_cleanly();
}

/// nginx built with `--net`, its bundle moved where its configurations do not point, started
/// by the launcher with `mode` (`--pv` or `--pvh`) from `/`: served at its static address.
fn serve_through_the_launcher_of_a_moved_bundle(mode: &str, what: &str) {
    let h = host();
    let (_, fixed, addr) = nginx_bundles();
    let _one = one_vm();
    let dom = Domain {
        name: h.domain(what),
    };
    // Moved where its configurations do not point: the launcher names its own directory.
    let moved = h.run_dir().join("moved/nginx");
    fs::create_dir_all(moved.parent().unwrap()).unwrap();
    let _ = fs::remove_dir_all(&moved);
    fs::rename(fixed, &moved).unwrap();
    let out = h.run(
        "launch",
        &format!(
            "cd / && {launcher} {mode} -n {name}",
            launcher = h.in_dom0(&moved.join("xen.sh")),
            name = dom.name
        ),
    );
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.trim().parse::<u32>().is_ok()),
        "xen.sh prints the domain's id:\n{out}"
    );
    fs::rename(&moved, fixed).unwrap();
    let page = dom.wait_page(Some(addr));
    assert_nginx_page(&page, &dom);
    dom.shutdown_cleanly();
}

#[test]
fn nginx_pvh_from_the_cfg_as_written_started_elsewhere_serves_over_dhcp_and_stops() {
    serve_from_cfg_started_elsewhere("xen-pvh.cfg", "nginx-pvh-dhcp");
}

#[test]
fn nginx_pv_from_the_cfg_as_written_started_elsewhere_serves_over_dhcp_and_stops() {
    serve_from_cfg_started_elsewhere("xen-pv.cfg", "nginx-pv-dhcp");
}

#[test]
fn nginx_pv_with_a_static_address_through_the_launcher_of_a_moved_bundle() {
    serve_through_the_launcher_of_a_moved_bundle("--pv", "nginx-pv-net");
}

#[test]
fn nginx_pvh_with_a_static_address_through_the_launcher_of_a_moved_bundle() {
    serve_through_the_launcher_of_a_moved_bundle("--pvh", "nginx-pvh-net");
}

#[test]
fn xenstore_environment_and_exit_status_through_the_launcher() {
    let h = host();
    let s = Scratch::new();
    let b = bundle(
        &s,
        "busybox",
        "exit7",
        &[
            "--env",
            "GREETING=baked",
            "--entrypoint",
            r#"["sh","-c","echo \"GREETING=[$GREETING] FROM_DOM0=[$FROM_DOM0]\"; exit 7"]"#,
        ],
    );
    let _one = one_vm();
    let dom = Domain {
        name: h.domain("exit7"),
    };
    // Quotes, a backslash and a dollar go through the launcher's JSON and Xenstore as they are.
    let greeting = r#"from "Xenstore" \ $HOME"#;
    h.run(
        "launch",
        &format!(
            "export FROM_DOM0=dom0-env\n\
             {launcher} --pvh --no-network -n {name} -e 'GREETING={greeting}' -e FROM_DOM0",
            launcher = h.in_dom0(&b.join("xen.sh")),
            name = dom.name,
        ),
    );
    dom.wait_console("oci2uk: exit status 7", BOOT_TIMEOUT);
    let want = format!("GREETING=[{greeting}] FROM_DOM0=[dom0-env]");
    assert!(
        dom.console().contains(&want),
        "{want:?} on the console:\n{}",
        dom.console()
    );
    dom.wait_gone(Duration::from_secs(60));
}
