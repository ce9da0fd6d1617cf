//! QEMU's machine protocol (QMP) as `run` speaks it: one unix socket that QEMU connects to
//! when it starts, and one request, the ACPI power button (`system_powerdown`), which the
//! guest's init turns into the image's stop signal.
//!
//! The socket is ours, in a private temporary directory, and bound before QEMU starts: QEMU
//! connects as a client, so a request made at any moment after the start finds the channel
//! there (it waits in the queue until QEMU has connected).

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The name of the socket in its directory.
const SOCKET_NAME: &str = "qmp.sock";

/// What `run` asks of QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Press the ACPI power button.
    Powerdown,
}

impl Request {
    /// The request as one line of QMP.
    fn line(self) -> &'static [u8] {
        match self {
            Request::Powerdown => b"{\"execute\":\"system_powerdown\"}\n",
        }
    }
}

/// The line that leaves QMP's capabilities negotiation; QEMU takes no other command before
/// it, and handles commands in order, so it need not wait for the answer.
const CAPABILITIES: &[u8] = b"{\"execute\":\"qmp_capabilities\"}\n";

/// The listening side of the monitor channel; requests go to QEMU once it has connected.
pub struct Monitor {
    path: PathBuf,
    requests: mpsc::UnboundedSender<Request>,
    // Removed, with the socket, when the monitor is dropped.
    _dir: tempfile::TempDir,
}

impl Monitor {
    /// Binds a socket in a new private directory and serves QEMU's connection to it in the
    /// background.
    pub fn bind() -> io::Result<Monitor> {
        let dir = tempfile::Builder::new().prefix("oci2uk-run-").tempdir()?;
        let path = dir.path().join(SOCKET_NAME);
        let listener = UnixListener::bind(&path)?;
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            if let Err(e) = serve(listener, queue).await {
                tracing::debug!("QEMU monitor: {e}");
            }
        });
        Ok(Monitor {
            path,
            requests,
            _dir: dir,
        })
    }

    /// The socket QEMU is to connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` once QEMU has connected (at once when it has).
    pub fn send(&self, request: Request) {
        // The serving task ends only with the connection, when QEMU is gone: nothing to ask.
        let _ = self.requests.send(request);
    }
}

/// Accepts QEMU's connection, leaves capabilities negotiation, then writes each request;
/// what QEMU says back (its greeting, answers, events) is read and logged at debug level.
async fn serve(
    listener: UnixListener,
    mut queue: mpsc::UnboundedReceiver<Request>,
) -> io::Result<()> {
    let (stream, _) = listener.accept().await?;
    drop(listener);
    talk(stream, &mut queue).await
}

async fn talk(stream: UnixStream, queue: &mut mpsc::UnboundedReceiver<Request>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    tokio::spawn(async move {
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!("QEMU monitor: {line}");
        }
    });
    write.write_all(CAPABILITIES).await?;
    while let Some(request) = queue.recv().await {
        tracing::debug!("QEMU monitor: {request:?}");
        write.write_all(request.line()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for QEMU: connects, greets, and reads what it is asked; the requests made
    /// before it connected arrive too, after the negotiation.
    #[tokio::test]
    async fn requests_reach_qemu_after_the_negotiation() {
        let monitor = Monitor::bind().unwrap();
        monitor.send(Request::Powerdown);
        let stream = UnixStream::connect(monitor.path()).await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert_eq!(first, r#"{"execute":"qmp_capabilities"}"#);
        let second = lines.next_line().await.unwrap().unwrap();
        assert_eq!(second, r#"{"execute":"system_powerdown"}"#);
        monitor.send(Request::Powerdown);
        let third = lines.next_line().await.unwrap().unwrap();
        assert_eq!(third, r#"{"execute":"system_powerdown"}"#);
        let path = monitor.path().to_path_buf();
        drop(monitor);
        assert!(!path.exists(), "the socket is removed with the monitor");
    }
}
