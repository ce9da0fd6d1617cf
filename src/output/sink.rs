//! The output of a single-file build: a temporary file beside the destination, renamed into
//! place only when complete (or standard output), hashed as it is written.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::cache::Hasher;

/// Where the output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A file, replaced atomically.
    Path(PathBuf),
    /// Standard output (`-o -`).
    Stdout,
}

impl Destination {
    /// The destination as the user named it (`-` for standard output).
    pub fn display(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Stdout => "-".into(),
        }
    }
}

/// An output being written: a temporary file beside the destination (renamed into place by
/// [`Sink::finish`], removed if dropped) or standard output; hashes what passes through. A
/// file is written and hashed by threads of their own, so that producing the output, hashing
/// it and writing it overlap.
pub struct Sink {
    inner: SinkInner,
    /// Hashes standard output (a file is hashed by its writing thread).
    hasher: Hasher,
    size: u64,
}

enum SinkInner {
    File {
        file: FileWriter,
        dest: PathBuf,
    },
    Stdout(io::BufWriter<io::Stdout>),
    /// A destination that exists and is not a regular file (`/dev/null`, a FIFO, a terminal):
    /// written into as it is, since renaming a file over it would replace the device.
    Special(io::BufWriter<std::fs::File>),
}

/// Output chunk handed to the writing thread.
const SINK_CHUNK: usize = 256 << 10;
/// Chunks queued for the writing thread.
const SINK_QUEUE: usize = 4;

/// Writes a temporary file on a thread, and hashes it on another: chunks go to them through
/// bounded queues.
struct FileWriter {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<io::Result<(tempfile::NamedTempFile, Digest)>>>,
}

impl FileWriter {
    fn new(mut file: tempfile::NamedTempFile) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(SINK_QUEUE);
        // Writing and hashing each have a thread, the chunks going from one to the other, so
        // that the producer (flattening, the bake) is the only stage that takes its time.
        let thread = std::thread::spawn(move || {
            let (htx, hrx) = std::sync::mpsc::sync_channel::<Vec<u8>>(SINK_QUEUE);
            let hashing = std::thread::spawn(move || {
                let mut hasher = Hasher::sha256();
                for chunk in hrx {
                    hasher.update(&chunk);
                }
                hasher.finish()
            });
            let written = rx.into_iter().try_for_each(|chunk| {
                file.write_all(&chunk)?;
                htx.send(chunk)
                    .map_err(|_| io::Error::other("the hashing thread stopped"))
            });
            drop(htx);
            let digest = hashing.join().expect("the hashing thread does not panic");
            written.map(|()| (file, digest))
        });
        Self {
            buf: Vec::with_capacity(SINK_CHUNK),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// The writing thread's result: the file and its digest, or why it stopped.
    fn join(&mut self) -> io::Result<(tempfile::NamedTempFile, Digest)> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().expect("the writing thread does not panic"),
            None => Err(io::Error::other("the output was already closed")),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SINK_CHUNK));
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped on an error: that error is the answer.
            _ => Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the output was closed"))),
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(SINK_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SINK_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn finish(mut self) -> io::Result<(tempfile::NamedTempFile, Digest)> {
        self.send()?;
        self.join()
    }
}

impl Drop for FileWriter {
    /// An abandoned output: the thread ends and its temporary file is removed before this
    /// returns.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Sink {
    /// Opens an output at `dest`: a temporary file beside it, or standard output. A directory
    /// is refused; an existing device, FIFO or socket (`-o /dev/null`) is written into.
    pub fn open(dest: &Destination) -> io::Result<Self> {
        let inner = match dest {
            Destination::Stdout => SinkInner::Stdout(io::BufWriter::new(io::stdout())),
            Destination::Path(p) => {
                let meta = std::fs::metadata(p).ok();
                if meta.as_ref().is_some_and(|m| m.is_dir()) {
                    return Err(io::Error::new(
                        io::ErrorKind::IsADirectory,
                        "it is a directory; name a file",
                    ));
                }
                if meta.is_some_and(|m| !m.is_file()) {
                    let f = std::fs::OpenOptions::new().write(true).open(p)?;
                    return Ok(Self {
                        inner: SinkInner::Special(io::BufWriter::new(f)),
                        hasher: Hasher::sha256(),
                        size: 0,
                    });
                }
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let file = tempfile::Builder::new()
                    .prefix(".oci2uk-")
                    .tempfile_in(dir)?;
                SinkInner::File {
                    file: FileWriter::new(file),
                    dest: p.clone(),
                }
            }
        };
        Ok(Self {
            inner,
            hasher: Hasher::sha256(),
            size: 0,
        })
    }

    /// The file this output becomes, once finished (none for standard output).
    pub fn dest_path(&self) -> Option<PathBuf> {
        match &self.inner {
            SinkInner::File { dest, .. } => Some(dest.clone()),
            SinkInner::Stdout(_) | SinkInner::Special(_) => None,
        }
    }

    /// Finishes an output that is a copy of the file `src`, whose sha256 is known, made by the
    /// kernel (`copy_file_range`, or a reflink) rather than through memory and the hasher.
    /// Nothing may have been written to the output before.
    pub fn copy_from(self, src: &Path, digest: Digest) -> io::Result<(Digest, u64)> {
        debug_assert_eq!(self.size, 0, "a copy is the whole output");
        let mut from = std::fs::File::open(src)?;
        let size = match self.inner {
            SinkInner::Stdout(mut w) => {
                let n = io::copy(&mut from, &mut w)?;
                w.flush()?;
                n
            }
            SinkInner::Special(mut w) => {
                let n = io::copy(&mut from, &mut w)?;
                w.flush()?;
                n
            }
            SinkInner::File { file, dest } => {
                let (mut tmp, _) = file.finish()?;
                let n = io::copy(&mut from, tmp.as_file_mut())?;
                set_default_mode(tmp.as_file())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
                n
            }
        };
        Ok((digest, size))
    }

    /// Finishes the output: a file is renamed into place. Gives its digest and size.
    pub fn finish(self) -> io::Result<(Digest, u64)> {
        let digest = match self.inner {
            SinkInner::Stdout(mut w) => {
                w.flush()?;
                self.hasher.finish()
            }
            SinkInner::Special(mut w) => {
                w.flush()?;
                self.hasher.finish()
            }
            SinkInner::File { file, dest } => {
                let (tmp, digest) = file.finish()?;
                // No fsync: the rename makes the output appear whole or not at all to every
                // reader, and flushing tens of MiB to the disk would be most of a warm
                // rebuild. (ext4 and XFS also flush a file renamed over another before the
                // rename is committed.) As with `cp` and `skopeo copy`, durability against a
                // power cut is the system's business.
                // Outputs are ordinary files: 0644 less the umask, not the 0600 of a temp file.
                set_default_mode(tmp.as_file())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
                digest
            }
        };
        Ok((digest, self.size))
    }
}

/// Makes `f` an ordinary file: 0644 less the umask, not the 0600 of a temporary file.
pub fn set_default_mode(f: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            SinkInner::File { file, .. } => file.write(buf)?,
            SinkInner::Stdout(w) => {
                let n = w.write(buf)?;
                self.hasher.update(&buf[..n]);
                n
            }
            SinkInner::Special(w) => {
                let n = w.write(buf)?;
                self.hasher.update(&buf[..n]);
                n
            }
        };
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            // Chunks reach the file as they fill; finish() writes the rest.
            SinkInner::File { .. } => Ok(()),
            SinkInner::Stdout(w) => w.flush(),
            SinkInner::Special(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_or_fifo_is_written_into_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs (coreutils)");
        assert!(ok.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let mut s = Sink::open(&Destination::Path(fifo.clone())).unwrap();
        assert_eq!(s.dest_path(), None);
        s.write_all(b"through the pipe").unwrap();
        let (d, n) = s.finish().unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert_eq!(n, 16);
        let mut h = Hasher::sha256();
        h.update(b"through the pipe");
        assert_eq!(d, h.finish());
        let meta = std::fs::metadata(&fifo).unwrap();
        assert!(meta.file_type().is_fifo(), "still a FIFO");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut s = Sink::open(&Destination::Path("/dev/null".into())).unwrap();
        s.write_all(b"gone").unwrap();
        s.finish().unwrap();
        let null = std::fs::metadata("/dev/null").unwrap();
        assert!(
            null.file_type().is_char_device(),
            "/dev/null is still a device"
        );
    }

    #[test]
    fn sink_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.tar");
        std::fs::write(&dest, b"old").unwrap();
        let mut s = Sink::open(&Destination::Path(dest.clone())).unwrap();
        s.write_all(b"new bytes").unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"old",
            "not replaced before finish"
        );
        drop(s);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"old",
            "an abandoned output changes nothing"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let mut s = Sink::open(&Destination::Path(dest.clone())).unwrap();
        s.write_all(b"new bytes").unwrap();
        let (d, n) = s.finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
        assert_eq!(n, 9);
        let mut h = Hasher::sha256();
        h.update(b"new bytes");
        assert_eq!(d, h.finish());
    }
}
