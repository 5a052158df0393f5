//! The create scenario with the mix a mesh sends (issue 26, item 2): 1,000 droplets
//! registered, some capable of the tasks' five capabilities (some of those with a contract
//! the payloads meet), most capable of something else; tasks that require one of the five
//! capabilities, payloads of a few hundred bytes, fresh trace ids and 2 % repeats. Its ceiling
//! is the spec's task + history insert as one statement (one round trip) with the same rows,
//! run by the bench against the same database.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    closed_loop, count_trigger, drop_db, fresh_db_url, http_client, row, token, LoadResult, Row,
    Server, Sizes, INSERT_TASK,
};

/// The capabilities the mix's tasks require.
pub const CAPABILITIES: [&str; 5] = ["verify", "ocr", "translate", "summarize", "classify"];

/// Droplets registered.
pub const DROPLETS: i32 = 1000;

/// One request in this many repeats a trace id sent before (2 %).
const REPEAT_EVERY: u64 = 50;

/// Droplet `id`'s capabilities and contracts: every tenth is capable of one of the five (by
/// id), 20 droplets each; those of `verify` and `ocr` all have a contract for it that the
/// mix's payloads meet (every such creation evaluates one), half of those of `translate` do
/// (any payload goes), those of the other two none. The other 900 are capable of things no
/// task asks for.
pub fn droplet(id: i32) -> (Vec<String>, Value) {
    if id % 10 != 0 {
        return (
            vec![format!("other-{}", id % 37), "storage".into()],
            json!({}),
        );
    }
    let c = (id / 10) as usize % CAPABILITIES.len();
    let capability = CAPABILITIES[c];
    let schemas = if c < 2 || (c == 2 && id % 20 == 0) {
        json!({ capability: {"type": "object", "required": ["document", "language"],
            "properties": {"document": {"type": "string", "maxLength": 4096},
                           "language": {"enum": ["en", "fr", "de"]},
                           "pages": {"type": "integer", "minimum": 1}}} })
    } else {
        json!({})
    };
    (vec![capability.to_string(), "storage".into()], schemas)
}

/// Task `n` of the mix: one of the five capabilities, a payload of about 300 bytes.
pub fn task(n: u64) -> Value {
    json!({
        "task_type": "document",
        "title": format!("document {n}"),
        "required_capability": CAPABILITIES[n as usize % CAPABILITIES.len()],
        "priority": 1 + (n % 10),
        "payload": payload(n),
    })
}

fn payload(n: u64) -> Value {
    let language = ["en", "fr", "de"][n as usize % 3];
    json!({
        "document": format!("s3://mesh-documents/2026/12/{n:012}/original.pdf"),
        "language": language,
        "pages": 1 + n % 40,
        "requested_by": "droplet-5",
        "options": {"ocr_engine": "tesseract-5", "dpi": 300, "deskew": true,
                    "notes": "a few hundred bytes, as the mesh's tasks carry"},
        "callback": format!("https://droplet-5.mesh.example/results/{n}"),
    })
}

/// Registers the mix's droplets (16 at a time) and pauses routing: the scenario measures
/// creation, and these droplets' endpoints answer nothing.
pub async fn register_droplets(base: &str) {
    let client = http_client(16);
    let url = format!("{base}/droplets/register");
    futures::stream::iter(1..=DROPLETS)
        .map(|id| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let (capabilities, schemas) = droplet(id);
                let body = json!({"trace_id": Uuid::new_v4(), "source": id, "target": 10,
                    "message_type": "command", "timestamp": chrono::Utc::now().to_rfc3339(),
                    "payload": {"droplet_id": id, "name": format!("mix-{id}"), "steward": "bench",
                        "endpoint": format!("http://127.0.0.1:9/d/{id}"),
                        "capabilities": capabilities, "capability_schemas": schemas}});
                let r = client
                    .post(&url)
                    .bearer_auth(token(id, &["read", "write"]))
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("register {id}: {e}"));
                assert!(r.status().is_success(), "register {id}: {}", r.status());
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let r = client
        .post(format!(
            "{base}/management/scheduler/jobs/task_router/pause"
        ))
        .bearer_auth(token(1, &["read", "write", "admin"]))
        .send()
        .await
        .expect("pause routing");
    assert!(r.status().is_success(), "pause routing: {}", r.status());
}

/// The trace ids of the run: a fresh one, or one in [`REPEAT_EVERY`] a recent one again.
#[derive(Clone, Default)]
struct Traces(Arc<Mutex<Vec<Uuid>>>);

impl Traces {
    fn next(&self, n: u64) -> Uuid {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if n % REPEAT_EVERY == REPEAT_EVERY - 1 {
            if let Some(t) = recent.last() {
                return *t;
            }
        }
        let t = Uuid::new_v4();
        if recent.len() >= 64 {
            recent.remove(0);
        }
        recent.push(t);
        t
    }
}

/// `POST /tasks` of the mix in a closed loop; a repeat answers 200 (or 201 if it overtook
/// its first), both counted.
pub async fn post_tasks(s: &Sizes, base: &str) -> LoadResult {
    let client = http_client(s.concurrency);
    let url = format!("{base}/tasks");
    let tok = token(5, &["read", "write"]);
    let traces = Traces::default();
    closed_loop(s.concurrency, s.warmup, s.measure, move |n| {
        let (client, url, tok) = (client.clone(), url.clone(), tok.clone());
        let trace = traces.next(n);
        async move {
            let body = json!({"udc_version": "1.0", "trace_id": trace, "source": 5, "target": 10,
                "message_type": "command", "timestamp": chrono::Utc::now().to_rfc3339(),
                "payload": task(n)});
            matches!(client.post(&url).bearer_auth(&tok).json(&body).send().await,
                     Ok(r) if r.status().is_success())
        }
    })
    .await
}

/// The ceiling's row `n`: the mix's task through the spec's one statement.
async fn insert_directly(pool: &PgPool, n: u64, trace: Uuid) -> Result<(), sqlx::Error> {
    let t = task(n);
    let _id: Option<i32> = sqlx::query_scalar(INSERT_TASK)
        .bind(trace)
        .bind("document")
        .bind(format!("document {n}"))
        .bind(None::<String>)
        .bind(&t["payload"])
        .bind(t["required_capability"].as_str())
        .bind(1 + (n % 10) as i32)
        .bind(3)
        .bind(None::<chrono::NaiveDateTime>)
        .bind("5")
        .bind("droplet-5")
        .fetch_optional(pool)
        .await?;
    Ok(())
}

/// The scenario at one pool size: the service with the mix, then the ceiling on the same
/// database (its droplets and tasks still there), without our status-count trigger.
pub async fn run(s: &Sizes, rows: &mut Vec<Row>, pool_size: u32) {
    let db = fresh_db_url();
    let server = Server::start(&db, pool_size, &[]).await;
    register_droplets(&server.base).await;
    let api = post_tasks(s, &server.base).await;
    server.stop();
    count_trigger(&db, false).await;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .connect(&db)
        .await
        .expect("pool");
    let ceiling = {
        let pool = pool.clone();
        let traces = Traces::default();
        closed_loop(s.concurrency, s.warmup, s.measure, move |n| {
            let pool = pool.clone();
            let trace = traces.next(n);
            async move { insert_directly(&pool, n, trace).await.is_ok() }
        })
        .await
    };
    pool.close().await;
    drop_db(&db).await;
    rows.push(row(
        "create",
        &format!(
            "POST /tasks, the mix ({DROPLETS} droplets, 5 capabilities, ~300-byte payloads, 2 % repeats), {} clients, pool {pool_size}",
            s.concurrency
        ),
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} non-2xx)",
            api.rate(),
            api.latency.p50,
            api.latency.p99,
            api.errors
        ),
        format!(
            "one-statement ceiling {:.0} tx/s (p99 {:.2} ms): ratio {:.2} (target 0.7)",
            ceiling.rate(),
            ceiling.latency.p99,
            api.rate() / ceiling.rate().max(0.001)
        ),
    ));
}
