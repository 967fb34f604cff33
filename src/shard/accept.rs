//! The accept loop of one listener socket on one shard.

use std::rc::Rc;
use std::time::Duration;

use compio::net::TcpListener;
use tracing::{debug, warn};

use super::ShardCtx;

/// Accept connections forever, spawning one driver task per connection on this shard.
/// Cancelled (dropped) when the shard drains, which closes the socket.
pub(crate) async fn accept_loop(ctx: Rc<ShardCtx>, listener_idx: usize, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let live = super::driver::LiveGuard::new(ctx.clone());
                let seq = ctx.seq.get();
                ctx.seq.set(seq.wrapping_add(1));
                let stream = super::stream::Stream::plain(stream);
                let fut = super::driver::serve(live, listener_idx, stream, seq);
                compio::runtime::spawn(fut).detach();
            }
            Err(e) if is_fd_exhaustion(&e) => {
                // Out of file descriptors: back off instead of spinning; connections that
                // close free descriptors and accepting resumes.
                warn!(shard = ctx.id, error = %e, "accept: out of file descriptors; pausing 50 ms");
                compio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => debug!(shard = ctx.id, error = %e, "accept failed"),
        }
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(23 /* ENFILE */) | Some(24 /* EMFILE */)
    )
}
