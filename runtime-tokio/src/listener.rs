//! What the server accepts connections from: a TCP listener in production, turmoil's
//! simulated one in the simulator. Either gives tokio streams; [`Accepting`] hands them to
//! the serving core as futures-io streams.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// A source of tokio byte streams.
pub trait Listener: 'static {
    /// One accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;

    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>>;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        // Frames are batched per flush already; Nagle would only add latency.
        stream.set_nodelay(true)?;
        Ok((stream, addr))
    }
}

/// A tokio [`Listener`] as the serving core's listener.
pub struct Accepting<L>(pub L);

impl<L: Listener> switchboard_serve::Listener for Accepting<L> {
    type Stream = Compat<L::Stream>;

    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, addr) = self.0.accept().await?;
        Ok((stream.compat(), addr))
    }
}
