//! Why a raw record was rejected: a stable reason code (the `vp.reason` DLQ
//! header and the `reason` label of the DLQ counter) and a detail sentence.

/// Reason codes, stable: users alert on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    EmptyPayload,
    PayloadTooLarge,
    InvalidUtf8,
    TruncatedJson,
    InvalidJson,
    NestingTooDeep,
    NotAnObject,
    UnknownEventType,
    MissingField,
    WrongType,
    InvalidId,
    InvalidValue,
    UnparseableTime,
    TimeOutOfRange,
    TimeInFuture,
    NoMapping,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::EmptyPayload,
        Reason::PayloadTooLarge,
        Reason::InvalidUtf8,
        Reason::TruncatedJson,
        Reason::InvalidJson,
        Reason::NestingTooDeep,
        Reason::NotAnObject,
        Reason::UnknownEventType,
        Reason::MissingField,
        Reason::WrongType,
        Reason::InvalidId,
        Reason::InvalidValue,
        Reason::UnparseableTime,
        Reason::TimeOutOfRange,
        Reason::TimeInFuture,
        Reason::NoMapping,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::EmptyPayload => "empty_payload",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::TruncatedJson => "truncated_json",
            Reason::InvalidJson => "invalid_json",
            Reason::NestingTooDeep => "nesting_too_deep",
            Reason::NotAnObject => "not_an_object",
            Reason::UnknownEventType => "unknown_event_type",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::InvalidId => "invalid_id",
            Reason::InvalidValue => "invalid_value",
            Reason::UnparseableTime => "unparseable_time",
            Reason::TimeOutOfRange => "time_out_of_range",
            Reason::TimeInFuture => "time_in_future",
            Reason::NoMapping => "no_mapping",
        }
    }
}

/// A rejected record.
#[derive(Clone, Debug, PartialEq)]
pub struct Reject {
    pub reason: Reason,
    pub detail: String,
}

impl Reject {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.detail)
    }
}
