//! The simulation's tokens: given, signed locally with `JWT_SECRET_KEY`, or minted through
//! `/token` (development).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::SimulateArgs;
use orchestrator::config::Config;
use orchestrator::identity::{Keys, Permission};

/// The admin's token and each droplet's.
pub(super) async fn tokens(
    args: &SimulateArgs,
    http: &reqwest::Client,
    ids: &[i32],
) -> Result<(String, HashMap<i32, String>), String> {
    let secret_keys = match &args.jwt_secret {
        Some(s) if !s.is_empty() => Config::from_lookup(&|k| match k {
            "JWT_SECRET_KEY" => Some(s.clone()),
            _ => None,
        })
        .ok()
        .and_then(|c| Keys::from_config(&c).ok()),
        _ => None,
    };
    let mint = |id: i32, perms: &'static [&'static str]| {
        let keys = secret_keys.as_ref();
        let http = http.clone();
        let url = format!("{}/token", args.url.trim_end_matches('/'));
        async move {
            if let Some(keys) = keys {
                let p: Vec<Permission> =
                    perms.iter().filter_map(|p| Permission::parse(p)).collect();
                return keys
                    .mint(id, Some("simulator".into()), &p, 86_400)
                    .map_err(|e| e.to_string());
            }
            let r = http
                .post(url)
                .json(&json!({"droplet_id": id, "steward": "simulator", "permissions": perms}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!(
                    "POST /token answered {} (outside development, pass --token or set JWT_SECRET_KEY)",
                    r.status()
                ));
            }
            let body: Value = r.json().await.map_err(|e| e.to_string())?;
            body["access_token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "no access_token".to_string())
        }
    };
    let admin = match &args.token {
        Some(t) => t.clone(),
        None => mint(1, &["read", "write", "admin"]).await?,
    };
    let mut map = HashMap::new();
    for id in ids {
        map.insert(*id, mint(*id, &["read", "write"]).await?);
    }
    Ok((admin, map))
}
