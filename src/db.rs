//! The database: the pool, creating the database when it is missing, and migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::{redact_url, Config};

/// Why the service could not start on its database; printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("database {url}: {reason}")]
pub struct DbStartError {
    pub url: String,
    pub reason: String,
}

fn start_error(url: &str, reason: impl std::fmt::Display) -> DbStartError {
    DbStartError {
        url: redact_url(url),
        reason: reason.to_string(),
    }
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens the pool (creating the database if it does not exist) and runs the migrations.
pub async fn connect(config: &Config) -> Result<PgPool, DbStartError> {
    let url = &config.database_url;
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| start_error(url, format!("invalid URL: {e}")))?
        .application_name("orchestrator");
    create_database_if_missing(url, &options).await?;
    let pool = pool_options(config)
        .connect_with(options)
        .await
        .map_err(|e| start_error(url, describe(&e)))?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| start_error(url, format!("migrations failed: {e}")))?;
    Ok(pool)
}

pub fn pool_options(config: &Config) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.pool_max_connections())
        .min_connections(0)
        .acquire_timeout(config.database_acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        // A connection that broke while the database was away is replaced, not handed out:
        // the ping runs inside the acquire timeout, so a database that stopped answering is
        // a quick 503 rather than a request hanging on a dead socket.
        .test_before_acquire(true)
}

async fn create_database_if_missing(
    url: &str,
    options: &PgConnectOptions,
) -> Result<(), DbStartError> {
    let Some(name) = options.get_database().map(str::to_string) else {
        return Ok(());
    };
    let connect = tokio::time::timeout(Duration::from_secs(10), options.connect()).await;
    match connect {
        Err(_) => Err(start_error(url, "timed out connecting")),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("3D000") => {
            let admin = options.clone().database("postgres");
            let mut conn = admin.connect().await.map_err(|e| {
                start_error(
                    url,
                    format!(
                        "database {name:?} is missing and cannot be created: {}",
                        describe(&e)
                    ),
                )
            })?;
            let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
            {
                Ok(_) => tracing::info!(database = %name, "created the database"),
                // Another replica created it first.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => {
                    return Err(start_error(
                        url,
                        format!("cannot create database {name:?}: {}", describe(&e)),
                    ))
                }
            }
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(start_error(url, describe(&e))),
    }
}

/// A short reason for a connection failure.
fn describe(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(e) => format!("cannot connect: {e}"),
        sqlx::Error::PoolTimedOut => "timed out connecting".to_string(),
        sqlx::Error::Database(e) => e.message().to_string(),
        other => other.to_string(),
    }
}
