//! Wharf's native gRPC front-end: the service of `proto/wharf/v1/wharf.proto` (tonic), translating
//! each RPC into calls on `wharf_core::Core`. `mapping` translates messages and errors (no IO),
//! `consume` runs Consume streams, `txn` keeps transactions between calls and dispatches
//! check-back questions. The `wharf` binary owns the sockets and serves [`Native::service`].

pub mod config;
mod consume;
pub mod mapping;
mod txn;

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use wharf_core::catalogue::{BindingSpec, Destination, ExchangeKind};
use wharf_core::node::{ExchangeSpec, QueueSpec};
use wharf_core::{Core, CoreError};

pub use crate::config::NativeConfig;
use crate::mapping::{
    core_error, core_status, headers_in, headers_out, in_band, invalid, message_in, position_out, published_out,
    status, vhost,
};

/// The messages and the service of `proto/wharf/v1/wharf.proto`, as generated.
#[allow(
    missing_docs,
    unused_qualifications,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]
pub mod proto {
    tonic::include_proto!("wharf.v1");
}

/// The native front-end of one node.
#[derive(Debug)]
pub struct Native {
    core: Core,
    config: NativeConfig,
    shutdown: watch::Sender<bool>,
    txns: txn::Transactions,
    check_backs: txn::CheckBacks,
}

impl Native {
    /// Start the front-end on a core, after checking the configuration.
    pub fn start(core: Core, config: NativeConfig) -> Result<Arc<Self>, CoreError> {
        config.validate().map_err(|(key, reason)| CoreError::InvalidArgument(format!("{key}: {reason}")))?;
        Ok(Arc::new(Self {
            core,
            config,
            shutdown: watch::channel(false).0,
            txns: txn::Transactions::default(),
            check_backs: txn::CheckBacks::default(),
        }))
    }

    /// The tonic service to serve, with the configured message size limits.
    pub fn service(self: &Arc<Self>) -> proto::wharf_server::WharfServer<Service> {
        let size = self.config.grpc_message_size_max_bytes as usize;
        proto::wharf_server::WharfServer::new(Service(Arc::clone(self)))
            .max_decoding_message_size(size)
            .max_encoding_message_size(size)
    }

    /// End every open stream with UNAVAILABLE (the server stops taking calls on its own).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// The front-end's settings.
    pub fn config(&self) -> &NativeConfig {
        &self.config
    }

    fn check_open(&self) -> Result<(), Status> {
        if *self.shutdown.borrow() {
            return Err(core_status(CoreError::Unavailable("the broker is shutting down".into())));
        }
        Ok(())
    }
}

/// The gRPC service: one per node, shared by every connection.
#[derive(Debug, Clone)]
pub struct Service(Arc<Native>);

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A message's exchange and routing key, kept for the NO_ROUTE answer of a mandatory publish.
fn address_of(message: &wharf_core::model::Message) -> (String, String) {
    (message.exchange.clone(), message.routing_key.clone())
}

fn no_route(exchange: &str, routing_key: &str) -> Status {
    status(
        Code::FailedPrecondition,
        "NO_ROUTE",
        format!("NO_ROUTE - no queue is bound to exchange '{exchange}' with routing key '{routing_key}'"),
        false,
        &[],
    )
}

#[tonic::async_trait]
impl proto::wharf_server::Wharf for Service {
    async fn publish(&self, request: Request<proto::PublishRequest>) -> Result<Response<proto::PublishReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let message = message_in(request.message)?;
        let address = request.mandatory.then(|| address_of(&message));
        let published = self.0.core.publish_confirmed(vhost(&request.vhost), message).await.map_err(core_status)?;
        if let Some((exchange, routing_key)) = address
            && published.unroutable()
        {
            return Err(no_route(&exchange, &routing_key));
        }
        metrics::counter!("wharf_native_published_messages_total").increment(1);
        Ok(Response::new(published_out(&published)))
    }

    async fn publish_batch(
        &self,
        request: Request<proto::PublishBatchRequest>,
    ) -> Result<Response<proto::PublishBatchReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let max = self.0.config.batch_messages_max;
        if request.messages.len() > max as usize {
            return Err(core_status(CoreError::LimitExceeded {
                limit: "native.batch_messages_max",
                value: request.messages.len() as u64,
                max: max.into(),
            }));
        }
        let vhost = vhost(&request.vhost);
        // Every message is queued before any is awaited: they share commits, in order.
        let mut pending = Vec::with_capacity(request.messages.len());
        for message in request.messages {
            let queued = match message_in(Some(message)) {
                Ok(message) => {
                    let address = request.mandatory.then(|| address_of(&message));
                    self.0.core.publish(vhost, message).await.map(|p| (p, address)).map_err(|e| core_error(&e))
                }
                Err(status) => Err(in_band(&status)),
            };
            pending.push(queued);
        }
        let mut results = Vec::with_capacity(pending.len());
        for queued in pending {
            let result = match queued {
                Ok((pending, address)) => match pending.confirm().await {
                    Ok(published) if address.is_some() && published.unroutable() => {
                        let (exchange, routing_key) = address.unwrap_or_default();
                        proto::publish_result::Result::Error(in_band(&no_route(&exchange, &routing_key)))
                    }
                    Ok(published) => proto::publish_result::Result::Published(published_out(&published)),
                    Err(error) => proto::publish_result::Result::Error(core_error(&error)),
                },
                Err(error) => proto::publish_result::Result::Error(error),
            };
            results.push(proto::PublishResult { result: Some(result) });
        }
        metrics::counter!("wharf_native_published_messages_total").increment(results.len() as u64);
        Ok(Response::new(proto::PublishBatchReply { results }))
    }

    type ConsumeStream = EventStream<proto::ConsumeEvent>;

    async fn consume(
        &self,
        request: Request<Streaming<proto::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        self.0.check_open()?;
        let (tx, rx) = mpsc::channel(consume::EVENTS_BUFFERED);
        tokio::spawn(consume::run(Arc::clone(&self.0), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn begin_transaction(
        &self,
        request: Request<proto::BeginTransactionRequest>,
    ) -> Result<Response<proto::BeginTransactionReply>, Status> {
        self.0.check_open()?;
        self.0.begin_txn(request.into_inner().check_back_group).map(Response::new)
    }

    async fn stage(&self, request: Request<proto::StageRequest>) -> Result<Response<proto::StageReply>, Status> {
        self.0.check_open()?;
        self.0.stage(request.into_inner()).map(Response::new)
    }

    async fn prepare(&self, request: Request<proto::PrepareRequest>) -> Result<Response<proto::PrepareReply>, Status> {
        self.0.check_open()?;
        self.0.prepare(&request.into_inner().txn_id).await.map(Response::new)
    }

    async fn commit(&self, request: Request<proto::CommitRequest>) -> Result<Response<proto::CommitReply>, Status> {
        self.0.check_open()?;
        self.0.commit(&request.into_inner().txn_id).await.map(Response::new)
    }

    async fn abort(&self, request: Request<proto::AbortRequest>) -> Result<Response<proto::AbortReply>, Status> {
        self.0.check_open()?;
        self.0.abort(&request.into_inner().txn_id).await.map(Response::new)
    }

    type CheckBackStream = EventStream<proto::CheckBackQuestion>;

    async fn check_back(
        &self,
        request: Request<Streaming<proto::CheckBackRequest>>,
    ) -> Result<Response<Self::CheckBackStream>, Status> {
        self.0.check_open()?;
        let mut requests = request.into_inner();
        let group =
            match requests.message().await? {
                Some(proto::CheckBackRequest {
                    request: Some(proto::check_back_request::Request::Register(register)),
                }) if !register.group.is_empty() => register.group,
                _ => return Err(invalid("the first request of a CheckBack stream must register a non-empty group")),
            };
        let (stream_id, mut questions) = self.0.register_producer(&group);
        let (tx, rx) = mpsc::channel(consume::EVENTS_BUFFERED);
        let native = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut shutdown = native.shutdown.subscribe();
            loop {
                tokio::select! {
                    question = questions.recv() => match question {
                        Some(question) => if tx.send(Ok(question)).await.is_err() { break },
                        None => break,
                    },
                    request = requests.message() => match request {
                        Ok(Some(proto::CheckBackRequest { request: Some(proto::check_back_request::Request::Answer(answer)) })) => {
                            if let Err(status) = native.answer(stream_id, &answer) {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                        }
                        Ok(Some(_)) => {
                            let _ = tx.send(Err(invalid("after register, a CheckBack stream carries only answers"))).await;
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(Status::unavailable("the broker is shutting down"))).await;
                        break;
                    }
                }
            }
            native.unregister_producer(&group, stream_id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn query_key(
        &self,
        request: Request<proto::QueryKeyRequest>,
    ) -> Result<Response<proto::QueryKeyReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let found = self
            .0
            .core
            .idempotency_lookup(vhost(&request.vhost), &request.queue, &request.key)
            .await
            .map_err(core_status)?;
        Ok(Response::new(match found {
            Some(record) => proto::QueryKeyReply {
                committed: true,
                position: Some(position_out(record.position)),
                committed_ms: record.committed_ms,
            },
            None => proto::QueryKeyReply::default(),
        }))
    }

    async fn declare_exchange(
        &self,
        request: Request<proto::DeclareExchangeRequest>,
    ) -> Result<Response<proto::DeclareExchangeReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let arguments = headers_in(request.arguments, 0)?;
        let kind = ExchangeKind::from_declare(&request.r#type, &arguments).map_err(core_status)?;
        let spec = ExchangeSpec {
            vhost: vhost(&request.vhost).to_owned(),
            name: request.name,
            kind,
            passive: request.passive,
            durable: request.durable,
            auto_delete: request.auto_delete,
            internal: request.internal,
            arguments,
        };
        self.0.core.declare_exchange(spec).await.map_err(core_status)?;
        Ok(Response::new(proto::DeclareExchangeReply {}))
    }

    async fn delete_exchange(
        &self,
        request: Request<proto::DeleteExchangeRequest>,
    ) -> Result<Response<proto::DeleteExchangeReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        self.0
            .core
            .delete_exchange(vhost(&request.vhost), &request.name, request.if_unused)
            .await
            .map_err(core_status)?;
        Ok(Response::new(proto::DeleteExchangeReply {}))
    }

    async fn declare_queue(
        &self,
        request: Request<proto::DeclareQueueRequest>,
    ) -> Result<Response<proto::DeclareQueueReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let spec = QueueSpec {
            vhost: vhost(&request.vhost).to_owned(),
            name: request.name,
            passive: request.passive,
            durable: request.durable,
            exclusive: false,
            connection: None,
            auto_delete: request.auto_delete,
            arguments: headers_in(request.arguments, 0)?,
        };
        let declared = self.0.core.declare_queue(spec).await.map_err(core_status)?;
        Ok(Response::new(proto::DeclareQueueReply {
            name: declared.name,
            message_count: declared.message_count,
            consumer_count: declared.consumer_count,
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<proto::DeleteQueueRequest>,
    ) -> Result<Response<proto::DeleteQueueReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let count = self
            .0
            .core
            .delete_queue(vhost(&request.vhost), &request.name, request.if_unused, request.if_empty, None)
            .await
            .map_err(core_status)?;
        Ok(Response::new(proto::DeleteQueueReply { message_count: count }))
    }

    async fn purge_queue(
        &self,
        request: Request<proto::PurgeQueueRequest>,
    ) -> Result<Response<proto::PurgeQueueReply>, Status> {
        self.0.check_open()?;
        let request = request.into_inner();
        let count = self.0.core.purge(vhost(&request.vhost), &request.name, None).await.map_err(core_status)?;
        Ok(Response::new(proto::PurgeQueueReply { message_count: count }))
    }

    async fn bind(&self, request: Request<proto::BindRequest>) -> Result<Response<proto::BindReply>, Status> {
        self.0.check_open()?;
        self.0.core.bind(binding(request.into_inner())?, None).await.map_err(core_status)?;
        Ok(Response::new(proto::BindReply {}))
    }

    async fn unbind(&self, request: Request<proto::BindRequest>) -> Result<Response<proto::BindReply>, Status> {
        self.0.check_open()?;
        self.0.core.unbind(binding(request.into_inner())?, None).await.map_err(core_status)?;
        Ok(Response::new(proto::BindReply {}))
    }

    async fn list_exchanges(
        &self,
        request: Request<proto::ListExchangesRequest>,
    ) -> Result<Response<proto::ListExchangesReply>, Status> {
        let request = request.into_inner();
        let vhost = existing_vhost(&self.0.core, &request.vhost)?;
        let exchanges = self.0.core.with_catalogue(|c| {
            c.exchanges_in(vhost)
                .map(|e| proto::ExchangeInfo {
                    name: e.name.clone(),
                    r#type: e.kind.as_str().to_owned(),
                    durable: e.durable,
                    auto_delete: e.auto_delete,
                    internal: e.internal,
                    arguments: headers_out(&e.arguments),
                })
                .collect()
        });
        Ok(Response::new(proto::ListExchangesReply { exchanges }))
    }

    async fn list_queues(
        &self,
        request: Request<proto::ListQueuesRequest>,
    ) -> Result<Response<proto::ListQueuesReply>, Status> {
        let request = request.into_inner();
        let vhost = existing_vhost(&self.0.core, &request.vhost)?;
        let core = &self.0.core;
        let mut queues: Vec<proto::QueueInfo> = core.with_catalogue(|c| {
            c.queues_in(vhost)
                .map(|q| proto::QueueInfo {
                    name: q.name.name.clone(),
                    durable: q.durable,
                    auto_delete: q.auto_delete,
                    exclusive: q.exclusive_owner.is_some(),
                    arguments: headers_out(&q.arguments),
                    partitions: q.partitions(),
                    message_count: 0,
                    consumer_count: 0,
                })
                .collect()
        });
        for queue in &mut queues {
            // A queue deleted meanwhile keeps zero counts.
            if let Ok((messages, consumers)) = core.queue_status(vhost, &queue.name) {
                queue.message_count = messages;
                queue.consumer_count = consumers;
            }
        }
        Ok(Response::new(proto::ListQueuesReply { queues }))
    }

    async fn list_bindings(
        &self,
        request: Request<proto::ListBindingsRequest>,
    ) -> Result<Response<proto::ListBindingsReply>, Status> {
        let request = request.into_inner();
        let vhost = existing_vhost(&self.0.core, &request.vhost)?;
        let bindings = self.0.core.with_catalogue(|c| {
            c.exchanges_in(vhost)
                .flat_map(|e| {
                    e.bindings().map(move |b| proto::BindRequest {
                        vhost: vhost.to_owned(),
                        source: e.name.clone(),
                        destination: Some(match b.destination {
                            Destination::Queue(name) => proto::bind_request::Destination::Queue(name.clone()),
                            Destination::Exchange(name) => proto::bind_request::Destination::Exchange(name.clone()),
                        }),
                        routing_key: b.routing_key.to_owned(),
                        arguments: headers_out(b.arguments),
                    })
                })
                .collect()
        });
        Ok(Response::new(proto::ListBindingsReply { bindings }))
    }
}

/// The vhost a listing names, if it exists.
fn existing_vhost<'a>(core: &Core, name: &'a str) -> Result<&'a str, Status> {
    let name = vhost(name);
    if core.with_catalogue(|c| c.has_vhost(name)) {
        Ok(name)
    } else {
        Err(core_status(CoreError::NotFound(format!("no vhost '{name}'"))))
    }
}

fn binding(request: proto::BindRequest) -> Result<BindingSpec, Status> {
    let destination = match request.destination {
        Some(proto::bind_request::Destination::Queue(name)) => Destination::Queue(name),
        Some(proto::bind_request::Destination::Exchange(name)) => Destination::Exchange(name),
        None => return Err(invalid("a binding needs a destination queue or exchange")),
    };
    Ok(BindingSpec {
        vhost: vhost(&request.vhost).to_owned(),
        source: request.source,
        destination,
        routing_key: request.routing_key,
        arguments: headers_in(request.arguments, 0)?,
    })
}
