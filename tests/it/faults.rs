//! Pulls through a fault-injecting proxy in front of the real test registry: transient faults
//! (429 with Retry-After, 503, connection resets, a body cut in half) must give a
//! byte-identical tar; a permanent fault must give one clear line, status 1 and no output.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::util::*;

/// What the proxy does with the Nth blob request (counting from 0); requests past the script
/// are forwarded untouched.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    Forward,
    TooMany,
    Unavailable,
    Reset,
    CutHalf,
    Always500,
}

#[derive(Default)]
pub(crate) struct Log {
    pub requests: Vec<String>,
}

pub(crate) struct Proxy {
    pub addr: String,
    pub log: Arc<Mutex<Log>>,
}

fn start_proxy(upstream: String, blob_script: Vec<Fault>, manifest_script: Vec<Fault>) -> Proxy {
    start_proxy_with_uploads(upstream, blob_script, manifest_script, vec![])
}

/// [`start_proxy`] with a script for upload requests too (`PATCH`, and `PUT` of blobs).
pub(crate) fn start_proxy_with_uploads(
    upstream: String,
    blob_script: Vec<Fault>,
    manifest_script: Vec<Fault>,
    upload_script: Vec<Fault>,
) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Log::default()));
    let counters = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
    let log2 = log.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (upstream, log, counters) = (upstream.clone(), log2.clone(), counters.clone());
            let scripts = (
                blob_script.clone(),
                manifest_script.clone(),
                upload_script.clone(),
            );
            thread::spawn(move || {
                let _ = serve(conn, &upstream, &log, &counters, &scripts);
            });
        }
    });
    Proxy { addr, log }
}

type Scripts = (Vec<Fault>, Vec<Fault>, Vec<Fault>);

fn serve(
    client: TcpStream,
    upstream: &str,
    log: &Mutex<Log>,
    counters: &Mutex<(usize, usize, usize)>,
    (blob_script, manifest_script, upload_script): &Scripts,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !line.is_ascii() {
            // A TLS handshake: this proxy speaks plain HTTP only.
            return Ok(());
        }
        let end = line == "\r\n";
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head.push(line);
        }
        if end {
            break;
        }
    }
    let request_line = head[0].trim().to_string();
    let is_blob = request_line.starts_with("GET ") && request_line.contains("/blobs/");
    let is_manifest = request_line.starts_with("GET ") && request_line.contains("/manifests/");
    let is_upload = request_line.starts_with("PATCH ")
        || (request_line.starts_with("PUT ") && request_line.contains("/blobs/uploads/"));
    let fault = {
        let mut c = counters.lock().unwrap();
        if is_upload {
            c.2 += 1;
            upload_script
                .get(c.2 - 1)
                .copied()
                .unwrap_or(Fault::Forward)
        } else if is_blob {
            c.0 += 1;
            blob_script.get(c.0 - 1).copied().unwrap_or(Fault::Forward)
        } else if is_manifest {
            c.1 += 1;
            manifest_script
                .get(c.1 - 1)
                .copied()
                .unwrap_or(Fault::Forward)
        } else {
            Fault::Forward
        }
    };
    let range = head
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("range:"));
    log.lock().unwrap().requests.push(format!(
        "{request_line} {fault:?}{}",
        if range { " range" } else { "" }
    ));
    // A request body (uploads, manifests) is read whole before anything is answered.
    let length = head
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut client = client;
    match fault {
        Fault::TooMany => {
            return client.write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Fault::Unavailable => {
            return client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Fault::Always500 => {
            return client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Fault::Reset => {
            // Close without answering: the client sees the connection drop.
            return client.shutdown(std::net::Shutdown::Both);
        }
        Fault::Forward | Fault::CutHalf => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut req = head[..head.len() - 1].concat();
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    if let Fault::CutHalf = fault {
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let body = resp.len() - split;
        client.write_all(&resp[..split + body / 2])?;
        return client.shutdown(std::net::Shutdown::Both);
    }
    client.write_all(&resp)
}

fn pull_via(proxy: &Proxy, s: &Scratch, image: &str) -> std::process::Output {
    s.oci2uk(&[
        "build",
        &format!("{}/{image}", proxy.addr),
        "--format",
        "tar",
        "-o",
        "out.tar",
        "--quiet",
    ])
}

#[test]
fn transient_faults_give_the_same_bytes() {
    let upstream = env("OCI2UK_TEST_REGISTRY");
    let direct = Scratch::new();
    assert_ok(&direct.oci2uk(&[
        "build",
        &format!("{upstream}/nginx:latest"),
        "--format",
        "tar",
        "-o",
        "out.tar",
        "--quiet",
    ]));
    let expected = std::fs::read(direct.path().join("work/out.tar")).unwrap();

    use Fault::*;
    let proxy = start_proxy(
        upstream,
        vec![
            TooMany,
            Unavailable,
            Reset,
            CutHalf,
            CutHalf,
            Forward,
            CutHalf,
        ],
        vec![Unavailable, Reset],
    );
    let s = Scratch::new();
    let out = pull_via(&proxy, &s, "nginx:latest");
    let log = proxy.log.lock().unwrap().requests.join("\n");
    assert_ok(&out);
    assert_eq!(
        std::fs::read(s.path().join("work/out.tar")).unwrap(),
        expected,
        "requests:\n{log}"
    );
    assert!(
        log.contains("range"),
        "an interrupted blob is resumed with Range:\n{log}"
    );
}

#[test]
fn permanent_fault_is_one_clear_line_and_no_output() {
    let proxy = start_proxy(
        env("OCI2UK_TEST_REGISTRY"),
        vec![Fault::Always500; 64],
        vec![],
    );
    let s = Scratch::new();
    let out = pull_via(&proxy, &s, "busybox:latest");
    assert_fails(&out, 1, &["sha256:"]);
    assert!(s.outputs().is_empty(), "no output left: {:?}", s.outputs());
    let blobs = std::fs::read_dir(s.cache().join("blobs/sha256"))
        .unwrap()
        .count();
    let tmp = std::fs::read_dir(s.cache().join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "no temporary left in the cache");
    // Every blob request fails, so at most the manifest document can be cached.
    assert!(blobs <= 1, "{blobs} blobs cached");
}
