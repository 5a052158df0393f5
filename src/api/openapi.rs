//! The OpenAPI 3 description generated from the handlers' `#[utoipa::path]`s, served at
//! `/openapi.json` (public; in production only with `ENABLE_SWAGGER=true`), and Swagger UI
//! at `/docs` when `ENABLE_SWAGGER=true`.

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::api;
use crate::error::{ApiError, FieldError};
use crate::state::AppState;
use crate::udc::MessageType;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(|| async { Redirect::to("/docs/") }))
        .route("/docs/", get(docs_index))
        .route("/docs/{*rest}", get(docs_file))
}

/// The request envelope of every authenticated POST and PATCH. Older droplets may send the
/// same fields under `metadata` (`{"metadata":{"source_droplet_id":5,"trace_id":..,
/// "timestamp":..},"payload":{..}}`); `message_type` then defaults to `command`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct RequestEnvelope {
    /// Optional, "1.0".
    #[schema(example = "1.0")]
    udc_version: Option<String>,
    /// Becomes the task's trace id on `POST /tasks`; echoed in the response and `X-Trace-Id`.
    #[schema(format = Uuid)]
    trace_id: String,
    /// The sender: a droplet id or `"droplet-42"`. Recorded, never trusted (the token is).
    #[schema(value_type = Object, example = 42)]
    source: Value,
    /// The receiver, normally 10.
    #[schema(value_type = Option<Object>, example = 10)]
    target: Option<Value>,
    message_type: MessageType,
    /// The endpoint's request body (its schema is given per operation).
    #[schema(value_type = Object)]
    payload: Value,
    /// When it was sent (ISO-8601; recorded, not checked for age).
    #[schema(format = DateTime)]
    timestamp: String,
}

/// The response envelope of every authenticated endpoint.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ResponseEnvelope {
    #[schema(example = "1.0")]
    udc_version: String,
    /// The request's trace id (else its `X-Trace-Id` header, else a new one).
    trace_id: String,
    /// Always 10, the orchestrator.
    #[schema(example = 10)]
    source: i32,
    /// The caller's droplet id.
    target: Option<i32>,
    #[schema(example = "response")]
    message_type: String,
    /// The answer.
    #[schema(value_type = Object)]
    payload: Value,
    #[schema(format = DateTime)]
    timestamp: String,
}

/// Every error but validation: `{"detail":"Task 123 not found","trace_id":"..."}`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ErrorBody {
    #[schema(example = "Task 123 not found")]
    detail: String,
    trace_id: Option<String>,
}

/// A 422, in FastAPI's shape: `{"detail":[{"loc":["body","trace_id"],"msg":"Field required","type":"missing"}]}`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ValidationErrorBody {
    detail: Vec<FieldError>,
    trace_id: Option<String>,
}

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "HS256 signed with JWT_SECRET_KEY (see POST /token and `orchestrator token`), \
                         or RS256 signed by the Registry. Claims: droplet_id, steward, permissions \
                         (read, write, admin), iat, exp.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Orchestrator (Droplet #10)",
        description = "Task routing, state machine, health monitoring and real-time events for the droplet mesh. \
            Authenticated endpoints take and answer UDC envelopes; errors are `{\"detail\":...}`. \
            Every response carries `X-Trace-Id`. Requests are rate limited per droplet \
            (RATE_LIMIT_PER_MINUTE, 429 with Retry-After). Swagger UI: /docs (when ENABLE_SWAGGER)."
    ),
    paths(
        api::health::health,
        api::health::capabilities,
        api::health::state_of,
        api::health::dependencies,
        api::health::version,
        api::token::mint,
        api::droplets::register,
        api::droplets::heartbeat,
        api::droplets::list,
        api::droplets::detail,
        api::droplets::activate,
        api::droplets::deactivate,
        api::droplets::capabilities,
        api::tasks::create,
        api::tasks::list,
        api::tasks::detail,
        api::tasks::explain,
        api::tasks::update,
        api::tasks::cancel,
        api::ws::tasks_feed,
        api::ws::droplets_feed,
        api::ws::status::status,
        api::message::receive,
        api::message::send,
        api::message::broadcast,
        api::metrics::summary,
        api::metrics::task_performance,
        api::metrics::tasks_by_type,
        api::metrics::droplet_performance,
        api::metrics::routing,
        api::metrics::system_health,
        api::management::list_jobs,
        api::management::pause_job,
        api::management::resume_job,
        api::management::reload_config,
        api::management::shutdown,
        api::management::emergency_stop,
        api::management::clear_cache,
        api::drain::drain,
        api::limits::list,
        api::limits::set,
        api::limits::remove,
        api::dashboard::page,
        api::dashboard::stylesheet,
        api::dashboard::script,
        api::prometheus::scrape,
        openapi_json,
    ),
    components(schemas(RequestEnvelope, ResponseEnvelope, ErrorBody, ValidationErrorBody, FieldError, MessageType)),
    modifiers(&BearerScheme),
    tags(
        (name = "public", description = "No token: health, capabilities, state, dependencies, version, metrics, this description"),
        (name = "auth", description = "Tokens"),
        (name = "droplets", description = "Registration, heartbeats, the directory"),
        (name = "tasks", description = "Tasks and their state machine"),
        (name = "messages", description = "UDC messages: commands and queries, and messages to droplets"),
        (name = "websocket", description = "Live task and droplet events (WebSocket, `?token=`)"),
        (name = "metrics", description = "JSON metrics and analytics"),
        (name = "management", description = "Operators: jobs, configuration, shutdown, emergency stop"),
        (name = "dashboard", description = "The live dashboard page (it asks for a token itself)"),
    )
)]
pub struct ApiDoc;

/// The served description: the generated one with the envelopes and error shapes filled in.
/// Built once; it depends only on the code.
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
        complete(&mut doc);
        doc
    })
}

/// This OpenAPI 3 description: always in development; in production only when Swagger is on
/// (`ENABLE_SWAGGER=true`), so a production service does not hand out a map of itself.
#[utoipa::path(get, path = "/openapi.json", tag = "public",
    responses((status = 200, description = "OpenAPI 3 description of this API", content_type = "application/json", body = Object),
              (status = 404, description = "Production with Swagger off")))]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    if !serves_description(&state.config()) {
        return ApiError::not_found("Not found").into_response();
    }
    Json(spec()).into_response()
}

/// Whether `/openapi.json` is served.
pub fn serves_description(config: &crate::config::Config) -> bool {
    !config.is_production() || config.enable_swagger
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

/// Whether an operation needs the bearer token (and so takes and answers envelopes).
fn is_enveloped(op: &Value) -> bool {
    op.get("security")
        .and_then(Value::as_array)
        .is_some_and(|reqs| reqs.iter().any(|r| r.get("bearer").is_some()))
}

/// The envelope, which the handlers' typed answers leave to the edge: enveloped request
/// bodies and response envelopes (the typed payload inside), the error bodies (with
/// `Retry-After` on 429 and `WWW-Authenticate` on 401) and the common errors of every
/// operation. Everything else (answers, parameters, operation ids) is the handlers' own.
fn complete(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let public = crate::api::ratelimit::is_exempt(path);
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            let enveloped = is_enveloped(&Value::Object(op.clone()));
            if enveloped {
                wrap_request_body(op);
            }
            let has_body = op.contains_key("requestBody");
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            let Some(responses) = responses else { continue };
            if enveloped {
                add_missing(responses, "401", "Missing, invalid or expired bearer token");
                add_missing(responses, "403", "The token lacks a permission");
            }
            if has_body {
                add_missing(responses, "413", "Body over MAX_BODY_BYTES");
                add_missing(responses, "422", "Validation failed");
            }
            if !public {
                add_missing(responses, "429", "Rate limit exceeded; see Retry-After");
            }
            for (code, response) in responses.iter_mut() {
                fill_response(code, response, enveloped);
            }
        }
    }
}

/// `request_body = NewTask` on an authenticated endpoint means an envelope whose payload is a `NewTask`.
fn wrap_request_body(op: &mut Map<String, Value>) {
    let Some(content) = op
        .get_mut("requestBody")
        .and_then(|b| b.get_mut("content"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    in_envelope(content, "RequestEnvelope");
}

/// Each media type's schema becomes `envelope` with that schema as its `payload`.
fn in_envelope(content: &mut Map<String, Value>, envelope: &str) {
    for media in content.values_mut() {
        let payload = media
            .get("schema")
            .cloned()
            .unwrap_or_else(|| json!({ "type": "object" }));
        media["schema"] = json!({
            "allOf": [
                schema_ref(envelope),
                { "type": "object", "required": ["payload"], "properties": { "payload": payload } }
            ]
        });
    }
}

/// `body = Explanation` on an authenticated endpoint's 2xx means a response envelope whose
/// payload is an `Explanation`.
fn wrap_response_body(response: &mut Map<String, Value>) {
    let Some(content) = response.get_mut("content").and_then(Value::as_object_mut) else {
        return;
    };
    in_envelope(content, "ResponseEnvelope");
}

fn add_missing(responses: &mut Map<String, Value>, code: &str, description: &str) {
    responses
        .entry(code)
        .or_insert_with(|| json!({ "description": description }));
}

fn fill_response(code: &str, response: &mut Value, enveloped: bool) {
    let Some(response) = response.as_object_mut() else {
        return;
    };
    let has_content = response
        .get("content")
        .and_then(Value::as_object)
        .is_some_and(|c| !c.is_empty());
    if has_content && enveloped && code.starts_with('2') {
        wrap_response_body(response);
    } else if !has_content {
        let schema = match code {
            c if c.starts_with('2') && enveloped => Some(schema_ref("ResponseEnvelope")),
            c if c.starts_with('2') => Some(json!({ "type": "object" })),
            "422" => Some(schema_ref("ValidationErrorBody")),
            c if c.starts_with('4') || c.starts_with('5') => Some(schema_ref("ErrorBody")),
            _ => None,
        };
        if let Some(schema) = schema {
            response.insert("content".into(), json_content(schema));
        }
    }
    let headers = response.entry("headers").or_insert_with(|| json!({}));
    match code {
        "429" => {
            headers["Retry-After"] = json!({
                "description": "Seconds until the next request fits the caller's quota",
                "schema": { "type": "integer" }
            });
        }
        "401" => {
            headers["WWW-Authenticate"] =
                json!({ "schema": { "type": "string", "example": "Bearer" } });
        }
        _ => {}
    }
    headers["X-Trace-Id"] = json!({
        "description": "The request's trace id",
        "schema": { "type": "string" }
    });
}

fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(utoipa_swagger_ui::Config::from("/openapi.json")))
        .clone()
}

async fn docs_index(State(state): State<AppState>) -> Response {
    serve_docs(&state, "")
}

async fn docs_file(State(state): State<AppState>, Path(rest): Path<String>) -> Response {
    serve_docs(&state, &rest)
}

/// Swagger UI's files, from the assets compiled into the binary (nothing fetched).
fn serve_docs(state: &AppState, file: &str) -> Response {
    if !state.config().enable_swagger {
        return ApiError::not_found("Not found").into_response();
    }
    match utoipa_swagger_ui::serve(file, swagger_config()) {
        Ok(Some(file)) => {
            let mut response = (StatusCode::OK, file.bytes.into_owned()).into_response();
            let headers = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&file.content_type) {
                headers.insert(header::CONTENT_TYPE, v);
            }
            if file.gzpipped {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            response
        }
        Ok(None) => ApiError::not_found("Not found").into_response(),
        Err(e) => ApiError::internal(format!("swagger ui: {e}")).into_response(),
    }
}
