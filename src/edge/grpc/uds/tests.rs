//! A tonic server in-process, called over its Unix socket by a client that
//! writes HTTP/2 by hand and sends `:authority` as grpc-go does when it
//! dials a socket path: the path itself.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Endpoint, Uri};

use super::*;
use crate::edge::csi::registration::RegistrationService;
use crate::edge::grpc::authority::PREFACE;
use crate::proto::pluginregistration as pb;
use crate::proto::pluginregistration::registration_server::RegistrationServer;

const KUBELET_AUTHORITY: &str = "/var/lib/kubelet/plugins_registry/x.sock";
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;

fn service() -> RegistrationServer<RegistrationService> {
    RegistrationServer::new(RegistrationService {
        csi_socket: PathBuf::from("/var/lib/kubelet/plugins/csi.terna.dev/csi.sock"),
    })
}

/// Serves registration on `socket`, through the shim or (to show what it
/// fixes) straight from the listener.
fn serve(socket: &Path, shim: bool) {
    let listener = UnixListener::bind(socket).unwrap();
    let server = tonic::transport::Server::builder().add_service(service());
    if shim {
        tokio::spawn(server.serve_with_incoming(incoming(listener)));
    } else {
        tokio::spawn(server.serve_with_incoming(UnixListenerStream::new(listener)));
    }
}

#[derive(Debug)]
#[expect(dead_code, reason = "the GOAWAY code is for failure messages")]
enum Outcome {
    Reset(u32),
    GoAway(u32),
    Answered {
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        message: Vec<u8>,
        trailers: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[frame_type, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// One unary call of `method` with an empty request message, written as
/// grpc-go writes it, and what the server answered on the stream.
async fn raw_call(socket: &Path, method: &str, authority: &str) -> Outcome {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    let fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", method.as_bytes()),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-go/1.83.2"),
        (b"te", b"trailers"),
    ];
    let block = loona_hpack::Encoder::new().encode(fields);
    let mut request = PREFACE.to_vec();
    request.extend(frame(0x4, 0, 0, &[]));
    request.extend(frame(0x1, 0x4, 1, &block));
    request.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    conn.write_all(&request).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut bytes = Vec::new();
    let mut headers = None;
    let mut message = Vec::new();
    let read = async {
        loop {
            while bytes.len() >= 9 {
                let len = usize::from(bytes[0]) << 16
                    | usize::from(bytes[1]) << 8
                    | usize::from(bytes[2]);
                if bytes.len() < 9 + len {
                    break;
                }
                let (frame_type, flags) = (bytes[3], bytes[4]);
                let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
                let payload: Vec<u8> = bytes.drain(..9 + len).skip(9).collect();
                let code = || u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                match (frame_type, stream) {
                    (RST_STREAM, 1) => return Outcome::Reset(code()),
                    (GOAWAY, 0) => {
                        let code =
                            u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                        return Outcome::GoAway(code);
                    }
                    (0x1, 1) => {
                        // The server's header blocks fit one frame here.
                        assert_ne!(flags & 0x4, 0, "response headers in one frame");
                        let fields = decoder.decode(&payload).unwrap();
                        if flags & 0x1 == 0 {
                            headers = Some(fields);
                        } else {
                            return Outcome::Answered {
                                headers: headers.take().unwrap_or_default(),
                                message: std::mem::take(&mut message),
                                trailers: fields,
                            };
                        }
                    }
                    (0x0, 1) => message.extend_from_slice(&payload),
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "the server closed the connection");
            bytes.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[tokio::test]
async fn without_the_shim_h2_resets_a_socket_path_authority() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reg.sock");
    serve(&socket, false);
    let outcome = raw_call(
        &socket,
        "/pluginregistration.Registration/GetInfo",
        KUBELET_AUTHORITY,
    )
    .await;
    // If this starts failing, h2 accepts such authorities now (upstream
    // hyperium/h2#487) and the shim may be unnecessary.
    assert!(
        matches!(outcome, Outcome::Reset(PROTOCOL_ERROR)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn through_the_shim_a_socket_path_authority_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reg.sock");
    serve(&socket, true);
    for authority in [KUBELET_AUTHORITY, "%2Frun%2Fx.sock", "localhost"] {
        let outcome = raw_call(
            &socket,
            "/pluginregistration.Registration/GetInfo",
            authority,
        )
        .await;
        let Outcome::Answered {
            headers,
            message,
            trailers,
        } = outcome
        else {
            panic!("{authority}: {outcome:?}");
        };
        assert_eq!(field(&headers, ":status"), Some("200"));
        assert_eq!(field(&trailers, "grpc-status"), Some("0"), "{trailers:?}");
        assert_eq!(message[0], 0, "uncompressed");
        let info = pb::PluginInfo::decode(&message[5..]).unwrap();
        assert_eq!(info.name, crate::DRIVER_NAME);
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/csi.terna.dev/csi.sock"
        );
        assert_eq!(info.supported_versions, ["1.0.0"]);
    }
}

#[tokio::test]
async fn hostile_bytes_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reg.sock");
    serve(&socket, true);
    let mut bad = UnixStream::connect(&socket).await.unwrap();
    let mut request = PREFACE.to_vec();
    request.extend(frame(0x9, 0x4, 1, b"continuation of nothing"));
    bad.write_all(&request).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was closed");
    let outcome = raw_call(
        &socket,
        "/pluginregistration.Registration/GetInfo",
        KUBELET_AUTHORITY,
    )
    .await;
    assert!(matches!(outcome, Outcome::Answered { .. }), "{outcome:?}");
}

#[tokio::test]
async fn tonic_clients_work_through_the_shim() {
    use crate::proto::pluginregistration::registration_client::RegistrationClient;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reg.sock");
    serve(&socket, true);
    let path = socket.clone();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let mut client = RegistrationClient::new(channel);
    for _ in 0..3 {
        let info = client
            .get_info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, crate::DRIVER_NAME);
        client
            .notify_registration_status(pb::RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            })
            .await
            .unwrap();
    }
}
