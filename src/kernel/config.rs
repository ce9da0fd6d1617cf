//! A kernel's build configuration (`.config` text): what it enables, and in particular which
//! initramfs compressions it can unpack.

use std::collections::BTreeMap;

use super::decompress::Compression;

/// A parsed kernel configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Where it came from: a file path, or `IKCONFIG` for the copy built into the kernel.
    pub source: String,
    values: BTreeMap<String, String>,
}

impl KernelConfig {
    /// Parse `.config` text: `CONFIG_NAME=value` lines; comments (including
    /// `# CONFIG_NAME is not set`) and blank lines are skipped.
    pub fn parse(text: &str, source: impl Into<String>) -> Self {
        let values = text
            .lines()
            .filter_map(|line| line.trim().split_once('='))
            .filter(|(k, _)| k.starts_with("CONFIG_") && !k.contains(char::is_whitespace))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        KernelConfig {
            source: source.into(),
            values,
        }
    }

    /// The value of `name` (with or without its `CONFIG_` prefix): `y`, `m`, a number or a
    /// string without its quotes.
    pub fn get(&self, name: &str) -> Option<&str> {
        let key = if name.starts_with("CONFIG_") {
            name.to_string()
        } else {
            format!("CONFIG_{name}")
        };
        self.values.get(&key).map(String::as_str)
    }

    /// Whether `name` is built in (`=y`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.get(name) == Some("y")
    }

    /// Whether the kernel loads modules (`MODULES=y`); without, every driver is built in or
    /// absent, and there is no module tree to read or publish.
    pub fn has_modules(&self) -> bool {
        self.is_builtin("MODULES")
    }

    /// Whether the kernel can read a baked root image in place: `phram` maps the memory the
    /// bake put it in as an MTD device, and `mtdblock` (or its read-only twin) makes that a
    /// block device the init mounts. Both must be built in: the init loads no module for it.
    pub fn reads_root_in_place(&self) -> bool {
        self.is_builtin("MTD_PHRAM")
            && (self.is_builtin("MTD_BLOCK_RO") || self.is_builtin("MTD_BLOCK"))
    }

    /// The initramfs compressions the kernel can unpack (`CONFIG_RD_<NAME>=y`), in Kconfig order.
    pub fn initramfs_compressions(&self) -> Vec<Compression> {
        Compression::ALL
            .into_iter()
            .filter(|c| self.is_builtin(&format!("RD_{}", c.name().to_uppercase())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_codecs() {
        let c = KernelConfig::parse(
            "#\n# CONFIG_RD_BZIP2 is not set\nCONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n\
             CONFIG_RD_XZ=m\nCONFIG_LOCALVERSION=\"-cloud\"\nCONFIG_NR_CPUS=64\n",
            "test",
        );
        assert_eq!(c.get("LOCALVERSION"), Some("-cloud"));
        assert_eq!(c.get("CONFIG_NR_CPUS"), Some("64"));
        assert_eq!(c.get("RD_BZIP2"), None);
        assert_eq!(
            c.initramfs_compressions(),
            vec![Compression::Gzip, Compression::Zstd]
        );
    }
}
