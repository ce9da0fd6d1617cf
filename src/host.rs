//! Probes of the machine oci2uk runs on, for what a build bakes in: the TSC frequency.

/// Why a host probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `$OCI2UK_TSC_KHZ` is not a frequency.
    #[error(
        "invalid OCI2UK_TSC_KHZ {0:?}: expected the TSC frequency in kHz (100000 to 100000000)"
    )]
    TscKhz(String),
}

/// The variable that sets the baked TSC frequency, in kHz.
pub const TSC_KHZ_ENV: &str = "OCI2UK_TSC_KHZ";

/// The TSC frequency to bake, in kHz. A guest without a reference timer to calibrate its TSC
/// against (QEMU's microvm under TCG has neither PIT speaker gate, HPET nor ACPI PM timer)
/// hangs at boot without it; where the hypervisor offers a paravirtual clock (KVM), that
/// clock is the guest's clocksource and this value only seeds delay loops. The value is part
/// of the output's bytes, so it comes from the steadiest source there is: `$OCI2UK_TSC_KHZ`,
/// else the kernel's own measure (`tsc_freq_khz` in sysfs, where the kernel exports it), else
/// the nominal frequency in the CPU's model name (`... @ 2.40GHz`), else `cpu MHz` rounded to
/// whole MHz (it moves with frequency scaling), else 2 GHz.
pub fn tsc_khz() -> Result<u64, HostError> {
    let env = std::env::var(TSC_KHZ_ENV).ok();
    let sysfs = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
    tsc_khz_from(env.as_deref(), sysfs.as_deref(), cpuinfo.as_deref())
}

/// Plausible TSC frequencies, in kHz (100 MHz to 100 GHz).
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u64> = 100_000..=100_000_000;

fn tsc_khz_from(
    env: Option<&str>,
    sysfs: Option<&str>,
    cpuinfo: Option<&str>,
) -> Result<u64, HostError> {
    if let Some(v) = env.map(str::trim).filter(|v| !v.is_empty()) {
        return v
            .parse::<u64>()
            .ok()
            .filter(|k| TSC_KHZ_RANGE.contains(k))
            .ok_or_else(|| HostError::TscKhz(v.to_string()));
    }
    let plausible = |k: &u64| TSC_KHZ_RANGE.contains(k);
    if let Some(k) = sysfs
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(plausible)
    {
        return Ok(k);
    }
    let field = |name: &str| {
        cpuinfo?
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let nominal = field("model name").and_then(|m| {
        let (_, f) = m.rsplit_once('@')?;
        let f = f.trim();
        let (num, scale) = match f.strip_suffix("GHz") {
            Some(n) => (n, 1_000_000.0),
            None => (f.strip_suffix("MHz")?, 1_000.0),
        };
        let v: f64 = num.trim().parse().ok()?;
        Some((v * scale).round() as u64)
    });
    if let Some(k) = nominal.filter(plausible) {
        return Ok(k);
    }
    let current = field("cpu MHz")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|mhz| mhz.round() as u64 * 1000);
    Ok(current.filter(plausible).unwrap_or(2_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_sources() {
        let epyc = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.424\n";
        let xeon =
            "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\ncpu MHz\t\t: 1197.621\n";
        assert_eq!(tsc_khz_from(None, None, Some(epyc)).unwrap(), 2_445_000);
        assert_eq!(tsc_khz_from(None, None, Some(xeon)).unwrap(), 2_400_000);
        assert_eq!(
            tsc_khz_from(None, Some("2593906\n"), Some(xeon)).unwrap(),
            2_593_906
        );
        assert_eq!(
            tsc_khz_from(Some(" 3000000 "), Some("2593906"), Some(xeon)).unwrap(),
            3_000_000
        );
        assert_eq!(tsc_khz_from(None, Some("0"), None).unwrap(), 2_000_000);
        assert_eq!(tsc_khz_from(Some(""), None, None).unwrap(), 2_000_000);
        assert!(matches!(
            tsc_khz_from(Some("2.4GHz"), None, None),
            Err(HostError::TscKhz(_))
        ));
        assert!(tsc_khz_from(Some("5"), None, None).is_err());
        // Frequency scaling moves the fraction, not the rounded MHz.
        let wobble = "model name\t: AMD EPYC\ncpu MHz\t\t: 2444.9\n";
        assert_eq!(tsc_khz_from(None, None, Some(wobble)).unwrap(), 2_445_000);
    }
}
