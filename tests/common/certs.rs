//! Certificates for the TLS tests (openssl).

use super::*;

fn openssl(cmd: &mut Command) {
    let out = cmd.output().expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA of its own in `dir` (`ca.crt`, returned) and a server key and
/// certificate it signed, for `127.0.0.1` and no other name. It is good for
/// client authentication too: the nodes of a TLS cluster present it to
/// each other on the cluster bus.
pub fn server_cert(dir: &std::path::Path, key: &std::path::Path, crt: &std::path::Path) -> std::path::PathBuf {
    let ca = make_ca(dir, "ca");
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write server.ext");
    let csr = dir.join("server.csr");
    openssl(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(key)
            .arg("-out")
            .arg(&csr),
    );
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(ca.with_extension("key"))
            .args(["-CAcreateserial", "-out"])
            .arg(crt)
            .arg("-extfile")
            .arg(&ext),
    );
    ca
}

/// A fresh self-signed CA in `dir`: `{name}.crt` (returned) and `{name}.key`.
pub fn make_ca(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN=outbox-relay test {name}"), "-keyout"])
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(&crt),
    );
    crt
}
