//! The server-sent events of one streamed answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::sse::Event;
use ramole_core::engine::{EngineError, JobEvent};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::reply::{Reply, finish_reason};

/// The server-sent events of one streamed answer: a role chunk, content chunks, a final chunk
/// with the finish reason and the provenance (and usage when asked), then `[DONE]`. Dropping it
/// (the client went away) drops the receiver, which cancels the request's row.
pub(crate) struct SseEvents {
    pub(crate) rx: UnboundedReceiver<JobEvent>,
    pub(crate) queue: VecDeque<Event>,
    pub(crate) reply: Reply,
    pub(crate) include_usage: bool,
    pub(crate) ended: bool,
}

impl SseEvents {
    fn data(v: &Value) -> Event {
        Event::default().data(v.to_string())
    }

    fn push(&mut self, e: JobEvent) {
        match e {
            JobEvent::Started => {
                let c = self
                    .reply
                    .chunk(json!({"role": "assistant", "content": ""}), None);
                self.queue.push_back(Self::data(&c));
            }
            JobEvent::Text(t) => {
                let c = self.reply.chunk(json!({"content": t}), None);
                self.queue.push_back(Self::data(&c));
            }
            JobEvent::Done(f) => {
                let mut c = self
                    .reply
                    .chunk(json!({}), Some(finish_reason(f.generation.finish_reason)));
                c["ramole"] = json!({"provenance": self.reply.provenance(&f)});
                if self.include_usage {
                    c["usage"] = Reply::usage(&f);
                }
                self.queue.push_back(Self::data(&c));
                self.queue.push_back(Event::default().data("[DONE]"));
                self.ended = true;
            }
            JobEvent::Failed(e) => {
                // Headers are gone already: the error travels as an event, then the stream ends.
                let err: ApiError = e.into();
                self.queue.push_back(Self::data(&err.body()));
                self.queue.push_back(Event::default().data("[DONE]"));
                self.ended = true;
            }
        }
    }
}

impl tokio_stream::Stream for SseEvents {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(e)) => this.push(e),
                Poll::Ready(None) => {
                    this.push(JobEvent::Failed(EngineError::Stopped));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
