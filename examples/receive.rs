//! Receive into files: a `ringmover::recv::Receiver` listens on a local
//! port, takes three connections and writes each into its own file in a
//! scratch directory, on the backend `RINGMOVER_BACKEND` selects (else
//! the best one). Three client threads send raw bytes; the example checks
//! every file holds exactly what its client sent, then removes them.
//!
//! `cargo run --example receive`

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ringmover::recv::{Event, Receiver, RecvOptions};
use ringmover::Selection;

const CLIENTS: u64 = 3;

fn main() -> io::Result<()> {
    let selection = Selection::from_env()?;
    println!("backend: {} ({})", selection.backend, selection.reason);
    let mut receiver = Receiver::new(selection.backend, RecvOptions::default())?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    receiver.listen(listener, Some(CLIENTS))?;

    let dir = std::env::temp_dir().join(format!("ringmover-receive-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|i| {
            std::thread::spawn(move || -> io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                // Client i sends i MiB of the byte i.
                s.write_all(&vec![i as u8; (i as usize) << 20])
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    let mut finished = Vec::new();
    while receiver.is_listening() || receiver.active() > 0 {
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "30 s and not done"));
        }
        receiver.wait(Some(Duration::from_secs(1)), &mut events)?;
        for event in events.drain(..) {
            if let Event::Incoming { socket, peer } = event {
                let path = dir.join(format!("from-{}", peer.port()));
                let file = std::fs::File::create(&path)?;
                receiver.attach(socket, peer, file)?;
            } else if let Event::Finished(done) = event {
                println!(
                    "{}: {} bytes in {:?}: {:?}",
                    done.peer, done.bytes, done.elapsed, done.result
                );
                finished.push(done);
            } else {
                eprintln!("{event:?}");
            }
        }
    }
    for c in clients {
        c.join().expect("client thread")?;
    }
    let mut sizes: Vec<u64> = finished.iter().map(|f| f.bytes).collect();
    sizes.sort_unstable();
    let want: Vec<u64> = (1..=CLIENTS).map(|i| i << 20).collect();
    let ok = sizes == want && finished.iter().all(|f| f.result.is_ok());
    for f in &finished {
        let path = dir.join(format!("from-{}", f.peer.port()));
        let data = std::fs::read(&path)?;
        let byte = (f.bytes >> 20) as u8;
        if data.len() as u64 != f.bytes || data.iter().any(|&b| b != byte) {
            return Err(io::Error::other(format!(
                "{} holds other bytes",
                path.display()
            )));
        }
    }
    std::fs::remove_dir_all(&dir)?;
    if !ok {
        return Err(io::Error::other(format!(
            "received {sizes:?}, expected {want:?}"
        )));
    }
    println!("{CLIENTS} files received and checked");
    Ok(())
}
