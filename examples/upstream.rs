//! A tiny example upstream service for the demo: answers `/health` and echoes
//! every other request back as JSON (method, path, query, headers, body size).
//!
//! `cargo run --example upstream -- 127.0.0.1:3001 user`

use std::collections::BTreeMap;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

async fn echo(req: HttpRequest, body: web::Bytes, name: web::Data<String>) -> HttpResponse {
    if req.path() == "/health" {
        return HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "service": name.as_str() }));
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    HttpResponse::Ok().json(serde_json::json!({
        "service": name.as_str(),
        "method": req.method().as_str(),
        "path": req.path(),
        "query": req.query_string(),
        "headers": headers,
        "body_bytes": body.len(),
    }))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:3001".to_owned());
    let name = args.next().unwrap_or_else(|| "upstream".to_owned());
    println!("upstream {name} listening on http://{address}");
    let data = web::Data::new(name);
    HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
            .default_service(web::to(echo))
    })
    .workers(1)
    .bind(address)?
    .run()
    .await
}
