//! Real traffic: line-echo TCP and UDP servers in pod namespaces that say
//! which backend answered and whom they saw as the peer, and clients in the
//! client namespace that parse those answers.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};

use crate::netns::in_netns;

/// Starts a TCP server on `addr` in `ns` answering each line with
/// `backend=<name> port=<port> peer=<ip:port> echo=<line>`.
pub(crate) fn serve_tcp(ns: &str, name: &'static str, addr: SocketAddr) -> Result<()> {
    let listener = in_netns(ns, move || TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let reply = format!(
                        "backend={name} port={} peer={peer} echo={}\n",
                        addr.port(),
                        line.trim()
                    );
                    if writer.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    Ok(())
}

/// Starts a UDP server on `addr` in `ns` answering each datagram like
/// [`serve_tcp`].
pub(crate) fn serve_udp(ns: &str, name: &'static str, addr: SocketAddr) -> Result<()> {
    let socket = in_netns(ns, move || UdpSocket::bind(addr))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let reply = format!(
                "backend={name} port={} peer={peer} echo={}",
                addr.port(),
                String::from_utf8_lossy(&buf[..n]).trim()
            );
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    Ok(())
}

/// A server's answer, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub port: u16,
    pub peer: SocketAddr,
}

pub fn parse_reply(line: &str) -> Result<Reply> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .with_context(|| format!("no {k}= in reply {line:?}"))
    };
    Ok(Reply {
        backend: field("backend")?,
        port: field("port")?.parse()?,
        peer: field("peer")?.parse()?,
    })
}

/// A TCP connection from the client namespace.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(client_ns: &str, to: SocketAddrV4, from: Option<Ipv4Addr>) -> Result<Conn> {
        Conn::connect(client_ns, to.into(), from.map(IpAddr::V4))
    }

    /// [`Conn::open`] over IPv6.
    pub fn open_v6(client_ns: &str, to: SocketAddrV6, from: Option<Ipv6Addr>) -> Result<Conn> {
        Conn::connect(client_ns, to.into(), from.map(IpAddr::V6))
    }

    fn connect(client_ns: &str, to: SocketAddr, from: Option<IpAddr>) -> Result<Conn> {
        let stream = in_netns(client_ns, move || connect_from(to, from))??;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        // A transfer stuck behind a black hole (a lost "packet too big")
        // fails instead of blocking the test forever.
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends a line and reads the server's answer.
    pub fn ask(&mut self, text: &str) -> Result<Reply> {
        self.writer.write_all(format!("{text}\n").as_bytes())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("reading the answer")?;
        if line.is_empty() {
            bail!("connection closed");
        }
        parse_reply(&line)
    }

    /// Sends one line of `bytes` bytes and reads the server's echo of it:
    /// a bulk transfer in both directions. Fails unless every byte came back
    /// unchanged; returns how long the round trip took.
    pub fn bulk(&mut self, bytes: usize) -> Result<Duration> {
        let payload: String = (0..bytes)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let started = std::time::Instant::now();
        self.writer.write_all(payload.as_bytes())?;
        self.writer.write_all(b"\n")?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .with_context(|| format!("reading the echo of {bytes} bytes"))?;
        let echo = line
            .trim_end()
            .split_once(" echo=")
            .map(|(_, e)| e)
            .with_context(|| format!("no echo in a {}-byte answer", line.len()))?;
        if echo != payload {
            bail!(
                "the echo of {bytes} bytes came back as {} different bytes",
                echo.len()
            );
        }
        Ok(started.elapsed())
    }
}

/// A Python program in a namespace, standing in for a host daemon or a
/// pod's server outside the test process. [`PythonServer::start`] returns
/// only once the script has printed `ready` (after it bound its socket), so
/// a client never races the bind; a fixed sleep did, on a loaded machine.
/// Killed when dropped.
pub struct PythonServer {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PythonServer {
    /// Runs `script` in `ns`; the script prints `ready` (flushed) once it
    /// is bound. Fails if that takes over 10 s or the script ends first.
    pub fn start(ns: &str, script: &str) -> Result<PythonServer> {
        let mut child = crate::netns::ns_cmd(ns, &["python3", "-u", "-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = PythonServer { child, lines };
        match server.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.trim() == "ready" => Ok(server),
            Ok(line) => bail!("the server printed {line:?} before it was ready"),
            Err(_) => {
                let status = server.child.try_wait()?;
                bail!("the server was not ready within 10 s (exit status {status:?})")
            }
        }
    }

    /// Waits for the script to end and returns what it printed after
    /// `ready`.
    pub fn output(mut self) -> Result<String> {
        self.child.wait()?;
        Ok(self.lines.try_iter().map(|l| l + "\n").collect())
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP server on `addr` in `ns` that sends `text` to its first client and
/// exits (after 10 s without one), listening when this returns.
pub fn answer_once(ns: &str, addr: SocketAddrV4, text: &str) -> Result<PythonServer> {
    let script = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', {})); s.listen(1); s.settimeout(10)\n\
         print('ready', flush=True)\n\
         c, _ = s.accept(); c.sendall({text:?}.encode())\n",
        addr.ip(),
        addr.port()
    );
    PythonServer::start(ns, &script).context("starting a one-shot server")
}

/// Connects from `ns` to `to`, from the local address and port `from` if
/// given, and returns what the server sent first (3 s at most).
pub fn read_from(ns: &str, to: SocketAddrV4, from: Option<SocketAddrV4>) -> Result<String> {
    let bind = from
        .map(|f| format!("s.bind(('{}', {}))\n", f.ip(), f.port()))
        .unwrap_or_default();
    let script = format!(
        "import socket\ns = socket.socket(); s.settimeout(3)\n{bind}\
         s.connect(('{}', {})); print(s.recv(100).decode())\n",
        to.ip(),
        to.port()
    );
    crate::netns::ns_sh(ns, &["python3", "-c", &script])
}

/// connect() with a timeout and an optional source address.
fn connect_from(to: SocketAddr, from: Option<IpAddr>) -> Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    if let Some(src) = from {
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .with_context(|| format!("bind {src}"))?;
    }
    socket
        .connect_timeout(&to.into(), Duration::from_secs(1))
        .with_context(|| match from {
            Some(src) => format!("connect {to} from {src}"),
            None => format!("connect {to}"),
        })?;
    Ok(socket.into())
}

/// One TCP request on a fresh connection.
pub fn tcp_request(client_ns: &str, to: SocketAddrV4) -> Result<Reply> {
    Conn::open(client_ns, to, None)?.ask("hello")
}

/// [`tcp_request`] over IPv6.
pub fn tcp_request_v6(client_ns: &str, to: SocketAddrV6) -> Result<Reply> {
    Conn::open_v6(client_ns, to, None)?.ask("hello")
}

/// One UDP datagram from a fresh socket (fresh source port), one answer.
pub fn udp_request(client_ns: &str, to: SocketAddrV4) -> Result<Reply> {
    udp_ask(client_ns, to.into())
}

/// [`udp_request`] over IPv6.
pub fn udp_request_v6(client_ns: &str, to: SocketAddrV6) -> Result<Reply> {
    udp_ask(client_ns, to.into())
}

fn udp_ask(client_ns: &str, to: SocketAddr) -> Result<Reply> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = in_netns(client_ns, move || UdpSocket::bind(any))??;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.send_to(b"hello", to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket
        .recv_from(&mut buf)
        .context("waiting for the UDP answer")?;
    parse_reply(&String::from_utf8_lossy(&buf[..n]))
}

/// Counters from /proc/net/snmp of a namespace (e.g. `Tcp` `InCsumErrors`).
pub fn snmp_counter(ns: &str, proto: &str, field: &str) -> Result<u64> {
    let proto = proto.to_string();
    let field = field.to_string();
    let text = in_netns(ns, || {
        let mut s = String::new();
        fs::File::open("/proc/self/net/snmp").and_then(|mut f| f.read_to_string(&mut s))?;
        Ok::<String, std::io::Error>(s)
    })??;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{proto}:")))
        .collect();
    if lines.len() < 2 {
        bail!("no {proto} lines in /proc/net/snmp");
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    let i = names
        .iter()
        .position(|n| *n == field)
        .with_context(|| format!("no {proto} {field} in /proc/net/snmp"))?;
    Ok(values[i].parse()?)
}
