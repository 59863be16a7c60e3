//! OpenTelemetry trace support: W3C trace context, sampling, span building and
//! OTLP/HTTP protobuf encoding, plus a bounded export batcher.
