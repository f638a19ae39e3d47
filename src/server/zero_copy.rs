//! A plain TCP connection that sends mapped blob chunks with `sendfile`.
//!
//! hyper writes a response as a list of buffers (`writev`): its own head buffer, then the body
//! chunks it was given, uncopied (the "queue" write strategy, which the accept loop asks for).
//! A warm blob's chunks are `Bytes` over a mapping of the committed file
//! (`storage::mapped`). This stream looks each buffer's address up: bytes that lie in a mapped
//! file go out with `sendfile(socket, file, offset)`, so the kernel moves the file's
//! page-cache pages to the socket and nothing is copied through user memory, as with nginx's
//! `sendfile on`; anything else is written as usual. hyper keeps its connection handling
//! (keep-alive, pipelining, timeouts, graceful shutdown): it only sees a stream that wrote
//! some bytes.
//!
//! A short `sendfile` (the socket's buffer is full) reports the bytes it sent, as a short
//! write does; a `sendfile` that sends nothing although the file should hold the bytes (the
//! file was truncated behind cistern's back) is an error, which aborts the response.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::storage::mapped;

/// Which requests may be answered with mapped chunks: put in the extensions of requests on a
/// plain HTTP/1 connection, whose stream is a [`ZeroCopyStream`]. Elsewhere (TLS, HTTP/2) the
/// chunks' bytes would be read through the mapping, which gains nothing over a read.
#[derive(Debug, Clone, Copy)]
pub struct ZeroCopy;

/// A TCP stream whose writes of mapped bytes become `sendfile`.
pub struct ZeroCopyStream {
    inner: TcpStream,
}

impl ZeroCopyStream {
    pub fn new(inner: TcpStream) -> ZeroCopyStream {
        ZeroCopyStream { inner }
    }

    /// Sends `len` bytes of `file` from `offset`, as much as the socket takes now.
    fn poll_send_file(
        &self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let socket = self.inner.as_raw_fd();
        let source = file.as_raw_fd();
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            match self.inner.try_io(Interest::WRITABLE, || {
                send_file(socket, source, offset, len)
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "a cached blob's file is shorter than its size (truncated on disk?)",
                    )));
                }
                Ok(n) => {
                    mapped::count_sent(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One `sendfile(2)` call; never more than the kernel's per-call limit.
fn send_file(socket: RawFd, file: RawFd, offset: u64, len: usize) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::other("file offset out of range"))?;
    // Linux sends at most 0x7ffff000 bytes per call.
    let count = len.min(0x7fff_f000);
    // SAFETY: both descriptors are open for the call (the caller holds the socket and, through
    // the chunk's `Bytes`, the file); `off` is a valid place for the kernel to write.
    let n = unsafe { libc::sendfile(socket, file, &mut off, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(n).map_err(|_| io::Error::other("sendfile returned a negative count"))
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Write up to the first mapped buffer as usual; a mapped buffer first goes by
        // sendfile. Either way, a short count tells hyper where to go on from.
        let mut plain = 0;
        for buf in bufs {
            if let Some((file, offset)) = mapped::source_of(buf.as_ptr(), buf.len()) {
                if plain == 0 {
                    return self.poll_send_file(cx, &file, offset, buf.len());
                }
                break;
            }
            plain += 1;
        }
        let plain = bufs.get(..plain).unwrap_or(bufs);
        Pin::new(&mut self.inner).poll_write_vectored(cx, plain)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mapped::MappedFile;
    use std::io::Write;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Head bytes, a mapped chunk, tail bytes: the peer gets them in order, whole, and the
    /// mapped chunk went by sendfile.
    #[tokio::test]
    async fn mixed_writes_arrive_in_order() {
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        f.write_all(&content).unwrap();
        let map = MappedFile::map(Arc::new(f), content.len() as u64).unwrap();
        let chunk = map.slice(1000, 2_500_000).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut stream = ZeroCopyStream::new(TcpStream::connect(addr).await.unwrap());
        // A vectored writer's loop, as hyper's: go on from wherever a short write stopped.
        let parts: Vec<bytes::Bytes> = vec![
            bytes::Bytes::from_static(b"HEAD\r\n"),
            chunk,
            bytes::Bytes::from_static(b"TAIL"),
        ];
        let mut queue: std::collections::VecDeque<bytes::Bytes> = parts.into();
        while !queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = stream.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            while n > 0 {
                let front = queue.front_mut().unwrap();
                let step = n.min(front.len());
                let _ = front.split_to(step);
                n -= step;
                if front.is_empty() {
                    queue.pop_front();
                }
            }
        }
        stream.shutdown().await.unwrap();
        drop(stream);
        let got = reader.await.unwrap();
        let mut want = b"HEAD\r\n".to_vec();
        want.extend_from_slice(&content[1000..2_501_000]);
        want.extend_from_slice(b"TAIL");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }
}
