//! QEMU: one description of the guest ([`Qemu`]) rendered two ways: as the argument vector
//! that `run` starts QEMU with ([`Qemu::args`]), and as the bundle's `qemu.sh`
//! ([`Qemu::script`]), which picks the accelerator and the machine when it runs by the same
//! rules ([`kvm_usable`], [`Machine::default_for`]) written in shell.

use std::fmt::Write as _;

use super::ports::PortForward;

/// The QEMU binary the launch files name.
pub const BINARY: &str = "qemu-system-x86_64";

/// The device node KVM is used through.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The CPU flags (`/proc/cpuinfo`) without one of which KVM cannot run guests: under nested
/// virtualisation that is switched off, /dev/kvm opens but guests never start.
pub const KVM_CPU_FLAGS: [&str; 2] = ["vmx", "svm"];

/// The TSC frequency the bundle's script tells a microvm guest under emulation, in kHz. It
/// only has to be plausible: the guest needs some reference to boot at all.
pub const TSC_HINT_KHZ: u64 = 2_000_000;

/// The CPU model: every feature the accelerator offers (under KVM, the host's).
const CPU: &str = "max";

/// The network device's id, which the NIC names.
const NETDEV_ID: &str = "net0";

/// The monitor socket's character device id.
const MONITOR_ID: &str = "qmp";

/// A value inside QEMU's `key=value,...` options: a comma is written twice.
fn escape_option(value: &str) -> String {
    value.replace(',', ",,")
}

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// The host's KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// Both, in the order the script's rules name them.
    pub const ALL: [Accel; 2] = [Accel::Kvm, Accel::Tcg];

    /// QEMU's name for it (`-accel NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `microvm`: no PCI, no firmware; virtio over MMIO. The quickest boot.
    Microvm,
    /// `q35`: a PC with PCI; what the kernel can calibrate its clocks on under emulation.
    Q35,
}

impl Machine {
    /// Both.
    pub const ALL: [Machine; 2] = [Machine::Microvm, Machine::Q35];

    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        }
    }

    /// The machine a bundle boots with `accel` unless told otherwise: microvm with KVM, q35
    /// under emulation (where microvm gives the kernel nothing to measure its TSC against).
    pub fn default_for(accel: Accel) -> Machine {
        match accel {
            Accel::Kvm => Machine::Microvm,
            Accel::Tcg => Machine::Q35,
        }
    }

    /// The virtio network device on this machine: MMIO on microvm, PCI on q35.
    pub fn nic(self) -> &'static str {
        match self {
            Machine::Microvm => "virtio-net-device",
            Machine::Q35 => "virtio-net-pci",
        }
    }

    /// The virtio block device on this machine.
    pub fn disk(self) -> &'static str {
        match self {
            Machine::Microvm => "virtio-blk-device",
            Machine::Q35 => "virtio-blk-pci",
        }
    }

    /// The virtiofs device (vhost-user) on this machine.
    pub fn fs(self) -> &'static str {
        match self {
            Machine::Microvm => "vhost-user-fs-device",
            Machine::Q35 => "vhost-user-fs-pci",
        }
    }

    /// The `-machine` value: microvm needs its ISA serial port (the console) asked for, and
    /// its RTC when `rtc` (QEMU leaves it out under KVM otherwise, and the guest has no wall
    /// clock).
    fn arg(self, rtc: bool) -> String {
        match self {
            Machine::Microvm if rtc => "microvm,isa-serial=on,rtc=on".into(),
            Machine::Microvm => "microvm,isa-serial=on".into(),
            Machine::Q35 => "q35".into(),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// QEMU's stdout, and nothing else on it: no monitor there, no default devices, no user
    /// configuration (`run` reads the console for the status line).
    Stdio,
    /// The terminal, with QEMU's monitor behind Ctrl-A (`-nographic`).
    Terminal,
}

impl Console {
    fn args(self) -> &'static [&'static str] {
        match self {
            Console::Stdio => &[
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ],
            Console::Terminal => &["-nographic"],
        }
    }
}

/// A raw disk image attached as a virtio block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub file: String,
    /// The serial number the guest reads in `/sys/block/vdX/serial` (at most 20 bytes): how
    /// it finds the disk whatever order the devices are probed in.
    pub serial: String,
    /// Attached read-only: QEMU refuses the guest's writes.
    pub read_only: bool,
}

/// A host directory shared through virtiofs: the vhost-user socket its `virtiofsd` serves,
/// and the tag the guest mounts it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The daemon's socket.
    pub socket: String,
    /// The tag.
    pub tag: String,
}

/// The devices that carry volumes, beyond what [`Qemu`] describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    /// Disks, in order.
    pub disks: Vec<Disk>,
    /// Shared directories, in order.
    pub shares: Vec<Share>,
}

/// The id of the shared guest memory that virtiofs needs (its daemon maps the guest's RAM).
const SHARED_MEMORY_ID: &str = "mem";

/// A QEMU guest: what it boots, its size, its network and console.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The kernel file (`-kernel`): a baked file, or a vmlinux.
    pub kernel: String,
    /// The initramfs (`-initrd`), for a kernel that is not baked.
    pub initrd: Option<String>,
    /// Words for the kernel command line (`-append`; a baked file's own comes first).
    pub append: Option<String>,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host ports forwarded to the guest by QEMU's user networking.
    pub forwards: Vec<PortForward>,
    /// Where the console goes.
    pub console: Console,
    /// Whether microvm gets an RTC under KVM too.
    pub rtc: bool,
    /// The TSC frequency to tell a microvm guest under emulation, for a command line that
    /// does not carry one (a baked file carries the one measured at build time).
    pub tsc_khz: Option<u64>,
    /// A unix socket QEMU connects to at start and serves its machine protocol (QMP) on:
    /// how `run` presses the guest's power button.
    pub monitor: Option<String>,
}

impl Qemu {
    /// `kernel` with `memory_mib` and one vCPU, nothing forwarded, the console on the terminal.
    pub fn new(kernel: impl Into<String>, memory_mib: u64) -> Qemu {
        Qemu {
            kernel: kernel.into(),
            initrd: None,
            append: None,
            memory_mib,
            vcpus: 1,
            forwards: Vec::new(),
            console: Console::Terminal,
            rtc: false,
            tsc_khz: None,
            monitor: None,
        }
    }

    /// The `-netdev` value: user networking with the forwards.
    fn netdev(&self) -> String {
        let mut netdev = format!("user,id={NETDEV_ID}");
        for f in &self.forwards {
            let _ = write!(
                netdev,
                ",hostfwd={}:{}:{}-:{}",
                f.guest.proto.name(),
                f.host_ip.as_deref().unwrap_or(""),
                f.host,
                f.guest.port
            );
        }
        netdev
    }

    /// The word that tells the guest its TSC frequency, where the machine gives it no way to
    /// measure it.
    fn tsc_word(&self, machine: Machine, accel: Accel) -> Option<String> {
        match (machine, accel, self.tsc_khz) {
            (Machine::Microvm, Accel::Tcg, Some(khz)) => Some(format!("tsc_early_khz={khz}")),
            _ => None,
        }
    }

    /// The arguments (without the binary) for `machine` under `accel`.
    pub fn args(&self, machine: Machine, accel: Accel) -> Vec<String> {
        self.args_with(machine, accel, &Devices::default())
    }

    /// [`Qemu::args`] with volume devices: each disk as a raw drive on a virtio block device,
    /// each share as a vhost-user-fs device on its daemon's socket. With a share, the guest's
    /// memory is a shared memfd, which the daemon maps.
    pub fn args_with(&self, machine: Machine, accel: Accel, devices: &Devices) -> Vec<String> {
        let mut machine_arg = machine.arg(self.rtc);
        if !devices.shares.is_empty() {
            let _ = write!(machine_arg, ",memory-backend={SHARED_MEMORY_ID}");
        }
        let mut args: Vec<String> = vec![
            "-machine".into(),
            machine_arg,
            "-accel".into(),
            accel.name().into(),
            "-cpu".into(),
            CPU.into(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-kernel".into(),
            self.kernel.clone(),
        ];
        if let Some(initrd) = &self.initrd {
            args.extend(["-initrd".into(), initrd.clone()]);
        }
        let append = match (self.append.clone(), self.tsc_word(machine, accel)) {
            (Some(a), Some(t)) => Some(format!("{a} {t}")),
            (a, t) => a.or(t),
        };
        if let Some(append) = append {
            args.extend(["-append".into(), append]);
        }
        args.extend([
            "-netdev".into(),
            self.netdev(),
            "-device".into(),
            format!("{},netdev={NETDEV_ID}", machine.nic()),
        ]);
        if !devices.shares.is_empty() {
            // virtiofsd's vhost-user library serves modern virtio only, and microvm's MMIO
            // transports are legacy unless told otherwise (the kernel drives both).
            if machine == Machine::Microvm {
                args.extend(["-global".into(), "virtio-mmio.force-legacy=false".into()]);
            }
            args.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id={SHARED_MEMORY_ID},size={}M,share=on",
                    self.memory_mib
                ),
            ]);
        }
        for (i, d) in devices.disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            args.extend([
                "-drive".into(),
                format!(
                    "file={},if=none,id=disk{i},format=raw{ro}",
                    escape_option(&d.file)
                ),
                "-device".into(),
                format!(
                    "{},drive=disk{i},serial={}",
                    machine.disk(),
                    escape_option(&d.serial)
                ),
            ]);
        }
        for (i, s) in devices.shares.iter().enumerate() {
            args.extend([
                "-chardev".into(),
                format!("socket,id=share{i},path={}", escape_option(&s.socket)),
                "-device".into(),
                format!(
                    "{},chardev=share{i},tag={}",
                    machine.fs(),
                    escape_option(&s.tag)
                ),
            ]);
        }
        args.extend(self.console.args().iter().map(|a| a.to_string()));
        if let Some(path) = &self.monitor {
            // A client socket: the listener is up before QEMU starts, so there is no moment
            // when a stop request finds nothing to connect to.
            args.extend([
                "-chardev".into(),
                format!("socket,id={MONITOR_ID},path={}", escape_option(path)),
                "-mon".into(),
                format!("chardev={MONITOR_ID},mode=control"),
            ]);
        }
        args.push("-no-reboot".into());
        args
    }

    /// A POSIX shell script that boots the guest from its own directory: the accelerator and
    /// the machine are chosen when it runs (`OCI2UK_ACCEL`, `OCI2UK_MACHINE`, else KVM where
    /// [`kvm_usable`]'s test passes and [`Machine::default_for`]), the command line is read
    /// from `cmdline_file` (in place of [`Qemu::append`]), and further arguments go to QEMU.
    /// `name` names the guest in the comments. The file names must need no shell quoting.
    pub fn script(&self, name: &str, cmdline_file: &str) -> String {
        debug_assert!(self.append.is_none(), "the script reads {cmdline_file}");
        let mut described = String::new();
        for f in &self.forwards {
            let _ = writeln!(
                described,
                "#   {} {}:{} -> guest port {}",
                f.guest.proto.name(),
                f.host_ip.as_deref().unwrap_or("*"),
                f.host,
                f.guest.port
            );
        }
        if described.is_empty() {
            described.push_str("#   (none: the image exposes no port)\n");
        }
        let (kvm, tcg) = (Accel::Kvm.name(), Accel::Tcg.name());
        let kvm_flags = KVM_CPU_FLAGS.join("|");
        let (microvm, q35) = (Machine::Microvm, Machine::Q35);
        let machine_choice = |accel: Accel| Machine::default_for(accel).name();
        // Only microvm under emulation needs the word, so it goes in microvm's arm.
        let tsc = match self.tsc_word(microvm, Accel::Tcg) {
            Some(word) => format!(
                "    # Emulated, microvm gives Linux no way to measure the TSC's frequency: say it.\n    \
                 if [ \"$accel\" = {tcg} ]; then append=\"$append {word}\"; fi\n"
            ),
            None => String::new(),
        };
        let initrd = match &self.initrd {
            Some(i) => format!(" -initrd {i}"),
            None => String::new(),
        };
        let console = self.console.args().join(" ");
        format!(
            r#"#!/bin/sh
# Boots {name} on QEMU: {kernel} with {initrd_name} and the command line in {cmdline_file},
# {mem} MiB, the serial console on this terminal (Ctrl-A X quits). Host ports forwarded:
{described}# KVM when this machine can run guests with it, software emulation otherwise; the
# {mkvm} machine with KVM, {mtcg} otherwise. OCI2UK_ACCEL={kvm}|{tcg} and OCI2UK_MACHINE={m1}|{m2}
# choose. Further arguments go to QEMU; a disk for a `blk` mount of the configuration, for
# instance, is attached with
#   -drive file=data.img,if=none,id=disk0,format=raw -device {m1_disk},drive=disk0,serial=data
# ({m2_disk} on {m2}) and mounted at /data by the kernel parameter oci2uk.config= (base64url of
# {{"mount":{{"/data":{{"source":"blk","path":"/dev/disk/by-id/virtio-data","fstype":"ext4"}}}}}}),
# appended to {cmdline_file}.
set -eu
cd "$(dirname "$0")"
accel=${{OCI2UK_ACCEL:-}}
if [ -z "$accel" ]; then
    # {KVM_DEVICE} opens on machines that do not expose virtualisation to this one (nested
    # virtualisation off), and guests then never start: require {flags} as well.
    if [ -w {KVM_DEVICE} ] && grep -qwE '{kvm_flags}' /proc/cpuinfo; then accel={kvm}; else accel={tcg}; fi
fi
machine=${{OCI2UK_MACHINE:-}}
if [ -z "$machine" ]; then
    if [ "$accel" = {kvm} ]; then machine={mkvm}; else machine={mtcg}; fi
fi
append=$(cat {cmdline_file})
case "$machine" in
{m1})
    machine={microvm_arg}
    net={microvm_nic}
{tsc}    ;;
*)
    net={q35_nic}
    ;;
esac
exec {BINARY} \
    -machine "$machine" -accel "$accel" -cpu {CPU} -smp {vcpus} -m {mem} \
    -kernel {kernel}{initrd} -append "$append" \
    -netdev {netdev} \
    -device "$net,netdev={NETDEV_ID}" \
    {console} -no-reboot "$@"
"#,
            kernel = self.kernel,
            initrd_name = self.initrd.as_deref().unwrap_or("no initramfs"),
            mem = self.memory_mib,
            vcpus = self.vcpus,
            mkvm = machine_choice(Accel::Kvm),
            mtcg = machine_choice(Accel::Tcg),
            m1 = microvm.name(),
            m2 = q35.name(),
            flags = KVM_CPU_FLAGS.join(" or "),
            microvm_arg = microvm.arg(self.rtc),
            microvm_nic = microvm.nic(),
            m1_disk = microvm.disk(),
            m2_disk = q35.disk(),
            q35_nic = q35.nic(),
            netdev = self.netdev(),
        )
    }
}

/// Whether KVM can run guests here: the CPU must offer one of [`KVM_CPU_FLAGS`] and
/// [`KVM_DEVICE`] must open for reading and writing. The bundle's script tests the same.
pub fn kvm_usable() -> Result<(), String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| KVM_CPU_FLAGS.contains(&f)));
    if !has_flag {
        return Err("the CPU shows neither vmx nor svm, so KVM cannot run guests here".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .map(|_| ())
        .map_err(|e| format!("{KVM_DEVICE} cannot be opened: {e}"))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use super::*;

    fn guest() -> Qemu {
        Qemu {
            kernel: "vmlinux".into(),
            initrd: Some("initrd".into()),
            append: None,
            memory_mib: 288,
            vcpus: 2,
            forwards: vec![
                "127.0.0.1:8080:80".parse().unwrap(),
                "127.0.0.1:8053:53/udp".parse().unwrap(),
            ],
            console: Console::Terminal,
            rtc: false,
            tsc_khz: Some(TSC_HINT_KHZ),
            monitor: None,
        }
    }

    /// The script and the argument vector are one model: run with a stand-in QEMU that prints
    /// its arguments, the script passes exactly what [`Qemu::args`] gives for the machine and
    /// accelerator it was told to use, for every pair.
    #[test]
    fn the_script_passes_what_args_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let q = guest();
        let cmdline = "console=ttyS0 quiet";
        fs::write(tmp.path().join("cmdline"), format!("{cmdline}\n")).unwrap();
        let script = tmp.path().join("qemu.sh");
        fs::write(&script, q.script("web", "cmdline")).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let fake = bin.join(BINARY);
        fs::write(
            &fake,
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n",
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let with_append = Qemu {
            append: Some(cmdline.into()),
            ..q.clone()
        };
        for machine in Machine::ALL {
            for accel in Accel::ALL {
                let out = Command::new(&script)
                    .env("PATH", &path)
                    .env("OCI2UK_ACCEL", accel.name())
                    .env("OCI2UK_MACHINE", machine.name())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{machine:?} {accel:?}: {out:?}");
                let got: Vec<String> = String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect();
                assert_eq!(
                    got,
                    with_append.args(machine, accel),
                    "{machine:?} {accel:?}"
                );
            }
        }
    }

    #[test]
    fn run_style_arguments() {
        let q = Qemu {
            kernel: "nginx.elf".into(),
            initrd: None,
            append: None,
            memory_mib: 320,
            vcpus: 1,
            forwards: vec!["8080:80".parse().unwrap()],
            console: Console::Stdio,
            rtc: true,
            tsc_khz: None,
            monitor: None,
        };
        let args = q.args(Machine::Microvm, Accel::Tcg).join(" ");
        assert_eq!(
            args,
            "-machine microvm,isa-serial=on,rtc=on -accel tcg -cpu max -smp 1 -m 320 \
             -kernel nginx.elf -netdev user,id=net0,hostfwd=tcp::8080-:80 \
             -device virtio-net-device,netdev=net0 -nodefaults -no-user-config -display none \
             -serial stdio -no-reboot"
        );
        let q = Qemu {
            monitor: Some("/tmp/a,b/qmp.sock".into()),
            ..q
        };
        let args = q.args(Machine::Microvm, Accel::Tcg).join(" ");
        assert!(
            args.ends_with(
                "-serial stdio -chardev socket,id=qmp,path=/tmp/a,,b/qmp.sock \
                 -mon chardev=qmp,mode=control -no-reboot"
            ),
            "{args}"
        );
    }
}
