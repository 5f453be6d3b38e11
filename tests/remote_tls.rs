//! `sandbox run --server https://…`: a real `sandbox serve` behind a TLS-terminating
//! proxy made here (tokio-rustls), with a CA and a certificate for `localhost` the test
//! makes (rcgen). Trusted through `--cacert` it runs; without it, or under another name,
//! the command exits 125 naming the certificate's problem.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Server, sandbox, stderr, stdout};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA (its PEM) and a certificate it signed for `localhost` only, with its key.
fn certificates() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sandbox test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// A TLS-terminating proxy on loopback in front of `upstream`; its address.
async fn tls_proxy(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    upstream: String,
) -> SocketAddr {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to do.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    });
    addr
}

/// `sandbox run` off the async runtime, which serves the proxy meanwhile.
async fn run(args: Vec<String>, env: Vec<(String, String)>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sandbox(&args, &env)
    })
    .await
    .expect("sandbox run")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_private_ca() {
    let server = Server::start(&[("API_KEY", "k-tls")]).await;
    let (ca_pem, cert, key) = certificates();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).expect("write CA");
    let ca = ca.display().to_string();
    let proxy = tls_proxy(cert, key, server.addr().to_string()).await;
    let by_name = format!("https://localhost:{}", proxy.port());
    let by_address = format!("https://127.0.0.1:{}", proxy.port());
    let key_env = vec![("API_KEY".to_string(), "k-tls".to_string())];
    let snippet = [
        "-l",
        "python3",
        "-e",
        "import sys; print('over tls'); sys.exit(3)",
    ];

    // Trusted through --cacert: the run, its output and its exit code.
    let mut args = strings(&["run", "--server", &by_name, "--cacert", &ca]);
    args.extend(strings(&snippet));
    let o = run(args, key_env.clone()).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "over tls\n");

    // The URL and the CA from the environment, as a CI job keeps them in its secrets.
    let mut env = key_env.clone();
    env.push(("SANDBOX_SERVER".into(), by_name.clone()));
    env.push(("SANDBOX_CACERT".into(), ca.clone()));
    let o = run(
        strings(&["run", "-l", "nodejs", "-e", "console.log(7)"]),
        env,
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "7\n");

    // Without the CA: the system's roots do not know it.
    let mut args = strings(&["run", "--server", &by_name]);
    args.extend(strings(&snippet));
    let o = run(args, key_env.clone()).await;
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("TLS") && e.contains("not trust") && e.contains("--cacert"),
        "{e}"
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));

    // Under a name the certificate was not issued for.
    let mut args = strings(&["run", "--server", &by_address, "--cacert", &ca]);
    args.extend(strings(&snippet));
    let o = run(args, key_env.clone()).await;
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("not valid for the name"), "{e}");

    // A CA file that holds no certificate is the user's to fix.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate\n").expect("write");
    let mut args = strings(&["run", "--server", &by_name, "--cacert"]);
    args.push(bad.display().to_string());
    args.extend(strings(&snippet));
    let o = run(args, key_env.clone()).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--cacert"), "{}", stderr(&o));

    // Plain http where TLS is expected says so.
    let mut args = strings(&["run", "--server"]);
    args.push(format!("https://{}", server.addr()));
    args.extend(strings(&snippet));
    let o = run(args, key_env).await;
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not answer in TLS"),
        "{}",
        stderr(&o)
    );
}
