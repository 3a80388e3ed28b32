//! WebSocket tunnels (SPEC §9), as a WebSocket client sees them: the
//! upgrade passes auth first, the instance's 101 is the client's, every kind
//! of message is relayed both ways with close codes and reasons kept, a
//! message over 16 MiB closes the tunnel, and a reload leaves it open.

use std::time::Duration;

use actix_ws::Item;
use awc::ws::{CloseCode, CloseReason, Frame, Message};
use futures_util::{SinkExt, StreamExt};

use crate::helpers::*;

const SECRET: &str = "gatehouse-websocket-test-secret-0123456789abc";

fn settings(upstream: &Upstream) -> String {
    format!(
        r#"
[auth]
jwt_secret = "{SECRET}"
[services.chat]
instances = {chat}

[routes.chat]
prefix = "/chat"
service = "chat"
websocket = true

[routes.private]
prefix = "/private"
service = "chat"
websocket = true
auth = true

[routes.plain]
prefix = "/plain"
service = "chat"
"#,
        chat = instances(&[upstream]),
    )
}

type Tunnel = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

async fn open(gateway: &TestGateway, path: &str) -> (awc::ClientResponse, Tunnel) {
    client()
        .ws(gateway.url(path))
        .max_frame_size(32 * 1024 * 1024)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("the WebSocket handshake through the gateway failed: {err}"))
}

/// The next frame from the gateway, within 10 s.
async fn next(tunnel: &mut Tunnel) -> Frame {
    actix_web::rt::time::timeout(Duration::from_secs(10), tunnel.next())
        .await
        .expect("a frame within 10 s")
        .expect("the tunnel is open")
        .expect("a valid frame")
}

fn text(frame: &Frame) -> String {
    match frame {
        Frame::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

fn close_of(frame: &Frame) -> (u16, String) {
    match frame {
        Frame::Close(Some(reason)) => (u16::from(reason.code), reason.description.clone().unwrap_or_default()),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

#[actix_web::test]
async fn every_kind_of_message_is_relayed_both_ways_and_the_instance_picks_the_protocol() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));

    let (response, mut tunnel) = client()
        .ws(gateway.url("/chat/room/ws?x=1"))
        .protocols(["chat.v1", "chat.v2"])
        .set_header("sec-websocket-extensions", "permessage-deflate; client_max_window_bits")
        .connect()
        .await
        .expect("the handshake succeeds");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v2",
        "the instance's choice"
    );
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    assert!(response.headers().get("x-request-id").is_some());

    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/chat/room/ws?x=1");
    assert_eq!(
        values(&seen, "sec-websocket-protocol"),
        ["chat.v1,chat.v2"],
        "as the client offered them"
    );
    assert!(seen.header("sec-websocket-extensions").is_none(), "{seen:?}");
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        seen.header("x-request-id"),
        response.headers().get("x-request-id").and_then(|v| v.to_str().ok())
    );

    tunnel.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "hello");

    tunnel.send(Message::Binary(vec![0, 1, 2, 255].into())).await.unwrap();
    assert!(matches!(next(&mut tunnel).await, Frame::Binary(bytes) if bytes[..] == [0, 1, 2, 255]));

    // Pings and pongs reach the instance; the gateway answers neither.
    tunnel.send(Message::Ping("p1".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "ping:p1");
    tunnel.send(Message::Pong("p2".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "pong:p2");

    // A fragmented message stays fragmented, both ways.
    for item in [
        Item::FirstText("hel".into()),
        Item::Continue("lo ".into()),
        Item::Last("world".into()),
    ] {
        tunnel.send(Message::Continuation(item)).await.unwrap();
    }
    let mut pieces = Vec::new();
    for _ in 0..3 {
        match next(&mut tunnel).await {
            Frame::Continuation(Item::FirstText(bytes) | Item::Continue(bytes) | Item::Last(bytes)) => {
                pieces.push(String::from_utf8_lossy(&bytes).into_owned())
            }
            other => panic!("expected a continuation frame, got {other:?}"),
        }
    }
    assert_eq!(pieces, ["hel", "lo ", "world"]);

    // A close from the client reaches the instance with its code and reason,
    // and the instance's answer comes back.
    tunnel
        .send(Message::Close(Some(CloseReason {
            code: CloseCode::Other(4001),
            description: Some("done".into()),
        })))
        .await
        .unwrap();
    assert_eq!(close_of(&next(&mut tunnel).await), (4001, "done".to_owned()));
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [4001]).await,
        "{:?}",
        upstream.ws_closes()
    );
}

#[actix_web::test]
async fn a_close_from_the_instance_reaches_the_client_with_its_code_and_reason() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));
    let (_, mut tunnel) = open(&gateway, "/chat/ws").await;
    tunnel.send(Message::Text("close:4000:bye now".into())).await.unwrap();
    assert_eq!(close_of(&next(&mut tunnel).await), (4000, "bye now".to_owned())); // The client's answer reaches the instance.
    tunnel
        .send(Message::Close(Some(CloseReason {
            code: CloseCode::Other(4000),
            description: Some("bye now".into()),
        })))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [4000]).await,
        "{:?}",
        upstream.ws_closes()
    );
}

#[actix_web::test]
async fn the_upgrade_passes_auth_first_and_the_instance_sees_the_user() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));

    match client().ws(gateway.url("/private/ws")).connect().await {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => assert_eq!(status, 401),
        Err(other) => panic!("expected a 401, got {other}"),
        Ok(_) => panic!("the upgrade without a token was tunnelled"),
    }
    assert_eq!(upstream.hits(), 0);

    let (response, mut tunnel) = client()
        .ws(gateway.url("/private/ws"))
        .bearer_auth(hs256_token(SECRET, "ada"))
        .connect()
        .await
        .expect("the handshake with a token succeeds");
    assert_eq!(response.status(), 101);
    assert_eq!(values(&upstream.last_seen(), "x-user-id"), ["ada"]);
    tunnel.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "hi");
}

#[actix_web::test]
async fn an_instance_that_does_not_switch_protocols_answers_as_a_normal_response() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));
    for (path, status, body) in [
        ("/chat/ws-refused", 403, "no tunnels here"),
        ("/chat/ws-ignored", 200, "a plain answer"),
    ] {
        let reply = raw_request(
            &gateway,
            &[
                &format!("GET {path} HTTP/1.1"),
                "Host: localhost",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ],
        );
        assert_eq!(reply.status, status, "{path}: {reply:?}");
        assert_eq!(reply.body, body, "{path}");
        assert_eq!(reply.header("x-upstream-instance"), Some("chat"), "{path}");
        assert_eq!(reply.header("server"), None, "{path}");
        assert!(reply.header("x-request-id").is_some(), "{path}");
    }
}

#[actix_web::test]
async fn upgrades_elsewhere_are_forwarded_as_plain_requests_without_upgrade() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));
    for (path, upgrade) in [("/plain/ws", "websocket"), ("/chat/ws", "h2c")] {
        let reply = raw_request(
            &gateway,
            &[
                &format!("GET {path} HTTP/1.1"),
                "Host: localhost",
                &format!("Upgrade: {upgrade}"),
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                "Connection: close",
            ],
        );
        assert_eq!(reply.status, 200, "{path} Upgrade: {upgrade}: {reply:?}");
        let seen = upstream.last_seen();
        assert_eq!(seen.target, path);
        assert!(seen.header("upgrade").is_none(), "{seen:?}");
        assert!(seen.header("connection").is_none(), "{seen:?}");
    }
}

#[actix_web::test]
async fn a_message_over_16_mib_closes_the_tunnel_with_1009_to_its_sender_and_1001_to_the_other_side() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&settings(&upstream));

    // Exactly 16 MiB passes, both ways.
    let (_, mut tunnel) = open(&gateway, "/chat/ws").await;
    tunnel.send(Message::Binary(vec![7u8; 16 << 20].into())).await.unwrap();
    assert!(matches!(next(&mut tunnel).await, Frame::Binary(bytes) if bytes.len() == 16 << 20));

    // One byte more from the client.
    tunnel
        .send(Message::Binary(vec![7u8; (16 << 20) + 1].into()))
        .await
        .unwrap();
    assert_eq!(close_of(&next(&mut tunnel).await).0, 1009);
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [1001]).await,
        "{:?}",
        upstream.ws_closes()
    );

    // One byte more from the instance.
    let (_, mut tunnel) = open(&gateway, "/chat/ws").await;
    tunnel
        .send(Message::Text(format!("send:{}", (16 << 20) + 1).into()))
        .await
        .unwrap();
    assert_eq!(close_of(&next(&mut tunnel).await).0, 1001);
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [1001, 1009]).await,
        "{:?}",
        upstream.ws_closes()
    );
}

#[actix_web::test]
async fn a_reload_leaves_open_tunnels_open_and_metrics_count_them() {
    let upstream = Upstream::start("chat");
    // Metrics are process-wide: a route name of this test's own.
    let toml = settings(&upstream).replace("[routes.chat]", "[routes.reloading]");
    let gateway = TestGateway::start(&toml);
    let (_, mut tunnel) = open(&gateway, "/chat/ws").await;
    tunnel.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "before");
    let metrics = get(&gateway.url("/metrics")).await.text();
    assert_eq!(
        sample(&metrics, "gatehouse_websocket_tunnels_open", &[("route", "reloading")]),
        Some(1.0),
        "{metrics}"
    );

    std::fs::write(
        gateway.settings_file(),
        gateway.config_text(&format!(
            "{}[routes.extra]\nprefix = \"/extra\"\nservice = \"chat\"\n",
            settings(&upstream)
        )),
    )
    .unwrap();
    gateway.reload().await.expect("the reload succeeds");

    tunnel.send(Message::Text("after".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "after");
    tunnel
        .send(Message::Close(Some(CloseCode::Normal.into())))
        .await
        .unwrap();
    assert_eq!(close_of(&next(&mut tunnel).await).0, 1000);

    assert!(
        eventually(Duration::from_secs(5), async || {
            let metrics = get(&gateway.url("/metrics")).await.text();
            sample(&metrics, "gatehouse_websocket_tunnels_open", &[("route", "reloading")]) == Some(0.0)
                && sample(
                    &metrics,
                    "gatehouse_websocket_tunnels_total",
                    &[("route", "reloading"), ("ended", "client_closed")],
                ) == Some(1.0)
        })
        .await
    );
}

#[actix_web::test]
async fn on_shutdown_open_tunnels_are_closed_with_1001_once_the_drain_time_is_up() {
    let upstream = Upstream::start("chat");
    let mut gateway = GatewayProcess::start(&settings(&upstream), &[("GATEHOUSE__SERVER__SHUTDOWN_TIMEOUT_S", "2")]);
    let (_, mut tunnel) = client()
        .ws(gateway.url("/chat/ws"))
        .connect()
        .await
        .expect("the handshake succeeds");
    tunnel.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "still here");

    gateway.signal("TERM");
    let signalled = std::time::Instant::now();
    // The tunnel stays open while the drain lasts…
    actix_web::rt::time::sleep(Duration::from_millis(600)).await;
    tunnel.send(Message::Text("draining".into())).await.unwrap();
    assert_eq!(text(&next(&mut tunnel).await), "draining");
    // …and is closed with 1001 on both sides before it ends.
    assert_eq!(close_of(&next(&mut tunnel).await).0, 1001);
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(2),
        "closed {took:?} after SIGTERM with shutdown_timeout_s = 2"
    );
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [1001]).await,
        "{:?}",
        upstream.ws_closes()
    );
    assert_eq!(gateway.wait_exit(Duration::from_secs(5)), Some(0));
}

#[actix_web::test]
async fn a_tunnel_with_no_message_either_way_for_the_idle_limit_is_closed_with_1001() {
    let upstream = Upstream::start("chat");
    // The binary, with the idle limit of 300 s cut to 800 ms by its test hook.
    let gateway = GatewayProcess::start(&settings(&upstream), &[("GATEHOUSE_TEST_WEBSOCKET_IDLE_MS", "800")]);
    let (_, mut tunnel) = client()
        .ws(gateway.url("/chat/ws"))
        .connect()
        .await
        .expect("the handshake succeeds");
    // Messages either way keep it open past the limit…
    for round in 0..3 {
        actix_web::rt::time::sleep(Duration::from_millis(500)).await;
        tunnel
            .send(Message::Text(format!("round {round}").into()))
            .await
            .unwrap();
        assert_eq!(text(&next(&mut tunnel).await), format!("round {round}"));
    }
    // …silence does not.
    let quiet = std::time::Instant::now();
    assert_eq!(close_of(&next(&mut tunnel).await).0, 1001);
    assert!(
        quiet.elapsed() >= Duration::from_millis(700),
        "closed after {:?}",
        quiet.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), async || upstream.ws_closes() == [1001]).await,
        "{:?}",
        upstream.ws_closes()
    );
}

#[actix_web::test]
async fn the_upgrade_counts_once_against_the_rate_limits_whatever_the_tunnel_carries() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&format!(
        "{}[rate_limit]\nglobal = \"two\"\n[rate_limit.policies.two]\nwindow_s = 60\nmax = 2\nkey = \"ip\"\nmessage = \"Slow down\"\n",
        settings(&upstream)
    ));
    let (_, mut first) = open(&gateway, "/chat/ws").await;
    for n in 0..20 {
        first.send(Message::Text(format!("{n}").into())).await.unwrap();
        assert_eq!(text(&next(&mut first).await), format!("{n}"));
    }
    let (_, _second) = open(&gateway, "/chat/ws").await;
    match client().ws(gateway.url("/chat/ws")).connect().await {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => assert_eq!(status, 429),
        Err(other) => panic!("expected a 429, got {other}"),
        Ok(_) => panic!("a third upgrade got through a policy of 2"),
    }
    assert_eq!(upstream.hits(), 2, "the refused upgrade never reached the instance");
}

#[actix_web::test]
async fn tunnels_do_not_count_against_the_instance_s_connection_cap() {
    let upstream = Upstream::start("chat");
    let gateway = TestGateway::start(&format!(
        "[upstream]\nmax_connections_per_host = 2\n{}",
        settings(&upstream)
    ));
    let mut tunnels = Vec::new();
    for n in 0..4 {
        let (_, mut tunnel) = open(&gateway, "/chat/ws").await;
        tunnel.send(Message::Text(format!("tunnel {n}").into())).await.unwrap();
        assert_eq!(text(&next(&mut tunnel).await), format!("tunnel {n}"));
        tunnels.push(tunnel);
    }
    // Plain requests to the instance still find a connection.
    assert_eq!(get(&gateway.url("/plain/x")).await.status, 200);
}
