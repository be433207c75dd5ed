//! A test wrapper around a rumqttc client, shared by the MQTT 3.1.1 (`rumqttc`) and MQTT 5
//! (`rumqttc::v5`) tests: the event loop runs in its own task and reports every event on a
//! channel, so acknowledgements and keep-alive go on while a test waits; the wrapper waits for
//! the CONNACK, for SUBACKs and publish acknowledgements, and keeps PUBLISHes that arrive in the
//! meantime for [`Client::recv`].
//!
//! The two rumqttc APIs have the same shape but different types, so the wrapper is a macro
//! expanded in each test module after its `use rumqttc...` lines. Dropping a client aborts its
//! task, which closes the socket without DISCONNECT (an abnormal disconnection); `disconnect`
//! sends DISCONNECT first.

macro_rules! rumqttc_client {
    () => {
        /// A connected client; see the module documentation of `rumqttc_client`.
        #[derive(Debug)]
        pub struct Client {
            pub client: AsyncClient,
            pub connack: ConnAck,
            pub id: String,
            events: tokio::sync::mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
            task: tokio::task::JoinHandle<()>,
            backlog: std::collections::VecDeque<Publish>,
            ended: bool,
        }

        impl Drop for Client {
            fn drop(&mut self) {
                self.task.abort();
            }
        }

        impl Client {
            /// Connect and wait for a successful CONNACK; panics otherwise.
            pub async fn connect(options: MqttOptions) -> Self {
                let id = options.client_id();
                match Self::try_connect(options).await {
                    Ok(client) => client,
                    Err(error) => panic!("client {id:?} could not connect: {error:?}"),
                }
            }

            /// Connect; the connection error if the broker refuses or closes.
            pub async fn try_connect(options: MqttOptions) -> Result<Self, ConnectionError> {
                let id = options.client_id();
                let (client, mut event_loop) = AsyncClient::new(options, 64);
                let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        let event = event_loop.poll().await;
                        let failed = event.is_err();
                        if tx.send(event).is_err() || failed {
                            return;
                        }
                    }
                });
                let deadline = tokio::time::Instant::now() + crate::raw::REPLY_TIMEOUT;
                loop {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(Some(Ok(Event::Incoming(Incoming::ConnAck(connack))))) => {
                            let backlog = std::collections::VecDeque::new();
                            return Ok(Self { client, connack, id, events, task, backlog, ended: false });
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(error))) => return Err(error),
                        Ok(None) => panic!("client {id:?}: the event loop ended before CONNACK"),
                        Err(_) => panic!("client {id:?}: no CONNACK within {:?}", crate::raw::REPLY_TIMEOUT),
                    }
                }
            }

            /// The next event within `wait`: `None` on timeout. Panics once the loop has ended.
            pub async fn next_event(&mut self, wait: std::time::Duration) -> Option<Result<Event, ConnectionError>> {
                assert!(!self.ended, "client {:?}: the connection has already ended", self.id);
                match tokio::time::timeout(wait, self.events.recv()).await {
                    Ok(Some(event)) => {
                        if event.is_err() {
                            self.ended = true;
                        }
                        Some(event)
                    }
                    Ok(None) => {
                        self.ended = true;
                        panic!("client {:?}: the event loop ended", self.id)
                    }
                    Err(_) => None,
                }
            }

            /// Wait for the event `pick` selects, keeping PUBLISHes seen on the way.
            pub async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
                let deadline = tokio::time::Instant::now() + crate::raw::REPLY_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.next_event(left).await {
                        Some(Ok(event)) => {
                            if let Some(found) = pick(&event) {
                                return found;
                            }
                            if let Event::Incoming(Incoming::Publish(publish)) = event {
                                self.backlog.push_back(publish);
                            }
                        }
                        Some(Err(error)) => {
                            panic!("client {:?} waiting for {what}: connection error {error:?}", self.id)
                        }
                        None => panic!("client {:?}: no {what} within {:?}", self.id, crate::raw::REPLY_TIMEOUT),
                    }
                }
            }

            /// SUBSCRIBE to one filter; the SUBACK's return codes.
            pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
                self.client.subscribe(filter, qos).await.expect("queue SUBSCRIBE");
                self.await_suback(filter).await
            }

            /// The next SUBACK's return codes.
            pub async fn await_suback(&mut self, what: &str) -> Vec<SubscribeReasonCode> {
                self.wait_for(&format!("SUBACK for {what}"), |event| match event {
                    Event::Incoming(Incoming::SubAck(suback)) => Some(suback.return_codes.clone()),
                    _ => None,
                })
                .await
            }

            /// PUBLISH and wait until it is acknowledged (QoS 1: PUBACK, QoS 2: PUBCOMP; QoS 0: sent).
            pub async fn publish(
                &mut self,
                topic: &str,
                qos: QoS,
                retain: bool,
                payload: impl Into<Vec<u8>>,
            ) -> Option<Incoming> {
                self.client.publish(topic, qos, retain, payload.into()).await.expect("queue PUBLISH");
                self.await_publish_ack(topic, qos).await
            }

            /// Wait for the PUBLISH just queued to be sent and acknowledged; the acknowledgement.
            pub async fn await_publish_ack(&mut self, topic: &str, qos: QoS) -> Option<Incoming> {
                let what = format!("PUBLISH to {topic} sent");
                let pkid = self
                    .wait_for(&what, |event| match event {
                        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => Some(*pkid),
                        _ => None,
                    })
                    .await;
                match qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(
                        self.wait_for(&format!("PUBACK for {topic}"), |event| match event {
                            Event::Incoming(packet @ Incoming::PubAck(ack)) if ack.pkid == pkid => Some(packet.clone()),
                            _ => None,
                        })
                        .await,
                    ),
                    QoS::ExactlyOnce => Some(
                        self.wait_for(&format!("PUBCOMP for {topic}"), |event| match event {
                            Event::Incoming(packet @ Incoming::PubComp(comp)) if comp.pkid == pkid => {
                                Some(packet.clone())
                            }
                            _ => None,
                        })
                        .await,
                    ),
                }
            }

            /// The next PUBLISH received; panics if none arrives within the reply timeout.
            pub async fn recv(&mut self, what: &str) -> Publish {
                if let Some(publish) = self.backlog.pop_front() {
                    return publish;
                }
                self.wait_for(what, |event| match event {
                    Event::Incoming(Incoming::Publish(publish)) => Some(publish.clone()),
                    _ => None,
                })
                .await
            }

            /// The next PUBLISH if one arrives within `wait`.
            pub async fn try_recv(&mut self, wait: std::time::Duration) -> Option<Publish> {
                if let Some(publish) = self.backlog.pop_front() {
                    return Some(publish);
                }
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    match self.next_event(left).await {
                        Some(Ok(Event::Incoming(Incoming::Publish(publish)))) => return Some(publish),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => panic!("client {:?}: connection error while receiving: {error:?}", self.id),
                        None => return None,
                    }
                }
            }

            /// The next `count` PUBLISHes.
            pub async fn recv_n(&mut self, count: usize, what: &str) -> Vec<Publish> {
                let mut out = Vec::with_capacity(count);
                for n in 0..count {
                    out.push(self.recv(&format!("{what} ({} of {count})", n + 1)).await);
                }
                out
            }

            /// No PUBLISH arrives within `wait` (the connection must stay up).
            pub async fn expect_no_publish(&mut self, wait: std::time::Duration, what: &str) {
                if let Some(publish) = self.backlog.pop_front() {
                    panic!("client {:?}: expected no PUBLISH ({what}), got {publish:?}", self.id);
                }
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    match self.next_event(left).await {
                        Some(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                            panic!("client {:?}: expected no PUBLISH ({what}), got {publish:?}", self.id)
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            panic!("client {:?}: connection error while waiting ({what}): {error:?}", self.id)
                        }
                        None => return,
                    }
                }
            }

            /// Wait until the connection ends; its error. PUBLISHes on the way are kept.
            pub async fn expect_closed(&mut self, what: &str) -> ConnectionError {
                let deadline = tokio::time::Instant::now() + crate::raw::CLOSE_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.next_event(left).await {
                        Some(Ok(Event::Incoming(Incoming::Publish(publish)))) => self.backlog.push_back(publish),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return error,
                        None => panic!(
                            "client {:?}: still connected {:?} later ({what})",
                            self.id,
                            crate::raw::CLOSE_TIMEOUT
                        ),
                    }
                }
            }

            /// Send DISCONNECT, and wait for the server to close the connection (so the socket
            /// closes cleanly with nothing unread).
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("queue DISCONNECT");
                let deadline = tokio::time::Instant::now() + crate::raw::CLOSE_TIMEOUT;
                while !self.ended {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if self.next_event(left).await.is_none() {
                        panic!("client {:?}: the server did not close the connection after DISCONNECT", self.id);
                    }
                }
            }

            /// Close the socket without DISCONNECT.
            pub fn drop_connection(self) {
                drop(self);
            }
        }
    };
}
