use flowgate_linux::owner_bpf::OwnerCapture;
mod common;
#[test]
fn smoke() {
    let c = OwnerCapture::start().expect("start");
    let out = std::process::Command::new("python3").args(["-c", "import socket,os; s=socket.socket(); s.setblocking(False); s.connect_ex(('127.0.0.1', 9)); print(os.getpid(), s.getsockname()[1])"]).output().unwrap();
    let o = String::from_utf8_lossy(&out.stdout);
    let mut it = o.split_whitespace();
    let pid: u32 = it.next().unwrap().parse().unwrap();
    let port: u16 = it.next().unwrap().parse().unwrap();
    let r = c.outbound(6, format!("0.0.0.0:{port}").parse().unwrap(), "127.0.0.1:9".parse().unwrap());
    eprintln!("pid {pid} -> {r:?} {:?}", c.process(pid));
}
