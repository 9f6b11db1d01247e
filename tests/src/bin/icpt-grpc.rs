//! `icpt-grpc`: a real gRPC server and client (tonic, prost) for the routing tests.
//!
//! - `icpt-grpc serve --listen ADDR --name NAME`: answers every unary method of
//!   `helloworld.Greeter` with `NAME METHOD hello <request name>`; prints
//!   `{"listening": ADDR}` once bound.
//!   A method whose name starts with `Stream` is server-streaming instead: the request's name
//!   `WHO/COUNT/EVERY_MS` is answered with COUNT replies `NAME METHOD WHO I`, one every
//!   EVERY_MS milliseconds.
//! - `icpt-grpc call ADDR --method SayHello --name X [--count N]`: N calls over one HTTP/2
//!   connection; prints `{"replies": [...]}` or `{"error": ...}` (exit 1).
//! - `icpt-grpc stream ADDR --calls N --replies R --every-ms MS [--until-file F]`: N
//!   server-streaming calls one after another on one channel (a new connection whenever the
//!   last one went away), each expecting R replies in order, one every MS ms (with
//!   `--until-file`, calls go on until that file exists, N at least); prints one line per
//!   call while it runs (`{"call": I}`) and at the end `{"calls": N, "replies": total,
//!   "refused": K, "errors": [...]}` (exit 1 if any error). A call that fails before its first
//!   reply with `Unavailable`/`Cancelled`/`Unknown` from the transport (a stream refused by
//!   a GOAWAY, never started at the server) is retried once on a new connection and counted
//!   in `refused`, as gRPC's transparent retry does; any other failure, and any failure
//!   after the first reply, is an error.
//!
//! The messages are declared with prost's derive (no protoc):
//! `message HelloRequest { string name = 1; }`, `message HelloReply { string message = 1; }`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::exit;

use clap::{Parser, Subcommand};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::codegen::http;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    Call {
        addr: SocketAddr,
        #[arg(long, default_value = "SayHello")]
        method: String,
        #[arg(long, default_value = "test")]
        name: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    Stream {
        addr: SocketAddr,
        #[arg(long, default_value = "StreamHellos")]
        method: String,
        #[arg(long, default_value_t = 1)]
        calls: u32,
        #[arg(long, default_value_t = 10)]
        replies: u32,
        #[arg(long, default_value_t = 100)]
        every_ms: u64,
        #[arg(long)]
        until_file: Option<std::path::PathBuf>,
    },
}

/// One unary method of the greeter.
struct Method {
    server: String,
    method: String,
}

impl tonic::server::UnaryService<HelloRequest> for Method {
    type Response = HelloReply;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HelloReply>, Status>> + Send>>;

    fn call(&mut self, req: Request<HelloRequest>) -> Self::Future {
        let message = format!(
            "{} {} hello {}",
            self.server,
            self.method,
            req.get_ref().name
        );
        Box::pin(async move { Ok(Response::new(HelloReply { message })) })
    }
}

impl tonic::server::ServerStreamingService<HelloRequest> for Method {
    type Response = HelloReply;
    type ResponseStream = tokio_stream::wrappers::ReceiverStream<Result<HelloReply, Status>>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send>>;

    fn call(&mut self, req: Request<HelloRequest>) -> Self::Future {
        let prefix = format!("{} {}", self.server, self.method);
        let name = req.into_inner().name;
        Box::pin(async move {
            let mut parts = name.split('/');
            let (who, count, every) = match (parts.next(), parts.next(), parts.next()) {
                (Some(w), Some(c), Some(e)) => match (c.parse::<u32>(), e.parse::<u64>()) {
                    (Ok(c), Ok(e)) => (w.to_owned(), c, e),
                    _ => return Err(Status::invalid_argument("name: WHO/COUNT/EVERY_MS")),
                },
                _ => return Err(Status::invalid_argument("name: WHO/COUNT/EVERY_MS")),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..count {
                    if i > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(every)).await;
                    }
                    let message = format!("{prefix} {who} {i}");
                    if tx.send(Ok(HelloReply { message })).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
                rx,
            )))
        })
    }
}

async fn serve(listen: SocketAddr, name: String) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "{}",
        serde_json::json!({ "listening": listener.local_addr()? })
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let resp = match path.strip_prefix("/helloworld.Greeter/") {
                            Some(method) if method.starts_with("Stream") => {
                                let m = Method {
                                    server: name,
                                    method: method.to_owned(),
                                };
                                let mut grpc =
                                    tonic::server::Grpc::new(
                                        ProstCodec::<HelloReply, HelloRequest>::default(),
                                    );
                                grpc.server_streaming(m, req).await
                            }
                            Some(method) => {
                                let m = Method {
                                    server: name,
                                    method: method.to_owned(),
                                };
                                let mut grpc =
                                    tonic::server::Grpc::new(
                                        ProstCodec::<HelloReply, HelloRequest>::default(),
                                    );
                                grpc.unary(m, req).await
                            }
                            None => {
                                Status::unimplemented(format!("no service at {path}")).into_http()
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http2_only()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A gRPC client connected to `addr`, and the path of the Greeter's `method`.
async fn greeter(
    addr: SocketAddr,
    method: &str,
) -> Result<
    (
        tonic::client::Grpc<tonic::transport::Channel>,
        http::uri::PathAndQuery,
    ),
    String,
> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let path = format!("/helloworld.Greeter/{method}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok((tonic::client::Grpc::new(channel), path))
}

async fn call(
    addr: SocketAddr,
    method: &str,
    name: &str,
    count: u32,
) -> Result<Vec<String>, String> {
    let (mut grpc, path) = greeter(addr, method).await?;
    let mut replies = Vec::new();
    for _ in 0..count {
        grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let r: Response<HelloReply> = grpc
            .unary(
                Request::new(HelloRequest {
                    name: name.to_owned(),
                }),
                path.clone(),
                ProstCodec::<HelloRequest, HelloReply>::default(),
            )
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        replies.push(r.into_inner().message);
    }
    Ok(replies)
}

/// What `icpt-grpc stream` came to.
#[derive(Default)]
struct StreamReport {
    calls: u32,
    replies: u64,
    refused: u32,
    errors: Vec<String>,
}

/// Whether a call that failed before its first reply may have been refused by a GOAWAY
/// (the transport's codes for a stream the connection dropped).
fn refusal(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}

/// One server-streaming call: Ok(replies) when all `replies` came in order; Err((before
/// its first reply, what went wrong)).
async fn stream_call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &http::uri::PathAndQuery,
    who: &str,
    replies: u32,
    every_ms: u64,
) -> Result<u32, (bool, String)> {
    grpc.ready()
        .await
        .map_err(|e| (true, format!("not ready: {e}")))?;
    let mut stream = grpc
        .server_streaming(
            Request::new(HelloRequest {
                name: format!("{who}/{replies}/{every_ms}"),
            }),
            path.clone(),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
        .map_err(|s| (refusal(&s), format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let mut got = 0u32;
    loop {
        match stream.message().await {
            Ok(Some(r)) => {
                let want = format!(" {who} {got}");
                if !r.message.ends_with(&want) {
                    return Err((false, format!("reply {got}: {:?}", r.message)));
                }
                got += 1;
            }
            Ok(None) if got == replies => return Ok(got),
            Ok(None) => return Err((false, format!("ended after {got} of {replies} replies"))),
            Err(s) => {
                return Err((
                    got == 0 && refusal(&s),
                    format!("{:?} after {got} replies: {}", s.code(), s.message()),
                ))
            }
        }
    }
}

async fn stream(
    addr: SocketAddr,
    method: &str,
    calls: u32,
    replies: u32,
    every_ms: u64,
    until: Option<&std::path::Path>,
) -> Result<StreamReport, String> {
    let (mut grpc, path) = greeter(addr, method).await?;
    let mut report = StreamReport::default();
    let mut i = 0u32;
    while i < calls || until.is_some_and(|f| !f.exists()) {
        println!("{}", serde_json::json!({ "call": i }));
        let who = format!("c{i}");
        let mut outcome = stream_call(&mut grpc, &path, &who, replies, every_ms).await;
        if let Err((true, _)) = &outcome {
            // Refused before it started (a GOAWAY): once more, on a new connection.
            report.refused += 1;
            outcome = stream_call(&mut grpc, &path, &who, replies, every_ms).await;
        }
        match outcome {
            Ok(n) => report.replies += u64::from(n),
            Err((_, e)) => report.errors.push(format!("call {i}: {e}")),
        }
        report.calls += 1;
        i += 1;
    }
    Ok(report)
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cli.cmd {
        Cmd::Serve { listen, name } => {
            if let Err(e) = rt.block_on(serve(listen, name)) {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
                exit(1);
            }
        }
        Cmd::Call {
            addr,
            method,
            name,
            count,
        } => match rt.block_on(call(addr, &method, &name, count)) {
            Ok(replies) => println!("{}", serde_json::json!({ "replies": replies })),
            Err(e) => {
                println!("{}", serde_json::json!({ "error": e }));
                exit(1);
            }
        },
        Cmd::Stream {
            addr,
            method,
            calls,
            replies,
            every_ms,
            until_file,
        } => match rt.block_on(stream(
            addr,
            &method,
            calls,
            replies,
            every_ms,
            until_file.as_deref(),
        )) {
            Ok(r) => {
                println!(
                    "{}",
                    serde_json::json!({
                        "calls": r.calls,
                        "replies": r.replies,
                        "refused": r.refused,
                        "errors": r.errors,
                    })
                );
                if !r.errors.is_empty() {
                    exit(1);
                }
            }
            Err(e) => {
                println!("{}", serde_json::json!({ "error": e }));
                exit(1);
            }
        },
    }
}
