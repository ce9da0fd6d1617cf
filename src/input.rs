//! What a command's argument names: a file on this machine, or an image (a reference or a
//! transport). Every command that takes either (`run`, `inspect`, `--kernel`) decides the same
//! way, here.

use std::path::{Path, PathBuf};

use crate::reference::{ReferenceError, Source};

/// A file or an image, as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file on this machine.
    File(PathBuf),
    /// An image: a registry reference or a transport.
    Image(Source),
}

impl Input {
    /// Reads `s`: `docker://REF` is an image; an existing file, or a name that starts with `/`
    /// or `.`, is a file (a missing one is then reported as a file that cannot be read);
    /// anything else is an image.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if !s.starts_with("docker://")
            && (Path::new(s).is_file() || s.starts_with('/') || s.starts_with('.'))
        {
            return Ok(Self::File(PathBuf::from(s)));
        }
        s.parse().map(Self::Image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nginx");
        std::fs::write(&file, b"x").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(Input::parse(file).unwrap(), Input::File(file.into()));
        assert_eq!(
            Input::parse("./missing.elf").unwrap(),
            Input::File("./missing.elf".into())
        );
        assert_eq!(
            Input::parse("/nonexistent/vmlinuz").unwrap(),
            Input::File("/nonexistent/vmlinuz".into())
        );
        for image in ["nginx", "127.0.0.1:5000/k:1", "docker:///x", "oci:dir:tag"] {
            if let Ok(i) = Input::parse(image) {
                assert!(matches!(i, Input::Image(_)), "{image}");
            }
        }
        assert!(matches!(
            Input::parse("docker://127.0.0.1:5000/k:1").unwrap(),
            Input::Image(Source::Registry(_))
        ));
    }
}
