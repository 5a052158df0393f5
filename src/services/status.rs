//! The states of the rows, as enums (stored as the spec's text values, which the schema's
//! CHECK constraints already limit to these).

/// A task's state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Assigned,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

pub const ALL_STATUSES: [Status; 6] = [
    Status::Pending,
    Status::Assigned,
    Status::InProgress,
    Status::Completed,
    Status::Failed,
    Status::Cancelled,
];

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Assigned => "assigned",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Status> {
        ALL_STATUSES.iter().copied().find(|s| s.as_str() == raw)
    }

    /// Completed and cancelled never move again; failed moves only by a retry.
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// A droplet's state: routed to only when `active`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DropletStatus {
    Active,
    Inactive,
    Error,
}

impl DropletStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DropletStatus::Active => "active",
            DropletStatus::Inactive => "inactive",
            DropletStatus::Error => "error",
        }
    }

    pub fn parse(raw: &str) -> Option<DropletStatus> {
        [
            DropletStatus::Active,
            DropletStatus::Inactive,
            DropletStatus::Error,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// Stores and reads an enum as its text value.
macro_rules! text_column {
    ($t:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $t {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $t {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let raw = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                <$t>::parse(raw).ok_or_else(|| format!("unknown {}: {raw}", stringify!($t)).into())
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_column!(Status);
text_column!(DropletStatus);
