//! `icpt-grpc`: a real gRPC server and client (tonic, prost) for the routing tests.
//!
//! - `icpt-grpc serve --listen ADDR --name NAME`: answers every unary method of
//!   `helloworld.Greeter` with `NAME METHOD hello <request name>`; prints
//!   `{"listening": ADDR}` once bound.
//! - `icpt-grpc call ADDR --method SayHello --name X [--count N]`: N calls over one HTTP/2
//!   connection; prints `{"replies": [...]}` or `{"error": ...}` (exit 1).
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

async fn call(
    addr: SocketAddr,
    method: &str,
    name: &str,
    count: u32,
) -> Result<Vec<String>, String> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let path: http::uri::PathAndQuery = format!("/helloworld.Greeter/{method}")
        .parse()
        .map_err(|e| format!("{e}"))?;
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
    }
}
